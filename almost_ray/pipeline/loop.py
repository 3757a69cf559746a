"""The whole pipeline as one loop over stages: queries → compare → train_rm → eval_rm → rmsp → train_sft →
ppo → eval → report (ALMoST steps 1-3 and their evaluation).

Every stage has the same small shape (`Stage`): a name, the files it reads (`inputs`) and writes
(`outputs`), and `run`, which calls the stage module's own `run` and returns a summary read from the
stage's `manifest.json`. The loop prints the same banner and one-line summary for every stage and never
reaches into a stage. A stage whose manifest matches its config and inputs is skipped by its own module
(`manifest.is_done`); the loop sees that its manifest did not change and says "skipped (done)". A stage
whose module is not in this checkout (PPO until its issue lands) is listed as "not built" and passed over.

The stage definitions are in `stages.py`; `almost-ray pipeline`, `almost-ray demo` and `jobs/rlsf.py`
all come here.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from almost_ray.cluster.memory import reset_driver_peak
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.runs.manifest import MANIFEST, read_manifest


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. `run(cfg)` runs the stage module and returns `summary(manifest)`."""

    name: str
    about: str
    stage_dir: Callable[[Config], Path]  # where its manifest.json is written
    inputs: Callable[[Config], dict[str, Path]]  # files it needs before it starts
    outputs: Callable[[Config], dict[str, Path]]  # files it leaves for later stages
    call: Callable[[Config], object]  # the stage module's own run
    headline: tuple[str, ...] = ()  # fnmatch patterns of summary keys printed on its line (empty: all)
    module: str | None = None  # a module that must be importable for the stage to exist
    notes: Callable[[Config], list[str]] = field(default=lambda cfg: [])  # what it will leave out, and why

    def built(self) -> bool:
        from importlib.util import find_spec

        if self.module is None:
            return True
        try:
            return find_spec(self.module) is not None
        except ModuleNotFoundError:  # a missing parent package
            return False

    def run(self, cfg: Config) -> dict:
        self.call(cfg)
        return summary(read_manifest(self.stage_dir(cfg)) or {})


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


def summary_line(stage: Stage, s: dict, limit: int = 10) -> str:
    """`key=value` pairs of the headline numbers, in one line."""
    numbers = {**{f"counts.{k}": v for k, v in s["counts"].items()},
               **{f"metrics.{k}": v for k, v in s["metrics"].items()}}
    if stage.headline:
        numbers = {k: v for k, v in numbers.items() if any(fnmatch.fnmatchcase(k, p) for p in stage.headline)}
    parts = [f"{k.split('.', 1)[1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
             for k, v in list(numbers.items())[:limit]]
    return ", ".join(parts) or "(no counts)"


def select(stages: list[Stage], start: str | None = None, until: str | None = None,
           only: str | None = None) -> list[Stage]:
    """The stages to run, in pipeline order: `only` (comma-separated names), or `start`..`until`."""
    names = [s.name for s in stages]

    def check(name: str, flag: str) -> str:
        if name not in names:
            raise ConfigError(f"{flag}: unknown stage {name!r}; the stages are {', '.join(names)}")
        return name

    if only is not None:
        if start is not None or until is not None:
            raise ConfigError("--only: give either --only or --from/--until, not both")
        wanted = {check(n.strip(), "--only") for n in only.split(",") if n.strip()}
        if not wanted:
            raise ConfigError("--only: no stage named")
        return [s for s in stages if s.name in wanted]
    lo = names.index(check(start, "--from")) if start else 0
    hi = names.index(check(until, "--until")) if until else len(names) - 1
    if lo > hi:
        raise ConfigError(f"--from {start} comes after --until {until} in the pipeline ({' → '.join(names)})")
    return stages[lo : hi + 1]


def producers(stages: list[Stage], cfg: Config) -> dict[Path, str]:
    """Output file -> the stage that writes it."""
    return {Path(p): s.name for s in stages for p in s.outputs(cfg).values()}


