"""FSDP2 sharding of a model over a group of ranks, the same for the training loop's workers
(`train/loop.py`) and PPO's trainable roles (`rl/roles.py`): every decoder block is one unit (gathered just in
time), then the root; built on the meta device and filled from rank 0's one copy of the weights, so no rank
holds the whole model on its device.
"""

from __future__ import annotations

from typing import Any

import torch


def shard_model(model: torch.nn.Module, device: torch.device, world: int, bf16: bool, reshard: bool) -> None:
    """FSDP2: each decoder block is one unit (gathered just in time), then the root (embeddings, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    base = getattr(model, model.base_model_prefix, model)
    blocks = getattr(base, "layers", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__}: no decoder blocks at .{model.base_model_prefix}.layers to shard")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def shard_from_rank0(model: torch.nn.Module, full: torch.nn.Module | None, device: torch.device, world: int,
                     bf16: bool, reshard: bool) -> torch.nn.Module:
    """`model`, built on the meta device, sharded with FSDP2 (`shard_model`) and filled with rank 0's `full`
    copy (None on the other ranks): its state dict is broadcast into every rank's shards, its buffers that
    are not in the state dict (rotary frequencies) by `dist.broadcast`. The training loop and PPO's sharded
    roles load this way, so only rank 0 ever holds the whole model, and on the CPU."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    shard_model(model, device, world, bf16, reshard)
    model.to_empty(device=device)
    full_sd = full.state_dict() if full is not None else {}
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if full is not None:
                buffer.copy_(full.get_buffer(name))
            dist.broadcast(buffer, src=0)
    return model


