"""Padding-free batches: several sequences laid end to end in one row, each attending only to itself.

A padded batch computes every layer on its pad tokens; a packed row computes only real tokens. The row
carries `position_ids` that restart at 0 for each sequence (so rotary embeddings match the unpacked
sequences) and the cumulative sequence lengths `cu_seq_lens_q` / `cu_seq_lens_k` that transformers'
flash-attention path takes for variable-length attention (TRL's `padding_free` and
`DataCollatorWithFlattening` hand over the same keys). With bf16 compute on a GPU and flash-attn
installed the model runs `flash_attention_2` on them; elsewhere `VARLEN_SDPA`, registered here, runs PyTorch's SDPA once per
sequence with a causal mask, so no L x L mask over the whole row is ever built.

`VARLEN_SDPA` also takes rows whose sequences share a prefix (`pack_sharing_prefixes`): a reward-model pair's
chosen and rejected conversations differ only in the last reply, so the conversation before it is laid down
once and both replies attend to it, as prefix sharing does for preference training (Wang et al. 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing"). Causal attention makes a prefix's hidden
states the same whatever follows it, so every score and gradient equals the unshared row's; only the
arithmetic on the shared tokens is saved (31 % of the tokens of bench/train.py's 64 HH-RLHF pairs). Nothing
here knows about training or Ray.
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
    """A row of segments end to end. A segment is a whole sequence, or (`pack_sharing_prefixes`) a prefix
    several sequences share or one sequence's remainder after it; `contexts[i]` is the span of the row
    segment i attends to before itself (its shared prefix), `(0, 0)` for none."""

    input_ids: torch.Tensor  # [1, N]: every segment, end to end
    position_ids: torch.Tensor  # [1, N]: each token's position within its sequence
    starts: list[int]  # where each segment begins in the row (and N at the end)
    last: list[int] | None = None  # each sequence's last token in the row; None: each segment's
    contexts: list[tuple[int, int]] | None = None  # per segment; None: no segment has one

    @property
    def ends(self) -> torch.Tensor:
        """Index of each sequence's last token in the row, in the order the sequences were given."""
        if self.last is not None:
            return torch.tensor(self.last, dtype=torch.long)
        return torch.tensor(self.starts[1:], dtype=torch.long) - 1

    def token_rows(self) -> list[np.ndarray]:
        """Where each sequence's tokens are in the row, in the order of `ends`: its shared prefix's segment
        (if any), then its own. A prefix's last token is no sequence's last token (every sequence keeps one
        of its own), so a segment ending at a sequence's last token is that sequence's."""
        contexts = self.contexts or [(0, 0)] * (len(self.starts) - 1)
        own = {b - 1: np.concatenate([np.arange(c, d), np.arange(a, b)])
               for (c, d), a, b in zip(contexts, self.starts, self.starts[1:])}
        return [own[end] for end in self.ends.tolist()]

    def attention_kwargs(self, device) -> dict:
        """The keyword arguments a transformers model forwards to its attention function."""
        cu = torch.tensor(self.starts, dtype=torch.int32, device=device)
        longest = max(b - a for a, b in zip(self.starts, self.starts[1:]))
        kwargs = {"position_ids": self.position_ids.to(device), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                  "max_length_q": longest, "max_length_k": longest}
        if self.contexts is not None:
            kwargs[CONTEXTS] = self.contexts
        return kwargs


CONTEXTS = "almost_ray_segment_contexts"  # the attention keyword of PackedRow.contexts


