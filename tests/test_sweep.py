"""Grid sweeps with Hydra's multirun: one parent MLflow run, trials as its children,
with the basic launcher and with joblib's separate processes; over-budget configs skipped
before anything loads; the best trial and ftlab_sweep.json recorded at the end."""
import html
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from ftlab import config
from ftlab.report import build_report
from ftlab.sweep import pareto_front, sweep_id
from tests.conftest import CONF, ROOT, weightless_checkpoint
from tests.sweeping import runs, sweep, sweep_args


def assert_sweep_recorded(tmp_path, expected_r):
    [parent] = runs(tmp_path, "sweep")
    trials = runs(tmp_path)
    assert len(trials) == len(expected_r)
    assert sorted(int(t.data.params["lora_r"]) for t in trials) == sorted(expected_r)
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert t.data.tags["ftlab.sweep_id"] == parent.data.tags["ftlab.sweep_id"]
        assert t.data.tags["ftlab.state"] == "finished" and t.info.status == "FINISHED"
        assert {"rouge_l", "eval_loss", "predicted_peak_gb"} <= set(t.data.metrics)
    assert sorted(t.data.tags["ftlab.trial_number"] for t in trials) == [str(i) for i in range(len(expected_r))]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ftlab.objective"] == "rouge_l" and parent.data.tags["ftlab.direction"] == "maximize"
    assert "lora_r=" in parent.data.tags["ftlab.command"]
    best = max(trials, key=lambda t: t.data.metrics["rouge_l"]).data.metrics["rouge_l"]
    best_run = next(t for t in trials if t.info.run_id == parent.data.tags["ftlab.best_run_id"])
    assert best_run.data.metrics["rouge_l"] == best == parent.data.metrics["best_rouge_l"]
    summary = json.loads((tmp_path / "multirun" / "ftlab_sweep.json").read_text())
    assert summary["counts"] == {"finished": len(expected_r)}
    assert summary["best_run_id"] == best_run.info.run_id


def test_grid_sweep_groups_trials_under_one_parent_run_and_frees_each_trials_leftovers(tmp_path):
    probe = tmp_path / "leftovers.jsonl"
    sweep(tmp_path, "lora_r=4,8,16", f"train.callbacks=[{{_target_: tests.faults.RecordLeftovers, path: '{probe}'}}]")
    assert_sweep_recorded(tmp_path, [4, 8, 16])
    # The trials share one process (Hydra's basic launcher): no earlier trial's model survives it,
    # and what the collector freezes stops growing after the first trial (frozen objects are never
    # collected, so a trial's garbage frozen with them would stay for the whole sweep).
    seen = [json.loads(line) for line in probe.read_text().splitlines()]
    assert [s["earlier_models_alive"] for s in seen] == [0, 0, 0]
    assert seen[2]["frozen"] - seen[1]["frozen"] < 500, seen


