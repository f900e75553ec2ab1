"""Merge, register, promote (behind a held-out gate) and roll back fine-tuned models.

A trial's adapter is merged into its 16-bit base, checked against base+adapter logits,
logged as an MLflow transformers model and registered; the `production` alias moves only
when the candidate scores at least as well as the current holder on the same held-out set.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from ftlab import files, models, scoring, tracking
from ftlab.checkpoints import exit_on_interrupt
from ftlab.config import (HELD_OUT_METRICS, ConfigError, FtlabConfig, RegistryCommand, check_keys, choice_problem,
                          exit_2_on, gate_metric_problem, model_name_problem)
from ftlab.data import Example, prepare

log = logging.getLogger("ftlab.registry")

PRODUCTION, PREVIOUS = "production", "previous"
# Merging rounds W + s*B@A once, in the checkpoint's dtype, where base+adapter computes the two
# terms apart; so logits agree to the dtype's precision. Tolerance: max |diff| / max |logit|.
# fp32 has a 24-bit mantissa (~6e-8 per op, summed over layers); bf16/fp16 have 8/11 bits.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# In 16 bits the rounding can exceed that through a deep model when the merge is right (an adapter's
# update is often below W's resolution): trained SmolLM2 adapters (30 layers, bf16) moved their
# logits by 5.5-20% of the largest, and by 4-8% of the adapter's own effect on them (root mean
# square, over every position and token). A broken merge (the adapter left out, scaled wrong, merged
# into other weights) moves them by about that effect or more. So a merge fails only when it exceeds
# the tolerance and this share of the adapter's effect.
MERGE_MAX_EFFECT_SHARE = 0.25
MERGE_CHECK_PROMPTS = 4
MERGED_ARTIFACT = "merged"
HELD_OUT_ARTIFACT = "data/held_out.jsonl"  # logged by ftlab.data.report.log_data_report


class RegistryError(RuntimeError):
    """A run cannot be registered or a version promoted; the message says why and what to do."""


@dataclass
class Merged:
    path: Path
    dtype: torch.dtype  # the checkpoint's (registry.merge_dtype)
    relative_diff: float = 0.0
    effect_share: float = 0.0  # rms(merged - (base+adapter)) / rms((base+adapter) - base)
    merged: bool = True  # False: a full fine-tune's own weights

    @property
    def tolerance(self) -> float:
        return MERGE_TOLERANCE[self.dtype]


# --------------------------------------------------------------------------- source runs


def run_config(run_id: str) -> DictConfig:
    """The trial's resolved config, validated against today's schema."""
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config/resolved.yaml")
    return OmegaConf.merge(OmegaConf.structured(FtlabConfig), OmegaConf.load(path))


def held_out(run_id: str, tokenizer=None) -> list[Example]:
    """The examples the trial was scored on, as it logged them (data/held_out.jsonl). A run logged
    without them re-prepares them from its data settings (with `tokenizer`, or its base's), if its
    data still has the fingerprint it trained on: never a gate silently scored on other data."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=HELD_OUT_ARTIFACT)
    except (MlflowException, OSError):
        cfg, run = run_config(run_id), MlflowClient().get_run(run_id)
        if tokenizer is None:
            tokenizer = models.load_tokenizer(base_checkpoint(run), cfg.model.trust_remote_code)
        data = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, models.cache_root(cfg.cache_dir))
        trained_on = run.data.tags.get("ftlab.data_fingerprint")
        if trained_on and data.fingerprint != trained_on:
            raise RegistryError(f"run_id={run_id}: its data ({data.source}) has changed since it trained (fingerprint "
                                f"{data.fingerprint}, trained on {trained_on}), and the run did not log its held-out "
                                "set; restore that data to score it") from None
        return data.held_out
    with open(path, encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f]


