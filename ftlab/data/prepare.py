"""The data stage: load -> validate -> clean -> split -> fingerprint, with a report.

Deduplication (exact, then MinHash near-duplicates) runs before the split, so no
held-out example has a near-duplicate in train. Length is measured in tokens of
the model's own tokenizer, with its chat template applied.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from datasketch import MinHash, MinHashLSH
from tqdm.auto import tqdm

from ftlab.config import DataConfig
from ftlab.data.formats import RecordError, read_jsonl, to_messages
from ftlab.data.generate import generate, write_jsonl


class DataError(ValueError):
    """Bad input data: the message names the file and line of each problem."""


@dataclass
class Example:
    where: str
    messages: list[dict]

    @property
    def prompt(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class PreparedData:
    train: list[Example]
    held_out: list[Example]
    fingerprint: str
    source: str
    report: dict = field(default_factory=dict)

    def trl_rows(self, split: str) -> list[dict]:
        """TRL's conversational prompt-completion rows: loss falls on the completion only."""
        return [{"prompt": e.prompt, "completion": e.messages[-1:]} for e in getattr(self, split)]


def resolve_source(cfg: DataConfig, cache_dir: Path) -> Path:
    """The data file to read: the user's, or the embedded generator's output."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"data.path: {path} does not exist")
        return path
    out = cache_dir / "data" / f"{cfg.name}-n{cfg.num_records}-s{cfg.generator_seed}.jsonl"
    if not out.exists():
        write_jsonl(generate(cfg.num_records, cfg.generator_seed), out)
    return out


def load_examples(path: Path, cfg: DataConfig) -> tuple[list[Example], list[tuple[str, str]]]:
    """Validated examples and (where, reason) rejects. Raises DataError unless on_error=skip."""
    examples, rejects = [], []
    for item in tqdm(read_jsonl(path), desc="validate", unit="rec", leave=False):
        if isinstance(item, RecordError):
            where, reason = str(item).split(": ", 1)
            rejects.append((where, reason))
            continue
        try:
            messages = to_messages(item.value, cfg.format)
        except RecordError as e:
            rejects.append((item.where, str(e)))
            continue
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        examples.append(Example(item.where, messages))
    if rejects and cfg.on_error != "skip":
        shown = "\n".join(f"  {w}: {r}" for w, r in rejects[:5])
        raise DataError(
            f"{len(rejects)} bad record(s) in {path}:\n{shown}"
            + ("\n  ..." if len(rejects) > 5 else "")
            + "\nFix them, or set data.on_error=skip to drop them (they are written to a rejects file)."
        )
    if not examples:
        raise DataError(f"{path}: no usable records")
    return examples, rejects


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _record_text(example: Example) -> str:
    return _normalise(" ".join(m["content"] for m in example.messages))


def drop_exact_duplicates(examples: list[Example]) -> tuple[list[Example], int]:
    seen, kept = set(), []
    for e in examples:
        key = hashlib.sha1(_record_text(e).encode()).digest()
        if key not in seen:
            seen.add(key)
            kept.append(e)
    return kept, len(examples) - len(kept)


def _minhash(text: str, num_perm: int) -> MinHash:
    words = re.findall(r"\w+", text)
    shingles = {" ".join(words[i : i + 3]).encode() for i in range(max(1, len(words) - 2))}
    m = MinHash(num_perm=num_perm)
    m.update_batch(list(shingles))
    return m


def drop_near_duplicates(examples: list[Example], threshold: float, num_perm: int = 128) -> tuple[list[Example], int]:
    """Keep the first of each group whose estimated Jaccard similarity is >= threshold."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept = []
    for i, e in enumerate(tqdm(examples, desc="near-dup", unit="rec", leave=False)):
        m = _minhash(_record_text(e), num_perm)
        if lsh.query(m):
            continue
        lsh.insert(str(i), m)
        kept.append(e)
    return kept, len(examples) - len(kept)


def token_length(tokenizer, example: Example) -> int:
    return len(tokenizer.apply_chat_template(example.messages, tokenize=True, return_dict=False))


def filter_length(examples: list[Example], tokenizer, max_tokens: int) -> tuple[list[Example], int, list[int]]:
    kept, lengths = [], []
    for e in tqdm(examples, desc="tokenize", unit="rec", leave=False):
        n = token_length(tokenizer, e)
        if n <= max_tokens:
            kept.append(e)
            lengths.append(n)
    return kept, len(examples) - len(kept), lengths


def split(examples: list[Example], eval_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    n_eval = int(round(eval_size * len(examples))) if eval_size < 1 else int(eval_size)
    if not 0 < n_eval < len(examples):
        raise DataError(f"data.eval_size={eval_size} leaves no train or no held-out data from {len(examples)} records")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    train = sorted(order[n_eval:])
    return [examples[i] for i in train], [examples[i] for i in held]


def fingerprint(train: list[Example], held_out: list[Example]) -> str:
    h = hashlib.sha256()
    for name, part in (("train", train), ("held_out", held_out)):
        h.update(name.encode())
        for e in part:
            h.update(json.dumps(e.messages, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def prepare(cfg: DataConfig, tokenizer, max_seq_length: int, cache_dir: Path) -> PreparedData:
    path = resolve_source(cfg, cache_dir)
    examples, rejects = load_examples(path, cfg)
    counts = {"records_in": len(examples) + len(rejects), "rejected_invalid": len(rejects)}
    if cfg.dedupe:
        examples, counts["dropped_exact_duplicates"] = drop_exact_duplicates(examples)
        examples, counts["dropped_near_duplicates"] = drop_near_duplicates(examples, cfg.near_dup_threshold)
    examples, counts["dropped_overlong"], lengths = filter_length(examples, tokenizer, max_seq_length)
    if not examples:
        raise DataError(
            f"{path}: every record is longer than train.max_seq_length={max_seq_length} tokens "
            f"({counts['dropped_overlong']} dropped); raise train.max_seq_length or shorten the records"
        )
    train, held_out = split(examples, cfg.eval_size, cfg.split_seed)
    counts.update(train_records=len(train), held_out_records=len(held_out))
    report = {
        "source": str(path),
        "counts": counts,
        "rejects": [{"where": w, "reason": r} for w, r in rejects],
        "tokens": {"mean": sum(lengths) / len(lengths), "max": max(lengths), "total": sum(lengths)},
    }
    return PreparedData(train, held_out, fingerprint(train, held_out), str(path), report)
