"""Everything MLflow: where the store is, runs and their tags, params that respect
MLflow's limits (long values truncated, secrets masked, full config as an artifact),
step-wise training metrics that survive a tracking outage, tables and artifacts,
the runs a resume may continue, and the cached base-model scores.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import time
import traceback
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from ftlab.checkpoints import Interrupted, ResumeError
from ftlab.config import FtlabConfig

# MLflow's own limits (mlflow.utils.validation): exceeding them raises mid-run.
MAX_PARAM_VALUE = 6000
DEFAULT_EXPERIMENT = FtlabConfig.experiment
MAX_PARAM_KEY = 250
MAX_PARAMS_PER_BATCH = 100
# A key is secret when its last component names one (hub_token, db.password), not when a
# word merely contains it (eval.max_new_tokens).
SECRET_KEY = re.compile(r"(^|[._])\w*(token|password|passwd|secret|api_key|apikey|credentials?)$", re.I)
URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")
# Values of these environment variables are scrubbed from anything we log.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "FTLAB_API_KEY", "MLFLOW_TRACKING_PASSWORD")


log = logging.getLogger("ftlab")

# MLflow's HTTP defaults (7 retries, backoff factor 2, 120 s timeout) keep a dead server busy
# for minutes per call; fail in seconds instead. Step metrics have their own retry buffer
# (BufferedMetrics). Environment values set by the user win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# Outside the config hash, yet what makes two trials of a grid differ (latest_attempts).
TRIAL_KEYS_NOT_HASHED = ("train.callbacks", "train.save_steps")
# Config keys that do not change what is trained: left out of the resume identity.
NOT_IN_CONFIG_HASH = ("train.resume", *TRIAL_KEYS_NOT_HASHED, "sweep.", "budget.oom_at_gb")
# Keys added to the schema since runs were recorded: in the identity only once set, so those runs resume.
HASHED_ONCE_SET = ("model.arch.head_dim",)
# Where a run is logged is not what it trains (a resume from another directory names the first one's store
# explicitly): hashed at its default, the value the hashes of runs recorded before this held for it.
HASHED_AS_DEFAULT = {"tracking_uri": "None"}


class TrackingError(RuntimeError):
    """The tracking store cannot be used: at start, before any training; or still unreachable as a
    run ends, once its metrics are written to a file (StoreUnreachable)."""


class StoreUnreachable(TrackingError):
    """The store went away as a run ended (recipe._log_final_metrics): its scores are in the run's
    spill file, its last step's checkpoint is kept, and the run stays RUNNING in the store, which
    could not end it. Resumed once the store is back, the run is scored and logged again."""


def store_argument(tracking_uri: str | None) -> str:
    """' tracking_uri=...' for a printed command that must reach a run's store (masked, quoted
    for a shell), or '' for the default ./mlruns."""
    return f" {shlex.quote(f'tracking_uri={mask(tracking_uri)}')}" if tracking_uri else ""


def registry_arguments(model_name: str | None, experiment: str) -> str:
    """' registry.model_name=...' and ' experiment=...' (where not the defaults) for a printed
    registry command, so it names the registered model the run's own settings name."""
    args = [f"registry.model_name={model_name}"] if model_name else []
    args += [f"experiment={experiment}"] if experiment != DEFAULT_EXPERIMENT else []
    return "".join(f" {shlex.quote(arg)}" for arg in args)


def shown_args(args: list[str]) -> list[str]:
    """Command-line overrides as they may be shown or logged: a secret key's value (db.password=...)
    as ***, passwords in URLs masked."""
    return [f"{a.split('=', 1)[0]}=***" if "=" in a and SECRET_KEY.search(a.split("=", 1)[0].lstrip("+~"))
            else mask(a) for a in args]


# Overrides that do not choose what a run trains: Hydra's own, a sweep's bookkeeping (trial number,
# name, objective), and the resume. (The cap the sweeper sets after an OOM stays: with
# budget.fit=auto_batch it chose the micro-batch.)
NOT_REPRODUCED = ("hydra.", "sweep.", "train.resume=")


