"""The reward model deployment behind `POST /v1/reward`: `RewardModel` per replica, conversations from
concurrent requests scored together with `@serve.batch` (ALMoST's RM, Section 2.1, as a service)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ray import serve

from almost_ray.runs.paths import reward_model_in
from almost_ray.serve.config import RewardDeploymentConfig, ServeConfig


def resolve_reward_model(cfg: ServeConfig) -> str | None:
    """The configured RM (paths made absolute), else the run's train_rm model when it exists, else None."""
    if not cfg.reward.enabled:
        return None
    if cfg.reward.model:
        path = Path(cfg.reward.model).expanduser()
        return str(path.resolve()) if path.exists() else cfg.reward.model
    found = reward_model_in(cfg.run_dir)
    return str(found.resolve()) if found is not None else None


@serve.deployment
class RewardScorer:
    """One RM replica; each call scores one conversation, batched with the calls around it."""

    def __init__(self, reward: dict, model_ref: str):
        from almost_ray.models.reward import RewardModel

        self.cfg = RewardDeploymentConfig.model_validate(reward)
        self.ref = model_ref
        self.rm = RewardModel(
            model_ref, dtype=self.cfg.dtype, max_length=self.cfg.max_length, batch_size=self.cfg.max_batch_size
        )
        self._score.set_max_batch_size(self.cfg.max_batch_size)
        self._score.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    async def score(self, conversation: list[dict[str, str]]) -> float:
        return await self._score(conversation)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _score(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        return await asyncio.to_thread(self.rm.score, conversations)
