"""The data stage: load -> validate -> dedupe -> length -> balance -> split -> fingerprint,
with a report of what each step removed and why.

Results are cached under <cache>/data/prepared/<key>, the key hashing the source content,
the data config, the tokenizer and max_seq_length: a 30-trial sweep prepares data once.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ftlab.config import DataConfig
from ftlab.data import clean
from ftlab.data.formats import (RawRecord, field_names, hidden, is_saved_dataset, read_as_data, read_records,
                                to_messages)
from ftlab.data.generate import generate, write_jsonl
from ftlab.data.records import DataError, Example, RecordError
from ftlab.files import publishing

log = logging.getLogger("ftlab.data")

# Bump when cleaning changes what a given input produces, so old cache entries are not reused.
# 2: near duplicates compare question and answer, system turns left out; 3: exact duplicates, each turn and its role
CACHE_VERSION = 3
# The error message lists this many problems, then the total.
ERRORS_SHOWN = 5


@dataclass
class PreparedData:
    train: list[Example]
    held_out: list[Example]
    fingerprint: str
    source: str
    report: dict = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)  # {"where", "kind", "reason", "record"}
    cache_hit: bool = False

    def trl_rows(self, split: str) -> list[dict]:
        """TRL's conversational prompt-completion rows: loss falls on the completion only."""
        return [{"prompt": e.prompt, "completion": e.messages[-1:]} for e in getattr(self, split)]


def resolve_source(cfg: DataConfig, cache_dir: Path) -> str:
    """The data to read: the user's path (or hub name), or the embedded generator's output."""
    if cfg.path:
        return str(cfg.path)
    out = cache_dir / "data" / f"{cfg.name}-n{cfg.num_records}-s{cfg.generator_seed}.jsonl"
    if not out.exists():  # whole or not at all: a sweep's other workers may be reading it
        with publishing(out, directory=False) as staged:
            write_jsonl(generate(cfg.num_records, cfg.generator_seed), staged)
    return str(out)


