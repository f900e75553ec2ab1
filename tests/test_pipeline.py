"""End to end: a real (tiny) QLoRA run logs everything a user looks for in MLflow."""
import json
import re
import shlex
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ftlab import config
from ftlab.config import ConfigError
from ftlab.pipeline import run
from tests.conftest import TINY, store_overrides


def _runs(cfg, role):
    mlflow.set_tracking_uri(cfg.tracking_uri)
    return mlflow.search_runs(experiment_names=[cfg.experiment], filter_string=f"tags.`ftlab.role` = '{role}'",
                              output_format="list")


def test_tiny_run_logs_params_metrics_artifacts(make_cfg, capsys):
    cfg = make_cfg("lora_r=8", "lr=1e-3")
    metrics = run(cfg)
    # The summary's UI command pastes into any shell, and names the store as the user did: without
    # the busy timeout ftlab adds to a SQLite URI.
    out = capsys.readouterr().out.splitlines()
    [ui] = [line for line in out if "open the UI:" in line]
    assert shlex.split(ui.split("open the UI:")[1]) == ["mlflow", "ui", "--backend-store-uri", cfg.tracking_uri]
    assert "?timeout=60" in mlflow.get_tracking_uri()
    [register] = [line for line in out if "register it:" in line]  # on the run's own store
    assert shlex.split(register.split("register it:")[1]) == [
        "python", "-m", "ftlab.registry", "register", f"run_id={mlflow.last_active_run().info.run_id}",
        f"tracking_uri={cfg.tracking_uri}"]
    for key in ("rouge_l", "bertscore_f1", "exact_match", "json_valid", "eval_loss", "tokens_per_second",
                "base_rouge_l", "gain_rouge_l", "wall_seconds"):
        assert key in metrics, key
    [measured] = [k for k in metrics if k.startswith("peak_memory_mb_")]  # named by how it was measured...
    assert metrics["peak_memory_mb"] == metrics[measured] > 0  # ...and by one name, an objective for any worker
    assert [k for k in metrics if not config.trial_metric(k)] == []  # what sweep.objective may name...
    assert set(config.HELD_OUT_METRICS + config.RUN_METRICS) <= set(metrics)  # ...and all of it is reported

    [trial] = _runs(cfg, "trial")
    assert trial.info.status == "FINISHED"
    assert trial.data.params["lora_r"] == "8"
    assert trial.data.params["model.name"] == "tiny"
    assert len(trial.data.tags["ftlab.data_fingerprint"]) == 16
    client = MlflowClient()
    losses = client.get_metric_history(trial.info.run_id, "train_loss")
    assert len(losses) >= 2 and losses[-1].step > losses[0].step
    assert client.get_metric_history(trial.info.run_id, "train_learning_rate")

    artifacts = Path(client.download_artifacts(trial.info.run_id, ""))
    assert (artifacts / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert "lora_r: 8" in (artifacts / "config" / "resolved.yaml").read_text()
    report = json.loads((artifacts / "data" / "report.json").read_text())
    assert report["counts"]["train_records"] == trial.data.metrics["data_train_records"]
    samples = json.loads((artifacts / "samples" / "generations.json").read_text())
    assert set(samples["columns"]) == {"prompt", "reference", "prediction"} and len(samples["data"]) == 5


def test_sample_tables_hold_one_row_per_scored_example_when_fewer_are_scored_than_shown(make_cfg):
    cfg = make_cfg("eval.max_examples=3", "eval.samples_to_log=5", "train.max_steps=2", "eval.max_new_tokens=4")
    run(cfg)
    client = MlflowClient()
    for role, artifact in (("trial", "samples/generations.json"), ("base_eval", "samples/base_generations.json")):
        [logged] = _runs(cfg, role)
        table = json.loads(Path(client.download_artifacts(logged.info.run_id, artifact)).read_text())
        assert len(table["data"]) == 3, role  # not one row of three-item lists
        assert all(isinstance(cell, str) for row in table["data"] for cell in row), role


def test_base_model_is_scored_once_per_data_and_eval_config(make_cfg):
    first = run(make_cfg("lora_r=4"))
    second = run(make_cfg("lora_r=8"))
    cfg = make_cfg()
    assert len(_runs(cfg, "base_eval")) == 1
    assert first["base_rouge_l"] == second["base_rouge_l"]
    run(make_cfg("eval.max_new_tokens=12"))  # other eval settings: the base is scored again
    assert len(_runs(cfg, "base_eval")) == 2


def test_trials_on_the_same_data_tokenise_it_once(make_cfg, monkeypatch, capsys):
    import datasets

    from ftlab import train

    monkeypatch.setattr(train, "_TOKENIZED", {})  # earlier tests in this process tokenised the same data
    tokenised = []
    real_map = datasets.Dataset.map

    def counting_map(self, *args, **kwargs):
        if str(kwargs.get("desc", "")).startswith("Tokenizing"):
            tokenised.append(kwargs["desc"])
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counting_map)
    common = ("train.max_steps=2", "eval.compare_base=false", "eval.max_new_tokens=4")
    first = run(make_cfg("lora_r=4", *common))
    assert sorted(tokenised) == ["Tokenizing eval dataset", "Tokenizing train dataset"]
    # TRL's eight finished `datasets` bars for a 0.1 s preparation stay off the console, and only there.
    assert "Tokenizing" not in capsys.readouterr().err and datasets.is_progress_bar_enabled()
    second = run(make_cfg("lora_r=4", *common))
    assert len(tokenised) == 2  # reused (and TRL's preparation skipped), yet trained exactly alike:
    for key in ("trained_tokens", "train_loss_final", "eval_loss"):  # same tokens, same loss masking
        assert second[key] == pytest.approx(first[key], rel=1e-6), key
    run(make_cfg("lora_r=8", "train.max_seq_length=512", *common))  # other truncation: tokenised again
    assert len(tokenised) == 4


