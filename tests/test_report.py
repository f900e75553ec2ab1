"""Sweep reports: a real (tiny) 3-trial sweep, plus a failed and a skipped trial, is
turned into report.md / report.html / PNG figures and logged on the sweep's parent run.

Until the sweeper lands, the sweep is made in-process with the tags the sweeper writes."""
from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import mlflow
import optuna
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from ftlab import report, tracking
from ftlab.memory import estimate
from ftlab.pipeline import run
from tests.conftest import CONF, ROOT, TINY, store_overrides

# One xdist worker runs this file: the sweep it reports on is built once (a module fixture).
pytestmark = pytest.mark.xdist_group("report")

SWEEP_ID = "sweep-test"
QUICK = [*TINY, "train.max_steps=2", "data.num_records=60", "data.eval_size=6"]
TRIALS = [("lora_r=4", "lr=1e-3"), ("lora_r=8", "lr=5e-4"), ("lora_r=16", "lr=2e-3")]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECRET_URI = "postgresql://ftlab:hunter2@db.internal/mlflow"


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
                   "ftlab.command": f"python -m ftlab -m model=tiny train.max_steps=2 lora_r=4,8,16 lr=1e-3,5e-4,2e-3 "
                                    f"tracking_uri={SECRET_URI}"}
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


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    store = tmp_path_factory.mktemp("sweep")
    return store, make_sweep(store)


class Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def markdown_table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [line[2:-2].split(" | ") for line in md.splitlines() if line.startswith("| ")]
    return lines[0], lines[2:]


def assert_png(data: bytes, where: str) -> None:
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, where


def test_report_of_a_tiny_sweep(sweep, tmp_path):
    store, parent_id = sweep
    uri = f"sqlite:///{store}/mlruns/mlflow.db"
    stale = tmp_path / "reports" / SWEEP_ID / "importances.png"  # drawn for another sweep of this name
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_SIGNATURE)
    out = report.build_report(parent_id, tmp_path / "reports", tracking_uri=uri)
    assert out == tmp_path / "reports" / SWEEP_ID
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    # By state: a killed trial continues where it stopped, and was counted as "failed or skipped".
    assert "3 finished, 1 failed, 1 skipped over the budget of 5 trials." in md

    client = MlflowClient(uri)
    trials = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`ftlab.role` = 'trial'")
    assert len(trials) == 5
    for t in trials:  # every trial, with its MLflow run id, in both documents
        assert t.info.run_id in md and t.info.run_id in html
    for reason in ("RuntimeError: injected failure at step 1", "vs budget.vram_gb=24 GiB: over budget"):
        assert reason in md and reason in html
    assert "| base model | reference |" in md
    assert "hunter2" not in md + html and "ftlab:***@db.internal" in md

    # Finished trials come first, best ROUGE-L first, then the failed, then the skipped one.
    header, table = markdown_table(md)
    assert "lora_r" in header and not [h for h in header if h.startswith("sweep.")]  # bookkeeping is not swept
    states = [row[header.index("state")] for row in table if row[1].startswith("#")]
    assert states == ["finished"] * 3 + ["failed", "skipped_budget"]
    rouge = [float(row[header.index("ROUGE-L")]) for row in table[1:4]]
    assert rouge == sorted(rouge, reverse=True)

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"train_loss.png", "objective_vs_params.png"} <= set(pngs)
    assert "importances.png" not in pngs and "need at least 4 finished trials" in md  # only 3 finished
    for name in pngs:
        assert_png((out / name).read_bytes(), name)
        assert matplotlib.image.imread(out / name).shape[0] > 100
    for ref in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / ref).is_file(), ref
    parser = Refs()
    parser.feed(html)
    embedded = [r for r in parser.refs if r.startswith("data:image/png;base64,")]
    assert len(embedded) == len(pngs)  # self-contained: every figure inside the page
    for ref in embedded:
        assert_png(base64.b64decode(ref.split(",", 1)[1]), "embedded image")
    for ref in set(parser.refs) - set(embedded):
        assert (out / ref).is_file(), ref

    assert md.count("**winner:**") == 5 and md.count("**base model:**") == 5
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert {f"report/{name}" for name in ["report.md", "report.html", *pngs]} <= logged


