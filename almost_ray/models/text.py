"""Text <-> token ids, the same for every backend: prompt ids, the prompt-length policy, scoring pairs,
per-prompt seeds and stop strings.

This module sits below `generator.py` and both backends (`hf_backend.py`, `vllm_backend.py`), so each
rule lives here once:

- `prompt_token_ids`: prompts are tokenized with `add_special_tokens=False`, as SFT
  (`train.data.encode_supervised`), RM training (`train.rm.encode_pairs`) and RM scoring
  (`models.reward.RewardModel`) do. A tokenizer with a BOS would otherwise give the served model a
  BOS it was never trained with (and a chat-template prompt, which writes its own, two). vLLM gets
  these ids (`TokensPrompt`), never text.
- `fit_prompt`: one prompt-length policy. A prompt longer than `limit` tokens first loses few-shot
  demonstrations (the `"\\n\\n-----"` blocks of `templates.fewshot_header`, the last one first, so k
  shots become exactly the first k-1), then is an error naming it, or is skipped and counted when
  `ModelConfig.on_overlong: skip`. Nothing is silently cut: a left-truncated few-shot prompt loses its
  instruction, and vLLM refuses a prompt over `max_model_len` and fails a whole Ray Data batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from almost_ray.data.records import RecordError
from almost_ray.models.loading import context_length, load_tokenizer, tokenizer_dir
from almost_ray.prompts.templates import DIALOGUE_SEPARATOR, render_prompt


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The ids a model is given for `prompt`: no BOS/EOS added, exactly as in training."""
    return list(tokenizer(prompt, add_special_tokens=False).input_ids)


class OverlongPromptError(RecordError):
    """A prompt that does not fit the model even without few-shot demonstrations."""


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt's ids after the length policy; `ids is None` when it was skipped."""

    ids: list[int] | None
    shots_dropped: int = 0

    @property
    def skipped(self) -> bool:
        return self.ids is None


def drop_last_shot(prompt: str) -> str | None:
    """The prompt without its last few-shot demonstration, or None when it has none left.

    A few-shot prompt is `instruction -----dialogue ... -----dialogue -----query` (`fewshot_header`
    followed by the rendered conversation); the blocks between the first and the last separator are
    the demonstrations.
    """
    blocks = prompt.split(DIALOGUE_SEPARATOR)
    if len(blocks) < 3:
        return None
    return DIALOGUE_SEPARATOR.join(blocks[:-2] + blocks[-1:])


def fit_prompt(
    prompt: str, encode: Callable[[str], list[int]], limit: int, on_overlong: str = "error", where: str = "prompt"
) -> FittedPrompt:
    """Apply the length policy (module docstring) to one prompt; `limit` is the longest allowed in tokens."""
    ids, dropped, text = encode(prompt), 0, prompt
    while len(ids) > limit:
        shorter = drop_last_shot(text)
        if shorter is None:
            if on_overlong == "skip":
                return FittedPrompt(None, dropped)
            head = prompt[:80].replace("\n", "\\n")
            raise OverlongPromptError(
                f"{where}: {len(ids)} tokens (after dropping {dropped} few-shot demonstrations) but the model "
                f"takes at most {limit} before the new tokens; the prompt starts {head!r}. Shorten it, raise "
                "the model's context, lower max_new_tokens, or set model.on_overlong: skip"
            )
        text, dropped = shorter, dropped + 1
        ids = encode(text)
    return FittedPrompt(ids, dropped)


def check_prompts_fit(model, conversations: list[tuple[str, list[dict]]], prompt_format: str, max_new_tokens: int,
                      field: str, header: str = "") -> int:
    """The length policy on the driver, with the tokenizer alone, before any actor starts or a model is
    converted: each (where: file:line, conversation) is rendered as the replicas will render it and fitted.
    Raises `OverlongPromptError` naming where, or (`model.on_overlong: skip`) returns how many the replicas
    will skip (they apply the same `fit_prompt` and count them)."""

    folder = tokenizer_dir(model.ref)
    tokenizer = load_tokenizer(folder)
    limit = max((context_length(folder) or 4096) - max_new_tokens, 1)  # the HF backend's default too

    skipped = 0
    for where, messages in conversations:
        prompt = render_prompt(prompt_format, messages, tokenizer, header)
        if len(prompt.encode()) <= limit:  # no tokenizer here makes more tokens than UTF-8 bytes
            continue
        cap = 64 * (limit + 1)  # a prompt of megabytes with no demonstration to drop: its head decides
        if len(prompt) > cap and drop_last_shot(prompt) is None:
            head = len(prompt_token_ids(tokenizer, prompt[:cap]))
            if head > limit + 1:  # a prefix has at most one token more than the whole has up to its cut
                if model.on_overlong == "skip":
                    skipped += 1
                    continue
                raise OverlongPromptError(
                    f"{where}: {field}: over {head - 1} tokens in its first {cap} characters alone, but the model "
                    f"takes at most {limit} before the new tokens; shorten it, or set model.on_overlong: skip")
        skipped += fit_prompt(prompt, lambda text: prompt_token_ids(tokenizer, text), limit, model.on_overlong,
                              f"{where}: {field}").skipped
    return skipped


def prompt_seed(seed: int, prompt: str, index: int = 0) -> int:
    """A 63-bit seed for one (prompt, sample) that is the same on every machine and batch."""
    digest = hashlib.sha256(f"{seed}\x00{index}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """Cut `text` at the earliest stop string (the stop string itself is dropped)."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split the way lm-evaluation-harness splits them.

    The pair is encoded whole and split after the context's own tokens, so a continuation is
    scored with the tokens the model would really see; trailing spaces of the context move to the
    continuation. An empty context is replaced by the EOS token, so the first token is scored too.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = prompt_token_ids(tokenizer, stripped + continuation)
    ctx = prompt_token_ids(tokenizer, stripped) if stripped else []
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [tokenizer.eos_token_id]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont
