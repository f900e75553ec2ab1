"""Shared by the sweep tests: a very small trial, the sweep command, and reading back
MLflow runs and the Optuna study."""
from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, run_cli, seed_store, store_overrides

# One optimizer step on 40 records, 4 held out, 4 new tokens: a real trial in seconds.
SMALL_TRIAL = [
    "model=tiny", "data.num_records=40", "data.eval_size=4", "train.max_seq_length=256", "train.max_steps=1",
    "train.per_device_batch_size=2", "train.grad_accum=1", "eval.max_new_tokens=4", "eval.samples_to_log=2",
    "eval.compare_base=false", "train.save_adapter=false",
]


def sweep_args(tmp_path: Path, *args: str) -> list[str]:
    return ["-m", *SMALL_TRIAL, *store_overrides(tmp_path), f"hydra.sweep.dir={tmp_path}/multirun", *args]


def sweep(tmp_path: Path, *args: str, check: bool = True, env: dict | None = None, cwd: Path | None = None,
          in_process=None):
    """The sweep command, a process of its own; with in_process (the fixture), run in the test's process
    instead, where the test is about what the sweep does, not about its process (a kill, a signal,
    a second worker, what one process leaves behind from trial to trial)."""
    seed_store(tmp_path)
    if in_process is None:
        out = run_cli(*sweep_args(tmp_path, *args), env={"PYTHONPATH": str(ROOT), **(env or {})}, cwd=cwd)
    else:
        assert env is None, "a sweep that needs its own environment runs as a command"
        out = in_process("ftlab", *sweep_args(tmp_path, *args), cwd=cwd)
    if check:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def runs(tmp_path: Path, role: str = "trial", uri: str | None = None) -> list:
    client = MlflowClient(uri or f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("ftlab")
    return client.search_runs([exp.experiment_id], f"tags.`ftlab.role` = '{role}'", max_results=1000)
