"""`make demo`: the pipeline as far as it is built, end to end on a local Ray with the embedded model.

Today that is: answer the first `demo.num_queries` seed queries through the generation actor pool
and print them as a table. Each later stage joins here as it lands.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from almost_ray import generate
from almost_ray.config import Config
from almost_ray.records import Response, load_queries, read_jsonl, write_jsonl
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


def run(cfg: Config) -> Path:
    stage_dir = cfg.run_dir / "generate"
    prompts = stage_dir / "prompts.jsonl"
    queries = seed_queries(cfg)
    write_jsonl(prompts, ({"id": i, "text": t} for i, t in queries))
    out = generate.run(cfg.generate, cfg.ray, prompts, stage_dir / "responses.jsonl")
    answers = list(read_jsonl(out, Response))
    print(format_table([(r.messages[-1]["content"], r.responses[0]) for r in answers]))
    print(f"\n{len(answers)} answers from {cfg.generate.model.ref} written to {out}")
    return out
