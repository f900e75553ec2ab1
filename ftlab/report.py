"""Sweep report: gather a sweep's trials from MLflow -> static matplotlib figures ->
report.md and a self-contained report.html under reports/<sweep-id>/, also logged on
the sweep's parent run under report/. `python -m ftlab.report sweep=<id>` on demand;
the sweeper calls `build_report(parent_run_id)` when a sweep ends.
"""
from __future__ import annotations

import base64
import json
import math
import os
import shlex
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import matplotlib

matplotlib.use("Agg")  # files only: the report must build on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from jinja2 import Environment  # noqa: E402
from mlflow.entities import Run, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ftlab.config import ConfigError, ReportConfig, check_keys, exit_2_on  # noqa: E402  (and registers the structured-config schema)
from ftlab.tracking import (NOTHING_FINISHED, TrackingError, latest_attempts, mask, open_existing, registry_arguments,  # noqa: E402
                            shown_store, store_argument)

STATE_ORDER = {"finished": 0, "failed": 1, "killed": 2, "skipped_budget": 3}
# Logged by the pipeline beside the config; they follow from other params, so they are
# neither swept knobs nor overrides.
DERIVED_PARAMS = {"data.fingerprint", "model.checkpoint", "run_name"}
MIN_TRIALS_FOR_IMPORTANCE = 4
EXAMPLES_SHOWN = 5


class ReportError(ValueError):
    """The sweep cannot be found or read; the message says what to do."""


@dataclass
class Trial:
    run_id: str
    number: int | None
    state: str  # finished | failed | killed | skipped_budget
    params: dict[str, str]
    metrics: dict[str, float]
    reason: str = ""  # the error of a failed trial or why a trial was skipped
    peak_kind: str | None = None
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    overrides: list[str] | None = None  # what composed it (tag ftlab.overrides); None on runs of older ftlab
    base_key: str | None = None  # the base evaluation it was compared with (tag ftlab.compared_base_key)

    @property
    def label(self) -> str:
        return f"#{self.number}" if self.number is not None else self.run_id[:8]

    @property
    def measured_peak_gb(self) -> float | None:
        value = self.metrics.get(f"peak_memory_mb_{self.peak_kind}")
        return None if value is None else value / 1024


@dataclass
class Sweep:
    sweep_id: str
    parent_run_id: str
    experiment: str
    command: str
    objectives: list[str]
    directions: list[str]
    trials: list[Trial]  # ranked: finished best first, then failed/killed, then skipped
    varying: list[str]  # swept params whose value differs across trials (varying_params)
    base: dict[str, float] | None  # base-model scores, the reference row
    examples: list[dict[str, str]]  # prompt, reference, base, winner
    best_run_id: str | None = None
    stopped: str | None = None  # what stopped the sweep: an error (parent FAILED) or an interrupt (KILLED)
    earlier_attempts: int = 0  # runs of a config the sweep ran again (tracking.latest_attempts), not listed
    deleted: int = 0  # trial runs deleted in MLflow since (the parent's counts and best run still count them)

    @property
    def base_label(self) -> str:
        """The reference row's name: the winner's base, where trials were compared with several
        (peft=qlora,lora: an NF4 base and a 16-bit one; eval settings swept)."""
        bases = {t.base_key for t in self.trials if t.base_key}
        whose = "the winner's; " if self.winner else ""
        return f"base model ({whose}trials compared with {len(bases)})" if len(bases) > 1 else "base model"

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.state == "finished"]

    @property
    def counts(self) -> str:
        """'1 finished, 2 killed': the trials by state (a killed one is no failed one: it continues)."""
        states = [t.state for t in self.trials]
        names = {"skipped_budget": "skipped over the budget"}
        return ", ".join(f"{states.count(s)} {names.get(s, s)}" for s in dict.fromkeys(["finished", *states]))

    @property
    def winner(self) -> Trial | None:
        tagged = [t for t in self.finished if t.run_id == self.best_run_id]
        return (tagged or self.finished or [None])[0]


