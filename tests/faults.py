"""Fault injection for reliability tests, plugged in the way users add callbacks:
`train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 2}]`."""
from transformers import TrainerCallback


class RaiseAtStep(TrainerCallback):
    def __init__(self, step: int = 1, message: str = "injected failure"):
        self.step, self.message = step, message

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise RuntimeError(f"{self.message} at step {state.global_step}")


class SignalAtStep(TrainerCallback):
    """Send a signal (default SIGTERM) to this very process at the end of a step, as `kill` would."""

    def __init__(self, step: int = 1, signal: str = "SIGTERM"):
        self.step, self.signal, self.sent = step, signal, False

    def on_step_end(self, args, state, control, **kwargs):
        import os
        import signal

        if state.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))