def base_checkpoint(run) -> Path:
    """The base model directory the trial `run` trained on (its param model.checkpoint)."""
    checkpoint = Path(run.data.params["model.checkpoint"])
    if not (checkpoint / "config.json").exists():
        raise RegistryError(f"run_id={run.info.run_id}: base checkpoint {checkpoint} (param model.checkpoint) is gone; "
                            "re-create it by running any trial with the same model= settings")
    trained_on = run.data.tags.get(tracking.BASE_WEIGHTS)  # runs of older ftlab have none
    if trained_on and files.weights_fingerprint(checkpoint) != trained_on:
        raise RegistryError(f"run_id={run.info.run_id}: base checkpoint {checkpoint} holds other weights than the run "
                            "trained on (ftlab.base_weights): merged into them, the adapter would ship on another "
                            "model; put the original weights back there")
    return checkpoint


def _trial(client: MlflowClient, run_id: str):
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise RegistryError(f"run_id={run_id}: no such run in {tracking.shown_store(mlflow.get_tracking_uri())}") from e
    if run.data.tags.get("ftlab.role") == "sweep":  # a parent run id copied from the UI
        best = run.data.tags.get("ftlab.best_run_id")
        raise RegistryError(f"run_id={run_id} is the parent run of sweep {run.data.tags.get('ftlab.sweep_id')}, not a "
                            "trial; " + (f"its best trial is run_id={best}" if best else "it has no best trial (yet)"))
    if run.data.tags.get("ftlab.state") == "skipped_budget":
        raise RegistryError(f"run_id={run_id} was never trained: skipped over the VRAM budget "
                            f"({run.data.tags.get('ftlab.skip_reason', 'no reason recorded')}); register a finished trial")
    if run.info.status != "FINISHED" or run.data.tags.get("ftlab.role") != "trial":
        raise RegistryError(f"run_id={run_id} is not a finished trial run (status {run.info.status}, "
                            f"role {run.data.tags.get('ftlab.role')}); register a finished trial")
    if "model.checkpoint" not in run.data.params:
        raise RegistryError(f"run_id={run_id} has no param model.checkpoint (the base it was trained on)")
    artifact = tracking.trained_artifact(run.data.params.get("peft.method") == "full")
    if not client.list_artifacts(run_id, artifact):
        raise RegistryError(f"run_id={run_id} logged no {artifact}/ artifact (train.save_adapter=false): there is "
                            "nothing to register")
    return run


# --------------------------------------------------------------------------- merge


@torch.inference_mode()
def _logits(model, tokenizer, examples: list[Example]) -> list[torch.Tensor]:
    out = []
    for e in examples:
        ids = tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out.append(model(input_ids=ids.to(model.device)).logits.float().cpu())
    return out


def _computable(model, compute: torch.dtype):
    """A registered model in its own dtype (registry.merge_dtype) for scoring under autocast to
    `compute`; upcast, losslessly, where the hardware computes in fp32 (16-bit matmuls without
    bf16 units run ~100x slower)."""
    return model.float() if compute == torch.float32 and model.dtype != torch.float32 else model


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def merge_dtype(cfg: DictConfig, setting: str | None) -> torch.dtype:
    """registry.merge_dtype, or the run's compute dtype."""
    if problem := choice_problem("registry.merge_dtype", setting):
        raise RegistryError(problem)
    return getattr(torch, setting) if setting else models.compute_dtype(cfg.model.dtype)


