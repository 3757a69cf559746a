"""Typed records that flow between stages, and writing them as JSON Lines (atomically).

Field names follow TRL so data can be taken elsewhere: comparisons are `{"prompt", "chosen",
"rejected", ...}`, dialogues are `{"messages": [{"role", "content"}], ...}`. Records keep any extra
metadata fields they are given (rung names, scores, ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from almost_ray.data.atomic import atomic_open

# A conversation: `{"role": "system" | "user" | "assistant", "content": str}` messages (TRL's
# conversational form). The one definition; templates, preferences, RMSP, SFT and the RM use it.
Messages = list[dict[str, str]]



class RecordError(ValueError):
    """A malformed input record; the message names the file, line and field."""


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class Query(Record):
    """A user query that starts a comparison or a dialogue."""

    id: str
    text: str = Field(min_length=1)
    source: str = "seed"


class Response(Record):
    """One generator's answers to one query (`responses` holds the n samples)."""

    query_id: str
    prompt: str
    responses: list[str]
    generator: str = ""


class Comparison(Record):
    """A chosen/rejected pair for reward-model training (TRL's preference format)."""

    prompt: str
    chosen: str
    rejected: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Dialogue(Record):
    """A conversation in TRL's conversational format: an optional system turn, then user and assistant
    turns alternating (two turns of one speaker in a row are a broken record, not a conversation)."""

    messages: list[Message] = Field(min_length=1)

    @model_validator(mode="after")
    def _roles_alternate(self) -> Dialogue:
        for i in range(1, len(self.messages)):
            role, before = self.messages[i].role, self.messages[i - 1].role
            if role == "system":
                raise ValueError(f"messages.{i}.role: a system turn may only come first")
            if role == before:
                raise ValueError(f"messages.{i}.role: two {role!r} turns in a row (roles must alternate)")
        return self


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> int:
    """Write records as JSON Lines atomically; returns the number written."""
    count = 0
    with atomic_open(path) as f:
        for rec in records:
            obj = rec.model_dump(mode="json") if isinstance(rec, BaseModel) else rec
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            count += 1
    return count


def field_error(err: ValidationError) -> str:
    """`field: message` of a record's first validation error. A record-level check (a model validator)
    names its own field at the start of its message (`messages.1.role: ...`), which is kept as is."""
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in first["loc"])
    return f"{field}: {msg}" if field else msg
