"""Where a stage's input rows come from: JSON Lines, or a Hugging Face dataset in any of its forms.

TRL and OpenRLHF users keep data as Hugging Face datasets, so every place that takes an input file takes
a *source* spec instead:

- `data.jsonl` — JSON Lines (the project's own format); rows are numbered by line;
- `data.parquet`, or a directory of `*.parquet` files — read batch by batch with pyarrow, never whole;
- a `Dataset.save_to_disk` directory (it holds `dataset_info.json`/`state.json`, or a `DatasetDict`'s
  `dataset_dict.json`) — memory-mapped Arrow;
- a hub id `org/name` — `datasets.load_dataset` (the local cache is used when present; a machine that
  cannot reach the hub gets a one-line error that says so).

Options follow the path as a query string: `?split=test` (default `train`), `&subset=NAME` (a dataset
config), `&data_dir=DIR`, and `&columns=theirs:ours,...` to rename columns that differ from ours (HH-RLHF
needs none; a prompts column named `input` is `columns=input:text`). Rows of a dataset are numbered by
their row index (0-based, as `dataset[i]`), which error messages show where a JSONL line number would be.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs

from pydantic import BaseModel, ValidationError

from almost_ray.data.records import Query, RecordError, field_error

R = TypeVar("R", bound=BaseModel)

SourceKind = Literal["jsonl", "text", "parquet", "disk", "hub"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OPTIONS = ("split", "subset", "data_dir", "columns")


@dataclass(frozen=True)
class Source:
    """A parsed source spec: what to read, and how its columns map onto ours."""

    spec: str
    kind: SourceKind
    location: str  # a local path, or the hub id
    split: str = "train"
    subset: str | None = None
    data_dir: str | None = None
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.location)

    def rename(self, row: Any) -> Any:
        if not self.columns or not isinstance(row, dict):
            return row
        return {self.columns.get(k, k): v for k, v in row.items()}


def parse_source(spec: str | Path) -> Source:
    """Classify a spec (see the module docstring); raises RecordError for options we do not know."""
    text = str(spec)
    location, options = text, {}
    if "?" in text and not Path(text).exists():
        location, query = text.split("?", 1)
        parsed = parse_qs(query, keep_blank_values=True)
        unknown = sorted(set(parsed) - set(_OPTIONS))
        if unknown:
            raise RecordError(f"{text}: unknown source option(s) {unknown}; known: {', '.join(_OPTIONS)}")
        options = {k: v[-1] for k, v in parsed.items()}
    columns = {}
    for pair in filter(None, options.pop("columns", "").split(",")):
        theirs, sep, ours = pair.partition(":")
        if not sep or not theirs or not ours:
            raise RecordError(f"{text}: columns: expected 'theirs:ours' pairs, got {pair!r}")
        columns[theirs] = ours
    path = Path(location).expanduser()
    kind: SourceKind
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            kind = "disk"
        elif any(path.glob("*.parquet")):
            kind = "parquet"
        else:
            raise RecordError(f"{location}: a directory that is neither a save_to_disk dataset nor Parquet files")
    elif path.suffix == ".parquet":
        kind = "parquet"
    elif path.suffix == ".jsonl" or path.suffix == ".json":
        kind = "jsonl"
    elif path.suffix == ".txt":
        kind = "text"
    elif not path.exists() and _HUB_ID.match(location):
        kind = "hub"
    else:
        kind = "jsonl"  # an unknown suffix is read as JSON Lines, and errors say which line is wrong
    return Source(spec=text, kind=kind, location=location if kind == "hub" else str(path),
                  split=options.get("split") or "train", subset=options.get("subset") or None,
                  data_dir=options.get("data_dir") or None, columns=columns)


def require(spec: str | Path, field: str, made_by: str | None = None) -> None:
    """A local input named by config `field` exists, else a one-line error naming the field (and, for a
    default path another stage writes, the command that writes it). Hub ids are left to the hub."""
    source = parse_source(spec)
    if source.kind != "hub" and not source.path.exists():
        hint = f" (run `almost-ray {made_by}` first, or set {field})" if made_by else ""
        raise RecordError(f"{field}: {spec}: file not found{hint}")


def iter_rows(spec: str | Path) -> Iterator[tuple[int, Any]]:
    """`(row number, row)` for every row of a source, columns renamed; JSONL rows numbered by line."""
    source = parse_source(spec)
    if source.kind == "jsonl":
        yield from ((n, source.rename(row)) for n, row in _jsonl_rows(source.path))
    elif source.kind == "text":
        yield from ((n, {"text": line}) for n, line in _text_lines(source.path))
    elif source.kind == "parquet":
        yield from ((n, source.rename(row)) for n, row in _parquet_rows(source.path))
    else:
        dataset = _load_dataset(source)
        for index, row in enumerate(dataset):
            yield index, source.rename(row)


def read_rows(path: str | Path, record_type: type[R] | None = None) -> Iterator[R | dict]:
    """Yield records from a JSONL file; blank lines are skipped, bad lines raise `RecordError`."""
    for lineno, obj in iter_rows(path):
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
    """Queries from any source: Query rows, or one query per line of a `.txt`.

    A row without an `id` gets `<file stem>-<row number>`, so a plain prompts dataset (a `text`
    column, or another column renamed with `?columns=prompt:text`) needs no ids.
    """
    queries: list[Query] = []
    first_seen: dict[str, int] = {}
    for number, obj in iter_rows(path):
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
    if not queries:
        raise RecordError(f"{path}: no rows")
    return queries


def source_hash(spec: str | Path) -> str:
    """Content hash of an input: a file's bytes; for a directory (a dataset, or a model) its files' names,
    sizes and mtimes; a hub id hashes its spec (the manifest then says which id, split and subset were
    read, not their content). Column renames count."""
    local = Path(str(spec)).expanduser()
    source = None if local.exists() else parse_source(spec)
    path = local if source is None else source.path
    h = hashlib.sha256()
    if source is not None and source.kind == "hub":
        h.update(source.spec.encode())
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if source is not None and source.columns:
        h.update(json.dumps(source.columns, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    if not path.exists():
        raise RecordError(f"{path}: file not found")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordError(f"{path}:{lineno}: not valid UTF-8 (byte {err.start})") from None
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise RecordError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.exists():
        raise RecordError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise RecordError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    return ((n, t.strip()) for n, t in enumerate(lines, start=1) if t.strip())


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise RecordError(f"{path}: file not found")
    index = 0
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as err:  # pyarrow raises its own error types for a file that is not Parquet
            raise RecordError(f"{file}: not a Parquet file ({err})") from None
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield index, row
                index += 1


def _load_dataset(source: Source):
    import datasets

    datasets.utils.logging.disable_progress_bar()
    if source.kind == "disk":
        loaded = datasets.load_from_disk(source.location)
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise RecordError(f"{source.spec}: no split {source.split!r}; it has {sorted(loaded)}")
            loaded = loaded[source.split]
        return loaded
    try:
        return datasets.load_dataset(
            source.location, name=source.subset, data_dir=source.data_dir, split=source.split
        )
    except Exception as err:  # offline, unknown id, unknown split: datasets raises many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecordError(
            f"{source.spec}: cannot load hub dataset {source.location!r} (split {source.split!r}): {first}. "
            "If this machine cannot reach the Hugging Face Hub, save it elsewhere with "
            "`load_dataset(...).save_to_disk(DIR)` and pass DIR"
        ) from None
