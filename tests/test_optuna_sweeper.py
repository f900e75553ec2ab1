"""ftlab's Optuna sweeper: Hydra's sweep syntax, trials linked to MLflow runs, a
persistent study that the same command resumes, budget pruning that TPE learns from."""
import functools
import json
import time

import optuna
import pytest
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ftlab.config import SweepConfigError
from ftlab.sweep import check_swept_values
from hydra_plugins.ftlab_optuna_sweeper._impl import (distribution, grid_values, probe_values, running_elsewhere,
                                                      space_size)
from tests.conftest import CONF, weightless_checkpoint
from tests import sweeping
from tests.sweeping import runs


@pytest.fixture
def sweep(in_process):
    """These tests are about what the sweeper decides: their sweeps run in the test's process. The
    resume test below runs its two as commands, as the test files about faults and workers do."""
    return functools.partial(sweeping.sweep, in_process=in_process)


def parse(text):
    [override] = OverridesParser.create().parse_overrides([text])
    return distribution(override)


def test_hydra_sweep_syntax_becomes_optuna_distributions():
    assert parse("lora_r=choice(8,16,64)") == CategoricalDistribution([8, 16, 64])
    assert parse("lora_r=choice(8,16,8)") == CategoricalDistribution([8, 16])  # once: a 2-config space
    assert parse("lora_r=range(8,33,8)") == IntDistribution(8, 32, step=8)  # Hydra's range excludes its stop
    assert parse("lr=interval(1e-5,1e-3)") == FloatDistribution(1e-5, 1e-3)
    assert parse("lr=tag(log, interval(1e-5,1e-3))") == FloatDistribution(1e-5, 1e-3, log=True)
    assert parse("lora_r=tag(int, interval(4,64))") == IntDistribution(4, 64)
    assert parse("target_modules=choice([q_proj,v_proj],all-linear)").choices == ("[q_proj,v_proj]", "all-linear")
    assert grid_values("lora_r", IntDistribution(8, 32, step=8)) == [8, 16, 24, 32]
    assert grid_values("lora_r", IntDistribution(4, 8, log=True)) == [4, 5, 6, 7, 8]  # integers, in log space or not
    with pytest.raises(SweepConfigError, match="lr is an interval"):
        grid_values("lr", FloatDistribution(1e-5, 1e-3))
    assert space_size({"r": IntDistribution(1, 10**12), "m": CategoricalDistribution(["a", "b"])}) == 2 * 10**12
    assert space_size({"r": IntDistribution(1, 4), "lr": FloatDistribution(1e-5, 1e-3)}) is None


def test_an_integer_interval_keeps_to_its_bounds():
    assert parse("lora_r=tag(int, interval(4.5,8.9))") == IntDistribution(5, 8)  # not 4, below the interval


@pytest.mark.parametrize("text, says", [
    ("lr=interval(1e-3,1e-5)", r"lr=interval\(1e-3,1e-5\): `low <= high` must hold"),
    ("lora_r=range(8,8)", r"lora_r=range\(8,8\): the range holds no values \(its stop is excluded\)"),
    ("lora_r=range(8,4)", r"lora_r=range\(8,4\): the range holds no values"),
    ("lr=range(0.5,0.5,0.1)", r"lr=range\(0.5,0.5,0.1\): "),
    ("lr=tag(log, interval(0,1e-3))", r"lr=tag\(log, interval\(0,1e-3\)\): `low > 0` must hold for `log=True`"),
    ("lora_r=tag(int, interval(4.2,4.8))", r"lora_r=tag\(int, interval\(4.2,4.8\)\): no whole number lies in \[4.2, 4.8\]"),
    ("lora_r=tag(int, interval(8,4))", r"lora_r=tag\(int, interval\(8,4\)\): `low <= high` must hold")])
def test_bounds_optuna_refuses_name_the_override(text, says):
    with pytest.raises(SweepConfigError, match=says):
        parse(text)


