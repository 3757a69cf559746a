"""Settings of `almost-ray generate` (`generate/stage.py`)."""

from __future__ import annotations

from pathlib import Path

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
    prompts: str | None = Field(default=None, description="prompts to answer: a .txt (one per line), .jsonl, Parquet, "
                                "a save_to_disk folder or a hub id (the CLI's --input)")
    output: Path | None = Field(default=None, description="responses .jsonl (the CLI's --output); null: "
                                "<run dir>/generate/responses.jsonl")
