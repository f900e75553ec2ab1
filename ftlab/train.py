"""One training trial: TRL SFTTrainer on a peft model, completion-only loss,
measured peak memory (CUDA max allocated, or on CPU the process peak-RSS delta),
real-token throughput, and the adapter saved as safetensors.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ftlab.checkpoints import TrainingInterrupted, last_checkpoint, resumable_after_training, stop_on_signals
from ftlab.config import TrainConfig
from ftlab.data import PreparedData
from ftlab.models import many_row_4bit, unpack_cpu_4bit
from ftlab.tracking import trained_artifact

log = logging.getLogger(__name__)


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

    def so_far_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return max(0, _proc_status_kb("VmHWM") - self.start_rss) / 1024

    def __exit__(self, *exc):
        self.peak_mb = self.so_far_mb()
        if self.cuda:
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "cpu_peak_rss_delta" if self.reset_ok else "cpu_peak_rss_delta_since_start"
        return False


def peak_so_far_mb() -> tuple[float, str]:
    """The process's peak memory so far, for a trial that died of OOM before PeakMemory exited."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return _proc_status_kb("VmHWM") / 1024, "cpu_peak_rss"


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


def keep_freed_memory() -> None:
    """Stop glibc from returning freed tensor memory to the OS after every op.

    By default each large tensor is its own mmap, so every step page-faults (and
    zeroes) hundreds of MB again: measured ~40% of CPU time in the kernel on SmolLM2
    QLoRA, and +25% tokens/s with mmap off (bench/train_throughput.py).
    release_memory() hands the heap back between trials."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, which is reused
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap


def release_memory() -> None:
    """Give memory back between trials: Python garbage, the CUDA cache, glibc's heap."""
    gc.collect()
    _freeze_first_survivors()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _freeze_first_survivors() -> None:
    """What survives the first trial's collection is mostly what that trial imported (TRL, datasets,
    matplotlib) and lives for the whole sweep: frozen, the next trials' collections skip it. Once:
    a later trial's survivors include its config, which must stay collectable (frozen at every
    trial, ~3,500 objects a trial were never freed)."""
    gc.freeze()


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a frozen, bias-free LM head's logits, the gradient built in place.

    Autograd's F.cross_entropy on fp32-upcast logits keeps the log-softmax, then in backward
    fills a zero tensor for nll_loss, runs log_softmax's backward over two vocabulary-wide
    tensors and casts back. Here backward turns the saved log-probabilities into
    softmax - one_hot in place: the same gradient (up to fp32 rounding at the target) in
    18-28% less time for the loss of a SmolLM2 micro-batch (~190 answer tokens x 49k
    vocabulary), and no vocabulary-wide tensor beyond the saved log-probabilities."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        logits = hidden @ weight.T  # in autocast's dtype when autocast is on
        ctx.matmul_dtype = logits.dtype
        log_probs = torch.log_softmax(logits.float(), -1)
        predicted = log_probs.argmax(-1)
        ctx.save_for_backward(weight, targets, log_probs)
        ctx.mark_non_differentiable(predicted)
        return -log_probs.gather(1, targets[:, None]).sum(), predicted

    @staticmethod
    def backward(ctx, grad_loss, _grad_predicted):
        weight, targets, log_probs = ctx.saved_tensors
        grad_logits = log_probs.exp_()  # saved only for this one backward, so overwritten
        grad_logits[torch.arange(len(targets), device=targets.device), targets] -= 1
        grad_logits = grad_logits.mul_(grad_loss).to(ctx.matmul_dtype)
        return grad_logits @ weight.to(ctx.matmul_dtype), None, None  # as autocast's matmul backward


def answer_token_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor):
    """(summed cross-entropy, argmax predictions) of `lm_head(hidden)` against `targets`."""
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None and not lm_head.weight.requires_grad:
        return _FrozenHeadCrossEntropy.apply(hidden, lm_head.weight, targets)
    logits = lm_head(hidden).float()  # a trained or adapted head: autograd's path
    return F.cross_entropy(logits, targets, reduction="sum"), logits.detach().argmax(-1)