def test_reproduce_command_composes_the_winners_config(sweep):
    store, parent_id = sweep
    client = MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")
    gathered = report.gather(client, SWEEP_ID)
    winner = gathered.winner
    assert winner.run_id == gathered.trials[0].run_id and winner.state == "finished"
    command = report.reproduce_command(gathered, winner)
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "ftlab"] and "-m" not in args[3:] and "model=tiny" in args
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=args[3:])
    params = tracking.flatten(cfg)
    for key in gathered.varying:
        assert params[key] == winner.params[key], key
    register, promote, serve = report.next_steps(gathered, winner)[1:]
    assert shlex.split(register) == ["python", "-m", "ftlab.registry", "register", f"run_id={winner.run_id}",
                                     f"tracking_uri={winner.params['tracking_uri']}"]  # the sweep's store, not ./mlruns
    assert all(shlex.split(step)[-1] == f"tracking_uri=sqlite:///{store}/mlruns/mlflow.db" for step in (promote, serve))


def test_report_cli_finds_sweeps_by_id_and_names_unknown_ones(sweep, tmp_path, in_process):
    store, parent_id = sweep
    uri = f"tracking_uri=sqlite:///{store}/mlruns/mlflow.db"
    ok = run_report(uri, f"out_dir={tmp_path}", cwd=tmp_path)  # no sweep=: the newest one; a process of its own
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / SWEEP_ID / "report.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SWEEP_ID]  # no Hydra outputs/ or logs

    client = MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")
    [trial] = client.search_runs([client.get_run(parent_id).info.experiment_id], "tags.`ftlab.role` = 'trial'",
                                 max_results=1)
    assert report.find_sweep(client, trial.info.run_id).info.run_id == parent_id  # a run id copied from the UI
    lone = client.create_run(trial.info.experiment_id, tags={"ftlab.role": "trial"})  # as python -m ftlab logs one
    with pytest.raises(report.ReportError, match=rf"sweep={lone.info.run_id}: that run belongs to no sweep"):
        report.find_sweep(client, lone.info.run_id)
    client.delete_run(lone.info.run_id)

    missing = in_process("ftlab.report", "sweep=no-such-sweep", uri, cwd=tmp_path)
    assert missing.returncode != 0
    assert "sweep=no-such-sweep: no sweep with that sweep id or parent run id" in missing.stderr
    assert SWEEP_ID in missing.stderr  # the known sweeps are listed
    assert f"tracking store {uri.removeprefix('tracking_uri=')} (recent" in missing.stderr  # the URI as given

    empty = MlflowClient(f"sqlite:///{tmp_path}/empty.db")
    with pytest.raises(report.ReportError, match=r"empty.db holds no sweep yet: start one with python -m ftlab -m"):
        report.find_sweep(empty, None)

    typo = in_process("ftlab.report", "swep=x", uri, cwd=tmp_path)
    assert typo.returncode != 0 and "Key 'swep' not in 'ReportConfig'" in typo.stderr

    unwritable = in_process("ftlab.report", f"sweep={SWEEP_ID}", uri, f"out_dir={tmp_path}/{SWEEP_ID}/report.html", cwd=tmp_path)
    assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr
    assert f"ftlab: out_dir={tmp_path}/{SWEEP_ID}/report.html: cannot write the report there" in unwritable.stderr

    # Run where there is no ./mlruns: the store is named, and neither a store nor ./mlruns is created.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    no_store = in_process("ftlab.report", f"sweep={SWEEP_ID}", cwd=elsewhere)
    assert no_store.returncode == 2 and "Traceback" not in no_store.stderr
    assert f"ftlab: no MLflow store here: the default store, ./mlruns/mlflow.db, is not in {elsewhere}" in no_store.stderr
    assert list(elsewhere.iterdir()) == []
    # A store that cannot be used is one line: a dead server in seconds (it took 4 minutes of MLflow's
    # own retries, then a traceback), a file store that MLflow 3 no longer opens.
    for store, says in (("http://127.0.0.1:9", "Connection refused"), (str(elsewhere), "filesystem tracking backend")):
        start = time.monotonic()
        refused = in_process("ftlab.report", f"tracking_uri={store}", cwd=elsewhere)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert f"ftlab: cannot use the MLflow tracking store tracking_uri={store}: " in refused.stderr
        assert says in refused.stderr and time.monotonic() - start < 60


