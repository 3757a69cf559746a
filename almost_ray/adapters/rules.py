"""Hewitt et al.'s 3-rule adapter (Section 6.1, Table 8, Listing 1) as a decoding-time logits processor.

The adapted model is a product of distributions, p_a(w | x) = p_base(w | x) * p_rules(w | x) / Z(x), with
p_rules = softmax(r(., x)). In log space that is `log_softmax(log p_base + r)`: the rule scores are added to
the base model's log-probabilities and the sum is renormalised. r(w, x) is the sum of three rules:

1. EOS bonus growing with the response length L (tokens so far): eos_weight * L / horizon for
   0 < L < horizon (Listing 1 gives nothing from the horizon on; `eos_hold_after_horizon` keeps the full
   bonus instead);
2. fixed scores for a few token strings (Table 8: formatting "<", refusal openers "I"/"We"/"What",
   "should", and small boosts for markdown and "!");
3. a penalty on every token already produced in the response.

Token strings are resolved through the model's own tokenizer (a string matches every vocabulary item
that decodes to exactly that text), not through Llama-2 ids, so the adapter works with any tokenizer.
`RuleTables` holds the resolved tables and the pure math; `RulesLogitsProcessor` plugs it into
transformers' `generate`, and `almost_ray.adapters.rules_vllm` into vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import LogitsProcessor

from almost_ray.config import RulesConfig

# How the vLLM backend names the processor class and the per-request switch (see rules_vllm.py).
RULES_VLLM_PROCESSOR = "almost_ray.adapters.rules_vllm:RulesAdapterProcessor"
RULES_EXTRA_ARG = "almost_ray_rules"


def rules_from_extra_arg(raw: dict | str) -> RulesConfig:
    """The `RulesConfig` a vLLM request carries: a dict (offline `SamplingParams.extra_args`) or its JSON
    text (an OpenAI request's `vllm_xargs`, whose values can only be strings and numbers)."""
    return RulesConfig.model_validate_json(raw) if isinstance(raw, str) else RulesConfig.model_validate(raw)


def token_surfaces(tokenizer) -> list[str]:
    """The text each vocabulary item contributes when it follows other text.

    Decoding a token alone loses its leading space under SentencePiece-style decoders (they strip the
    first space of a sequence), so each token is decoded after a fixed anchor token and the anchor's
    text is cut off. Items whose decoding does not start with the anchor's text fall back to their own.
    """
    anchor = tokenizer("a", add_special_tokens=False).input_ids[:1]
    if not anchor:
        raise ValueError("the tokenizer encodes 'a' to no tokens; cannot resolve token strings")
    head = tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    size = len(tokenizer)
    pairs = tokenizer.batch_decode(
        [anchor + [i] for i in range(size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    surfaces = []
    for i, text in enumerate(pairs):
        if text.startswith(head):
            surfaces.append(text[len(head):])
        else:
            surfaces.append(tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return surfaces


def resolve_strings(surfaces: Sequence[str], strings: Iterable[str]) -> dict[str, list[int]]:
    """Vocabulary ids whose surface text equals each string (empty list when the tokenizer has none)."""
    wanted = set(strings)
    found: dict[str, list[int]] = {s: [] for s in wanted}
    for i, text in enumerate(surfaces):
        if text in wanted:
            found[text].append(i)
    return found


def eos_bonus(length: int, cfg: RulesConfig) -> float:
    """Rule 1: the EOS score after `length` response tokens (Listing 1: 0 < length < horizon)."""
    if 0 < length < cfg.eos_horizon:
        return cfg.eos_weight * length / cfg.eos_horizon
    if length >= cfg.eos_horizon and cfg.eos_hold_after_horizon:
        return cfg.eos_weight
    return 0.0


class RuleTables:
    """The rules resolved for one tokenizer: a static bias vector (rule 2), EOS ids (rule 1), weights."""

    def __init__(self, bias: torch.Tensor, eos_ids: list[int], cfg: RulesConfig, unresolved: list[str]):
        self.bias = bias
        self.eos_ids = eos_ids
        self.cfg = cfg
        self.unresolved = unresolved  # configured strings that are no single token of this tokenizer

    @classmethod
    def from_tokenizer(
        cls, tokenizer, cfg: RulesConfig, vocab_size: int | None = None, eos_ids: Sequence[int] | None = None
    ) -> RuleTables:
        """Resolve `cfg`'s token strings; `vocab_size` is the model's logits width (may exceed the tokenizer's)."""
        size = max(vocab_size or 0, len(tokenizer))
        bias = torch.zeros(size)
        strings = [s for b in cfg.biases for s in b.strings]
        ids = resolve_strings(token_surfaces(tokenizer), strings) if strings else {}
        for b in cfg.biases:
            for s in b.strings:
                bias[ids[s]] = b.weight  # a string listed twice keeps its last weight, as in Listing 1
        unresolved = sorted({s for s in strings if not ids[s]})
        eos = list(eos_ids) if eos_ids else [tokenizer.eos_token_id]
        if any(e is None for e in eos):
            raise ValueError("the tokenizer has no EOS token; pass eos_ids")
        return cls(bias, sorted({int(e) for e in eos}), cfg, unresolved)

    def scores(self, responses: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """r(., x) for a batch of responses so far, (batch, length) token ids -> (batch, vocab)."""
        width = width or self.bias.numel()
        batch, length = responses.shape
        bias = self.bias[:width]
        if bias.numel() < width:  # logits wider than the tokenizer (padded embeddings): no rule there
            bias = torch.cat([bias, bias.new_zeros(width - bias.numel())])
        r = bias.to(responses.device).expand(batch, width).clone()
        bonus = eos_bonus(length, self.cfg)
        if bonus:
            r[:, self.eos_ids] += bonus
        if length and self.cfg.repeat_penalty:
            used = torch.zeros(batch, width, device=responses.device)
            used.scatter_(1, responses.clamp(max=width - 1), 1.0)  # each distinct token once
            r += self.cfg.repeat_penalty * used
        return r

    def apply(self, logits: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """log p_a = log_softmax(log_softmax(logits) + r): the renormalised product of experts (Eq. 4-5)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return torch.log_softmax(logprobs + self.scores(responses, logits.shape[-1]), dim=-1).to(logits.dtype)

    def apply_row(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """One request's row (vLLM's per-request processors): output ids so far, (vocab,) logits."""
        responses = torch.tensor([output_ids], dtype=torch.long, device=logits.device).reshape(1, -1)
        return self.apply(logits[None], responses)[0]


class RulesLogitsProcessor(LogitsProcessor):
    """transformers `LogitsProcessor` for one `generate` call: the response starts at `prompt_length`.

    Prompts are left-padded to one width, so every row's response starts at the same column. Build
    a new processor for each batch (the HF backend does, from `ModelConfig.rules`).
    """

    def __init__(self, tables: RuleTables, prompt_length: int):
        self.tables = tables
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.tables.apply(scores, input_ids[:, self.prompt_length :])
