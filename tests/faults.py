"""Fault injection for reliability tests, plugged in the way users add callbacks:
`train.callbacks=[{_target_: tests.faults.RaiseAtStep, step: 2}]`."""
from transformers import TrainerCallback


class RaiseAtStep(TrainerCallback):
    def __init__(self, step: int = 1, message: str = "injected failure"):
        self.step, self.message = step, message

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise RuntimeError(f"{self.message} at step {state.global_step}")
