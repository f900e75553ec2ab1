"""Shared fixtures: compose the real Hydra config with tiny, fast settings and a
private MLflow store per test."""
from __future__ import annotations

import atexit
import functools
import json
import logging
import logging.config
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # before anything imports torch
    # pytest-xdist workers share the cores: torch threads per worker (and per command a test starts) are
    # set to their share, not one per core each, which leaves threads waiting on each other.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(workers))))

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import ftlab.config  # noqa: E402,F401  (registers the schema)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small enough that a tiny run takes seconds; still real training and real metrics.
TINY = [
    "model=tiny",
    "data.num_records=120",
    "data.eval_size=12",
    "train.max_seq_length=256",
    "eval.max_new_tokens=24",
    "eval.samples_to_log=5",
]


def store_overrides(tmp_path: Path) -> list[str]:
    return [
        f"tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"output_dir={tmp_path}/runs",
        f"sweep.report_dir={tmp_path}/reports",
    ]


@functools.cache
def _empty_store() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="ftlab-empty-store-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{directory}/mlflow.db").search_experiments(max_results=1)  # makes its tables
    return directory / "mlflow.db"


def seed_store(tmp_path: Path) -> None:
    """tmp_path/mlruns/mlflow.db as MLflow makes a new SQLite store, copied from one made once per
    worker: making its tables (~40 migrations) takes 2-3 s, which every test with a store of its own paid.
    Tests that check no store is made use another path."""
    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir(exist_ok=True)
    if not store.exists():
        shutil.copyfile(_empty_store(), store)


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) -> the DictConfig `python -m ftlab <overrides>` would see."""
    seed_store(tmp_path)

    def _make(*overrides: str, tiny: bool = True):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=[*(TINY if tiny else []), *store_overrides(tmp_path), *overrides])

    return _make


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900, env: dict | None = None):
    """Run `python -m ftlab ...` the way a user does; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def logging_state() -> dict[str, tuple]:
    loggers = [logging.getLogger(),
               *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    return {lg.name: (lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers}


def restore_logging(state: dict[str, tuple]) -> None:
    """Handlers a command's Hydra logging config added write to a stream pytest closes after the test
    (or to a log file, closed here)."""
    for name, logger in [("root", logging.getLogger()), *logging.root.manager.loggerDict.items()]:
        if isinstance(logger, logging.Logger):
            handlers, level, propagate, disabled = state.get(name, ([], logging.NOTSET, True, False))
            for added in set(logger.handlers) - set(handlers):
                added.close()
            logger.handlers[:], logger.propagate, logger.disabled = handlers, propagate, disabled
            logger.setLevel(level)


def restore_environ(environ: dict[str, str]) -> None:
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})


def show_warning_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


# Python's own warning filters, before any -W or pytest setting: what a new process shows.
PYTHON_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                          ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                          ("ignore", ResourceWarning, None)]


@pytest.fixture
def in_process(capsys, monkeypatch, tmp_path):
    """in_process(module, *args, cwd=tmp_path) -> CompletedProcess: `python -m <module> <args>` run as
    that does (runpy, as __main__) in this process: the same argument parsing, messages, warnings and exit
    status, without the ~10 s a new process spends importing torch and MLflow. A test whose point is the
    process itself (a signal, a kill, a second worker, an installed wheel) starts one with run_cli."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    def _call(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        logging_was, environ = logging_state(), dict(os.environ)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        code = 0
        with monkeypatch.context() as patch, warnings.catch_warnings():
            patch.setattr(sys, "argv", [module, *args])
            # Hydra's logging.config.dictConfig would close every handler there is, pytest's among them:
            # a new process has none to close.
            patch.setattr(logging.config, "_clearExistingHandlers", lambda: None)
            patch.chdir(cwd or tmp_path)
            # Warnings as a new process shows them, on its stderr (pytest records them otherwise); not
            # runpy's that the module is imported already, as it is here on purpose.
            warnings.resetwarnings()
            for action, category, where in PYTHON_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=where or "")
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            warnings.showwarning = show_warning_on_stderr
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            finally:  # what the command set for its own process: Hydra's state, logging, signals, env vars
                GlobalHydra.instance().clear()
                HydraConfig.instance().cfg = None
                restore_logging(logging_was)
                for s, handler in handlers.items():
                    signal.signal(s, handler)
                restore_environ(environ)
        out = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out.out, out.err)

    return _call


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's tokenizer (ChatML template), built locally: no hub."""
    from ftlab import models

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny"])
    return models.load_tokenizer(models.resolve_checkpoint(cfg.model, None))


@pytest.fixture(scope="session")
def data_cfg():
    """data_cfg(**overrides) -> the composed `data` node with those keys set, validated by the
    schema like command-line overrides, without paying for a Hydra compose per call."""
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose("config", overrides=TINY).data

    def _make(**overrides):
        return OmegaConf.merge(base, overrides)

    return _make


@contextmanager
def server_database(backend: str):
    """A throwaway database on the machine's PostgreSQL or MariaDB server, as a SQLAlchemy URL."""
    name = f"ftlab_{uuid.uuid4().hex[:10]}"
    if backend == "postgresql":
        import psycopg2

        admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
        admin.autocommit = True
        url, drop = f"postgresql://postgres@127.0.0.1:5432/{name}", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    else:
        import pymysql

        admin = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
        url, drop = f"mysql+pymysql://root@127.0.0.1:3306/{name}", f"DROP DATABASE IF EXISTS {name}"
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield url
    finally:
        admin.cursor().execute(drop)
        admin.close()


LLAMA_31_8B_CONFIG = {  # the published config.json's shape keys (meta-llama/Llama-3.1-8B-Instruct)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}


def weightless_checkpoint(tmp_path: Path) -> Path:
    """A Llama 3.1 8B checkpoint directory with its config.json and no weights: priced as the 8B,
    and any attempt to load it fails, so a test that passes with it loaded nothing."""
    checkpoint = tmp_path / "Llama-3.1-8B-Instruct"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text(json.dumps(LLAMA_31_8B_CONFIG))
    return checkpoint