@pytest.mark.parametrize("optim, expected", [("adamw_torch", "AdamW"), ("sgd", "SGD"), ("adafactor", "Adafactor")])
def test_lora_plus_trains_with_the_chosen_optimizer_and_weight_decay(make_cfg, tmp_path, optim, expected):
    """LoRA+ (on by default) builds its own parameter groups: A at lr, B at lr x ratio, both with
    train.weight_decay, in train.optim's optimizer, the one the memory estimate prices."""
    probe = tmp_path / "optimizer.json"
    run(make_cfg("train.max_steps=1", "eval.compare_base=false", "eval.max_new_tokens=2", "lr=1e-3",
                 "train.loraplus_lr_ratio=16", f"train.optim={optim}", "train.weight_decay=0.01",
                 f"train.callbacks=[{{_target_: tests.faults.RecordOptimizer, path: '{probe}'}}]"))
    seen = json.loads(probe.read_text())
    assert seen["class"] == expected
    assert [(g["lr"], g["weight_decay"]) for g in seen["groups"]] == [(1e-3, 0.01), (pytest.approx(1.6e-2), 0.01)]
    assert seen["groups"][0]["params"] == seen["groups"][1]["params"] > 0  # every A, every B


def test_long_param_values_do_not_crash_the_run(make_cfg):
    # MLflow rejects param values over 6000 characters; ftlab truncates them and keeps the full config.
    long_prompt = "Triage this support ticket carefully. " * 200  # 7,600 characters
    metrics = run(make_cfg(f"data.system_prompt='{long_prompt}'", "train.max_seq_length=3000",
                           "model.arch.max_position_embeddings=4096", "train.max_steps=1", "eval.compare_base=false",
                           "eval.max_new_tokens=4"))
    assert "rouge_l" in metrics


