"""The recipe, top to bottom: resolve the base -> prepare data -> load -> score the base
(once) -> train -> score the adapter -> log everything to MLflow -> summary. Entered through
pipeline.run once the config has passed its budget check.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from ftlab import checkpoints, files, models, scoring, tracking
from ftlab.config import ConfigError
from ftlab.data import prepare
from ftlab.data.report import log_data_report
from ftlab.train import (RunTotals, memory_cap_callback, peak_so_far_mb, release_memory, remove_transient_checkpoints,
                         time_cap_callback, train)

log = logging.getLogger("ftlab")


def base_eval_key(cfg: DictConfig, data_fingerprint: str, weights: str) -> str:
    """Base scores depend on the model (its settings, and its weights: a local directory overwritten
    since is another model), how it is held, the held-out data and the eval settings."""
    parts = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "weights": weights,
        "bits": cfg.peft.load_in_bits if cfg.peft.method != "full" else 16,
        "data": data_fingerprint,
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def run(cfg: DictConfig, run_name: str, tags: dict, predicted_gb: float,
        resume: checkpoints.ResumePoint | None, wall_start: float) -> dict[str, float]:
    cache = models.cache_root(cfg.cache_dir)
    _bertscore_model_at_hand(cfg)

    checkpoint = models.resolve_checkpoint(cfg.model, cfg.cache_dir)
    tokenizer = models.load_tokenizer(checkpoint, cfg.model.trust_remote_code)
    data = prepare(cfg.data, tokenizer, cfg.train.max_seq_length, cache)
    dtype = models.compute_dtype(cfg.model.dtype)

    tags["ftlab.data_fingerprint"] = data.fingerprint
    # The registry merges into the base at that path later: a base changed since is refused there.
    tags[tracking.BASE_WEIGHTS] = files.weights_fingerprint(checkpoint)
    if commit := tracking.git_commit():
        tags["mlflow.source.git.commit"] = commit

    model = None
    try:
        with _recorded_if_it_fails(cfg, run_name, tags, resume, predicted_gb):  # the trial's run starts after these
            model = models.load_base(checkpoint, cfg.model, cfg.peft)
            base_scores = _base_scores(cfg, model, tokenizer, data, dtype, tags)
        with tracking.trial_run(run_name, tags, run_id=resume.run_id if resume else None) as active:
            tracking.log_new_metrics({"predicted_peak_gb": predicted_gb})
            try:
                metrics = _train_and_score(cfg, model, tokenizer, data, dtype, checkpoint, active, base_scores,
                                           wall_start, resume)
            except Exception as e:
                if tracking.failure_kind(e) == "oom":  # measured vs predicted, to correct the estimator
                    peak_mb, kind = peak_so_far_mb()
                    mlflow.log_metric(f"peak_memory_mb_{kind}", peak_mb)
                raise
            metrics["predicted_peak_gb"] = predicted_gb
    finally:
        # Free the model on success and on failure alike, so the next trial starts clean.
        del model
        release_memory()
    _print_summary(active.info.run_id, metrics, base_scores, cfg)
    return metrics


def _bertscore_model_at_hand(cfg: DictConfig) -> None:
    """A hub model named by eval.bertscore_model is first needed once training is over (without
    compare_base): one that cannot be had failed the run there, and its training was lost. Its
    config.json is fetched, or found in the hub cache, before anything loads."""
    scorer = scoring.bertscore_model(cfg.eval)
    if Path(scorer).is_dir():  # auto's offline MiniLM, or a directory: config.check read it
        return
    from transformers import AutoConfig

    try:
        layers = getattr(AutoConfig.from_pretrained(scorer), "num_hidden_layers", None)
    except Exception as e:  # offline, a typo, gated
        raise ConfigError(f"eval.bertscore_model={scorer}: cannot be loaded ({(str(e).splitlines() or [''])[0][:200]}); "
                          "use eval.bertscore_model=auto (a MiniLM installed with ftlab) or a local directory") from None
    if layers is not None and cfg.eval.bertscore_num_layers > layers:
        raise ConfigError(f"eval.bertscore_num_layers={cfg.eval.bertscore_num_layers}: the BERTScore model ({scorer}) "
                          f"has {layers} layers; use 0 to {layers}")


@contextmanager
def _recorded_if_it_fails(cfg: DictConfig, run_name: str, tags: dict, resume: checkpoints.ResumePoint | None,
                          predicted_gb: float):
    """An error loading or scoring the base model (out of memory, damaged weights, a bitsandbytes
    failure) still ends a FAILED run with its reason, config and predicted peak, which a sweep's
    summary and report count. Not for a config error (ConfigError, ModelError), which stops a sweep
    with nothing to record, nor for a run being resumed: it stays as it was, to be continued."""
    try:
        yield
    except ConfigError:
        raise
    except KeyboardInterrupt as e:  # no run yet: say so, where the run's own end says KILLED
        if resume is None and not isinstance(e, checkpoints.TrainingInterrupted):
            name = getattr(e, "signal_name", "SIGINT")
            raise checkpoints.Interrupted(f"interrupted by {name} before training began (loading or scoring the "
                                          "base model): its MLflow run had not started, none was recorded",
                                          name) from None
        raise
    except Exception as e:
        if resume is None:
            try:
                with tracking.trial_run(run_name, tags):
                    tracking.log_config(cfg)
                    mlflow.log_metric("predicted_peak_gb", predicted_gb)
                    raise e
            except Exception:
                pass  # recorded; or the store failed too, and the load's error is the one to raise
        raise


def _train_and_score(cfg, model, tokenizer, data, dtype, checkpoint, active, base_scores, wall_start,
                     resume=None) -> dict:
    tracking.log_config(cfg)
    log_data_report(data, cfg.train)
    tracking.log_new_params({"model.checkpoint": str(checkpoint)})  # another cache path on resume: said

    per_step = cfg.train.per_device_batch_size * cfg.train.grad_accum
    if per_step > len(data.train):  # the Trainer takes what there is: a smaller effective batch than configured
        log.warning("train.per_device_batch_size x train.grad_accum = %d examples per optimizer step, more than the %d "
                    "training examples: each step sees all of them (an effective batch of %d); lower train.grad_accum "
                    "or train.per_device_batch_size",
                    per_step, len(data.train), len(data.train))
    set_seed(cfg.seed)  # the adapter's initial weights too: the same config and seed train the same run
    if cfg.peft.method != "full":
        model = models.add_adapter(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules,
                                   cfg.train.gradient_checkpointing, cfg.peft.adapter_dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracking.log_new_metrics({"trainable_params": trainable})

    # A resumed run goes on in the folder its checkpoint is in, which another working directory's
    # relative output_dir does not name: one folder holds all of a run's checkpoints.
    out_dir = resume.checkpoint.parent if resume and resume.checkpoint else Path(cfg.output_dir) / active.info.run_id
    if resume:
        mlflow.set_tags({"ftlab.resumed_from_step": resume.step,
                         **({"ftlab.resumed_from_checkpoint": str(resume.checkpoint.resolve())} if resume.checkpoint else {})})
    steps = tracking.training_callback(out_dir, resumed=resume is not None)
    callbacks = [steps, *(instantiate(c) for c in cfg.train.callbacks)]
    if cfg.budget.memory_cap_gb:
        callbacks.append(memory_cap_callback(cfg.budget.memory_cap_gb))
    # A resumed run's budget counts the training it did before (a preempted job resumed again and again).
    spent = RunTotals.of_checkpoint(resume.checkpoint, warn=False).seconds if resume else 0.0
    time_cap = time_cap_callback(cfg.budget.max_hours, spent) if cfg.budget.max_hours else None
    if time_cap:
        callbacks.append(time_cap)
    try:
        result = train(model, tokenizer, data, cfg.train, cfg.lr, cfg.seed, out_dir, dtype, callbacks=callbacks,
                       resume_from=resume.checkpoint if resume else None)
    finally:
        steps.close()  # a failed run keeps the loss curve it logged up to the failure
    if time_cap and time_cap.stopped_at_step is not None:
        note = f"stopped at step {time_cap.stopped_at_step} by budget.max_hours={cfg.budget.max_hours:g}"
        mlflow.set_tag("ftlab.stopped_early", note)
        log.warning("%s; scoring what it trained", note)
    try:
        with checkpoints.resumable_after_training(checkpoints.last_checkpoint(out_dir),
                                                  result.steps) as raise_if_interrupted:
            metrics = _score_and_log(cfg, model, tokenizer, data, dtype, active, base_scores, wall_start, result,
                                     out_dir, raise_if_interrupted)
    except Exception as e:  # train.resume=true takes a failed run; a sweep continues only its interrupted trials,
        # and one whose store went away as it ended (the sweep run again once the store is back)
        if cfg.sweep.id is not None and result.end_checkpoint is not None \
                and not isinstance(e, tracking.StoreUnreachable):
            shutil.rmtree(result.end_checkpoint, ignore_errors=True)
        raise
    remove_transient_checkpoints(out_dir)  # the run is logged: nothing is left to resume
    return metrics


def _score_and_log(cfg, model, tokenizer, data, dtype, active, base_scores, wall_start, result, out_dir,
                   raise_if_interrupted) -> dict:
    eval_start = time.perf_counter()
    scores = scoring.score(model, tokenizer, data.held_out, cfg, dtype,
                           desc="evaluate adapter" if cfg.peft.method != "full" else "evaluate fine-tuned model")
    raise_if_interrupted()  # one Python dropped while scoring: before the scores are logged

    metrics = {
        **scores.metrics,
        "eval_loss": result.eval_loss,
        "train_loss_final": result.train_loss,
        "train_seconds": result.train_seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        "trained_tokens": result.trained_tokens,
        "tokens_per_second": result.tokens_per_second,
        "peak_memory_mb": result.peak_memory_mb,  # one name wherever measured: an objective for any worker
        f"peak_memory_mb_{result.peak_memory_kind}": result.peak_memory_mb,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    if base_scores:
        metrics.update({f"base_{k}": v for k, v in base_scores.items()})
        metrics.update({f"gain_{k}": scores.metrics[k] - base_scores[k] for k in scores.metrics if k in base_scores})
    _log_final_metrics(metrics, active.info.run_id, out_dir, result.saved_dir)
    mlflow.set_tag("ftlab.peak_memory_kind", result.peak_memory_kind)
    tracking.log_samples(tracking.samples_table(data.held_out, scores.predictions, cfg.eval.samples_to_log),
                         "samples/generations.json")
    if result.saved_dir is not None:
        mlflow.log_artifacts(str(result.saved_dir), result.saved_dir.name)
    return metrics


def _log_final_metrics(metrics: dict, run_id: str, out_dir: Path, saved_dir: Path | None) -> None:
    """The run's scores, which took minutes to compute, survive a tracking store that is down as
    training ends: retried as step metrics are, then written to the run's output dir, and the run
    fails with where they and the adapter are."""
    final = tracking.BufferedMetrics(run_id, out_dir / "unlogged_metrics.jsonl")
    final.log(metrics, step=0)
    if not final.close():
        scores = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("rouge_l", "bertscore_f1", "eval_loss") if k in metrics)
        kept = f"; the trained weights are in {saved_dir}" if saved_dir is not None else ""
        raise tracking.StoreUnreachable(f"tracking store unreachable at the end of run {run_id}: its metrics ({scores}) "
                                     f"were written to {final.spill_path}{kept}")


def _base_scores(cfg, model, tokenizer, data, dtype, tags) -> dict[str, float] | None:
    """Score the untouched base once per (model, data, eval) key; later runs reuse it."""
    if not cfg.eval.compare_base:
        return None
    key = base_eval_key(cfg, data.fingerprint, tags[tracking.BASE_WEIGHTS])
    tags["ftlab.compared_base_key"] = key  # the trial's: a report finds the base evaluation it was compared with
    if (cached := tracking.find_base_scores(key)) is not None:
        return cached
    # Workers of a sweep starting together would each score it: one does, the others wait and reuse it.
    with tracking.one_process_at_a_time(mlflow.get_tracking_uri(), f"base eval {key}"):
        if (cached := tracking.find_base_scores(key)) is not None:
            return cached
        return _score_base(cfg, model, tokenizer, data, dtype, tags, key)


def _score_base(cfg, model, tokenizer, data, dtype, tags, key) -> dict[str, float]:
    start = time.perf_counter()
    scores = scoring.score(model, tokenizer, data.held_out, cfg, dtype, desc="evaluate base")
    seconds = time.perf_counter() - start
    samples = tracking.samples_table(data.held_out, scores.predictions, cfg.eval.samples_to_log)
    tracking.log_base_scores(key, cfg.model.name, scores.metrics, samples,
                             {k: v for k, v in tags.items()
                              if k in ("ftlab.model", "ftlab.data_fingerprint", "mlflow.source.git.commit")},
                             seconds)
    return scores.metrics


def _print_summary(run_id: str, metrics: dict, base: dict | None, cfg: DictConfig) -> None:
    keys = ["rouge_l", "bertscore_f1", "exact_match", "json_valid", "eval_loss", "tokens_per_second"]
    lines = [f"ftlab run {run_id} finished"]
    for k in keys:
        if k in metrics:
            ref = f"   (base {base[k]:.3f})" if base and k in base else ""
            lines.append(f"  {k:<18} {metrics[k]:.3f}{ref}")
    uri = mlflow.get_tracking_uri()
    # Quoted: a URI may carry '?...', which zsh would expand as a glob and refuse.
    lines.append(f"  open the UI:  mlflow ui --backend-store-uri {shlex.quote(tracking.shown_store(uri))}")
    if cfg.train.save_adapter and not cfg.sweep.id:  # a sweep's report says it for its best trial
        lines.append(f"  register it:  python -m ftlab.registry register run_id={run_id}"
                     f"{tracking.registry_arguments(cfg.registry.model_name, cfg.experiment)}"
                     f"{tracking.store_argument(cfg.tracking_uri)}")
    print("\n".join(lines))
