"""The optional `ppo_grpo` stage (`almost-ray pipeline --with ppo_grpo`): PPO with a critic-free estimator
(GRPO by default), beside the paper's PPO and from the same start.

It runs what the `ppo` stage runs (`rl/stage.train_policy`) from the same SFT policy, RM and prompts, with
the `ppo` section changed by the `ppo_grpo` section's fields (`PPOGRPOConfig.applied_to`: the estimator,
the group size, the KL as a loss term, ...), into its own folder `runs/<run>/ppo_grpo/` (`model/`,
`metrics.jsonl`, `ppo.png`, checkpoints, manifest). No critic is planned, placed or started. Its manifest
hashes the merged settings, so a change to either section redoes it.
"""

from __future__ import annotations

from pathlib import Path

from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.rl import stage as ppo
from almost_ray.rl.config import PPOConfig
from almost_ray.runs import paths
from almost_ray.runs.stage import Outcome, Stage


def settings(cfg: Config) -> PPOConfig:
    """The PPO settings this stage runs: `ppo` with `ppo_grpo`'s fields set; a refused combination is a
    config error naming the section."""
    try:
        return cfg.ppo_grpo.applied_to(cfg.ppo)
    except ValueError as err:
        reasons = getattr(err, "errors", None)
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in reasons()) if reasons else str(err)
        raise ConfigError(f"ppo_grpo: the ppo section with ppo_grpo's changes is refused: {why}") from None


def check(cfg: Config) -> None:
    """The merged settings, then the policy, RM and prompts `ppo` reads, before Ray starts."""
    settings(cfg)
    ppo.check(cfg)


def work(cfg: Config) -> Outcome:
    p = settings(cfg)
    return ppo.train_policy(cfg, p, paths.stage_dir(cfg, "ppo_grpo"), ppo.title(p))


STAGE = Stage(
    "ppo_grpo", "optional: PPO with a critic-free estimator (GRPO), beside the paper's PPO",
    section=settings, inputs=ppo.STAGE.inputs,
    outputs=lambda c: {"model": paths.ppo_grpo_model(c)},
    work=work, check=check, headline=ppo.STAGE.headline,
)


def run(cfg: Config) -> Path:
    """PPO with ppo_grpo's estimator into `<run dir>/ppo_grpo/model`; skipped when up to date."""
    return STAGE.run(cfg)
