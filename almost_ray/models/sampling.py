"""Seeded temperature + top-p sampling for the transformers backend, one `torch.Generator` per row.

A row's samples depend on its seed only, not on the other rows of its batch (and so not on how rows are
sharded across Ray replicas); `models/generator.py` promises it and the tests pin it.

The draws are the ones `torch.multinomial(probs[r], 1, generator=g[r])` makes, computed with less work.
For one sample, torch's `multinomial` is the exponential race (aten/src/ATen/native/Distributions.cpp,
"fast-path for no replacement or if only one sample is drawn"): `q = empty_like(p).exponential_(1, g)`,
then `argmax(p / q)`. Called row by row it also checks every row for negative, infinite and zero-sum
probabilities, three more passes over the 49k vocabulary, each ending in a host sync. `race_sample`
draws each row's `q` from that row's generator exactly as `multinomial` does (the same generator calls,
so the same numbers), takes the logarithm that turns a uniform draw into `q` only for the tokens of
the nucleus (the others have p = 0), and checks, divides and takes the argmax once for the batch.

The nucleus (Holtzman et al. 2020, Sec. 3.1: the smallest set of most likely tokens whose mass reaches
top_p) was found by sorting the whole vocabulary per row per step. `nucleus_probs` looks at the
`TOP_P_CANDIDATES` most likely tokens first (`torch.topk`, sorted) and keeps the same tokens the full sort
keeps: the first tokens of the descending order whose preceding mass is below top_p. The top-k values
are the first k values of the full sort and their running sums are the first k of its running sums
(cumsum is a sequential scan), so the kept count is the same whenever the first dropped token lies
among the candidates; ties at the boundary would let the two sorts order equal values differently, and
such a row (or one whose nucleus is wider than the candidates) takes the full sort, as before.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

TOP_P_CANDIDATES = (64, 1024)  # tried in turn before a full sort; a 135M model's nucleus is mostly < 64


def sorted_nucleus_probs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` with the tokens outside the top-p nucleus set to 0, by a full descending sort (the reference)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # drop a token when the mass before it already reaches top_p (the first token always stays)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


def nucleus_probs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The same as `sorted_nucleus_probs` for `probs` of shape `[rows, vocab]`, sorting only candidates."""
    rows, vocab = probs.shape
    threshold = torch.zeros(rows, dtype=probs.dtype, device=probs.device)
    todo = torch.arange(rows, device=probs.device)
    for k in TOP_P_CANDIDATES:
        if k >= vocab or todo.numel() == 0:
            break
        part = probs[todo]
        values = part.topk(k, dim=-1).values
        drop = values.cumsum(-1) - values >= top_p
        kept = (~drop).sum(-1)  # drop is monotone along the descending order: the running sum only grows
        last = values.gather(-1, (kept - 1)[:, None])[:, 0]
        after = values.gather(-1, kept.clamp(max=k - 1)[:, None])[:, 0]  # the first dropped, when kept < k
        found = (kept < k) & (last != after)
        threshold[todo[found]] = last[found]
        todo = todo[~found]
    out = probs.masked_fill(probs < threshold[:, None], 0.0)
    if todo.numel():
        out[todo] = sorted_nucleus_probs(probs[todo], top_p)
    return out


def race_sample(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` (`[rows, vocab]`, rows need not sum to 1): `[rows, 1]` ids, the draws
    `torch.multinomial(probs[r], 1, generator=generators[r])` makes, with each generator advanced alike."""
    total = probs.sum(-1)
    if not bool(((probs.amin(-1) >= 0) & torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("probability tensor contains either `inf`, `nan` or element < 0, or a row sums to 0")
    if probs.device.type != "cpu":
        noise = torch.empty_like(probs)
        for row, generator in zip(noise, generators, strict=True):
            row.exponential_(1, generator=generator)
        return (probs / noise).argmax(dim=-1, keepdim=True)
    # On CPU, exponential_ draws one uniform double per element (uniform_'s draw, the same generator
    # calls) and returns -log1p(-u) rounded to the tensor's dtype; the logarithm, most of its cost, is
    # only needed where the probability is positive (the nucleus): elsewhere p / q is 0 whatever q is,
    # or nan for q = 0 (u = 0), which argmax would take, as multinomial's argmax does.
    uniform = torch.empty(probs.shape, dtype=torch.float64, device=probs.device)
    for row, generator in zip(uniform, generators, strict=True):
        row.uniform_(generator=generator)
    support = probs > 0
    ratio = torch.zeros_like(probs)
    ratio[support] = probs[support] / (-torch.log1p(-uniform[support])).to(probs.dtype)
    ratio.masked_fill_((uniform == 0) & ~support, float("nan"))
    return ratio.argmax(dim=-1, keepdim=True)


class SeededSampler(LogitsProcessor):
    """Temperature + top-p sampling with one `torch.Generator` per row.

    It runs last in the processor list and returns a one-hot score row, so HF's greedy step takes
    exactly the token it drew. Per-row generators make each prompt's samples independent of the
    other prompts in its batch (and so of sharding across Ray replicas).

    With `record_logprobs`, it also keeps log softmax(scores / T) of each drawn token (before top-p, as
    the PPO policy scores it): `logprobs` is then `[rows, steps]`, what PPO's rollout engine hands over
    as pi_old instead of a second forward pass (rl/trainer.py).
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device,
                 record_logprobs: bool = False):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.record_logprobs = record_logprobs
        self.steps: list[torch.Tensor] = []

    @property
    def logprobs(self) -> torch.Tensor:
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(len(self.generators), 0)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # x / 1.0 == x exactly: skipping the division at T = 1 changes no bit
        tempered = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        probs = torch.softmax(tempered, dim=-1)
        if self.top_p < 1.0:
            probs = nucleus_probs(probs, self.top_p)
        picks = race_sample(probs, self.generators)
        if self.record_logprobs:
            self.steps.append(torch.log_softmax(tempered, dim=-1).gather(-1, picks).squeeze(-1).cpu())
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, picks, 0.0)
