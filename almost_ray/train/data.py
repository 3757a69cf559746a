"""Training data: token ids with their loss masks, and the length-bucketed order of global batches.

Everything here is deterministic and independent of the worker count: each worker computes the
same global-batch plan from the seed, then takes its own share of every global batch
(`rank_micro_batches`). That is what makes a 2-worker run equal a 1-worker run with the same
global batch, and a resumed run equal an uninterrupted one: the data position is just the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from almost_ray.train.losses import IGNORE_INDEX

Spans = list[tuple[int, int]]


def supervised_labels(offsets: Sequence[tuple[int, int]], spans: Spans) -> list[bool]:
    """Which tokens carry loss: those that start inside one of the character `spans`.

    `offsets` are the tokenizer's (start, end) character offsets. A span starts at the space after
    `Assistant:` (or right after `<|assistant|>\\n`), so the word tokens of the reply, which carry
    their leading space, fall inside it, and the turn prefix does not.
    """
    flags = []
    for start, end in offsets:
        flags.append(end > start and any(a <= start < b for a, b in spans))
    return flags


def encode_supervised(tokenizer, text: str, spans: Spans, max_length: int, eos_supervised: bool) -> dict:
    """Token ids and labels (`IGNORE_INDEX` outside `spans`) for one rendered dialogue.

    The EOS token closes the text and is learned when `eos_supervised` (the dialogue ends with an
    assistant turn), so the model learns to stop. Long texts keep their beginning (truncated right).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    flags = supervised_labels(enc["offset_mapping"], spans)
    ids.append(tokenizer.eos_token_id)
    flags.append(eos_supervised)
    ids, flags = ids[:max_length], flags[:max_length]
    labels = [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]
    return {"input_ids": np.asarray(ids, dtype=np.int32), "labels": np.asarray(labels, dtype=np.int32)}


def global_batches(lengths: Sequence[int], batch_size: int, epochs: int, seed: int, group: int = 16) -> list[list[int]]:
    """Indices of every global batch, epoch after epoch: shuffled, then bucketed by length.

    Each epoch is a seeded permutation cut into mega-batches of `group` global batches; inside a
    mega-batch examples are sorted by length and cut into global batches, whose order is shuffled
    again. Batches then hold examples of similar length, so padding stays a small cost (the same
    idea as `group_by_length` in transformers). The last batch of an epoch may be smaller.
    """
    n = len(lengths)
    if n == 0:
        raise ValueError("no training examples")
    plan: list[list[int]] = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(n)
        batches = []
        mega = batch_size * max(1, group)
        for start in range(0, n, mega):
            chunk = sorted(perm[start : start + mega].tolist(), key=lambda i: -lengths[i])
            batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        order = rng.permutation(len(batches))
        plan.extend(batches[i] for i in order)
    return plan


def rank_micro_batches(
    batch: Sequence[int], lengths: Sequence[int], rank: int, world_size: int, micro_batch_size: int
) -> list[list[int]]:
    """This worker's micro-batches of one global batch; every worker gets the same number of them.

    Examples are sorted by length and dealt round-robin, so all workers see similar lengths; a
    worker's share is cut into `ceil(share / micro_batch_size)` contiguous (similar-length) pieces.
    A piece can be empty when the global batch is smaller than the world: the worker still runs a
    forward/backward (FSDP's collectives need everyone) with zero weight.
    """
    ordered = sorted(batch, key=lambda i: (-lengths[i], i))
    share = ordered[rank::world_size]
    largest = math.ceil(len(batch) / world_size)
    pieces = max(1, math.ceil(largest / micro_batch_size))
    return [share[round(k * len(share) / pieces) : round((k + 1) * len(share) / pieces)] for k in range(pieces)]


def pad_batch(sequences: Sequence[np.ndarray], pad_value: int) -> torch.Tensor:
    """Right-pad 1-D int arrays into one `[batch, longest]` long tensor."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
    return out
