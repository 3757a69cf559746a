"""The `generate` stage (`almost-ray generate`): answer every prompt of a file with one model through a Ray Data actor pool.

Input rows are Query records (`text`), or rows with `prompt` (raw text) or `messages` (a
conversation). Output rows are Response records: `query_id`, `prompt`, `responses` (n samples),
`generator`. The output is written in resumable shards and merged atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.dashboard import run_of
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.records import Dialogue, RecordError, Response, field_error
from almost_ray.data.shards import ShardedJsonl
from almost_ray.data.sources import iter_rows, require, row_id
from almost_ray.generate.pool import stream_generation
from almost_ray.models.loading import check_model_ref, resolve_model_dir
from almost_ray.models.text import check_prompts_fit
from almost_ray.prompts.templates import default_stop
from almost_ray.runs import paths
from almost_ray.runs.stage import Outcome, Stage


def read_prompts(path: str | Path) -> list[dict]:
    """Rows `{"id", "messages"}` from any source (`data/sources.py`): a .txt of queries, or rows with
    `messages` (a conversation in TRL's form), `prompt` or `text` (one user turn); every field type-checked."""
    rows = []
    for number, obj in iter_rows(path):
        if not isinstance(obj, dict):
            raise RecordError(f"{path}:{number}: expected a JSON object")
        rid = str(obj.get("id", obj.get("query_id", row_id(path, number))))
        if "messages" in obj:
            try:
                messages = [m.model_dump() for m in Dialogue.model_validate({"messages": obj["messages"]}).messages]
            except ValidationError as err:
                raise RecordError(f"{path}:{number}: {field_error(err)}") from None
        elif "text" in obj or "prompt" in obj:
            field = "text" if "text" in obj else "prompt"
            if not isinstance(obj[field], str) or not obj[field].strip():
                raise RecordError(f"{path}:{number}: {field}: expected a non-empty string")
            messages = [{"role": "user", "content": obj[field]}]
        else:
            raise RecordError(f"{path}:{number}: expected one of the fields 'messages', 'prompt', 'text'")
        rows.append({"id": rid, "messages": messages, "where": f"{path}:{number}"})
    if not rows:
        raise RecordError(f"{path}: no rows")
    return rows


def prompts_source(cfg: Config) -> str:
    if cfg.generate.prompts is None:
        raise ConfigError("generate.prompts: no prompts to answer (give --input FILE)")
    return cfg.generate.prompts


def check(cfg: Config) -> None:
    """Every prompt row, the model, and every prompt's length against the model's context (with its
    tokenizer alone), before Ray starts or the model loads."""
    g = cfg.generate
    require(prompts_source(cfg), "generate.prompts")
    rows = read_prompts(prompts_source(cfg))
    check_model_ref(g.model.ref, "generate.model.ref")
    check_prompts_fit(g.model, [(r["where"], r["messages"]) for r in rows], g.prompt_format,
                      g.sampling.max_new_tokens, "prompt")


def work(cfg: Config) -> Outcome:
    """Answer every prompt through a generation pool, in resumable shards merged into `generate.output`."""
    g = cfg.generate
    output_path = paths.generate_output(cfg)
    rows = read_prompts(prompts_source(cfg))
    resolve_model_dir(g.model.ref)  # a GGUF is converted once here, not in every replica
    sampling = g.sampling
    if not sampling.stop:
        sampling = sampling.model_copy(update={"stop": default_stop(g.prompt_format)})
    shards = ShardedJsonl(output_path, g.shard_size)
    fit = {"prompts_shortened": 0, "shots_dropped": 0, "prompts_skipped": 0}
    todo = shards.pending([{"id": r["id"], "messages": json.dumps(r["messages"])} for r in rows])
    if todo:
        init_ray(cfg.ray)
        results = stream_generation(todo, g.model, sampling, g.resources, g.prompt_format,
                                    metrics_tags=(run_of(output_path.parent), "generate"))
        shards.collect(
            {**Response(query_id=r["id"], prompt=r["prompt"], responses=r["responses"],
                        generator=g.model.ref).model_dump(),
             "messages": json.loads(r["messages"]), "_shard": r["_shard"], "_row": r["_row"]}
            for r in _count_fits(results, fit)
        )
    count = shards.finalize()
    return Outcome(counts={"prompts": len(rows), "rows": count, **fit})


STAGE = Stage(
    "generate", "answer prompts with one model through a Ray Data actor pool",
    section=lambda c: c.generate, inputs=lambda c: {"prompts": prompts_source(c)},
    outputs=lambda c: {"responses": paths.generate_output(c)},
    work=work, check=check,
)


def run(cfg: Config) -> Path:
    """Answer `generate.prompts` into `generate.output`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)


def _count_fits(results, fit: dict[str, int]):
    """Pass rows through, counting what the prompt-length policy did (this run's rows; a resumed run
    counts only the prompts it generated)."""
    for r in results:
        dropped, skipped = int(r.get("shots_dropped", 0)), bool(r.get("prompt_skipped", False))
        fit["shots_dropped"] += dropped
        fit["prompts_shortened"] += int(bool(dropped) and not skipped)
        fit["prompts_skipped"] += int(skipped)
        yield r
