"""Read records from files and normalise every supported format to chat messages.

Formats: alpaca (instruction/input/output), sharegpt (conversations from/value),
messages (role/content) and prompt_completion. A record that cannot be normalised
raises RecordError with a reason; the caller attaches file:line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(ValueError):
    """One record is unusable; the message says why."""


@dataclass
class RawRecord:
    where: str  # "file:line" (or "file:row N")
    value: object


def read_jsonl(path: Path) -> Iterator[RawRecord | RecordError]:
    """Yield each line's JSON value, or a RecordError for lines that are not valid UTF-8 JSON."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RecordError(f"{where}: invalid UTF-8 at byte {e.start}")
                continue
            text = text.lstrip("\ufeff").strip()
            if not text:
                continue
            try:
                yield RawRecord(where, json.loads(text))
            except json.JSONDecodeError as e:
                yield RecordError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    raise RecordError(
        f"cannot tell the format from its fields {sorted(record)[:8]}; expected one of "
        "instruction/output (alpaca), conversations (sharegpt), messages, prompt/completion "
        "(or set data.format)"
    )


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing or null field '{key}'")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value


def _check_turns(messages: list[dict]) -> list[dict]:
    if not messages:
        raise RecordError("conversation is empty")
    if messages[-1]["role"] != "assistant":
        raise RecordError("conversation does not end with an assistant turn")
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("conversation has no user turn")
    return messages


def to_messages(record: object, fmt: str) -> list[dict]:
    """Normalise one record to [{"role", "content"}, ...] ending with the assistant's answer."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "alpaca":
        instruction = _text(record, "instruction")
        extra = _text(record, "input", required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": _text(record, "prompt")},
                {"role": "assistant", "content": _text(record, "completion")}]
    if fmt in ("messages", "sharegpt"):
        key, role_key, content_key = (
            ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
        )
        turns = record.get(key)
        if not isinstance(turns, list):
            raise RecordError(f"field '{key}' must be a list of turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError(f"{key}[{i}] must be an object")
            role = turn.get(role_key)
            role = SHAREGPT_ROLES.get(role) if fmt == "sharegpt" else (role if role in ROLES else None)
            if role is None:
                raise RecordError(f"{key}[{i}] has unknown role {turn.get(role_key)!r}")
            messages.append({"role": role, "content": _text(turn, content_key)})
        return _check_turns(messages)
    raise RecordError(f"unknown data.format '{fmt}' (alpaca, sharegpt, messages, prompt_completion, auto)")