def run_overrides() -> str | None:
    """The overrides that composed this run (in a sweep, the fixed ones and the trial's values, as
    the sweeper handed them over), as `python -m ftlab` takes them: the tag ftlab.overrides, which
    a report repeats to reproduce the run. None outside a Hydra command, or too long for a tag."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    kept = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(NOT_REPRODUCED)]
    text = shlex.join(shown_args(kept))
    if len(text) > MAX_PARAM_VALUE:
        log.warning("the run's overrides (%d characters) are too long for MLflow's tag ftlab.overrides: not "
                    "tagged; a sweep's report rebuilds its command from the params instead", len(text))
        return None
    return text


def mask(text: str) -> str:
    """Hide passwords in URLs and the values of known secret environment variables."""
    text = URL_PASSWORD.sub(r"\1***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


BUSY_TIMEOUT = "timeout=60"  # what sqlite_busy_timeout adds to a SQLite URI, and shown_store leaves out


def shown_store(uri: str) -> str:
    """A store's URI as messages show it: masked, and without the SQLite busy timeout ftlab adds
    (sqlite_busy_timeout), so it reads as the tracking_uri the user passed."""
    base, _, query = uri.partition("?")
    kept = [p for p in query.split("&") if p and p != BUSY_TIMEOUT]
    return mask(base + ("?" + "&".join(kept) if kept else ""))


def default_tracking_uri(root: Path | None = None, create: bool = True) -> str:
    root = (root or Path.cwd()) / "mlruns"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def unusable_store(uri: str, reason: object) -> TrackingError:
    return TrackingError(f"cannot use the MLflow tracking store tracking_uri={mask(uri)}: {reason}")


def existing_store(tracking_uri: str | None) -> str:
    """The store a reading command (report, registry, serve) opens. A SQLite file that is not
    there means a typo or another directory: say so, instead of creating an empty store (and
    ./mlruns) and then finding nothing in it."""
    uri = tracking_uri or default_tracking_uri(create=False)
    if (path := sqlite_file(uri)) is not None:
        if not path.is_file():
            if tracking_uri:
                raise TrackingError(f"tracking_uri={mask(uri)}: no MLflow store at {path}")
            raise TrackingError(f"no MLflow store here: the default store, ./mlruns/mlflow.db, is not in "
                                f"{Path.cwd()}; run the command where your runs' mlruns/ is, or pass tracking_uri=...")
    return uri


def sqlite_busy_timeout(uri: str) -> str:
    """SQLite takes one writer at a time and pysqlite gives up after 5 s with 'database is
    locked'; parallel trials and sweep workers on one store wait up to 60 s for the lock instead."""
    if uri.startswith("sqlite:") and "timeout=" not in uri:
        return uri + ("&" if "?" in uri else "?") + BUSY_TIMEOUT
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (its query left off); None for any other store."""
    return Path(uri.removeprefix("sqlite:///").split("?")[0]) if uri.startswith("sqlite:///") else None


def installed_driver(url: str) -> str:
    """The plain URL with the driver ftlab installs, where SQLAlchemy's default is not installed:
    postgresql:// is psycopg 3 to SQLAlchemy 2.1 (psycopg2 is the dependency), mysql:// is mysqlclient
    (PyMySQL is), so either URL works (MLflow's store, Optuna's storage)."""
    import importlib.util

    for plain, default, driver in (("postgresql://", "psycopg", "psycopg2"), ("mysql://", "MySQLdb", "pymysql")):
        if url.startswith(plain) and importlib.util.find_spec(default) is None \
                and importlib.util.find_spec(driver) is not None:
            return f"{plain[:-3]}+{driver}://" + url.removeprefix(plain)
    return url


def probe_database(uri: str, shown: str, attempts: int = 3,
                   unusable: Callable[[str, object], Exception] = unusable_store) -> None:
    """Connect once to a database store (a few tries over ~3 s). MLflow itself retries an
    unreachable database 10 times over ~100 s, warning each time: a worker started against a
    wrong URI or a stopped server should hear so in seconds. `shown`: the URI as the user gave it;
    `unusable(shown, reason)`: the error to raise, naming the setting (Optuna's storage has its own)."""
    import sqlalchemy

    timeout = {"connect_timeout": 10} if uri.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool, connect_args=timeout)
    except Exception as e:  # a malformed URL, or its driver not installed
        raise unusable(shown, e) from None
    try:
        for attempt in range(attempts):
            try:
                with engine.connect() as connection:
                    if uri.startswith("mysql"):
                        _check_mysql_charset(connection, shown, unusable)
                    return
            except sqlalchemy.exc.DBAPIError as e:
                if attempt == attempts - 1:
                    raise unusable(shown, " ".join(mask(str(e.orig)).split())) from None
                time.sleep(2.0 ** attempt)
    finally:
        engine.dispose()


def _check_mysql_charset(connection, shown: str, unusable: Callable[[str, object], Exception]) -> None:
    """A MySQL/MariaDB database made with another default than utf8mb4 (latin1) stores a non-Latin
    tag (the sweep command, a system prompt) as '?' and fails a trial's params after its model has
    loaded and the base model was scored: refused at start instead."""
    import sqlalchemy

    # Its tables' character sets where it has tables (made before the default changed, or after), else its default.
    tables = ("SELECT DISTINCT c.character_set_name FROM information_schema.tables t JOIN "
              "information_schema.collation_character_set_applicability c ON c.collation_name = t.table_collation "
              "WHERE t.table_schema = DATABASE()")
    try:
        charsets = set(connection.execute(sqlalchemy.text(tables)).scalars()) or {
            connection.execute(sqlalchemy.text("SELECT @@character_set_database")).scalar()}
    except sqlalchemy.exc.DBAPIError:  # a server that does not say: its own errors will
        return
    if wrong := sorted(str(c) for c in charsets if not str(c).startswith("utf8mb4")):
        raise unusable(shown, f"the database's character set is {', '.join(wrong)}, and MLflow's and Optuna's text needs "
                              "utf8mb4 (non-Latin params fail a trial late, tags are stored as '?'): ALTER DATABASE "
                              "<name> CHARACTER SET utf8mb4 before any table is made in it, or use a database created so")


