"""`python -m ftlab`: one run; `python -m ftlab -m ...`: a sweep."""
import hydra
from omegaconf import DictConfig

import ftlab.config  # noqa: F401  (registers the structured-config schema)
from ftlab.data.records import exit_on_data_error
from ftlab.pipeline import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    with exit_on_data_error():
        return run(cfg).get("rouge_l", float("nan"))


if __name__ == "__main__":
    main()
