"""The generation protocol every backend implements, and the backend choice.

`generate(prompts, params) -> list[list[str]]` returns `params.n` samples per prompt with stop
strings honoured; `loglikelihood(contexts, continuations) -> list[float]` sums log p(continuation |
context). Sampling is seeded per prompt (from `params.seed`, the prompt text and the sample index), so
a prompt's samples do not depend on which batch or which Ray replica it landed in.
"""

from __future__ import annotations

import hashlib
import importlib.util
from typing import Protocol, runtime_checkable

from almost_ray.config import ModelConfig, SamplingParams


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]: ...

    def loglikelihood(self, contexts: list[str], continuations: list[str]) -> list[float]: ...


def prompt_seed(seed: int, prompt: str, index: int = 0) -> int:
    """A 63-bit seed for one (prompt, sample) that is the same on every machine and batch."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """Cut `text` at the earliest stop string (the stop string itself is dropped)."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


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


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-evaluation-harness splits them.

    The pair is encoded whole and split after the context's own tokens, so a continuation is
    scored with the tokens the model would really see; trailing spaces of the context move to the
    continuation. An empty context is replaced by the EOS token, so the first token is scored too.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(stripped, add_special_tokens=False).input_ids if stripped else []
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tokenizer.eos_token_id]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont
