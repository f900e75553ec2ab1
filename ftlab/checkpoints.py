"""Interrupt-safe training: the first SIGINT/SIGTERM finishes the current optimizer step,
saves a normal HF Trainer checkpoint and stops; a second one aborts at once. Outside training,
SIGTERM (`kill`, a scheduler's preemption) is raised as Ctrl-C is, so runs end KILLED and a
sweep stops cleanly. And the other half: finding the checkpoint a resumed run continues from,
never silently from zero.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ftlab.config import ConfigError

log = logging.getLogger("ftlab")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run or sweep stopped by SIGINT/SIGTERM. A KeyboardInterrupt, so the trial's MLflow run
    ends KILLED and Hydra's sweepers stop, as on Ctrl-C."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name


class TrainingInterrupted(Interrupted):
    """Training stopped on a signal after saving a checkpoint (when there was a step to save).
    `summary` says what happened; the message adds how a single run continues."""

    def __init__(self, summary: str, signal_name: str, checkpoint: Path | None, step: int):
        hint = "; continue with the same command plus train.resume=true" if checkpoint else ""
        super().__init__(summary + hint, signal_name)
        self.summary, self.checkpoint, self.step = summary, checkpoint, step


def _raise_interrupted(signum, frame):
    name = signal.Signals(signum).name
    raise Interrupted(f"interrupted by {name}", name)


@contextmanager
def exit_on_interrupt():
    """Entry points: SIGTERM is raised like Ctrl-C for the duration of the block, and either
    ends the command with one line, `ftlab: <what stopped and how to continue>`, and the shell's
    exit status for the signal (130 for SIGINT, 143 for SIGTERM) instead of a traceback."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main else None
    try:
        yield
    except KeyboardInterrupt as e:
        name = getattr(e, "signal_name", "SIGINT")
        print(f"ftlab: {str(e) or f'interrupted by {name}'}", file=sys.stderr)
        raise SystemExit(128 + signal.Signals[name].value) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def resumable_after_training(checkpoint: Path | None, step: int):
    """An interrupt once training has finished (evaluating, scoring, logging) says how to continue:
    from the checkpoint of its last step, which trains nothing again. Yields raise_if_interrupted: a
    signal's KeyboardInterrupt raised inside a __del__ (a regex's, during scoring) is printed and
    dropped by Python, and the run went on to finish; the signal is remembered, and raised there
    (and once the block ends) instead."""
    received: list[str] = []

    def interrupt(signum, frame):
        received.append(signal.Signals(signum).name)
        raise_if_interrupted()

    def raise_if_interrupted():
        if received:
            raise Interrupted(f"interrupted by {received[-1]}", received[-1])

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS} if main else {}
    try:
        yield raise_if_interrupted
        raise_if_interrupted()
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt as e:
        name = getattr(e, "signal_name", "SIGINT")
        raise TrainingInterrupted(f"interrupted by {name} after training finished, before the run was scored and "
                                  f"logged; checkpoint of its last step: {checkpoint}", name, checkpoint, step) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class ResumeError(ConfigError):
    """train.resume was asked for but there is nothing (of this config) to resume from."""


class StopOnSignal:
    """A TrainerCallback plus the signal handler that feeds it.

    The handler only records the signal; the callback turns it into should_save +
    should_training_stop at the end of the optimizer step, so the checkpoint is consistent."""

    def __init__(self):
        self.signal_name: str | None = None

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            raise Interrupted(f"second {name} while saving after {self.signal_name}: aborted without a checkpoint", name)
        self.signal_name = name
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping (send it again to abort)",
                    name)

    def callback(self):
        from transformers import TrainerCallback

        stopper = self

        class SaveAndStop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stopper.signal_name is not None:
                    control.should_save = True
                    control.should_training_stop = True

        return SaveAndStop()


@contextmanager
def stop_on_signals():
    """Install StopOnSignal for SIGINT/SIGTERM for the duration of the block, then put the
    previous handlers back (outside training, Ctrl-C keeps its usual meaning)."""
    stopper = StopOnSignal()
    if threading.current_thread() is not threading.main_thread():
        yield stopper  # Python delivers signals to the main thread only
        return
    previous = {s: signal.signal(s, stopper.handle) for s in STOP_SIGNALS}
    try:
        yield stopper
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a save cut
    off (a second Ctrl-C, a kill) leaves a newer directory without it, which resuming would fail
    on every time; the one before it is kept for this (train.save_total_limit)."""
    steps = sorted((checkpoint_step(p), p) for p in run_dir.glob("checkpoint-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()) if run_dir.is_dir() else []
    for _, checkpoint in reversed(steps):
        if (checkpoint / "trainer_state.json").is_file():
            return checkpoint
        log.warning("skipping %s: its save was cut off (no trainer_state.json)", checkpoint)
    return None


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


@dataclass
class ResumePoint:
    run_id: str  # the MLflow run that continues
    checkpoint: Path | None  # None: from zero (a sweep's trial interrupted before its first checkpoint)
    step: int


def find_resume_point(candidates: dict[str, Path | None], output_dir: Path, what: str) -> ResumePoint:
    """The newest candidate run (run id -> the folder it recorded saving checkpoints in, or None;
    newest first) whose output_dir/<run id>, or that folder, holds a checkpoint. `what` describes
    how the candidates were chosen, for the error message."""
    looked = []
    for run_id, recorded in candidates.items():
        for run_dir in dict.fromkeys(d for d in (output_dir / run_id, recorded) if d is not None):
            checkpoint = last_checkpoint(run_dir)
            if checkpoint is not None:
                return ResumePoint(run_id, checkpoint, checkpoint_step(checkpoint))
            looked.append(str(run_dir))
    where = ("looked for checkpoint-* in " + ", ".join(looked)) if looked else "found no such run"
    raise ResumeError(
        f"train.resume: nothing to resume from ({what}; {where}). Checkpoints are written when a run is "
        "interrupted (SIGINT/SIGTERM) and every train.save_steps steps. Drop train.resume to start from zero."
    )
