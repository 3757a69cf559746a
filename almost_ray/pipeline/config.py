"""Settings of the pipeline (`pipeline/loop.py`) and its report stage (`pipeline/report.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from almost_ray.config_base import StageSection, StrictModel

# Stages the pipeline runs only when asked (`pipeline.extras`, the CLI's --with): beyond ALMoST's recipe
OptionalStage = Literal["train_dpo", "ppo_grpo", "rm_score"]


class PipelineConfig(StrictModel):
    """`almost-ray pipeline` and `almost-ray demo`: which optional stages run besides ALMoST's."""

    extras: list[OptionalStage] = Field(
        default_factory=list,
        description="optional stages, run in their place in the data flow: train_dpo (DPO on the comparisons, "
        "from the SFT model), ppo_grpo (PPO with a critic-free estimator), rm_score (every model's mean RM score "
        "on held-out prompts); the CLI's --with train_dpo,ppo_grpo,rm_score",
    )


class ReportConfig(StageSection):
    """The pipeline's report stage: which queries the base, SFT and PPO models answer side by side."""

    seed_queries: Path | None = Field(
        default=None, description="one query per line; null uses the project's own seed queries"
    )
    num_queries: int = Field(default=5, ge=1, description="queries each model answers (greedy, generate.sampling)")