def merge(run, cfg: DictConfig, out_dir: Path, dtype: torch.dtype, base_setting: str,
          examples: list[Example]) -> Merged:
    """The trial `run` (its resolved `cfg`): base reloaded in `dtype`, 16 bits or more (never the
    4-bit training weights) + adapter -> merge_and_unload -> a standard HF checkpoint (safetensors,
    tokenizer with chat template, generation config), checked on the first of its held-out
    `examples`. A full fine-tune (peft.method=full) logged the trained model itself: nothing to merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_id = run.info.run_id
    if cfg.peft.method == "full":  # the trained model itself, in `dtype` as a merge is: no base needed
        trained = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=tracking.trained_artifact(True),
                                                           dst_path=str(out_dir.parent)))
        AutoModelForCausalLM.from_pretrained(trained, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
                                             ).save_pretrained(out_dir, safe_serialization=True)
        models.load_tokenizer(trained, cfg.model.trust_remote_code).save_pretrained(out_dir)
        return Merged(out_dir, dtype, merged=False)
    checkpoint = base_checkpoint(run)
    adapter = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter",
                                                       dst_path=str(out_dir.parent)))
    tokenizer = models.load_tokenizer(checkpoint, cfg.model.trust_remote_code)
    if base_setting == "dequantized" and cfg.peft.load_in_bits < 16:
        # The base the adapter was trained against, loaded as training loaded it, its 4- or 8-bit
        # values dequantized to `dtype`: the merged model answers as the run did; nothing re-quantized.
        base = models.load_base(checkpoint, cfg.model, cfg.peft).dequantize().to(dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype,
                                                    trust_remote_code=cfg.model.trust_remote_code,
                                                    use_safetensors=not cfg.model.allow_pickle_weights)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    probe = examples[:MERGE_CHECK_PROMPTS]
    expected = _logits(model, tokenizer, probe)
    if not all(e.isfinite().all() for e in expected):  # every comparison with NaN is False: it would pass
        raise RegistryError(f"run_id={run_id}: base + adapter give non-finite logits (NaN or inf) on the held-out "
                            "prompts: the training diverged; nothing to register")
    with model.disable_adapter():
        plain = _logits(model, tokenizer, probe)
    merged = model.merge_and_unload()
    actual = _logits(merged, tokenizer, probe)
    relative = max(((a - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected))
    share = max((_rms(a - e) / max(_rms(e - p), 1e-30)) for a, e, p in zip(actual, expected, plain))
    result = Merged(out_dir, dtype, relative, share)
    if not all(a.isfinite().all() for a in actual):  # what the comparisons below cannot see: max() skips a later NaN
        raise RegistryError(f"run_id={run_id}: the merged model gives non-finite logits (NaN or inf) where base + "
                            "adapter do not; the merge is broken")
    if relative > result.tolerance and share > MERGE_MAX_EFFECT_SHARE:
        raise RegistryError(f"run_id={run_id}: merged logits differ from base+adapter by {relative:.2e} (relative, "
                            f"above the {dtype} tolerance {result.tolerance:.0e}), {share:.0%} of the adapter's own "
                            "effect on them; the merge is broken")
    merged.config.use_cache = True
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)  # carries the chat template
    return result


# --------------------------------------------------------------------------- register


def model_name(registry_name: str | None, experiment: str) -> str:
    """registry.model_name, else the experiment's name; refused here, before a merge, where the
    registry would refuse it after one."""
    if problem := model_name_problem(registry_name, experiment):
        raise RegistryError(problem)
    return registry_name or experiment


def _requirements() -> list[str]:
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            "accelerate", "safetensors"]


def register(run_id: str, name: str, sweep_id: str | None = None, dtype_setting: str | None = None,
             base_setting: str = "original") -> ModelVersion:
    """Merge the run's adapter, score the merged model on the run's held-out set, log it on the run
    as a transformers model (`text-generation`) and register it under `name`. Returns the new version."""
    client = MlflowClient()
    run = _trial(client, run_id)
    cfg = run_config(run_id)
    dtype = models.compute_dtype(cfg.model.dtype)
    if problem := choice_problem("registry.merge_base", base_setting):
        raise RegistryError(problem)
    weights_dtype = merge_dtype(cfg, dtype_setting)
    if same := _registered_alike(client, name, run_id, base_setting, weights_dtype):
        print(f"run {run_id} is already {name} version {same.version}, merged the same way: not registered again")
        return same
    try:
        examples = held_out(run_id)
        with tempfile.TemporaryDirectory(prefix="ftlab-merge-") as tmp:
            merged = merge(run, cfg, Path(tmp) / "checkpoint", weights_dtype, base_setting, examples)
            model, tokenizer, version = _log_on_run(run, merged, examples[0], name)
        # What is registered is scored, not the run: the run scored its adapter on the 4-bit base it
        # trained on, and the merged 16-bit model answers somewhat differently. (After logging: scoring
        # may upcast the model in place.)
        scores = scoring.score(_computable(model, dtype), tokenizer, examples, cfg, dtype,
                               desc="evaluate merged").metrics
        for key, value in _version_tags(client, run, merged, base_setting, sweep_id, scores).items():
            client.set_model_version_tag(name, version, key, value)
    except BaseException:  # Ctrl-C, SIGTERM, a failure while scoring: no version left half made
        _remove_unfinished_versions(client, name, run_id)
        raise
    check = ("a full fine-tune: its own weights, nothing merged" if not merged.merged else
             f"merge check: logits within {merged.relative_diff:.1e} of base+adapter, "
             f"{merged.effect_share:.1%} of the adapter's effect")
    print(f"registered {name} version {version} from run {run_id} ({check})")
    print("  held-out scores of the registered model (the run's, on its training base, in brackets): " + ", ".join(
        f"{k} {v:.3f}" + (f" ({run.data.metrics[k]:.3f})" if k in run.data.metrics else "") for k, v in scores.items()))
    remedies = [remedy for remedy, applies in (
        ("registry.merge_base=dequantized merges into the quantized base the adapter was trained against "
         "(dequantized to 16 bits)", base_setting != "dequantized" and cfg.peft.load_in_bits < 16),
        ("registry.merge_dtype=float16 keeps more of a small update than bf16",
         merged.dtype == torch.bfloat16)) if applies]
    if merged.merged and remedies and any(v < run.data.metrics.get(k, v) - 0.02 for k, v in scores.items()):
        print(f"  the merged model scores below its run: {'; '.join(remedies)}")
    return client.get_model_version(name, version)


def _log_on_run(run: Run, merged: Merged, example: Example, name: str) -> tuple[torch.nn.Module, object, str]:
    """Log the merged checkpoint on the trial run it came from as a transformers model, registered
    under `name`: (the model, its tokenizer, the new version)."""
    from mlflow.models import infer_signature
    from transformers import AutoModelForCausalLM

    tokenizer = models.load_tokenizer(merged.path)
    # Components, not the checkpoint path: MLflow 3.17's path branch reads the pipeline class
    # from transformers 4's task table and fails on transformers 5.
    components = {"model": AutoModelForCausalLM.from_pretrained(merged.path), "tokenizer": tokenizer}
    prompt = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=False)
    params = {"max_new_tokens": 64}
    # Resume the trial run so the model lives next to the adapter and metrics it came from, in
    # the run's own experiment (MLflow refuses to resume a run of another active experiment).
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    mlflow.start_run(run_id=run.info.run_id, nested=mlflow.active_run() is not None)
    try:
        if merged.merged:
            mlflow.log_metrics({"merge_relative_logit_diff": merged.relative_diff,
                                "merge_effect_share": merged.effect_share})
        info = mlflow.transformers.log_model(
            transformers_model=components, name=MERGED_ARTIFACT, task="text-generation",
            signature=infer_signature(prompt, example.reference, params=params),
            input_example=(prompt, params), pip_requirements=_requirements(), registered_model_name=name,
        )
    finally:  # FINISHED, as the trial was: `with start_run` marks a run FAILED on any error, and
        mlflow.end_run()  # a FAILED run can never be registered
    return components["model"], tokenizer, str(info.registered_model_version)


def _version_tags(client: MlflowClient, run: Run, merged: Merged, base_setting: str, sweep_id: str | None,
                  scores: dict[str, float]) -> dict[str, str]:
    """What a registered version records: where it came from, how it was merged and its scores."""
    run_id = run.info.run_id
    if merged.merged:
        adapter_bytes = sum(f.file_size or 0 for f in client.list_artifacts(run_id, "adapter"))
        adapter_tags = {
            "ftlab.adapter_mb": f"{adapter_bytes / 2**20:.2f}",
            # For LoRA hot-swapping servers: the adapter alone, a few MB.
            "ftlab.adapter_uri": f"runs:/{run_id}/adapter",
            "ftlab.merge_relative_logit_diff": f"{merged.relative_diff:.2e}",
            "ftlab.merge_tolerance": f"{merged.tolerance:.0e}",
            "ftlab.merge_effect_share": f"{merged.effect_share:.3f}",
            "ftlab.merge_dtype": str(merged.dtype).removeprefix("torch."),
            "ftlab.merge_base": base_setting,
        }
    else:  # a full fine-tune: no adapter to size or point at; its dtype is what a later register compares
        adapter_tags = {"ftlab.full_fine_tune": "true", "ftlab.merge_dtype": str(merged.dtype).removeprefix("torch.")}
    return {
        "ftlab.sweep_id": sweep_id or run.data.tags.get("ftlab.sweep_id", ""),
        "ftlab.base_model": run.data.tags.get("ftlab.model", ""),
        "ftlab.base_checkpoint": run.data.params["model.checkpoint"],
        "ftlab.data_fingerprint": run.data.tags.get("ftlab.data_fingerprint", ""),
        **adapter_tags,
        **{f"metric.{k}": f"{v:.4f}" for k, v in scores.items()},
        **{f"run_metric.{k}": f"{v:.4f}" for k, v in run.data.metrics.items() if k in (*HELD_OUT_METRICS, "eval_loss")},
        "ftlab.source_run_id": run_id,  # last: a version with it is complete (_remove_unfinished_versions)
    }


def _remove_unfinished_versions(client: MlflowClient, name: str, run_id: str) -> None:
    """Delete the versions of `name` this run logged whose registration did not finish (no
    ftlab.source_run_id tag, set last): untagged, a later register would not see it as this run's
    and make another, and `promote` could move production to a model never scored."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return
    for v in versions:
        if "ftlab.source_run_id" not in v.tags:
            client.delete_model_version(name, v.version)
            print(f"ftlab: {name} version {v.version} removed: its registration did not finish", file=sys.stderr)


