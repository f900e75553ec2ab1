"""The data stage's vocabulary: one cleaned example, and the two errors (a bad record,
a bad data set). Kept apart so readers, cleaning and the report share them without cycles."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


class DataError(ValueError):
    """Bad input data or data settings: the message names the file:line (or config key) and what to do."""


class RecordError(ValueError):
    """One record is unusable. `kind` groups reasons in the report; `where` is file:line."""

    def __init__(self, reason: str, kind: str, where: str = "", raw: str = ""):
        super().__init__(reason)
        self.reason, self.kind, self.where, self.raw = reason, kind, where, raw

    def as_reject(self) -> dict:
        return {"where": self.where, "kind": self.kind, "reason": self.reason, "record": self.raw}


@dataclass
class Example:
    where: str  # file:line (or row) it came from, so every cleaned example can be traced back
    messages: list[dict]
    label: Optional[str] = None
    prompt_tokens: int = 0
    response_tokens: int = 0

    @property
    def prompt(self) -> list[dict]:
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    def to_dict(self) -> dict:
        return asdict(self)