def completion_only_trainer_class():
    """SFTTrainer whose loss computes LM-head logits only where a label exists.

    The prompt (instruction + input) is most of every sequence and carries no loss,
    and the LM head over the vocabulary is a large share of a small model's FLOPs
    (SmolLM2-135M: 28M of 135M parameters), so skipping it there saves real time."""
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        """transformers' length-grouped order, each epoch's drawn from (seed, epoch) instead of the
        global RNG. A run resumed in its second epoch has the checkpoint's RNG state, not the one the
        epoch began with: it drew another order, and skipping the batches already trained skipped
        others (a resumed run's trained tokens and loss curve differed from the uninterrupted run's).
        The Trainer calls set_epoch before each epoch; its random sampler is accelerate's seeded one."""

        def __init__(self, batch_size: int, lengths: list[int], seed: int):
            super().__init__(batch_size, lengths=lengths)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return super().__iter__()

    class CompletionOnlySFTTrainer(SFTTrainer):
        ftlab_before = RunTotals()  # of the checkpoint a resumed run continues from (train())
        ftlab_stopper = None  # the StopOnSignal of train(), which saves a checkpoint on a signal
        ftlab_start = 0.0  # time.perf_counter() as this process's training started
        ftlab_peak: PeakMemory | None = None  # measuring this process's training

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            labels = inputs["labels"][:, 1:]
            mask = labels != -100
            targets = labels[mask]
            count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
            # The mixed precision the Trainer applies by wrapping model.forward, which this bypasses
            with self.accelerator.autocast():
                hidden = base.model(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                    position_ids=inputs.get("position_ids"), use_cache=False,
                ).last_hidden_state
                loss, predicted = answer_token_loss(base.lm_head, hidden[:, :-1][mask], targets)
            loss = loss / torch.as_tensor(count).clamp(min=1)
            with torch.no_grad():
                n = max(int(mask.sum()), 1)
                self._metrics[mode]["mean_token_accuracy"].append((predicted == targets).sum().item() / n)
                if mode == "train":
                    seen = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
                    self._total_train_tokens += int(seen)
                    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, None) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):  # train.sampling=group_by_length
                return EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=self.args.seed)
            return sampler

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            # The Trainer's checkpoint does not hold the loss summed so far or TRL's token count: a resumed
            # run would report those of its resumed steps only (RunTotals).
            loss_sum = self.ftlab_before.loss_sum + self._total_loss_scalar + float(self._tr_loss.item())
            seconds = self.ftlab_before.seconds + time.perf_counter() - self.ftlab_start
            peak_mb = max(self.ftlab_before.peak_mb, self.ftlab_peak.so_far_mb() if self.ftlab_peak else 0.0)
            step = self.state.global_step
            # Saved only because a signal stopped training (not one train.save_steps asked for): the run
            # resumed from it removes it once it is logged.
            scheduled = self.args.save_strategy == "steps" and (step % self.args.save_steps == 0
                                                                 or step >= self.state.max_steps)
            signalled = self.ftlab_stopper is not None and self.ftlab_stopper.signal_name is not None
            RunTotals(step, loss_sum, self._total_train_tokens, seconds, peak_mb,
                      transient=signalled and not scheduled).write(Path(self.args.output_dir) / f"checkpoint-{step}")

    return CompletionOnlySFTTrainer


@dataclass
class RunTotals:
    """What a run trained up to a checkpoint, saved in it: a resumed run reports its mean loss over
    all its steps, its tokens, training time and tokens/s in total, as if it had not been interrupted."""

    FILE: ClassVar[str] = "ftlab_totals.json"
    step: int = 0
    loss_sum: float = 0.0  # of the per-step losses, as the Trainer sums them for its training_loss
    tokens: int = 0
    seconds: float = 0.0  # training time, over every process that trained the run
    peak_mb: float = 0.0  # the highest peak memory of those processes' training
    end_of_training: bool = False  # training ended at this step: resumed here, nothing is trained again
    # Saved only to resume from (a signal, or scoring: _save_end_of_training): removed once the run is logged.
    transient: bool = False

    @classmethod
    def of_checkpoint(cls, checkpoint: Path | None, warn: bool = True) -> "RunTotals":
        if checkpoint is None:
            return cls()
        if not (path := Path(checkpoint) / cls.FILE).exists():
            if not warn:
                return cls()
            log.warning("%s has no %s (saved by an older ftlab): train_loss_final, trained_tokens and train_seconds "
                        "will count the resumed steps only", checkpoint, cls.FILE)
            return cls()
        return cls(**json.loads(path.read_text()))

    def write(self, checkpoint: Path) -> None:
        (checkpoint / self.FILE).write_text(json.dumps(dataclasses.asdict(self)))


