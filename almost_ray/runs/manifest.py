"""Stage bookkeeping: `runs/<run>/<stage>/manifest.json`, and whether a stage can be skipped.

A manifest records the stage's config and its hash, every seed in that config (`seeds`, by dotted
path), the hashes of its inputs, record counts, metrics, package versions, wall time and peak memory
(`memory.py`: the driver's, and that of each actor the stage started). A stage whose manifest matches
its current config and inputs is skipped on re-run, so a crashed pipeline resumes; anything else is redone.
"""

from __future__ import annotations

import fnmatch
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from almost_ray.cluster.memory import stage_memory
from almost_ray.config_base import config_hash
from almost_ray.data.atomic import own_directory, remove_own_directory, write_json
from almost_ray.data.sources import source_hash

MANIFEST = "manifest.json"
_VERSIONED = ("almost-ray", "torch", "transformers", "ray", "vllm")


def input_hash(path: str | Path) -> str:
    """Content hash of an input source (a file, a model or dataset directory, a hub id): `sources.source_hash`."""
    return source_hash(path)


def versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def seeds(section: BaseModel) -> dict[str, int]:
    """Every `seed` field of a stage config by dotted path (`seed`, `ladder.0.sampling.seed`, ...):
    with the config hash and the versions, what a re-run needs to reproduce the outputs."""
    found: dict[str, int] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                where = f"{path}.{key}" if path else key
                if key == "seed" and isinstance(sub, int):
                    found[where] = sub
                else:
                    walk(sub, where)
        elif isinstance(value, list):
            for i, sub in enumerate(value):
                walk(sub, f"{path}.{i}")

    walk(section.model_dump(mode="json"), "")
    return found


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(stage_dir: str | Path, section: BaseModel, inputs: dict[str, str | Path]) -> bool:
    """True when the stage already ran to completion with this config and these inputs."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return False
    return manifest.get("config_hash") == config_hash(section) and manifest.get("inputs") == {
        k: input_hash(v) for k, v in inputs.items()
    }


def build_manifest(
    stage: str,
    section: BaseModel,
    inputs: dict[str, str | Path],
    started: float,
    counts: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A stage's record: what it ran with (config, seeds, inputs, versions) and what it made (counts,
    metrics, wall time, peak memory)."""
    return {
        "stage": stage,
        "config": section.model_dump(mode="json"),
        "config_hash": config_hash(section),
        "seeds": seeds(section),
        "inputs": {k: input_hash(v) for k, v in inputs.items()},
        "counts": counts or {},
        "metrics": metrics or {},
        "versions": versions(),
        "wall_time_s": round(time.time() - started, 2),
        "memory": stage_memory(started),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_manifest(stage_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Written last: its presence means the stage's outputs are complete."""
    write_json(Path(stage_dir) / MANIFEST, manifest)


def flatten(value, prefix: str = "") -> dict[str, float | int | bool]:
    """The numbers of a nested dict as dotted keys (strings, lists and None are left out)."""
    out: dict[str, float | int | bool] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, (int, float, bool)) and prefix:
        out[prefix] = value
    return out


def summary(manifest: dict) -> dict:
    """What a stage's manifest says in numbers: counts, metrics (flattened) and wall time."""
    return {
        "stage": manifest.get("stage"),
        "counts": flatten(manifest.get("counts", {})),
        "metrics": flatten(manifest.get("metrics", {})),
        "wall_time_s": manifest.get("wall_time_s"),
        "finished_at": manifest.get("finished_at"),
        "memory": manifest.get("memory"),
    }


def summary_line(headline: tuple[str, ...], s: dict, limit: int = 10) -> str:
    """`key=value` pairs of a summary's numbers that match the `headline` patterns (all when empty), in one line."""
    numbers = {**{f"counts.{k}": v for k, v in s["counts"].items()},
               **{f"metrics.{k}": v for k, v in s["metrics"].items()}}
    if headline:
        numbers = {k: v for k, v in numbers.items() if any(fnmatch.fnmatchcase(k, p) for p in headline)}
    parts = [f"{k.split('.', 1)[1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
             for k, v in list(numbers.items())[:limit]]
    return ", ".join(parts) or "(no counts)"


def reset_if_changed(out_dir: str | Path, sources: list[str | Path]) -> None:
    """Empty `out_dir` when the files it was computed from changed since the last call.

    For outputs whose own skip check knows a model only by its path (`eval.run`, `generate.run`): a
    model retrained at the same path must not be answered from the old model's cached results.
    """
    stamp = json.dumps([input_hash(p) for p in sources if Path(p).exists()])
    out_dir = Path(out_dir)
    marker = out_dir / "sources.hash"
    if marker.is_file() and marker.read_text() != stamp:
        remove_own_directory(out_dir)
    own_directory(out_dir)
    marker.write_text(stamp)