def test_failed_trial_is_marked_failed_with_reason_and_traceback(make_cfg):
    cfg = make_cfg("train.max_steps=4", "eval.compare_base=false",
                   "train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 2}]")
    with pytest.raises(RuntimeError, match="injected failure"):
        run(cfg)
    [trial] = _runs(cfg, "trial")
    assert trial.info.status == "FAILED"
    assert trial.data.tags["ftlab.state"] == "failed"
    assert "injected failure at step 2" in trial.data.tags["ftlab.error"]
    # The loss of step 1, logged before the failure (step 2 raised before its own log), reached the store.
    assert [m.step for m in MlflowClient().get_metric_history(trial.info.run_id, "train_loss")] == [1]
    text = Path(MlflowClient().download_artifacts(trial.info.run_id, "error/traceback.txt")).read_text()
    assert "RaiseAtStep" in text or "on_step_end" in text


def test_a_base_model_that_fails_to_load_still_ends_a_failed_run_with_its_reason(make_cfg, tmp_path, monkeypatch):
    """Its run starts after the base model loads: a sweep's summary and report would not count it.
    A run being resumed is left as it was, to be continued once the model loads again."""
    from ftlab import checkpoints, models, scoring

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in models.resolve_checkpoint(make_cfg().model, None).iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    cfg = make_cfg("model.source=auto", f"model.name_or_path={damaged}", "eval.compare_base=false",
                   "train.max_steps=2")
    def interrupted_scoring(*args, **kwargs):
        raise checkpoints.Interrupted("interrupted by SIGTERM", "SIGTERM")

    monkeypatch.setattr(scoring, "score", interrupted_scoring)
    with pytest.raises(checkpoints.TrainingInterrupted):
        run(cfg)  # trained, then interrupted: KILLED, to be resumed
    monkeypatch.undo()
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut off mid-file
    resumed = make_cfg("model.source=auto", f"model.name_or_path={damaged}", "eval.compare_base=false",
                       "train.max_steps=2", "train.resume=true")
    with pytest.raises(Exception):
        run(resumed)
    [killed] = _runs(cfg, "trial")
    assert killed.info.status == "KILLED" and killed.data.tags["ftlab.state"] == "killed"  # still continuable

    with pytest.raises(Exception) as raised:
        run(cfg)
    [failed] = [r for r in _runs(cfg, "trial") if r.info.run_id != killed.info.run_id]
    assert failed.info.status == "FAILED" and failed.data.tags["ftlab.state"] == "failed"
    assert str(raised.value)[:100] in failed.data.tags["ftlab.error"]
    assert failed.data.params["lora_r"] == str(cfg.lora_r) and failed.data.metrics["predicted_peak_gb"] > 0


def test_an_interrupt_before_training_says_whether_a_run_was_recorded_and_which(make_cfg, monkeypatch):
    """Ctrl-C or SIGTERM before the first step said only `interrupted by SIGTERM`: while the base model loads
    or is scored no run of it is in the store yet (where an interrupted run ends KILLED), and after the run
    started (logging its config and data report) the KILLED run was there, unnamed."""
    from ftlab import checkpoints, recipe, scoring

    def interrupted(*args, **kwargs):
        raise checkpoints.Interrupted("interrupted by SIGTERM", "SIGTERM")

    for module, name, compare_base in ((scoring, "score", "true"), (recipe, "log_data_report", "false")):
        cfg = make_cfg("train.max_steps=2", f"eval.compare_base={compare_base}")
        with monkeypatch.context() as patch, pytest.raises(checkpoints.Interrupted) as raised:
            patch.setattr(module, name, interrupted)
            run(cfg)
        assert type(raised.value) is checkpoints.Interrupted and raised.value.signal_name == "SIGTERM"
        trials = _runs(cfg, "trial")
        if module is scoring:
            assert str(raised.value) == ("interrupted by SIGTERM before training began (loading or scoring the base "
                                         "model): its MLflow run had not started, none was recorded") and trials == []
        else:
            [trial] = trials
            assert trial.info.status == "KILLED" and str(raised.value) == (
                f"interrupted by SIGTERM before training began; MLflow run {trial.info.run_id} ended KILLED")


