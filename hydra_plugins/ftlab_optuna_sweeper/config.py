"""Settings of hydra/sweeper=optuna; the objective itself is the ftlab config's
sweep.objective / sweep.direction, shared with grid sweeps."""
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

# Hydra's plugin scan imports this module wherever a config is composed: ftlab's structured-config
# schema (config.yaml's `ftlab_schema` default) is registered with it, so compose("config")
# works in a process that has not imported ftlab itself (a test's fresh interpreter, a notebook).
import ftlab.config  # noqa: F401


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.ftlab_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    sampler: str = "tpe"  # tpe | random | grid | cmaes
    seed: Optional[int] = None
    # Trials that reach a verdict (COMPLETE, or PRUNED for being over budget); failed and
    # crashed trials are replaced. A grid sampler also stops when its grid is exhausted.
    n_trials: int = 20
    n_jobs: int = 1  # trials handed to the launcher at once (parallel with hydra/launcher=joblib)
    # Stop after this many failed trials (default: max(n_trials, 10)), so a config that
    # always crashes cannot loop forever.
    max_failed_trials: Optional[int] = None
    # Any SQLAlchemy URL; null: sqlite under ./mlruns. Workers sharing it share the study.
    storage: Optional[str] = None
    # null: derived from the command's overrides, so the same command resumes its study.
    study_name: Optional[str] = None
    # A trial whose worker stops sending heartbeats for grace_period seconds is failed
    # (and its MLflow run marked KILLED) by the next worker that starts or asks for a trial.
    heartbeat_interval: int = 30
    grace_period: Optional[int] = None  # null: 2 x heartbeat_interval
    # Search space in Hydra's sweep syntax, e.g. {lora_r: "choice(8,16,64)", lr: "tag(log, interval(1e-5,1e-3))"};
    # sweep overrides on the command line are added to it.
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="ftlab")
