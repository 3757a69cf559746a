"""Model references, layer truncation, backend choice, and the vLLM backend behind its import guard."""

import importlib.util

import pytest
import torch

from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.generator import make_generator
from almost_ray.models.hf_backend import HFGenerator
from almost_ray.models.loading import ModelRefError, load_causal_lm, resolve_model_dir
from almost_ray.models.vllm_backend import vllm_engine_kwargs, vllm_sampling_kwargs


def test_bad_references_say_what_is_accepted(tmp_path):
    with pytest.raises(ModelRefError, match="not a model reference"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ModelRefError, match="GGUF file not found"):
        resolve_model_dir(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelRefError, match="unknown embedded model"):
        resolve_model_dir("embedded:gpt-5")


def test_tiny_llama_is_a_plain_hf_directory():
    path = resolve_model_dir("tiny:llama")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_dir(str(path)) == path


def test_num_layers_keeps_the_first_blocks():
    full = load_causal_lm("tiny:llama", "float32", device="cpu")
    short = load_causal_lm("tiny:llama", "float32", num_layers=1, device="cpu")
    assert len(short.model.layers) == 1 and short.config.num_hidden_layers == 1
    assert torch.equal(short.model.layers[0].mlp.up_proj.weight, full.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ModelRefError, match="only 2 layers"):
        load_causal_lm("tiny:llama", "float32", num_layers=5, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_backend_is_hf_without_cuda():
    assert isinstance(make_generator(ModelConfig(ref="tiny:llama", backend="auto")), HFGenerator)


def test_vllm_arguments_mirror_our_sampling_params():
    params = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=384, seed=3, stop=["\nHuman:"])
    kw = vllm_sampling_kwargs(params, "prompt")
    assert kw == dict(n=4, temperature=1.0, top_p=0.9, max_tokens=384, stop=["\nHuman:"], seed=kw["seed"])
    assert kw["seed"] == vllm_sampling_kwargs(params, "prompt")["seed"] != vllm_sampling_kwargs(params, "other")["seed"]
    greedy = vllm_sampling_kwargs(SamplingParams(temperature=0), "p")
    assert greedy["seed"] is None and greedy["top_p"] == 1.0 and greedy["stop"] is None
    engine = vllm_engine_kwargs(ModelConfig(ref="tiny:llama", tensor_parallel_size=2))
    assert engine["model"] == str(resolve_model_dir("tiny:llama"))
    assert engine["tensor_parallel_size"] == 2 and engine["trust_remote_code"] is False


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("vllm")), reason="needs CUDA and the [gpu] extra"
)
def test_vllm_backend_matches_hf_greedy():
    from almost_ray.models.vllm_backend import VLLMGenerator

    cfg = ModelConfig(ref="embedded:smollm2-135m-instruct", backend="vllm", dtype="float32", gpu_memory_utilization=0.3)
    vllm_gen = VLLMGenerator(cfg)
    hf_gen = HFGenerator(cfg)
    prompts = [hf_gen.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])]
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    assert vllm_gen.generate(prompts, greedy) == hf_gen.generate(prompts, greedy)
    a = vllm_gen.loglikelihood(["The capital of France is"], [" Paris"])[0]
    b = hf_gen.loglikelihood(["The capital of France is"], [" Paris"])[0]
    assert a == pytest.approx(b, abs=0.05)
