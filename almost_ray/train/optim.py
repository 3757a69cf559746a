"""The optimizer every trainable model here uses: AdamW, fused where torch has a fused kernel.

torch's default AdamW on CPU is the per-parameter for-loop implementation; its fused kernel (CPU since
torch 2.4, CUDA) gives the same update in one pass over each tensor. FSDP2's DTensor shards keep the
default: with the fused kernel over them a 2-worker CPU run crashed once in four (SIGSEGV in malloc on
rank 1 while gathering the final state dict, tests/test_train_slow.py's resume test in `.ci/run`).
Measured on this machine for SmolLM2-135M on one thread: 0.75 s per step for the default, 0.56 s for
`foreach`, 0.09 s fused (docs/performance.md, "PPO"). transformers' Trainer (and so TRL) defaults to
the fused kernel too (`optim="adamw_torch_fused"`), so this is also what a fair comparison needs.
"""

from __future__ import annotations

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
