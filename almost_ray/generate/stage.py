"""`almost-ray generate`: answer every prompt of a file with one model through a Ray Data actor pool.

Input rows are Query records (`text`), or rows with `prompt` (raw text) or `messages` (a
conversation). Output rows are Response records: `query_id`, `prompt`, `responses` (n samples),
`generator`. The output is written in resumable shards and merged atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from almost_ray.cluster.config import RayConfig
from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.dashboard import run_of
from almost_ray.data.records import RecordError, Response
from almost_ray.data.shards import ShardedJsonl
from almost_ray.data.sources import iter_rows, row_id
from almost_ray.generate.config import GenerateConfig
from almost_ray.generate.pool import stream_generation
from almost_ray.models.loading import ModelRefError, resolve_model_dir
from almost_ray.prompts.templates import default_stop
from almost_ray.runs.manifest import is_done, write_manifest


def read_prompts(path: str | Path) -> list[dict]:
    """Rows `{"id", "messages"}` from any source (`sources.py`): a .txt of queries, or rows with
    `messages` (a conversation), `prompt` or `text` (one user turn)."""
    rows = []
    for number, obj in iter_rows(path):
        if not isinstance(obj, dict):
            raise RecordError(f"{path}:{number}: expected a JSON object")
        rid = str(obj.get("id", obj.get("query_id", row_id(path, number))))
        if "messages" in obj:
            messages = obj["messages"]
        elif "text" in obj or "prompt" in obj:
            messages = [{"role": "user", "content": obj.get("text", obj.get("prompt"))}]
        else:
            raise RecordError(f"{path}:{number}: expected one of the fields 'messages', 'prompt', 'text'")
        rows.append({"id": rid, "messages": messages})
    return rows


def run(cfg: GenerateConfig, ray_cfg: RayConfig, input_path: str | Path, output_path: str | Path) -> Path:
    """Generate for every row of `input_path` into `output_path` (skipped when already up to date)."""
    output_path = Path(output_path)
    stage_dir = output_path.parent
    inputs = {"prompts": input_path}
    if is_done(stage_dir, cfg, inputs) and output_path.exists():
        return output_path
    started = time.time()
    rows = read_prompts(input_path)
    try:  # a bad model reference fails here, on the driver, before any output exists
        resolve_model_dir(cfg.model.ref)
    except ModelRefError as err:
        raise ModelRefError(f"generate.model.ref: {err}") from None
    sampling = cfg.sampling
    if not sampling.stop:
        sampling = sampling.model_copy(update={"stop": default_stop(cfg.prompt_format)})
    shards = ShardedJsonl(output_path, cfg.shard_size)
    fit = {"prompts_shortened": 0, "shots_dropped": 0, "prompts_skipped": 0}
    todo = shards.pending([{"id": r["id"], "messages": json.dumps(r["messages"])} for r in rows])
    if todo:
        init_ray(ray_cfg)
        results = stream_generation(todo, cfg.model, sampling, cfg.resources, cfg.prompt_format,
                                    metrics_tags=(run_of(stage_dir), "generate"))
        shards.collect(
            {**Response(query_id=r["id"], prompt=r["prompt"], responses=r["responses"],
                        generator=cfg.model.ref).model_dump(),
             "messages": json.loads(r["messages"]), "_shard": r["_shard"], "_row": r["_row"]}
            for r in _count_fits(results, fit)
        )
    count = shards.finalize()
    write_manifest(stage_dir, "generate", cfg, inputs, started,
                   counts={"prompts": len(rows), "rows": count, **fit})
    return output_path


def _count_fits(results, fit: dict[str, int]):
    """Pass rows through, counting what the prompt-length policy did (this run's rows; a resumed run
    counts only the prompts it generated)."""
    for r in results:
        dropped, skipped = int(r.get("shots_dropped", 0)), bool(r.get("prompt_skipped", False))
        fit["shots_dropped"] += dropped
        fit["prompts_shortened"] += int(bool(dropped) and not skipped)
        fit["prompts_skipped"] += int(skipped)
        yield r
