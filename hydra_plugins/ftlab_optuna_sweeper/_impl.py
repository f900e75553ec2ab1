"""The Optuna sweeper: Hydra's sweep syntax (choice, range, interval, tag(log, ...)) turned
into Optuna distributions, trials asked in batches of n_jobs and launched by any Hydra
launcher, told back as COMPLETE / PRUNED (over the VRAM budget) / FAIL, in a persistent
storage that resumed runs and extra workers share. Structure follows hydra-optuna-sweeper
1.2's _impl.py, rewritten for Optuna >= 4 (that plugin pins optuna < 3). optuna_sweeper.py is
the class Hydra finds, which imports this module only when a sweep uses it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, List, Optional, Sequence

import mlflow
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import OverrideParseException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ftlab import sweep as ftlab_sweep
from ftlab import tracking
from ftlab.config import SweepConfigError, check_objective, exit_2_on

log = logging.getLogger(__name__)
BUDGET_CONSTRAINT = "budget_excess_gb"  # Optuna constraint: GiB over budget.vram_gb (or the OOM cap), feasible <= 0
# A sampler that asks this many times in a row only for configs already decided has run out of new ones.
MAX_REPEATS_IN_A_ROW = 50
# What a worker hits when another creates Optuna's tables at the same moment; anything else
# (no such file or database, a refused login) is said at once.
CREATION_RACE = ("already exists", "duplicate", "unique", "locked", "deadlock")


def quiet_optuna_warnings() -> None:
    """Ask-and-tell with heartbeats is fine here: OptunaSweeper.heartbeats sends them, which is
    all study.optimize would add; fail_stale_trials has been stable since Optuna 2.9. (Set at
    sweep time: Hydra restores warning filters after importing plugins.)"""
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def distribution(override: Override) -> BaseDistribution:
    """An Optuna distribution from one sweep override. range() is exclusive of its stop,
    as everywhere in Hydra; interval() is continuous; tag(log, ...) samples in log space,
    tag(int, interval(...)) the integers inside the interval. Bounds Optuna refuses (low above
    high, an empty range, log with low <= 0) are a SweepConfigError naming the override."""
    try:
        return _distribution(override)
    except ValueError as e:
        raise SweepConfigError(f"{override.input_line}: {e}") from None


def _distribution(override: Override) -> BaseDistribution:
    value = override.value()
    key = override.get_key_element()
    if override.is_choice_sweep():  # a repeated choice is one config: the study would count it twice and never end
        return CategoricalDistribution(list(dict.fromkeys(override.sweep_iterator(transformer=Transformer.encode))))
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        if value.shuffle or any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
        step = int(value.step)
        if not (n := len(range(int(value.start), int(value.stop), step))):
            raise ValueError("the range holds no values (its stop is excluded)")
        return IntDistribution(int(value.start), int(value.start) + (n - 1) * step, step=step)
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if "int" in value.tags:
            if value.start <= value.end and math.ceil(value.start) > math.floor(value.end):  # not of the rounded ends
                raise ValueError(f"no whole number lies in [{value.start:g}, {value.end:g}]")
            return IntDistribution(math.ceil(value.start), math.floor(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweepConfigError(f"{key}: unsupported sweep {override.input_line!r}; use choice(...), range(...), "
                           f"interval(a,b) or tag(log, interval(a,b))")


def finite_values(dist: BaseDistribution) -> Sequence | None:
    """Every value a parameter can take (a range, not a list: an int interval may be huge), or
    None when it is continuous."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices
    if isinstance(dist, IntDistribution):
        return range(dist.low, dist.high + 1, dist.step)
    return None


