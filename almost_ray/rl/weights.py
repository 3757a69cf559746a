"""The policy's weights through Ray's object store, as numpy arrays (the CPU weight sync of PPO).

Ray keeps numpy arrays out of band and hands them to the reader zero-copy from shared memory, while a
dict of torch tensors is pickled, through bytes, on both sides. Measured for SmolLM2-135M between two
actors on this machine: 4.3-5.3 s per sync as tensors, 0.3-0.6 s as arrays (docs/performance.md, "PPO").
dtypes numpy lacks (bfloat16, float8) travel as their bits in an integer array of the same width.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                 torch.uint8, torch.bool}


def to_arrays(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (array, torch dtype name); the arrays share the CPU tensors' memory until Ray copies them."""
    out = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if tensor.dtype not in _NUMPY_DTYPES:
            tensor = tensor.view(_BITS[tensor.element_size()])
        out[name] = (tensor.numpy(), dtype)
    return out


def as_tensors(arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    """`to_arrays` output as CPU tensors over the same (read-only, shared) memory: read them, never write."""
    with warnings.catch_warnings():
        # Ray's zero-copy arrays are read-only; the tensors are only read (copied into a model)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(array).view(getattr(torch, dtype)) for name, (array, dtype) in arrays.items()}


def load_arrays(model: torch.nn.Module, arrays: dict[str, tuple[np.ndarray, str]]) -> None:
    """Copy `to_arrays` output into `model`'s tensors in place; the names must be the model's."""
    state = model.state_dict()
    if set(state) != set(arrays):
        missing, unexpected = sorted(set(state) - set(arrays)), sorted(set(arrays) - set(state))
        raise ValueError(f"weight sync: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in as_tensors(arrays).items():
            state[name].copy_(tensor)



def gathered_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every entry of `model`'s state dict, one FSDP2 unit (decoder layer) at a time.

    Unsharded, these are the model's own tensors. Sharded with FSDP2 (every rank must iterate: the unit's
    all-gather is collective), each unit is unsharded, its entries are yielded (parameters in the compute
    dtype of its mixed-precision policy) and it is resharded before the next one: at most one layer is ever
    whole, never the model (OpenRLHF gathers one parameter at a time under ZeRO-3 for the same reason). A
    tensor of a sharded model is freed once iteration moves on: copy what must be kept.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield from model.state_dict().items()
        return
    owner: dict[str, str] = {}  # module name -> name of the FSDP unit holding its parameters
    units: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            units[name] = module
        owner[name] = name if name in units else owner[name.rsplit(".", 1)[0] if "." in name else ""]
    modules = dict(model.named_modules())
    for unit_name, unit in units.items():
        unit.unshard()
        try:
            for name in (m for m, u in owner.items() if u == unit_name):
                module, prefix = modules[name], f"{name}." if name else ""
                for key, param in module.named_parameters(recurse=False):
                    yield prefix + key, param.detach()
                for key, buffer in module.named_buffers(recurse=False):
                    if key not in module._non_persistent_buffers_set:
                        yield prefix + key, buffer
        finally:
            unit.reshard()
