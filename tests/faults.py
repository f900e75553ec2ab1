"""Fault injection for reliability tests, plugged in the way users add callbacks:
`train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 2}]`."""
from transformers import TrainerCallback


class RaiseAtStep(TrainerCallback):
    def __init__(self, step: int = 1, message: str = "injected failure"):
        self.step, self.message = step, message

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise RuntimeError(f"{self.message} at step {state.global_step}")


class FailOnTrial(TrainerCallback):
    """Fail chosen trials of a sweep at their first step: `raise_on` with an exception,
    `oom_on` through the real memory cap (budget.memory_cap_gb's check, with a tiny cap).
    Pass the trial as `trial: ${sweep.trial_number}`."""

    def __init__(self, trial: int, raise_on=(), oom_on=()):
        from ftlab.train import memory_cap_callback

        self.trial, self.raise_on, self.oom_on = trial, list(raise_on), list(oom_on)
        self.cap = memory_cap_callback(0.001)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trial in self.raise_on:
            raise RuntimeError(f"injected failure in trial {self.trial}")
        if self.trial in self.oom_on:
            self.cap.on_step_end(args, state, control, **kwargs)


class KillOnce(TrainerCallback):
    """SIGKILL the whole process the first time trial `trial` reaches `at` (mid_training:
    after its first step; before_eval: when training ends, before held-out scoring).
    A marker file makes it fire once, so the re-run goes through."""

    def __init__(self, trial: int, kill_trial: int, at: str, marker: str):
        self.fire = trial == kill_trial
        self.at, self.marker = at, marker

    def _kill(self):
        import os
        import signal
        from pathlib import Path

        if self.fire and not Path(self.marker).exists():
            Path(self.marker).write_text("fired")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, **kwargs):
        if self.at == "mid_training":
            self._kill()

    def on_train_end(self, args, state, control, **kwargs):
        if self.at == "before_eval":
            self._kill()