def test_grid_sweep_with_joblib_processes_finds_the_parent_then_registers_and_reports(tmp_path):
    out = sweep(tmp_path, "lora_r=4,8", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
          "train.save_adapter=true", "registry.auto_promote=true")
    assert_sweep_recorded(tmp_path, [4, 8])
    # The sweep callback hands the best trial to the registry and writes the report.
    [parent] = runs(tmp_path, "sweep")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    production = client.get_model_version_by_alias("ftlab", "production")
    assert production.tags["ftlab.source_run_id"] == parent.data.tags["ftlab.best_run_id"]
    report = tmp_path / "reports" / parent.data.tags["ftlab.sweep_id"] / "report.html"
    assert report.exists() and parent.data.tags["ftlab.best_run_id"] in report.read_text()
    assert f"; best run {parent.data.tags['ftlab.best_run_id']}; report {report}; summary " in out.stdout  # named
    # The parent's run id, copied from the UI instead of a trial's, is named with the trial to register.
    wrong = subprocess.run([sys.executable, "-m", "ftlab.registry", "register", f"run_id={parent.info.run_id}",
                            f"tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert wrong.returncode == 2 and (f"is the parent run of sweep {parent.data.tags['ftlab.sweep_id']}, not a trial; "
                                      f"its best trial is run_id={parent.data.tags['ftlab.best_run_id']}") in wrong.stderr


def test_over_budget_configs_are_skipped_without_loading_anything(tmp_path, in_process):
    out = in_process("ftlab", *sweep_args(
        tmp_path, "model=llama31_8b", "budget.vram_gb=8", "lora_r=16,64", "train.max_seq_length=2048,4096",
        "train.per_device_batch_size=8", f"model.name_or_path={weightless_checkpoint(tmp_path)}"))
    assert out.returncode == 2, out.stderr[-3000:]  # nothing fits: the sweep trained nothing
    trials = runs(tmp_path)
    assert len(trials) == 4
    for t in trials:
        assert t.info.status == "KILLED" and t.data.tags["ftlab.state"] == "skipped_budget"
        assert "budget.vram_gb=8" in t.data.tags["ftlab.skip_reason"]
        assert "; not started: " in t.data.tags["ftlab.skip_reason"]  # with what would make it fit, as a run says
        assert t.data.metrics["predicted_peak_gb"] > 8
    assert out.stdout.count("ftlab: skipped") == 4 and out.stdout.count("; not started: ") == 4
    assert ": 4 skipped_budget; best run none (no trial finished with rouge_l); report " in out.stdout
    assert "Loading weights" not in out.stderr  # and the checkpoint, which has none, was never loaded


def test_an_objective_no_trial_reports_stops_the_sweep_before_any_trial_runs(tmp_path, in_process):
    out = in_process("ftlab", *sweep_args(tmp_path, "lora_r=4,8", "sweep.objective=[rouge_l,rougel_typo]",
                                          "sweep.direction=[maximize,maximize]"))
    assert out.returncode == 2
    assert "ftlab: sweep.objective: 'rougel_typo' is not a metric a trial reports" in out.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or not runs(tmp_path)
    # A gain over the base model, with the base model's scores switched off (as SMALL_TRIAL has it):
    # every trial trained, then failed for a missing objective.
    out = in_process("ftlab", *sweep_args(tmp_path, "lora_r=4,8", "sweep.objective=[gain_rouge_l]"))
    assert out.returncode == 2 and "ftlab: sweep.objective: 'gain_rouge_l' compares with the base model's scores, " \
        "which eval.compare_base=false leaves out; set eval.compare_base=true" in out.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or not runs(tmp_path)


@pytest.mark.parametrize("override, says", [
    ("lora_r=range(8,8)", "ftlab: lora_r=range(8,8): no values to sweep (range(a,b) stops before b)"),
    ("lr=interval(1e-5,1e-3)", "ftlab: lr=interval(1e-5,1e-3): the grid sweeper takes a,b,c, choice(...) and range(...); "
                               "an interval needs hydra/sweeper=optuna"),
    ("lora_r=8,0", "ftlab: lora_r=0: the LoRA rank must be >= 1"),
    ("train.sampling=bogus", "ftlab: train.sampling='bogus': use one of group_by_length, random, sequential"),
    ("train.optim=adamw_torch,adamw_bogus", "ftlab: train.optim='adamw_bogus': use one of adamw_torch"),
    ("budget.vram_gb=100,0", "ftlab: budget.vram_gb=0.0: must be a positive number of GiB"),  # trial #0 trained first
    ("model.attn_implementation=sdpa,bogus", "ftlab: model.attn_implementation='bogus': use one of auto, eager"),
    ("lora_rr=4,8", "ftlab: lora_rr=4: Could not override 'lora_rr'. Key 'lora_rr' not in 'FtlabConfig'"),
    ("sweep.report_dir=/proc/ftlab-reports",  # written once every trial has run
     "ftlab: sweep.report_dir=/proc/ftlab-reports: cannot make a directory there")])
def test_a_grid_the_basic_sweeper_cannot_run_is_one_line_before_a_parent_run(tmp_path, override, says, in_process):
    """Hydra's own answers: an empty range launches 0 jobs and reports nothing; an interval is a traceback.
    A value no trial can run with would stop the sweep only once the trials before it had trained."""
    out = in_process("ftlab", *sweep_args(tmp_path, "seed=1,2", override))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(says)
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or not runs(tmp_path, "sweep")


def test_a_sweep_of_one_config_is_checked_before_its_parent_run(tmp_path, in_process):
    """Nothing swept: its one config was not checked before its parent run and trial started."""
    out = in_process("ftlab", *sweep_args(tmp_path, "budget.vram_gb=0"))
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
        "ftlab: budget.vram_gb=0.0: must be a positive number of GiB"), out.stderr[-3000:]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or not runs(tmp_path, "sweep")