def probe_values(dist: BaseDistribution) -> Sequence:
    """Values checked before the study starts (ftlab.sweep.check_swept_values): every choice, the
    two ends of a range, and just inside the two ends of an interval, which samplers do not return
    (interval(0.0,1.0) for a dropout below 1 is fine)."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices
    if isinstance(dist, FloatDistribution) and dist.step is None and dist.low < dist.high:
        return [math.nextafter(dist.low, dist.high), math.nextafter(dist.high, dist.low)]
    return sorted({dist.low, dist.high})


def in_space(params: dict[str, Any], space: dict[str, BaseDistribution]) -> bool:
    """Whether queued params (a retry) are still a config of this search space."""
    if set(params) != set(space):
        return False
    try:
        return all(dist._contains(dist.to_internal_repr(params[name])) for name, dist in space.items())
    except ValueError:  # a choice the space no longer has
        return False


def grid_values(name: str, dist: BaseDistribution) -> list:
    if (values := finite_values(dist)) is None:
        raise SweepConfigError(f"hydra.sweeper.sampler=grid: {name} is an interval; give it as choice(...), range(...) "
                               "or tag(int, interval(...))")
    return list(values)


def space_size(space: dict[str, BaseDistribution]) -> int | None:
    """How many configs a search space holds; None when a parameter is continuous."""
    size = 1
    for dist in space.values():
        if (values := finite_values(dist)) is None:
            return None
        size *= len(values)
    return size


def decided(trials: list[optuna.trial.FrozenTrial], base: str | None = None) -> int:
    """Configs that reached a verdict (COMPLETE, or PRUNED over budget): what n_trials counts. A
    repeat told an earlier trial's outcome decided nothing new; failed trials are replaced. With
    `base`, only the configs sharing this sweep's config hash and data (reuse_earlier_outcome)."""
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "repeat_of" not in t.user_attrs
               and (base is None or t.user_attrs.get("config", [None])[0] == base) for t in trials)


