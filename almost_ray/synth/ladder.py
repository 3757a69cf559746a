"""The generator ladder on Ray Data: every rung answers every query (ALMoST Section 2.1).

A rung is a model, a few-shot prompt (ALMoST's block format, first `shots` dialogues) and its
sampling; the ladder is ordered best first (the paper's A > B > C > D > E). Rungs that share a model
and resources form one actor pool (`pool_groups`): each replica loads the model once and renders each
row with its own rung's prompt and sampling, so a 30B model serving two rungs is not loaded twice,
while a 30B pool and a 7B pool each get their own `num_gpus` per replica. Pools run one after the
other, each free to use the whole cluster (its `concurrency` replicas); rows are the (query, rung)
pairs, written in resumable shards per pool and merged in (query, rank) order.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from almost_ray.cluster.config import RayConfig
from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.pools import stream_pool
from almost_ray.cluster.replicas import ModelReplica, generator_model
from almost_ray.data.atomic import atomic_open, own_directory, remove_own_directory
from almost_ray.data.records import Query
from almost_ray.data.shards import ShardedJsonl
from almost_ray.data.sources import read_rows
from almost_ray.models.config import SamplingParams
from almost_ray.prompts.templates import default_stop, fewshot_header, human_assistant, load_prompt_text
from almost_ray.synth.config import CompareConfig, RungConfig

# A sentence ends at ., ! or ? followed by a closing quote/bracket or nothing, then whitespace or the end.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def rung_header(rung: RungConfig) -> str:
    """The instruction and the first `shots` dialogues of the rung's prompt file."""
    return fewshot_header(load_prompt_text(rung.prompt), rung.shots)


def rung_sampling(rung: RungConfig) -> SamplingParams:
    """The rung's sampling, with the Human:/dialogue-separator stops when none are configured."""
    params = SamplingParams.model_validate(rung.sampling.model_dump())
    if not params.stop:
        params = params.model_copy(update={"stop": default_stop("human_assistant")})
    return params


def trim_to_sentence(text: str) -> str:
    """Cut `text` after its last complete sentence (unchanged when it has none).

    With a short token budget most responses stop mid-sentence, and the Heuristic Filter would drop
    them all as unfinished; trimming keeps the complete part, as a longer budget would have.
    """
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else text


def pool_groups(ladder: list[RungConfig]) -> list[list[RungConfig]]:
    """Rungs grouped by (model, resources), in ladder order: one actor pool per group."""
    groups: dict[str, list[RungConfig]] = {}
    for rung in ladder:
        key = json.dumps([rung.model.model_dump(mode="json"), rung.resources.model_dump()], sort_keys=True)
        groups.setdefault(key, []).append(rung)
    return list(groups.values())


def answer_rungs(generator, batch: pd.DataFrame, rungs: dict[str, dict]) -> pd.DataFrame:
    """One model answering for several rungs (each its few-shot header and sampling): adds `raw`, the
    response, to each row by its `rung`."""
    raw = [""] * len(batch)
    for name, spec in rungs.items():
        idx = [i for i, r in enumerate(batch["rung"]) if r == name]
        if not idx:
            continue
        sampling = SamplingParams.model_validate(spec["sampling"])
        prompts = [human_assistant([{"role": "user", "content": batch["query"].iloc[i]}], spec["header"]) for i in idx]
        for i, out in zip(idx, generator.generate(prompts, sampling)):
            raw[i] = out[0]
    return batch.assign(raw=raw)


def _run_pool(rows: list[dict], group: list[RungConfig], name: str) -> Iterator[dict]:
    rungs = {r.name: {"header": rung_header(r), "sampling": rung_sampling(r).model_dump()} for r in group}
    kwargs = dict(answer=answer_rungs, model=generator_model(group[0].model), options=dict(rungs=rungs))
    yield from stream_pool(rows, ModelReplica, kwargs, group[0].resources, name)


def generate_responses(
    cfg: CompareConfig, ray_cfg: RayConfig, queries: list[Query], out_dir: str | Path
) -> tuple[Path, dict[str, dict]]:
    """Every rung's response to every query -> `out_dir/responses.jsonl` (one row per query and rung).

    Returns the path and per-pool timing metrics. Finished shards of an interrupted run are reused.
    """
    out_dir = Path(out_dir)
    parts = own_directory(out_dir / "parts")
    rank = {r.name: i for i, r in enumerate(cfg.ladder)}
    metrics: dict[str, dict] = {}
    part_files = []
    query_hash = hashlib.sha256(json.dumps([[q.id, q.text] for q in queries]).encode()).hexdigest()
    index = {r.name: i for i, r in enumerate(cfg.ladder)}
    for group in pool_groups(cfg.ladder):
        name = "+".join(r.name for r in group)
        pool = f"compare.ladder[{index[group[0].name]}].resources"
        # the part's name carries what its rows depend on, so a changed rung or query set is regenerated
        key = json.dumps([[r.model_dump(mode="json") for r in group], query_hash], sort_keys=True)
        path = parts / f"{name}.{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"
        part_files.append(path)
        if path.exists():
            continue
        t0 = time.time()
        shards = ShardedJsonl(path, cfg.shard_size)
        # rung-major: a batch then holds one rung's prompts, answered in one full-size generate call
        rows = [{"id": f"{q.id}|{r.name}", "query_id": q.id, "query": q.text, "rung": r.name}
                for r in group for q in queries]
        todo = shards.pending(rows)
        if todo:

            init_ray(ray_cfg)
            shards.collect(_run_pool(todo, group, pool))
        n = shards.finalize()
        metrics[name] = {"rows": n, "generated": len(todo), "seconds": round(time.time() - t0, 2)}
    by_key = {}
    for path in part_files:
        for row in read_rows(path):
            by_key[(row["query_id"], row["rung"])] = row
    output = out_dir / "responses.jsonl"
    with atomic_open(output) as f:
        for q in queries:
            for rung in cfg.ladder:
                row = by_key[(q.id, rung.name)]
                raw = row["raw"]
                text = trim_to_sentence(raw) if cfg.trim_to_sentence else raw.strip()
                rec = {"query_id": q.id, "prompt": q.text, "responses": [text], "generator": rung.name,
                       "rank": rank[rung.name], "raw": raw}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return output, metrics


def remove_parts(out_dir: str | Path) -> None:
    """Drop the per-pool part files once the stage's outputs and manifest are written."""
    remove_own_directory(Path(out_dir) / "parts")