def pack_sequences(sequences: Sequence[Sequence[int] | np.ndarray]) -> PackedRow:
    """One row holding `sequences` end to end (none may be empty)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_sequences needs one or more non-empty sequences")
    starts = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).tolist()
    ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    positions = np.concatenate([np.arange(len(s), dtype=np.int64) for s in sequences])
    return PackedRow(torch.from_numpy(ids)[None, :], torch.from_numpy(positions)[None, :], [int(s) for s in starts])


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens all rows share at the start, leaving each row at least one token of its own."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def pack_sharing_prefixes(groups: Sequence[Sequence[Sequence[int] | np.ndarray]], min_shared: int = 1) -> PackedRow:
    """One row holding every sequence of every group, each group's common prefix laid down once.

    A group's sequences share their first `common_prefix_length` tokens (when at least `min_shared`): that
    prefix is one segment, and each sequence's remainder a segment that attends to it, at the positions the
    remainder has in its whole sequence. `ends` gives each sequence's last token, in group order. Only
    `VARLEN_SDPA` reads the contexts (`shares_prefixes`); other attention needs `pack_sequences`.
    """
    segments: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    contexts: list[tuple[int, int]] = []
    last: list[int] = []
    at = 0
    for group in groups:
        seqs = [np.asarray(s, dtype=np.int64) for s in group]
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ValueError("pack_sharing_prefixes needs groups of one or more non-empty sequences")
        shared = common_prefix_length([s.tolist() for s in seqs]) if len(seqs) > 1 else 0
        shared = shared if shared >= min_shared else 0
        context = (at, at + shared)
        if shared:
            segments.append(seqs[0][:shared])
            positions.append(np.arange(shared, dtype=np.int64))
            contexts.append((0, 0))
            at += shared
        for seq in seqs:
            segments.append(seq[shared:])
            positions.append(np.arange(shared, len(seq), dtype=np.int64))
            contexts.append(context if shared else (0, 0))
            at += len(seq) - shared
            last.append(at - 1)
    starts = np.concatenate([[0], np.cumsum([len(s) for s in segments])]).tolist()
    return PackedRow(torch.from_numpy(np.concatenate(segments))[None, :],
                     torch.from_numpy(np.concatenate(positions))[None, :], [int(s) for s in starts], last,
                     contexts if any(b > a for a, b in contexts) else None)


def pack_pairs(pairs: Sequence[tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]], share: bool) -> PackedRow:
    """Both sequences of every pair (a preference pair's chosen and rejected) in one row, ordered every pair's
    first, then every pair's second (`ends`, `token_rows`); with `share` (`shares_prefixes`), each pair's
    common prefix is laid down once (`pack_sharing_prefixes`), else every sequence whole (`pack_sequences`)."""
    if not share:
        return pack_sequences([a for a, _ in pairs] + [b for _, b in pairs])
    row = pack_sharing_prefixes(pairs)
    row.last = row.last[0::2] + row.last[1::2]  # the row holds pair after pair
    return row


def shares_prefixes(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention honours `pack_sharing_prefixes` rows (`VARLEN_SDPA` does, flash-attention
    2's varlen kernel does not)."""
    return getattr(model.config, "_attn_implementation", None) == VARLEN_SDPA


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention applied to each packed segment alone (causal within it).

    `query`/`key`/`value` are `[1, heads, N, head_dim]` for the whole row; `cu_seq_lens_q` says where
    each segment starts, and `PackedRow.contexts` (under the keyword `CONTEXTS`) which shared prefix a
    segment attends to before itself. Returns `[1, N, heads, head_dim]`, the layout attention functions return.
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
    # split, not sliced: a slice's backward writes its gradient into a zeroed copy of the whole row, once per
    # segment, layer and tensor; a split's backward is one concatenation
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    contexts = kwargs.get(CONTEXTS) or [(0, 0)] * len(sizes)
    segment_at = {a: i for i, a in enumerate(bounds[:-1])}
    parts = []
    with torch.autocast("cpu", enabled=False) if cpu else nullcontext():
        qs, ks, vs = query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)
        for i, (c, d) in enumerate(contexts):
            if d == c:  # a whole sequence, or a shared prefix: causal within itself
                parts.append(sdpa_attention_forward(module, qs[i], ks[i], vs[i], None, dropout, scaling,
                                                    is_causal=True)[0])
                continue
            # a remainder: every token sees the whole prefix (segment j), then its own segment causally
            j = segment_at[c]
            mask = torch.ones(sizes[i], sizes[j] + sizes[i], dtype=torch.bool, device=query.device).tril(sizes[j])
            parts.append(sdpa_attention_forward(module, qs[i], torch.cat([ks[j], ks[i]], dim=2),
                                                torch.cat([vs[j], vs[i]], dim=2), mask[None, None], dropout, scaling,
                                                is_causal=False)[0])
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
