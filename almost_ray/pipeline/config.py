"""Settings of the pipeline's report stage (`pipeline/report.py`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from almost_ray.config_base import StageSection


class ReportConfig(StageSection):
    """The pipeline's report stage: which queries the base, SFT and PPO models answer side by side."""

    seed_queries: Path | None = Field(
        default=None, description="one query per line; null uses the project's own seed queries"
    )
    num_queries: int = Field(default=5, ge=1, description="queries each model answers (greedy, generate.sampling)")
