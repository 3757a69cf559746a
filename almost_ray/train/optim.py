"""The optimizer every trainable model here uses (AdamW, fused where torch has a fused kernel), and its
learning-rate schedule.

torch's default AdamW on CPU is the per-parameter for-loop implementation; its fused kernel (CPU since
torch 2.4, CUDA) gives the same update in one pass over each tensor. FSDP2's DTensor shards keep the
default: with the fused kernel over them a 2-worker CPU run crashed once in four (SIGSEGV in malloc on
rank 1 while gathering the final state dict, tests/test_train_slow.py's resume test in `.ci/run`).
Measured on this machine for SmolLM2-135M on one thread: 0.75 s per step for the default, 0.56 s for
`foreach`, 0.09 s fused (docs/performance.md, "PPO"). transformers' Trainer (and so TRL) defaults to
the fused kernel too (`optim="adamw_torch_fused"`), so this is also what a fair comparison needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")


def adamw(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float],
          weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `params`, fused when every parameter is a plain floating-point tensor on a device with
    the fused kernel, else torch's default implementation (the same update)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES
                                 and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to `min_ratio` at `total_steps`.

    Hewitt et al. (Appendix A): 10 % linear warm-up, cosine annealing to 0; Alpaca (ALMoST D.2): 3 %.
    `step` counts optimizer steps already taken, so the first update uses `step=0`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
