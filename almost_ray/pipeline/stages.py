"""The stages that make and measure the aligned models, in pipeline order (docs/architecture.md's picture):

queries -> compare -> train_rm -> eval_rm -> rmsp -> train_sft -> ppo -> eval

Each is its module's `STAGE` (`runs/stage.py`): name, inputs, outputs, checks and work. The report stage
(`pipeline/report.py`) reads all of them and comes last (`pipeline/loop.py` puts it there).
"""

from __future__ import annotations

from almost_ray.eval import rm as eval_rm
from almost_ray.eval import stage as evaluation
from almost_ray.rl import stage as ppo
from almost_ray.rmsp import stage as rmsp
from almost_ray.runs.stage import Stage
from almost_ray.synth import compare, queries
from almost_ray.train import rm as train_rm
from almost_ray.train import sft as train_sft

STAGES: list[Stage] = [queries.STAGE, compare.STAGE, train_rm.STAGE, eval_rm.STAGE, rmsp.STAGE, train_sft.STAGE,
                       ppo.STAGE, evaluation.STAGE]
