"""Padding-free batches: several sequences laid end to end in one row, each attending only to itself.

A padded batch computes every layer on its pad tokens; a packed row computes only real tokens. The row
carries `position_ids` that restart at 0 for each sequence (so rotary embeddings match the unpacked
sequences) and the cumulative sequence lengths `cu_seq_lens_q` / `cu_seq_lens_k` that transformers'
flash-attention path takes for variable-length attention (TRL's `padding_free` and
`DataCollatorWithFlattening` hand over the same keys). With bf16 compute on a GPU and flash-attn
installed the model runs `flash_attention_2` on them; elsewhere `VARLEN_SDPA`, registered here, runs PyTorch's SDPA once per
sequence with a causal mask, so no L x L mask over the whole row is ever built. Nothing here knows
about training or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

VARLEN_SDPA = "almost_ray_varlen_sdpa"


@dataclass
class PackedRow:
    input_ids: torch.Tensor  # [1, N]: every sequence, end to end
    position_ids: torch.Tensor  # [1, N]: 0 .. len-1 within each sequence
    starts: list[int]  # where each sequence begins in the row (and N at the end)

    @property
    def ends(self) -> torch.Tensor:
        """Index of each sequence's last token in the row."""
        return torch.tensor(self.starts[1:], dtype=torch.long) - 1

    def attention_kwargs(self, device) -> dict:
        """The keyword arguments a transformers model forwards to its attention function."""
        cu = torch.tensor(self.starts, dtype=torch.int32, device=device)
        longest = max(b - a for a, b in zip(self.starts, self.starts[1:]))
        return {"position_ids": self.position_ids.to(device), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": longest, "max_length_k": longest}


def pack_sequences(sequences: Sequence[Sequence[int] | np.ndarray]) -> PackedRow:
    """One row holding `sequences` end to end (none may be empty)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_sequences needs one or more non-empty sequences")
    starts = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).tolist()
    ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    positions = np.concatenate([np.arange(len(s), dtype=np.int64) for s in sequences])
    return PackedRow(torch.from_numpy(ids)[None, :], torch.from_numpy(positions)[None, :], [int(s) for s in starts])


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention applied to each packed sequence alone (causal within it).

    `query`/`key`/`value` are `[1, heads, N, head_dim]` for the whole row; `cu_seq_lens_q` says where
    each sequence starts. Returns `[1, N, heads, head_dim]`, the layout attention functions return.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:  # an unpacked batch (generation, a padded forward): SDPA as usual
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one row of end-to-end sequences")
    bounds = bounds.tolist() if isinstance(bounds, torch.Tensor) else list(bounds)
    dtype, cpu = value.dtype, query.device.type == "cpu"
    if cpu:
        # CPU's SDPA backward in bf16 takes 2.5x the time of fp32 at these sizes (3.3 against 1.3 ms for
        # SmolLM2's 9 heads over a 94-token sequence), and attention is a small share of the arithmetic:
        # under bf16 autocast on CPU it runs in fp32 (autocast off, or it would cast SDPA's inputs back)
        # and hands back the value projection's dtype (a no-op for an fp32 model).
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast("cpu", enabled=False) if cpu else nullcontext():
        parts = [
            sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout,
                                   scaling, is_causal=True)[0]
            for a, b in zip(bounds, bounds[1:])
        ]
    return torch.cat(parts, dim=1).to(dtype), None


def use_packed_attention(model: torch.nn.Module, flash: bool = False) -> None:
    """Switch `model` to an attention implementation that honours `PackedRow.attention_kwargs`:
    flash-attention 2 when `flash` (bf16 compute on a GPU) and flash-attn is installed, `VARLEN_SDPA`
    otherwise."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.utils import is_flash_attn_2_available

    if flash and is_flash_attn_2_available():
        model.set_attn_implementation("flash_attention_2")
        return
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # an unpacked, padded batch still gets its mask
    model.set_attn_implementation(VARLEN_SDPA)