@pytest.mark.parametrize("measured", config.PEAK_MEMORY_METRICS)
def test_peak_memory_as_an_objective_is_the_name_every_trial_reports(tmp_path, measured, in_process):
    """peak_memory_mb_<kind> depends on the device that measured it: on any other, every trial trained
    and then failed for want of its objective."""
    out = in_process("ftlab", *sweep_args(tmp_path, "seed=1,2", f"sweep.objective=[{measured}]",
                                          "sweep.direction=[minimize]"))
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        f"ftlab: sweep.objective: '{measured}' is reported only where the peak is measured so (a CUDA GPU, or a "
        "CPU's RSS); use peak_memory_mb, which every trial reports"), out.stderr[-3000:]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() or not runs(tmp_path)
    config.check_objective(["peak_memory_mb"], ["minimize"])


@pytest.mark.parametrize("bad", ["data", "value"])
def test_bad_data_or_a_bad_value_stops_the_sweep_and_ends_its_parent_run_failed_with_the_reason(tmp_path, bad,
                                                                                              in_process):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    override, says = ((f"data.path={data}", f"{data}:2: malformed JSON") if bad == "data" else
                      ("train.resume=true", "train.resume: nothing to resume from"))
    out = in_process("ftlab", *sweep_args(tmp_path, "lora_r=4,8", override))
    assert out.returncode == 2 and "ftlab: " in out.stderr and says in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count(says) == 1  # the first trial stopped it
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FAILED"  # not RUNNING forever in the UI
    assert says in parent.data.tags["ftlab.error"]
    assert not runs(tmp_path)  # no trial started
    out = build_report(parent.info.run_id, tmp_path / "report", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    for page in ("report.md", "report.html"):  # the report a user asks for afterwards says why
        text = html.unescape((out / page).read_text())
        assert "The sweep stopped early" in text and says in text, page


def test_a_sweep_name_that_cannot_name_its_tag_study_and_folder_stops_it_in_one_line(tmp_path, in_process):
    """sweep.name='it's' broke MLflow's filter on the parent's tag: Hydra only warned, and the trials ran
    as lone runs with no parent, best run or report, exit 0; ../ wrote the report outside report_dir."""
    for name in ("it's", "../escaped", 'a"b'):
        quoted = f"'{name}'" if "'" not in name else f'"{name}"'
        out = sweep(tmp_path, "lora_r=4,8", f"sweep.name={quoted}", check=False, in_process=in_process)
        assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
            f"ftlab: sweep.name={name}: start it with a letter or digit, without quotes, backslashes or slashes, up to "
            "200 characters (it names the MLflow parent run's tag, the Optuna study and the report's folder)"), out.stderr
    # Refused before the experiment is set up: no parent run, no trial.
    assert MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_experiment_by_name("ftlab") is None
    assert not (tmp_path / "escaped").exists()
    for fine in ("contracts-v2.1_b", "café@v2 a+b"):  # names that worked before stay names
        assert sweep_id(sweep_config(f"sweep.name='{fine}'")) == fine


def test_pareto_front_keeps_only_undominated_trials():
    trials = [{"metrics": {"q": q, "gb": gb}} for q, gb in [(0.5, 4), (0.6, 6), (0.4, 5), (0.6, 7)]]
    front = pareto_front(trials, ["q", "gb"], [1, -1])
    assert [(t["metrics"]["q"], t["metrics"]["gb"]) for t in front] == [(0.5, 4), (0.6, 6)]


