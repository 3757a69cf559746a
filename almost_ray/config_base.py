"""The base of every config section: strict pydantic models, and the error a bad config raises.

Kept apart from `config.py` so a stage can define its own section beside its code (`rl/config.py`)
without importing every other stage's settings.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, line and field."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
