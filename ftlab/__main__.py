"""`python -m ftlab`: one run; `python -m ftlab -m ...`: a sweep."""
import sys

import hydra
from omegaconf import DictConfig

from ftlab.config import ConfigError  # and registers the structured-config schema


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    # Imported once Hydra has composed and checked the config: a mistyped key is reported
    # before ~8 s of importing torch, transformers, peft and MLflow, not after.
    from ftlab import sweep
    from ftlab.data.records import exit_on_data_error
    from ftlab.pipeline import run

    try:
        with exit_on_data_error():  # bad data is the same for every trial: stop, even in a sweep
            if sweep.in_multirun():
                return sweep.run_trial(cfg, run)  # a failed trial is recorded, and the sweep goes on
            return run(cfg)
    except ConfigError as e:  # the config's to fix, like bad data: a message (exit 2), not a traceback;
        print(f"ftlab: {e}", file=sys.stderr)  # in a sweep, one that every trial shares (sweep.objective)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
