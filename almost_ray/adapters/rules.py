"""Hewitt et al.'s 3-rule adapter (Section 6.1, Table 8, Listing 1) as a decoding-time logits processor.

The adapted model is a product of distributions, p_a(w | x) = p_base(w | x) * p_rules(w | x) / Z(x), with
p_rules = softmax(r(., x)). In log space that is `log_softmax(log p_base + r)`: the rule scores are added to
the base model's log-probabilities and the sum is renormalised. r(w, x) is the sum of three rules:

1. EOS bonus growing with the response length L (tokens so far): eos_weight * L / horizon for
   0 < L < horizon (Listing 1 gives nothing from the horizon on; `eos_hold_after_horizon` keeps the full
   bonus instead);
2. fixed scores for a few token strings (Table 8: formatting "<", refusal openers "I"/"We"/"What",
   "should", and small boosts for markdown and "!");
3. a penalty on every distinct token already in its scope: by default (`repeat_scope: after_last_user`,
   as Listing 1) every token after the last user tag, so the instruction's words too; `response` keeps
   it to the response.

Token strings are resolved through the model's own tokenizer (a string matches every vocabulary item
that decodes to exactly that text), not through Llama-2 ids, so the adapter works with any tokenizer.
`RuleTables` holds the resolved tables and the pure math; `RulesLogitsProcessor` plugs it into
transformers' `generate`, and `almost_ray.adapters.rules_vllm` into vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import LogitsProcessor

from almost_ray.adapters.config import RulesConfig

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


def tag_token_ids(tokenizer, tag: str) -> list[int]:
    """The ids that mark `tag` inside a prompt, found the way Listing 1 finds `"<|user|>\\n"`.

    Listing 1 takes the last 5 ids of `tokenizer("\\n<|user|>\\n")` under Llama-2's tokenizer: the tag
    without its first character (whose piece depends on what precedes it), newline included. Here: the
    ids of `"\\n" + tag` after those of `"\\n" + tag[0]`, which are exactly those 5 on Llama-2.
    """
    full = tokenizer(f"\n{tag}", add_special_tokens=False).input_ids
    head = tokenizer(f"\n{tag[:1]}", add_special_tokens=False).input_ids
    if full[: len(head)] == head and len(full) > len(head):
        return list(full[len(head):])
    return list(full[1:]) or list(full)


def last_match_end(ids: Sequence[int], pattern: Sequence[int]) -> int | None:
    """The index just after the last occurrence of `pattern` in `ids`, or None."""
    k = len(pattern)
    for i in range(len(ids) - k, -1, -1):
        if list(ids[i : i + k]) == list(pattern):
            return i + k
    return None


class RuleTables:
    """The rules resolved for one tokenizer: a static bias vector (rule 2), EOS ids (rule 1), the user
    tag that starts rule 3's scope, and the weights. The bias is kept per (device, width), so a decoding
    step adds it where the logits are instead of copying it there."""

    def __init__(
        self, bias: torch.Tensor, eos_ids: list[int], cfg: RulesConfig, unresolved: list[str],
        user_tag_ids: list[int] | None = None,
    ):
        self.bias = bias
        self.eos_ids = eos_ids
        self.cfg = cfg
        self.unresolved = unresolved  # configured strings that are no single token of this tokenizer
        self.user_tag_ids = user_tag_ids or []
        self._placed: dict[tuple[str, int], torch.Tensor] = {}

    @classmethod
    def from_tokenizer(
        cls, tokenizer, cfg: RulesConfig, vocab_size: int | None = None, eos_ids: Sequence[int] | None = None
    ) -> RuleTables:
        """Resolve `cfg`'s token strings; `vocab_size` is the model's logits width (may exceed the tokenizer's).

        `eos_ids` is `models.loading.eos_token_ids(tokenizer, generation_config)` in both backends.
        """
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
        return cls(bias, sorted({int(e) for e in eos}), cfg, unresolved, tag_token_ids(tokenizer, cfg.user_tag))

    def repeat_start(self, prompt_ids: Sequence[int]) -> int:
        """Where rule 3's scope starts in a prompt: after the last user tag (`after_last_user`, the
        reference: instruction and response), else at the prompt's start (the reference's fallback
        when it finds no tag); or at the prompt's end (`response`: the response only). Listing 1 takes
        the first tag (`next(...)`); on its single-turn prompts that is the last one too, and on a
        multi-turn prompt the last keeps earlier turns out of the scope."""
        if self.cfg.repeat_scope == "response":
            return len(prompt_ids)
        end = last_match_end(prompt_ids, self.user_tag_ids) if self.user_tag_ids else None
        return 0 if end is None else end

    def bias_on(self, device: torch.device, width: int) -> torch.Tensor:
        """Rule 2's vector, `width` wide (logits wider than the tokenizer get no rule there), on `device`."""
        key = (str(device), width)
        if key not in self._placed:
            bias = self.bias[:width]
            if bias.numel() < width:
                bias = torch.cat([bias, bias.new_zeros(width - bias.numel())])
            self._placed[key] = bias.to(device)
        return self._placed[key]

    def scores(
        self, responses: torch.Tensor, width: int | None = None, scoped: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """r(., x) for a batch: `responses` (batch, length) are the response ids so far (rule 1 counts
        them); `scoped` holds each row's ids in rule 3's scope (default: the response)."""
        width = width or self.bias.numel()
        batch, length = responses.shape
        r = self.bias_on(responses.device, width).expand(batch, width).clone()
        if self.cfg.repeat_penalty:
            rows = scoped if scoped is not None else list(responses)
            used = torch.zeros(batch, width, device=responses.device)
            for i, ids in enumerate(rows):
                if len(ids):
                    used[i, ids.clamp(max=width - 1)] = 1.0  # each distinct token once
            r += self.cfg.repeat_penalty * used
        bonus = eos_bonus(length, self.cfg)
        if bonus:  # Listing 1 assigns the EOS score: it replaces the other rules' for EOS
            r[:, self.eos_ids] = bonus
        return r

    def apply(
        self, logits: torch.Tensor, responses: torch.Tensor, scoped: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """log p_a = log_softmax(log_softmax(logits) + r): the renormalised product of experts (Eq. 4-5)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        r = self.scores(responses, logits.shape[-1], scoped)
        return torch.log_softmax(logprobs + r, dim=-1).to(logits.dtype)

    def apply_row(self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """One request's row (vLLM's per-request processors): prompt and output ids, (vocab,) logits."""
        responses = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device).reshape(1, -1)
        scope = list(prompt_ids[self.repeat_start(prompt_ids):]) + list(output_ids)
        scoped = [torch.tensor(scope, dtype=torch.long, device=logits.device)]
        return self.apply(logits[None], responses, scoped)[0]


class RulesLogitsProcessor(LogitsProcessor):
    """transformers `LogitsProcessor` for one `generate` call on a left-padded batch of prompts.

    Every row's response starts at the prompts' common width; rule 3's scope starts where
    `RuleTables.repeat_start` says in each row's own (unpadded) prompt. Build a new processor for
    each batch (the HF backend does, from `ModelConfig.rules`).
    """

    def __init__(self, tables: RuleTables, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        self.tables = tables
        self.prompt_length = prompt_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_ids)
        self.starts = []
        for row, mask in zip(prompt_ids.tolist(), attention_mask.tolist()):
            pads = len(mask) - sum(mask)
            self.starts.append(pads + tables.repeat_start(row[pads:]))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scoped = [input_ids[i, s:] for i, s in enumerate(self.starts)]
        return self.tables.apply(scores, input_ids[:, self.prompt_length :], scoped)
