"""The base of every config section: strict pydantic models, the error a bad config raises, and the hash
manifests record to decide whether a stage must run again.

Kept apart from `config.py` so a stage can define its own section beside its code (`rl/config.py`)
without importing every other stage's settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, line and field."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StageSection(StrictModel):
    """Base of a stage's section: where the stage writes (the CLI's `--output` sets it)."""

    output_dir: Path | None = Field(
        default=None, description="the stage's folder; null: <runs_dir>/<run_name>/<its folder> (runs/paths.py)"
    )


def config_hash(section: BaseModel) -> str:
    """A stable hash of a config section, recorded in manifests to decide whether to redo a stage."""
    blob = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