def _registered_alike(client: MlflowClient, name: str, run_id: str, base_setting: str,
                      dtype: torch.dtype) -> ModelVersion | None:
    """The version already registered from this run with these merge settings: registering or
    promoting a run again reuses it, so no copy pushes the real previous model out of `previous`."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in sorted(versions, key=lambda v: -int(v.version))
                 if v.tags.get("ftlab.source_run_id") == run_id
                 and v.tags.get("ftlab.merge_dtype") == str(dtype).removeprefix("torch.")  # a full fine-tune's too
                 and (v.tags.get("ftlab.full_fine_tune") == "true" or v.tags.get("ftlab.merge_base") == base_setting)),
                None)


# --------------------------------------------------------------------------- promote / rollback


def alias_holder(name: str, alias: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def resolve_version(name: str, version: str | None) -> ModelVersion:
    """A version number, an alias, or None for the newest version."""
    client = MlflowClient()
    _require_registered(client, name)
    if version is None:
        versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"], max_results=1)
        if not versions:
            raise RegistryError(f"registered model '{name}' has no versions; register a run first")
        return versions[0]
    if str(version).isdigit():
        try:
            return client.get_model_version(name, str(version))
        except MlflowException:
            raise RegistryError(f"version={version}: registered model '{name}' has no such version "
                                f"({_holdings(client, name)})") from None
    holder = alias_holder(name, str(version))
    if holder is None:
        raise RegistryError(f"version={version}: registered model '{name}' has no alias '{version}' "
                            f"({_holdings(client, name)})")
    return holder


def _holdings(client: MlflowClient, name: str) -> str:
    """What a registered model holds, for a message naming a version it does not: its newest
    versions and its aliases."""
    try:
        aliases = sorted(client.get_registered_model(name).aliases.items())
    except MlflowException:  # the store holds no registered model at all (_require_registered)
        return "nothing is registered yet; register a run first"
    versions = [v.version for v in client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"],
                                                                 max_results=10)]
    held = f"it has version{'s' if len(versions) > 1 else ''} {', '.join(map(str, versions))}"
    if aliases:
        held += f"; alias{'es' if len(aliases) > 1 else ''} " + ", ".join(f"{a} -> {v}" for a, v in aliases)
    return held


def _require_registered(client: MlflowClient, name: str) -> None:
    """A mistyped model name is named with the names the store does hold (nothing registered
    yet: the caller's 'no versions' / 'no such version' says enough)."""
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        held = [m.name for m in client.search_registered_models(max_results=20)]
        if held:
            raise RegistryError(f"no registered model '{name}' in {tracking.shown_store(mlflow.get_tracking_uri())}; it "
                                f"holds {', '.join(repr(n) for n in held)}") from None


def checkpoint_dir(model_uri: str, dst: Path | None = None) -> Path:
    """Download a registered model and lay it out as one plain HF checkpoint directory
    (the transformers flavor keeps weights in model/ and the tokenizer in components/tokenizer/)."""
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst) if dst else None))
    if (root / "config.json").exists():
        return root
    weights, tokenizer = root / "model", root / "components" / "tokenizer"
    if not (weights / "config.json").exists():
        raise RegistryError(f"{model_uri} holds no transformers checkpoint (no model/config.json)")
    for file in tokenizer.glob("*") if tokenizer.is_dir() else []:
        shutil.copy2(file, weights / file.name)
    return weights


