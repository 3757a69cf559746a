"""The whole pipeline as one loop over stages: queries → compare → train_rm → eval_rm → rmsp → train_sft →
ppo → eval → report (ALMoST steps 1-3 and their evaluation), with the optional stages of `pipeline.extras`
(`--with train_dpo,ppo_grpo,rm_score`) in their place.

Every stage has the one shape of `runs/stage.py` and is run through its own `run`: checks, skip when
done, work, manifest. Before Ray starts, the loop checks that every input no earlier selected stage
writes exists and passes its stage's checks; then it prints the same banner and one-line summary for
every stage and never reaches into one. A stage whose manifest did not change was skipped (done).
`almost-ray pipeline`, `almost-ray demo` and `jobs/rlsf.py` all come here.
"""

from __future__ import annotations

import time
from pathlib import Path

from almost_ray.cluster.connect import check_runs_dir_visible, init_ray
from almost_ray.cluster.memory import reset_driver_peak
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.sources import parse_source
from almost_ray.pipeline import report
from almost_ray.pipeline.stages import EVERY_STAGE, OPTIONAL, STAGES
from almost_ray.runs import paths
from almost_ray.runs.manifest import MANIFEST, read_manifest, summary, summary_line
from almost_ray.runs.stage import Stage

PIPELINE: list[Stage] = [*STAGES, report.STAGE]  # ALMoST's recipe, as `make demo` runs it
EVERY: list[Stage] = [*EVERY_STAGE, report.STAGE]


def pipeline(extras: list[str] | tuple[str, ...] = ()) -> list[Stage]:
    """ALMoST's stages and the optional ones named in `extras`, in data-flow order, then the report."""
    return [s for s in EVERY if s.name not in OPTIONAL or s.name in extras]


def select(stages: list[Stage], start: str | None = None, until: str | None = None,
           only: str | None = None) -> list[Stage]:
    """The stages to run, in pipeline order: `only` (comma-separated names), or `start`..`until`."""
    names = [s.name for s in stages]

    def check(name: str, flag: str) -> str:
        if name not in names:
            if name in OPTIONAL:
                raise ConfigError(f"{flag}: {name} is an optional stage: add --with {name} (pipeline.extras)")
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


def check_inputs(selected: list[Stage], cfg: Config) -> None:
    """Before Ray starts: every input that no earlier selected stage writes must exist and pass its stage's
    checks (`Stage.check`); a stage whose inputs come from an earlier selected one is checked when it starts."""
    made: set[Path] = set()
    writers = producers(EVERY, cfg)
    for stage in selected:
        waiting = False
        for key, path in stage.inputs(cfg).items():
            if Path(path) in made:
                waiting = True
                continue
            if Path(str(path)).expanduser().exists():  # a file, a dataset or a model directory
                continue
            source = parse_source(path)  # a hub id, or a path with ?split=/?columns=
            if source.kind == "hub" or source.path.exists():
                continue
            by = writers.get(path)
            hint = f"run stage {by} first" if by else "check the config"
            raise ConfigError(f"stage {stage.name}: input {key} not found: {path} ({hint})")
        if not waiting:
            stage.check(cfg)
        made.update(Path(p) for p in stage.outputs(cfg).values())


def _stamp(stage_dir: Path) -> int | None:
    path = stage_dir / MANIFEST
    return path.stat().st_mtime_ns if path.is_file() else None


def banner(i: int, n: int, stage: Stage) -> None:
    print(f"\n=== [{i}/{n}] {stage.name}: {stage.about}", flush=True)


def run(cfg: Config, selected: list[Stage]) -> dict[str, dict]:
    """Run `selected` in order; returns each stage's summary (with `status`: ran or skipped)."""
    check_inputs(selected, cfg)
    started = time.time()
    init_ray(cfg.ray)
    check_runs_dir_visible(cfg.runs_dir)
    results: dict[str, dict] = {}
    for i, stage in enumerate(selected, 1):
        banner(i, len(selected), stage)
        for note in stage.notes(cfg):
            print(f"{stage.name}: note: {note}", flush=True)
        before = _stamp(stage.stage_dir(cfg))
        reset_driver_peak()  # the manifest's driver peak is this stage's, not the pipeline's so far
        t0 = time.time()
        stage.run(cfg)
        s = summary(read_manifest(stage.stage_dir(cfg)) or {})
        skipped = before is not None and before == _stamp(stage.stage_dir(cfg))
        s["status"] = "skipped" if skipped else "ran"
        took = f"skipped (done; it took {s['wall_time_s']:.0f} s)" if skipped else f"done in {time.time() - t0:.0f} s"
        print(f"{stage.name}: {took} | {summary_line(stage.headline, s)}", flush=True)
        results[stage.name] = s
    print(f"\npipeline: {len(selected)} stages in {time.time() - started:.0f} s; outputs under {cfg.run_dir}",
          flush=True)
    return results


def status_lines(cfg: Config) -> list[str]:
    """`--list`: every stage, whether it is done (or optional and not asked for), and its outputs."""
    lines = []
    for s in EVERY:
        if read_manifest(s.stage_dir(cfg)) is not None:
            state = "done (manifest.json present)"
        elif s.name in OPTIONAL and s.name not in cfg.pipeline.extras:
            state = f"optional (--with {s.name})"
        else:
            state = "to run"
        outs = ", ".join(str(p) for p in s.outputs(cfg).values())
        lines.append(f"{s.name:<10} {state:<34} {s.about}\n{'':<10} -> {outs}")
    return lines


def main(args, cfg: Config) -> dict[str, dict]:
    """What the commands do with their parsed flags (`--with` already in `cfg.pipeline.extras`): list, or
    select and run, then show the report."""
    if args.list:
        print("\n".join(status_lines(cfg)))
        return {}
    named = [] if args.only is None else [n.strip() for n in args.only.split(",")]
    extras = [*cfg.pipeline.extras, *(n for n in named if n in OPTIONAL)]  # --only X runs X, optional or not
    results = run(cfg, select(pipeline(extras), args.start, args.until, args.only))
    if "report" in results:
        print("\n" + report.terminal_summary(paths.report_dir(cfg)))
    return results
