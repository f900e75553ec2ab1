"""Sweep reports: a real (tiny) 3-trial sweep, plus a failed and a skipped trial, is
turned into report.md / report.html / PNG figures and logged on the sweep's parent run.

Until the sweeper lands, the sweep is made in-process with the tags the sweeper writes."""
from __future__ import annotations

import base64
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import mlflow
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from ftlab import report, tracking
from ftlab.memory import estimate
from ftlab.pipeline import run
from tests.conftest import CONF, ROOT, TINY, store_overrides

SWEEP_ID = "sweep-test"
QUICK = [*TINY, "train.max_steps=2", "data.num_records=60", "data.eval_size=6"]
TRIALS = [("lora_r=4", "lr=1e-3"), ("lora_r=8", "lr=5e-4"), ("lora_r=16", "lr=2e-3")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def compose_cfg(store: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*QUICK, *store_overrides(store), *overrides])


def trial_tags(number: int) -> dict:
    return {"ftlab.sweep_id": SWEEP_ID, "ftlab.trial_number": str(number)}


def make_sweep(store: Path) -> str:
    """The sweeper's layout: a parent run tagged role=sweep; trials are its child runs."""
    (store / "mlruns").mkdir(parents=True, exist_ok=True)
    first = compose_cfg(store)
    tracking.setup(first.tracking_uri, first.experiment)
    parent_tags = {"ftlab.role": "sweep", "ftlab.sweep_id": SWEEP_ID, "ftlab.objective": "rouge_l",
                   "ftlab.direction": "maximize",
                   "ftlab.command": "python -m ftlab -m model=tiny train.max_steps=2 lora_r=4,8,16 lr=1e-3,5e-4,2e-3"}
    with mlflow.start_run(run_name=SWEEP_ID, tags=parent_tags) as parent:
        for number, overrides in enumerate(TRIALS):
            cfg = compose_cfg(store, *overrides)
            run(cfg)
            _tag_last_trial(number, estimate(cfg).total_gb)
        failing = compose_cfg(store, "lora_r=32", "train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 1}]")
        with pytest.raises(RuntimeError, match="injected failure"):
            run(failing)
        _tag_last_trial(3, estimate(failing).total_gb)
        too_big = compose_cfg(store, "lora_r=64", "lr=1e-4")
        with mlflow.start_run(run_name="skipped", nested=True, tags={
                **trial_tags(4), "ftlab.role": "trial", "ftlab.state": "skipped_budget",
                "ftlab.skip_reason": "predicted peak 31.0 GiB vs budget.vram_gb=24 GiB: over budget"}):
            tracking.log_config(too_big)
            mlflow.log_metric("predicted_peak_gb", 31.0)
            mlflow.end_run(status="KILLED")
    return parent.info.run_id


def _tag_last_trial(number: int, predicted_gb: float) -> None:
    """What the sweeper's callback does after each trial: number it and log the prediction."""
    [last] = mlflow.search_runs(filter_string="tags.`ftlab.role` = 'trial'", order_by=["attributes.start_time DESC"],
                                max_results=1, output_format="list")
    client = MlflowClient()
    for key, value in trial_tags(number).items():
        client.set_tag(last.info.run_id, key, value)
    client.log_metric(last.info.run_id, "predicted_peak_gb", predicted_gb)