def _gate_scores(candidate: ModelVersion, current: ModelVersion, name: str, metric: str) -> tuple[float, float]:
    """Both versions scored on the candidate run's held-out set with its eval settings."""
    from transformers import AutoModelForCausalLM

    cfg = run_config(candidate.run_id)
    dtype = models.compute_dtype(cfg.model.dtype)
    results = []
    with tempfile.TemporaryDirectory(prefix="ftlab-gate-") as tmp:
        examples = None
        for v in (candidate, current):
            path = checkpoint_dir(f"models:/{name}/{v.version}", Path(tmp) / str(v.version))
            tokenizer = models.load_tokenizer(path)
            examples = examples or held_out(candidate.run_id, tokenizer)
            model = _computable(AutoModelForCausalLM.from_pretrained(path), dtype)  # as registered
            scores = scoring.score(model, tokenizer, examples, cfg, dtype, desc=f"gate v{v.version}")
            if metric not in scores.metrics:  # the JSON metrics need JSON references
                raise RegistryError(f"registry.gate_metric={metric}: run {candidate.run_id}'s held-out set does "
                                    f"not give it; choose one of {', '.join(sorted(scores.metrics))}")
            results.append(scores.metrics[metric])
            del model
    return results[0], results[1]


def promote(name: str, version: str | None = None, metric: str = "rouge_l", force: bool = False) -> bool:
    """Move `production` to the version if it is at least as good as the current holder on
    `metric` (force=True skips the gate, tagged); the old holder becomes `previous`. Returns whether it moved."""
    if problem := gate_metric_problem(metric):  # before minutes of scoring two versions
        raise RegistryError(problem)
    client = MlflowClient()
    candidate = resolve_version(name, version)
    current = alias_holder(name, PRODUCTION)
    if current is not None and str(current.version) == str(candidate.version):
        print(f"{name} version {candidate.version} already holds '{PRODUCTION}'")
        return True
    if current is not None and force:
        client.set_model_version_tag(name, candidate.version, "ftlab.promoted_with_force", "true")
        print(f"force=true: gate skipped for version {candidate.version}")
    elif current is not None:
        cand_score, prod_score = _gate_scores(candidate, current, name, metric)
        passed = cand_score >= prod_score
        for key, value in {f"ftlab.gate.{metric}": f"{cand_score:.4f}",
                           f"ftlab.gate.production_{metric}": f"{prod_score:.4f}",
                           "ftlab.gate.production_version": str(current.version),
                           "ftlab.gate.result": "passed" if passed else "failed"}.items():
            client.set_model_version_tag(name, candidate.version, key, value)
        verdict = (f"gate on {metric}: candidate v{candidate.version} {cand_score:.4f} vs "
                   f"production v{current.version} {prod_score:.4f}")
        if not passed:
            print(f"{verdict} -> not promoted (force=true overrides)")
            return False
        print(f"{verdict} -> passed")
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, PRODUCTION, candidate.version)
    print(f"{name}: '{PRODUCTION}' -> version {candidate.version}"
          + (f", '{PREVIOUS}' -> version {current.version}" if current else ""))
    return True


