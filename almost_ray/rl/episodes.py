"""Episodes as tensors, and the per-token log-probabilities and values a model assigns to them.

An episode is one prompt and one sampled response, both token ids. `pack` lays a batch out as
rows of tokens, either right-padded (`prompt + response + pad`, one episode per row) or padding-free
(every episode end to end in one row, `models.packing`), with `positions[b, j]`, the index in the
flattened rows of the hidden state that predicts response token j (`len(prompt) - 1 + j` into the
episode), so the policy, the reference, the rollout engine and the critic all read the same positions
whatever the layout. Nothing here knows about Ray.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from almost_ray.models.packing import PackedRow, pack_sequences


@dataclass
class Packed:
    input_ids: torch.Tensor  # [rows, T]: B rows padded, or 1 row padding-free
    attention_mask: torch.Tensor | None  # [rows, T] padded; None padding-free (`row` says where episodes start)
    positions: torch.Tensor  # [B, R] flat index (row * T + column) of the hidden state predicting response token j
    targets: torch.Tensor  # [B, R] response token j
    mask: torch.Tensor  # [B, R] 1.0 on response tokens
    row: PackedRow | None = None  # padding-free only

    def to(self, device) -> Packed:
        return Packed(*(t.to(device) if t is not None else None
                        for t in (self.input_ids, self.attention_mask, self.positions, self.targets, self.mask)),
                      row=self.row)

    def model_inputs(self) -> dict:
        """The keyword arguments of the model's forward for these rows."""
        if self.row is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {"input_ids": self.input_ids, **self.row.attention_kwargs(self.input_ids.device)}


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, width: int | None = None,
         padding_free: bool = False) -> Packed:
    """The episodes as model input; response tensors `width` wide (default: the longest response).

    Right-padded rows by default; `padding_free` puts every episode end to end in one row, which needs
    the model switched to `models.packing.use_packed_attention` first.
    """
    width = width or max(1, max(len(r) for r in response_ids))
    n = len(prompt_ids)
    positions = torch.zeros((n, width), dtype=torch.long)
    targets = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width))
    sequences = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    if padding_free:
        row = pack_sequences(sequences)
        input_ids, attention_mask, starts = row.input_ids, None, row.starts[:-1]
    else:
        row, total = None, max(len(seq) for seq in sequences)
        input_ids = torch.full((n, total), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, total), dtype=torch.long)
        starts = [b * total for b in range(n)]
        for b, seq in enumerate(sequences):
            input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[b, : len(seq)] = 1
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        first = starts[b] + len(p) - 1
        positions[b, : len(r)] = torch.arange(first, first + len(r))
        targets[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1.0
    return Packed(input_ids, attention_mask, positions, targets, mask, row)


def response_logprobs(model, packed: Packed, temperature: float = 1.0) -> torch.Tensor:
    """log pi(response token j | prompt, earlier tokens) for each episode, [B, R], zero on padding.

    The logits are divided by the sampling temperature, so these are the log-probabilities of the
    distribution the tokens were drawn from (the paper samples at temperature 1).
    """
    index, kept = _response_rows(model, packed)
    logits = model(**packed.model_inputs(), **kept).logits
    rows = logits.reshape(-1, logits.size(-1))[index]  # padding rows point anywhere; the mask zeroes them
    logprobs = torch.log_softmax(rows.float() / temperature, dim=-1)
    return logprobs.gather(-1, packed.targets[..., None]).squeeze(-1) * packed.mask


def _response_rows(model, packed: Packed) -> tuple[torch.Tensor, dict]:
    """Where each response token's logits row lands in the model's output, and the `logits_to_keep`
    argument that makes the model apply its LM head only to the rows that predict a response token:
    prompt positions never need the vocabulary projection (a 576 x 49152 matrix for SmolLM2: 8 % of a
    training step, docs/performance.md "PPO"). Models whose forward has no `logits_to_keep` get every
    row, in flattened order."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters or not packed.mask.any():
        return packed.positions, {}
    keep = torch.zeros(packed.input_ids.numel(), dtype=torch.bool, device=packed.input_ids.device)
    keep[packed.positions[packed.mask.bool()]] = True
    kept_index = keep.cumsum(0) - 1  # row of the kept logits for each flat position
    return kept_index[packed.positions], {"logits_to_keep": keep.view_as(packed.input_ids)}


def response_values(critic, packed: Packed) -> torch.Tensor:
    """V(state before response token j), [B, R]: the score head of a sequence classifier on every token.

    `*ForSequenceClassification` pools its head at the last token; the critic applies the same head to
    each position instead, so a critic initialised from the RM starts out predicting the RM's score. A
    whole critic applies the head to the response positions' hidden states only. A critic sharded with
    FSDP2 must run through its own forward, where FSDP2 gathers and frees the head (the root unit's), so it
    scores every token (`models.reward.expose_token_scores`) and the response positions are read off that.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(critic, FSDPModule):
        scores = critic(**packed.model_inputs()).logits  # [rows, T, 1]
        return scores.reshape(-1)[packed.positions].float() * packed.mask
    base = getattr(critic, critic.base_model_prefix)
    hidden = base(**packed.model_inputs()).last_hidden_state
    rows = hidden.reshape(-1, hidden.size(-1))[packed.positions]
    return critic.score(rows).squeeze(-1).float() * packed.mask


def take(batch: dict, rows) -> dict:
    """The episodes `rows` (a range or index tensor) of a batch dict of lists and `[B, ...]` tensors."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()] for k, v in batch.items()}


def split_rows(n: int, parts: int) -> list[range]:
    """Contiguous near-equal row ranges, one per replica (some empty when `parts > n`)."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + size + (1 if k < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out
