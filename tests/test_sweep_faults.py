"""Sweeps survive their trials: a trial that raises or runs out of memory is recorded
FAILED and the sweep goes on; a sweep killed with SIGKILL resumes where it stopped;
two workers share one study without running a trial twice."""
import subprocess
import sys
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from hydra_plugins.ftlab_optuna_sweeper.optuna_sweeper import postgres_driver
from tests.conftest import ROOT, store_overrides
from tests.sweeping import SMALL_TRIAL, runs, sweep

def optuna_sweep_args(storage, name, n_trials, *extra, grace_period=2):
    # Heartbeat every second; stale after grace_period s, so a re-run soon after a kill takes over its trial.
    return ["hydra/sweeper=optuna", "hydra.sweeper.sampler=random", "hydra.sweeper.seed=0",
            f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={name}",
            f"hydra.sweeper.n_trials={n_trials}", "lora_r=choice(4,8,16)", "hydra.sweeper.heartbeat_interval=1",
            f"hydra.sweeper.grace_period={grace_period}", *extra]


def test_failed_and_oom_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    fault = "train.callbacks=[{_target_:tests.faults.FailOnTrial,trial:${sweep.trial_number},oom_on:[1],raise_on:[3]}]"
    sweep(tmp_path, *optuna_sweep_args(storage, "faults", 3, fault))
    trials = optuna.load_study(study_name="faults", storage=storage).trials
    assert [t.params["lora_r"] for t in trials] == [8, 16, 16, 8, 8]  # RandomSampler(seed=0)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.FAIL,
                                         TrialState.COMPLETE]
    assert trials[1].user_attrs["failure_kind"] == "oom"
    assert trials[3].user_attrs["failure_kind"] == "exception" and "injected failure" in trials[3].user_attrs["error"]
    # The OOM's predicted peak caps the rest of the study: the same config is skipped before it
    # loads anything (and told back over budget, which TPE reads as infeasible); a smaller one runs.
    assert "ran out of memory (budget.oom_at_gb)" in trials[2].user_attrs["skip_reason"]
    assert trials[2].user_attrs["budget_excess_gb"] > 0
    [parent] = runs(tmp_path, "sweep")
    report = (tmp_path / "reports" / parent.data.tags["ftlab.sweep_id"] / "report.md").read_text()
    assert "injected failure in trial 3" in report and "MemoryCapExceeded" in report
    by_id = {r.info.run_id: r for r in runs(tmp_path)}
    assert sorted(r.info.status for r in by_id.values()) == ["FAILED", "FAILED", "FINISHED", "FINISHED", "KILLED"]
    for t in trials:
        assert by_id[t.user_attrs["mlflow_run_id"]].data.tags["ftlab.trial_number"] == str(t.number)
    oom_run = by_id[trials[1].user_attrs["mlflow_run_id"]]
    assert oom_run.data.tags["ftlab.failure_kind"] == "oom"
    assert "predicted_peak_gb" in oom_run.data.metrics and "peak_memory_mb_cpu_peak_rss" in oom_run.data.metrics
    assert by_id[trials[2].user_attrs["mlflow_run_id"]].data.tags["ftlab.state"] == "skipped_budget"


def test_grid_sweep_goes_on_after_a_failed_trial(tmp_path):
    fault = "train.callbacks=[{_target_:tests.faults.FailOnTrial,trial:${sweep.trial_number},raise_on:[0]}]"
    sweep(tmp_path, "lora_r=4,8", fault)  # exit code 0: the sweep itself succeeded
    states = sorted((r.data.tags["ftlab.trial_number"], r.info.status) for r in runs(tmp_path))
    assert states == [("0", "FAILED"), ("1", "FINISHED")]


def kill_hook(tmp_path, trial, at):
    return (f"{{_target_:tests.faults.KillOnce,trial:${{sweep.trial_number}},kill_trial:{trial},at:{at},"
            f"marker:'{tmp_path}/killed-{trial}'}}")


def test_sigkill_at_three_points_then_rerun_finishes_without_redoing_trials(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    hooks = f"train.callbacks=[{kill_hook(tmp_path, 2, 'mid_training')},{kill_hook(tmp_path, 3, 'before_eval')}]"
    at_start = ("+hydra.callbacks.kill_at_start={_target_:tests.faults.KillAtTrialStart,kill_trial:1,"
                f"marker:'{tmp_path}/killed-at-start'}}")
    args = optuna_sweep_args(storage, "crash", 3, hooks, at_start)
    assert sweep(tmp_path, *args, check=False).returncode == -9  # trial 0 done; killed as trial 1 starts
    assert sweep(tmp_path, *args, check=False).returncode == -9  # resumed, killed mid-training of trial 2
    assert sweep(tmp_path, *args, check=False).returncode == -9  # resumed, killed before evaluating trial 3
    sweep(tmp_path, *args)  # resumed again: finishes
    trials = optuna.load_study(study_name="crash", storage=storage).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and [t.state for t in trials].count(TrialState.FAIL) == 3
    assert trials[0].state == TrialState.COMPLETE  # done before the first kill, not redone
    all_runs = runs(tmp_path)
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    assert sorted(r.info.status for r in all_runs) == ["FINISHED"] * 3 + ["KILLED"] * 2
    linked = [t.user_attrs["mlflow_run_id"] for t in complete]
    assert len(set(linked)) == 3
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FINISHED"


def worker(tmp_path, storage, name, n_trials):
    cmd = [sys.executable, "-m", "ftlab", "-m", *SMALL_TRIAL, *store_overrides(tmp_path),
           f"hydra.sweep.dir={tmp_path}/multirun-{uuid.uuid4().hex[:6]}", 
           # busy workers must not fail each other's live trials
           *optuna_sweep_args(storage, name, n_trials, grace_period=120)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_two_workers_share_one_study(tmp_path, backend):
    name = f"two-workers-{uuid.uuid4().hex[:8]}"
    storage = ("postgresql://postgres@127.0.0.1:5432/test" if backend == "postgresql"
               else f"sqlite:///{tmp_path}/optuna.db")
    # Create both stores first, as an operator would, so the workers do not race on schema creation.
    from ftlab import tracking

    (tmp_path / "mlruns").mkdir()
    tracking.setup(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "ftlab")
    optuna.create_study(study_name=name, storage=postgres_driver(storage), direction="maximize")
    procs = [worker(tmp_path, storage, name, 3) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name=name, storage=postgres_driver(storage)).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert len({t.number for t in trials}) == len(trials)
    trial_runs = runs(tmp_path)
    linked = [t.user_attrs["mlflow_run_id"] for t in complete]
    assert len(set(linked)) == 3 and set(linked) <= {r.info.run_id for r in trial_runs}
    numbers = [r.data.tags["ftlab.trial_number"] for r in trial_runs]
    assert len(numbers) == len(set(numbers))  # no trial ran twice
