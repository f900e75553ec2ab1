"""Reliability of one trial: SIGTERM saves a checkpoint and ends the run KILLED, train.resume
continues that very run, step metrics survive a tracking outage, and the safe defaults hold
(safetensors only, no secret in the store)."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import mlflow
import psycopg2
import pytest
import torch
from mlflow.tracking import MlflowClient

from ftlab import checkpoints, models, scoring, tracking
from ftlab.pipeline import run
from tests.conftest import ROOT, TINY, run_cli, store_overrides
from tests.faults import MlflowServer, TcpRelay, free_port

# A few short steps; no base scoring and tiny generations keep each run to seconds.
SHORT = ["train.max_steps=4", "train.per_device_batch_size=2", "train.grad_accum=1", "eval.compare_base=false",
         "eval.max_examples=2", "eval.max_new_tokens=4", "eval.samples_to_log=2"]


def _trials(uri: str, experiment: str = "ftlab"):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], filter_string="tags.`ftlab.role` = 'trial'",
                              output_format="list")


def _steps(uri: str, run_id: str, key: str = "train_loss") -> list[int]:
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_sigterm_saves_a_checkpoint_and_resume_continues_the_same_run(make_cfg, tmp_path, monkeypatch, caplog):
    overrides = [*TINY, *store_overrides(tmp_path), *SHORT, f"hydra.run.dir={tmp_path}/hydra"]
    killed = run_cli(*overrides, "train.callbacks=[{_target_: tests.faults.SignalAtStep, step: 2}]")
    assert killed.returncode == 143 and "Traceback" not in killed.stderr  # 128 + SIGTERM, as a shell reports it
    assert killed.stderr.strip().splitlines()[-1].startswith("ftlab: interrupted by SIGTERM at step 2; checkpoint saved")
    assert killed.stderr.strip().endswith("continue with the same command plus train.resume=true")

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    [trial] = _trials(uri)
    assert trial.info.status == "KILLED"
    assert trial.data.tags["ftlab.state"] == "killed"
    assert trial.data.tags["ftlab.failure_kind"] == "interrupted"
    assert "interrupted by SIGTERM" in trial.data.tags["ftlab.error"]
    checkpoint = tmp_path / "runs" / trial.info.run_id / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    assert trial.data.tags["ftlab.checkpoint"] == str(checkpoint)
    # What happened; not the console's advice on how a single run continues (a sweep's trial continues otherwise).
    assert trial.data.tags["ftlab.error"] == f"TrainingInterrupted: interrupted by SIGTERM at step 2; checkpoint saved in {checkpoint}"
    assert _steps(uri, trial.info.run_id) == [1, 2]

    # Another config is refused, naming what differs from the run's own params.
    with pytest.raises(checkpoints.ResumeError, match=r"another config \(lr: 0.0002 then -> 0.001 now\); resume with"):
        run(make_cfg(*SHORT, "lr=1e-3", f"train.resume={trial.info.run_id}"))
    # A newer save cut off (a second signal while saving, a kill) is passed over, not resumed from
    # and failed on every time: the Trainer writes trainer_state.json last.
    partial = checkpoint.with_name("checkpoint-3")
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    # The same config (without the fault) and train.resume=true: the same run goes on from step 2, here on a
    # machine whose cache is elsewhere (another HOME or container), so the base model loads from another path.
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "another-cache"))
    metrics = run(make_cfg(*SHORT, "train.resume=true"))
    assert "rouge_l" in metrics
    [resumed] = _trials(uri)
    assert resumed.info.run_id == trial.info.run_id
    assert resumed.info.status == "FINISHED" and resumed.data.tags["ftlab.state"] == "finished"
    assert resumed.data.tags["ftlab.resumed_from_step"] == "2"
    assert "ftlab.error" not in resumed.data.tags
    assert _steps(uri, trial.info.run_id) == [1, 2, 3, 4]  # one loss curve, continued after step 2
    # The run's one-off numbers (predicted peak, trainable parameters, the data report's counts) stay one
    # point each; the Trainer's end-of-training summary (runtime of each process's share) is not logged.
    client = MlflowClient(uri)
    curves = {"train_loss", "train_learning_rate", "train_grad_norm", "epoch", "mean_token_accuracy", "num_tokens"}
    assert {"predicted_peak_gb", "trainable_params", "data_train_records"} <= set(resumed.data.metrics)
    assert {key: len(client.get_metric_history(trial.info.run_id, key)) for key in resumed.data.metrics
            if key not in curves and len(client.get_metric_history(trial.info.run_id, key)) != 1} == {}
    assert "train_runtime" not in resumed.data.metrics
    # The param of the base model's path keeps the first process's, and the change is said.
    assert resumed.data.params["model.checkpoint"] == trial.data.params["model.checkpoint"]
    assert not trial.data.params["model.checkpoint"].startswith(str(tmp_path / "another-cache"))
    assert re.search(rf"model.checkpoint: the run logged \S+ when it started and has {tmp_path}/another-cache/\S+ now; "
                     "its param keeps the first", caplog.text)
    # The run is logged: the checkpoint saved only because of the signal is removed, and its tag with it.
    assert not checkpoint.exists() and "ftlab.checkpoint" not in resumed.data.tags
    # Its totals are the whole run's, not those of the steps after the resume.
    whole = run(make_cfg(*SHORT))
    assert resumed.data.metrics["trained_tokens"] == whole["trained_tokens"]
    assert resumed.data.metrics["train_loss_final"] == pytest.approx(whole["train_loss_final"], rel=1e-5)


def test_resume_from_another_working_directory_continues_where_the_run_saved_its_checkpoint(tmp_path):
    """The default output_dir is relative: from another directory it names another folder, where
    the resume found no checkpoint ('nothing to resume from'). The default store (./mlruns) is relative
    too: the resume names the first one's, which is where runs are logged, not what they train (it
    was part of the config hash: 'nothing to resume from', or 'another config (tracking_uri: ...)')."""
    overrides = [*TINY, *SHORT, "output_dir=outputs/runs"]
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
    killed = run_cli(*overrides, "train.callbacks=[{_target_: tests.faults.SignalAtStep, step: 2}]",
                     cwd=tmp_path / "first", env={"PYTHONPATH": str(ROOT)})
    assert killed.returncode == 143, killed.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/first/mlruns/mlflow.db"
    overrides.append(f"tracking_uri={uri}")
    [trial] = _trials(uri)
    checkpoint = tmp_path / "first" / "outputs" / "runs" / trial.info.run_id / "checkpoint-2"
    assert trial.data.tags["ftlab.checkpoint"] == str(checkpoint)  # absolute: readable from anywhere
    assert trial.data.tags["ftlab.error"].endswith(f"checkpoint saved in {checkpoint}")

    resumed = run_cli(*overrides, "train.resume=true", cwd=tmp_path / "second", env={"PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [trial] = _trials(uri)
    assert trial.info.status == "FINISHED" and trial.data.tags["ftlab.resumed_from_step"] == "2"
    assert _steps(uri, trial.info.run_id) == [1, 2, 3, 4]
    # The run's files stay in one folder: its adapter beside where the checkpoint was, now removed.
    assert (checkpoint.parent / "adapter").is_dir() and not checkpoint.exists()
    assert not (tmp_path / "second" / "outputs" / "runs" / trial.info.run_id).exists()


def test_a_run_resumed_in_its_second_epoch_trains_what_the_uninterrupted_run_trains(make_cfg, tmp_path):
    """Each epoch's length-grouped order came from the global RNG, which a resume restores to the
    checkpoint's state, not the epoch's start: resumed in epoch 2, the run skipped batches it had not
    trained (other trained tokens, another loss curve)."""
    config = ["train.max_steps=-1", "train.epochs=2", "train.per_device_batch_size=8", "train.grad_accum=2",
              *SHORT[3:], "train.save_steps=7"]  # 5 steps an epoch: a checkpoint in the second
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        run(make_cfg(*config, "train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 8}]"))
    [crashed] = _trials(uri)
    resumed = run(make_cfg(*config, "train.resume=true"))
    whole = run(make_cfg(*config))
    assert _steps(uri, crashed.info.run_id) == list(range(1, 11))
    client = MlflowClient(uri)
    curves = [[m.value for m in sorted(client.get_metric_history(r.info.run_id, "train_loss"), key=lambda m: m.step)]
              for r in sorted(_trials(uri), key=lambda r: r.info.start_time)]
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
    assert resumed["trained_tokens"] == whole["trained_tokens"]


def test_step_metrics_an_outage_left_in_the_spill_file_are_sent_when_the_run_resumes(make_cfg, tmp_path):
    """Steps written to unlogged_metrics.jsonl while the store was down stayed out of the loss curve
    of the run resumed once it was back: the file was never read again."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run(make_cfg(*SHORT, "train.save_steps=2", "train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 3}]"))
    [crashed] = _trials(uri)
    spill = tmp_path / "runs" / crashed.info.run_id / "unlogged_metrics.jsonl"
    now = int(time.time() * 1000)
    lines = [{"key": "train_loss", "value": 9.9, "timestamp": now, "step": 2},  # the store has step 2 already
             {"key": "outage_probe", "value": 1.0, "timestamp": now, "step": 1},
             {"key": "outage_probe", "value": 2.0, "timestamp": now, "step": 2},
             {"key": "rouge_l", "value": 0.5, "timestamp": now, "step": 0}]  # final scores: scored anew
    spill.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"key": "cut off by the cr')
    run(make_cfg(*SHORT, "train.save_steps=2", "train.resume=true"))
    history = MlflowClient(uri).get_metric_history(crashed.info.run_id, "outage_probe")
    assert sorted((m.step, m.value, m.timestamp) for m in history) == [(1, 1.0, now), (2, 2.0, now)]
    assert _steps(uri, crashed.info.run_id) == [1, 2, 3, 4]  # one point a step
    assert [json.loads(line)["key"] for line in spill.read_text().splitlines()] == ["rouge_l"]


