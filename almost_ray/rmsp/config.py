"""Settings of `almost-ray rmsp`: reward-model-guided self-play (ALMoST Section 2.2), its roles and
their pools.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.config_base import StageSection, StrictModel
from almost_ray.models.config import ModelConfig, SamplingParams


class RMSPSampling(SamplingParams):
    """ALMoST Appendix C.2: nucleus sampling, p 0.9, temperature 1.0, up to 384 new tokens (steps 1, 2)."""

    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=384, ge=1)


class RMSPUserSampling(RMSPSampling):
    """The user writes a short follow-up, not an answer."""

    max_new_tokens: int = Field(default=128, ge=1)


class RMSPRoleConfig(StrictModel):
    """One role of self-play (ALMoST Section 2.2): a few-shot prompted model and its actor pool.

    `prompt` is a packaged prompt name (`faithful`, `hhh`, `user` -> `almost_ray/prompts/<name>.txt`) or a
    path to a file in ALMoST's block format; the first `shots` dialogues are kept. Stop strings are added
    by the role (the other speaker's turn prefix), so `sampling.stop` may stay empty. The defaults are
    the assistant's (LLaMA-30B-Faithful-3shot in the paper).
    """

    model: ModelConfig = Field(default_factory=ModelConfig)
    prompt: str = "faithful"
    shots: int = Field(default=3, ge=0)
    sampling: RMSPSampling = Field(default_factory=RMSPSampling)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


class RMSPUserConfig(RMSPRoleConfig):
    """The user role: our own User prompt (in the spirit of the paper's User-3shot, Appendix A)."""

    prompt: str = "user"
    sampling: RMSPUserSampling = Field(default_factory=RMSPUserSampling)


class RMSPRewardConfig(StrictModel):
    """The RM that picks the best of N assistant samples, and its own (smaller) actor pool."""

    ref: str | None = Field(default=None, description="RM reference; null: <run dir>/rm/model (train-rm)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(default=1024, ge=8, description="tokens of conversation the RM reads")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


class RMSPConfig(StageSection):
    """`almost-ray rmsp`: reward-model-guided self-play (ALMoST Section 2.2; Table 5 ablations).

    `reward_model: null` or `best_of: 1` is plain self-play (the assistant's first sample is kept);
    `assistant.prompt: hhh` is the HHH-prompted assistant. `max_turns` counts assistant turns.
    """

    queries: str | None = Field(
        default=None, description="queries (a .txt, one per line, or Query rows in any source form); null: the "
        "queries stage's queries.jsonl"
    )
    num_queries: int | None = Field(default=None, ge=1, description="first N queries only")
    assistant: RMSPRoleConfig = Field(default_factory=RMSPRoleConfig)
    user: RMSPUserConfig = Field(default_factory=RMSPUserConfig)
    reward_model: RMSPRewardConfig | None = Field(default_factory=RMSPRewardConfig)
    best_of: int = Field(default=4, ge=1, description="N assistant samples per turn (paper: 4)")
    max_turns: int = Field(default=2, ge=1, description="assistant turns per dialogue (paper: T = 2)")
    shard_size: int = Field(default=64, ge=1, description="dialogues per resumable output shard")

    @model_validator(mode="after")
    def _n_comes_from_best_of(self) -> RMSPConfig:
        for role in ("assistant", "user"):
            if getattr(self, role).sampling.n != 1:
                raise ValueError(f"{role}.sampling.n must be 1 (the assistant samples best_of responses)")
        return self
