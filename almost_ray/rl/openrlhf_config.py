"""Settings that only the OpenRLHF engine of `almost-ray ppo` reads (`ppo.openrlhf`).

Everything about the algorithm comes from `PPOConfig` itself; these say where OpenRLHF's job runs.
"""

from __future__ import annotations

from pydantic import Field

from almost_ray.config_base import StrictModel


class OpenRLHFConfig(StrictModel):
    """How `almost-ray ppo --engine openrlhf` submits OpenRLHF 0.11.2's `train_ppo_ray` as a Ray job.

    OpenRLHF gives every role replica one GPU, so a role's `replicas` become `num_nodes` x
    `num_gpus_per_node` with at most `gpus_per_node` per node. Its pins (ray 2.55, transformers 5.15,
    deepspeed 0.19.6, vLLM 0.29, flash-attn) differ from ours, so the job gets its own `runtime_env`:
    a pip list by default, or a container image (`image_uri`) that already holds that stack.
    """

    gpus_per_node: int = Field(default=8, ge=1, description="GPUs per node of the cluster the job runs on")
    image_uri: str | None = Field(
        default=None, description="container image with OpenRLHF 0.11.2 installed; null: pip runtime_env"
    )