def _label(record: dict, messages: list[dict], label_field: str) -> str:
    """The record's own field, else a key of the JSON object the answer holds (the embedded task)."""
    value = record.get(label_field)
    if value is None:
        try:
            answer = json.loads(messages[-1]["content"])
            value = answer.get(label_field) if isinstance(answer, dict) else None
        except json.JSONDecodeError:
            value = None
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():  # a blank cell: no class
        raise RecordError(f"label field '{label_field}' is missing or empty (data.label_field)", "missing_label")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 beside 1 (a JSON writer's float, a Parquet column with nulls) is one class
    return str(value).strip()


def to_example(item: RawRecord, cfg: DataConfig, fields: dict[str, str]) -> Example:
    messages = to_messages(item.value, cfg.format, fields)
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    label = _label(item.value, messages, cfg.label_field) if cfg.label_field else None
    return Example(item.where, messages, label)


def load_examples(source: str, cfg: DataConfig) -> tuple[list[Example], list[dict]]:
    """Validated examples and rejects. Raises DataError (first few problems + total) unless on_error=skip."""
    if cfg.on_error not in ("raise", "skip"):
        raise DataError(f"data.on_error={cfg.on_error}: use raise or skip")
    fields = field_names(cfg.fields)
    examples, rejects = [], []
    for item in tqdm(read_records(source, cfg.hf_split, cfg.json_field), desc="validate", unit="rec", leave=False):
        if isinstance(item, RawRecord):
            try:
                examples.append(to_example(item, cfg, fields))
                continue
            except RecordError as e:
                e.where, e.raw = item.where, item.raw
                item = e
        rejects.append(item.as_reject())
    # Every record failing the same way: a setting (data.format, data.fields, data.label_field) is wrong, not the data.
    if not examples and len(rejects) > 1 and len({r["reason"] for r in rejects}) == 1:
        raise DataError(f"{source}: all {len(rejects)} records are unusable for the same reason (the first at "
                        f"{rejects[0]['where']}): {rejects[0]['reason']}")
    if rejects and cfg.on_error != "skip":
        shown = "\n".join(f"  {r['where']}: {r['reason']}" for r in rejects[:ERRORS_SHOWN])
        more = f"\n  ... and {len(rejects) - ERRORS_SHOWN} more" if len(rejects) > ERRORS_SHOWN else ""
        raise DataError(f"{len(rejects)} bad record(s) in {source}:\n{shown}{more}\n"
                        "Fix them, or set data.on_error=skip to drop them (each is written to a rejects file "
                        "with its reason).")
    if not examples:
        first = f"; the first: {rejects[0]['where']}: {rejects[0]['reason']}" if rejects else ""
        raise DataError(f"{source}: no usable records ({len(rejects)} rejected{first})")
    return examples, rejects


def fingerprint(train: list[Example], held_out: list[Example]) -> str:
    h = hashlib.sha256()
    for name, part in (("train", train), ("held_out", held_out)):
        h.update(name.encode())
        for e in part:
            h.update(json.dumps(e.messages, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def clean_and_split(examples: list[Example], rejects: list[dict], cfg: DataConfig, tokenizer,
                    max_seq_length: int) -> tuple[list[Example], list[Example], dict]:
    """Every cleaning step in order; the report's `steps` say how many records each kept."""
    steps = [{"step": "read", "records": len(examples) + len(rejects)},
             {"step": "valid", "records": len(examples), "dropped": len(rejects)}]
    counts = {"records_in": steps[0]["records"], "rejected_invalid": len(rejects)}

    def step(name: str, kept: list[Example], dropped: int) -> list[Example]:
        steps.append({"step": name, "records": len(kept), "dropped": dropped})
        return kept

    if cfg.dedupe:
        kept, counts["dropped_exact_duplicates"] = clean.drop_exact_duplicates(examples)
        examples = step("exact dedupe", kept, counts["dropped_exact_duplicates"])
        kept, counts["dropped_near_duplicates"] = clean.drop_near_duplicates(examples, cfg.near_dup_threshold)
        examples = step("near dedupe", kept, counts["dropped_near_duplicates"])
    kept, length_counts = clean.fit_length(examples, tokenizer, max_seq_length, cfg.overlong)
    counts.update(length_counts)
    examples = step(f"length <= {max_seq_length} ({cfg.overlong})", kept, length_counts["dropped_overlong"])
    if cfg.overlong == "truncate":
        steps[-1]["truncated"] = length_counts["truncated_overlong"]
    if not examples and cfg.overlong == "truncate":
        raise DataError(f"every record's prompt alone is longer than train.max_seq_length={max_seq_length} tokens "
                        "(data.overlong=truncate cuts answers only); raise it, or shorten the prompts")
    if not examples:
        raise DataError(f"every record is longer than train.max_seq_length={max_seq_length} tokens; raise it, "
                        "set data.overlong=truncate, or shorten the records")
    classes = {"before": clean.class_counts(examples)} if cfg.label_field else None
    if cfg.label_field:
        kept, counts["dropped_balance"] = clean.balance(examples, cfg.balance, cfg.balance_cap, cfg.split_seed)
        examples = step(f"balance ({cfg.balance})", kept, counts["dropped_balance"])
        classes["after"] = clean.class_counts(examples)
    elif cfg.balance != "none":
        raise DataError(f"data.balance={cfg.balance} needs data.label_field (the field that holds the class)")
    try:
        train, held_out = clean.split(examples, cfg.eval_size, cfg.split_seed)
    except DataError as e:  # say where the records went: 37 of 40 may be duplicates
        dropped = "; ".join(f"{s['step']} dropped {s['dropped']}" for s in steps if s.get("dropped"))
        raise DataError(f"{e} ({steps[0]['records']} read; {dropped})" if dropped else str(e)) from None
    counts.update(train_records=len(train), held_out_records=len(held_out))
    report = {"counts": counts, "steps": steps, "rejects_by_kind": dict(Counter(r["kind"] for r in rejects)),
              "tokens": _token_stats(examples), "classes": classes}
    return train, held_out, report


def _token_stats(examples: list[Example]) -> dict:
    stats = {}
    for name in ("prompt_tokens", "response_tokens", "tokens"):
        values = sorted(getattr(e, name) for e in examples)
        stats[name] = {"mean": round(sum(values) / len(values), 1), "p50": values[len(values) // 2],
                       "p95": values[int(0.95 * (len(values) - 1))], "max": values[-1], "total": sum(values)}
    return stats


# --------------------------------------------------------------------------- cache


def source_digest(source: str, hf_split: str) -> str:
    """Content hash of the source file (or of each file a directory's data is read from: not a rejects
    file or .DS_Store beside it, which would make a run another); a hub name hashes as itself.
    A trial asks for it up to three times (sweep.kept_trial, tracking.config_hash, cache_key):
    the files are read once per process while their size and mtime stay the same."""
    path = Path(source).expanduser()
    if path.is_dir():
        saved = is_saved_dataset(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and (not hidden(path, p) if saved else read_as_data(path, p)))
    else:
        files = [path] if path.exists() else []
    stamps = tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    return _digest_files(source, hf_split, stamps)


@functools.lru_cache(maxsize=16)
def _digest_files(source: str, hf_split: str, stamps: tuple) -> str:
    path = Path(source).expanduser()
    files = [Path(name) for name, _, _ in stamps]
    h = hashlib.sha256(f"{source}|{hf_split}".encode() if not files else b"")
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _digest_tokenizer(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((text + str(tokenizer.chat_template)).encode()).hexdigest()


def cache_key(source: str, cfg: DataConfig, tokenizer, max_seq_length: int) -> str:
    settings = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dataclasses.asdict(cfg)
    for where_only in ("rejects", "export_dir"):  # where outputs go does not change the data
        settings.pop(where_only, None)
    parts = [CACHE_VERSION, source_digest(source, cfg.hf_split), settings, _digest_tokenizer(tokenizer),
             max_seq_length]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _save(data: PreparedData, entry: Path) -> None:
    """Whole or not at all: parallel trials never read half an entry."""
    with publishing(entry) as tmp:
        for name, rows in (("train", data.train), ("held_out", data.held_out)):
            with (tmp / f"{name}.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in rows)
        _write_rejects(data.rejects, tmp / "rejects.jsonl")
        (tmp / "meta.json").write_text(json.dumps({"fingerprint": data.fingerprint, "source": data.source,
                                                   "report": data.report}, ensure_ascii=False))


def _load(entry: Path) -> PreparedData | None:
    if not (entry / "meta.json").exists():
        return None
    meta = json.loads((entry / "meta.json").read_text())

    def rows(name: str) -> list[dict]:
        with (entry / name).open(encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    return PreparedData([Example(**r) for r in rows("train.jsonl")], [Example(**r) for r in rows("held_out.jsonl")],
                        meta["fingerprint"], meta["source"], meta["report"], rows("rejects.jsonl"), cache_hit=True)


def _write_rejects(rejects: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)


# --------------------------------------------------------------------------- the stage


def prepare(cfg: DataConfig, tokenizer, max_seq_length: int, cache_dir: Path) -> PreparedData:
    source = resolve_source(cfg, cache_dir)
    entry = cache_dir / "data" / "prepared" / cache_key(source, cfg, tokenizer, max_seq_length)
    data = _load(entry) if cfg.cache else None
    if data is None:
        examples, rejects = load_examples(source, cfg)
        train, held_out, report = clean_and_split(examples, rejects, cfg, tokenizer, max_seq_length)
        report = {"source": source, **report, "rejects_file": str(entry / "rejects.jsonl") if cfg.cache else None}
        data = PreparedData(train, held_out, fingerprint(train, held_out), source, report, rejects)
        if cfg.cache:
            _save(data, entry)
    if len(data.held_out) > len(data.train):  # the default 40 on a small file: most of it would go unlearned
        log.warning("data.eval_size=%g holds out %d of %d cleaned records, more than the %d left to train on; set "
                    "data.eval_size to a fraction (e.g. 0.2) or a smaller count", cfg.eval_size, len(data.held_out),
                    len(data.held_out) + len(data.train), len(data.train))
    if cfg.rejects:
        _write_rejects(data.rejects, Path(cfg.rejects).expanduser())
        data.report["rejects_file"] = str(Path(cfg.rejects).expanduser())
    return data