def sweep_config(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_a_sweep_is_named_by_sweep_name_else_by_its_command_so_the_same_command_continues_it(tmp_path):
    grid = sweep_id(sweep_config("lora_r=4", "lr=0.001"))
    assert grid.startswith("ftlab-") and grid == sweep_id(sweep_config("lr=0.001", "lora_r=4"))  # order is no change
    assert grid != sweep_id(sweep_config("lora_r=8", "lr=0.001"))
    assert grid != sweep_id(sweep_config("lora_r=4", "lr=0.001", "hydra/sweeper=optuna"))
    assert sweep_id(sweep_config("lora_r=4", "sweep.name=contracts-v2")) == "contracts-v2"
    assert sweep_id(sweep_config("hydra/sweeper=optuna", "hydra.sweeper.study_name=rank-lr")) == "rank-lr"
    # The last of a key wins, in the config as in the name: sorted, `max_steps=12` after `=4` and before it
    # were one sweep, and a 12-step sweep joined a 4-step one's parent run, study and report.
    last_wins = sweep_id(sweep_config("lora_r=4", "train.max_steps=4", "train.max_steps=12"))
    assert last_wins != sweep_id(sweep_config("lora_r=4", "train.max_steps=12", "train.max_steps=4"))
    assert last_wins == sweep_id(sweep_config("train.max_steps=12", "lora_r=4"))
    assert sweep_id(sweep_config("lora_r=4", "++train.max_steps=12", "train.max_steps=4")) != \
        sweep_id(sweep_config("lora_r=4", "train.max_steps=4", "++train.max_steps=12"))  # `++a` is a's too
    # The search space the sweeper is given (a sweep file's hydra.sweeper.params, or the command's) is the
    # sweep's; how many trials it runs is not: a sweep run on for more trials is the same one.
    optuna = ("hydra/sweeper=optuna", "lora_r=4")
    space = sweep_id(sweep_config(*optuna, "+hydra.sweeper.params.lr='choice(0.001,0.01)'"))
    assert space != sweep_id(sweep_config(*optuna, "+hydra.sweeper.params.lr='choice(0.1,0.2)'"))
    assert space == sweep_id(sweep_config(*optuna, "+hydra.sweeper.params.lr='choice(0.001,0.01)'",
                                          "hydra.sweeper.n_trials=40"))
    two = ("+hydra.sweeper.params.lr='choice(0.001,0.01)'", "+hydra.sweeper.params.lora_alpha='choice(8,16)'")
    assert sweep_id(sweep_config(*optuna, *two)) == sweep_id(sweep_config(*optuna, *reversed(two)))
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    on_file = sweep_id(sweep_config("lora_r=4", f"data.path={data}"))
    assert on_file == sweep_id(sweep_config("lora_r=4", f"data.path={data}"))
    data.write_text('{"prompt": "a", "completion": "c"}\n')  # edited: a new sweep, not the old one's trials
    assert sweep_id(sweep_config("lora_r=4", f"data.path={data}")) != on_file


def test_a_sweep_on_a_local_checkpoint_run_again_keeps_its_finished_trials(tmp_path, in_process):
    """A checkpoint whose config.json differs from the preset's model.arch: the rerun hashed the
    config before taking the checkpoint's numbers (as the run does), found no finished trial, and
    trained every config again."""
    import shutil

    from ftlab import models

    checkpoint = tmp_path / "my-llama"
    shutil.copytree(models.resolve_checkpoint(sweep_config("model=tiny").model, None), checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    command = ("lora_r=4,8", "model.source=auto", f"model.name_or_path={checkpoint}", "sweep.name=local")
    sweep(tmp_path, *command, in_process=in_process)
    again = sweep(tmp_path, *command, in_process=in_process)
    assert again.stdout.count("kept: its config already finished in sweep local") == 2, again.stdout[-3000:]
    assert len(runs(tmp_path)) == 2


def test_a_worker_that_ends_while_another_still_trains_leaves_the_sweep_to_it(tmp_path):
    """With many workers on one sweep, the first to end (or be interrupted) set the parent run
    FINISHED (or KILLED, with the interrupt as its error) while others trained, and its count
    trials_running=1 stayed on the parent for good."""
    shared = "sweep.name=shared"
    sweep(tmp_path, "lora_r=4", shared)
    [parent] = runs(tmp_path, "sweep")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    elsewhere = client.create_run(parent.info.experiment_id, tags={  # another worker's trial, training
        "mlflow.parentRunId": parent.info.run_id, "ftlab.role": "trial", "ftlab.state": "running",
        "ftlab.sweep_id": "shared", "ftlab.trial_number": "7"}).info.run_id

    out = sweep(tmp_path, "lora_r=4", shared)  # its trial kept: this worker has nothing left to do
    assert "the last to finish ends the sweep and writes its report" in out.stdout
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "RUNNING" and parent.data.metrics["trials_running"] == 1
    interrupted = sweep(tmp_path, "lora_r=8", shared, "train.max_steps=2",
                        "train.callbacks=[{_target_: tests.faults.SignalAtStep, step: 1}]", check=False)
    assert interrupted.returncode == 143, interrupted.stderr[-3000:]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "RUNNING" and "ftlab.error" not in parent.data.tags

    client.set_tag(elsewhere, "ftlab.state", "finished")
    client.set_terminated(elsewhere, "FINISHED")
    sweep(tmp_path, "lora_r=8", shared, "train.max_steps=2")  # the interrupted config continues; the sweep ends
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_running"] == 0
    assert parent.data.metrics["trials_finished"] == 3 and "ftlab.error" not in parent.data.tags


@pytest.mark.parametrize("with_this_trial", [True, False])
def test_a_worker_that_ends_after_another_ended_the_sweep_hands_over_only_what_the_other_did_not(
        tmp_path, in_process, with_this_trial):
    """Two workers ending seconds apart both registered the best trial (the second with a traceback:
    the first had reopened the trial's run to log the model) and both wrote the report. But a worker
    that ended the sweep between two trials of another (none running then) handed over less: the
    other's later trials, perhaps the best, are handed over when it ends."""
    out = sweep(tmp_path, "lora_r=4", "train.save_adapter=true", "registry.auto_register=true",
                f"train.callbacks=[{{_target_: tests.faults.EndSweepAtStep, with_this_trial: {with_this_trial}}}]",
                in_process=in_process)
    assert "failed after sweep" not in out.stdout + out.stderr
    registered = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").search_registered_models()
    reports = list((tmp_path / "reports").iterdir())  # the folder is made at the start, to fail early
    if with_this_trial:
        assert "another worker ended the sweep and hands it over" in out.stdout, out.stdout[-3000:]
        assert not registered and not reports
    else:
        assert "another worker ended" not in out.stdout and len(registered) == 1 and len(reports) == 1
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 1


def test_a_model_name_the_registry_refuses_stops_a_registering_sweep_before_any_trial(tmp_path, in_process):
    """registry.auto_promote=true with registry.model_name=a/b trained every trial, then failed to
    register the best with a traceback, and exited 0. A single run registers nothing: not refused."""
    out = in_process("ftlab", *sweep_args(tmp_path, "lora_r=4,8", "registry.auto_promote=true",
                                          "registry.model_name=a/b"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "ftlab: registry.model_name=a/b: a registered model's name cannot hold '/', ':' or quotes" in out.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # stopped before the sweep's parent run, or a trial
    from ftlab import config

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        config.check(compose("config", overrides=["model=tiny", "registry.auto_register=true", "experiment=team/x"]))


@pytest.mark.parametrize("fault, status, says, reported", [
    ("train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 1}]", 1, "2 failed", "2 failed"),
    ("budget.vram_gb=0.01", 2, "2 skipped_budget", "2 skipped over the budget")])
def test_a_sweep_that_trained_nothing_to_the_end_fails(tmp_path, in_process, fault, status, says, reported):
    """Every trial failed, or was over the budget: the sweep exited 0 and its parent run ended
    FINISHED, which a scheduler or CI took for success. Its report still says why each ended so."""
    out = sweep(tmp_path, "lora_r=4,8", fault, check=False, in_process=in_process)
    assert out.returncode == status, out.stderr[-3000:]
    problem = f"no trial finished ({says}): nothing to compare or register"
    assert out.stderr.strip().splitlines()[-1].endswith(problem) and "Traceback" not in out.stderr
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FAILED" and parent.data.tags["ftlab.error"] == problem
    [page] = (tmp_path / "reports").glob("*/report.md")
    assert f"0 finished, {reported} of 2 trials" in page.read_text()
    assert "stopped early" not in page.read_text()  # it ran to its end