def test_a_run_resumed_from_a_checkpoint_before_its_crash_logs_each_step_once(make_cfg, tmp_path):
    """Steps logged after the last checkpoint (train.save_steps) and before a crash were trained and
    logged again on resume: two points a step in the loss curve."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    with pytest.raises(RuntimeError, match="injected failure at step 4"):  # raised before step 4 is logged
        run(make_cfg(*SHORT, "train.save_steps=2", "train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 4}]"))
    [crashed] = _trials(uri)
    assert crashed.info.status == "FAILED" and _steps(uri, crashed.info.run_id) == [1, 2, 3]
    run(make_cfg(*SHORT, "train.save_steps=2", "train.resume=true"))
    [resumed] = _trials(uri)
    assert resumed.info.run_id == crashed.info.run_id and resumed.data.tags["ftlab.resumed_from_step"] == "2"
    assert _steps(uri, resumed.info.run_id) == [1, 2, 3, 4]
    assert _steps(uri, resumed.info.run_id, "train_learning_rate") == [1, 2, 3, 4]


def test_max_hours_stops_training_after_the_step_that_crosses_it_and_the_trial_still_scores(make_cfg, tmp_path):
    metrics = run(make_cfg(*SHORT, "budget.max_hours=1e-9"))  # crossed by the first step
    [trial] = _trials(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert trial.info.status == "FINISHED"
    assert trial.data.tags["ftlab.stopped_early"] == "stopped at step 1 by budget.max_hours=1e-09"
    assert _steps(f"sqlite:///{tmp_path}/mlruns/mlflow.db", trial.info.run_id) == [1]  # of train.max_steps=4
    assert "rouge_l" in metrics and trial.data.metrics["eval_loss"] == metrics["eval_loss"]


def test_a_resumed_runs_time_budget_counts_the_training_it_did_before(make_cfg, tmp_path):
    """A preempted job resumed again and again must not get budget.max_hours afresh each time."""
    config = [*SHORT, "budget.max_hours=0.5", "train.save_steps=2"]
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run(make_cfg(*config, "train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 3}]"))
    [failed] = _trials(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    totals = tmp_path / "runs" / failed.info.run_id / "checkpoint-2" / "ftlab_totals.json"
    totals.write_text(json.dumps({**json.loads(totals.read_text()), "seconds": 3600.0}))  # an hour trained before
    run(make_cfg(*config, "train.resume=true"))
    [resumed] = _trials(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert resumed.data.tags["ftlab.stopped_early"] == "stopped at step 3 by budget.max_hours=0.5"  # of 4
    assert resumed.data.metrics["train_seconds"] > 3600


def test_resume_with_nothing_to_resume_fails_and_says_where_it_looked(make_cfg, tmp_path):
    with pytest.raises(checkpoints.ResumeError, match="ftlab.config_hash") as error:
        run(make_cfg(*SHORT, "train.resume=true"))
    assert "Drop train.resume" in str(error.value)
    assert not _trials(f"sqlite:///{tmp_path}/mlruns/mlflow.db")  # failed before any run started

    # A named run that was interrupted before any checkpoint: the error names its output dir.
    tracking.setup(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "ftlab")
    with mlflow.start_run() as stale:
        pass
    MlflowClient().set_terminated(stale.info.run_id, "KILLED")
    with pytest.raises(checkpoints.ResumeError, match=str(tmp_path / "runs" / stale.info.run_id)):
        run(make_cfg(*SHORT, f"train.resume={stale.info.run_id}"))

    # A run its process left RUNNING (kill -9) is not taken by train.resume=true, but named: the error
    # said only "Drop train.resume to start from zero" while it had a checkpoint to resume.
    cfg = make_cfg(*SHORT, "train.resume=true")
    with mlflow.start_run(tags={"ftlab.config_hash": tracking.config_hash(cfg)}) as dead:
        pass
    MlflowClient().set_terminated(dead.info.run_id, "RUNNING")
    with pytest.raises(checkpoints.ResumeError,
                       match=rf"RUNNING: {dead.info.run_id} \(if no process runs it any more.*train.resume={dead.info.run_id}\)"):
        run(cfg)


def test_resume_after_an_override_slipped_names_what_differs_from_the_newest_interrupted_trial(make_cfg, tmp_path):
    """`train.resume=true` with lr=1e-3 where the interrupted run had the default said only that no run
    has this config hash; `train.resume=<id>` named the key."""
    interrupted = make_cfg(*SHORT)
    run(interrupted)
    [r] = _trials(interrupted.tracking_uri)
    MlflowClient().set_terminated(r.info.run_id, "KILLED")  # as an interrupted run ends
    with pytest.raises(checkpoints.ResumeError, match=rf"; the newest KILLED/FAILED trial, {r.info.run_id}, was started "
                                                      rf"with another config \(lr: {interrupted.lr} then -> 0.001 now\)"):
        run(make_cfg(*SHORT, "lr=1e-3", "train.resume=true"))


def test_dead_tracking_server_fails_at_start_within_seconds():
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=r"tracking_uri=http://127\.0\.0\.1"):
        tracking.setup(f"http://127.0.0.1:{free_port()}", "ftlab")
    assert time.monotonic() - start < 30  # MLflow's own defaults retry for minutes


def test_step_metrics_survive_a_tracking_server_outage(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.BufferedMetrics, "EVERY_S", 0.0)  # a send per step: retries during the outage
    with MlflowServer(tmp_path / "server") as server:
        relay = TcpRelay(server.port).open()
        uri = f"http://127.0.0.1:{relay.port}"
        outage = f"{{_target_: tests.faults.TrackingOutage, relay_port: {relay.port}, stop_at: 2, restart_at: 5, slow_s: 1.5}}"
        run(make_cfg(*SHORT, "train.max_steps=6", f"tracking_uri={uri}", f"train.callbacks=[{outage}]"))
        [trial] = _trials(uri)
        assert trial.info.status == "FINISHED"
        assert sorted(set(_steps(uri, trial.info.run_id))) == [1, 2, 3, 4, 5, 6]
        out_dir = tmp_path / "runs" / trial.info.run_id
        assert not (out_dir / "unlogged_metrics.jsonl").exists()

        # Still unreachable at the end: the metrics land in a JSONL file in the run's output dir.
        relay.close()
        buffered = tracking.BufferedMetrics(trial.info.run_id, out_dir / "unlogged_metrics.jsonl")
        buffered.log({"train_loss": 1.5}, step=7)
        assert buffered.close(attempts=1) is False
        [line] = (out_dir / "unlogged_metrics.jsonl").read_text().splitlines()
        assert json.loads(line) | {"timestamp": 0} == {"key": "train_loss", "value": 1.5, "step": 7, "timestamp": 0}


def test_scores_survive_a_tracking_server_that_is_down_when_training_ends(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking.BufferedMetrics, "CLOSE_ATTEMPTS", 1)
    with MlflowServer(tmp_path / "server") as server:
        relay = TcpRelay(server.port).open()
        uri = f"http://127.0.0.1:{relay.port}"
        outage = f"{{_target_: tests.faults.TrackingOutage, relay_port: {relay.port}, stop_at: 2, restart_at: 99}}"
        with pytest.raises(tracking.TrackingError, match="tracking store unreachable at the end of run") as e:
            run(make_cfg(*SHORT, "train.max_steps=2", f"tracking_uri={uri}", f"train.callbacks=[{outage}]"))
        relay.open()
        [trial] = _trials(uri)
        out_dir = tmp_path / "runs" / trial.info.run_id
        spilled = {m["key"]: m["value"] for m in map(json.loads, (out_dir / "unlogged_metrics.jsonl").read_text().splitlines())}
        assert {"rouge_l", "eval_loss", "trained_tokens"} <= spilled.keys()  # minutes of scoring not lost
        assert f"rouge_l={spilled['rouge_l']:.4g}" in str(e.value) and str(out_dir / "unlogged_metrics.jsonl") in str(e.value)
        assert (out_dir / "adapter" / "adapter_model.safetensors").exists() and str(out_dir / "adapter") in str(e.value)
        assert mlflow.active_run() is None  # a sweep's next trial starts a run of its own


def test_a_run_whose_store_went_away_as_it_ended_stays_running_to_be_continued(make_cfg, monkeypatch):
    """Back just after the last retry, the store took the failure: the run ended FAILED, which neither a
    sweep run again (it continues KILLED runs) nor train.resume=true without its id would continue."""
    from ftlab import recipe

    def lost(*args, **kwargs):
        raise tracking.StoreUnreachable("tracking store unreachable at the end of run x: its metrics were written to f")

    monkeypatch.setattr(recipe, "_log_final_metrics", lost)
    cfg = make_cfg(*SHORT)
    with pytest.raises(tracking.StoreUnreachable):
        run(cfg)
    [trial] = _trials(cfg.tracking_uri)
    assert trial.info.status == "RUNNING" and "ftlab.error" not in trial.data.tags


def test_pickle_only_checkpoint_is_refused_unless_allowed(make_cfg, tmp_path):
    cfg = make_cfg()
    pickled = tmp_path / "pickled"
    shutil.copytree(models.resolve_checkpoint(cfg.model, cfg.cache_dir), pickled)
    from safetensors.torch import load_file

    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")

    refused = make_cfg("model.source=auto", f"model.name_or_path={pickled}")
    with pytest.raises(models.ModelError, match="model.allow_pickle_weights=true"):
        models.resolve_checkpoint(refused.model, refused.cache_dir)

    allowed = make_cfg("model.source=auto", f"model.name_or_path={pickled}", "model.allow_pickle_weights=true",
                       "peft=lora")
    model = models.load_base(models.resolve_checkpoint(allowed.model, allowed.cache_dir), allowed.model, allowed.peft)
    embed = model.get_input_embeddings().weight
    assert torch.equal(embed.float(), weights["model.embed_tokens.weight"].to(embed.dtype).float())


@pytest.fixture
def postgres_db():
    """A throwaway PostgreSQL database (the server trusts local connections, so any password works)."""
    name = f"ftlab_secrets_{free_port()}"
    admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    yield name
    mlflow.set_tracking_uri(None)
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def test_no_secret_reaches_params_tags_metrics_or_artifacts(tmp_path, postgres_db):
    token, password = "hf_SeCrEt4242tokenvalue", "s3cretPW4242"
    uri = f"postgresql://postgres:{password}@127.0.0.1:5432/{postgres_db}"  # as users type it: no driver named
    result = run_cli(*TINY, *SHORT, "train.max_steps=2", f"tracking_uri={uri}", f"output_dir={tmp_path}/runs",
                     f"hydra.run.dir={tmp_path}/hydra", cwd=tmp_path,
                     env={"HF_TOKEN": token, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert password not in result.stdout

    store = tracking.installed_driver(uri)  # what ftlab opened it with (psycopg2; psycopg 3 is not a dependency)
    [trial] = _trials(store)
    client = MlflowClient(store)
    assert trial.data.params["tracking_uri"] == f"postgresql://postgres:***@127.0.0.1:5432/{postgres_db}"
    logged = [*trial.data.params.items(), *trial.data.tags.items(), *trial.data.metrics]
    artifacts = Path(client.download_artifacts(trial.info.run_id, "", dst_path=str(tmp_path / "downloaded")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "resolved.yaml" for p in files) and any(p.name == "adapter_model.safetensors" for p in files)
    for secret in (token, password):
        assert not [item for item in logged if secret in str(item)]
        assert not [p for p in files if secret.encode() in p.read_bytes()]


def test_step_metrics_are_sent_in_batches_and_all_arrive(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.setup(uri, "ftlab")
    with mlflow.start_run() as active:
        buffered = tracking.BufferedMetrics(active.info.run_id, tmp_path / "unlogged_metrics.jsonl")
        for step in (1, 2, 3):
            buffered.log({"train_loss": 2.0 / step}, step=step)
        assert _steps(uri, active.info.run_id) == []  # within EVERY_S of the start: still buffered
        buffered.next_try = 0.0  # EVERY_S has passed
        buffered.log({"train_loss": 0.5}, step=4)
        assert _steps(uri, active.info.run_id) == [1, 2, 3, 4]  # one batch
        buffered.log({"train_loss": 0.4}, step=5)
        buffered.close()
    assert _steps(uri, active.info.run_id) == [1, 2, 3, 4, 5]


def test_a_ctrl_c_python_drops_while_scoring_still_stops_the_run(make_cfg, tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside a __del__ (a regex's: Ctrl-C a second into scoring, 2 times in 7) is
    printed and dropped by Python: the run went on, FINISHED, exit 0."""
    import os
    import signal

    score = scoring.score

    class InterruptedWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs, and raises, here

    def scoring_with_a_dropped_interrupt(*args, desc="", **kwargs):
        scores = score(*args, desc=desc, **kwargs)
        if desc == "evaluate adapter":
            InterruptedWhenCollected()  # collected at once: its KeyboardInterrupt is dropped
        return scores

    monkeypatch.setattr(scoring, "score", scoring_with_a_dropped_interrupt)
    with pytest.raises(checkpoints.TrainingInterrupted, match=r"^interrupted by SIGINT after training finished"):
        run(make_cfg(*SHORT))
    [trial] = _trials(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert trial.info.status == "KILLED" and "rouge_l" not in trial.data.metrics  # stopped before it was logged


# save_steps=2: the Trainer saves the last step itself, there with logging_steps=3 before the last step is
# logged (the resumed run's token count was read from the step-3 log entry).
@pytest.mark.parametrize("save_steps, logging_steps", [(0, 1), (2, 1), (2, 3)])
def test_an_interrupt_while_scoring_resumes_from_the_last_step_without_training_again(make_cfg, tmp_path,
                                                                                      monkeypatch, save_steps,
                                                                                      logging_steps):
    score = scoring.score
    config = [*SHORT, f"train.save_steps={save_steps}", f"train.logging_steps={logging_steps}"]

    def interrupted_adapter_scoring(*args, desc="", **kwargs):  # SIGTERM, as exit_on_interrupt raises it
        if desc == "evaluate adapter":
            raise checkpoints.Interrupted("interrupted by SIGTERM", "SIGTERM")
        return score(*args, desc=desc, **kwargs)

    monkeypatch.setattr(scoring, "score", interrupted_adapter_scoring)
    with pytest.raises(checkpoints.TrainingInterrupted) as e:
        run(make_cfg(*config))
    monkeypatch.undo()
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    [trial] = _trials(uri)
    checkpoint = tmp_path / "runs" / trial.info.run_id / "checkpoint-4"
    assert str(e.value) == ("interrupted by SIGTERM after training finished, before the run was scored and logged; "
                            f"checkpoint of its last step: {checkpoint}; continue with the same command plus "
                            "train.resume=true")
    assert trial.info.status == "KILLED" and (checkpoint / "trainer_state.json").exists()
    # Tagged as the Trainer's own saves are: a resume from another working directory finds it there.
    assert trial.data.tags["ftlab.checkpoint"] == str(checkpoint)

    metrics = run(make_cfg(*config, "train.resume=true"))
    [resumed] = _trials(uri)
    assert resumed.info.run_id == trial.info.run_id and resumed.info.status == "FINISHED"
    assert _steps(uri, trial.info.run_id) == [s for s in (1, 2, 3, 4) if s % logging_steps == 0]  # nothing trained again
    assert checkpoint.exists() == bool(save_steps)  # logged: one saved only to resume scoring is removed
    whole = run(make_cfg(*config))
    saved = sorted(p.name for p in (tmp_path / "runs" / _trials(uri)[0].info.run_id).glob("checkpoint-*"))
    assert saved == (["checkpoint-2", "checkpoint-4"] if save_steps else [])
    for key in ("trained_tokens", "train_loss_final", "eval_loss", "rouge_l"):
        assert metrics[key] == pytest.approx(whole[key], rel=1e-5), key
    assert metrics["peak_memory_mb"] > whole["peak_memory_mb"] / 2  # the peak of the process that trained


def test_a_signal_while_the_last_step_is_saved_waits_for_the_checkpoint(make_cfg, tmp_path, monkeypatch):
    """The signal handlers were put back before the end-of-training checkpoint was saved: a signal
    then (seconds on a real model) cut the save off, and the run had nothing to resume from."""
    import os
    import signal

    from ftlab import train

    save = train._save_end_of_training

    def signalled_while_saving(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C just as the last step is saved
        return save(*args, **kwargs)

    monkeypatch.setattr(train, "_save_end_of_training", signalled_while_saving)
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(make_cfg(*SHORT))
    monkeypatch.undo()
    assert isinstance(stopped.value, checkpoints.TrainingInterrupted), repr(stopped.value)
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    [trial] = _trials(uri)
    assert (tmp_path / "runs" / trial.info.run_id / "checkpoint-4" / "trainer_state.json").exists()
    run(make_cfg(*SHORT, "train.resume=true"))
    assert _steps(uri, trial.info.run_id) == [1, 2, 3, 4]  # resumed at the end: nothing trained again


@pytest.mark.parametrize("in_sweep", [False, True])
def test_a_run_failing_while_scoring_keeps_its_last_step_for_resume_but_a_sweep_trial_does_not(
        make_cfg, tmp_path, monkeypatch, in_sweep):
    """train.resume=true takes a failed run; a sweep replaces its failed trials, so the checkpoint would only fill disk."""
    score = scoring.score

    def broken_adapter_scoring(*args, desc="", **kwargs):
        if desc == "evaluate adapter":
            raise RuntimeError("scoring broke")
        return score(*args, desc=desc, **kwargs)

    monkeypatch.setattr(scoring, "score", broken_adapter_scoring)
    with pytest.raises(RuntimeError, match="scoring broke"):
        run(make_cfg(*SHORT, *(["sweep.id=s", "sweep.trial_number=0"] if in_sweep else [])))
    [trial] = _trials(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert trial.info.status == "FAILED"
    assert (tmp_path / "runs" / trial.info.run_id / "checkpoint-4" / "trainer_state.json").exists() is not in_sweep
