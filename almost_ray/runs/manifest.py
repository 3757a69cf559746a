"""Stage bookkeeping: `runs/<run>/<stage>/manifest.json`, and whether a stage can be skipped.

A manifest records the stage's config and its hash, every seed in that config (`seeds`, by dotted
path), the hashes of its inputs, record counts, metrics, package versions, wall time and peak memory
(`memory.py`: the driver's, and that of each actor the stage started). A stage whose manifest matches
its current config and inputs is skipped on re-run, so a crashed pipeline resumes; anything else is redone.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from almost_ray.data.cards import write_card
from almost_ray.config_base import config_hash
from almost_ray.cluster.memory import stage_memory
from almost_ray.data.atomic import write_json
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


def write_manifest(
    stage_dir: str | Path,
    stage: str,
    section: BaseModel,
    inputs: dict[str, str | Path],
    started: float,
    counts: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the manifest last: its presence means the stage's outputs are complete.

    A data stage's dataset card (`cards.py`) is written just before it, from the same record."""
    manifest = {
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
    write_card(stage_dir, stage, manifest)
    write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


def reset_if_changed(out_dir: str | Path, sources: list[str | Path]) -> None:
    """Empty `out_dir` when the files it was computed from changed since the last call.

    For outputs whose own skip check knows a model only by its path (`eval.run`, `generate.run`): a
    model retrained at the same path must not be answered from the old model's cached results.
    """
    import shutil

    stamp = json.dumps([input_hash(p) for p in sources if Path(p).exists()])
    out_dir = Path(out_dir)
    marker = out_dir / "sources.hash"
    if marker.is_file() and marker.read_text() != stamp:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp)
