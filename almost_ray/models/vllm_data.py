"""GPU generation for the Ray Data pools on Ray's own `ray.data.llm` (`vLLMEngineProcessorConfig` +
`build_processor`): Ray runs the vLLM engines as a Data stage (continuous batching across the rows of
each replica, placement groups for tensor parallelism, retries), instead of our vLLM actor
(`vllm_backend.VLLMGenerator` inside `generation_pool.GenerationReplica`).

What stays ours, because `ray.data.llm`'s engine stage cannot do it:
- the prompt-length policy (`models.text.fit_prompt`: drop few-shot demonstrations, then error or skip):
  the engine stage refuses an over-long prompt by failing its batch, so prompts are fitted here, on the
  driver, with the engine's own `max_model_len` (the model's context, set explicitly) and sent as token
  ids (`tokenized_prompt`, no tokenize stage: vLLM given text would add a BOS no stage trained with);
- `n` samples per prompt: the stage keeps only `outputs[0]` of each request, so each sample is its own
  row with its own seed `prompt_seed(seed, prompt, j)` (the HF backend's per-row seeds): a prompt's
  samples do not depend on its batch or replica;
- stop strings are vLLM's (`stop` per row); the text is cut and stripped as the other backends cut it;
- `loglikelihood` (`prompt_logprobs`) and the long-lived replicas of self-play and query mining
  (`replicas.ReplicaSet`, several turns and roles on one engine) stay on `vllm_backend`: a processor is
  one pass over a dataset, not a model that answers turn after turn.

Per-row `sampling_params` let one processor serve rows with different sampling (the ladder's rungs of
one model). Nothing here imports vLLM: building the processor works on any machine; its engines start
only when the dataset is consumed, on GPUs.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator
from typing import Any

from almost_ray.adapters.rules import RULES_EXTRA_ARG
from almost_ray.cluster.config import ResourcesConfig
from almost_ray.cluster.dashboard import add_counts
from almost_ray.cluster.preflight import pool_bundles, preflight
from almost_ray.models.config import ModelConfig, PromptFormat, SamplingParams
from almost_ray.models.loading import context_length, load_tokenizer
from almost_ray.models.text import FittedPrompt, fit_prompt, prompt_seed, prompt_token_ids, truncate_at_stop
from almost_ray.models.vllm_backend import vllm_engine_kwargs, vllm_sampling_kwargs
from almost_ray.prompts.templates import render_prompt


def processor_config(model: ModelConfig, resources: ResourcesConfig) -> dict[str, Any]:
    """Keyword arguments of `ray.data.llm.vLLMEngineProcessorConfig` for one pool (pure)."""
    engine = vllm_engine_kwargs(model)
    source = engine.pop("model")
    positions = context_length(source)
    if positions is None:
        raise ValueError(f"{source}: no max_position_embeddings in config.json; the prompt-length policy needs "
                         "the model's context")
    engine["max_model_len"] = positions  # the context the policy fits prompts to, stated to the engine
    return dict(
        model_source=source, engine_kwargs=engine,
        concurrency=(resources.concurrency, resources.concurrency),  # a fixed pool, as `pools.pool_args` makes
        batch_size=resources.batch_size, chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )


def request_rows(prompts: list[str], params: list[SamplingParams], tokenizer, max_model_len: int,
                 model: ModelConfig) -> tuple[list[dict[str, Any]], list[FittedPrompt]]:
    """The engine stage's input rows (one per sample: `row_index`, `sample`, `tokenized_prompt`,
    `sampling_params`) and what the length policy did to each prompt (a skipped prompt has no rows).
    Greedy decoding asks once per prompt: its n samples are the same text."""
    rows, fits = [], []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        limit = max(max_model_len - p.max_new_tokens, 1)
        fit = fit_prompt(prompt, lambda text: prompt_token_ids(tokenizer, text), limit, model.on_overlong,
                         f"prompt {i}")
        fits.append(fit)
        if fit.skipped:
            continue
        one = vllm_sampling_kwargs(p.model_copy(update={"n": 1}), prompt, model.rules)
        if "extra_args" in one:  # a Data column holds it as text (rules_from_extra_arg reads either)
            one["extra_args"] = {RULES_EXTRA_ARG: json.dumps(one["extra_args"][RULES_EXTRA_ARG])}
        for j in range(1 if p.temperature == 0 else p.n):
            seed = None if p.temperature == 0 else prompt_seed(p.seed, prompt, j)
            rows.append({"row_index": i, "sample": j, "tokenized_prompt": fit.ids,
                         "sampling_params": {**one, "seed": seed}})
    return rows, fits


def collect_samples(outputs: Iterable[dict[str, Any]], params: list[SamplingParams]) -> Iterator[tuple[int, list[str]]]:
    """`(prompt index, its n texts in sample order)` as soon as a prompt's last sample arrives."""
    pending: dict[int, dict[int, str]] = {}
    for out in outputs:
        i, p = int(out["row_index"]), params[int(out["row_index"])]
        samples = pending.setdefault(i, {})
        samples[int(out["sample"])] = truncate_at_stop(out["generated_text"], p.stop).strip()
        expected = 1 if p.temperature == 0 else p.n
        if len(samples) == expected:
            texts = [samples[j] for j in range(expected)]
            yield i, texts * p.n if p.temperature == 0 else texts
            del pending[i]


