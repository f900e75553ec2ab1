"""Everything MLflow: where the store is, runs and their tags, params that respect
MLflow's limits (long values truncated, secrets masked, full config as an artifact),
step-wise training metrics, tables and artifacts, and the cached base-model scores.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import traceback
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

# MLflow's own limits (mlflow.utils.validation): exceeding them raises mid-run.
MAX_PARAM_VALUE = 6000
MAX_PARAM_KEY = 250
MAX_PARAMS_PER_BATCH = 100
# A key is secret when its last component names one (hub_token, db.password), not when a
# word merely contains it (eval.max_new_tokens).
SECRET_KEY = re.compile(r"(^|[._])\w*(token|password|passwd|secret|api_key|apikey|credentials?)$", re.I)
URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")
# Values of these environment variables are scrubbed from anything we log.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "FTLAB_API_KEY", "MLFLOW_TRACKING_PASSWORD")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any training starts."""


def mask(text: str) -> str:
    """Hide passwords in URLs and the values of known secret environment variables."""
    text = URL_PASSWORD.sub(r"\1***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def default_tracking_uri(root: Path | None = None) -> str:
    root = (root or Path.cwd()) / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


def setup(tracking_uri: str | None, experiment: str) -> str:
    """Point MLflow at the store and make sure the experiment exists. Fails loudly now,
    not after an hour of training, if the store cannot be reached."""
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                artifact_location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
            try:
                client.create_experiment(experiment, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:
                pass  # another worker created it meanwhile
        mlflow.set_experiment(experiment)
    except Exception as e:
        raise TrackingError(f"cannot use the MLflow tracking store tracking_uri={mask(uri)}: {e}") from e
    return uri


@contextmanager
def trial_run(run_name: str, tags: dict):
    """An MLflow run that never ends up silently RUNNING: success -> FINISHED with
    ftlab.state=finished; an exception -> FAILED with the error summary as a tag and the
    traceback as an artifact; Ctrl-C / SIGTERM -> KILLED. The exception propagates."""
    with mlflow.start_run(run_name=run_name, tags=tags, nested=mlflow.active_run() is not None) as active:
        try:
            yield active
        except BaseException as e:
            interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
            _record_failure(e, "killed" if interrupted else "failed")
            mlflow.end_run(status="KILLED" if interrupted else "FAILED")
            raise
        mlflow.set_tag("ftlab.state", "finished")


def _record_failure(error: BaseException, state: str) -> None:
    try:
        summary = mask(f"{type(error).__name__}: {error}")[:MAX_PARAM_VALUE]
        mlflow.set_tags({"ftlab.state": state, "ftlab.error": summary or type(error).__name__,
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


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Dotted keys -> string values, secrets masked and values cut to MLflow's limit."""
    flat: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            key = prefix[:-1][:MAX_PARAM_KEY]
            value = "***" if SECRET_KEY.search(key) and node else mask(json.dumps(node) if isinstance(node, list) else str(node))
            if len(value) > MAX_PARAM_VALUE:
                value = value[: MAX_PARAM_VALUE - 15] + "...[truncated]"
            flat[key] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def log_config(cfg: DictConfig) -> None:
    params = flatten(cfg)
    items = list(params.items())
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[i : i + MAX_PARAMS_PER_BATCH]))
    mlflow.log_text(mask(OmegaConf.to_yaml(cfg, resolve=True)), "config/resolved.yaml")


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


def training_callback():
    """A transformers TrainerCallback that logs each logged step (loss, lr, grad norm)."""
    from transformers import TrainerCallback

    class MlflowSteps(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            renamed = {("train_" + k if k in ("loss", "grad_norm", "learning_rate") else k): v
                       for k, v in numeric.items()}
            if renamed:
                mlflow.log_metrics(renamed, step=state.global_step)

    return MlflowSteps()


def log_samples(prompts: list[str], references: list[str], predictions: list[str], artifact: str) -> None:
    mlflow.log_table(
        {"prompt": prompts, "reference": references, "prediction": predictions}, artifact_file=artifact
    )


def find_base_scores(key: str) -> dict[str, float] | None:
    """Metrics of an earlier base-model evaluation with the same key, if any."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`ftlab.base_eval_key` = '{key}' and attributes.status = 'FINISHED'",
        max_results=1, output_format="list",
    )
    return dict(runs[0].data.metrics) if runs else None


def log_base_scores(key: str, model_name: str, metrics: dict[str, float], samples: dict, tags: dict) -> None:
    with mlflow.start_run(run_name=f"base:{model_name}", nested=mlflow.active_run() is not None,
                          tags={"ftlab.role": "base_eval", "ftlab.base_eval_key": key, **tags}):
        mlflow.log_metrics(metrics)
        mlflow.log_table(samples, artifact_file="samples/base_generations.json")