def test_an_interval_is_checked_just_inside_its_ends_which_samplers_do_not_return():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for text in ("lora_dropout=interval(0.0,1.0)", "lr=interval(0,1e-3)"):  # 1.0 and 0 are not allowed
            key = text.split("=")[0]
            check_swept_values("config", ["model=tiny"], {key: probe_values(parse(text))})
        with pytest.raises(SweepConfigError, match=r"^lora_dropout=1.4999999999999998: must be in \[0, 1\)"):
            check_swept_values("config", ["model=tiny"], {"lora_dropout": probe_values(parse("x=interval(0.5,1.5)"))})
    assert probe_values(parse("lora_r=range(4,17,4)")) == [4, 16]


def study(tmp_path, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def optuna_args(tmp_path, name, *extra):
    return ["hydra/sweeper=optuna", f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
            f"hydra.sweeper.study_name={name}", *extra]


def test_budget_rejections_are_pruned_with_reason_and_not_loaded(sweep, tmp_path):
    out = sweep(tmp_path, *optuna_args(tmp_path, "budget", "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=4",
                                 "model=llama31_8b", "budget.vram_gb=8",
                                 f"model.name_or_path={weightless_checkpoint(tmp_path)}",
                                 "lora_r=choice(16,64)", "train.max_seq_length=choice(2048,4096)",
                                 "train.per_device_batch_size=8"), check=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(  # nothing fits: nothing trained
        "no trial finished (4 skipped_budget): nothing to compare or register")
    trials = study(tmp_path, "budget").trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 4
    assert len({(t.params["lora_r"], t.params["train.max_seq_length"]) for t in trials}) == 4
    mlflow_runs = {r.info.run_id: r for r in runs(tmp_path)}
    for t in trials:
        assert "budget.vram_gb=8" in t.user_attrs["skip_reason"] and t.user_attrs["predicted_peak_gb"] > 8
        assert t.user_attrs["budget_excess_gb"] > 0 and t.constraints["budget_excess_gb"] > 0  # infeasible for TPE
        run = mlflow_runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["ftlab.state"] == "skipped_budget" and run.info.status == "KILLED"
        assert run.data.tags["ftlab.trial_number"] == str(t.number)


def test_trials_link_to_mlflow_runs_and_the_same_command_resumes(tmp_path):
    args = optuna_args(tmp_path, "resume", "lora_r=choice(4,8)", "lr=tag(log, interval(1e-4, 1e-2))",
                       "hydra.sweeper.seed=0")
    out = sweeping.sweep(tmp_path, *args, "hydra.sweeper.n_trials=2")  # commands: a new process resumes
    assert "FutureWarning" not in out.stderr  # no Optuna API on its way out (TPE + heartbeats: the default)
    first = {t.number: t.params for t in study(tmp_path, "resume").trials}
    sweeping.sweep(tmp_path, *args, "hydra.sweeper.n_trials=3")  # the same study, one more trial wanted
    trials = study(tmp_path, "resume").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert {n: trials[n].params for n in first} == first  # completed trials were not redone
    assert trials[2].params not in first.values()  # the resumed seeded sampler did not replay trial 0's config
    mlflow_runs = {r.info.run_id: r for r in runs(tmp_path)}
    assert len(mlflow_runs) == 3
    for t in trials:
        run = mlflow_runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["ftlab.trial_number"] == str(t.number)
        assert run.data.metrics["rouge_l"] == t.value
    [parent] = runs(tmp_path, "sweep")  # the resumed sweep joined its parent run
    assert {r.data.tags["mlflow.parentRunId"] for r in mlflow_runs.values()} == {parent.info.run_id}


def test_the_default_storage_follows_the_mlflow_store_so_another_directory_continues_the_sweep(sweep, tmp_path):
    """It was ./mlruns/optuna.db wherever the command ran: from another directory the same command
    found an empty study and trained every trial again under the same parent run."""
    args = ["hydra/sweeper=optuna", "hydra.sweeper.study_name=anywhere", "hydra.sweeper.sampler=grid",
            "lora_r=choice(4,8)", "hydra.sweeper.n_trials=2"]
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    sweep(tmp_path, *args, cwd=here)
    assert len(study(tmp_path / "mlruns", "anywhere").trials) == 2 and not (here / "mlruns").exists()
    again = sweep(tmp_path, *args, cwd=there)
    assert "2 trials wanted, 2 in storage" in again.stdout + again.stderr and len(runs(tmp_path)) == 2  # nothing trained again
    # A storage that is not the sweep's (another study's file, a team's server) is refused, not refilled.
    other = sweep(tmp_path, *args, f"hydra.sweeper.storage=sqlite:///{tmp_path}/other.db", check=False)
    assert other.returncode == 2, other.stderr[-3000:]
    assert (f"ftlab: sweep anywhere has 2 trial run(s) in MLflow, but the Optuna storage sqlite:///{tmp_path}/other.db "
            "holds none of its trials") in other.stderr
    assert len(runs(tmp_path)) == 2


def test_a_repeated_config_reuses_the_earlier_outcome_instead_of_running_again(sweep, tmp_path):
    # Two choices, five trials wanted: the sampler repeats itself; each config runs (or is turned away)
    # once, and the sweep ends when both are decided.
    out = sweep(tmp_path, *optuna_args(tmp_path, "repeats", "hydra.sweeper.sampler=random", "hydra.sweeper.seed=4",
                                       "hydra.sweeper.n_trials=5", "budget.vram_gb=1",
                                       "train.per_device_batch_size=choice(2,4096)"))
    trials = study(tmp_path, "repeats").trials
    first = {}
    for t in trials:
        first.setdefault(t.params["train.per_device_batch_size"], t)
    assert set(first) == {2, 4096}
    assert first[2].state == TrialState.COMPLETE and first[4096].state == TrialState.PRUNED
    repeats = [t for t in trials if t.number not in {f.number for f in first.values()}]
    assert len(repeats) == 3  # random with seed 4 asks 2, 2, 2, 2, 4096
    for t in repeats:
        original = first[t.params["train.per_device_batch_size"]]
        assert t.user_attrs["repeat_of"] == original.number
        assert (t.state, t.values, t.constraints) == (original.state, original.values, original.constraints)
        assert t.user_attrs["mlflow_run_id"] == original.user_attrs["mlflow_run_id"]
    assert len(runs(tmp_path)) == 2  # one MLflow run per config: repeats trained nothing and logged nothing
    results = json.loads((tmp_path / "multirun" / "optuna_results.json").read_text())
    assert results["repeats_reused"] == 3 and [b["number"] for b in results["best"]] == [first[2].number]
    assert "3 repeated configs told their earlier outcome, not run again" in out.stdout + out.stderr
    assert "all configs of the search space (2) are decided, before hydra.sweeper.n_trials=5" in out.stdout + out.stderr


def test_n_trials_counts_configs_decided_not_repeats(sweep, tmp_path):
    """A repeat decides nothing new: asked for 3 trials of a 4-config space, 3 configs are trained."""
    out = sweep(tmp_path, *optuna_args(tmp_path, "distinct", "hydra.sweeper.sampler=random", "hydra.sweeper.seed=2",
                                       "hydra.sweeper.n_trials=3", "lora_r=choice(2,4)", "lora_alpha=choice(4,8)"))
    trials = study(tmp_path, "distinct").trials
    ran = [t for t in trials if "repeat_of" not in t.user_attrs]
    assert len(ran) == 3 and len({tuple(sorted(t.params.items())) for t in ran}) == 3
    assert len(trials) == 4  # random with seed 2 asks (2,4), (2,8), (2,4) again, (4,8)
    assert len(runs(tmp_path)) == 3
    assert "3 finished" in out.stdout


def test_a_repeat_is_reused_only_while_the_shared_config_and_data_are_unchanged(sweep, tmp_path):
    data = tmp_path / "data.jsonl"

    def write(answer):
        data.write_text("".join(json.dumps({"instruction": f"ticket {i}", "output": f"{answer} {i}"}) + "\n"
                                for i in range(40)))

    args = optuna_args(tmp_path, "edited", "lora_r=choice(4)", f"data.path={data}", "data.dedupe=false")
    write("refund")
    sweep(tmp_path, *args, "hydra.sweeper.n_trials=1")
    write("replacement")  # the same study name and params on edited data: new training, not a repeat
    sweep(tmp_path, *args, "hydra.sweeper.n_trials=2")
    out = sweep(tmp_path, *args, "hydra.sweeper.n_trials=3")  # nothing changed since: its one config is decided
    trials = study(tmp_path, "edited").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs.get("repeat_of") for t in trials] == [None, None]
    assert "all configs of the search space (1) are decided" in out.stdout + out.stderr
    assert len(runs(tmp_path)) == 2


def test_a_config_another_worker_is_running_is_asked_again_not_trained_twice():
    """Two workers of a shared study each trained lora_r=8 at once (random and TPE samplers ask for
    the same config), and both counted towards n_trials."""
    shared = optuna.create_study(direction="maximize")
    config = ["ftlab.config_hash=abc", "lora_r=8"]
    older, newer = shared.ask(), shared.ask()  # RUNNING in two workers
    for trial in (older, newer):
        trial.set_user_attr("config", config)
    assert not running_elsewhere(shared, older, [older])  # the older one runs
    assert running_elsewhere(shared, newer, [newer])
    dropped = shared.trials[newer.number]
    assert dropped.state == TrialState.FAIL
    assert dropped.user_attrs["dropped"] == f"its config was running in trial {older.number}"
    same_batch = shared.ask()  # a twin in this worker's own batch runs with it (one training, see below)
    same_batch.set_user_attr("config", config)
    assert not running_elsewhere(shared, same_batch, [older, same_batch])


def test_a_config_asked_twice_in_one_batch_runs_once(sweep, tmp_path):
    # One choice: every ask is the same config, two at a time (n_jobs=2); then the space is done.
    sweep(tmp_path, *optuna_args(tmp_path, "twins", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=3",
                                 "lora_r=choice(4)"))
    trials = study(tmp_path, "twins").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs.get("repeat_of") for t in trials] == [None, 0]
    [run] = runs(tmp_path)
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {run.info.run_id}


