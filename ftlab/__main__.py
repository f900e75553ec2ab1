"""`python -m ftlab`: one run; `python -m ftlab -m ...`: a sweep."""
import hydra
from omegaconf import DictConfig

import ftlab.config  # noqa: F401  (registers the structured-config schema)
from ftlab import sweep
from ftlab.data.records import exit_on_data_error
from ftlab.pipeline import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    with exit_on_data_error():  # bad data is the same for every trial: stop, even in a sweep
        if sweep.in_multirun():
            return sweep.run_trial(cfg, run)  # a failed trial is recorded, and the sweep goes on
        return run(cfg)


if __name__ == "__main__":
    main()
