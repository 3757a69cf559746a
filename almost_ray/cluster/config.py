"""Where work runs: the Ray cluster to join (`cluster.py`) and what each actor pool reserves (`pools.py`,
`replicas.py`, checked by `preflight.py`).
"""

from __future__ import annotations

from pydantic import Field

from almost_ray.config_base import StrictModel


class ResourcesConfig(StrictModel):
    """One actor pool (`pools.py`, `replicas.py`): replicas, what each replica reserves, rows per call."""

    concurrency: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    memory_gb: float = Field(default=0, ge=0, description="heap memory each replica reserves (0: none)")
    batch_size: int = Field(default=8, ge=1)
    max_restarts: int = Field(default=-1, ge=-1, description="actor restarts after a crash (-1: unlimited)")
    max_task_retries: int = Field(default=-1, ge=-1, description="retries of a batch on a restarted actor")


class RayConfig(StrictModel):
    """Where Ray runs. `address: null` uses RAY_ADDRESS when set, else starts a local Ray."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="local Ray only")
