"""hydra/sweeper=optuna as Hydra finds it. Hydra imports every plugin module on every command
(a single run, a registry command), so Optuna and the sweeper itself (_impl.py) are imported
only when a sweep is set up, as hydra-optuna-sweeper does: ~0.15 s off each command."""
from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:  # the fields of config.OptunaSweeperConf
        from hydra_plugins.ftlab_optuna_sweeper._impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.sweeper.sweep(arguments)