@contextmanager
def one_process_at_a_time(store: str, what: str = "mlflow schema"):
    """Held while a process first opens a database store: workers started together on an empty
    database each ran MLflow's schema migrations at once (MySQL: "Table 'tags' already exists",
    PostgreSQL: a unique violation) and failed; and, `what` naming it, while a worker scores the
    base model once for the others. A session lock of the database server (PostgreSQL advisory
    lock, MySQL GET_LOCK), or a file lock beside a SQLite file (mlflow.db.lock for the schema, a
    hidden file per other `what`); released with its connection or process. An MLflow server's
    store: no lock."""
    name = f"ftlab: {what}"
    if (database := sqlite_file(store)) is not None:
        import fcntl

        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        lock = (database.with_name(database.name + ".lock") if what == "mlflow schema"
                else database.with_name(f".{database.name}.{digest}.lock"))
        if not lock.parent.is_dir():
            yield  # MLflow fails on it with its own message
            return
        with lock.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        return
    if not store.startswith(("postgresql", "mysql")):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(store, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            if store.startswith("postgresql"):
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext(:name))"), {"name": name})
            else:  # waits up to 10 minutes, then goes on: a lock saves duplicate work, it guards nothing
                conn.execute(sqlalchemy.text("SELECT GET_LOCK(:name, 600)"), {"name": name})
            conn.commit()
            yield
    finally:
        engine.dispose()


def _point_at(uri: str) -> str:
    """Point MLflow at the store, with ftlab's short HTTP retries and SQLite lock wait; a database
    server that cannot be reached fails now (probe_database)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    store = sqlite_busy_timeout(installed_driver(uri))
    if store.startswith(("postgresql", "mysql", "mssql")):
        probe_database(store, shown=uri)
    mlflow.set_tracking_uri(store)
    return store


def open_existing(tracking_uri: str | None) -> str:
    """For the commands that only read the store (report, registry, serve): the store that must
    be there (existing_store), opened as setup opens it but without making an experiment, and
    one line (TrackingError) when it cannot be used: a dead server in seconds, a file store."""
    uri = existing_store(tracking_uri)
    store = _point_at(uri)
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as e:
        raise unusable_store(uri, " ".join(str(e).split())[:500]) from None
    return store


def setup(tracking_uri: str | None, experiment: str) -> str:
    """Point MLflow at the store and make sure the experiment exists. Fails loudly now,
    not after an hour of training, if the store cannot be reached."""
    uri = tracking_uri or default_tracking_uri()
    store = _point_at(uri)
    try:
        with one_process_at_a_time(store):
            client = MlflowClient()  # which opens the store (its tables made or migrated)
            exp = client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if (database := sqlite_file(uri)) is not None:
                artifact_location = (database.parent / "artifacts").resolve().as_uri()
            try:
                client.create_experiment(experiment, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:
                pass  # another worker created it meanwhile
        mlflow.set_experiment(experiment)
    except Exception as e:
        raise unusable_store(uri, e) from e
    return uri


@contextmanager
def trial_run(run_name: str, tags: dict, run_id: str | None = None):
    """An MLflow run that never ends up silently RUNNING: success -> FINISHED with
    ftlab.state=finished; an exception -> FAILED with the error summary as a tag and the
    traceback as an artifact; Ctrl-C / SIGTERM -> KILLED. The exception propagates.
    run_id continues that (interrupted) run: RUNNING again, its old failure tags dropped."""
    with mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags,
                          nested=mlflow.active_run() is not None) as active:
        if run_id is not None:
            stale = active.data.tags.keys() & {"ftlab.error", "ftlab.failure_kind"}
            for key in stale:
                MlflowClient().delete_tag(run_id, key)
            mlflow.set_tag("ftlab.state", "running")
        try:
            yield active
        except StoreUnreachable:
            # Left RUNNING (the store may be back by now): a sweep run again, or train.resume=<its id>, continues
            # it. Taken off the active stack here, where start_run's exit would end it FAILED.
            try:
                mlflow.end_run(status="RUNNING")
            except Exception:
                pass
            raise
        except BaseException as e:
            interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
            _record_failure(e, "killed" if interrupted else "failed")
            try:
                mlflow.end_run(status="KILLED" if interrupted else "FAILED")
            except Exception:  # the store may be what failed: the run stays RUNNING there, the error is raised
                pass
            if type(e) is Interrupted:  # before training (training's own interrupt says what it saved)
                raise Interrupted(f"{e} before training began; MLflow run {active.info.run_id} ended KILLED",
                                  e.signal_name) from None
            raise
        mlflow.set_tag("ftlab.state", "finished")


def _record_failure(error: BaseException, state: str) -> None:
    try:
        # What happened (an interrupt's summary, without the console's advice on how a single run
        # continues, which does not fit a sweep's trial).
        text = getattr(error, "summary", None) or str(error)
        summary = mask(f"{type(error).__name__}: {text}" if text else type(error).__name__)[:MAX_PARAM_VALUE]
        mlflow.set_tags({"ftlab.state": state, "ftlab.error": summary,
                         "ftlab.failure_kind": failure_kind(error)})
        mlflow.log_text(mask("".join(traceback.format_exception(error))), "error/traceback.txt")
    except Exception:  # the store itself may be what failed; the original error matters more
        pass


def failure_kind(error: BaseException) -> str:
    text = f"{type(error).__name__} {error}".lower()
    if isinstance(error, MemoryError) or "out of memory" in text or "outofmemory" in text:
        return "oom"
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    return "exception"


def flatten(cfg: DictConfig, cut: bool = True) -> dict[str, str]:
    """Dotted keys -> string values, secrets masked and (cut) values cut to MLflow's limit."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            key = prefix[:-1][:MAX_PARAM_KEY]
            value = "***" if SECRET_KEY.search(key) and node else mask(json.dumps(node) if isinstance(node, list) else str(node))
            if cut and len(value) > MAX_PARAM_VALUE:
                value = value[: MAX_PARAM_VALUE - 15] + "...[truncated]"
            flat[key] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def hashed_params(cfg: DictConfig, cut: bool = True) -> dict[str, str]:
    """The flattened params that make up a run's config hash (NOT_IN_CONFIG_HASH and HASHED_AS_DEFAULT
    left out, HASHED_ONCE_SET while unset); cut as logged, or whole, as hashed."""
    return {k: v for k, v in flatten(cfg, cut).items() if not k.startswith(NOT_IN_CONFIG_HASH)
            and not (k in HASHED_ONCE_SET and v == "None") and k not in HASHED_AS_DEFAULT}