class MemoryCapExceeded(MemoryError):
    """The trial's measured memory went over budget.memory_cap_gb (an out-of-memory failure).
    remedy: what the command line adds to the message; None: the batch and sequence settings."""

    def __init__(self, message: str, remedy: str | None = None):
        super().__init__(message)
        self.remedy = remedy


def memory_cap_callback(cap_gb: float):
    """Enforce budget.memory_cap_gb: on CUDA through the allocator's per-process fraction
    (a real CUDA OOM), on the CPU by checking the process RSS after every step."""
    from transformers import TrainerCallback

    cap_kb = cap_gb * 2**20
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total))

    def check(when: str, remedy: str | None = None) -> None:
        rss = _proc_status_kb("VmRSS")
        if not torch.cuda.is_available() and rss > cap_kb:
            raise MemoryCapExceeded(f"out of memory: process RSS {rss / 2**20:.2f} GiB > budget.memory_cap_gb={cap_gb} "
                                    f"{when}", remedy)

    class MemoryCap(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # The runtime, model and data: no batch size lowers it.
            check("before the first step (the runtime, model and data; training adds its activations): raise "
                  "budget.memory_cap_gb", remedy="")

        def on_step_end(self, args, state, control, **kwargs):
            check(f"at step {state.global_step}")

    return MemoryCap()


def time_cap_callback(max_hours: float, spent_s: float = 0.0):
    """Enforce budget.max_hours: training stops after the optimizer step that crosses it, and the
    trial goes on to score and log what it trained (stopped_at_step says where it stopped).
    spent_s: training time a resumed run spent before (its checkpoint's RunTotals)."""
    from transformers import TrainerCallback

    class TimeCap(TrainerCallback):
        stopped_at_step: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter() - spent_s

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > max_hours * 3600 and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_at_step = state.global_step

    return TimeCap()


@contextmanager
def datasets_progress_bars_off():
    """TRL's preparation, a fraction of a second, leaves eight finished `datasets` bars on the console
    (tokenise, labels, truncate, drop, for each split); the phases that take time have ftlab's own."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def quiet_progress_callback():
    """transformers' progress bars, named, with the loss in the training bar instead of
    printing every log dict."""
    from transformers.trainer_callback import ProgressCallback

    class LossInBar(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description("train")

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            new_bar = self.prediction_bar is None
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
            if new_bar and self.prediction_bar is not None:
                self.prediction_bar.set_description("held-out loss")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    return LossInBar


def _close_progress_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        for bar in (getattr(callback, "training_bar", None), getattr(callback, "prediction_bar", None)):
            if bar is not None:
                bar.close()


@dataclass
class TrainResult:
    saved_dir: Path | None  # the adapter (LoRA) or the whole model (a full fine-tune)
    train_loss: float
    eval_loss: float
    train_seconds: float
    trained_tokens: int
    tokens_per_second: float
    peak_memory_mb: float
    peak_memory_kind: str
    steps: int
    log_history: list[dict] = field(default_factory=list)
    end_checkpoint: Path | None = None  # to remove once the run is logged (_save_end_of_training)


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
        train_sampling_strategy=cfg.sampling,
        completion_only_loss=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="no",
        prediction_loss_only=True,
        # Checkpoints (adapter + optimizer + scheduler + RNG) for train.resume; an interrupt
        # saves one whatever this says (ftlab.checkpoints).
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=2,  # the newest to resume from, plus one in case the newest was cut off
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
    )


_TOKENIZED: dict[tuple, tuple] = {}


def train(model, tokenizer, data: PreparedData, cfg: TrainConfig, lr: float, seed: int, out_dir: Path,
          dtype: torch.dtype, callbacks: list | None = None, resume_from: Path | None = None) -> TrainResult:
    """Train; resume_from continues from that checkpoint. A SIGINT/SIGTERM during training saves a
    checkpoint in out_dir and raises TrainingInterrupted (ftlab.checkpoints)."""
    from datasets import Dataset

    keep_freed_memory()
    if unpacked := unpack_cpu_4bit(model):  # the base-model scores were just computed on this model
        log.info("undid bitsandbytes' CPU inference packing of %d 4-bit layers before training", unpacked)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = sft_config(cfg, lr, seed, out_dir, dtype)
    optimizer = None
    if cfg.loraplus_lr_ratio != 1 and hasattr(model, "peft_config"):
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        # train.optim's optimizer as the Trainer would build it (its class, betas, eps, 8-bit or paged
        # state), given LoRA+'s parameter groups; train.weight_decay set on the groups, where peft's
        # default of 0 would otherwise override it.
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs.pop("lr", None)
        optimizer = create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                              loraplus_weight_decay=cfg.weight_decay, **kwargs)
    # TRL tokenises (chat template, completion mask, truncation) in SFTTrainer.__init__; the
    # trials of a sweep that share data, tokenizer and length reuse its output. Not with
    # packing: TRL would pack already-packed rows again.
    key = (data.fingerprint, tokenizer.name_or_path, cfg.max_seq_length)
    cached = None if cfg.packing else _TOKENIZED.get(key)
    train_rows, eval_rows = cached or (Dataset.from_list(data.trl_rows("train")),
                                       Dataset.from_list(data.trl_rows("held_out")))
    if cached:  # TRL's own output: its preparation pass would only check it again (~0.4 s a trial)
        args.dataset_kwargs = {"skip_prepare_dataset": True}
    adapters = {param: param.data for param in model.parameters() if param.requires_grad}
    with datasets_progress_bars_off():
        trainer = completion_only_trainer_class()(
            model=model,
            args=args,
            optimizers=(optimizer, None),
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            processing_class=tokenizer,
            callbacks=callbacks or [],
        )
    # SFTTrainer casts a quantized model's adapters to bf16 (TRL 1.16): back to the tensors that
    # add_adapter made, in peft.adapter_dtype. In bf16 the master weights and AdamW's states would
    # round small updates away; the matmuls compute in bf16 anyway, under autocast (compute_loss).
    for param, data in adapters.items():
        param.data = data
    if not cfg.packing:
        _TOKENIZED.clear()  # one entry: a sweep over data or models must not pile them up
        _TOKENIZED[key] = (trainer.train_dataset, trainer.eval_dataset)
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(quiet_progress_callback())
    before = RunTotals.of_checkpoint(resume_from)
    trainer.ftlab_before, trainer._total_train_tokens = before, before.tokens
    with stop_on_signals() as stopper:
        with PeakMemory() as peak:
            trainer.add_callback(stopper.callback())  # last, so a signal sent by an earlier callback stops this step
            trainer.ftlab_peak, trainer.ftlab_stopper = peak, stopper
            start = trainer.ftlab_start = time.perf_counter()
            if _training_ended(resume_from, before):  # the Trainer, resumed at its last step, would train one more
                from transformers import TrainerState

                trainer._load_from_checkpoint(str(resume_from))
                trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
                training_loss = 0.0
            else:
                try:
                    training_loss = trainer.train(
                        resume_from_checkpoint=str(resume_from) if resume_from else None).training_loss
                except BaseException:
                    _close_progress_bars(trainer)  # closed later, the bar is drawn again under the error's message
                    raise
            seconds = before.seconds + time.perf_counter() - start
        tokens = _trained_tokens(trainer)
        steps = trainer.state.global_step
        train_loss = (training_loss * (steps - before.step) + before.loss_sum) / max(steps, 1)
        peak_mb = max(before.peak_mb, peak.peak_mb)
        # Not ended by a signal before its last step (a time cap or its own end): resuming trains nothing more.
        ended = stopper.signal_name is None or steps >= trainer.state.max_steps
        # Still under the signal handlers: a signal now (seconds of saving on a real model) waits for this
        # checkpoint, then stops the run with it, instead of cutting the save off and losing the training.
        end_checkpoint = _save_end_of_training(trainer, RunTotals(steps, train_loss * steps, tokens, seconds,
                                                                  peak_mb), ended)
    checkpoint = last_checkpoint(out_dir)
    checkpoint = checkpoint.resolve() if checkpoint else None  # named in tags, read from any directory
    if stopper.signal_name is not None:
        raise TrainingInterrupted(f"interrupted by {stopper.signal_name} at step {steps}; checkpoint saved in "
                                  f"{checkpoint}", stopper.signal_name, checkpoint, steps)
    with resumable_after_training(checkpoint, steps):
        with many_row_4bit(model):
            eval_loss = trainer.evaluate()["eval_loss"]
        saved_dir = None
        if cfg.save_adapter:
            saved_dir = out_dir / trained_artifact(full_fine_tune=not hasattr(trainer.model, "peft_config"))
            trainer.model.save_pretrained(saved_dir, safe_serialization=True)
            tokenizer.save_pretrained(saved_dir)
    return TrainResult(
        saved_dir=saved_dir,
        train_loss=train_loss,
        eval_loss=eval_loss,
        train_seconds=seconds,
        trained_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        peak_memory_mb=peak_mb,
        peak_memory_kind=peak.kind,
        steps=steps,
        log_history=list(trainer.state.log_history),
        end_checkpoint=end_checkpoint,
    )


def _training_ended(checkpoint: Path | None, totals: RunTotals) -> bool:
    """Whether a run resumed from `checkpoint` has no step left to train."""
    if checkpoint is None or totals.step == 0:  # none, or one from an older ftlab: resumed as the Trainer does
        return False
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return totals.end_of_training or state["global_step"] >= state["max_steps"]


def _save_end_of_training(trainer, totals: RunTotals, ended: bool) -> Path | None:
    """Make the checkpoint of the last step one that an interrupt or crash while the run is
    evaluated and scored (minutes on a real model) resumes from without training again: saved
    now, unless the Trainer saved this step (train.save_steps, a signal). Returns the checkpoint
    to remove once the run is logged: one saved only for this (now or by the run resumed here)."""
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{totals.step}"
    if (checkpoint / "trainer_state.json").is_file():
        saved = RunTotals.of_checkpoint(checkpoint, warn=False)
        if ended and saved.step and not saved.end_of_training:
            dataclasses.replace(saved, end_of_training=True).write(checkpoint)
        return checkpoint if saved.transient else None
    if not ended:
        return None
    limit, trainer.args.save_total_limit = trainer.args.save_total_limit, None  # rotates out no kept checkpoint
    try:
        trainer._save_checkpoint(trainer.model, None)
        dataclasses.replace(totals, end_of_training=True, transient=True).write(checkpoint)  # the Trainer's are final
        # As the Trainer's own saves do: the run's tag ftlab.checkpoint names it (absolute), so a resume
        # from another working directory finds it.
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    except OSError as e:  # a full disk: the trained model is still in memory, to be scored
        log.warning("could not save the end-of-training checkpoint %s (%s): an interrupt while scoring will need "
                    "training again", checkpoint, e)
        shutil.rmtree(checkpoint, ignore_errors=True)
        return None
    finally:
        trainer.args.save_total_limit = limit
    return checkpoint


def remove_transient_checkpoints(out_dir: Path) -> None:
    """Once a run is logged: the checkpoints saved only to resume from (RunTotals.transient) are
    removed; those train.save_steps asked for are kept. The run's ftlab.checkpoint tag follows."""
    import mlflow

    for checkpoint in Path(out_dir).glob("checkpoint-*"):
        if RunTotals.of_checkpoint(checkpoint, warn=False).transient:
            shutil.rmtree(checkpoint, ignore_errors=True)
    try:
        if remaining := last_checkpoint(Path(out_dir)):
            mlflow.set_tag("ftlab.checkpoint", str(remaining.resolve()))
        elif "ftlab.checkpoint" in mlflow.get_run(mlflow.active_run().info.run_id).data.tags:
            mlflow.MlflowClient().delete_tag(mlflow.active_run().info.run_id, "ftlab.checkpoint")
    except Exception as e:  # a tracking hiccup must not fail a run whose results are logged
        log.warning("could not update the run's ftlab.checkpoint tag (%s)", e)


def _trained_tokens(trainer) -> int:
    """Real (non-padding) tokens seen in training: TRL counts them as it goes (from the resumed
    checkpoint's count, train()). Not the last log entry's: a run resumed at its last step, which
    the Trainer saved before logging it, has no entry for that step."""
    if getattr(trainer, "_total_train_tokens", 0):
        return int(trainer._total_train_tokens)
    for entry in reversed(trainer.state.log_history):
        if "num_tokens" in entry:
            return int(entry["num_tokens"])
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    return int(sum(lengths) * math.ceil(trainer.args.num_train_epochs))