def check_inputs(stages: list[Stage], selected: list[Stage], cfg: Config) -> None:
    """Before anything starts: every input that no earlier selected stage writes must already exist."""
    made: set[Path] = set()
    writers = producers(stages, cfg)
    for stage in selected:
        if not stage.built():
            continue
        for key, path in stage.inputs(cfg).items():
            path = Path(path)
            if path in made or path.exists():
                continue
            by = writers.get(path)
            hint = f"run stage {by} first" if by else "check the config"
            raise ConfigError(f"stage {stage.name}: input {key} not found: {path} ({hint})")
        made.update(Path(p) for p in stage.outputs(cfg).values())


def _stamp(stage_dir: Path) -> int | None:
    path = stage_dir / MANIFEST
    return path.stat().st_mtime_ns if path.is_file() else None


def banner(i: int, n: int, stage: Stage) -> None:
    print(f"\n=== [{i}/{n}] {stage.name}: {stage.about}", flush=True)


def run(cfg: Config, selected: list[Stage], stages: list[Stage] | None = None) -> dict[str, dict]:
    """Run `selected` in order; returns each stage's summary (with `status`: ran, skipped, not built)."""
    from almost_ray.cluster.connect import check_runs_dir_visible, init_ray
    from almost_ray.pipeline.stages import STAGES

    stages = stages or STAGES
    check_inputs(stages, selected, cfg)
    started = time.time()
    init_ray(cfg.ray)
    check_runs_dir_visible(cfg.runs_dir)
    results: dict[str, dict] = {}
    for i, stage in enumerate(selected, 1):
        banner(i, len(selected), stage)
        if not stage.built():
            print(f"{stage.name}: not built ({stage.module} is not in this checkout); passed over", flush=True)
            results[stage.name] = {"status": "not built"}
            continue
        for note in stage.notes(cfg):
            print(f"{stage.name}: note: {note}", flush=True)
        before = _stamp(stage.stage_dir(cfg))
        reset_driver_peak()  # the manifest's driver peak is this stage's, not the pipeline's so far
        t0 = time.time()
        s = stage.run(cfg)
        skipped = before is not None and before == _stamp(stage.stage_dir(cfg))
        s["status"] = "skipped" if skipped else "ran"
        took = f"skipped (done; it took {s['wall_time_s']:.0f} s)" if skipped else f"done in {time.time() - t0:.0f} s"
        print(f"{stage.name}: {took} | {summary_line(stage, s)}", flush=True)
        results[stage.name] = s
    print(f"\npipeline: {len(selected)} stages in {time.time() - started:.0f} s; outputs under {cfg.run_dir}",
          flush=True)
    return results


def status_lines(cfg: Config, stages: list[Stage]) -> list[str]:
    """`--list`: every stage, whether it is built and done, and its outputs."""
    lines = []
    for s in stages:
        if not s.built():
            state = f"not built ({s.module} missing)"
        elif read_manifest(s.stage_dir(cfg)) is not None:
            state = "done (manifest.json present)"
        else:
            state = "to run"
        outs = ", ".join(str(p) for p in s.outputs(cfg).values())
        lines.append(f"{s.name:<10} {state:<34} {s.about}\n{'':<10} -> {outs}")
    return lines


# The flags of `almost-ray pipeline`, `almost-ray demo` and `jobs/rlsf.py` (besides --config and --set).
ARGUMENTS: list[tuple[tuple, dict]] = [
    (("--from",), dict(dest="start", metavar="STAGE", help="start at this stage (earlier outputs must exist)")),
    (("--until",), dict(metavar="STAGE", help="stop after this stage")),
    (("--only",), dict(metavar="STAGE,...", help="run only these stages (comma-separated), in pipeline order")),
    (("--list",), dict(action="store_true", help="list the stages, whether each is built and done; run nothing")),
]


def main(args, cfg: Config) -> dict[str, dict]:
    """What the commands do with their parsed flags: list, or select and run, then show the report."""
    from almost_ray.pipeline.stages import STAGES

    if args.list:
        print("\n".join(status_lines(cfg, STAGES)))
        return {}
    selected = select(STAGES, args.start, args.until, args.only)
    results = run(cfg, selected)
    if "report" in results and results["report"].get("status") != "not built":
        from almost_ray.pipeline import report

        print("\n" + report.terminal_summary(cfg.run_dir / report.STAGE_DIR))
    return results
