"""Sweeps in MLflow, for every Hydra sweeper and launcher: one parent run per sweep with
the trials as child runs, a failed trial recorded and skipped over instead of ending
the sweep, and at the end the best trial, a ftlab_sweep.json summary and the hand-over
to the registry and report stages.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from ftlab import files, memory, tracking
from ftlab.checkpoints import Interrupted
from ftlab.config import ConfigError, SweepConfigError, check_objective, exit_2_on, model_name_problem
from ftlab.config import check as check_config
from ftlab.data import DataError
from ftlab.data.prepare import source_digest
from ftlab.memory import OverBudget, budget_gib

log = logging.getLogger("ftlab.sweep")

# The parent run reaches trials in other processes (hydra/launcher=joblib, submitit) through
# the environment the launcher inherits; conf/config.yaml reads these into the sweep node.
ENV_SWEEP_ID = "FTLAB_SWEEP_ID"
ENV_PARENT_RUN_ID = "FTLAB_SWEEP_PARENT_RUN_ID"
ENV_PARENT_WAS = "FTLAB_SWEEP_PARENT_WAS"  # the status of the parent run this command joined, if it existed
ENV_PARENT_ERROR = "FTLAB_SWEEP_PARENT_ERROR"  # and why it had stopped, if it said
SUMMARY_FILE = "ftlab_sweep.json"
HANDED_OVER = "ftlab.handed_over"  # the trials the last hand-over (registry, report) covered
GRID_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Commands that compose config.yaml but train nothing: their multirun (-m lora_r=8,16,64) runs the
# command once per config and is no sweep.
STAGE_COMMANDS = ("ftlab.memory", "ftlab.data")


def stage_command() -> str | None:
    """The STAGE_COMMANDS entry that runs this process, if one does. Hydra's job name cannot tell:
    python -m ftlab.data's file is __main__.py, as python -m ftlab's is."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    command = spec.name.removesuffix(".__main__") if spec else None
    return command if command in STAGE_COMMANDS else None


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_trial(cfg: DictConfig, run: Callable[[DictConfig], dict]) -> dict[str, Any]:
    """Run one trial of a sweep and return its outcome for the sweeper: {state, run_id,
    metrics, ...}. Hydra's sweepers re-raise a job's exception and end the sweep, so a
    failure is caught here, after trial_run has recorded it, and returned as state=failed."""
    # Raised out of the trial, this stops the sweep (Hydra turns a callback's error into a warning).
    check_objective(list(cfg.sweep.objective), list(cfg.sweep.direction), cfg.eval.compare_base)
    if cfg.sweep.trial_number is None:
        cfg.sweep.trial_number = HydraConfig.get().job.num
    if continues_finished_trials() and (kept := kept_trial(cfg)):
        return kept
    try:
        metrics = run(cfg)
        return {"state": "finished", "run_id": _this_trials_run(cfg), "metrics": metrics}
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the sweep stops; the same command continues it
        name = getattr(e, "signal_name", "SIGINT")
        what = getattr(e, "summary", None) or str(e) or f"interrupted by {name}"
        stopped = Interrupted(f"{what}; sweep {cfg.sweep.id} stopped: run the same command again to continue it", name)
        end_sweep(cfg, stopped, "KILLED")
        raise stopped from None
    except OverBudget as e:
        print(f"ftlab: skipped {e.run_name}: {e}")
        return {"state": "skipped_budget", "run_id": e.run_id, "reason": str(e),
                "predicted_peak_gb": e.predicted_gb, "budget_gb": budget_gib(cfg), "metrics": {}}
    except tracking.StoreUnreachable as e:
        # Every later trial needs the store. This trial's run stays RUNNING there with its checkpoint:
        # the sweep run again ends it KILLED and continues it (Optuna: once its heartbeat is stale).
        stopped = tracking.StoreUnreachable(f"{e}; sweep {cfg.sweep.id} stopped: run the same command again once the "
                                            "store is back, and this config continues from its last checkpoint")
        end_sweep(cfg, stopped, "FAILED")
        raise stopped from None
    except (DataError, ConfigError, tracking.TrackingError) as e:
        # Bad data, or a value ftlab cannot run with (config.check: lr=-1, train.sampling=bogus, a
        # resume with nothing to resume), or a tracking store it cannot use: every trial would fail
        # the same way. Stop the sweep with the message, rather than report a sweep of silent failures.
        end_sweep(cfg, e, "FAILED")
        raise
    except Exception as e:
        log.error("trial %s failed, the sweep goes on: %s: %s", cfg.sweep.trial_number, type(e).__name__, e)
        run_id = _this_trials_run(cfg)
        outcome = {"state": "failed", "run_id": run_id, "error": tracking.mask(f"{type(e).__name__}: {e}"),
                   "failure_kind": tracking.failure_kind(e), "metrics": {}}
        if run_id:
            outcome["metrics"] = MlflowClient().get_run(run_id).data.metrics
        return outcome