def config_hash(cfg: DictConfig) -> str:
    """Identity of what a run trains: its config and the content of the data file it names (an
    edited file is new training), for train.resume=true and a rerun sweep to find its twins."""
    # Whole values: two system prompts alike in their first 6,000 characters are two configs.
    flat = {**hashed_params(cfg, cut=False), **HASHED_AS_DEFAULT}
    if cfg.data.path:  # the embedded data is defined by its config; only a user's file needs reading
        from ftlab.data.prepare import source_digest  # not at import: the run's gate stays light

        flat["data.content"] = source_digest(str(cfg.data.path), cfg.data.hf_split)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(run: Run, cfg: DictConfig) -> list[str]:
    """`key: then -> now` for each param of the config hash that the run logged otherwise."""
    return [f"{k}: {run.data.params[k]} then -> {v} now" for k, v in hashed_params(cfg).items()
            if k in run.data.params and run.data.params[k] != v]


def changed_config(run: Run, cfg: DictConfig, cfg_hash: str) -> str:
    """Why a run's config hash is not this config's: the params that differ, else the data's content."""
    if differences := config_differences(run, cfg):
        return "; ".join(differences[:6])
    # What the logged params cannot show: a value's tail past MLflow's limit, the data file's content.
    long = [k for k, v in hashed_params(cfg, cut=False).items() if len(v) > MAX_PARAM_VALUE]
    unseen = [*([f"{', '.join(long)} past the {MAX_PARAM_VALUE} characters MLflow keeps"] if long else []),
              *(["the content of data.path"] if cfg.data.path else [])]
    return (" or ".join(unseen) + " changed" if unseen
            else f"ftlab.config_hash {run.data.tags.get('ftlab.config_hash')} then -> {cfg_hash} now")


