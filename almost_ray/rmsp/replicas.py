"""The replica classes of self-play: one model per actor, one `replicas.ReplicaSet` per role for the run.

`RoleReplica` plays the assistant (N samples per active dialogue), the user (one follow-up), or both;
`CandidateScorer` holds one reward model and scores every candidate in its conversation, so the
generators and the RM have separate pools with their own resources (e.g. GPUs for the generator,
a smaller device for the RM). Dialogues that already ended pass through untouched.
"""

from __future__ import annotations

import json

import pandas as pd

from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.generator import make_generator
from almost_ray.models.reward import RewardModel
from almost_ray.rmsp.turns import role_prompt, role_stop


class RoleReplica:
    """Holds one generator playing the roles of `roles` (role -> {"sampling": ..., "header": ...}); writes
    the `candidates` column (a JSON list) of active rows for the role a call names.

    The assistant and the user share one replica when they have the same model (`stage.role_pools`):
    one model load and one copy in memory instead of two, and the same outputs, since every prompt's
    samples are seeded by the prompt itself (`models/generator.py`), not by the replica that answers."""

    def __init__(self, model: dict, roles: dict[str, dict]):
        self.generator = make_generator(ModelConfig.model_validate(model))
        self.roles = {}
        for role, spec in roles.items():
            params = SamplingParams.model_validate(spec["sampling"])
            self.roles[role] = (params.model_copy(update={"stop": role_stop(role, params.stop)}), spec["header"])

    def __call__(self, batch: pd.DataFrame, role: str) -> pd.DataFrame:
        sampling, header = self.roles[role]
        return generate_candidates(self.generator, sampling, role, header, batch)


def generate_candidates(generator, sampling: SamplingParams, role: str, header: str, batch: pd.DataFrame) -> pd.DataFrame:
    active = [i for i, s in enumerate(batch["status"]) if not s]
    prompts = [role_prompt(role, json.loads(batch["messages"].iloc[i]), header) for i in active]
    outputs = generator.generate(prompts, sampling) if prompts else []
    candidates = ["[]"] * len(batch)
    for i, samples in zip(active, outputs):
        candidates[i] = json.dumps(samples, ensure_ascii=False)
    return batch.assign(candidates=candidates)


class CandidateScorer:
    """Holds one reward model; writes the `scores` column: the RM score of each candidate, judged as
    the next assistant turn of its dialogue (ALMoST Section 2.2: the RM scores the N responses)."""

    def __init__(self, ref: str, dtype: str = "auto", max_length: int = 1024, batch_size: int = 8):
        self.rm = RewardModel(ref, dtype=dtype, max_length=max_length, batch_size=batch_size)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return score_candidates(self.rm, batch)


def score_candidates(rm, batch: pd.DataFrame) -> pd.DataFrame:
    """Score all candidates of a batch in one `rm.score` call (any object with RewardModel's `score`)."""
    conversations, owners = [], []
    for i, (status, messages, candidates) in enumerate(zip(batch["status"], batch["messages"], batch["candidates"])):
        if status:
            continue
        context = json.loads(messages)
        for text in json.loads(candidates):
            conversations.append([*context, {"role": "assistant", "content": text}])
            owners.append(i)
    flat = rm.score(conversations) if conversations else []
    per_row: list[list[float]] = [[] for _ in range(len(batch))]
    for i, s in zip(owners, flat):
        per_row[i].append(float(s))
    return batch.assign(scores=[json.dumps(s) if s else "" for s in per_row])
