"""GPU generation on `ray.data.llm`, everything but the vLLM engines: the processor Ray builds from our
pool config, the rows it is given (the prompt-length policy, per-sample seeds, the rules adapter), and how
its outputs become each prompt's samples. The engines themselves need vLLM and a GPU."""

from __future__ import annotations

import json

import pytest

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.text import prompt_seed

MODEL = ModelConfig(ref="tiny:llama", backend="vllm")
RULED = ModelConfig(ref="tiny:llama", backend="vllm", rules={"enabled": True})


@pytest.fixture(scope="module")
def tokenizer():
    from almost_ray.models.loading import load_tokenizer

    return load_tokenizer("tiny:llama")


def test_the_processor_ray_builds_from_a_pool_config(ray_local):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from almost_ray.models.loading import context_length, resolve_model_dir
    from almost_ray.models.vllm_data import processor_config

    config = processor_config(RULED, ResourcesConfig(concurrency=2, batch_size=4))
    assert config["engine_kwargs"]["max_model_len"] == context_length(resolve_model_dir("tiny:llama"))
    stage = build_processor(vLLMEngineProcessorConfig(**config)).stages["vLLMEngineStage"]
    engine = stage.fn_constructor_kwargs["engine_kwargs"]
    assert engine["trust_remote_code"] is False and engine["tensor_parallel_size"] == 1
    assert engine["logits_processors"] == ["almost_ray.adapters.rules_vllm:RulesAdapterProcessor"]
    pool = stage.map_batches_kwargs["compute"]
    assert (pool.min_size, pool.max_size) == (2, 2)  # a fixed pool of `concurrency` engines, as our pools
    assert stage.fn_constructor_kwargs["batch_size"] == 4 and stage.map_batches_kwargs["num_gpus"] == 1


def test_one_row_per_sample_with_the_hf_backends_seeds(tokenizer):
    from almost_ray.adapters.rules import RULES_EXTRA_ARG, rules_from_extra_arg
    from almost_ray.models.vllm_data import request_rows

    sampled = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_new_tokens=8, seed=5, stop=["\nHuman:"])
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=8)
    rows, fits = request_rows(["Hello there", "Bye"], [sampled, greedy], tokenizer, 1024, RULED)
    assert [(r["row_index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [r["sampling_params"]["seed"] for r in rows[:3]] == [prompt_seed(5, "Hello there", j) for j in range(3)]
    assert rows[3]["sampling_params"]["seed"] is None and rows[3]["sampling_params"]["top_p"] == 1.0
    assert all(r["sampling_params"]["n"] == 1 and r["sampling_params"]["max_tokens"] == 8 for r in rows)
    assert rows[0]["sampling_params"]["stop"] == ["\nHuman:"]
    assert rows[0]["tokenized_prompt"] == tokenizer("Hello there", add_special_tokens=False).input_ids
    assert rules_from_extra_arg(rows[0]["sampling_params"]["extra_args"][RULES_EXTRA_ARG]).enabled
    assert [f.skipped for f in fits] == [False, False]
    json.dumps(rows)  # plain data: what `ray.data.from_items` stores


def test_the_length_policy_runs_before_the_engine(tokenizer):
    from almost_ray.models.vllm_data import request_rows
    from almost_ray.prompts.templates import DIALOGUE_SEPARATOR

    shots = DIALOGUE_SEPARATOR.join(["Answer well."] + ["Human: hi\n\nAssistant: " + "word " * 40] * 3 + ["Human: q"])
    params = [SamplingParams(max_new_tokens=16)]
    full = len(tokenizer(shots, add_special_tokens=False).input_ids)
    rows, (fit,) = request_rows([shots], params, tokenizer, full, MODEL)  # room for the prompt only, not 16 more
    assert fit.shots_dropped >= 1 and len(rows[0]["tokenized_prompt"]) <= full - 16
    skip = ModelConfig(ref="tiny:llama", backend="vllm", on_overlong="skip")
    rows, (fit,) = request_rows(["word " * 300], params, tokenizer, 64, skip)
    assert rows == [] and fit.skipped


def test_outputs_become_each_prompts_samples_in_order():
    from almost_ray.models.vllm_data import collect_samples

    params = [SamplingParams(n=2, temperature=1.0, stop=["\nHuman:"]), SamplingParams(n=3, temperature=0.0)]
    outputs = [{"row_index": 0, "sample": 1, "generated_text": " b\nHuman: more"},
               {"row_index": 1, "sample": 0, "generated_text": " greedy "},
               {"row_index": 0, "sample": 0, "generated_text": "a "}]
    assert list(collect_samples(outputs, params)) == [(1, ["greedy"] * 3), (0, ["a", "b"])]


def test_which_pools_use_ray_data_llm():
    from almost_ray.models.vllm_data import use_ray_data_llm

    assert use_ray_data_llm(MODEL, ResourcesConfig())
    assert not use_ray_data_llm(ModelConfig(ref="tiny:llama", backend="hf"), ResourcesConfig(num_gpus=1))
    # auto: GPUs per replica and vLLM installed (not here)
    assert not use_ray_data_llm(ModelConfig(ref="tiny:llama", backend="auto"), ResourcesConfig(num_gpus=1))
