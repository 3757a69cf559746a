"""Distributed generation on Ray Data: one model per actor, rows streamed through an actor pool.

`GenerationReplica` is the callable class given to `Dataset.map_batches`; the pool size, the
CPUs/GPUs each replica reserves and the rows per call come from `ResourcesConfig`, so the same
code runs on this laptop (`num_gpus: 0`) and on a GPU cluster (vLLM backend, `num_gpus: 1`).
Rows carry `messages` as a JSON string (a conversation to continue) and get back `prompt` (the
rendered text), `responses` (a JSON list of the n samples; empty for a prompt skipped as too long) and
`shots_dropped`/`prompt_skipped` (what the prompt-length policy did, `models.text.fit_prompt`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pandas as pd

from almost_ray.config import ModelConfig, PromptFormat, ResourcesConfig, SamplingParams
from almost_ray.models.generator import make_generator
from almost_ray.templates import render_prompt


class GenerationReplica:
    """Holds one generator; answers a batch of conversations per call."""

    def __init__(self, model: dict, sampling: dict, prompt_format: PromptFormat, header: str = ""):
        self.generator = make_generator(ModelConfig.model_validate(model))
        self.sampling = SamplingParams.model_validate(sampling)
        self.prompt_format = prompt_format
        self.header = header

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        tokenizer = getattr(self.generator, "tokenizer", None)
        prompts = [
            render_prompt(self.prompt_format, json.loads(m), tokenizer, self.header) for m in batch["messages"]
        ]
        outputs = self.generator.generate(prompts, self.sampling)
        batch = batch.copy()
        batch["prompt"] = prompts
        batch["responses"] = [json.dumps(o, ensure_ascii=False) for o in outputs]
        fits = self.generator.last_fits  # the prompt-length policy's work, for the manifest (models/text.py)
        batch["shots_dropped"] = [f.shots_dropped for f in fits]
        batch["prompt_skipped"] = [f.skipped for f in fits]
        return batch


def stream_generation(
    rows: list[dict],
    model: ModelConfig,
    sampling: SamplingParams,
    resources: ResourcesConfig,
    prompt_format: PromptFormat,
    header: str = "",
) -> Iterator[dict]:
    """Run `rows` through a `GenerationReplica` pool and yield output rows as they finish (any order)."""
    import ray.data

    if not rows:
        return
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // resources.batch_size))
    ds = ds.map_batches(
        GenerationReplica,
        fn_constructor_kwargs=dict(
            model=model.model_dump(), sampling=sampling.model_dump(), prompt_format=prompt_format, header=header
        ),
        batch_format="pandas",
        batch_size=resources.batch_size,
        concurrency=resources.concurrency,
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )
    for row in ds.iter_rows():
        out = dict(row)
        out["responses"] = json.loads(out["responses"])
        yield out