def _newest_interrupted_differs(cfg: DictConfig, cfg_hash: str) -> str:
    """'; the newest KILLED/FAILED trial, <id>, was started with another config (lr: ...)', or ''."""
    # MLflow compares a status with one value at a time: not FINISHED nor RUNNING (nor SCHEDULED) is KILLED or FAILED.
    runs = mlflow.search_runs(
        filter_string="tags.`ftlab.role` = 'trial' and attributes.status != 'FINISHED' and attributes.status != "
                      "'RUNNING' and attributes.status != 'SCHEDULED'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    newest = runs[0] if runs else None
    return (f"; the newest KILLED/FAILED trial, {newest.info.run_id}, was started with another config "
            f"({changed_config(newest, cfg, cfg_hash)})" if newest else "")


def resume_candidates(runs: list[Run]) -> dict[str, Path | None]:
    """Run id -> the folder the run recorded saving its checkpoints in (its ftlab.checkpoint tag,
    absolute: from another working directory a relative output_dir names another folder), in the
    order given, for checkpoints.find_resume_point."""
    return {r.info.run_id: Path(c).parent if (c := r.data.tags.get("ftlab.checkpoint")) else None for r in runs}


def resumable_runs(resume, cfg_hash: str, cfg: DictConfig) -> tuple[dict[str, Path | None], str]:
    """The runs train.resume may continue, newest first (resume_candidates), and how they were
    chosen (for errors). true: KILLED/FAILED trials of this experiment with the same config hash (a
    RUNNING one may be alive elsewhere, so it is only continued when named); a string: that run."""
    if resume is True:
        runs = mlflow.search_runs(filter_string=f"tags.`ftlab.config_hash` = '{cfg_hash}'",
                                  order_by=["attributes.start_time DESC"], output_format="list")
        candidates = resume_candidates([r for r in runs if r.info.status in ("KILLED", "FAILED")])
        how = f"KILLED/FAILED runs with tag ftlab.config_hash={cfg_hash} in this experiment: {len(candidates)}"
        if not candidates:  # one override slipped: say what differs from the run it meant
            how += _newest_interrupted_differs(cfg, cfg_hash)
        # A process killed with kill -9 (or a lost machine) leaves its run RUNNING: named, not taken.
        if running := [r.info.run_id for r in runs if r.info.status == "RUNNING"]:
            how += (f"; RUNNING: {', '.join(running[:3])} (if no process runs it any more, after a kill -9 or a lost "
                    f"machine, resume it by name: train.resume={running[0]})")
        return candidates, how
    try:
        run = MlflowClient().get_run(str(resume))
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"train.resume={resume}: no such MLflow run in tracking_uri="
                            f"{shown_store(mlflow.get_tracking_uri())} ({e.message})") from e
    if run.info.status == "FINISHED":
        raise ResumeError(f"train.resume={resume}: that run already FINISHED; there is nothing to resume")
    if run.data.tags.get("ftlab.config_hash", cfg_hash) != cfg_hash:
        raise ResumeError(f"train.resume={resume}: that run was started with another config "
                          f"({changed_config(run, cfg, cfg_hash)}); resume with the same overrides")
    return resume_candidates([run]), f"run {run.info.run_id}"


def trained_artifact(full_fine_tune: bool) -> str:
    """Where a trial's trained weights are among its artifacts (and in its output directory):
    the LoRA adapter, or a full fine-tune's (peft.method=full) whole model."""
    return "model" if full_fine_tune else "adapter"


def log_config(cfg: DictConfig) -> None:
    """Params (flattened) and the resolved YAML. On a resumed run only keys outside the config hash
    can differ (train.resume itself): nothing to say."""
    log_new_params(flatten(cfg), say_changed=False)
    mlflow.log_text(mask(OmegaConf.to_yaml(cfg, resolve=True)), "config/resolved.yaml")


def _logged(kind: str) -> dict:
    """The active run's params or metrics as the store has them: a resumed run's, from before."""
    active = mlflow.active_run()
    return getattr(MlflowClient().get_run(active.info.run_id).data, kind) if active else {}


def log_new_params(params: dict, say_changed: bool = True) -> None:
    """Log the params the active run has not logged yet, in MLflow's batches: a resumed run keeps
    those it started with (MLflow forbids changing one), and a value that differs now is said."""
    existing = _logged("params")
    items = [(k, str(v)) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[i : i + MAX_PARAMS_PER_BATCH]))
    for key, value in params.items():
        if say_changed and key in existing and existing[key] != str(value):
            log.warning("%s: the run logged %s when it started and has %s now; its param keeps the first",
                        key, existing[key], value)