def end_sweep(cfg: DictConfig, error: BaseException, status: str, before_any_trial: bool = False) -> None:
    """An error every trial would hit, or an interrupt, stops the sweep, and Hydra then skips
    on_multirun_end: end the parent run with the reason here, instead of leaving it RUNNING for good.
    before_any_trial: the command was refused before it ran anything; a sweep it joined is left as
    it was (a finished sweep run again with n_trials=0 is still finished), one it created FAILED."""
    parent = cfg.sweep.parent_run_id or os.environ.get(ENV_PARENT_RUN_ID)
    if parent:
        client = MlflowClient()
        try:
            if before_any_trial and (was := os.environ.get(ENV_PARENT_WAS)):
                if error := os.environ.get(ENV_PARENT_ERROR):  # joining it cleared the reason: put back
                    client.set_tag(parent, "ftlab.error", error)
                client.set_terminated(parent, status=was)
                return
            if status == "KILLED" and (running := _running_trials(parent)):
                # This worker stopped; the sweep goes on in others (many workers on one study).
                log.info("sweep parent run %s left RUNNING: %d trial(s) of other workers still running", parent,
                         running)
                return
            client.set_tag(parent, "ftlab.error",
                           tracking.mask(f"{type(error).__name__}: {error}")[:tracking.MAX_PARAM_VALUE])
            client.set_terminated(parent, status=status)
        except Exception as e:  # the store itself may be what stopped the sweep; its error is the one to report
            log.warning("could not end the sweep's parent run %s %s: %s", parent, status, e)


def kept_trial(cfg: DictConfig) -> dict[str, Any] | None:
    """The outcome of this config's trial in this sweep, if a run of the sweep already finished
    it (or skipped it over budget), so a rerun of the sweep does not train it again. Grid-like
    sweepers only (continues_finished_trials)."""
    tracking.setup(cfg.tracking_uri, cfg.experiment)
    memory.resolve_arch(cfg)  # hashed as pipeline.run hashes it: a local checkpoint's own model.arch
    cfg_hash = tracking.config_hash(cfg)
    run = tracking.decided_trial(str(cfg.sweep.id), cfg_hash)
    if run is None:
        # A run of this trial and config still RUNNING was left by a process that died (kill -9): a grid
        # has no heartbeats to tell. Ended KILLED, it is continued from its checkpoint like an interrupted one.
        tracking.mark_killed(str(cfg.sweep.id), cfg.sweep.trial_number, cfg_hash)
        return None
    state = run.data.tags["ftlab.state"]
    verdict = "finished" if state == "finished" else "was skipped over the budget"
    print(f"ftlab: trial {cfg.sweep.trial_number} kept: its config already {verdict} in sweep {cfg.sweep.id} "
          f"(run {run.info.run_id})")
    return {"state": state, "run_id": run.info.run_id, "metrics": dict(run.data.metrics), "kept": True,
            "reason": run.data.tags.get("ftlab.skip_reason")}


def _this_trials_run(cfg: DictConfig) -> str | None:
    """The trial's MLflow run, if it got as far as starting one."""
    last = mlflow.last_active_run()
    if last is None or last.data.tags.get("ftlab.trial_number") != str(cfg.sweep.trial_number) \
            or last.data.tags.get("ftlab.sweep_id") != str(cfg.sweep.id):
        return None
    return last.info.run_id


# A quote broke MLflow's filter on the sweep's tag (its trials ran as lone runs), and ../ put the report elsewhere.
SWEEP_NAME = re.compile(r"[^\W_][^'\"\\/\x00-\x1f]{0,199}")


