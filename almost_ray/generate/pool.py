"""Distributed generation on Ray Data: one model per actor, rows streamed through an actor pool.

`GenerationReplica` is the callable class given to `Dataset.map_batches` (through `pools.stream_pool`);
the pool size, the CPUs/GPUs each replica reserves and the rows per call come from `ResourcesConfig`, so the same
code runs on this laptop (`num_gpus: 0`) and on a GPU cluster (vLLM backend, `num_gpus: 1`).
Rows carry `messages` as a JSON string (a conversation to continue) and get back `prompt` (the
rendered text), `responses` (a JSON list of the n samples; empty for a prompt skipped as too long) and
`shots_dropped`/`prompt_skipped` (what the prompt-length policy did, `models.text.fit_prompt`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pandas as pd

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.dashboard import add_counts
from almost_ray.cluster.pools import stream_pool
from almost_ray.models.config import ModelConfig, PromptFormat, SamplingParams
from almost_ray.models.generator import make_generator
from almost_ray.prompts.templates import render_prompt


class GenerationReplica:
    """Holds one generator; answers a batch of conversations per call."""

    def __init__(self, model: dict, sampling: dict, prompt_format: PromptFormat, header: str = "",
                 metrics_tags: tuple[str, str] | None = None):
        self.generator = make_generator(ModelConfig.model_validate(model))
        self.sampling = SamplingParams.model_validate(sampling)
        self.prompt_format = prompt_format
        self.header = header
        self.metrics_tags = metrics_tags  # (run, stage): count tokens generated on the dashboard

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        tokenizer = getattr(self.generator, "tokenizer", None)
        prompts = [
            render_prompt(self.prompt_format, json.loads(m), tokenizer, self.header) for m in batch["messages"]
        ]
        outputs = self.generator.generate(prompts, self.sampling)
        if self.metrics_tags and tokenizer is not None:
            tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for o in outputs for s in o)
            add_counts(*self.metrics_tags, {"tokens_generated": tokens, "prompts_answered": len(prompts)})
        batch = batch.copy()
        batch["prompt"] = prompts
        batch["responses"] = [json.dumps(o, ensure_ascii=False) for o in outputs]
        fits = self.generator.last_fits  # the prompt-length policy's work, for the manifest (models/text.py)
        batch["shots_dropped"] = [f.shots_dropped for f in fits]
        batch["prompt_skipped"] = [f.skipped for f in fits]
        batch["node_id"] = _node_id()  # where it ran: multi-node tests and debugging read it
        return batch


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def stream_generation(
    rows: list[dict],
    model: ModelConfig,
    sampling: SamplingParams,
    resources: ResourcesConfig,
    prompt_format: PromptFormat,
    header: str = "",
    pool: str = "generate.resources",
    metrics_tags: tuple[str, str] | None = None,
) -> Iterator[dict]:
    """Run `rows` through a `GenerationReplica` pool and yield output rows as they finish (any order).

    `pool` is the config path of `resources`, named by the preflight when the pool cannot fit."""
    kwargs = dict(model=model.model_dump(), sampling=sampling.model_dump(), prompt_format=prompt_format, header=header,
                  metrics_tags=metrics_tags)
    for row in stream_pool(rows, GenerationReplica, kwargs, resources, pool):
        out = dict(row)
        out["responses"] = json.loads(out["responses"])
        yield out
