"""The one shape of a stage: config in, files out, a manifest last.

Every stage module (`synth/queries.py`, `train/rm.py`, `rl/stage.py`, ...) defines `STAGE = Stage(...)`
and `run(cfg: Config) -> Path`, which is `STAGE.run(cfg)`. What makes a stage a stage lives here once:

1. `check(cfg)`: every input the stage reads is validated (config references, data rows and their
   fields, model references and their kind) before Ray starts, a model is converted or loaded, or a file
   is written: bad input stops the stage in seconds with one line naming file:line and field;
2. skip when done: a stage whose manifest matches its config section and the hashes of its inputs, and
   whose outputs exist, is not run again (a crashed pipeline resumes where it stopped);
3. `work(cfg)`: the stage itself, returning its counts and metrics;
4. the dataset card of a data stage, then `manifest.json` last: its presence means the outputs are whole.

The pipeline (`pipeline/`) runs stages in order through the same `run`; it never reaches into one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from almost_ray.config import Config
from almost_ray.data.atomic import check_replaceable
from almost_ray.data.cards import write_card
from almost_ray.runs import paths
from almost_ray.runs.manifest import build_manifest, is_done, write_manifest


@dataclass
class Outcome:
    """What a stage's work reports for its manifest."""

    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def _nothing_to_check(cfg: Config) -> None:
    return None


def _no_notes(cfg: Config) -> list[str]:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage: its name in the data-flow picture (docs/architecture.md), what it reads and writes."""

    name: str
    about: str
    section: Callable[[Config], BaseModel]  # the config it runs with: the manifest hashes it
    inputs: Callable[[Config], dict[str, Path | str]]  # what it reads; the manifest hashes their content
    outputs: Callable[[Config], dict[str, Path]]  # what it leaves for later stages
    work: Callable[[Config], Outcome]
    check: Callable[[Config], None] = _nothing_to_check
    headline: tuple[str, ...] = ()  # fnmatch patterns of manifest numbers the pipeline prints (empty: all)
    notes: Callable[[Config], list[str]] = _no_notes  # what it will leave out, and why
    folder: Callable[[Config], Path] | None = None  # its folder, when not `runs.paths.stage_dir(cfg, name)`

    def stage_dir(self, cfg: Config) -> Path:
        return self.folder(cfg) if self.folder is not None else paths.stage_dir(cfg, self.name)

    def done(self, cfg: Config, inputs: dict[str, Path | str] | None = None) -> bool:
        """The manifest matches this config and these inputs, and every output exists."""
        inputs = self.inputs(cfg) if inputs is None else inputs
        return (is_done(self.stage_dir(cfg), self.section(cfg), inputs)
                and all(Path(p).exists() for p in self.outputs(cfg).values()))

    def run(self, cfg: Config) -> Path:
        """Check, skip when done, work, then the card and the manifest; returns the stage's folder."""
        self.check(cfg)
        stage_dir = self.stage_dir(cfg)
        check_replaceable_outputs(self.outputs(cfg))
        inputs = self.inputs(cfg)
        if self.done(cfg, inputs):
            print(f"{self.name}: {stage_dir} is up to date", flush=True)
            return stage_dir
        started = time.time()
        outcome = self.work(cfg)
        manifest = build_manifest(self.name, self.section(cfg), inputs, started, outcome.counts, outcome.metrics)
        write_card(stage_dir, self.name, manifest)
        write_manifest(stage_dir, manifest)
        return stage_dir


def check_replaceable_outputs(outputs: dict[str, Path]) -> None:
    """Before any work: a folder the stage will replace (a model) must be one almost-ray wrote."""
    for path in outputs.values():
        if Path(path).is_dir():
            check_replaceable(path)