def log_new_metrics(metrics: dict[str, float]) -> None:
    """A run's one-off numbers (predicted peak, trainable parameters, the data report's counts): a
    resumed run logs them again with the same values, which would make each a two-point curve."""
    existing = _logged("metrics")
    if fresh := {k: v for k, v in metrics.items() if k not in existing}:
        mlflow.log_metrics(fresh)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class BufferedMetrics:
    """Step metrics that survive a tracking outage. Each log goes into a bounded buffer
    that is sent in batches, at most every EVERY_S seconds; when the store fails, the buffer
    keeps the metrics (with their original timestamps) and retries with exponential backoff
    on later steps. close() retries a few more times, then writes what is left to a JSONL
    file and says so loudly. Overflowing the buffer also spills to that file, so nothing is dropped."""

    BATCH = 1000  # MLflow's log_batch limit on metrics per call
    # One store write per logged step cost ~11 ms on SQLite (a transaction each, measured): 3.5%
    # of a tiny trial's training, a tenth of a 0.1 s GPU step. Batched, a live loss curve lags
    # by at most this much.
    EVERY_S = 5.0
    # With backoff 1+2+...+32 s between them (~1 min, beyond MLflow's own retries): a tracking server
    # restart is waited for rather than a run's minutes of scoring written off to a file.
    CLOSE_ATTEMPTS = 7

    def __init__(self, run_id: str, spill_path: Path, max_buffered: int = 100_000, max_backoff_s: float = 60.0):
        self.run_id, self.spill_path = run_id, Path(spill_path)
        self.pending: deque = deque()
        self.max_buffered, self.max_backoff_s = max_buffered, max_backoff_s
        self.failures, self.next_try = 0, time.monotonic() + self.EVERY_S
        self.client = MlflowClient()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self.pending) > self.max_buffered:
            self._spill([self.pending.popleft() for _ in range(len(self.pending) - self.max_buffered)])
        if time.monotonic() >= self.next_try:
            self.flush()

    def flush(self) -> bool:
        """Send everything pending; False (metrics kept) when the store fails."""
        while self.pending:
            batch = list(self.pending)[: self.BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:
                self.failures += 1
                self.next_try = time.monotonic() + min(self.max_backoff_s, 2.0 ** self.failures)
                log.warning("tracking store unreachable (%s); %d step metrics buffered, retrying in %.0f s",
                            type(e).__name__, len(self.pending), self.next_try - time.monotonic())
                return False
            for _ in batch:
                self.pending.popleft()
            if self.failures:
                log.warning("tracking store reachable again; buffered step metrics sent")
            self.failures, self.next_try = 0, time.monotonic() + self.EVERY_S
        return True

    def close(self, attempts: int | None = None) -> bool:
        """Send what is left; False when the store stayed unreachable and it went to the spill file."""
        attempts = attempts or self.CLOSE_ATTEMPTS
        for attempt in range(attempts):
            if self.flush():
                return True
            if attempt + 1 < attempts:
                time.sleep(min(self.max_backoff_s, 2.0 ** attempt))
        self._spill(list(self.pending))
        self.pending.clear()
        log.error("TRACKING STORE UNREACHABLE: metrics that could not be logged to run %s were written "
                  "to %s (one MLflow Metric per line: key, value, timestamp, step)", self.run_id, self.spill_path)
        return False

    def _spill(self, metrics: list) -> None:
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spill_path.open("a") as f:
            for m in metrics:
                f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")


def replay_spilled(run_id: str, path: Path) -> int:
    """Step metrics a tracking outage left in the run's spill file (BufferedMetrics), sent once a
    resumed run reaches the store, so its loss curve is whole again; returns how many. Steps the
    store has already are not sent twice; the run's final scores (step 0) are scored anew by the
    resumed run, and stay in the file."""
    from mlflow.entities import Metric

    if not path.is_file():
        return 0
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut off by the crash
    steps = [e for e in entries if e.get("step", 0) >= 1]
    client = MlflowClient()
    logged = {(key, m.step) for key in {e["key"] for e in steps} for m in client.get_metric_history(run_id, key)}
    fresh = []
    for e in steps:  # a step the file holds twice (a replay failed, then the resumed run spilled it again): once
        if (e["key"], e["step"]) not in logged:
            logged.add((e["key"], e["step"]))
            fresh.append(Metric(e["key"], float(e["value"]), int(e["timestamp"]), int(e["step"])))
    for i in range(0, len(fresh), BufferedMetrics.BATCH):
        client.log_batch(run_id, metrics=fresh[i : i + BufferedMetrics.BATCH])
    if rest := [e for e in entries if e.get("step", 0) < 1]:
        path.write_text("".join(json.dumps(e) + "\n" for e in rest))
    else:
        path.unlink()
    if fresh:
        log.warning("sent %d step metrics that a tracking outage had left in %s", len(fresh), path)
    return len(fresh)


def training_callback(out_dir: Path, resumed: bool = False):
    """A transformers TrainerCallback that logs each logged step (loss, lr, grad norm) through
    BufferedMetrics, and tags the run with each checkpoint saved. Its close() sends what is
    buffered: the trainer calls it at the end of training; call it too when training fails.
    A resumed run does not log again the steps its run logged after its checkpoint (a crash or
    kill -9 between checkpoints): each step stays one point of one loss curve."""
    from transformers import TrainerCallback

    run_id = mlflow.active_run().info.run_id
    metrics = BufferedMetrics(run_id, Path(out_dir) / "unlogged_metrics.jsonl")
    if resumed:
        try:
            replay_spilled(run_id, metrics.spill_path)
        except Exception as e:  # the store failing again: the file stays for the next resume
            log.warning("could not send the step metrics in %s (%s); they stay there", metrics.spill_path, e)
    logged_through = max((m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")), default=0) \
        if resumed else 0

    class MlflowSteps(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if "train_runtime" in numeric or "eval_loss" in numeric:
                # The Trainer's end-of-training summary covers this process's steps only, and an interrupted
                # run logs one too: a resumed run would get two partial ones. The run's own totals are
                # train_seconds, trained_tokens, tokens_per_second and train_loss_final (recipe.py), which
                # also logs the closing held-out loss pass's eval_loss (a second point at step 0 otherwise).
                return
            renamed = {("train_" + k if k in ("loss", "grad_norm", "learning_rate") else k): v
                       for k, v in numeric.items()}
            if state.global_step <= logged_through:
                return  # logged before the crash this run resumes from
            if renamed:
                metrics.log(renamed, step=state.global_step)

        def on_save(self, args, state, control, **kwargs):
            metrics.flush()  # the store has every step up to the checkpoint a resume continues from
            try:
                # Absolute: a resume from another working directory finds it (resume_candidates).
                mlflow.set_tag("ftlab.checkpoint",
                               str((Path(args.output_dir) / f"checkpoint-{state.global_step}").resolve()))
            except Exception:  # a tracking outage must not stop training; the checkpoint is on disk
                log.warning("could not tag checkpoint-%d (tracking store unreachable)", state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self):
            metrics.close()

    return MlflowSteps()


def samples_table(held_out: list, predictions: list[str], limit: int) -> dict[str, list[str]]:
    """The first `limit` scored held-out examples (prompt, reference, prediction). Only scored ones:
    eval.max_examples may score fewer than samples_to_log, and columns of unequal length would make
    mlflow.log_table log one row of lists instead."""
    shown = list(zip(held_out, predictions))[:limit]
    return {"prompt": [e.prompt[-1]["content"] for e, _ in shown], "reference": [e.reference for e, _ in shown],
            "prediction": [p for _, p in shown]}


def log_samples(table: dict[str, list[str]], artifact: str) -> None:
    mlflow.log_table(table, artifact_file=artifact)


def find_base_scores(key: str) -> dict[str, float] | None:
    """Metrics of an earlier base-model evaluation with the same key, if any."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`ftlab.base_eval_key` = '{key}' and attributes.status = 'FINISHED'",
        max_results=1, output_format="list",
    )
    if not runs:
        return None
    return {k: v for k, v in runs[0].data.metrics.items() if k != "eval_seconds"}


def log_base_scores(key: str, model_name: str, metrics: dict[str, float], samples: dict, tags: dict,
                    seconds: float) -> None:
    with mlflow.start_run(run_name=f"base:{model_name}", nested=mlflow.active_run() is not None,
                          tags={"ftlab.role": "base_eval", "ftlab.base_eval_key": key, **tags}):
        mlflow.log_metrics({**metrics, "eval_seconds": seconds})
        log_samples(samples, "samples/base_generations.json")


SWEEP_TAGS = ("mlflow.parentRunId", "ftlab.sweep_id", "ftlab.trial_number")
BASE_WEIGHTS = "ftlab.base_weights"  # tag: files.weights_fingerprint of the base checkpoint a run trained on
NOTHING_FINISHED = "no trial finished"  # how ftlab.error of a sweep that ran to its end but trained nothing begins


def sweep_tags(sweep) -> dict[str, str]:
    """Tags that make a trial a child of its sweep's parent run (empty outside a sweep)."""
    if not sweep.parent_run_id:
        return {}
    tags = {"mlflow.parentRunId": sweep.parent_run_id, "ftlab.sweep_id": str(sweep.id)}
    if sweep.trial_number is not None:
        tags["ftlab.trial_number"] = str(sweep.trial_number)
    return tags


def sweep_trials(sweep_id: str, cfg_hash: str) -> list:
    """This sweep's trial runs of one config (tag ftlab.config_hash), newest first."""
    return mlflow.search_runs(filter_string=f"tags.`ftlab.sweep_id` = '{sweep_id}' and tags.`ftlab.config_hash` = "
                                            f"'{cfg_hash}' and tags.`ftlab.role` = 'trial'",
                              order_by=["attributes.start_time DESC"], output_format="list")


def decided_trial(sweep_id: str, cfg_hash: str):
    """A run of this sweep that finished this config, or skipped it over budget."""
    return next((r for r in sweep_trials(sweep_id, cfg_hash)
                 if r.data.tags.get("ftlab.state") in ("finished", "skipped_budget")), None)


def finished_trial_number(sweep_id: str, trial_number: int):
    """The run of this sweep's trial number `trial_number`, if it finished."""
    runs = mlflow.search_runs(filter_string=f"tags.`ftlab.sweep_id` = '{sweep_id}' and tags.`ftlab.trial_number` = "
                                            f"'{trial_number}' and tags.`ftlab.role` = 'trial' and "
                                            "tags.`ftlab.state` = 'finished'", output_format="list")
    return runs[0] if runs else None


def interrupted_trials(sweep_id: str, cfg_hash: str) -> dict[str, Path | None]:
    """This sweep's interrupted runs of this config (KILLED by a signal or a crashed worker; not
    those skipped over budget), newest first (resume_candidates): a rerun of the sweep continues them."""
    return resume_candidates([r for r in sweep_trials(sweep_id, cfg_hash)
                              if r.info.status == "KILLED" and r.data.tags.get("ftlab.state") == "killed"])


def skipped_run(cfg: DictConfig, run_name: str, tags: dict, reason: str, predicted_gb: float) -> str:
    """Record a trial that was not started (over the VRAM budget): a KILLED run with the
    reason and the predicted peak, so the sweep's table shows why it is missing."""
    with mlflow.start_run(run_name=run_name, tags=tags, nested=mlflow.active_run() is not None) as active:
        log_config(cfg)
        mlflow.set_tags({"ftlab.state": "skipped_budget", "ftlab.skip_reason": reason})
        mlflow.log_metric("predicted_peak_gb", predicted_gb)
        mlflow.end_run(status="KILLED")
    return active.info.run_id


def start_sweep_run(sweep_id: str, command: str, objective: list[str],
                    direction: list[str]) -> tuple[str, str | None, str | None]:
    """The sweep's parent run: found by its sweep id (a resumed or second worker of the
    same study joins it) or created. Returns its run id, and the status and ftlab.error it had
    if it existed."""
    client = MlflowClient()
    experiment_id = _active_experiment_id()
    found = sweep_parent(client, experiment_id, sweep_id)
    if found is not None:
        was = client.get_run(found)
        client.update_run(found, status="RUNNING")
        if "ftlab.error" in was.data.tags:  # why it stopped last time: it goes on now
            client.delete_tag(found, "ftlab.error")
        return found, was.info.status, was.data.tags.get("ftlab.error")
    run = client.create_run(experiment_id, run_name=f"sweep-{sweep_id}", tags={
        "ftlab.role": "sweep", "ftlab.sweep_id": sweep_id, "ftlab.command": mask(command)[:MAX_PARAM_VALUE],
        "ftlab.objective": ",".join(objective), "ftlab.direction": ",".join(direction)})
    return sweep_parent(client, experiment_id, sweep_id, created=run.info.run_id), None, None


def sweep_parent(client: MlflowClient, experiment_id: str, sweep_id: str, created: str | None = None) -> str | None:
    """The oldest parent run of the sweep. Workers started at the same instant can each create
    one; every worker picks the oldest (ties by run id), so they converge, and a worker whose
    own `created` run lost deletes it."""
    parents = client.search_runs([experiment_id], f"tags.`ftlab.role` = 'sweep' and tags.`ftlab.sweep_id` = '{sweep_id}'",
                                 max_results=100, order_by=["attributes.start_time ASC"])
    if not parents:
        return None
    oldest = min(parents, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if created is not None and created != oldest:
        client.delete_run(created)
    return oldest


def _active_experiment_id() -> str:
    from mlflow.tracking.fluent import _get_experiment_id

    return _get_experiment_id()


def child_runs(parent_run_id: str) -> list:
    """Every trial run of a sweep (all states), oldest first."""
    parent = MlflowClient().get_run(parent_run_id)
    return MlflowClient().search_runs([parent.info.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`ftlab.role` = 'trial'",
                                      max_results=5000, order_by=["attributes.start_time ASC"])


def latest_attempts(runs: list) -> tuple[list, int]:
    """A sweep's trials: one run of each config among its trial runs, in start order, and how many
    other attempts were left out (a failed trial the sweep, run again, ran anew: counted once, as it
    ended last time). A decided attempt (finished, skipped over budget) is kept over any other, as a
    worker's later failure of a config another finished does not undo it."""
    def config(r):
        return (r.data.tags.get("ftlab.config_hash") or r.info.run_id,
                *(r.data.params.get(key) for key in TRIAL_KEYS_NOT_HASHED))

    def decided(r):
        return r.data.tags.get("ftlab.state") in ("finished", "skipped_budget")

    ordered = sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))
    chosen: dict[tuple, Run] = {}
    for r in ordered:  # a later attempt replaces an earlier one, unless only the earlier one was decided
        if (key := config(r)) not in chosen or decided(r) or not decided(chosen[key]):
            chosen[key] = r
    kept = [r for r in ordered if chosen[config(r)] is r]
    return kept, len(ordered) - len(kept)


def mark_killed(sweep_id: str, trial_number: int, cfg_hash: str | None = None) -> list[str]:
    """End the runs a dead process left RUNNING for this trial of the sweep (with this config, if
    given) as KILLED."""
    which = [f"tags.`ftlab.sweep_id` = '{sweep_id}'", f"tags.`ftlab.trial_number` = '{trial_number}'",
             "attributes.status = 'RUNNING'"]
    if cfg_hash is not None:
        which.append(f"tags.`ftlab.config_hash` = '{cfg_hash}'")
    client = MlflowClient()
    runs = client.search_runs([_active_experiment_id()], " and ".join(which))
    for r in runs:
        client.set_tag(r.info.run_id, "ftlab.state", "killed")
        client.set_tag(r.info.run_id, "ftlab.failure_kind", "interrupted")
        client.set_tag(r.info.run_id, "ftlab.error", "its process died while it ran (no heartbeat, or the sweep was run again)")
        client.set_terminated(r.info.run_id, status="KILLED")
    return [r.info.run_id for r in runs]
