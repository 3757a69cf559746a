"""`make demo`: the pipeline as far as it is built, end to end on a local Ray with the embedded model.

The stages run in pipeline order, each through the same function as its CLI subcommand, so the demo
is the pipeline, not a sketch of it:

1. `queries`   Self-Instruct query mining (ALMoST step 1)
2. `compare`   the generator ladder and the filters -> synthetic comparisons
3. `train_rm`  the reward model on those comparisons (Ray Train, FSDP over 2 CPU workers)
4. `rmsp`      RM-guided self-play with that RM -> SFT dialogues (ALMoST step 2)
5. `train_sft` supervised finetuning on the dialogues
6. `answers`   the finetuned model answers a few held-out seed queries, printed as a table

Every stage writes under `runs/<run_name>/<stage>/` and is skipped when its manifest says it is
already done, so an interrupted demo resumes where it stopped. `demo.stages` picks a prefix or subset.
"""

from __future__ import annotations

import shutil
import textwrap
import time
from pathlib import Path

from almost_ray import generate
from almost_ray.config import Config
from almost_ray.manifest import read_manifest
from almost_ray.records import RecordError, Response, load_queries, read_jsonl, write_jsonl
from almost_ray.templates import packaged_text


def seed_queries(cfg: Config) -> list[tuple[str, str]]:
    if cfg.demo.seed_queries is not None:
        queries = [(q.id, q.text) for q in load_queries(cfg.demo.seed_queries)]
    else:
        lines = [t.strip() for t in packaged_text("seed_queries.txt").splitlines() if t.strip()]
        queries = [(f"seed-{i}", t) for i, t in enumerate(lines, 1)]
    return queries[: cfg.demo.num_queries]


def format_table(rows: list[tuple[str, str]], width: int | None = None) -> str:
    """Two wrapped columns, query and answer, for a terminal."""
    width = width or min(shutil.get_terminal_size((120, 40)).columns, 140)
    left = max(20, min(40, width // 3))
    right = max(20, width - left - 7)
    rule = f"+-{'-' * left}-+-{'-' * right}-+"
    out = [rule, f"| {'query':<{left}} | {'answer':<{right}} |", rule]
    for query, answer in rows:
        lq = textwrap.wrap(query, left) or [""]
        la = textwrap.wrap(" ".join(answer.split()), right) or ["(empty)"]
        for i in range(max(len(lq), len(la))):
            a = lq[i] if i < len(lq) else ""
            b = la[i] if i < len(la) else ""
            out.append(f"| {a:<{left}} | {b:<{right}} |")
        out.append(rule)
    return "\n".join(out)


def _banner(step: str, what: str) -> None:
    print(f"\n=== demo: {step} — {what}", flush=True)


def answers(cfg: Config, model: str | Path, prompt_format: str | None = None) -> Path:
    """Answer the first `demo.num_queries` seed queries with `model` and print them as a table.

    A model the demo finetuned is prompted in the format it was trained on (`train_sft.prompt_format`).
    """
    stage_dir = cfg.run_dir / "answers"
    prompts = stage_dir / "prompts.jsonl"
    write_jsonl(prompts, ({"id": i, "text": t} for i, t in seed_queries(cfg)))
    gen = cfg.generate.model_copy(update={
        "model": cfg.generate.model.model_copy(update={"ref": str(model)}),
        "prompt_format": prompt_format or cfg.generate.prompt_format,
    })
    out = generate.run(gen, cfg.ray, prompts, stage_dir / "responses.jsonl")
    rows = list(read_jsonl(out, Response))
    print(format_table([(r.messages[-1]["content"], r.responses[0]) for r in rows]))
    print(f"\n{len(rows)} answers from {model} written to {out}")
    return out


def run(cfg: Config) -> Path:
    """Run the configured demo stages in order; returns the last stage's output."""
    from almost_ray.rmsp import stage as rmsp
    from almost_ray.synth import compare, queries
    from almost_ray.train import reward, sft

    run_dir = cfg.run_dir
    stages = cfg.demo.stages
    started = time.time()
    model: str | Path = cfg.generate.model.ref
    prompt_format = None
    out: Path = run_dir
    if "queries" in stages:
        _banner("1/6 queries", "Self-Instruct query mining (ALMoST step 1)")
        out = queries.run(cfg.queries, cfg.ray, run_dir / "queries")
        for step, n in queries.funnel(out.parent):
            print(f"  {step:<28} {n}")
    if "compare" in stages:
        _banner("2/6 compare", "the generator ladder, Heuristic Filter and As-is RM filter")
        source = cfg.compare.queries or run_dir / "queries" / "queries.jsonl"
        out = compare.run(cfg.compare, cfg.ray, source, run_dir / "compare")
        print(compare.format_funnel(run_dir / "compare"))
    if "train_rm" in stages:
        _banner("3/6 train_rm", f"the reward model, Ray Train with {cfg.train_rm.num_workers} workers")
        out = reward.run(cfg.train_rm, cfg.ray, run_dir / "compare" / "comparisons.jsonl", run_dir / "rm")
        _print_metrics(run_dir / "rm")
    if "rmsp" in stages:
        _banner("4/6 rmsp", "reward-model-guided self-play (ALMoST step 2)")
        out = rmsp.run(cfg.rmsp, cfg.ray, run_dir) / "dialogues.jsonl"
        counts = (read_manifest(out.parent) or {}).get("counts", {})
        print(f"  {counts}")
    if "train_sft" in stages:
        _banner("5/6 train_sft", f"{cfg.train_sft.mode} on the RMSP dialogues")
        dialogues = run_dir / rmsp.STAGE / "dialogues.jsonl"
        if not dialogues.exists():
            raise RecordError(f"{dialogues}: no RMSP dialogues; run the rmsp stage first (demo.stages)")
        out = model = sft.run(cfg.train_sft, cfg.ray, dialogues, run_dir / cfg.train_sft.mode)
        prompt_format = cfg.train_sft.prompt_format
        _print_metrics(run_dir / cfg.train_sft.mode)
    if "answers" in stages:
        _banner("6/6 answers", f"{model} answers {cfg.demo.num_queries} seed queries")
        out = answers(cfg, model, prompt_format)
    print(f"\ndemo finished in {time.time() - started:.0f} s; outputs under {run_dir}")
    return out


def _print_metrics(stage_dir: Path) -> None:
    metrics = (read_manifest(stage_dir) or {}).get("metrics", {})
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
