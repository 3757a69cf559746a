"""The generation protocol every backend implements, and the backend choice.

`generate(prompts, params) -> list[list[str]]` returns `params.n` samples per prompt with stop
strings honoured; `loglikelihood(contexts, continuations) -> list[float]` sums log p(continuation |
context). Sampling is seeded per prompt (from `params.seed`, the prompt text and the sample index), so
a prompt's samples do not depend on which batch or which Ray replica it landed in. The rules shared by
the backends (prompt ids, the prompt-length policy, seeds, stop strings, scoring pairs) are in
`models/text.py`, below this module and the backends; after each `generate` call a backend's
`last_fits` says what the prompt-length policy did to each prompt (`text.FittedPrompt`).
"""

from __future__ import annotations

import importlib.util
from typing import Protocol, runtime_checkable

from almost_ray.models.config import ModelConfig, SamplingParams


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]: ...

    def loglikelihood(self, contexts: list[str], continuations: list[str]) -> list[float]: ...


def vllm_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def make_generator(model: ModelConfig) -> Generator:
    """Build the configured backend; `auto` picks vLLM when CUDA and vllm are both present."""
    backend = model.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "vllm":
        from almost_ray.models.vllm_backend import VLLMGenerator

        return VLLMGenerator(model)
    from almost_ray.models.hf_backend import HFGenerator

    return HFGenerator(model)

