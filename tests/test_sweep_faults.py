"""Sweeps survive their trials: a trial that raises or runs out of memory is recorded
FAILED and the sweep goes on; a sweep killed with SIGKILL resumes where it stopped;
two workers share one study without running a trial twice."""
import json
import subprocess
import sys
import uuid
from contextlib import ExitStack

import optuna
import pytest
from optuna.trial import TrialState

from mlflow.tracking import MlflowClient

from ftlab.report import gather
from ftlab.tracking import installed_driver
from tests.conftest import ROOT, server_database
from tests.sweeping import SMALL_TRIAL, runs, sweep

def optuna_sweep_args(storage, name, n_trials, *extra, grace_period=2):
    # Heartbeat every second; stale after grace_period s, so a re-run soon after a kill takes over its trial.
    # lr makes every trial's config new, so none is a repeat whose earlier outcome is reused.
    return ["hydra/sweeper=optuna", "hydra.sweeper.sampler=random", "hydra.sweeper.seed=8",
            f"hydra.sweeper.storage={storage}", f"hydra.sweeper.study_name={name}",
            f"hydra.sweeper.n_trials={n_trials}", "lora_r=choice(4,8,16)", "lr=tag(log, interval(1e-4, 1e-2))",
            "hydra.sweeper.heartbeat_interval=1",
            f"hydra.sweeper.grace_period={grace_period}", *extra]


def test_failed_and_oom_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    fault = "train.callbacks=[{_target_:tests.faults.FailOnTrial,trial:${sweep.trial_number},oom_on:[1],raise_on:[3]}]"
    sweep(tmp_path, *optuna_sweep_args(storage, "faults", 3, fault))
    trials = optuna.load_study(study_name="faults", storage=storage).trials
    assert [t.params["lora_r"] for t in trials] == [8, 16, 16, 4, 8]  # RandomSampler(seed=8)
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


def test_grid_sweep_goes_on_after_a_failed_trial(tmp_path, in_process):
    fault = "train.callbacks=[{_target_:tests.faults.FailOnTrial,trial:${sweep.trial_number},raise_on:[0]}]"
    sweep(tmp_path, "lora_r=4,8", fault, in_process=in_process)  # exit code 0: the sweep itself succeeded
    states = sorted((r.data.tags["ftlab.trial_number"], r.info.status) for r in runs(tmp_path))
    assert states == [("0", "FAILED"), ("1", "FINISHED")]
    # Run again, the failed config is tried anew (and fails again): the summary and the report count each
    # config once, as it ended last, not "1 finished, 2 failed of 3 trials" with #0 listed twice.
    again = sweep(tmp_path, "lora_r=4,8", fault, in_process=in_process)
    assert sorted(r.info.status for r in runs(tmp_path)) == ["FAILED", "FAILED", "FINISHED"]
    assert "1 finished, 1 failed (1 earlier attempt of these configs, run again, not counted); best run" in again.stdout
    [parent] = runs(tmp_path, "sweep")
    report = gather(MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db"), parent.info.run_id)
    assert sorted(t.number for t in report.trials) == [0, 1] and report.earlier_attempts == 1
    assert parent.data.metrics["trials_failed"] == 1


def signal_once(tmp_path, trial, signal, step=2):
    return (f"train.callbacks=[{{_target_:tests.faults.SignalOnce,trial:${{sweep.trial_number}},kill_trial:{trial},"
            f"signal:{signal},step:{step},marker:'{tmp_path}/signalled'}}]")


def loss_steps(tmp_path, run_id):
    return [m.step for m in MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_metric_history(run_id, "train_loss")]


# grid: Optuna's grid sampler counts the interrupted (FAIL) trial's point as visited; the rerun stopped as
# "exhausted" and left the queued continuation waiting.
@pytest.mark.parametrize("sampler", ["random", "grid"])
def test_a_preempted_optuna_sweep_run_again_continues_the_interrupted_trial_from_its_checkpoint(tmp_path, sampler):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    dropped = ("lora_r=", "lr=") if sampler == "grid" else ("lora_r=",)  # a grid takes no interval
    space = ["lora_r=choice(4,8)", *(a for a in optuna_sweep_args(storage, "preempted", 2,
                                                                  f"hydra.sweeper.sampler={sampler}")
                                     if not a.startswith(dropped))]
    args = ["train.max_steps=3", signal_once(tmp_path, 1, "SIGTERM"), *space]
    stopped = sweep(tmp_path, *args, check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]  # 128 + SIGTERM, as a shell reports it
    assert "Traceback" not in stopped.stderr
    message = stopped.stderr.strip().splitlines()[-1]
    assert message.startswith("ftlab: interrupted by SIGTERM at step 2; checkpoint saved in ")
    assert message.endswith("stopped: run the same command again to continue it")
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "KILLED" and "interrupted by SIGTERM" in parent.data.tags["ftlab.error"]
    report = gather(MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db"), parent.info.run_id)
    assert report.stopped.endswith("run the same command again to continue it")  # the report says so too
    first = {r.data.tags["ftlab.trial_number"]: r for r in runs(tmp_path)}
    assert sorted((n, r.info.status) for n, r in first.items()) == [("0", "FINISHED"), ("1", "KILLED")]
    interrupted = first["1"].info.run_id

    sweep(tmp_path, *args)  # the same command
    [again] = runs(tmp_path, "sweep")
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert "ftlab.error" not in again.data.tags
    trials = {r.info.run_id: r for r in runs(tmp_path)}
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials.values())
    assert trials[interrupted].data.tags["ftlab.resumed_from_step"] == "2"
    assert loss_steps(tmp_path, interrupted) == [1, 2, 3]  # one loss curve, continued after step 2
    study = optuna.load_study(study_name="preempted", storage=storage).trials
    assert [t.state for t in study] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert study[1].user_attrs["failure_kind"] == "interrupted"
    assert study[2].user_attrs["retry_of"] == 1 and study[2].params == study[1].params
    assert study[2].user_attrs["mlflow_run_id"] == interrupted


# save_steps=0: no checkpoint to continue from; the same run starts again from zero (a second, KILLED run
# of the config stayed in the sweep beside it: "1 killed, 2 finished" for a finished 2-config grid).
@pytest.mark.parametrize("save_steps", [1, 0])
def test_a_killed_grid_sweep_run_again_keeps_finished_trials_and_continues_from_the_last_checkpoint(tmp_path,
                                                                                                   save_steps):
    args = ["lora_r=4,8", "train.max_steps=3", f"train.save_steps={save_steps}", signal_once(tmp_path, 1, "SIGKILL")]
    assert sweep(tmp_path, *args, check=False).returncode == -9  # at the end of step 2, checkpoint-1 on disk
    first = {r.data.tags["ftlab.trial_number"]: r for r in runs(tmp_path)}
    assert sorted((n, r.info.status) for n, r in first.items()) == [("0", "FINISHED"), ("1", "RUNNING")]

    again = sweep(tmp_path, *args)  # the same command
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FINISHED"
    assert f"trial 0 kept: its config already finished in sweep {parent.data.tags['ftlab.sweep_id']}" in again.stdout
    trials = {r.info.run_id: r for r in runs(tmp_path)}
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials.values())
    assert trials[first["0"].info.run_id].info.end_time == first["0"].info.end_time  # kept, not trained again
    continued = trials[first["1"].info.run_id]  # the dead process's run, ended KILLED, then continued
    assert continued.data.tags["ftlab.resumed_from_step"] == str(save_steps)
    assert loss_steps(tmp_path, continued.info.run_id) == [1, 2, 3]
    assert "2 finished; best run" in again.stdout


