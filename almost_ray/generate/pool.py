"""Distributed generation on Ray Data: one model per actor, rows streamed through an actor pool.

`answer_conversations` is what each `cluster.replicas.ModelReplica` of the pool does with a batch; the pool
size, the CPUs/GPUs each replica reserves and the rows per call come from `ResourcesConfig`, so the same
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
from almost_ray.cluster.connect import node_id
from almost_ray.cluster.dashboard import add_counts
from almost_ray.cluster.pools import stream_pool
from almost_ray.cluster.replicas import ModelReplica, generator_model
from almost_ray.models import vllm_data
from almost_ray.models.config import ModelConfig, PromptFormat, SamplingParams
from almost_ray.prompts.templates import render_prompt


def answer_conversations(generator, batch: pd.DataFrame, sampling: dict, prompt_format: PromptFormat,
                         header: str = "", metrics_tags: tuple[str, str] | None = None) -> pd.DataFrame:
    """Continue each row's conversation (`messages`) with `sampling`; `metrics_tags` (run, stage) counts the
    tokens generated on the dashboard."""
    params = SamplingParams.model_validate(sampling)
    tokenizer = getattr(generator, "tokenizer", None)
    prompts = [render_prompt(prompt_format, json.loads(m), tokenizer, header) for m in batch["messages"]]
    outputs = generator.generate(prompts, params)
    if metrics_tags and tokenizer is not None:
        tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for o in outputs for s in o)
        add_counts(*metrics_tags, {"tokens_generated": tokens, "prompts_answered": len(prompts)})
    fits = generator.last_fits  # the prompt-length policy's work, for the manifest (models/text.py)
    return batch.assign(
        prompt=prompts,
        responses=[json.dumps(o, ensure_ascii=False) for o in outputs],
        shots_dropped=[f.shots_dropped for f in fits],
        prompt_skipped=[f.skipped for f in fits],
        node_id=node_id(),  # where it ran: multi-node tests and debugging read it
    )


def generation_replica(model: ModelConfig, sampling: SamplingParams, prompt_format: PromptFormat, header: str = "",
                       metrics_tags: tuple[str, str] | None = None) -> dict:
    """`ModelReplica`'s keyword arguments for a generation pool or `ReplicaSet`."""
    return dict(answer=answer_conversations, model=generator_model(model),
                options=dict(sampling=sampling.model_dump(), prompt_format=prompt_format, header=header,
                             metrics_tags=metrics_tags))


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
    """Run `rows` through a generation pool and yield output rows as they finish (any order).

    `pool` is the config path of `resources`, named by the preflight when the pool cannot fit. A vLLM pool
    (GPUs per replica and vLLM installed, or `backend: vllm`) runs on Ray's `ray.data.llm` instead
    (`models/vllm_data.py`)."""
    if vllm_data.use_ray_data_llm(model, resources):
        yield from vllm_data.stream_generation(rows, model, sampling, resources, prompt_format, header, pool,
                                               metrics_tags)
        return
    kwargs = generation_replica(model, sampling, prompt_format, header, metrics_tags)
    for row in stream_pool(rows, ModelReplica, kwargs, resources, pool):
        out = dict(row)
        out["responses"] = json.loads(out["responses"])
        yield out
