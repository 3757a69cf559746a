"""Connecting to Ray: a cluster when an address is configured (or RAY_ADDRESS is set), else a local Ray."""

from __future__ import annotations

import os

from almost_ray.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once per process; a no-op when Ray is already up (tests, `ray job submit`)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, log_to_driver=True)
