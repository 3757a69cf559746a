"""Settings of `almost-ray generate` (`generate.py`)."""

from __future__ import annotations

from pydantic import Field

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.config_base import StrictModel
from almost_ray.models.config import ModelConfig, PromptFormat, SamplingParams


class GenerateConfig(StrictModel):
    """`almost-ray generate`: answer prompts with one model through an actor pool."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    prompt_format: PromptFormat = "chat"
    shard_size: int = Field(default=64, ge=1, description="rows per resumable output shard")