def test_a_bertscore_model_that_cannot_be_had_is_said_before_training(make_cfg, monkeypatch):
    """eval.bertscore_model=<hub id> is first loaded after training (without compare_base): one the hub
    cannot give (offline here, or a typo) failed the run there, its training lost."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # however this machine reaches the hub: answered from the cache
    cfg = make_cfg("eval.bertscore_model=nonexistent-org/no-such-scorer", "eval.compare_base=false")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^eval.bertscore_model=nonexistent-org/no-such-scorer: cannot be loaded "
                                          r"\(.*\); use eval.bertscore_model=auto"):
        run(cfg)
    assert time.monotonic() - start < 60 and _runs(cfg, "trial") == []


def test_more_examples_per_step_than_the_data_holds_is_said(make_cfg, caplog):
    """grad_accum=100 on 30 training records ran one step of 30 without a word: the effective batch
    configured was never trained with."""
    run(make_cfg("data.num_records=40", "data.eval_size=4", "train.per_device_batch_size=2", "train.grad_accum=100",
                 "train.max_steps=1", "eval.compare_base=false", "eval.max_new_tokens=2"))
    assert re.search(r"train.per_device_batch_size x train.grad_accum = 200 examples per optimizer step, more than the "
                     r"\d+ training examples: each step sees all of them", caplog.text)


def test_memory_cap_fails_the_trial_as_oom_in_one_line(make_cfg, tmp_path, in_process):
    """An out-of-memory run is recorded; the command says what happened and what to change, not a traceback.
    A cap below what the process holds before training (runtime, model, data) is said before the first step:
    a smaller batch, which the message advised, cannot help there."""
    # Over the cap at step 1 (FailOnTrial applies a 0.001 GiB cap after the step), no cap of the config's own.
    at_step = "train.callbacks=[{_target_: tests.faults.FailOnTrial, trial: 0, oom_on: [0]}]"
    for overrides, says in (
            ([at_step], r"at step 1: lower train.per_device_batch_size or train.max_seq_length, or set budget.vram_gb "
                        r"and budget.fit=auto_batch"),
            (["budget.memory_cap_gb=0.01"], r"before the first step \(the runtime, model and data; training adds its "
                                            r"activations\): raise budget.memory_cap_gb")):
        out = in_process("ftlab", *TINY, *store_overrides(tmp_path), "train.max_steps=3", "eval.compare_base=false",
                         *overrides)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert re.fullmatch(rf"ftlab: out of memory: process RSS [\d.]+ GiB > budget.memory_cap_gb=0.0+1 {says}",
                            out.stderr.splitlines()[-1]), out.stderr.splitlines()[-1]
        assert "\nftlab: out of memory" in out.stderr  # a line of its own: the training bar is closed first
    trials = _runs(make_cfg(), "trial")
    assert [t.info.status for t in trials] == ["FAILED"] * 2
    assert {t.data.tags["ftlab.failure_kind"] for t in trials} == {"oom"}


def test_a_sequence_length_beyond_the_models_context_is_said(make_cfg, caplog):
    """train.max_seq_length=4096 on a model of 1024 positions ran without a word (the memory
    estimate priced it too): records past the context train and are scored there."""
    from ftlab.memory import OverBudget

    with pytest.raises(OverBudget):  # stopped by the budget right after: the point is what was said before
        run(make_cfg("train.max_seq_length=2048", "budget.vram_gb=0.01"))
    assert "train.max_seq_length=2048 is beyond the 1024 positions tiny was trained on" in caplog.text
    caplog.clear()
    with pytest.raises(OverBudget):
        run(make_cfg("train.max_seq_length=1024", "budget.vram_gb=0.01"))
    assert "beyond the" not in caplog.text