def run_report(*args: str, cwd: Path):
    return subprocess.run([sys.executable, "-m", "ftlab.report", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_importances_and_pareto_front_of_a_multi_objective_sweep(tmp_path):
    """No training needed to test the analysis: runs logged as the sweeper logs them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.setup(uri, "multi")  # artifacts next to the test's DB, not in ./mlruns
    # rouge_l grows with lora_r, train time too; lr barely matters. Trial 5 is dominated.
    grid = [(4, 1e-4, 0.30, 10.0), (8, 3e-4, 0.40, 20.0), (16, 1e-4, 0.50, 40.0), (32, 3e-4, 0.60, 80.0),
            (4, 3e-4, 0.31, 10.5), (16, 3e-4, 0.45, 90.0)]
    with mlflow.start_run(tags={"ftlab.role": "sweep", "ftlab.sweep_id": "multi",
                                "ftlab.objective": "rouge_l,train_seconds",
                                "ftlab.direction": "maximize,minimize"}) as parent:
        for number, (rank, lr, rouge, seconds) in enumerate(grid):
            targets = '["q_proj", "v_proj"]' if number % 2 else "all-linear"
            with mlflow.start_run(nested=True, tags={"ftlab.role": "trial", "ftlab.sweep_id": "multi",
                                                     "ftlab.trial_number": str(number), "ftlab.state": "finished"}):
                mlflow.log_params({"lora_r": rank, "lr": lr, "target_modules": targets, "seed": 42})
                mlflow.log_metrics({"rouge_l": rouge, "train_seconds": seconds})
    client = MlflowClient(uri)
    gathered = report.gather(client, "multi")
    assert gathered.varying == ["lora_r", "lr", "target_modules"]
    study = report.optuna_study(gathered)
    front = report.pareto_run_ids(study)
    dominated = next(t.run_id for t in gathered.trials if t.number == 5)
    assert len(front) == 5 and dominated not in front
    importances, note = report.param_importances(study)
    assert max(importances, key=importances.get) == "lora_r" and note == ""

    out = report.build_report(parent.info.run_id, tmp_path / "reports", tracking_uri=uri)
    header, table = markdown_table((out / "report.md").read_text())
    on_front = {row[header.index("MLflow run id")] for row in table if row[header.index("Pareto front")] == "yes"}
    assert on_front == front
    for name in ("importances.png", "pareto_front.png"):
        assert_png((out / name).read_bytes(), name)
    command = report.reproduce_command(gathered, gathered.winner)
    assert command.startswith("python -m ftlab lora_r=32 lr=0.0003 'target_modules=[q_proj,v_proj]'")


def test_importances_of_trials_that_all_scored_the_same_are_explained_not_crashed():
    # A tiny random model often scores 0 everywhere; fANOVA then has no variance to split.
    study = optuna.create_study()
    for rank in (4, 8, 16, 32):
        study.add_trial(optuna.trial.create_trial(
            params={"lora_r": rank}, distributions={"lora_r": optuna.distributions.CategoricalDistribution([4, 8, 16, 32])},
            value=0.0))
    importances, note = report.param_importances(study)
    assert importances is None and "all 4 finished trials scored 0" in note


def test_a_real_sweeps_report_repeats_what_composed_the_winner(tmp_path, in_process):
    """The reproduce command is the winner's own overrides: a swept key that took one value
    (choice(8)) is in it, a value the run resolved itself (gradient checkpointing from `auto`, on
    for the config skipped over budget) is neither a column nor an override; the base row and
    examples are the evaluation the trials were compared with, not a newer one on other settings;
    the serve command takes no registry arguments."""
    from tests.sweeping import SMALL_TRIAL, sweep

    base = ["eval.compare_base=true", "experiment=exp2"]
    sweep(tmp_path, *base, "lora_r=choice(8)", "lr=1e-3,2e-3", "train.max_seq_length=256,8192",
          "budget.vram_gb=0.52", in_process=in_process)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    [exp] = [e for e in client.search_experiments() if e.name == "exp2"]
    resolved = {r.data.params["train.max_seq_length"]: r.data.params["train.gradient_checkpointing"]
                for r in client.search_runs([exp.experiment_id], "tags.`ftlab.role` = 'trial'")}
    assert resolved == {"256": "False", "8192": "True"}  # the case: it differs across trials, nobody swept it
    # A later run on the same model and data with other eval settings scores the base anew, more recently.
    later = in_process("ftlab", *SMALL_TRIAL, *store_overrides(tmp_path), *base, "eval.max_new_tokens=2")
    assert later.returncode == 0, later.stderr[-3000:]

    [parent] = client.search_runs([exp.experiment_id], "tags.`ftlab.role` = 'sweep'")
    gathered = report.gather(client, parent.info.run_id)
    winner = gathered.winner
    assert gathered.varying == ["lr", "train.max_seq_length"]
    assert [e["base"] for e in gathered.examples] and all(e["base"] != "(not logged)" for e in gathered.examples)
    sweeps_base, later_base = client.search_runs([exp.experiment_id], "tags.`ftlab.role` = 'base_eval'",
                                                 order_by=["attributes.start_time ASC"])
    assert report._base_run(client, parent, winner).info.run_id == sweeps_base.info.run_id
    reproduce, _, _, serve = report.next_steps(gathered, winner)
    args = shlex.split(reproduce)[3:]
    assert "lora_r=8" in args and not [a for a in args if a.startswith(("train.gradient_checkpointing", "sweep."))]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=args)
    assert tracking.config_hash(cfg) == client.get_run(winner.run_id).data.tags["ftlab.config_hash"]
    assert shlex.split(serve)[3:] == ["model=models:/exp2@production", f"tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db"]


def test_a_tie_on_the_first_objective_is_broken_by_the_next_so_the_winner_is_on_the_pareto_front(tmp_path):
    """Tiny trials all score ROUGE-L 0: the first trial won, though another was faster at the same
    score, and the sweep shipped a trial off its own Pareto front."""
    from ftlab import sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.setup(uri, "tie")
    with mlflow.start_run(tags={"ftlab.role": "sweep", "ftlab.sweep_id": "tie", "ftlab.objective": "rouge_l,train_seconds",
                                "ftlab.direction": "maximize,minimize"}) as parent:
        # The first a diverged trial (NaN): max() kept a NaN it met first as the best.
        # The last ties with the third on both: the earlier trial wins, as the report ranks it first (the
        # parent's best run was another one, by the order two workers' runs started in).
        scores = [(float("nan"), 1.0), (0.0, 2.6), (0.0, 1.8), (0.0, 2.2), (0.0, 1.8)]
        made = [None] * len(scores)
        for number in (0, 1, 4, 3, 2):
            rouge, seconds = scores[number]
            with mlflow.start_run(nested=True, tags={"ftlab.role": "trial", "ftlab.sweep_id": "tie", "ftlab.state": "finished",
                                                     "ftlab.trial_number": str(number),
                                                     "ftlab.compared_base_key": f"base-{number % 2}"}) as trial:
                mlflow.log_params({"lora_r": 4 * (number + 1)})
                mlflow.log_metrics({"rouge_l": rouge, "train_seconds": seconds})
            made[number] = trial.info.run_id
    summary = sweep.summarise(parent.info.run_id, ["rouge_l", "train_seconds"], ["maximize", "minimize"])
    assert summary["best_run_id"] == made[2] and summary["pareto_front_run_ids"] == [made[2], made[4]]
    gathered = report.gather(MlflowClient(uri), "tie")
    assert [t.run_id for t in gathered.trials] == [made[2], made[4], made[3], made[1], made[0]]
    # Compared with two bases (as peft=qlora,lora is): the reference row says whose it is.
    assert gathered.base_label == "base model (the winner's; trials compared with 2)"
    # A trial run deleted in MLflow since left the report without a word, its counts smaller than the parent's.
    MlflowClient(uri).delete_run(made[3])
    out = report.build_report(parent.info.run_id, tmp_path / "reports", tracking_uri=uri)
    assert "Not listed: 1 trial run(s) deleted in MLflow since" in (out / "report.md").read_text()
    assert made[3] not in (out / "report.md").read_text()
