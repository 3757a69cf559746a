"""The stages that make and measure the aligned models, in pipeline order (docs/architecture.md's picture):

queries -> compare -> train_rm -> eval_rm -> rmsp -> train_sft -> [train_dpo] -> ppo -> [ppo_grpo] -> eval
-> [rm_score]

Each is its module's `STAGE` (`runs/stage.py`): name, inputs, outputs, checks and work. The bracketed ones
go beyond ALMoST's recipe and run only when asked (`pipeline.extras`, the CLI's `--with`): DPO on the
comparisons, PPO with a critic-free estimator, and every model's RM score on held-out prompts. The report
stage (`pipeline/report.py`) reads all of them and comes last (`pipeline/loop.py` puts it there).
"""

from __future__ import annotations

from typing import get_args

from almost_ray.eval import rm as eval_rm
from almost_ray.eval import rm_score
from almost_ray.eval import stage as evaluation
from almost_ray.pipeline.config import OptionalStage
from almost_ray.rl import ppo_grpo
from almost_ray.rl import stage as ppo
from almost_ray.rmsp import stage as rmsp
from almost_ray.runs.stage import Stage
from almost_ray.synth import compare, queries
from almost_ray.train import dpo as train_dpo
from almost_ray.train import rm as train_rm
from almost_ray.train import sft as train_sft

# every stage in data-flow order, the optional ones in their place
EVERY_STAGE: list[Stage] = [queries.STAGE, compare.STAGE, train_rm.STAGE, eval_rm.STAGE, rmsp.STAGE, train_sft.STAGE,
                            train_dpo.STAGE, ppo.STAGE, ppo_grpo.STAGE, evaluation.STAGE, rm_score.STAGE]
OPTIONAL: tuple[str, ...] = get_args(OptionalStage)
# ALMoST's stages: what a run without extras goes through
STAGES: list[Stage] = [s for s in EVERY_STAGE if s.name not in OPTIONAL]
