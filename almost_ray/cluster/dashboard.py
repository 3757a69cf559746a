"""Live metrics for the Ray dashboard and Prometheus, tagged with the run and the stage.

Stages already write their metrics to files (`metrics.jsonl`, manifests); this module mirrors the
numbers a person watches while a job runs — stage progress, records kept, tokens generated, losses,
PPO reward and KL — into `ray.util.metrics`, which each node's metrics agent exports to Prometheus
with a `ray_` prefix (a Counter as `<name>_total`). `docs/monitoring.md` lists them with PromQL.

Names are `almost_ray_<stage>_<metric>`; tags are `run` and `stage`. Publishing is a no-op when Ray
is not initialised (a stage's pure functions run in unit tests without Ray).
"""

from __future__ import annotations

import re
from functools import cache

TAG_KEYS = ("run", "stage")
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


def metric_name(stage: str, name: str) -> str:
    """`almost_ray_<stage>_<name>`, with characters Prometheus does not allow replaced by `_`."""
    return _INVALID.sub("_", f"almost_ray_{stage}_{name}")


@cache
def _gauge(name: str):
    from ray.util.metrics import Gauge

    return Gauge(name, description=f"almost_ray {name}", tag_keys=TAG_KEYS)


@cache
def _counter(name: str):
    from ray.util.metrics import Counter

    return Counter(name, description=f"almost_ray {name}", tag_keys=TAG_KEYS)


def _ray_up() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def set_gauges(run: str, stage: str, values: dict[str, float]) -> None:
    """Set one gauge per numeric value (latest value wins: losses, reward, KL, progress)."""
    if not _ray_up():
        return
    tags = {"run": run, "stage": stage}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        _gauge(metric_name(stage, key)).set(float(value), tags=tags)


def add_counts(run: str, stage: str, counts: dict[str, float]) -> None:
    """Add to one counter per value (monotonic totals: queries mined, pairs kept, tokens generated)."""
    if not _ray_up():
        return
    tags = {"run": run, "stage": stage}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            continue
        _counter(metric_name(stage, key)).inc(float(value), tags=tags)


def run_of(stage_dir) -> str:
    """The run a stage directory belongs to: stages write into `runs_dir/<run>/<stage>/`."""
    from pathlib import Path

    return Path(stage_dir).resolve().parent.name


def progress(run: str, stage: str, done: float, total: float) -> None:
    """`almost_ray_<stage>_progress` in [0, 1]: the dashboard's view of how far a stage is."""
    set_gauges(run, stage, {"progress": done / total if total else 1.0})