def failures(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that failed (not those dropped as outside a changed search space)."""
    return sum(t.state == TrialState.FAIL and "dropped" not in t.user_attrs for t in trials)


def oom_override(study: optuna.Study) -> list[str]:
    """After an out-of-memory trial, later trials get budget.oom_at_gb: the smallest predicted
    peak that ran out of memory. Configs predicted at least that large are then skipped before
    they load anything and told back PRUNED with their excess as the trial's constraint, which
    TPE reads as infeasible (TPE ignores FAIL trials, so the OOM itself would not steer it)."""
    ooms = [t.user_attrs["predicted_peak_gb"] for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if t.user_attrs.get("failure_kind") == "oom" and "predicted_peak_gb" in t.user_attrs]
    return [f"budget.oom_at_gb={min(ooms)!r}"] if ooms else []


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, after_crash: bool = False) -> None:
    """Queue an interrupted trial's params to be asked first, by this sweep's next run or by
    another worker: the same config continues its MLflow run from its last checkpoint
    (ftlab.pipeline) instead of the sampler moving on and the work done being lost.
    after_crash: its worker died (no heartbeat), which is retried once, not again and again."""
    attrs = {"retry_of": trial.number, **({"retry_after_crash": True} if after_crash else {})}
    study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)
    log.info("trial %d: its params are queued to run again (%s)", trial.number, trial.params)


# What a repeated config takes over from the trial that ran it (see reuse_earlier_outcome).
REUSED_ATTRS = ("mlflow_run_id", "state", "skip_reason", "predicted_peak_gb", "budget_excess_gb")


def reuse_earlier_outcome(study: optuna.Study, trial: optuna.Trial, config: list[str]) -> bool:
    """Tell a trial the outcome of an earlier COMPLETE or PRUNED trial with the same config
    instead of running it: the same config and seed train the same run, and samplers repeat
    configs once a small space is used up (TPE over choice(8,16) asks a third time). This is
    Optuna's FAQ recipe for duplicate suggestions. Failed trials are not reused (a failure may
    be transient). `config` (the shared config's hash and the trial's params) is recorded on
    every trial that runs, so a study resumed with other settings or edited data reuses nothing."""
    trial.set_user_attr("config", config)
    earlier = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                    if t.user_attrs.get("config") == config and "repeat_of" not in t.user_attrs), None)
    if earlier is None:
        return False
    for key in REUSED_ATTRS:
        if key in earlier.user_attrs:
            trial.set_user_attr(key, earlier.user_attrs[key])
    trial.set_user_attr("repeat_of", earlier.number)
    for name, value in earlier.constraints.items():
        trial.set_constraint(name, value)
    tell(study, trial, earlier.values, state=earlier.state)
    log.info("trial %d repeats trial %d's config %s: its outcome reused, not run again", trial.number, earlier.number,
             trial.params)
    return True


def running_elsewhere(study: optuna.Study, trial: optuna.Trial, batch: list[optuna.Trial]) -> bool:
    """Drop a trial whose config an older trial of another worker is running (TPE and random
    samplers ask two workers for the same config): end it FAIL, marked dropped (no failure
    counted), and ask again, instead of training that config twice at once. The older one runs:
    two workers asking together do not both drop it."""
    config, numbers = trial.user_attrs["config"], {t.number for t in batch}
    twin = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if t.number < trial.number and t.number not in numbers and t.user_attrs.get("config") == config),
                None)
    if twin is None:
        return False
    trial.set_user_attr("dropped", f"its config was running in trial {twin.number}")
    tell(study, trial, state=TrialState.FAIL)
    log.info("trial %d: its config %s is running in trial %d (another worker); asking for another", trial.number,
             trial.params, twin.number)
    return True


def finished_in_batch(sweep_id: str, number: int, launched_ms: int):
    """The MLflow run trial `number` finished in the batch launched at `launched_ms`, if it did
    (an earlier study under the same name may have had a trial of that number). None too when the
    store cannot say: it may be what stopped the sweep, and that error is the one to report."""
    try:
        run = tracking.finished_trial_number(sweep_id, number)
    except Exception as e:
        log.warning("could not read trial %d's run from the tracking store (%s): told FAIL", number, e)
        return None
    return run if run is not None and (run.info.end_time or 0) >= launched_ms else None


def check_objective_against_study(study: optuna.Study, objective: list[str], direction: list[str]) -> None:
    """A study continued with another sweep.objective or sweep.direction would mix the values of two
    questions (the sampler steering by both, the best trial chosen among both): refused before any
    trial. A study made before ftlab recorded its objective is checked by its directions."""
    then, ways = study.user_attrs.get("ftlab.objective"), [d.name.lower() for d in study.directions]
    if ways != direction or then not in (None, objective):
        asked = ", ".join(f"{name} ({way})" for name, way in zip(objective, direction))
        had = ", ".join(f"{name} ({way})" for name, way in zip(then, ways)) if then else ", ".join(ways)
        raise SweepConfigError(f"sweep.objective: study {study.study_name} optimises {had}, and this command asks "
                               f"for {asked}; keep the study's, or name a new sweep (sweep.name=...)")
    if then is None:
        study.set_user_attr("ftlab.objective", objective)


def outcome_of(ret) -> dict[str, Any]:
    """A launcher's JobReturn as ftlab.sweep.run_trial's outcome."""
    if ret.status == JobStatus.FAILED:  # raised outside ftlab's trial wrapper (e.g. a bad override)
        return {"state": "failed", "error": f"{type(ret._return_value).__name__}: {ret._return_value}",
                "failure_kind": "exception", "metrics": {}}
    return ret.return_value


def tell(study: optuna.Study, trial: optuna.Trial, values=None, state: TrialState | None = None) -> None:
    """study.tell that tolerates GridSampler calling study.stop() once its grid is done:
    stop() only works inside study.optimize. Optuna stores the trial's state in a finally
    block after the sampler's hook, so nothing is lost; the sweep loop checks is_exhausted."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


