"""A training stage around `loop.fit`: skip when done, encode, train, plot, write the manifest.

`train-rm` and `train-sft` differ only in how their input file becomes examples; everything that
makes them a pipeline stage (resume, Ray start-up, metrics plot, manifest) lives here once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from almost_ray.cluster_config import RayConfig

# model_dir -> (encoded examples, counts for the manifest)
Prepare = Callable[[Path], tuple[list[Any], dict[str, int]]]


def run_stage(
    name: str,
    kind: str,
    cfg,
    ray_cfg: RayConfig,
    inputs: dict[str, str | Path],
    stage_dir: str | Path,
    prepare: Prepare,
    plot: tuple[list[str], str],
) -> Path:
    """Train `kind` ("rm" | "sft") into `stage_dir/model`; returns it. Skipped when already done."""
    from almost_ray.cluster import init_ray
    from almost_ray.config import Config
    from almost_ray.manifest import is_done, write_manifest
    from almost_ray.models.loading import resolve_model_dir
    from almost_ray.preflight import plan_preflight, preflight, train_bundles
    from almost_ray.train import loop
    from almost_ray.train.report import plot_metrics, summarize

    stage_dir = Path(stage_dir)
    if is_done(stage_dir, cfg, inputs) and (stage_dir / loop.MODEL_DIR / "config.json").exists():
        print(f"{name}: {stage_dir} is up to date")
        return stage_dir / loop.MODEL_DIR
    started = time.time()
    if cfg.num_workers > 0:  # before loading anything: a worker group that cannot start fails in seconds
        init_ray(ray_cfg)
        preflight(f"{name.split(':')[0].replace('-', '_')} workers", train_bundles(cfg))
        section = "train_rm" if kind == "rm" else "train_sft"
        plan_preflight(Config(**{section: cfg}), section)  # GPU memory, as `almost-ray plan` counts it
    model_dir = resolve_model_dir(cfg.model)
    examples, counts = prepare(model_dir)
    out = loop.fit(kind, cfg, examples, model_dir, stage_dir)
    summary = summarize(stage_dir / loop.METRICS)
    keys, title = plot
    plot_metrics(stage_dir / loop.METRICS, stage_dir / "training.png", keys, title=title)
    write_manifest(stage_dir, name, cfg, inputs, started, counts=counts, metrics=summary)
    return out