def sweep_id(config: DictConfig) -> str:
    """sweep.name, else the Optuna study name, else a digest of the sweeper and its search space
    (hydra.sweeper.params: a sweep file's, or the command's), the command's overrides as they take
    effect and the content of the data file: running the same command again continues the same
    sweep (its parent run, its study, its finished trials, its interrupted trials from their
    checkpoints), and after the data file is edited it starts a new one. How many trials, and
    where the study is kept, are not part of it: a sweep run on for more trials is the same sweep."""
    for key, name in (("sweep.name", config.sweep.get("name")), ("hydra.sweeper.study_name",
                                                                  config.hydra.sweeper.get("study_name"))):
        if name:
            if not SWEEP_NAME.fullmatch(str(name)):
                raise SweepConfigError(f"{key}={name}: start it with a letter or digit, without quotes, backslashes "
                                       "or slashes, up to 200 characters (it names the MLflow parent run's tag, the "
                                       "Optuna study and the report's folder)")
            return str(name)
    sweeper = config.hydra.sweeper
    key = [str(sweeper.get("_target_")), *effective_overrides(config.hydra.overrides.task)]
    if sweeper.get("params"):
        key.append(OmegaConf.to_container(sweeper.params))
    if config.data.path:
        key.append(source_digest(str(config.data.path), config.data.hf_split))
    return "ftlab-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def effective_overrides(lines: Sequence[str]) -> list[str]:
    """The overrides that take effect, in a stable order: the last of each key (`a=4 ... a=12` is
    a=12, and another command than `a=12 ... a=4`), sorted (the keys' order changes nothing)."""
    parsed = OverridesParser.create().parse_overrides(list(lines))
    return sorted({(o.key_or_group, o.package): o.input_line for o in parsed}.values())  # `++a=2` is a's too


def continues_finished_trials() -> bool:
    """Grid-like sweepers launch every config again when a sweep is rerun: there a trial whose
    config already reached a verdict in the sweep is kept instead of trained again. ftlab's
    Optuna sweeper only launches trials it still needs, so a duplicate there is a new trial."""
    return "ftlab_optuna_sweeper" not in str(HydraConfig.get().sweeper.get("_target_", ""))


def check_grid(config: DictConfig) -> None:
    """Hydra's grid sweeper answers an interval with a traceback, and an empty range with a
    sweep of no trials that reports nothing: each is one line instead, before the parent run,
    as is a swept value no trial could run with (check_swept_values)."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != GRID_SWEEPER:
        return
    lines = [*config.hydra.overrides.task, *(f"{k}={v}" for k, v in (sweeper.get("params") or {}).items())]
    overrides = OverridesParser.create().parse_overrides(lines)
    for override in overrides:
        if override.is_interval_sweep():
            raise SweepConfigError(f"{override.input_line}: the grid sweeper takes a,b,c, choice(...) and range(...); "
                                   "an interval needs hydra/sweeper=optuna")
        if override.is_sweep_override() and not list(override.sweep_string_iterator()):
            raise SweepConfigError(f"{override.input_line}: no values to sweep (range(a,b) stops before b)")
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    check_swept_values(config.hydra.job.config_name, fixed, {
        o.get_key_element(): list(o.sweep_string_iterator()) for o in overrides if o.is_sweep_override()})


def check_swept_values(config_name: str, fixed: list[str], swept: dict[str, Sequence],
                       shown: dict[str, str] | None = None) -> None:
    """Compose each swept value alone with the fixed overrides, and check it as a run would
    (config.check, transformers' optimizer and scheduler names among it, and the estimator's settings): a
    key the config lacks (lora_rr=4,8) or a value no trial could run with (lora_r=8,0) is one
    line before the sweep starts, not a failure after the trials before it have trained.
    `shown`: the override to name ahead of a key's message, where its values are not the user's own."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException

    fixed = [line for line in fixed if not line.lstrip("+~").startswith("hydra")]
    # Nothing swept (python -m ftlab -m budget.vram_gb=0): its one config, before the parent run too.
    probes = [(key, [f"{key}={value}"]) for key, values in swept.items() for value in values] or [(None, [])]
    for key, probe in probes:
        try:
            trial = compose(config_name, overrides=[*fixed, *probe])
            check_config(trial)
            memory.settings(trial)
        except ConfigCompositionException as e:  # Hydra's message, and the reason under it, on one line
            reason = " ".join(str(x).splitlines()[0] for x in (e, e.__cause__) if x is not None)
            message = f"{probe[0]}: {reason}" if probe else reason
        except ConfigError as e:
            message = str(e)
        else:
            continue
        raise SweepConfigError(f"{shown[key]}: {message}" if key in (shown or {}) else message)


def command_line() -> str:
    """The command as typed, with secret values masked."""
    return shlex.join(["python", "-m", "ftlab", *tracking.shown_args(sys.argv[1:])])


