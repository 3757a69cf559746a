"""Episodes as tensors, and the per-token log-probabilities and values a model assigns to them.

An episode is one prompt and one sampled response, both token ids. `pack` lays a batch out
right-padded (`prompt + response + pad`), with `positions[b, j]`, the index of the logits row that
predicts response token j (`len(prompt) - 1 + j`), so the policy, the reference, the rollout engine
and the critic all read the same positions. Nothing here knows about Ray.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class Packed:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, R] row of the logits / hidden state that predicts response token j
    targets: torch.Tensor  # [B, R] response token j
    mask: torch.Tensor  # [B, R] 1.0 on response tokens

    def to(self, device) -> Packed:
        return Packed(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.positions, self.targets,
                                                 self.mask)))


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, width: int | None = None) -> Packed:
    """Right-padded `prompt + response` rows; response tensors `width` wide (default: the longest response)."""
    width = width or max(1, max(len(r) for r in response_ids))
    total = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    n = len(prompt_ids)
    input_ids = torch.full((n, total), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, total), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    targets = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width))
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        seq = list(p) + list(r)
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, : len(seq)] = 1
        positions[b, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        targets[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1.0
    return Packed(input_ids, attention_mask, positions, targets, mask)


def response_logprobs(model, packed: Packed, temperature: float = 1.0) -> torch.Tensor:
    """log pi(response token j | prompt, earlier tokens) for each episode, [B, R], zero on padding.

    The logits are divided by the sampling temperature, so these are the log-probabilities of the
    distribution the tokens were drawn from (the paper samples at temperature 1).
    """
    first, kept = _response_rows(model, packed)
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, **kept).logits
    index = (packed.positions - first).clamp(min=0)  # padding rows point anywhere; the mask zeroes them
    rows = logits.gather(1, index[..., None].expand(-1, -1, logits.size(-1)))
    logprobs = torch.log_softmax(rows.float() / temperature, dim=-1)
    return logprobs.gather(-1, packed.targets[..., None]).squeeze(-1) * packed.mask


def _response_rows(model, packed: Packed) -> tuple[int, dict]:
    """The first logits row any response token needs, and the `logits_to_keep` argument that makes the
    model apply its LM head only from there on: prompt positions never need the vocabulary projection
    (a 576 x 49152 matrix for SmolLM2: 8 % of a training step, docs/performance.md "PPO"). Models whose
    forward has no `logits_to_keep` get every row."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters or not packed.mask.any():
        return 0, {}
    first = int(packed.positions[packed.mask.bool()].min())
    last = int(packed.positions.max())
    return first, {"logits_to_keep": torch.arange(first, last + 1, device=packed.input_ids.device)}


def response_values(critic, packed: Packed) -> torch.Tensor:
    """V(state before response token j), [B, R]: the score head of a sequence classifier on every token.

    `*ForSequenceClassification` pools its head at the last token; the critic applies the same head
    to each position instead, so a critic initialised from the RM starts out predicting the RM's score.
    """
    base = getattr(critic, critic.base_model_prefix)
    hidden = base(input_ids=packed.input_ids, attention_mask=packed.attention_mask).last_hidden_state
    rows = hidden.gather(1, packed.positions[..., None].expand(-1, -1, hidden.size(-1)))
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
