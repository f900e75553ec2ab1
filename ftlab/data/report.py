"""The data report: padding share with and without packing, token-length and class
histograms (PNG), a short rich table, the files `python -m ftlab.data` writes, and
their logging to the active MLflow run.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from ftlab.config import DATA_OUTPUT_FILES, TrainConfig
from ftlab.data.prepare import PreparedData


def padding_share(lengths: list[int], batch_size: int, max_len: int, packed: bool) -> float:
    """Share of the batches' token slots that is padding, batching in data order.

    Packed: first-fit-decreasing bins of max_len (what TRL's "bfd" strategy does); its
    padding-free collator then concatenates a batch's bins with reset position ids, so
    attention never crosses examples and no slot is padding.
    """
    if not lengths:
        return 0.0
    if packed:
        return 0.0  # padding-free batches: every slot holds a real token
    slots = sum(len(b) * max(b) for b in (lengths[i: i + batch_size] for i in range(0, len(lengths), batch_size)))
    return 1 - sum(lengths) / slots


def packed_sequences(lengths: list[int], max_len: int) -> int:
    """How many max_len sequences first-fit-decreasing packing fills."""
    free: list[int] = []
    for n in sorted(lengths, reverse=True):
        for i, room in enumerate(free):
            if room >= n:
                free[i] -= n
                break
        else:
            free.append(max_len - n)
    return len(free)


def packing_summary(data: PreparedData, train: TrainConfig) -> dict:
    lengths = [e.tokens for e in data.train]
    return {
        "padding_share_unpacked": round(padding_share(lengths, train.per_device_batch_size, train.max_seq_length,
                                                      packed=False), 4),
        "padding_share_packed": padding_share(lengths, train.per_device_batch_size, train.max_seq_length, packed=True),
        "sequences_unpacked": len(lengths),
        "sequences_packed": packed_sequences(lengths, train.max_seq_length),
        "packing": train.packing,
    }


def full_report(data: PreparedData, train: TrainConfig) -> dict:
    return {**data.report, "fingerprint": data.fingerprint, "packing": packing_summary(data, train)}


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_token_lengths(data: PreparedData) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = data.train + data.held_out
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name, values in ((axes[0], "prompt", [e.prompt_tokens for e in examples]),
                             (axes[1], "response", [e.response_tokens for e in examples])):
        ax.hist(values, bins=40, color="tab:blue")
        ax.set(title=f"{name} tokens (n={len(values)})", xlabel="tokens", ylabel="records")
    return _png(fig)


def plot_classes(classes: dict[str, int]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(classes)), 3.5))
    ax.bar(list(classes), list(classes.values()), color="tab:green")
    ax.set(title="class distribution (after cleaning)", ylabel="records")
    ax.tick_params(axis="x", rotation=45)
    return _png(fig)


_PLOTS: dict[tuple, dict[str, bytes]] = {}


def data_plots(data: PreparedData) -> dict[str, bytes]:
    """PNG name -> bytes, drawn once per data and tokenizer: a sweep's trials log the same
    plots, and drawing them took ~0.7 s a trial."""
    key = (data.fingerprint, tuple((e.prompt_tokens, e.response_tokens) for e in data.train + data.held_out))
    if key not in _PLOTS:
        plots = {"token_lengths.png": plot_token_lengths(data)}
        if data.report.get("classes"):
            plots["classes.png"] = plot_classes(data.report["classes"]["after"])
        _PLOTS.clear()  # one entry: a sweep over data must not pile them up
        _PLOTS[key] = plots
    return _PLOTS[key]


def write_jsonl(rows, path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_outputs(data: PreparedData, train: TrainConfig, out_dir: Path,
                  sets: tuple[str, ...] = ("train", "held_out")) -> Path:
    """report.json, rejects.jsonl, PNGs and the cleaned sets named (train.jsonl, held_out.jsonl)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = DATA_OUTPUT_FILES  # config.data_outputs_problem keeps them off data.path
    (out_dir / names["report"]).write_text(json.dumps(full_report(data, train), indent=2, ensure_ascii=False))
    write_jsonl(data.rejects, out_dir / names["rejects"])
    for name in sets:
        write_jsonl((e.to_dict() for e in getattr(data, name)), out_dir / names[name])
    for name, png in data_plots(data).items():
        (out_dir / name).write_bytes(png)
    return out_dir


def print_table(data: PreparedData, train: TrainConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    report = full_report(data, train)
    table = Table(title=f"data {data.fingerprint}{' (cached)' if data.cache_hit else ''}", title_justify="left")
    table.add_column("step")
    table.add_column("records", justify="right")
    table.add_column("dropped", justify="right")
    for step in report["steps"]:
        table.add_row(step["step"], str(step["records"]), str(step.get("dropped", "")))
        if step.get("truncated"):
            table.add_row("  answers cut to fit", str(step["truncated"]), "")
    for kind, n in report["rejects_by_kind"].items():
        table.add_row(f"  rejected: {kind}", "", str(n))
    c = report["counts"]
    table.add_row("train / held-out", f"{c['train_records']} / {c['held_out_records']}", "")
    p = report["packing"]
    table.add_row("padding share", f"{p['padding_share_unpacked']:.1%} unpacked, {p['padding_share_packed']:.0%} packed",
                  "")
    Console(stderr=True).print(table)


def log_data_report(data: PreparedData, train: TrainConfig) -> None:
    """Print the table and log the report, rejects, PNGs and the held-out set as artifacts, counts as
    metrics. The held-out set travels with the run: the registry's gate and merge check and serve's
    check score on it wherever the data file is now, and whatever became of it."""
    import mlflow

    from ftlab import tracking

    print_table(data, train)
    report = full_report(data, train)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifacts(str(write_outputs(data, train, Path(tmp), sets=("held_out",))), "data")
    p = report["packing"]
    tracking.log_new_metrics({
        **{f"data_{k}": v for k, v in report["counts"].items()},
        **{f"data_rejected_{k}": v for k, v in report["rejects_by_kind"].items()},
        "data_padding_share_unpacked": p["padding_share_unpacked"],
        "data_padding_share_packed": p["padding_share_packed"],
    })
    tracking.log_new_params({"data.fingerprint": data.fingerprint})
