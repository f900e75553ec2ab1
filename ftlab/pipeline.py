"""A run's gate, then its recipe: the budget and the resume point are checked from the config
alone, before any weights, tokenizer or data load, and before the libraries that load them
are imported (torch's model stack, transformers, peft, trl: seconds), so a config that cannot
run is turned away in the time it takes to record why. Then ftlab/recipe.py.

Returns the run's metrics, so sweepers can read the objective.
"""
from __future__ import annotations

import functools
import gc
import logging
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig

from ftlab import attention, checkpoints, config, files, memory, tracking

log = logging.getLogger("ftlab")


def quiet_third_party_output() -> None:
    """Hide noise users cannot act on: bitsandbytes' note that an optional hub kernel is
    missing (the CPU fallback is used), rouge-score's tokenizer notice, deprecation
    warnings raised inside transformers/trl for arguments ftlab does not pass."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Registering a local merge: no hub model card or license, and the example's params are ftlab's own.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft)\.")
    warnings.filterwarnings("ignore", message=r".*an autograd kernel was not registered.*")


def run(cfg: DictConfig) -> dict[str, float]:
    wall_start = time.perf_counter()
    config.check(cfg)
    attention.check_loadable(cfg.model.attn_implementation)
    files.make_dir(cfg.output_dir, "output_dir")
    if cfg.data.rejects:
        files.make_file_dir(cfg.data.rejects, "data.rejects")
    memory.resolve_arch(cfg)  # priced, logged and hashed as the checkpoint is
    if cfg.train.max_seq_length > (positions := cfg.model.arch.max_position_embeddings):
        log.warning("train.max_seq_length=%d is beyond the %d positions %s was trained on: longer records train and "
                    "are scored past its context (lower it, or use a model with a longer one)",
                    cfg.train.max_seq_length, positions, cfg.model.name_or_path)
    quiet_third_party_output()
    tracking.setup(cfg.tracking_uri, cfg.experiment)
    run_name = cfg.run_name or f"{cfg.model.name}-r{cfg.lora_r}-lr{cfg.lr:g}"
    cfg_hash = tracking.config_hash(cfg)
    tags = {"ftlab.role": "trial", "ftlab.model": cfg.model.name, "ftlab.config_hash": cfg_hash,
            **tracking.sweep_tags(cfg.sweep)}
    if (overrides := tracking.run_overrides()) is not None:
        tags["ftlab.overrides"] = overrides
    predicted_gb = _fit_budget(cfg, run_name, tags)
    resume = _resume_point(cfg, cfg_hash)  # a resume with nothing to resume fails now, too
    from ftlab import recipe  # only for a config that will run: see the module docstring

    _freeze_imported_libraries()
    return recipe.run(cfg, run_name, tags, predicted_gb, resume, wall_start)


@functools.cache  # once a process: a later trial's objects (its config) must stay collectable
def _freeze_imported_libraries() -> None:
    """What the model stack's imports built lives as long as the process: frozen, the garbage
    collections after it (automatic ones in training, release_memory's after each trial) skip it
    (~0.5 s once)."""
    gc.freeze()


def _fit_budget(cfg: DictConfig, run_name: str, tags: dict) -> float:
    """Predicted peak (GiB) of the config that will run. Over budget.vram_gb: with
    budget.fit=auto_batch the micro-batch is lowered (grad_accum raised to keep the
    effective batch) until it fits; otherwise a skipped run is recorded and OverBudget raised."""
    cfg.model.attn_implementation = attention.resolve(cfg.model.attn_implementation, cfg.model.dtype)  # priced, logged, as run
    cfg.train.gradient_checkpointing = memory.resolve_checkpointing(cfg, memory.device_memory_gb())
    fits, est, reason = memory.check_budget(cfg)
    if not fits and cfg.budget.fit == "auto_batch" and (pair := memory.fit_batch(cfg)):
        log.warning("%s; auto_batch: train.per_device_batch_size=%d train.grad_accum=%d", reason, *pair)
        cfg.train.per_device_batch_size, cfg.train.grad_accum = pair
        fits, est, reason = memory.check_budget(cfg)
    if fits:
        return est.total_gb
    remedy = memory.over_budget_remedy(cfg)
    # Recorded with what would make it fit, which the report and a sweep's line show with it.
    run_id = tracking.skipped_run(cfg, run_name, tags, memory.OverBudget.said(reason, remedy), est.total_gb)
    raise memory.OverBudget(reason, est.total_gb, run_id, run_name, remedy)


def _resume_point(cfg: DictConfig, cfg_hash: str) -> checkpoints.ResumePoint | None:
    if cfg.train.resume is False or cfg.train.resume is None:
        return _interrupted_in_this_sweep(cfg, cfg_hash)
    candidates, how = tracking.resumable_runs(cfg.train.resume, cfg_hash, cfg)
    return checkpoints.find_resume_point(candidates, Path(cfg.output_dir), how)


def _interrupted_in_this_sweep(cfg: DictConfig, cfg_hash: str) -> checkpoints.ResumePoint | None:
    """In a sweep run again after an interrupt, a trial whose config was interrupted in this
    sweep continues that run from its last checkpoint; without one it starts from zero, and says so."""
    if cfg.sweep.id is None:
        return None
    interrupted = tracking.interrupted_trials(str(cfg.sweep.id), cfg_hash)
    if not interrupted:
        return None
    try:
        point = checkpoints.find_resume_point(interrupted, Path(cfg.output_dir), "")
    except checkpoints.ResumeError:
        # The same run goes on, from zero: the sweep keeps one run per config, not a KILLED one beside it.
        newest = next(iter(interrupted))
        log.warning("run %s of this config was interrupted before its first checkpoint (none in %s/%s or where "
                    "the run recorded one): it starts again from zero", newest, cfg.output_dir, newest)
        return checkpoints.ResumePoint(newest, None, 0)
    log.warning("continuing run %s, interrupted in this sweep, from %s", point.run_id, point.checkpoint)
    return point