@pytest.mark.parametrize("args, says", [
    ([], "ftlab: hydra/sweeper=optuna: no search space; add e.g. lora_r='choice(8,16,64)'"),
    (["hydra.sweeper.sampler=bogus", "lora_r=choice(4,8)"],
     "ftlab: hydra.sweeper.sampler=bogus: expected tpe, random, grid or cmaes"),
    (["hydra.sweeper.n_trials=0", "lora_r=choice(4,8)"], "ftlab: hydra.sweeper.n_trials=0: must be >= 1"),
    (["lr=interval(1e-3,1e-5)"], "ftlab: lr=interval(1e-3,1e-5): `low <= high` must hold"),
    (["hydra.sweeper.storage=sqlite:////nonexistent/dir/o.db", "lora_r=choice(4,8)"],
     "ftlab: hydra.sweeper.storage=sqlite:////nonexistent/dir/o.db: (sqlite3.OperationalError) unable to open database"),
    # Named as given (not as postgresql+psycopg2://), with the server's reason, and not retried for ~15 s.
    (["hydra.sweeper.storage=postgresql://postgres@127.0.0.1:5432/ftlab_no_such_db", "lora_r=choice(4,8)"],
     'ftlab: hydra.sweeper.storage=postgresql://postgres@127.0.0.1:5432/ftlab_no_such_db: connection to server at '
     '"127.0.0.1", port 5432 failed: FATAL: database "ftlab_no_such_db" does not exist'),
    # Checked before any trial: a key the config lacks, and values no trial could run with.
    (["lora_rr=choice(4,8)"], "ftlab: lora_rr=4: Could not override 'lora_rr'. Key 'lora_rr' not in 'FtlabConfig'"),
    (["train.optim=choice(adamw_torch,bogus)"], "ftlab: train.optim='bogus': use one of adamw_torch"),
    (["lora_r=range(0,8,4)"], "ftlab: lora_r=0: the LoRA rank must be >= 1"),
    (["++train.optim=choice(adamw_torch,bogus)"], "ftlab: train.optim='bogus': use one of adamw_torch"),
    (["lora_dropout=interval(0.5,1.5)"],  # a value inside the interval, named with the override as typed
     "ftlab: lora_dropout=interval(0.5,1.5): lora_dropout=1.4999999999999998: must be in [0, 1)")])