def test_a_store_lost_as_a_trial_ends_stops_the_sweep_and_the_same_command_continues_that_trial(tmp_path, in_process,
                                                                                                monkeypatch):
    """The MLflow server went away as a trial ended: its scores went to the spill file, but its Optuna trial
    ended FAIL and was never queued again, its run stayed RUNNING for good and its checkpoint was removed:
    the same command, once the server was back, trained that config from zero in a new run."""
    import time

    from ftlab import tracking
    from tests.faults import MlflowServer, TcpRelay

    monkeypatch.setattr(tracking.BufferedMetrics, "CLOSE_ATTEMPTS", 1)  # no minute of waiting for the server
    storage = f"sqlite:///{tmp_path}/optuna.db"
    with MlflowServer(tmp_path / "server") as server:
        relay = TcpRelay(server.port).open()
        uri = f"http://127.0.0.1:{relay.port}"
        args = [*optuna_sweep_args(storage, "lost", 1), f"tracking_uri={uri}", "train.max_steps=2"]
        outage = (f"train.callbacks=[{{_target_: tests.faults.TrackingOutage, relay_port: {relay.port}, stop_at: 2, "
                  "restart_at: 99}]")  # at the end of training, before the scores are logged
        stopped = sweep(tmp_path, *args, outage, check=False, in_process=in_process)
        assert stopped.returncode == 2, stopped.stderr[-3000:]
        message = stopped.stderr.strip().splitlines()[-1]
        assert message.startswith("ftlab: tracking store unreachable at the end of run ") and message.endswith(
            "stopped: run the same command again once the store is back, and this config continues from its last "
            "checkpoint"), message
        relay.open()
        [lost] = runs(tmp_path, uri=uri)
        assert lost.info.status == "RUNNING"
        assert [t.state for t in optuna.load_study(study_name="lost", storage=storage).trials] == [TrialState.RUNNING]
        time.sleep(3)  # its heartbeat goes stale (grace_period 2 s), as a crashed worker's does

        sweep(tmp_path, *args, in_process=in_process)  # the same sweep (named), the outage over
        [continued] = runs(tmp_path, uri=uri)
        assert continued.info.run_id == lost.info.run_id and continued.info.status == "FINISHED"
        assert continued.data.tags["ftlab.resumed_from_step"] == "2" and "rouge_l" in continued.data.metrics
        study = optuna.load_study(study_name="lost", storage=storage).trials
        assert [t.state for t in study] == [TrialState.FAIL, TrialState.COMPLETE]
        assert study[1].user_attrs["retry_of"] == 0 and study[1].params == study[0].params


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
    # One FINISHED run per config; a killed trial without a checkpoint continues its own run from zero
    # where the rerun finds it (it left a second, KILLED run beside it before), so at most 2 are KILLED.
    statuses = sorted(r.info.status for r in all_runs)
    assert statuses.count("FINISHED") == 3 and statuses.count("KILLED") <= 2 and len(statuses) <= 5
    linked = [t.user_attrs["mlflow_run_id"] for t in complete]
    assert len(set(linked)) == 3
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FINISHED"


def worker(tmp_path, storage, tracking_uri, name, n_trials):
    cmd = [sys.executable, "-m", "ftlab", "-m", *SMALL_TRIAL, f"tracking_uri={tracking_uri}",
           f"output_dir={tmp_path}/runs", f"sweep.report_dir={tmp_path}/reports",
           f"hydra.sweep.dir={tmp_path}/multirun-{uuid.uuid4().hex[:6]}", "eval.compare_base=true",
           # busy workers must not fail each other's live trials
           *optuna_sweep_args(storage, name, n_trials, grace_period=120)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb", "sqlite"])
def test_two_workers_share_one_study_and_one_mlflow_store(tmp_path, backend):
    """Optuna's storage and MLflow's backend store both on the server (two databases: both keep an
    alembic_version table), or both in SQLite files."""
    name = f"two-workers-{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        if backend == "sqlite":
            storage, tracking_uri = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlruns/mlflow.db"
            (tmp_path / "mlruns").mkdir()
        else:
            storage, tracking_uri = (stack.enter_context(server_database(backend)) for _ in range(2))
        two_workers_share_one_study(tmp_path, storage, tracking_uri, name)


def two_workers_share_one_study(tmp_path, storage, tracking_uri, name):
    # Create both stores first, as an operator would, so the workers do not race on schema creation.
    # A database store keeps artifacts where its experiment says (MLflow's default: ./mlruns of the
    # process that created it): here, the test's directory, not the repository's.
    from mlflow.tracking import MlflowClient

    from ftlab import tracking

    if not tracking_uri.startswith("sqlite"):
        MlflowClient(installed_driver(tracking_uri)).create_experiment("ftlab", (tmp_path / "artifacts").as_uri())
    tracking.setup(tracking_uri, "ftlab")
    optuna.create_study(study_name=name, storage=installed_driver(storage), direction="maximize")
    procs = [worker(tmp_path, storage, tracking_uri, name, 3) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name=name, storage=installed_driver(storage)).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert len({t.number for t in trials}) == len(trials)
    trial_runs = runs(tmp_path, uri=installed_driver(tracking_uri))
    linked = [t.user_attrs["mlflow_run_id"] for t in complete]
    assert len(set(linked)) == 3 and set(linked) <= {r.info.run_id for r in trial_runs}
    numbers = [r.data.tags["ftlab.trial_number"] for r in trial_runs]
    assert len(numbers) == len(set(numbers))  # no trial ran twice
    assert len(runs(tmp_path, "base_eval", uri=installed_driver(tracking_uri))) == 1  # scored once, for both
    for results in tmp_path.glob("multirun-*/optuna_results.json"):  # an ask dropped for a twin is no failure
        counts = json.loads(results.read_text())["counts"]
        assert counts["FAIL"] == 0 and counts["COMPLETE"] == 3, counts