class SweepCallback(Callback):
    """Registered under hydra.callbacks in conf/config.yaml, which python -m ftlab.memory and
    python -m ftlab.data compose too: there a multirun prices or prepares each config of a grid and
    is no sweep (STAGE_COMMANDS)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if stage_command():  # python -m ftlab.memory -m / ftlab.data -m: each config of a grid, no sweep
            with exit_2_on(ConfigError):  # a bad value among them is named before any is priced or prepared
                check_grid(config)
            return
        with exit_2_on(ConfigError):  # SweepConfigError too; SystemExit: Hydra would turn an exception into a warning
            check_grid(config)
            registers = config.registry.auto_register or config.registry.auto_promote  # its best, at the end
            if registers and (problem := model_name_problem(config.registry.model_name, config.experiment)):
                raise ConfigError(problem)
            files.make_dir(config.sweep.report_dir, "sweep.report_dir")  # written at the end, after every trial
            sid = sweep_id(config)
        try:
            check_objective(list(config.sweep.objective), list(config.sweep.direction), config.eval.compare_base)
        except SweepConfigError:
            return  # no parent run for a sweep that cannot run; its first trial stops it with the message
        with exit_2_on(tracking.TrackingError):  # raised from a callback, Hydra would only warn
            tracking.setup(config.tracking_uri, config.experiment)
        parent, was, error = tracking.start_sweep_run(sid, command_line(), list(config.sweep.objective),
                                                      list(config.sweep.direction))
        os.environ[ENV_SWEEP_ID], os.environ[ENV_PARENT_RUN_ID] = sid, parent
        for name, value in ((ENV_PARENT_WAS, was), (ENV_PARENT_ERROR, error)):
            if value:
                os.environ[name] = value
            else:
                os.environ.pop(name, None)
        print(f"ftlab sweep {sid}: parent MLflow run {parent}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.get(ENV_PARENT_RUN_ID)
        if not parent or stage_command():
            return
        tracking.setup(config.tracking_uri, config.experiment)
        summary = summarise(parent, list(config.sweep.objective), list(config.sweep.direction))
        summary["sweep_id"] = os.environ.get(ENV_SWEEP_ID)
        out = Path(config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        ended = record_best(parent, summary)
        counts = state_counts(summary) or "no trials"
        if n := summary["earlier_attempts"]:
            counts += f" ({n} earlier attempt{'s' * (n > 1)} of these configs, run again, not counted)"
        best = summary["best_run_id"] or f"none (no trial finished with {', '.join(summary['objective'])})"
        if ended == "running":
            print(f"ftlab sweep {summary['sweep_id']}: {counts}; best run so far {best}; the trials still running "
                  "belong to other workers: the last to finish ends the sweep and writes its report")
            return
        if ended == "ended elsewhere":  # its hand-over (registry, report) is that worker's: not twice
            print(f"ftlab sweep {summary['sweep_id']}: {counts}; best run {best}; another worker ended the sweep "
                  "and hands it over (registry, report)")
        else:
            stages = hand_over(config, parent, summary["best_run_id"])
            report = f"; report {stages['ftlab.report'] / 'report.html'}" if stages.get("ftlab.report") else ""
            print(f"ftlab sweep {summary['sweep_id']}: {counts}; best run {best}{report}; summary {out / SUMMARY_FILE}")
        if problem := nothing_finished(summary):  # to a scheduler or CI, a sweep that trained nothing failed
            print(f"ftlab: sweep {summary['sweep_id']}: {problem}", file=sys.stderr)
            raise SystemExit(2 if set(summary["counts"]) == {"skipped_budget"} else 1)


def summarise(parent_run_id: str, objective: list[str], direction: list[str]) -> dict[str, Any]:
    """Counts by state (of each config's latest attempt), the best finished trial by the first
    objective, and for several objectives the Pareto front, all read back from MLflow (so any sweeper works)."""
    trials = []
    runs, earlier = tracking.latest_attempts(tracking.child_runs(parent_run_id))
    for r in runs:
        trials.append({"run_id": r.info.run_id, "trial_number": r.data.tags.get("ftlab.trial_number"),
                       "state": r.data.tags.get("ftlab.state", r.info.status.lower()), "status": r.info.status,
                       "metrics": r.data.metrics})
    # A NaN (a diverged eval_loss) is no score: max() would keep one it met first as the best.
    scored = [t for t in trials if t["state"] == "finished"
              and all(m in t["metrics"] and not math.isnan(t["metrics"][m]) for m in objective)]
    sign = [1 if d == "maximize" else -1 for d in direction]
    # By the first objective, ties broken by the next (so with several the best is on the Pareto front),
    # then by the earlier trial, as the report ranks them: max() keeps the first of equals.
    scored.sort(key=lambda t: int(t["trial_number"]) if str(t["trial_number"]).isdigit() else math.inf)
    best = max(scored, key=lambda t: [s * t["metrics"][m] for m, s in zip(objective, sign)], default=None)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    return {"parent_run_id": parent_run_id, "objective": objective, "direction": direction, "counts": counts,
            "earlier_attempts": earlier,
            "best_run_id": best and best["run_id"],
            "best_metrics": best and {m: best["metrics"][m] for m in objective},
            "pareto_front_run_ids": [t["run_id"] for t in pareto_front(scored, objective, sign)],
            "trials": trials}


def pareto_front(trials: list[dict], objective: list[str], sign: list[int]) -> list[dict]:
    """Trials no other trial beats on every objective."""
    def vec(t):
        return [s * t["metrics"][m] for m, s in zip(objective, sign)]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [t for t in trials if not any(dominates(vec(o), vec(t)) for o in trials if o is not t)]


def _running_trials(parent_run_id: str) -> int:
    return sum(r.info.status == "RUNNING" for r in tracking.child_runs(parent_run_id))


def handed_over(summary: dict) -> str:
    """What a hand-over (registry, report) covered: each config's latest attempt and its state."""
    trials = sorted(f"{t['run_id']}:{t['state']}" for t in summary["trials"])
    return hashlib.sha256(" ".join(trials).encode()).hexdigest()[:16]


def record_best(parent_run_id: str, summary: dict) -> str:
    """Log the best trial and the counts on the parent run and end it FINISHED, unless trials of
    other workers still run: the last worker to finish ends it. Returns "ended"; "running" where
    trials of others still run; "ended elsewhere" where another worker has ended it since this one
    joined and handed over these very trials (tag ftlab.handed_over), so registers the best and
    writes the report. A worker that ended it between two trials of this one (none running then)
    handed over less: this one ends it again, with its trials."""
    client = MlflowClient()
    if summary["best_run_id"]:
        client.set_tag(parent_run_id, "ftlab.best_run_id", summary["best_run_id"])
        for name, value in summary["best_metrics"].items():
            client.log_metric(parent_run_id, f"best_{name}", value)
    parent = client.get_run(parent_run_id)
    # A count logged by an earlier worker's end (trials_running=1) is 0 once no trial is in that state.
    counts = {**{k: 0 for k in parent.data.metrics if k.startswith("trials_")},
              **{f"trials_{state}": n for state, n in summary["counts"].items()}}
    for key, n in counts.items():
        client.log_metric(parent_run_id, key, n)
    client.log_dict(parent_run_id, summary, f"sweep/{SUMMARY_FILE}")
    if summary["counts"].get("running"):
        return "running"
    covered, problem = handed_over(summary), nothing_finished(summary)
    status = "FAILED" if problem else "FINISHED"
    if parent.info.status == status and parent.data.tags.get(HANDED_OVER) == covered:
        return "ended elsewhere"  # joining set it RUNNING: another worker ended it since, with these trials
    client.set_tag(parent_run_id, HANDED_OVER, covered)
    if problem:
        client.set_tag(parent_run_id, "ftlab.error", problem)
    elif "ftlab.error" in parent.data.tags:  # a worker interrupted earlier (the others went on)
        client.delete_tag(parent_run_id, "ftlab.error")
    client.set_terminated(parent_run_id, status=status)
    return "ended"


def nothing_finished(summary: dict) -> str | None:
    """Why a sweep that trained no config to the end is no success (its parent FAILED, its command's
    exit status 1, or 2 where every config was over the budget), or None."""
    if not summary["counts"] or summary["counts"].get("finished"):  # none to run (a study decided already)
        return None
    return f"{tracking.NOTHING_FINISHED} ({state_counts(summary)}): nothing to compare or register"


def state_counts(summary: dict) -> str:
    """'2 finished, 1 failed': the summary's trials by state."""
    return ", ".join(f"{n} {state}" for state, n in summary["counts"].items())


def hand_over(config: DictConfig, parent_run_id: str, best_run_id: str | None) -> dict[str, Any]:
    """Call the registry and report stages if installed; their failure is logged, it does
    not fail a sweep whose trials are already recorded. Returns what each stage that ran returned."""
    cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    stages = [("ftlab.registry", "on_sweep_end", (cfg, parent_run_id, best_run_id)),
              ("ftlab.report", "build_report", (parent_run_id, cfg.sweep.report_dir))]
    results = {}
    for module, function, args in stages:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            results[module] = getattr(importlib.import_module(module), function)(*args)
        except Exception:
            log.exception("%s.%s failed after sweep (parent run %s); the sweep's runs are intact",
                          module, function, parent_run_id)
    return results
