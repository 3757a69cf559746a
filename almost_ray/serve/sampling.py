"""OpenAI's sampling controls on the transformers backend: presence and frequency penalties, `logit_bias`,
and the log-probabilities a request asks for (`logprobs`, `top_logprobs`, `echo`).

The math is in pure functions of tensors; the `LogitsProcessor`s only hold what a decode loop needs
between steps. They run after the rules adapter and before the seeded sampler (`hf_backend.generate_ids`
puts its own processors around these), so the order within a step is: model logits -> rules adapter ->
[logprobs recorded] -> penalties -> logit_bias -> temperature/top-p sampling or greedy choice.

Logprobs are of the model's distribution (with the rules adapter when it is on), before penalties, bias,
temperature and top-p: what the model thinks of each token, which is what evaluation harnesses score and
what vLLM returns by default (its `raw_logprobs` mode).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


def openai_penalties(scores: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """`mu[j] - c[j] * frequency - [c[j] > 0] * presence` (OpenAI API reference, "parameter details":
    frequency and presence penalties).

    `c[j]` counts token j in the completion so far, not in the prompt: the penalties discourage the model
    from repeating itself, linearly in how often (frequency) and once for having said it at all
    (presence). Unlike transformers' `repetition_penalty`, which divides or multiplies a logit and so acts
    differently on positive and negative logits, this is an additive shift, as the API defines it.
    """
    return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence


def token_counts(generated: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """`[rows, vocab]` counts of each token id in each row of `generated` (`[rows, steps]`)."""
    counts = torch.zeros((generated.shape[0], vocab), dtype=dtype, device=generated.device)
    if generated.shape[1]:
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=dtype))
    return counts


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probs of each row and their token ids (`[rows, k]` each; k may be 0)."""
    if k == 0:
        empty = logprobs.new_zeros((logprobs.shape[0], 0))
        return empty, empty.long()
    return logprobs.topk(k, dim=-1)


class OpenAIPenalties(LogitsProcessor):
    """`openai_penalties` over the tokens generated so far (the prompt is the first call's width)."""

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency
        self.prompt_width: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        counts = token_counts(input_ids[:, self.prompt_width :], scores.shape[-1], scores.dtype)
        return openai_penalties(scores, counts, self.presence, self.frequency)


class LogitBias(LogitsProcessor):
    """Adds `logit_bias` (token id -> bias in [-100, 100]) to every step's logits: -100 bans a token, +100
    makes it all but certain (OpenAI's semantics)."""

    def __init__(self, bias: tuple[tuple[int, float], ...]):
        self.bias = bias
        self.vector: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.vector is None:  # built once, on the scores' device and dtype
            self.vector = torch.zeros(scores.shape[-1], dtype=scores.dtype, device=scores.device)
            ids = torch.tensor([t for t, _ in self.bias], device=scores.device)
            self.vector[ids] = torch.tensor([b for _, b in self.bias], dtype=scores.dtype, device=scores.device)
        return scores + self.vector


class LogprobRecorder(LogitsProcessor):
    """Keeps, per row and step, the log-prob of the token the step chose and the `k` most likely tokens.

    A step's choice is known only at the next step (it is the last column of `input_ids` then), so the
    recorder holds one step's log-softmax and resolves it one call later; `finish` resolves the last step
    from the generated ids. Only `[rows, k]` per step is kept, never `[rows, vocab]` per step, and it stays
    on the device until `finish` (a copy to the host at every step would stall a GPU's decode loop).
    """

    def __init__(self, k: int):
        self.k = k
        self.pending: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []
        self.top_values: list[torch.Tensor] = []
        self.top_ids: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.chosen.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        values, ids = top_logprobs(self.pending, self.k)
        self.top_values.append(values)
        self.top_ids.append(ids)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> tuple[list[list[float]], list[list[list[tuple[int, float]]]]]:
        """Per row: the chosen tokens' log-probs, and per step the top-k `(token id, log-prob)` pairs."""
        if self.pending is not None and len(self.chosen) < new_tokens.shape[1]:
            last = new_tokens[:, len(self.chosen) : len(self.chosen) + 1].to(self.pending.device)
            self.chosen.append(self.pending.gather(-1, last).squeeze(-1))
            self.pending = None
        rows = new_tokens.shape[0]
        if not self.chosen:
            return [[] for _ in range(rows)], [[] for _ in range(rows)]
        chosen = torch.stack(self.chosen, dim=1).tolist()
        values = torch.stack(self.top_values, dim=1).tolist()
        ids = torch.stack(self.top_ids, dim=1).tolist()
        tops = [[list(zip(i_step, v_step)) for i_step, v_step in zip(i_row, v_row)] for i_row, v_row in zip(ids, values)]
        return chosen, tops


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], k: int) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """log p(token | the tokens before it) for each prompt token (None for the first, which has no
    context), and the k most likely tokens at each position: what `echo` with `logprobs` returns, and how
    evaluation harnesses score a continuation with one request."""
    x = torch.tensor([ids], device=model.device)
    logprobs = torch.log_softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float(), dim=-1)
    chosen = logprobs[:-1].gather(-1, x[0, 1:, None]).squeeze(-1).tolist()
    values, top_ids = top_logprobs(logprobs[:-1], k)
    tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
    return [None, *chosen], [[], *tops]