def rollback(name: str) -> ModelVersion:
    """Swap `production` and `previous`: one command undoes a promotion (and a second redoes it)."""
    client = MlflowClient()
    _require_registered(client, name)  # a mistyped name is named, not reported as having no 'previous'
    previous, current = alias_holder(name, PREVIOUS), alias_holder(name, PRODUCTION)
    if previous is None:
        raise RegistryError(f"registered model '{name}' has no '{PREVIOUS}' alias: nothing to roll back to")
    if current is not None and str(current.version) == str(previous.version):
        raise RegistryError(f"'{PRODUCTION}' and '{PREVIOUS}' both hold version {current.version} of '{name}': "
                            "nothing to roll back to")
    client.set_registered_model_alias(name, PRODUCTION, previous.version)
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    else:  # production's version was deleted: 'previous' now is production, not a second choice
        client.delete_registered_model_alias(name, PREVIOUS)
    print(f"{name}: rolled back '{PRODUCTION}' to version {previous.version}"
          + (f" ('{PREVIOUS}' is now version {current.version})" if current else ""))
    return previous


# --------------------------------------------------------------------------- hooks and CLI


def on_sweep_end(cfg: DictConfig, parent_run_id: str, best_run_id: str) -> ModelVersion | None:
    """Called by the sweeper after every sweep: register the best trial (registry.auto_register
    or auto_promote) and try to promote it through the gate (registry.auto_promote)."""
    if not (cfg.registry.auto_register or cfg.registry.auto_promote) or best_run_id is None:
        return None  # switched off, or every trial failed
    tracking.setup(cfg.tracking_uri, cfg.experiment)
    sweep_id = MlflowClient().get_run(parent_run_id).data.tags.get("ftlab.sweep_id")
    name = model_name(cfg.registry.model_name, cfg.experiment)
    version = register(best_run_id, name, sweep_id, cfg.registry.merge_dtype, cfg.registry.merge_base)
    if cfg.registry.auto_promote:
        promote(name, version.version, cfg.registry.gate_metric)
    return version


