"""Typed records that flow between stages, and atomic JSONL I/O.

Field names follow TRL so data can be taken elsewhere: comparisons are `{"prompt", "chosen",
"rejected", ...}`, dialogues are `{"messages": [{"role", "content"}], ...}`. Records keep any extra
metadata fields they are given (rung names, scores, ids).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


R = TypeVar("R", bound=BaseModel)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`, else delete it.

    Readers never see a half-written file, and a crash leaves the previous version intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: object) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> int:
    """Write records as JSON Lines atomically; returns the number written."""
    count = 0
    with atomic_open(path) as f:
        for rec in records:
            obj = rec.model_dump(mode="json") if isinstance(rec, BaseModel) else rec
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            count += 1
    return count


def numbered_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """`(row number, object)` for each row of an input: a JSONL file's non-blank lines (numbered by line,
    blank lines counted), or a Parquet file, `save_to_disk` directory or hub dataset (numbered by row
    index). `path` is a source spec with optional `?split=...&columns=...` (see `sources.py`)."""
    from almost_ray.data.sources import iter_rows

    yield from iter_rows(path)


def field_error(err: ValidationError) -> str:
    """`field: message` of a record's first validation error. A record-level check (a model validator)
    names its own field at the start of its message (`messages.1.role: ...`), which is kept as is."""
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in first["loc"])
    return f"{field}: {msg}" if field else msg


def read_jsonl(path: str | Path, record_type: type[R] | None = None) -> Iterator[R | dict]:
    """Yield records from a JSONL file; blank lines are skipped, bad lines raise `RecordError`."""
    for lineno, obj in numbered_rows(path):
        if record_type is None:
            yield obj
            continue
        try:
            yield record_type.model_validate(obj)
        except ValidationError as err:
            raise RecordError(f"{path}:{lineno}: {field_error(err)} (in a {record_type.__name__} record)") from None


def row_id(path: str | Path, number: int) -> str:
    """The id of a row that has none: `<file stem>-<row number>` (a .txt query file's ids since the start)."""
    return f"{Path(str(path).split('?', 1)[0]).stem}-{number}"


def load_queries(path: str | Path) -> list[Query]:
    """Queries from any source (`sources.py`): Query rows, or one query per line of a `.txt`.

    A row without an `id` gets `<file stem>-<row number>`, so a plain prompts dataset (a `text`
    column, or another column renamed with `?columns=prompt:text`) needs no ids.
    """
    queries: list[Query] = []
    first_seen: dict[str, int] = {}
    for number, obj in numbered_rows(path):
        if isinstance(obj, dict) and "id" not in obj:
            obj = {**obj, "id": row_id(path, number)}
        try:
            queries.append(Query.model_validate(obj))
        except ValidationError as err:
            raise RecordError(f"{path}:{number}: {field_error(err)} (in a Query record)") from None
        query_id = queries[-1].id
        if query_id in first_seen:
            raise RecordError(f"{path}:{number}: id: duplicate id {query_id!r} (first at {first_seen[query_id]})")
        first_seen[query_id] = number
    return queries
