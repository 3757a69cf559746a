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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    """A conversation in TRL's conversational format."""

    messages: list[Message] = Field(min_length=1)


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
    """`(line number, object)` for each non-blank line of a JSONL file (numbers count blank lines too)."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise RecordError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None


def read_jsonl(path: str | Path, record_type: type[R] | None = None) -> Iterator[R | dict]:
    """Yield records from a JSONL file; blank lines are skipped, bad lines raise `RecordError`."""
    for lineno, obj in numbered_rows(path):
        if record_type is None:
            yield obj
            continue
        try:
            yield record_type.model_validate(obj)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "<record>"
            raise RecordError(
                f"{path}:{lineno}: {field}: {first['msg']} (in a {record_type.__name__} record)"
            ) from None


def load_queries(path: str | Path) -> list[Query]:
    """Queries from `.jsonl` (Query records) or `.txt` (one query per line, ids are line numbers)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return list(read_jsonl(path, Query))
    if not path.exists():
        raise RecordError(f"{path}: file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Query(id=f"{path.stem}-{i}", text=t.strip()) for i, t in enumerate(lines, 1) if t.strip()]
