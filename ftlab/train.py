"""One training trial: TRL SFTTrainer on a peft model, completion-only loss,
measured peak memory (CUDA max allocated, or on CPU the process peak-RSS delta),
real-token throughput, and the adapter saved as safetensors.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftlab.config import TrainConfig
from ftlab.data import PreparedData


class PeakMemory:
    """Peak memory of the block. CUDA: max allocated bytes. CPU: the rise of the
    process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS at entry."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start_rss = _proc_status_kb("VmRSS")
            self.reset_ok = _reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            self.kind = "cuda_max_allocated"
        else:
            self.peak_mb = max(0, _proc_status_kb("VmHWM") - self.start_rss) / 1024
            self.kind = "cpu_peak_rss_delta" if self.reset_ok else "cpu_peak_rss_delta_since_start"
        return False


def _proc_status_kb(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


@dataclass
class TrainResult:
    adapter_dir: Path | None
    train_loss: float
    eval_loss: float
    train_seconds: float
    trained_tokens: int
    tokens_per_second: float
    peak_memory_mb: float
    peak_memory_kind: str
    steps: int
    log_history: list[dict] = field(default_factory=list)


def sft_config(cfg: TrainConfig, lr: float, seed: int, out_dir: Path, dtype: torch.dtype):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        logging_steps=cfg.logging_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        completion_only_loss=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="no",
        save_strategy="steps" if cfg.resume else "no",
        save_steps=max(1, cfg.logging_steps * 10),
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
    )


def train(model, tokenizer, data: PreparedData, cfg: TrainConfig, lr: float, seed: int, out_dir: Path,
          dtype: torch.dtype, callbacks: list | None = None) -> TrainResult:
    from datasets import Dataset
    from trl import SFTTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, lr, seed, out_dir, dtype),
        train_dataset=Dataset.from_list(data.trl_rows("train")),
        eval_dataset=Dataset.from_list(data.trl_rows("held_out")),
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )
    resume = cfg.resume and any(out_dir.glob("checkpoint-*"))
    with PeakMemory() as peak:
        start = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=True if resume else None)
        seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"]
    tokens = _trained_tokens(trainer)
    adapter_dir = None
    if cfg.save_adapter:
        adapter_dir = out_dir / "adapter"
        trainer.model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
    return TrainResult(
        adapter_dir=adapter_dir,
        train_loss=output.training_loss,
        eval_loss=eval_loss,
        train_seconds=seconds,
        trained_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        peak_memory_mb=peak.peak_mb,
        peak_memory_kind=peak.kind,
        steps=trainer.state.global_step,
        log_history=list(trainer.state.log_history),
    )


def _trained_tokens(trainer) -> int:
    """Real (non-padding) tokens seen in training: TRL counts them as it goes."""
    for entry in reversed(trainer.state.log_history):
        if "num_tokens" in entry:
            return int(entry["num_tokens"])
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    return int(sum(lengths) * math.ceil(trainer.args.num_train_epochs))
