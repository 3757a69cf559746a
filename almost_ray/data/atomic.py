"""Writing outputs so that a crash never leaves half of one, and no command deletes what it did not write.

- `atomic_open`: a file is written beside its final path, fsynced and renamed over it; readers never see
  a half-written file, and a crash leaves the previous version intact.
- `atomic_directory`: the same for a folder (a saved model, a checkpoint, an exported dataset): it is
  built in a hidden temp folder beside its final path and renamed into place whole.
- Ownership: every folder this project writes whole, or creates to fill and later empty (resumable
  parts, replayable rounds), carries `MARKER`. A folder is replaced or removed only when it holds the
  marker (or is empty); anything else is refused with `NotOursError` before any work starts, so
  `almost-ray export --to .` cannot empty the current folder and `--to runs` cannot delete a run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

MARKER = ".almost-ray-output"
_MARKER_TEXT = "Written by almost-ray: a later run may replace or remove this folder.\n"


class NotOursError(ValueError):
    """A folder the project would replace or remove holds something it did not write."""


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync and rename it over `path`, else delete it."""
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


def is_ours(path: Path) -> bool:
    """True when `path` may be replaced or removed: absent, an empty folder, or a folder with our marker."""
    if not path.exists():
        return True
    return path.is_dir() and ((path / MARKER).is_file() or not any(path.iterdir()))


def check_replaceable(path: str | Path) -> None:
    """Raise `NotOursError` naming `path` when a run would have to delete something it did not write."""
    path = Path(path)
    if not is_ours(path):
        what = "a file" if not path.is_dir() else "a folder almost-ray did not write"
        raise NotOursError(f"{path}: {what} is already there and is never replaced; "
                           "choose a new folder, or move it away yourself")


@contextmanager
def atomic_directory(path: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a hidden temp folder beside `path`; when the block succeeds it becomes `path`, whole.

    An existing `path` is replaced only when `is_ours` (checked before the block runs, so a refusal
    costs no work); with `keep_existing` a `path` that appeared meanwhile is kept instead (the model
    cache: another process converted the same model first, and its copy is identical).
    """
    path = Path(path)
    if not keep_existing:
        check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / MARKER).write_text(_MARKER_TEXT)  # a killed run's temp folder is ours to remove later
        yield tmp
        if path.exists() and keep_existing:
            return
        if path.exists():
            check_replaceable(path)
            old = tmp.with_name(f"{tmp.name}.old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, path)
            except OSError:
                if not (keep_existing and path.exists()):  # lost a race to an identical copy: keep it
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def own_directory(path: str | Path) -> Path:
    """Create `path` (parents too) as a folder this project fills and may later empty: it gets the marker.
    An existing folder without the marker is refused, unless it is empty."""
    path = Path(path)
    check_replaceable(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(_MARKER_TEXT)
    return path


def remove_own_directory(path: str | Path) -> None:
    """Delete a folder this project made (`own_directory`, `atomic_directory`); refuse anything else."""
    path = Path(path)
    if not path.exists():
        return
    check_replaceable(path)
    shutil.rmtree(path)