def main() -> None:
    import hydra

    # `python -m ftlab.registry promote version=2` reads better than `action=promote`.
    if len(sys.argv) > 1 and "=" not in sys.argv[1] and not sys.argv[1].startswith("-"):
        sys.argv[1] = f"action={sys.argv[1]}"
    if not any(a.startswith(("action=", "-")) for a in sys.argv[1:]):
        print("ftlab: say what to do: python -m ftlab.registry register run_id=<run id> | promote version=<n> "
              "| promote run_id=<run id> | rollback", file=sys.stderr)
        raise SystemExit(2)

    @hydra.main(version_base="1.3", config_path="conf", config_name="registry_command")
    @exit_2_on(RegistryError, tracking.TrackingError, ConfigError)
    def command(cfg: DictConfig) -> None:
        from ftlab.pipeline import quiet_third_party_output

        check_keys(cfg, RegistryCommand)
        quiet_third_party_output()
        tracking.open_existing(cfg.tracking_uri)  # only read and added to: no experiment made
        name = model_name(cfg.registry.model_name, cfg.experiment)
        store = tracking.store_argument(cfg.tracking_uri)
        named = tracking.registry_arguments(cfg.registry.model_name, cfg.experiment)
        if cfg.action == "register":
            if not cfg.run_id:
                raise RegistryError("register needs run_id=<trial run id>")
            version = register(cfg.run_id, name, dtype_setting=cfg.registry.merge_dtype,
                               base_setting=cfg.registry.merge_base).version
            print(f"  promote it:  python -m ftlab.registry promote version={version}{named}{store}")
        elif cfg.action == "promote":
            version = register(cfg.run_id, name, dtype_setting=cfg.registry.merge_dtype,
                               base_setting=cfg.registry.merge_base).version if cfg.run_id else cfg.version
            if not promote(name, version, cfg.registry.gate_metric, cfg.force):
                sys.exit(1)
            print(f"  serve it:  python -m ftlab.serve model=models:/{name}@{PRODUCTION}{store}")
        elif cfg.action == "rollback":
            rollback(name)
        else:
            raise RegistryError(f"action={cfg.action}: use register, promote or rollback")

    with exit_on_interrupt():  # SIGTERM as Ctrl-C: the trial run resumed to log the model is ended, not left RUNNING
        command()


if __name__ == "__main__":
    main()
