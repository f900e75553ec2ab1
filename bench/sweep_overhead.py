"""Sweep overhead: how much of a sweep's wall time is not training or evaluating.

Runs `python -m ftlab -m lora_r=4,8,16,32 model=tiny ...` exactly as a user would (a
fresh process: interpreter start, imports, Hydra, MLflow parent run, four trials, the
sweep callback with its report), on an MLflow store that exists, as every sweep but a
store's very first command finds it (creating a SQLite store's tables, timed and printed
apart, takes ~1 s once), and compares the wall time with the sum of the trials'
own `train_seconds` + `eval_seconds` (and the base model's one evaluation) read back from
MLflow, split by the runs' timestamps into start-up, one-off preparation (before and during the
first trial), the per-trial overhead of the later trials and the end, and says how long trials
must be for the overhead to stay under 5%. Then times the rejection of an over-budget config
(Llama 3.1 8B, r=64, seq 4096, budget 8 GiB) through the real pipeline entry: it must fail
before any weights, tokenizer or data load; and the same config as a command.

    python bench/sweep_overhead.py [steps per trial]
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, arg, compose_config


def create_store(store: Path) -> float:
    """Seconds to create the MLflow store's tables, which only a store's first command pays."""
    from mlflow.tracking import MlflowClient

    start = time.perf_counter()
    MlflowClient(f"sqlite:///{store}/mlflow.db").search_experiments()
    return time.perf_counter() - start


def run_sweep(store: Path, steps: int) -> tuple[float, float]:
    """Start and end of the sweep process (epoch seconds)."""
    args = [sys.executable, "-m", "ftlab", "-m", "lora_r=4,8,16,32", "model=tiny", f"train.max_steps={steps}",
            "data.num_records=300", "data.eval_size=16", "train.max_seq_length=256", "eval.max_new_tokens=24",
            f"tracking_uri=sqlite:///{store}/mlflow.db", f"output_dir={store}/runs",
            f"hydra.sweep.dir={store}/multirun", f"cache_dir={store}/cache", f"sweep.report_dir={store}/reports"]
    start = time.time()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    end = time.time()
    if proc.returncode != 0:
        sys.exit(f"sweep failed:\n{proc.stderr[-3000:]}")
    return start, end


def breakdown(store: Path, start: float, end: float) -> dict[str, float]:
    """Where the wall time went, from the runs' own timestamps and timers."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("ftlab")
    [parent] = client.search_runs([exp.experiment_id], "tags.`ftlab.role` = 'sweep'")
    trials = client.search_runs([exp.experiment_id], "tags.`ftlab.role` = 'trial'")
    [base] = client.search_runs([exp.experiment_id], "tags.`ftlab.role` = 'base_eval'")
    trials.sort(key=lambda t: t.info.start_time)
    starts = [t.info.start_time / 1000 for t in trials]
    ends = [t.info.end_time / 1000 for t in trials]
    works = [t.data.metrics["train_seconds"] + t.data.metrics["eval_seconds"] for t in trials]
    base_eval = base.data.metrics["eval_seconds"]  # the base model's scores: evaluation work, done once
    # A later trial's overhead: from the previous trial's end to its own, less its train+eval; the
    # median, as the first of them still pays some one-offs. What the trials pay beyond that is
    # one-off (trial 0's first imports of TRL and matplotlib, warm-up).
    per_trial = statistics.median(ends[i] - ends[i - 1] - works[i] for i in range(1, len(trials)))
    return {
        "trials": len(trials),
        "wall": end - start,
        "per_trial": per_trial,
        "train + eval": sum(works),
        "base-model eval (once, before trial 0)": base_eval,
        "start-up (interpreter, Hydra, MLflow and its parent run)": parent.info.start_time / 1000 - start,
        "one-off before trial 0 (torch, transformers, peft, metrics imports; model, data)":
            starts[0] - parent.info.start_time / 1000 - base_eval,
        "one-off in the trials (TRL and plotting imports, warm-up)":
            ends[-1] - starts[0] - sum(works) - per_trial * len(trials),
        f"per trial x {len(trials)} (config, load, adapter, logging)": per_trial * len(trials),
        "end (best run, report, exit)": end - ends[-1],
    }


def over_budget(store: Path) -> tuple[str, ...]:
    """The config both rejection timings use, recorded in its own MLflow store."""
    return ("model=llama31_8b", "lora_r=64", "train.max_seq_length=4096", "budget.vram_gb=8",
            f"tracking_uri=sqlite:///{store}/reject.db", f"hydra.run.dir={store}/reject")


def rejection_seconds(store: Path) -> tuple[float, str]:
    from ftlab.memory import OverBudget
    from ftlab.pipeline import run

    cfg = compose_config(*over_budget(store))
    run_setup = time.perf_counter()
    try:
        run(cfg)
    except OverBudget as e:
        return time.perf_counter() - run_setup, e.reason
    sys.exit("the over-budget config was not rejected")


def command_line_rejection_seconds(store: Path) -> float:
    """`python -m ftlab <over-budget config>` as a user types it: interpreter, imports, Hydra, the check and
    its MLflow record, the one-line error (exit 2)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ftlab", *over_budget(store)], cwd=ROOT, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 2:
        sys.exit(f"the over-budget command did not exit 2:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    steps = arg(1, 16, int)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        store_s = create_store(store)
        parts = breakdown(store, *run_sweep(store, steps))
        rejection_seconds(store)  # the first call pays MLflow's store creation; time the second
        reject_s, reason = rejection_seconds(store)
        cli_reject_s = command_line_rejection_seconds(store)
    n, wall, per_trial = parts.pop("trials"), parts.pop("wall"), parts.pop("per_trial")
    work = parts["train + eval"] + parts["base-model eval (once, before trial 0)"]
    print(f"{n} trials x {steps} steps, wall {wall:.1f} s:")
    width = max(map(len, parts))
    for name, seconds in parts.items():
        print(f"  {name:<{width}} {seconds:6.1f} s  {seconds / wall:6.1%}")
    fixed = wall - work - per_trial * n
    # Overhead share of an n-trial sweep whose trials each take T s of train+eval:
    # (fixed + n * per_trial) / (fixed + n * (per_trial + T)) <= 5%  <=>  T >= 19 * (fixed / n + per_trial)
    break_even = 19 * (fixed / n + per_trial)
    print(f"creating the MLflow store's tables beforehand (a store's first command only): {store_s:.1f} s")
    print(f"over-budget rejection: {reject_s:.2f} s in a running process ({reason}); "
          f"{cli_reject_s:.1f} s from the command line, imports included")
    print(f"SUMMARY sweep overhead: {1 - work / wall:.1%} of wall time: {fixed:.1f} s once per sweep, {per_trial:.1f} s "
          f"per trial ({per_trial / (parts['train + eval'] / n):.0%} of a trial's train+eval); under 5% once a "
          f"{n}-trial sweep's trials take >= {break_even:.0f} s each; over-budget config rejected in {reject_s:.2f} s "
          f"({cli_reject_s:.1f} s as a command)")


if __name__ == "__main__":
    main()