def use_ray_data_llm(model: ModelConfig, resources: ResourcesConfig) -> bool:
    """Whether a pool generates on `ray.data.llm`: the vLLM backend, or `auto` with GPUs per replica and
    vLLM installed (decided on the driver, which may have no GPU itself)."""
    if model.backend == "auto":
        return resources.num_gpus > 0 and importlib.util.find_spec("vllm") is not None
    return model.backend == "vllm"


def generate(prompts: list[str], params: list[SamplingParams], model: ModelConfig, resources: ResourcesConfig,
             pool: str, tokenizer=None) -> Iterator[tuple[int, list[str], FittedPrompt]]:
    """Each prompt's samples through a `ray.data.llm` processor, in completion order: `(index, texts, fit)`,
    with `texts == []` for a prompt the length policy skipped. `pool` is the config path the preflight names."""
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig


    config = processor_config(model, resources)
    tokenizer = tokenizer or load_tokenizer(config["model_source"])
    rows, fits = request_rows(prompts, params, tokenizer, config["engine_kwargs"]["max_model_len"], model)
    for i, fit in enumerate(fits):
        if fit.skipped:
            yield i, [], fit
    if not rows:
        return
    preflight(pool, pool_bundles(resources.model_copy(update={"num_gpus": model.tensor_parallel_size})))
    processor = build_processor(
        vLLMEngineProcessorConfig(**config),
        postprocess=lambda row: {"row_index": row["row_index"], "sample": row["sample"],
                                 "generated_text": row["generated_text"]},
    )
    dataset = processor(ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // resources.batch_size)))
    for i, texts in collect_samples(dataset.iter_rows(), params):
        yield i, texts, fits[i]


def stream_generation(rows: list[dict], model: ModelConfig, sampling: SamplingParams, resources: ResourcesConfig,
                      prompt_format: PromptFormat, header: str = "", pool: str = "generate.resources",
                      metrics_tags: tuple[str, str] | None = None) -> Iterator[dict]:
    """`generation_pool.stream_generation` on `ray.data.llm`: the same rows in (`messages` as JSON) and out
    (`prompt`, `responses`, `shots_dropped`, `prompt_skipped`), in completion order. `node_id` is empty:
    Ray Data's engine stage does not say where a row ran."""

    tokenizer = load_tokenizer(processor_config(model, resources)["model_source"])
    prompts = [render_prompt(prompt_format, json.loads(r["messages"]), tokenizer, header) for r in rows]
    for i, texts, fit in generate(prompts, [sampling] * len(prompts), model, resources, pool, tokenizer):
        if metrics_tags and texts:
            tokens = sum(len(prompt_token_ids(tokenizer, t)) for t in texts)
            add_counts(*metrics_tags, {"tokens_generated": tokens, "prompts_answered": 1})
        yield {**rows[i], "prompt": prompts[i], "responses": texts, "shots_dropped": fit.shots_dropped,
               "prompt_skipped": fit.skipped, "node_id": ""}
