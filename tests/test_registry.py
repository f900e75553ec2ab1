"""Merge, register, gate-protected promotion and rollback, on real tiny sweeps."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from ftlab import files, models, registry, tracking
from ftlab.pipeline import run
from tests.conftest import ROOT

FAST = ["train.max_steps=2", "eval.compare_base=false", "eval.max_new_tokens=12", "registry.auto_promote=true"]


def sweep(make_cfg, trials: list[list[str]]) -> tuple[str, str]:
    """What the sweeper does: a parent run, nested trials, then the registry callback."""
    cfg = make_cfg(*FAST)
    tracking.setup(cfg.tracking_uri, cfg.experiment)  # artifacts next to the test's DB, not in ./mlruns
    sweep_id = uuid.uuid4().hex[:8]
    with mlflow.start_run(run_name=f"sweep-{sweep_id}", tags={"ftlab.role": "sweep", "ftlab.sweep_id": sweep_id}) as parent:
        for overrides in trials:
            run(make_cfg(*FAST, *overrides))
        [best] = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                    order_by=["metrics.rouge_l DESC"], max_results=1, output_format="list")
        best_run_id = best.info.run_id
        registry.on_sweep_end(cfg, parent.info.run_id, best_run_id)
    return sweep_id, best_run_id


@pytest.fixture
def promoted(make_cfg):
    """A 2-trial sweep with registry.auto_promote=true: version 1 holds `production`."""
    sweep_id, best = sweep(make_cfg, [["lr=1e-2"], ["lr=5e-3", "lora_r=4"]])
    return make_cfg(*FAST), sweep_id, best


def test_sweep_registers_merges_and_promotes_then_gate_force_and_rollback(promoted, make_cfg, tmp_path):
    cfg, sweep_id, best = promoted
    client = MlflowClient()
    name = cfg.experiment
    v1 = client.get_model_version_by_alias(name, "production")
    assert int(v1.version) == 1 and v1.run_id == best
    tags = v1.tags
    assert tags["ftlab.source_run_id"] == best and tags["ftlab.sweep_id"] == sweep_id
    assert tags["ftlab.base_model"] == "tiny" and len(tags["ftlab.data_fingerprint"]) == 16
    assert 0 < float(tags["ftlab.adapter_mb"]) < 5 and tags["ftlab.adapter_uri"] == f"runs:/{best}/adapter"
    # metric.*: the registered (merged) model's own held-out scores; run_metric.*: the run's, on its 4-bit base.
    assert {"metric.rouge_l", "metric.bertscore_f1", "metric.exact_match", "run_metric.rouge_l",
            "run_metric.eval_loss"} <= set(tags)
    assert float(tags["run_metric.rouge_l"]) == pytest.approx(client.get_run(best).data.metrics["rouge_l"], abs=1e-4)
    assert (float(tags["ftlab.merge_relative_logit_diff"]) <= float(tags["ftlab.merge_tolerance"])
            or float(tags["ftlab.merge_effect_share"]) <= registry.MERGE_MAX_EFFECT_SHARE)
    with pytest.raises(registry.RegistryError, match=rf"no registered model '{name}x' in sqlite:.*; it holds '{name}'"):
        registry.resolve_version(f"{name}x", "production")  # a typo is named with what the store holds
    model_info = mlflow.models.get_model_info(f"models:/{name}/1")
    assert model_info.signature is not None and "transformers" in model_info.flavors
    assert model_info.flavors["transformers"]["task"] == "text-generation"

    # The merged checkpoint is a plain HF checkpoint that equals base + adapter.
    merged_dir = registry.checkpoint_dir(f"models:/{name}@production", tmp_path / "v1")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base_dir = client.get_run(best).data.params["model.checkpoint"]
    adapter_dir = mlflow.artifacts.download_artifacts(run_id=best, artifact_path="adapter", dst_path=str(tmp_path))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          adapter_dir)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.inference_mode():
        expected, actual = reference(input_ids=ids).logits, merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(input_ids=ids).logits
    # The merged weights are rounded once to 16 bits: agreement to that precision (bf16: 2^-8
    # relative), and far closer to base + adapter than the adapter's own effect on the logits.
    merge_error, adapter_effect = (actual - expected).abs().max(), (expected - base).abs().max()
    assert merge_error <= 2**-8 * expected.abs().max(), merge_error
    assert merge_error < adapter_effect / 4, (merge_error, adapter_effect)

    # A second sweep (one step at a vanishing learning rate) is registered and meets the gate: both
    # versions are re-scored on the same held-out set and the alias moves only if v2 is at least as good.
    # (A random tiny model's scores can tie or go either way, so check the decision against its scores.)
    sweep(make_cfg, [["lr=1e-7", "train.max_steps=1"]])
    v2 = client.get_model_version(name, "2")
    metric = cfg.registry.gate_metric
    passed = float(v2.tags[f"ftlab.gate.{metric}"]) >= float(v2.tags[f"ftlab.gate.production_{metric}"])
    assert v2.tags["ftlab.gate.result"] == ("passed" if passed else "failed")
    assert v2.tags["ftlab.gate.production_version"] == "1"
    # Both trials hold out the same examples: the gate's fresh score of v1 is the one v1 was registered with.
    assert float(v2.tags[f"ftlab.gate.production_{metric}"]) == pytest.approx(float(tags[f"metric.{metric}"]), abs=1e-4)
    assert int(client.get_model_version_by_alias(name, "production").version) == (2 if passed else 1)
    if not passed:
        assert registry.promote(name, "2", metric, force=True)
        assert client.get_model_version(name, "2").tags["ftlab.promoted_with_force"] == "true"
    assert int(client.get_model_version_by_alias(name, "production").version) == 2
    assert int(client.get_model_version_by_alias(name, "previous").version) == 1

    rollback = subprocess.run([sys.executable, "-m", "ftlab.registry", "rollback", f"tracking_uri={cfg.tracking_uri}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rollback.returncode == 0, rollback.stderr
    assert int(client.get_model_version_by_alias(name, "production").version) == 1
    assert int(client.get_model_version_by_alias(name, "previous").version) == 2


def test_a_merge_that_leaves_the_adapter_out_is_refused_and_merge_dtype_is_kept(make_cfg, monkeypatch, tmp_path):
    """The merge check tells 16-bit rounding (a small share of the adapter's effect on the logits)
    from a broken merge (all of it)."""
    run(make_cfg(*FAST[:3], "lr=1e-2"))
    [trial] = mlflow.search_runs(filter_string="tags.`ftlab.role` = 'trial'", output_format="list")
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", LoraModel.unload)  # the base, adapter dropped
    with pytest.raises(registry.RegistryError, match=r"merged logits differ from base\+adapter by .* 100% of the "
                                                     r"adapter's own effect on them; the merge is broken"):
        registry.register(trial.info.run_id, "broken")
    monkeypatch.undo()

    def merged_to_nan(self, *args, **kwargs):  # one weight NaN: every logit, which no comparison with NaN flags
        merged = original_merge(self, *args, **kwargs)
        merged.model.norm.weight.data[0] = float("nan")
        return merged

    original_merge = LoraModel.merge_and_unload
    monkeypatch.setattr(LoraModel, "merge_and_unload", merged_to_nan)
    with pytest.raises(registry.RegistryError, match="the merged model gives non-finite logits"):
        registry.register(trial.info.run_id, "nan")
    monkeypatch.undo()
    version = registry.register(trial.info.run_id, "sound")
    assert float(version.tags["ftlab.merge_effect_share"]) < registry.MERGE_MAX_EFFECT_SHARE
    assert version.tags["ftlab.merge_dtype"] == str(models.compute_dtype("auto")).removeprefix("torch.")

    # registry.merge_dtype=float32 keeps every bit of the update: the same logits as base+adapter in fp32.
    exact = registry.register(trial.info.run_id, "exact", dtype_setting="float32")
    assert exact.tags["ftlab.merge_dtype"] == "float32" and float(exact.tags["ftlab.merge_relative_logit_diff"]) < 1e-4
    checkpoint = registry.checkpoint_dir("models:/exact/1", tmp_path / "exact")
    assert AutoModelForCausalLM.from_pretrained(checkpoint).dtype == torch.float32
    with pytest.raises(registry.RegistryError, match="registry.merge_dtype='fp8': use one of None, bfloat16"):
        registry.register(trial.info.run_id, "typo", dtype_setting="fp8")

    # registry.merge_base=dequantized merges into the NF4 base the adapter trained against, in 16 bits:
    # it answers closer to the run's own model (adapter on the 4-bit base) than a merge into the original.
    deq = registry.register(trial.info.run_id, "dequantized", base_setting="dequantized")
    assert deq.tags["ftlab.merge_base"] == "dequantized" and version.tags["ftlab.merge_base"] == "original"
    cfg = registry.run_config(trial.info.run_id)
    adapter = mlflow.artifacts.download_artifacts(run_id=trial.info.run_id, artifact_path="adapter",
                                                  dst_path=str(tmp_path / "a"))
    trained = PeftModel.from_pretrained(models.load_base(Path(trial.data.params["model.checkpoint"]), cfg.model,
                                                         cfg.peft), adapter).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])

    def distance(name: str) -> float:
        merged = AutoModelForCausalLM.from_pretrained(registry.checkpoint_dir(f"models:/{name}/1", tmp_path / name))
        with torch.inference_mode(), torch.autocast("cpu", dtype=models.compute_dtype("auto"),
                                                    enabled=models.compute_dtype("auto") != torch.float32):
            return (merged(input_ids=ids).logits.float() - trained(input_ids=ids).logits.float()).abs().mean().item()

    assert distance("dequantized") < distance("sound")
    assert AutoConfig.from_pretrained(registry.checkpoint_dir("models:/dequantized/1", tmp_path / "d")).to_dict().get(
        "quantization_config") is None  # a plain 16-bit checkpoint: nothing re-quantized

    # An adapter whose training diverged (NaN weights) is refused: every comparison with NaN is False, and the
    # merge check passed it, registering a model that answers nothing.
    from safetensors.torch import load_file, save_file

    stored = Path(trial.info.artifact_uri.removeprefix("file://")) / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(stored).items()}, stored)
    with pytest.raises(registry.RegistryError, match=r"base \+ adapter give non-finite logits \(NaN or inf\) on the "
                                                     "held-out prompts: the training diverged; nothing to register"):
        registry.register(trial.info.run_id, "diverged")
    assert not MlflowClient().search_model_versions("name='diverged'")


def test_a_registration_interrupted_while_scoring_leaves_no_version_and_the_run_finished(make_cfg, monkeypatch):
    """Interrupted after MLflow created the version, the version stayed without tags: a second
    register made another (the untagged one was not seen as this run's) and promote could move
    production to a model never scored."""
    run(make_cfg(*FAST[:3], "lr=1e-2"))
    [trial] = mlflow.search_runs(filter_string="tags.`ftlab.role` = 'trial'", output_format="list")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.scoring, "score", interrupted)  # Ctrl-C while the merged model is scored
    with pytest.raises(KeyboardInterrupt):
        registry.register(trial.info.run_id, "interrupted")
    monkeypatch.undo()
    client = MlflowClient()
    assert client.search_model_versions("name = 'interrupted'") == []
    assert client.get_run(trial.info.run_id).info.status == "FINISHED"
    version = registry.register(trial.info.run_id, "interrupted")
    assert str(version.version) == "2" and version.tags["ftlab.source_run_id"] == trial.info.run_id
    assert str(registry.register(trial.info.run_id, "interrupted").version) == "2"  # the same settings reuse it


def test_a_full_fine_tune_is_registered_as_trained_without_a_merge(make_cfg, tmp_path):
    """peft=full logs the trained model itself: registered as is (no base + adapter to merge)."""
    # A private cache: the base is moved aside below, where another xdist worker must not miss it.
    run(make_cfg(*FAST[:3], "peft=full", "lr=1e-3", f"cache_dir={tmp_path}/cache"))
    [trial] = mlflow.search_runs(filter_string="tags.`ftlab.role` = 'trial'", output_format="list")
    base_dir = Path(trial.data.params["model.checkpoint"])
    aside = base_dir.rename(base_dir.with_name(base_dir.name + ".aside"))  # the trained weights are all it needs
    try:
        version = registry.register(trial.info.run_id, "full", dtype_setting="float32")
        again = registry.register(trial.info.run_id, "full", dtype_setting="float32")  # reused, not a copy
        # In registry.merge_dtype, as a merge is: the fp32 trained weights were registered as they were
        # whatever it said, and a bf16 registration was then found "merged the same way".
        halved = registry.register(trial.info.run_id, "full", dtype_setting="bfloat16")
    finally:
        aside.rename(base_dir)
    assert version.tags["ftlab.full_fine_tune"] == "true" and "ftlab.adapter_uri" not in version.tags
    from safetensors import safe_open

    with safe_open(str(next(registry.checkpoint_dir(f"models:/full/{halved.version}", tmp_path / "v2")
                            .glob("*.safetensors"))), "pt") as f:
        assert halved.version != version.version and {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert again.version == version.version
    registered = AutoModelForCausalLM.from_pretrained(registry.checkpoint_dir("models:/full/1", tmp_path / "v1"))
    assert mlflow.artifacts.list_artifacts(run_id=trial.info.run_id, artifact_path="adapter") == []
    trained_dir = mlflow.artifacts.download_artifacts(run_id=trial.info.run_id, artifact_path="model",
                                                      dst_path=str(tmp_path / "trained"))
    trained = AutoModelForCausalLM.from_pretrained(trained_dir)
    base = AutoModelForCausalLM.from_pretrained(trial.data.params["model.checkpoint"])
    name, weight = next((n, w) for n, w in trained.state_dict().items() if n.endswith("q_proj.weight"))
    assert torch.equal(registered.state_dict()[name], weight) and not torch.equal(base.state_dict()[name], weight)

    # A version or alias the model does not hold is named with what it does hold.
    with pytest.raises(registry.RegistryError, match=r"^version=7: registered model 'full' has no such version "
                                                     r"\(it has versions 2, 1\)$"):
        registry.resolve_version("full", "7")
    MlflowClient().set_registered_model_alias("full", "production", "1")
    with pytest.raises(registry.RegistryError, match=r"^version=prod: registered model 'full' has no alias 'prod' "
                                                     r"\(it has versions 2, 1; alias production -> 1\)$"):
        registry.resolve_version("full", "prod")


def test_a_base_whose_weights_changed_since_training_is_not_merged_into(make_cfg, tmp_path):
    """A local base directory overwritten after training (re-initialised, re-trained, another model of the
    same shapes) was merged into without a word: the run records only its path, and the merge check
    compares against the same new base."""
    import shutil

    base = tmp_path / "my-llama"
    shutil.copytree(models.resolve_checkpoint(make_cfg().model, None), base)
    cfg = make_cfg(*FAST[:3], "model.source=auto", f"model.name_or_path={base}")
    run(cfg)
    [trial] = mlflow.search_runs(filter_string="tags.`ftlab.role` = 'trial'", output_format="list")
    assert trial.data.tags[tracking.BASE_WEIGHTS]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))  # the same shapes, new weights
    model.save_pretrained(base, safe_serialization=True)
    with pytest.raises(registry.RegistryError, match=rf"base checkpoint {base} holds other weights than the run "
                                                     r"trained on \(ftlab.base_weights\)"):
        registry.register(trial.info.run_id, "changed")
    from ftlab.recipe import base_eval_key

    # Nor are the old base's scores the new one's (they were keyed by its settings and path alone).
    assert base_eval_key(cfg, "data", trial.data.tags[tracking.BASE_WEIGHTS]) != base_eval_key(
        cfg, "data", files.weights_fingerprint(base))


def test_registry_cli_names_unknown_keys_and_a_missing_version(tmp_path, in_process):
    store = f"tracking_uri=sqlite:///{tmp_path}/mlflow.db"

    def cli(*args):
        return in_process("ftlab.registry", *args, store)

    unknown = cli("promote", "verison=2")
    assert unknown.returncode != 0 and "verison" in unknown.stderr
    # A mistyped store path is named, not created: in a process of its own, as a user runs it.
    no_store = subprocess.run([sys.executable, "-m", "ftlab.registry", "promote", store], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    assert no_store.returncode == 2 and "Traceback" not in no_store.stderr
    assert f"ftlab: tracking_uri=sqlite:///{tmp_path}/mlflow.db: no MLflow store at {tmp_path}/mlflow.db" \
        in no_store.stderr
    assert not (tmp_path / "mlflow.db").exists()
    tracking.setup(f"sqlite:///{tmp_path}/mlflow.db", "ftlab")
    nothing = cli("promote")  # a registry with no versions: the user's to fix, one line, exit 2
    assert nothing.returncode == 2 and "Traceback" not in nothing.stderr
    assert "ftlab: registered model 'ftlab' has no versions; register a run first" in nothing.stderr
    typo = cli("rollback", "experiment=typoexp")  # read, and refused: no experiment made in the store
    assert typo.returncode == 2 and "'typoexp' has no 'previous' alias" in typo.stderr, typo.stderr[-2000:]
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("typoexp") is None
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    skipped = client.create_run(client.get_experiment_by_name("ftlab").experiment_id, tags={  # as a sweep records one
        "ftlab.role": "trial", "ftlab.state": "skipped_budget",
        "ftlab.skip_reason": "predicted peak 31.0 GiB vs budget.vram_gb=24 GiB: over budget"}).info.run_id
    client.set_terminated(skipped, "KILLED")
    never = cli("register", f"run_id={skipped}")
    assert never.returncode == 2 and f"ftlab: run_id={skipped} was never trained: skipped over the VRAM budget " \
        "(predicted peak 31.0 GiB vs budget.vram_gb=24 GiB: over budget)" in never.stderr, never.stderr[-2000:]
    for version in ("3", "prod"):
        named = cli("promote", f"version={version}")
        assert named.returncode == 2 and "Traceback" not in named.stderr, named.stderr[-2000:]
        assert "(nothing is registered yet; register a run first)" in named.stderr
    # A gate metric that is not a held-out score is named before any version is looked up or scored
    # (in-process: the CLI's exit 2 for a RegistryError is the case above).
    with pytest.raises(registry.RegistryError, match="registry.gate_metric='rougeL': the gate compares held-out "
                                                     "scores; use one of rouge_l"):
        registry.promote("no-such-model", metric="rougeL")


def test_the_held_out_set_travels_with_the_run_so_a_moved_data_file_cannot_change_what_the_gate_scores(
        make_cfg, tmp_path):
    """Registering merges, checks and signs with the run's own held-out examples: the data file may have
    been edited or left behind on the training machine. A run without them re-prepares them only from
    unchanged data."""
    from ftlab import models
    from ftlab.data.generate import generate, write_jsonl

    data = tmp_path / "tickets.jsonl"
    write_jsonl(generate(80, 1), data)
    run(make_cfg(*FAST[:3], f"data.path={data}", "data.eval_size=8", "eval.samples_to_log=8"))
    [trial] = mlflow.search_runs(filter_string="tags.`ftlab.role` = 'trial'", output_format="list")
    scored = mlflow.load_table("samples/generations.json", run_ids=[trial.info.run_id])["reference"].tolist()
    original = data.read_bytes()
    data.unlink()
    cfg = make_cfg()

    def cli(*args: str) -> list[str]:  # as a user pastes it, from anywhere: the store named in the command
        out = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.splitlines()

    # Merged, checked and registered on the logged examples; each step prints the next one.
    registered = cli("-m", "ftlab.registry", "register", f"run_id={trial.info.run_id}", "registry.model_name=moved",
                     f"tracking_uri={cfg.tracking_uri}")
    [promote] = [line.split("promote it:")[1] for line in registered if "promote it:" in line]
    promoted = cli(*shlex.split(promote)[1:])
    [serve] = [line.split("serve it:")[1] for line in promoted if "serve it:" in line]
    assert shlex.split(serve)[1:] == ["-m", "ftlab.serve", "model=models:/moved@production",
                                      f"tracking_uri={cfg.tracking_uri}"]
    version = MlflowClient().get_model_version_by_alias("moved", "production")
    assert version.tags["ftlab.source_run_id"] == trial.info.run_id
    assert [e.reference for e in registry.held_out(trial.info.run_id, None)] == scored

    logged = Path(trial.info.artifact_uri.removeprefix("file://")) / registry.HELD_OUT_ARTIFACT
    logged.unlink()  # as a run logged before the held-out set was
    tokenizer = models.load_tokenizer(Path(trial.data.params["model.checkpoint"]))
    write_jsonl(generate(80, 2), data)
    with pytest.raises(registry.RegistryError, match=r"tickets.jsonl\) has changed since it trained"):
        registry.held_out(trial.info.run_id, tokenizer)
    data.write_bytes(original)
    assert [e.reference for e in registry.held_out(trial.info.run_id, tokenizer)] == scored
    assert [e.reference for e in registry.held_out(trial.info.run_id)] == scored  # with its base's tokenizer


def test_the_printed_commands_register_and_promote_a_run_of_another_experiment_and_a_bad_name_costs_nothing(
        make_cfg, capsys, in_process):
    """A run of experiment=support: its printed register command crashed (MLflow refuses to resume a
    run of another active experiment), and the promote command printed next named model 'ftlab'. A
    registered model name the registry refuses was refused after the merge, and the error marked
    the trained run FAILED: it could never be registered after."""
    cfg = make_cfg(*FAST[:3], "experiment=support")
    capsys.readouterr()
    run(cfg)
    [register_line] = [line for line in capsys.readouterr().out.splitlines() if "register it:" in line]
    register_cmd = shlex.split(register_line.split("register it:", 1)[1])
    assert register_cmd[:4] == ["python", "-m", "ftlab.registry", "register"] and "experiment=support" in register_cmd
    run_id = register_cmd[4].removeprefix("run_id=")

    # Each printed command through the registry's entry point (the held-out-set test runs them as processes).
    def cli(args: list[str]):
        assert args[:3] == ["python", "-m", "ftlab.registry"]
        return in_process("ftlab.registry", *args[3:])

    bad = cli([*register_cmd, "registry.model_name=team/bot"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "ftlab: registry.model_name=team/bot: a registered model's name cannot hold '/', ':' or quotes" in bad.stderr
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"

    registered = cli(register_cmd)
    assert registered.returncode == 0, registered.stderr[-3000:]
    [promote_line] = [line for line in registered.stdout.splitlines() if "promote it:" in line]
    promoted = cli(shlex.split(promote_line.split("promote it:", 1)[1]))
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert str(registry.alias_holder("support", "production").version) == "1"
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert "ftlab" not in {e.name for e in MlflowClient().search_experiments()}  # no empty 'ftlab' beside 'support'

    # Registering or promoting the run again reuses its version: no copy pushes a real model out of 'previous'.
    again = cli(register_cmd)
    assert again.returncode == 0 and f"run {run_id} is already support version 1, merged the same way" in again.stdout
    promote_run = cli([*register_cmd[:3], "promote", *register_cmd[4:]])
    assert promote_run.returncode == 0 and "support version 1 already holds 'production'" in promote_run.stdout
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name = 'support'")] == ["1"]
    # Rollback: a mistyped name is named; aliases that cannot swap say so, and never end up on one version.
    typo = cli(["python", "-m", "ftlab.registry", "rollback", "registry.model_name=suport", *register_cmd[5:]])
    assert typo.returncode == 2 and "no registered model 'suport'" in typo.stderr and "'support'" in typo.stderr
    client.set_registered_model_alias("support", "previous", "1")
    with pytest.raises(registry.RegistryError, match="'production' and 'previous' both hold version 1 of 'support'"):
        registry.rollback("support")
    client.delete_registered_model_alias("support", "production")  # as deleting production's version does
    registry.rollback("support")
    assert str(registry.alias_holder("support", "production").version) == "1"
    assert registry.alias_holder("support", "previous") is None