class OptunaSweeperImpl(Sweeper):
    def __init__(self, sampler: str, seed: Optional[int], n_trials: int, n_jobs: int,
                 max_failed_trials: Optional[int], storage: Optional[str], study_name: Optional[str],
                 heartbeat_interval: int, grace_period: Optional[int], params: dict) -> None:
        self.sampler_name, self.seed = sampler, seed
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.max_failed_trials = max_failed_trials or max(n_trials, 10)
        self.storage_url, self.study_name = storage, study_name
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.params = dict(params or {})
        self.space_lines: dict[str, str] = {}  # each swept key's override as written
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    # ------------------------------------------------------------------ setup helpers

    def search_space(self, arguments: List[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
        parser = OverridesParser.create()
        from_config = []
        for key, value in self.params.items():  # a sweeps/ file's lines: Hydra's parse error names neither
            try:
                from_config += parser.parse_overrides([f"{key}={value}"])
            except OverrideParseException as e:
                typed = any(line.startswith(f"hydra.sweeper.params.{key}=") for line in self.config.hydra.overrides.hydra)
                chosen = None if typed else self.config.hydra.runtime.choices.get("sweeps")
                where = f" (sweeps/{chosen}.yaml)" if chosen else ""
                raise SweepConfigError(f"hydra.sweeper.params.{key}={value!r}{where}: "
                                       f"{str(e).splitlines()[0]}") from None
        space, fixed = {}, []
        for override in [*from_config, *parser.parse_overrides(arguments)]:
            if override.is_sweep_override():
                space[override.get_key_element()] = distribution(override)
                self.space_lines[override.get_key_element()] = override.input_line
            else:
                fixed.append(override.input_line)
        if not space:
            raise SweepConfigError("hydra/sweeper=optuna: no search space; add e.g. lora_r='choice(8,16,64)' on the "
                                   "command line or hydra.sweeper.params in a sweeps/ config")
        return space, fixed

    def make_sampler(self, space: dict, n_objectives: int, seed: Optional[int]) -> optuna.samplers.BaseSampler:
        name = self.sampler_name
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed)  # reads each trial's budget constraint
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "grid":
            return optuna.samplers.GridSampler({k: grid_values(k, d) for k, d in space.items()}, seed=seed)
        if name == "cmaes":
            if n_objectives > 1:
                raise SweepConfigError("hydra.sweeper.sampler=cmaes optimises one objective; use tpe for several")
            return optuna.samplers.CmaEsSampler(seed=seed)
        raise SweepConfigError(f"hydra.sweeper.sampler={name}: expected tpe, random, grid or cmaes")

    def make_storage(self, sweep_id: str, space: dict[str, BaseDistribution]) -> optuna.storages.RDBStorage:
        url = self.storage_url
        if url is None:  # beside a SQLite MLflow store, so the same command continues it from any directory
            database = tracking.sqlite_file(mlflow.get_tracking_uri())
            folder = database.parent if database is not None else Path("mlruns")
            folder.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{(folder / 'optuna.db').resolve()}"
        shown, url = self.storage_url or url, tracking.installed_driver(url)

        def unusable(given: str, reason: object) -> SweepConfigError:
            return SweepConfigError(f"hydra.sweeper.storage={tracking.mask(given)}: {reason}")

        # Several workers on one SQLite file wait for the lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        if not url.startswith("sqlite"):  # a wrong database or a stopped server: said in seconds, not retried
            tracking.probe_database(url, shown, unusable=unusable)

        def mark_mlflow_run_killed(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            killed = tracking.mark_killed(sweep_id, trial.number)
            log.warning("trial %d of %s had no heartbeat for %ss: FAIL in Optuna, MLflow run(s) %s KILLED",
                        trial.number, study.study_name, self.grace_period or 2 * self.heartbeat_interval, killed)
            if trial.user_attrs.get("retry_after_crash"):  # once: a config that crashes its worker must not loop
                log.warning("trial %d: its config was retried after a crash already; not queued again", trial.number)
                return
            if in_space(trial.params, space):
                retry(study, trial, after_crash=True)
            else:
                log.warning("trial %d: its params %s are outside this search space; not queued again", trial.number,
                            trial.params)

        for attempt in range(5):  # workers starting together race to create the tables
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=self.heartbeat_interval,
                    grace_period=self.grace_period, heartbeat_stale_trial_callback=mark_mlflow_run_killed)
            except Exception as e:
                reason = " ".join(str(e).split("(Background on this error")[0].split())  # one line, no link
                if attempt == 4 or not any(race in reason.lower() for race in CREATION_RACE):
                    raise unusable(shown, reason) from e
                time.sleep(1 + attempt)

    # ------------------------------------------------------------------ the sweep

    def sweep(self, arguments: List[str]) -> Any:
        with exit_2_on(SweepConfigError):  # a search space, sampler or storage that cannot work: one line
            try:
                return self.run_study(arguments)
            except Exception as e:  # Hydra skips on_multirun_end after an error: end the parent run here
                # A SweepConfigError is raised only by the checks ahead of the first trial (run_study).
                ftlab_sweep.end_sweep(self.config, e, "FAILED", before_any_trial=isinstance(e, SweepConfigError))
                raise

    def run_study(self, arguments: List[str]) -> optuna.Study:
        quiet_optuna_warnings()
        if command := ftlab_sweep.stage_command():
            raise SweepConfigError(f"python -m {command} runs no study: give it a grid (-m lora_r=8,16,64 "
                                   "lr=1e-4,2e-4) or one config, without hydra/sweeper=optuna")
        for key in ("n_trials", "n_jobs", "heartbeat_interval", "max_failed_trials", "grace_period"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise SweepConfigError(f"hydra.sweeper.{key}={value}: must be >= 1")
        space, fixed = self.search_space(arguments)
        objective, direction = list(self.config.sweep.objective), list(self.config.sweep.direction)
        check_objective(objective, direction, self.config.eval.compare_base)
        ftlab_sweep.check_swept_values(self.config.hydra.job.config_name, fixed,
                                       {name: probe_values(dist) for name, dist in space.items()},
                                       shown={k: self.space_lines[k] for k, d in space.items()
                                              if isinstance(d, FloatDistribution)})
        sweep_id = os.environ.get(ftlab_sweep.ENV_SWEEP_ID) or self.study_name or ftlab_sweep.sweep_id(self.config)
        storage = self.make_storage(sweep_id, space)
        sampler = self.make_sampler(space, len(objective), self.seed)
        study = optuna.create_study(study_name=sweep_id, storage=storage, sampler=sampler, directions=direction,
                                    load_if_exists=True)
        check_objective_against_study(study, objective, direction)
        reordered = self.check_space_against_study(study, space)
        if (self.seed is not None and study.trials) or reordered:
            # A seeded sampler starts its random stream over: a resumed sweep (or a later worker) would
            # ask first for the configs the study's first trials already ran. Go on with a seed of its own.
            # (A grid sampler numbers its points in the order of the choices: the study's order.)
            seed = self.seed + len(study.trials) if self.seed is not None else None
            sampler = study.sampler = self.make_sampler(space, len(objective), seed)
        log.info("Optuna study %s: %d trials wanted, %d in storage", sweep_id, self.n_trials, len(study.trials))
        parent = os.environ.get(ftlab_sweep.ENV_PARENT_RUN_ID)
        if not study.trials and parent and (ran := tracking.child_runs(parent)):
            raise SweepConfigError(
                f"sweep {sweep_id} has {len(ran)} trial run(s) in MLflow, but the Optuna storage "
                f"{tracking.mask(storage.url)} holds none of its trials, so every trial would run again: if this "
                "sweep ran with Optuna before, pass the storage it used as hydra.sweeper.storage=... (by default "
                "optuna.db beside a SQLite MLflow store, else ./mlruns/optuna.db where the command ran); to "
                "search beside another sweeper's trials, name a new sweep with sweep.name=...")
        self.drop_queued_outside(study, storage, space)
        # What every trial shares (config files, fixed overrides, the data file's content): a trial repeats
        # an earlier one only when this and its params match (reuse_earlier_outcome).
        base = "ftlab.config_hash=" + tracking.config_hash(
            OmegaConf.masked_copy(self.config, [k for k in self.config if k != "hydra"]))
        size, repeats_in_a_row = space_size(space), 0
        # max_failed_trials counts this run's failures: a study stopped by failures (a store that was down,
        # a bug since fixed) goes on when the same command is run again.
        failed_before = failures(study.get_trials(deepcopy=False))

        while True:
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            done = decided(trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            failed = failures(trials) - failed_before
            if done >= self.n_trials:
                break
            if size is not None and decided(trials, base) >= size:
                log.info("all configs of the search space (%d) are decided, before hydra.sweeper.n_trials=%d", size,
                         self.n_trials)
                break
            if repeats_in_a_row >= MAX_REPEATS_IN_A_ROW:
                log.warning("stopping: the sampler asked %d times in a row for configs already decided (or running "
                            "in other workers)", repeats_in_a_row)
                break
            if failed >= self.max_failed_trials:
                log.error("stopping: %d trials failed in this run of the sweep (hydra.sweeper.max_failed_trials=%d)",
                          failed, self.max_failed_trials)
                break
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study) \
                    and not any(t.state == TrialState.WAITING for t in trials):
                break  # (an interrupted config, queued to continue, is a grid point it counts as visited)
            free = self.n_trials - done - running
            if free <= 0:  # the rest is running in other workers (or in a crashed one, until it goes stale)
                time.sleep(min(5, self.heartbeat_interval))
                continue
            asked = self.claim(study, [study.ask(space) for _ in range(min(self.n_jobs, free))])
            params = {t.number: [f"{k}={v}" for k, v in t.params.items()] for t in asked}
            configs = {number: [base, *p] for number, p in params.items()}
            batch, twins = [], []  # twins: a config asked twice in this batch runs once, and they take its outcome
            for t in asked:
                if not reuse_earlier_outcome(study, t, configs[t.number]) and not running_elsewhere(study, t, asked):
                    (twins if any(configs[b.number] == configs[t.number] for b in batch) else batch).append(t)
            repeats_in_a_row = 0 if batch else repeats_in_a_row + len(asked)
            if not batch:
                continue
            oom = oom_override(study)  # one storage query per batch, not per trial
            overrides = [[*fixed, *params[t.number], f"sweep.trial_number={t.number}", *oom] for t in batch]
            launched_ms = int(time.time() * 1000)
            try:
                self.validate_batch_is_legal(overrides)
                with self.heartbeats(storage, [t._trial_id for t in batch + twins]):
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException as e:
                # Ctrl-C or SIGTERM (ftlab's entry point reports it and exits), or an error that stops the
                # sweep (SystemExit from a trial's config or data error): the trials end FAIL now, not RUNNING
                # until their heartbeat goes stale, except those that finished before it (the launcher's
                # returns are lost with the exception, MLflow has them). Only an interrupted config is
                # queued to run again.
                interrupted = isinstance(e, KeyboardInterrupt)
                reason = e.__context__ if isinstance(e, SystemExit) and e.__context__ else e  # exit_2_on's error
                # The MLflow store went away as a trial ended: its run stays RUNNING there, so the trial stays
                # RUNNING here, as after a crash: once its heartbeat is stale the next run of the sweep fails
                # it, ends the run KILLED and queues its params, which continue that run from its checkpoint.
                store_lost = isinstance(reason, tracking.StoreUnreachable)
                for trial in batch + twins:
                    if trial in batch and (run := finished_in_batch(sweep_id, trial.number, launched_ms)):
                        self.record(study, trial, {"state": "finished", "run_id": run.info.run_id,
                                                   "metrics": dict(run.data.metrics)}, objective)
                        continue
                    if trial in twins and reuse_earlier_outcome(study, trial, configs[trial.number]):
                        continue
                    if store_lost and trial in batch:
                        continue
                    trial.set_user_attr("failure_kind", "interrupted" if interrupted else "exception")
                    trial.set_user_attr("error", tracking.mask(f"{type(reason).__name__}: {reason}")[:2000])
                    tell(study, trial, state=TrialState.FAIL)
                    if interrupted and trial in batch:  # a twin's config is queued with the trial that ran it
                        retry(study, study.get_trials(deepcopy=False)[trial.number])
                raise
            self.job_idx += len(returns)
            for trial, ret in zip(batch, returns):
                try:
                    self.record(study, trial, outcome_of(ret), objective)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # Another worker saw no heartbeat within grace_period and failed it; its
                    # replacement is already counted, so this result stays in MLflow only.
                    log.warning("trial %d was failed as stale by another worker while it ran; raise "
                                "hydra.sweeper.grace_period (now %ss) if workers are this busy", trial.number,
                                self.grace_period or 2 * self.heartbeat_interval)
            for trial in twins:
                if not reuse_earlier_outcome(study, trial, configs[trial.number]):  # the run of its config failed
                    trial.set_user_attr("error", "its config failed in a twin trial of the same batch")
                    tell(study, trial, state=TrialState.FAIL)

        self.write_results(study, objective)
        return study

    def check_space_against_study(self, study: optuna.Study, space: dict[str, BaseDistribution]) -> bool:
        """Optuna keeps a choice parameter's choices for the life of a study, and would refuse the
        first ask of a study run again with other choices: say so before anything runs. The same
        choices in another order are the study's (space updated); returns whether any were."""
        stored, reordered = {}, False
        for t in study.get_trials(deepcopy=False):
            stored.update({name: dist for name, dist in t.distributions.items() if name not in stored})
        for name, dist in space.items():
            if isinstance(dist, CategoricalDistribution) and isinstance(stored.get(name), CategoricalDistribution) \
                    and dist.choices != stored[name].choices and sorted(map(repr, dist.choices)) == \
                    sorted(map(repr, stored[name].choices)):
                space[name], reordered = stored[name], True
            elif name in stored:
                try:
                    optuna.distributions.check_distribution_compatibility(stored[name], dist)
                except ValueError:
                    earlier = getattr(stored[name], "choices", stored[name])
                    raise SweepConfigError(
                        f"{self.space_lines[name]}: study {study.study_name} swept {name} over {earlier} before, and an "
                        "Optuna study keeps a parameter's choices (and its kind); name a new study "
                        "(hydra.sweeper.study_name=... or sweep.name=...)") from None
        return reordered

    def drop_queued_outside(self, study: optuna.Study, storage: optuna.storages.RDBStorage,
                            space: dict[str, BaseDistribution]) -> None:
        """A config queued to run again (retry) by an earlier run of the study whose search space has
        since changed cannot be asked from this one: end it FAIL, marked dropped (no failure counted)."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if not in_space(t.params or t.system_attrs.get("fixed_params", {}), space):
                storage.set_trial_user_attr(t._trial_id, "dropped", "outside the search space of a later run")
                try:
                    storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another worker took it first
                log.warning("trial %d: its queued params %s are outside this search space; dropped", t.number,
                            t.system_attrs.get("fixed_params"))

    def claim(self, study: optuna.Study, asked: list[optuna.Trial]) -> list[optuna.Trial]:
        """Workers asking at the same moment could start more than n_trials: keep the
        earliest-numbered running trials that fit, fail the surplus without running it."""
        trials = study.get_trials(deepcopy=False)
        done = decided(trials)
        running = sorted(t.number for t in trials if t.state == TrialState.RUNNING)
        allowed = set(running[: max(0, self.n_trials - done)])
        kept = []
        for t in asked:
            if t.number in allowed:
                kept.append(t)
            else:
                t.set_user_attr("surplus", "another worker asked at the same time; not run")
                tell(study, t, state=TrialState.FAIL)
        return kept

    @contextmanager
    def heartbeats(self, storage: optuna.storages.RDBStorage, trial_ids: list[int]):
        """study.optimize sends heartbeats itself; ask-and-tell has to."""
        stop = threading.Event()

        def beat():
            while True:
                for tid in trial_ids:
                    storage.record_heartbeat(tid)
                if stop.wait(self.heartbeat_interval):
                    return

        thread = threading.Thread(target=beat, daemon=True, name="optuna-heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def record(self, study: optuna.Study, trial: optuna.Trial, outcome: dict, objective: list[str]) -> None:
        if outcome.get("run_id"):
            trial.set_user_attr("mlflow_run_id", outcome["run_id"])
        trial.set_user_attr("state", outcome["state"])
        if outcome["state"] == "skipped_budget":
            trial.set_user_attr("skip_reason", outcome["reason"])
            trial.set_user_attr("predicted_peak_gb", outcome["predicted_peak_gb"])
            excess = outcome["predicted_peak_gb"] - (outcome.get("budget_gb") or 0)
            trial.set_user_attr("budget_excess_gb", excess)
            # > 0 is infeasible: TPE sends such trials to its 'bad' group, so the region stops being suggested.
            trial.set_constraint(BUDGET_CONSTRAINT, excess)
            tell(study, trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, outcome["reason"])
            return
        metrics = outcome.get("metrics") or {}
        if "predicted_peak_gb" in metrics:
            trial.set_user_attr("predicted_peak_gb", metrics["predicted_peak_gb"])
        if outcome["state"] == "failed":
            trial.set_user_attr("error", outcome["error"][:2000])
            trial.set_user_attr("failure_kind", outcome["failure_kind"])
            tell(study, trial, state=TrialState.FAIL)
            return
        values = [metrics.get(name) for name in objective]
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            trial.set_user_attr("error", f"objective {objective} missing or NaN in the trial's metrics")
            tell(study, trial, state=TrialState.FAIL)
            return
        trial.set_constraint(BUDGET_CONSTRAINT, 0.0)  # fitted and ran
        tell(study, trial, values)

    def write_results(self, study: optuna.Study, objective: list[str]) -> None:
        """The best trial, or for several objectives the Pareto front, next to the sweep's outputs."""
        trials = study.trials
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        # A repeated config is listed once, as the trial that ran it.
        ran = {t.user_attrs.get("repeat_of", t.number) for t in (study.best_trials if complete else [])}
        front = [trials[number] for number in sorted(ran)]
        results = {"study_name": study.study_name, "objective": objective,
                   "directions": [d.name.lower() for d in study.directions],
                   # A dropped ask (its config ran elsewhere, or left the search space) is no failure.
                   "counts": {s.name: sum(t.state == s and "dropped" not in t.user_attrs for t in trials)
                              for s in TrialState},
                   "dropped": sum("dropped" in t.user_attrs for t in trials),
                   "repeats_reused": sum("repeat_of" in t.user_attrs for t in trials),
                   "pareto_front" if len(objective) > 1 else "best": [
                       {"number": t.number, "values": t.values, "params": t.params,
                        "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in front]}
        out = Path(self.config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "optuna_results.json").write_text(json.dumps(results, indent=2))
        log.info("Optuna study %s: %s; %d repeated configs told their earlier outcome, not run again; %d asks "
                 "dropped (user attr dropped)", study.study_name, results["counts"], results["repeats_reused"],
                 results["dropped"])