# ---------------------------------------------------------------- gather


def find_sweep(client: MlflowClient, sweep: str | None) -> Run:
    """The parent run of a sweep, given its run id, its ftlab.sweep_id tag (the newest
    parent if a resumed sweep has several) or the run id of one of its trials (as copied from
    the MLflow UI); None: the newest sweep in the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]

    def newest_sweeps() -> list[Run]:  # only where no sweep was named, or the named one was not found
        return client.search_runs(experiments, "tags.`ftlab.role` = 'sweep'", max_results=5,
                                  order_by=["attributes.start_time DESC"]) if experiments else []

    if sweep is None:
        if not (recent := newest_sweeps()):
            raise ReportError(f"the tracking store {shown_store(client.tracking_uri)} holds no sweep yet: start one with "
                              "python -m ftlab -m lora_r=8,16,64, or pass tracking_uri=... if it was logged elsewhere")
        return recent[0]
    try:
        run = client.get_run(sweep)
    except MlflowException:
        run = None  # not a run id: look it up as a sweep id
    if run is not None:
        if run.data.tags.get("ftlab.role") == "trial" and (parent := run.data.tags.get("mlflow.parentRunId")):
            run = client.get_run(parent)
        if run.data.tags.get("ftlab.role") == "sweep":
            return run
        raise ReportError(f"sweep={sweep}: that run belongs to no sweep (a single python -m ftlab run?): a report "
                          "compares a sweep's trials; a run's scores, curves and sample generations are in the MLflow UI")
    if experiments and "'" not in sweep:
        found = client.search_runs(experiments, f"tags.`ftlab.role` = 'sweep' and tags.`ftlab.sweep_id` = '{sweep}'",
                                   max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            return found[0]
    known = ", ".join(r.data.tags.get("ftlab.sweep_id", r.info.run_id) for r in newest_sweeps()) or "none"
    raise ReportError(f"sweep={sweep}: no sweep with that sweep id or parent run id in the tracking store "
                      f"{shown_store(client.tracking_uri)} (recent sweeps: {known}). Pass tracking_uri=... if the "
                      f"sweep was logged elsewhere.")


def gather(client: MlflowClient, sweep: str) -> Sweep:
    """Everything the report shows, read once from MLflow; free text is masked here."""
    parent = find_sweep(client, sweep)
    tags = parent.data.tags
    objectives = [o.strip() for o in tags.get("ftlab.objective", "rouge_l").split(",")]
    directions = [d.strip() for d in tags.get("ftlab.direction", "maximize").split(",")]
    if len(directions) != len(objectives):
        directions = (directions * len(objectives))[: len(objectives)]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=5000)
    attempts, earlier = latest_attempts([r for r in children
                                         if r.data.tags.get("ftlab.role") not in ("base_eval", "sweep")])
    trials = [_trial(client, r) for r in attempts]
    trials.sort(key=lambda t: _rank_key(t, objectives, directions))
    deleted = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                 "and tags.`ftlab.role` = 'trial'", run_view_type=ViewType.DELETED_ONLY, max_results=5000)
    sweep_result = Sweep(
        sweep_id=tags.get("ftlab.sweep_id", parent.info.run_id), parent_run_id=parent.info.run_id,
        experiment=client.get_experiment(parent.info.experiment_id).name, command=mask(tags.get("ftlab.command", "")),
        objectives=objectives, directions=directions, trials=trials, varying=varying_params(trials),
        base=None, examples=[], best_run_id=tags.get("ftlab.best_run_id"), earlier_attempts=earlier, deleted=len(deleted),
        stopped=mask(tags["ftlab.error"]) if parent.info.status in ("FAILED", "KILLED") and tags.get("ftlab.error")
        and not tags["ftlab.error"].startswith(NOTHING_FINISHED) else None,  # that one ran to its end: the table says
    )
    base_run = _base_run(client, parent, sweep_result.winner or (trials[0] if trials else None))
    if base_run is not None:
        sweep_result.base = dict(base_run.data.metrics)
    elif sweep_result.winner:  # the trials carry the base scores as base_<metric>
        base = {k.removeprefix("base_"): v for k, v in sweep_result.winner.metrics.items() if k.startswith("base_")}
        sweep_result.base = base or None
    sweep_result.examples = _examples(client, sweep_result.winner, base_run)
    return sweep_result


def _trial(client: MlflowClient, r: Run) -> Trial:
    tags = r.data.tags
    state = tags.get("ftlab.state") or {"FINISHED": "finished", "FAILED": "failed"}.get(r.info.status, "killed")
    number = tags.get("ftlab.trial_number")
    history = client.get_metric_history(r.info.run_id, "train_loss")
    overrides = shlex.split(tags["ftlab.overrides"]) if "ftlab.overrides" in tags else None
    params = {k: mask(v) for k, v in r.data.params.items() if k not in DERIVED_PARAMS}
    for key, value in _override_items(overrides or []):
        params.setdefault(key, value)  # a config group's choice (model=tiny) is no param of its own
    return Trial(
        run_id=r.info.run_id, number=int(number) if number and number.isdigit() else None, state=state,
        params=params, metrics=dict(r.data.metrics),
        reason=mask(tags.get("ftlab.error") or tags.get("ftlab.skip_reason") or ""),
        peak_kind=tags.get("ftlab.peak_memory_kind"), train_loss=_first_per_step(history), overrides=overrides,
        base_key=tags.get("ftlab.compared_base_key"),
    )


def _override_items(overrides: list[str]) -> list[tuple[str, str]]:
    return [(key.lstrip("+~"), value) for key, _, value in (o.partition("=") for o in overrides)]


def _first_per_step(history) -> list[tuple[int, float]]:
    """The step-wise losses; the trainer's end-of-run average is logged at the last step
    again and would draw a spike, so only the first value of each step is kept."""
    first: dict[int, float] = {}
    for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
        first.setdefault(m.step, m.value)
    return sorted(first.items())


def _rank_key(t: Trial, objectives: list[str], directions: list[str]):
    """State, then the first objective, ties broken by the next (as sweep.summarise picks the best)."""
    scores = []
    for objective, direction in zip(objectives, directions):
        value = t.metrics.get(objective)
        scores.append(math.inf if value is None or math.isnan(value) else (-value if direction == "maximize" else value))
    return STATE_ORDER.get(t.state, 2), scores, t.number if t.number is not None else math.inf


def varying_params(trials: list[Trial]) -> list[str]:
    """The swept keys whose value differs across trials: those of the trials' overrides, so a value
    a run resolved itself (gradient checkpointing from `auto`, a micro-batch budget.fit lowered) or
    a group's fields (model.arch.* of model=tiny,smollm2_135m) are not taken for swept knobs. Runs
    of older ftlab, without overrides: every logged param that differs, but sweep.* (trial number, ids)."""
    if trials and all(t.overrides is not None for t in trials):
        # budget.oom_at_gb: the sweeper's cap after an OOM, in the trials after it; no knob.
        keys = sorted({k for t in trials for k, _ in _override_items(t.overrides)} - {"budget.oom_at_gb"})
    else:
        keys = sorted({k for t in trials for k in t.params if not k.startswith("sweep.")})
    return [k for k in keys if len({t.params.get(k) for t in trials if t.params}) > 1]


def _base_run(client: MlflowClient, parent: Run, trial: Trial | None) -> Run | None:
    """The base_eval run the trial was compared with (tag ftlab.compared_base_key: the same model,
    bits, held-out data and eval settings); for runs of older ftlab, the newest on the same model and data."""
    if trial is None:
        return None
    if trial.base_key:
        wanted = {"ftlab.base_eval_key": trial.base_key}
    elif trial.state == "finished" and "ftlab.data_fingerprint" in (tags := client.get_run(trial.run_id).data.tags):
        wanted = {k: tags[k] for k in ("ftlab.model", "ftlab.data_fingerprint") if k in tags}
    else:
        return None  # a trial skipped over budget, or failed before its data was read: no base was scored for it
    query = " and ".join(["tags.`ftlab.role` = 'base_eval'", "attributes.status = 'FINISHED'",
                          *(f"tags.`{k}` = '{v}'" for k, v in wanted.items())])
    runs = client.search_runs([parent.info.experiment_id], query, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


@contextmanager
def _no_artifact_progress_bars():
    """MLflow draws two download bars for every artifact, a few KB here: a report over a sweep
    would fill the console with them."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"]
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def _table(client: MlflowClient, run_id: str, path: str) -> list[dict]:
    """Rows of an mlflow.log_table artifact ({"columns": [...], "data": [[...]]})."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with _no_artifact_progress_bars():
                local = client.download_artifacts(run_id, path, tmp)
        except Exception:  # noqa: BLE001  (no samples logged: the report simply shows none)
            return []
        table = json.loads(Path(local).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _examples(client: MlflowClient, winner: Trial | None, base_run: Run | None) -> list[dict[str, str]]:
    if winner is None:
        return []
    base = {}
    if base_run is not None:
        base = {r["prompt"]: r["prediction"] for r in _table(client, base_run.info.run_id,
                                                            "samples/base_generations.json")}
    rows = _table(client, winner.run_id, "samples/generations.json")[:EXAMPLES_SHOWN]
    return [{"prompt": r["prompt"], "reference": r["reference"],
             "base": base.get(r["prompt"], "(not logged)") or "(empty)", "winner": r["prediction"] or "(empty)"}
            for r in rows]


# ---------------------------------------------------------------- optuna


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def _distribution(values: list) -> optuna.distributions.BaseDistribution:
    """Inferred from the values seen: the importance evaluator only needs each param's range."""
    if all(isinstance(v, int) for v in values):
        low, high = min(values), max(values)
        return optuna.distributions.IntDistribution(low, high, log=low >= 1 and high >= 10 * low)
    if all(isinstance(v, (int, float)) for v in values):
        low, high = float(min(values)), float(max(values))
        return optuna.distributions.FloatDistribution(low, high, log=low > 0 and high >= 10 * low)
    return optuna.distributions.CategoricalDistribution(sorted({str(v) for v in values}))


def scored(sweep: Sweep) -> list[Trial]:
    """Finished trials with a number for every objective."""
    return [t for t in sweep.finished
            if all(not math.isnan(t.metrics.get(o, math.nan)) for o in sweep.objectives)]


def optuna_study(sweep: Sweep) -> optuna.Study | None:
    """An in-memory study rebuilt from the finished trials (no storage URL, so no password
    needed); None when no finished trial has every objective."""
    trials = scored(sweep)
    if not trials:
        return None
    params = [k for k in sweep.varying if all(k in t.params for t in trials) and len({t.params[k] for t in trials}) > 1]
    distributions = {k: _distribution([_value(t.params[k]) for t in trials]) for k in params}
    categorical = {k for k, d in distributions.items() if isinstance(d, optuna.distributions.CategoricalDistribution)}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" is noise here
    try:
        study = optuna.create_study(directions=sweep.directions)
    finally:
        optuna.logging.set_verbosity(verbosity)
    for t in trials:
        study.add_trial(optuna.trial.create_trial(
            params={k: t.params[k] if k in categorical else _value(t.params[k]) for k in params},
            distributions=distributions, values=[t.metrics[o] for o in sweep.objectives],
            user_attrs={"run_id": t.run_id},
        ))
    return study


def param_importances(study: optuna.Study | None) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances of the first objective, or None and the reason there are none."""
    trials = study.trials if study is not None else []
    if len(trials) < MIN_TRIALS_FOR_IMPORTANCE or not trials[0].params:
        return None, (f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} finished trials with "
                      f"varying parameters ({len(trials)} finished).")
    if len({t.values[0] for t in trials}) == 1:  # fANOVA has no variance to attribute
        return None, (f"Parameter importances: all {len(trials)} finished trials scored {trials[0].values[0]:.4g}, "
                      "so no parameter explains a difference.")
    return optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=lambda t: t.values[0]), ""


def pareto_run_ids(study: optuna.Study | None) -> set[str]:
    if study is None or len(study.directions) < 2:
        return set()
    return {t.user_attrs["run_id"] for t in study.best_trials}


# ---------------------------------------------------------------- figures


def plot_train_loss(sweep: Sweep, path: Path) -> Path | None:
    curves = [t for t in sweep.trials if t.train_loss]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in curves:
        steps, losses = zip(*t.train_loss)
        ax.plot(steps, losses, marker="o", markersize=3, linestyle="-" if t.state == "finished" else ":",
                label=" ".join([t.label, *(f"{k}={t.params.get(k)}" for k in sweep.varying), f"({t.state})"]))
    ax.set(xlabel="step", ylabel="train loss", title="Training loss of every trial")
    if len(curves) <= 20:  # beyond that a legend hides the curves; the table has the numbers
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_objective_vs_params(sweep: Sweep, path: Path) -> Path | None:
    objective = sweep.objectives[0]
    finished = [t for t in sweep.finished if objective in t.metrics]
    swept = [k for k in sweep.varying if len({t.params.get(k) for t in finished}) > 1]
    if not swept:
        return None
    fig, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.5), squeeze=False)
    for ax, key in zip(axes[0], swept):
        xs = [_value(t.params.get(key, "")) for t in finished]
        ys = [t.metrics[objective] for t in finished]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        # Rates are searched on a log scale; so are integers spanning a decade (ranks).
        if numeric and min(xs) > 0 and (max(xs) >= 10 * min(xs) or any(isinstance(x, float) for x in xs)):
            ax.set_xscale("log", base=2 if all(isinstance(x, int) for x in xs) else 10)
            ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])  # the values tried, not 2^k
            ax.minorticks_off()
        ax.scatter(xs if numeric else [str(x) for x in xs], ys)
        for x, y, t in zip(xs, ys, finished):
            ax.annotate(t.label, (x if numeric else str(x), y), fontsize="small", xytext=(3, 3),
                        textcoords="offset points")
        if sweep.base and objective in sweep.base:
            ax.axhline(sweep.base[objective], color="grey", linestyle="--", label="base model")
            ax.legend(fontsize="small")
        ax.set(xlabel=key, ylabel=objective)
    fig.suptitle(f"{objective} ({sweep.directions[0]}) vs each swept parameter")
    return _save(fig, path)


def plot_importances(importances: dict[str, float] | None, objective: str, path: Path) -> Path | None:
    if not importances:
        return None
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel=f"importance for {objective} (fANOVA)", title="Parameter importances")
    return _save(fig, path)


def plot_pareto(sweep: Sweep, front: set[str], path: Path) -> Path | None:
    """The first objective against each other objective; Pareto-optimal trials highlighted."""
    if not front:
        return None
    finished = scored(sweep)
    others = sweep.objectives[1:]
    fig, axes = plt.subplots(1, len(others), figsize=(5 * len(others), 4), squeeze=False)
    for ax, other in zip(axes[0], others):
        for on_front in (False, True):
            group = [t for t in finished if (t.run_id in front) == on_front]
            ax.scatter([t.metrics[other] for t in group], [t.metrics[sweep.objectives[0]] for t in group],
                       color="tab:red" if on_front else "tab:grey", label="Pareto front" if on_front else "dominated")
        for t in finished:
            ax.annotate(t.label, (t.metrics[other], t.metrics[sweep.objectives[0]]), fontsize="small",
                        xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"{other} ({sweep.directions[sweep.objectives.index(other)]})",
               ylabel=f"{sweep.objectives[0]} ({sweep.directions[0]})")
        ax.legend(fontsize="small")
    fig.suptitle("Pareto front")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- render


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


# (column title, metric, decimals) of the ranked table; objectives not listed get a column too.
METRIC_COLUMNS = [("ROUGE-L", "rouge_l", 3), ("BERTScore F1", "bertscore_f1", 3), ("eval loss", "eval_loss", 3),
                  ("predicted peak GiB", "predicted_peak_gb", 2), ("train s", "train_seconds", 1),
                  ("tokens/s", "tokens_per_second", 0)]


def trial_table(sweep: Sweep, front: set[str] = frozenset()) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ranked table; the base model first, as the reference."""
    shown = {key for _, key, _ in METRIC_COLUMNS}
    columns = [*METRIC_COLUMNS, *((o, o, 3) for o in sweep.objectives if o not in shown)]
    header = ["rank", "trial", "state", *sweep.varying, *(title for title, _, _ in columns), "measured peak GiB",
              *(["Pareto front"] if front else []), "MLflow run id", "reason"]
    rows = []
    if sweep.base:
        rows.append(["", sweep.base_label, "reference", *[""] * len(sweep.varying),
                     *(_fmt(sweep.base.get(key), digits) for _, key, digits in columns), "",
                     *([""] if front else []), "", ""])
    rank = 0
    for t in sweep.trials:
        rank += t.state == "finished"
        measured = _fmt(t.measured_peak_gb, 2) + (f" ({t.peak_kind})" if t.measured_peak_gb is not None else "")
        rows.append([str(rank) if t.state == "finished" else "", t.label, t.state,
                     *(t.params.get(k, "") for k in sweep.varying),
                     *(_fmt(t.metrics.get(key), digits) for _, key, digits in columns), measured,
                     *(["yes" if t.run_id in front else ""] if front else []), t.run_id, t.reason])
    return header, [[mask(str(c)) for c in row] for row in rows]


def reproduce_command(sweep: Sweep, trial: Trial) -> str:
    """`python -m ftlab <overrides>`: the overrides that composed the trial (tracking.run_overrides).
    For runs of older ftlab: the sweep command's fixed overrides, then the trial's values of every
    swept param (sweep syntax and Hydra's own settings dropped)."""
    if trial.overrides is not None:
        return " ".join(["python -m ftlab", *(shlex.quote(a) for a in trial.overrides)])
    fixed = []
    tokens = shlex.split(sweep.command) if sweep.command else []
    start = tokens.index("ftlab") + 1 if "ftlab" in tokens else 0
    for token in tokens[start:]:
        key, _, value = token.partition("=")
        key = key.lstrip("+~")
        swept = "," in value.strip("[]{}") and not value.startswith("[") or value.split("(")[0] in (
            "choice", "range", "interval", "glob", "tag")
        if token.startswith("-") or not _ or key.startswith("hydra") or key in sweep.varying or swept:
            continue
        fixed.append(token)
    chosen = [f"{k}={_override_value(trial.params[k])}" for k in sweep.varying if k in trial.params]
    return " ".join(["python -m ftlab", *(shlex.quote(a) for a in [*fixed, *chosen])])


def _override_value(param: str) -> str:
    """A logged param (str() of the value, lists as JSON) back in Hydra's override syntax."""
    if param in ("None", "True", "False"):
        return {"None": "null", "True": "true", "False": "false"}[param]
    if param.startswith("["):
        try:
            return "[" + ",".join(str(v) for v in json.loads(param)) + "]"
        except json.JSONDecodeError:
            pass
    return param