def test_a_sweep_that_cannot_run_says_why_in_one_line_and_ends_its_parent_run_failed(sweep, tmp_path, args, says):
    start = time.monotonic()
    out = sweep(tmp_path, "hydra/sweeper=optuna", f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", *args,
                check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert time.monotonic() - start < 60
    assert out.stderr.strip().splitlines()[-1].startswith(says)
    assert "Background on this error" not in out.stderr  # SQLAlchemy's second line, a link
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FAILED" and says.removeprefix("ftlab: ") in parent.data.tags["ftlab.error"]
    assert runs(tmp_path) == []  # no trial started


def test_a_search_space_line_hydra_cannot_parse_names_its_key_and_file(sweep, tmp_path):
    """Hydra's parse error named neither (exit 1, its grammar link): a team's sweeps/*.yaml typo."""
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "typo.yaml").write_text("# @package _global_\ndefaults:\n  - override /hydra/sweeper: optuna\n"
                                                   "hydra:\n  sweeper:\n    params:\n      lora_r: choice(4, 8\n")
    out = sweep(tmp_path, "sweeps=typo", f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", cwd=tmp_path,
                check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == ("ftlab: hydra.sweeper.params.lora_r='choice(4, 8' (sweeps/typo.yaml): "
                                                   "no viable alternative at input 'choice(4, 8'")
    assert runs(tmp_path) == []


def test_a_failed_sweep_refused_again_is_left_as_it_was_with_its_reason(sweep, tmp_path):
    """Joining the FAILED parent run cleared its ftlab.error; the second refusal left it FAILED without one."""
    args = optuna_args(tmp_path, "refused", "lora_r=choice(4,8)")
    for n_trials in (0, -1):
        out = sweep(tmp_path, *args, f"hydra.sweeper.n_trials={n_trials}", check=False)
        assert out.returncode == 2 and f"hydra.sweeper.n_trials={n_trials}: must be >= 1" in out.stderr
        [parent] = runs(tmp_path, "sweep")
        assert parent.info.status == "FAILED"  # why: the first refusal's reason, the run's own
        assert parent.data.tags["ftlab.error"].endswith("hydra.sweeper.n_trials=0: must be >= 1")


def test_an_error_that_stops_the_sweep_at_a_trial_ends_its_trial_at_once(sweep, tmp_path):
    """Not RUNNING until its heartbeat goes stale (a rerun would wait for it, then replay it)."""
    args = optuna_args(tmp_path, "stops", "lora_r=choice(4,8)", "train.resume=true")
    out = sweep(tmp_path, *args, check=False)
    says = "train.resume: nothing to resume from"
    assert out.returncode == 2 and "Traceback" not in out.stderr and says in out.stderr, out.stderr[-3000:]
    [trial] = study(tmp_path, "stops").trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["failure_kind"] == "exception"
    assert trial.user_attrs["error"].startswith("ResumeError: " + says)  # the reason, not SystemExit's status 2
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FAILED" and says in parent.data.tags["ftlab.error"]
    sweep(tmp_path, *args[:-1], "hydra.sweeper.n_trials=1")  # mended, the same study goes on at once
    trials = study(tmp_path, "stops").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # the failed config not queued


def test_a_trial_that_finished_before_another_stopped_the_sweep_keeps_its_result(sweep, tmp_path):
    """A batch of n_jobs=2 runs in turn: when its second trial stopped the sweep (bad data), the
    launcher's returns were lost, and the first, finished trial was told FAIL with the second's error,
    then trained again when the sweep was run again."""
    from ftlab.data.generate import generate, write_jsonl

    good, bad = write_jsonl(generate(40, seed=0), tmp_path / "good.jsonl"), tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    first = optuna.create_study(study_name="batch", storage=f"sqlite:///{tmp_path}/optuna.db", directions=["maximize"])
    for path in (good, bad):  # asked in this order
        first.enqueue_trial({"data.path": str(path)})
    args = optuna_args(tmp_path, "batch", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2",
                       f"data.path=choice({good},{bad})")
    out = sweep(tmp_path, *args, check=False)
    assert out.returncode == 2 and f"{bad}:1" in out.stderr, out.stderr[-3000:]
    finished, stopped = study(tmp_path, "batch").trials
    [run] = [r for r in runs(tmp_path) if r.info.status == "FINISHED"]
    assert finished.state == TrialState.COMPLETE and finished.user_attrs["mlflow_run_id"] == run.info.run_id
    assert finished.values == [run.data.metrics["rouge_l"]]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["error"].startswith("DataError: ")


def test_a_command_refused_before_any_trial_leaves_the_finished_sweep_it_joined_as_it_was(sweep, tmp_path):
    """The same sweep run again with hydra.sweeper.n_trials=0 joined the finished sweep's parent run,
    then was refused, and left that parent FAILED with the refusal as its error."""
    args = optuna_args(tmp_path, "done", "lora_r=choice(4)", "hydra.sweeper.n_trials=1")
    sweep(tmp_path, *args)
    refused = sweep(tmp_path, *args, "hydra.sweeper.n_trials=0", check=False)
    assert refused.returncode == 2 and "ftlab: hydra.sweeper.n_trials=0: must be >= 1" in refused.stderr
    [parent] = runs(tmp_path, "sweep")
    assert parent.info.status == "FINISHED" and "ftlab.error" not in parent.data.tags


def test_a_tracking_store_it_cannot_use_stops_the_sweep_at_once_and_leaves_the_study_usable(sweep, tmp_path):
    """The sweep callback's TrackingError was only a warning in Hydra, then each trial failed on it
    (10 of them, exit 0), and the study's 10 failures stopped every later run of the same command."""
    args = optuna_args(tmp_path, "down", "lora_r=choice(4,8)", "hydra.sweeper.n_trials=1")
    out = sweep(tmp_path, *args, "tracking_uri=postgresql://postgres@127.0.0.1:1/none", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "ftlab: cannot use the MLflow tracking store" in out.stderr and "failed, the sweep goes on" not in out.stderr
    # A study a run left with many failures (here, made so) goes on when the same command is run again.
    failed = study(tmp_path, "down") if (tmp_path / "optuna.db").exists() else optuna.create_study(
        study_name="down", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    for _ in range(10):
        failed.tell(failed.ask(), state=TrialState.FAIL)
    sweep(tmp_path, *args, "hydra.sweeper.max_failed_trials=10")
    assert [t.state for t in study(tmp_path, "down").trials][-1] == TrialState.COMPLETE


def test_a_queued_config_outside_a_changed_search_space_is_dropped(sweep, tmp_path):
    """An interrupted trial's params are queued to run again; the study's next run may sweep other values."""
    queued = optuna.create_study(study_name="changed", storage=f"sqlite:///{tmp_path}/optuna.db",
                                 directions=["maximize"])
    queued.enqueue_trial({"lora_r": 2}, user_attrs={"retry_of": 0})
    out = sweep(tmp_path, *optuna_args(tmp_path, "changed", "lora_r=choice(4,8)", "hydra.sweeper.n_trials=1"))
    trials = study(tmp_path, "changed").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "outside the search space" in trials[0].user_attrs["dropped"] and trials[1].params["lora_r"] in (4, 8)
    assert "trial 0: its queued params {'lora_r': 2} are outside this search space; dropped" in out.stdout + out.stderr


def test_a_stale_trial_outside_a_changed_search_space_is_not_queued_again(sweep, tmp_path):
    """A worker that died mid-trial is failed once its heartbeat is stale, and its params are queued
    again; not when the study's next run sweeps other values (Optuna would refuse to ask them)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=2)
    died = optuna.create_study(study_name="stale", storage=storage, directions=["maximize"])
    trial = died.ask({"lora_r": IntDistribution(2, 2)})
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)
    out = sweep(tmp_path, *optuna_args(tmp_path, "stale", "lora_r=range(4,9,4)", "hydra.sweeper.n_trials=1",
                                       "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"))
    trials = study(tmp_path, "stale").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "trial 0: its params {'lora_r': 2} are outside this search space; not queued again" in out.stdout + out.stderr


@pytest.mark.parametrize("queued_after", ["interrupt", "crash"])
def test_a_retried_config_whose_worker_dies_is_queued_again_once(sweep, tmp_path, queued_after):
    """A config queued after a SIGTERM (retry_of), whose worker then died, was never run again: only
    a config that already crashed a worker once must not be retried again and again."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=2)
    died = optuna.create_study(study_name="stale", storage=storage, directions=["maximize"])
    trial = died.ask({"lora_r": CategoricalDistribution([4, 8])})
    trial.set_user_attr("retry_of", 0)
    if queued_after == "crash":
        trial.set_user_attr("retry_after_crash", True)
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)
    sweep(tmp_path, *optuna_args(tmp_path, "stale", "lora_r=choice(4,8)", "hydra.sweeper.n_trials=1",
                                 "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"))
    trials = study(tmp_path, "stale").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    retried = trials[1].user_attrs.get("retry_of") == trial.number
    assert retried == (queued_after == "interrupt")
    if retried:
        assert trials[1].params == trial.params and trials[1].user_attrs["retry_after_crash"]


def test_a_study_run_again_with_another_objective_or_direction_is_one_line_before_anything_runs(sweep, tmp_path):
    """It went on: eval_loss values joined rouge_l's under the study's maximize, the best trial the one with the
    highest loss, and with another number of objectives every trial trained and then failed."""
    earlier = optuna.create_study(study_name="asked", storage=f"sqlite:///{tmp_path}/optuna.db", directions=["maximize"])
    earlier.tell(earlier.ask({"lora_r": CategoricalDistribution([4, 8])}), 0.5)
    args = optuna_args(tmp_path, "asked", "lora_r=choice(4,8)", "hydra.sweeper.n_trials=1")
    # A study from before ftlab recorded its objective: the directions tell.
    out = sweep(tmp_path, *args, "sweep.objective=[eval_loss,train_seconds]", "sweep.direction=[minimize,minimize]",
                check=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "ftlab: sweep.objective: study asked optimises maximize, and this command asks for eval_loss (minimize), "
        "train_seconds (minimize); keep the study's, or name a new sweep (sweep.name=...)")
    sweep(tmp_path, *args)  # the study's own (rouge_l, maximize): one trial decided already, nothing runs
    assert study(tmp_path, "asked").user_attrs["ftlab.objective"] == ["rouge_l"] and runs(tmp_path) == []
    out = sweep(tmp_path, *args, "sweep.objective=[eval_loss]", "sweep.direction=[maximize]", check=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
        "ftlab: sweep.objective: study asked optimises rouge_l (maximize), and this command asks for eval_loss "
        "(maximize)")
    assert len(study(tmp_path, "asked").trials) == 1 and runs(tmp_path) == []


def test_other_choices_in_a_study_run_again_are_one_line_before_anything_runs(sweep, tmp_path):
    earlier = optuna.create_study(study_name="choices", storage=f"sqlite:///{tmp_path}/optuna.db",
                                  directions=["maximize"])
    earlier.tell(earlier.ask({"lora_r": CategoricalDistribution([2, 4])}), 0.5)
    out = sweep(tmp_path, *optuna_args(tmp_path, "choices", "lora_r=choice(4,8)"), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "ftlab: lora_r=choice(4,8): study choices swept lora_r over (2, 4) before, and an Optuna study keeps a "
        "parameter's choices (and its kind); name a new study (hydra.sweeper.study_name=... or sweep.name=...)")
    assert len(study(tmp_path, "choices").trials) == 1 and runs(tmp_path) == []
    # The same choices in another order are the study's own: it goes on (a grid, numbered in the study's order).
    sweep(tmp_path, *optuna_args(tmp_path, "choices", "lora_r=choice(4,2)", "hydra.sweeper.sampler=grid",
                                 "hydra.sweeper.n_trials=2"))
    assert [t.state for t in study(tmp_path, "choices").trials] == [TrialState.COMPLETE] * 2
