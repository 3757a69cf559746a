"""PPO checkpoints: `ppo/checkpoints/iter_000010/` written to a temp directory and renamed into place.

Each holds `policy/` and `critic/` (weights as safetensors, optimizer and scheduler state saved with
torch.save of tensors and numbers only, read back with `weights_only=True`), and `state.json` (the
iteration reached, which fixes the prompt position, plus the driver's RNG state). A directory that
exists is complete: a run killed while writing leaves only a hidden temp directory, ignored and removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from almost_ray.data.atomic import atomic_directory, remove_own_directory

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(stage_dir: Path) -> list[Path]:
    root = stage_dir / CHECKPOINTS
    return sorted(p for p in root.glob("iter_*") if (p / "state.json").is_file()) if root.is_dir() else []


def save(stage_dir: Path, iteration: int, trainables: dict, keep: int) -> Path:
    """Ask every replica of each trainable role to write its part (rank 0 alone, or each its shards), then
    write `state.json`, rename, prune."""
    import ray

    out = stage_dir / CHECKPOINTS / f"iter_{iteration:07d}"
    with atomic_directory(out) as tmp:
        ray.get([a.save.remote(str(tmp / role)) for role, actors in trainables.items() for a in actors])
        state = {"iteration": iteration, "torch_rng": torch.get_rng_state().tolist()}
        (tmp / "state.json").write_text(json.dumps(state))
    for old in checkpoint_dirs(stage_dir)[:-keep]:
        remove_own_directory(old)
    for stale in (stage_dir / CHECKPOINTS).glob(".iter_*"):  # temp dirs of a killed run
        remove_own_directory(stale)
    return out


def latest_iteration(stage_dir: Path) -> int:
    """The iteration of the latest complete checkpoint (0: none)."""
    found = checkpoint_dirs(stage_dir)
    return int(json.loads((found[-1] / "state.json").read_text())["iteration"]) if found else 0


def restore(stage_dir: Path, trainables: dict) -> int:
    """Load the latest checkpoint into every replica; returns the iterations already done (0: none)."""
    import ray

    found = checkpoint_dirs(stage_dir)
    if not found:
        return 0
    latest = found[-1]
    ray.get([a.load.remote(str(latest / role)) for role, actors in trainables.items() for a in actors])
    state = json.loads((latest / "state.json").read_text())
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return int(state["iteration"])