def next_steps(sweep: Sweep, winner: Trial) -> list[str]:
    """Reproduce, register, promote, serve; on the sweep's own store when it was not ./mlruns."""
    given = winner.params.get("registry.model_name")
    given = given if given and given != "None" else None
    name = given or sweep.experiment
    uri = winner.params.get("tracking_uri")
    store = store_argument(None if uri == "None" else uri)
    named = registry_arguments(given, sweep.experiment) + store  # serve takes the model's name in model=
    return [reproduce_command(sweep, winner),
            f"python -m ftlab.registry register run_id={winner.run_id}{named}",
            f"python -m ftlab.registry promote run_id={winner.run_id}{named}",
            f"python -m ftlab.serve model=models:/{name}@production{store}"]


MARKDOWN = """# Sweep {{ s.sweep_id }}

Parent MLflow run `{{ s.parent_run_id }}` (experiment `{{ s.experiment }}`); objective {{ objective }}.
{{ s.counts }} of {{ s.trials|length }} trials.
{% if s.earlier_attempts %}Not listed: {{ s.earlier_attempts }} earlier attempt(s) of these configs, which the sweep ran again.{% endif %}
{% if s.deleted %}Not listed: {{ s.deleted }} trial run(s) deleted in MLflow since (the parent run's counts and best run may name them).{% endif %}
{% if s.command %}Sweep command: `{{ s.command }}`{% endif %}
{% if s.stopped %}
**The sweep stopped early:**

```
{{ s.stopped }}
```
{% endif %}

## Trials, best first

| {{ header|join(" | ") }} |
|{% for _ in header %} --- |{% endfor %}
{% for row in rows %}| {{ row|map("replace", "|", "\\\\|")|join(" | ") }} |
{% endfor %}
{% for title, name in figures %}
## {{ title }}

![{{ title }}]({{ name }})
{% endfor %}{% if importance_note %}
{{ importance_note }}
{% endif %}{% if examples %}
## Held-out examples: reference, base model, winner

{% for e in examples %}### Example {{ loop.index }}

**Prompt:** {{ e.prompt }}

- **reference:** `{{ e.reference }}`
- **base model:** `{{ e.base }}`
- **winner:** `{{ e.winner }}`

{% endfor %}{% endif %}{% if steps %}
## Reproduce and ship the winner (trial {{ winner }})

```bash
{{ steps|join("\n") }}
```
{% endif %}"""

HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Sweep {{ s.sweep_id }}</title>
<style>body{font-family:sans-serif;margin:2em;max-width:90em} table{border-collapse:collapse;font-size:90%}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top} tr.reference{background:#eef}
pre{background:#f4f4f4;padding:1em;overflow-x:auto} img{max-width:100%}</style></head><body>
<h1>Sweep {{ s.sweep_id }}</h1>
<p>Parent MLflow run <code>{{ s.parent_run_id }}</code> (experiment <code>{{ s.experiment }}</code>); objective {{ objective }}.
{{ s.counts }} of {{ s.trials|length }} trials.
{% if s.earlier_attempts %}Not listed: {{ s.earlier_attempts }} earlier attempt(s) of these configs, which the sweep ran again.{% endif %}
{% if s.deleted %}Not listed: {{ s.deleted }} trial run(s) deleted in MLflow since (the parent run's counts and best run may name them).{% endif %}</p>
{% if s.command %}<p>Sweep command: <code>{{ s.command }}</code></p>{% endif %}
{% if s.stopped %}<p><b>The sweep stopped early:</b></p><pre>{{ s.stopped }}</pre>{% endif %}
<h2>Trials, best first</h2>
<table><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in rows %}<tr{% if row[2] == "reference" %} class="reference"{% endif %}>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% for title, name in figures %}<h2>{{ title }}</h2>
<img alt="{{ title }}" src="data:image/png;base64,{{ images[name] }}">
{% endfor %}{% if importance_note %}<p>{{ importance_note }}</p>{% endif %}
{% if examples %}<h2>Held-out examples: reference, base model, winner</h2>
<table><tr><th>prompt</th><th>reference</th><th>base model</th><th>winner</th></tr>
{% for e in examples %}<tr><td>{{ e.prompt }}</td><td><code>{{ e.reference }}</code></td><td><code>{{ e.base }}</code></td><td><code>{{ e.winner }}</code></td></tr>
{% endfor %}</table>{% endif %}
{% if steps %}<h2>Reproduce and ship the winner (trial {{ winner }})</h2>
<pre>{{ steps|join("\n") }}</pre>{% endif %}
</body></html>
"""


def render(sweep: Sweep, front: set[str], figures: list[tuple[str, Path]], importance_note: str, out: Path) -> None:
    header, rows = trial_table(sweep, front)
    winner = sweep.winner
    masked = lambda d: {k: mask(str(v)) for k, v in d.items()}  # noqa: E731
    context = dict(
        s=sweep, header=header, rows=rows, importance_note=importance_note,
        objective=", ".join(f"{o} ({d})" for o, d in zip(sweep.objectives, sweep.directions)),
        figures=[(title, path.name) for title, path in figures],
        images={path.name: base64.b64encode(path.read_bytes()).decode() for _, path in figures},
        examples=[masked(e) for e in sweep.examples],
        steps=[mask(s) for s in next_steps(sweep, winner)] if winner else [], winner=winner.label if winner else "",
    )
    (out / "report.md").write_text(mask(Environment().from_string(MARKDOWN).render(**context)))
    # The HTML is masked field by field above: masking the whole page could alter base64 images.
    (out / "report.html").write_text(Environment(autoescape=True).from_string(HTML).render(**context))


# ---------------------------------------------------------------- entry points


FIGURES = ("train_loss.png", "objective_vs_params.png", "importances.png", "pareto_front.png")


def build_report(parent_run_id: str | None, out_dir: str | Path = "reports", tracking_uri: str | None = None) -> Path:
    """Write <out_dir>/<sweep-id>/report.{md,html} and figures; log them on the parent run
    under report/. `parent_run_id` may also be a sweep id, or None for the newest sweep.
    Returns the report directory."""
    client = MlflowClient(tracking_uri=tracking_uri)
    sweep = gather(client, parent_run_id)
    out = Path(out_dir) / sweep.sweep_id
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"out_dir={out_dir}: cannot write the report there ({e.strerror or e})") from None
    study = optuna_study(sweep)
    importances, note = param_importances(study)
    front = pareto_run_ids(study)
    for figure in FIGURES:  # one an earlier report drew and this one does not would be shown and logged as its
        (out / figure).unlink(missing_ok=True)
    candidates = [
        ("Training loss", plot_train_loss(sweep, out / FIGURES[0])),
        (f"{sweep.objectives[0]} vs swept parameters", plot_objective_vs_params(sweep, out / FIGURES[1])),
        ("Parameter importances", plot_importances(importances, sweep.objectives[0], out / FIGURES[2])),
        ("Pareto front", plot_pareto(sweep, front, out / FIGURES[3])),
    ]
    figures = [(title, path) for title, path in candidates if path is not None]
    render(sweep, front, figures, note, out)
    client.log_artifacts(sweep.parent_run_id, str(out), "report")
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig) -> None:
    """`python -m ftlab.report [sweep=<sweep id, parent run id or a trial's run id>]`."""
    with exit_2_on(ReportError, TrackingError, ConfigError):
        check_keys(cfg, ReportConfig)
        out = build_report(cfg.sweep, cfg.out_dir, open_existing(cfg.tracking_uri))
    print(f"report: {out / 'report.html'} (also logged on the sweep's parent run under report/)")


if __name__ == "__main__":
    main()
