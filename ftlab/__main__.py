"""`python -m ftlab`: one run; `python -m ftlab -m ...`: a sweep."""
import sys

import hydra
from omegaconf import DictConfig

from ftlab.checkpoints import exit_on_interrupt
from ftlab.config import ConfigError, exit_2_on  # and registers the structured-config schema


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    # Imported once Hydra has composed and checked the config: a mistyped key is reported
    # before ~8 s of importing torch, transformers, peft and MLflow, not after.
    from ftlab import sweep, tracking
    from ftlab.data import DataError
    from ftlab.pipeline import run
    from ftlab.tracking import TrackingError

    # In a sweep, only what every trial shares gets this far: bad data, sweep.objective.
    with exit_2_on(DataError, ConfigError, TrackingError):
        if sweep.in_multirun():
            return sweep.run_trial(cfg, run)  # a failed trial is recorded, and the sweep goes on
        try:
            return run(cfg)
        except Exception as e:
            if tracking.failure_kind(e) != "oom":
                raise
            # What to change, not a traceback of the step (a run that started is recorded FAILED, failure_kind oom).
            cap = ", or raise budget.memory_cap_gb" if cfg.budget.memory_cap_gb else ""
            remedy = getattr(e, "remedy", None)  # "": the message says it already
            if remedy is None:
                remedy = ("lower train.per_device_batch_size or train.max_seq_length, or set budget.vram_gb and "
                          f"budget.fit=auto_batch{cap}")
            print(f"ftlab: {(str(e).splitlines() or [type(e).__name__])[0]}{f': {remedy}' if remedy else ''}",
                  file=sys.stderr)
            raise SystemExit(1) from None


if __name__ == "__main__":
    with exit_on_interrupt():  # outside Hydra, so a sweeper sees the interrupt and stops as it should
        main()
