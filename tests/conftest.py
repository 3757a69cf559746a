"""Shared fixtures: tiny random LLaMA models, a local Ray, and the third-party eval data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` of a developer checkout; tests that need it skip in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"third-party eval data not found at {SHARED_DATA} (only in the developers' checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_generator():
    """One HF generator on `tiny:llama` (random weights, the embedded model's real tokenizer)."""
    from almost_ray.config import ModelConfig
    from almost_ray.models.hf_backend import HFGenerator

    return HFGenerator(ModelConfig(ref="tiny:llama", dtype="float32", max_batch_size=4), device="cpu")


@pytest.fixture(scope="session")
def ray_local():
    """A local 2-CPU Ray shared by the tests of a session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
