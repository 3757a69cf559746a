"""The transformers backend: batched, left-padded generation and log-likelihood scoring on CPU or GPU.

Prompts become ids through `models.text` (no special tokens, the shared length policy), as in vLLM.

Shared-prefix generation: every prompt of a ladder rung or an RMSP role starts with the same few-shot
header (ALMoST Appendix A/C), hundreds of tokens that plain batching prefills again for every prompt.
A replica keeps the key/value caches of the last few shared prefixes it saw (`PrefixCache`) and starts
each batch from a copy of the one its prompts start with; the batch is padded *between* the prefix and each prompt's own tokens
(`[prefix][pad...][rest]`, pads masked out), so every token keeps the position it has in its unpadded
prompt and the result equals plain left-padded generation. vLLM does the same with its prefix cache.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from almost_ray.adapters.rules import RulesLogitsProcessor, RuleTables
from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.loading import eos_token_ids, load_causal_lm, load_tokenizer
from almost_ray.models.packing import common_prefix_length
from almost_ray.models.sampling import SeededSampler
from almost_ray.models.text import (
    FittedPrompt,
    OverlongPromptError,
    encode_pair,
    fit_prompt,
    prompt_seed,
    prompt_token_ids,
    truncate_at_stop,
)


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` that writes each step's keys and values into room reserved ahead (the tokens still to
    come, but never more than it already holds, `_reserve`) and gives attention a view of the filled part.

    `DynamicLayer` concatenates the whole cache with the new token at every step, a copy that grows with
    the sequence (a tenth of a decode step for a batch of 16 on the embedded model). The view has the shape
    and values the concatenation would have, so attention computes the same numbers. An operation that
    replaces the tensors (crop keeps the view; batch selection and reordering do not) only makes the next
    update reserve room again.
    """

    def __init__(self, room: int):
        super().__init__()
        self.room = room  # the most tokens still to come: reserved at once when the cache is at least as long
        self.reserved: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
        if not self._writable(end):
            self.reserved = tuple(self._reserve(old, new, start, end) for old, new in
                                  ((self.keys, key_states), (self.values, value_states)))
        keys, values = self.reserved
        keys[..., start:end, :] = key_states
        values[..., start:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def _writable(self, end: int) -> bool:
        """Whether the current tensors are still views of the reserved room, and `end` tokens fit in it."""
        if self.reserved is None:
            return False
        return all(t.data_ptr() == r.data_ptr() and t.stride() == r.stride() and t.shape[:2] == r.shape[:2]
                   and end <= r.shape[-2] for t, r in zip((self.keys, self.values), self.reserved))

    def _reserve(self, old: torch.Tensor, new: torch.Tensor, start: int, end: int) -> torch.Tensor:
        # at most double what is held, so a batch that stops early (every row at EOS) never held much more
        # than it used; each reserve copies the cache once, as every step's concatenation did
        room = new.new_empty((*new.shape[:2], end + min(self.room, max(end, 64)), new.shape[-1]))
        if start:
            room[..., :start, :] = old
        return room


def reserve_room(cache: DynamicCache, room: int) -> DynamicCache:
    """`cache` with its plain `DynamicLayer`s turned into `ReservedLayer`s (sliding-window and other kinds of
    layer stay as they are), keeping what they hold."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            reserved = ReservedLayer(room)
            reserved.keys, reserved.values, reserved.is_initialized = layer.keys, layer.values, layer.is_initialized
            if layer.is_initialized:
                reserved.device = layer.device
            cache.layers[i] = reserved
    return cache


PREFIX_MIN_TOKENS = 32  # shorter shared prefixes are not worth a cache


def pad_after_prefix(rows: list[list[int]], prefix_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[prefix][pad...][rest]` rows and their attention mask: every row ends in the last column and every
    token keeps its unpadded position (positions come from the mask's cumulative sum)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        rest = row[prefix_len:]
        ids[i, :prefix_len] = torch.tensor(row[:prefix_len])
        mask[i, :prefix_len] = 1
        ids[i, width - len(rest):] = torch.tensor(rest)
        mask[i, width - len(rest):] = 1
    return ids, mask


class PrefixCache:
    """The key/value caches of the few prompt prefixes a replica sees, each computed once per replica and
    copied for each batch: a ladder rung has one few-shot header, an RMSP replica that plays both the
    assistant and the user has two and alternates between them (`rmsp.stage.shares_generator`)."""

    KEEP = 4  # prefixes kept, the most recently used last

    def __init__(self):
        self.entries: list[tuple[list[int], object]] = []
        self.hits = 0
        self.prefills = 0  # prefixes computed
        self.prefill_tokens_saved = 0

    @property
    def ids(self) -> list[int]:
        return self.entries[-1][0] if self.entries else []

    @property
    def cache(self):
        return self.entries[-1][1] if self.entries else None

    @torch.inference_mode()
    def for_batch(self, model, rows: list[list[int]]) -> tuple[int, object | None]:
        """(prefix length, a fresh cache for the batch) — (0, None) when the batch shares no long prefix."""
        shared = common_prefix_length(rows)
        known = next((e for e in reversed(self.entries) if len(e[0]) <= shared and rows[0][: len(e[0])] == e[0]), None)
        if known is not None:
            self.entries.remove(known)
        else:
            if shared < PREFIX_MIN_TOKENS:
                return 0, None
            ids = torch.tensor([rows[0][:shared]], device=model.device)
            cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
            known = (rows[0][:shared], cache)
            self.prefills += 1
        self.entries = [*self.entries, known][-self.KEEP :]
        cache = copy.deepcopy(known[1])
        cache.batch_repeat_interleave(len(rows))
        self.hits += 1
        self.prefill_tokens_saved += len(known[0]) * (len(rows) - 1)
        return len(known[0]), cache


class HFGenerator:
    """One model replica on transformers. Equal to batch-1 output under greedy decoding."""

    def __init__(self, model: ModelConfig, device: str | None = None):
        self.config = model
        self.model = load_causal_lm(model.ref, model.dtype, model.num_layers, device)
        self.tokenizer = load_tokenizer(model.ref, padding_side="left")
        self.device = self.model.device
        self.max_positions = getattr(self.model.config, "max_position_embeddings", 4096)
        self._rules = None  # RuleTables, resolved on first use when model.rules.enabled
        self.last_fits: list[FittedPrompt] = []
        self.last_logprobs: torch.Tensor | None = None  # [rows, new tokens] of the last sampled batch
        self.prefix_cache = PrefixCache()

    def fit_prompts(self, prompts: list[str], params: SamplingParams) -> list[FittedPrompt]:
        """The shared length policy (models/text.py): the prompt and its new tokens fit the positions."""
        limit = max(self.max_positions - params.max_new_tokens, 1)
        encode = lambda text: prompt_token_ids(self.tokenizer, text)  # noqa: E731
        return [fit_prompt(p, encode, limit, self.config.on_overlong, f"prompt {i}") for i, p in enumerate(prompts)]

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams,
        logits_processors: list[LogitsProcessor] | None = None,
    ) -> list[list[str]]:
        """`params.n` completions per prompt (none for a skipped one); batched by length, input order kept."""
        fits = self.last_fits = self.fit_prompts(prompts, params)
        results: list[list[str]] = [[] for _ in prompts]
        order = sorted((i for i, f in enumerate(fits) if not f.skipped), key=lambda i: len(fits[i].ids))
        step = self.config.max_batch_size
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            texts = self._generate_batch(
                [prompts[i] for i in idx], [fits[i].ids for i in idx], params, logits_processors or []
            )
            for k, i in enumerate(idx):
                results[i] = texts[k * params.n : (k + 1) * params.n]
        return results

    def _generate_batch(self, prompts: list[str], ids: list[list[int]], params: SamplingParams, extra: list) -> list[str]:
        new_tokens = self.generate_ids(prompts, params, extra, ids=ids)
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at_stop(t, params.stop).strip() for t in texts]

    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: list[str],
        params: SamplingParams,
        extra: list | None = None,
        seeds: list[int] | None = None,
        rules: bool | None = None,
        ids: list[list[int]] | None = None,
        record_logprobs: bool = False,
    ) -> torch.Tensor:
        """New token ids of one batch, `params.n` rows per prompt, padded after EOS with the pad id.

        `ids` are the prompts' token ids when the caller already applied the length policy (`generate`
        does); otherwise the policy runs here and a prompt it would skip is an error. `seeds` (one per
        row) replaces the per-prompt seeds, and `rules` switches the 3-rule adapter on or off whatever
        `ModelConfig.rules.enabled` says: the Serve deployment batches requests that each bring their own
        seed and adapter switch. `record_logprobs` leaves the sampled tokens' log-probs in `last_logprobs`.
        """
        if ids is None:
            fits = self.fit_prompts(prompts, params)
            if any(f.skipped for f in fits):
                raise OverlongPromptError("a prompt does not fit the model's context (model.on_overlong: skip)")
            ids = [f.ids for f in fits]
        use_rules = self.config.rules.enabled if rules is None else rules
        rows = [row for row in ids for _ in range(params.n)]  # one row per sample (HF refuses n without sampling)
        # the rules adapter reads rows as left-padded prompts, so it keeps plain padding
        prefix_len, cache = (0, None) if use_rules else self.prefix_cache.for_batch(self.model, rows)
        if cache is not None:
            input_ids, mask = pad_after_prefix(rows, prefix_len, self.tokenizer.pad_token_id)
            enc = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        else:
            enc = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt").to(self.device)
            enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        enc["cache"] = reserve_room(DynamicCache(config=self.model.config) if cache is None else cache,
                                    params.max_new_tokens)
        processors = LogitsProcessorList(extra or [])
        if use_rules:  # Hewitt et al.'s 3-rule adapter, before sampling
            processors.insert(0, self._rules_processor(enc["input_ids"], enc["attention_mask"]))
        if params.temperature > 0:
            if seeds is None:
                seeds = [prompt_seed(params.seed, p, j) for p in prompts for j in range(params.n)]
            sampler = SeededSampler(seeds, params.temperature, params.top_p, self.device, record_logprobs)
            processors.append(sampler)
        out = self.model.generate(
            **enc,
            do_sample=False,  # sampling, when wanted, is done by SeededSampler
            num_beams=1,
            use_cache=True,  # whatever a (trained) checkpoint's generation config says: one new token per step
            max_new_tokens=params.max_new_tokens,
            logits_processor=processors,
            stop_strings=params.stop or None,
            tokenizer=self.tokenizer if params.stop else None,
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        self.last_logprobs = sampler.logprobs if params.temperature > 0 and record_logprobs else None
        return new_tokens

    def generate_token_ids(
        self, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int, temperature: float, top_p: float
    ) -> tuple[list[list[int]], list[bool], list[list[float]]]:
        """One sampled response per tokenized prompt, as token ids cut after the first EOS (kept), whether
        it ended with EOS, and the log-prob of each of its tokens under softmax(logits / temperature).
        Row `i` samples with its own generator seeded `seeds[i]` (PPO rollouts: a response depends on its
        seed, not on its batch)."""
        eos_ids = set(eos_token_ids(self.tokenizer, self.model.generation_config))
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        responses: list[list[int]] = [[] for _ in prompt_ids]
        logprobs: list[list[float]] = [[] for _ in prompt_ids]
        ended = [False] * len(prompt_ids)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        for start in range(0, len(order), self.config.max_batch_size):
            idx = order[start : start + self.config.max_batch_size]
            out = self.generate_ids([""] * len(idx), params, seeds=[seeds[i] for i in idx], rules=False,
                                    ids=[prompt_ids[i] for i in idx], record_logprobs=True)
            for row, i in enumerate(idx):
                tokens = out[row].tolist()
                cut = next((k + 1 for k, t in enumerate(tokens) if t in eos_ids), None)
                responses[i], ended[i] = (tokens[:cut], True) if cut else (tokens, False)
                if self.last_logprobs is not None:  # greedy decoding draws nothing to score
                    logprobs[i] = self.last_logprobs[row, : len(responses[i])].tolist()
        return responses, ended, logprobs

    def _rules_processor(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):

        if self._rules is None:
            self._rules = RuleTables.from_tokenizer(
                self.tokenizer, self.config.rules, self.model.config.vocab_size,
                eos_token_ids(self.tokenizer, self.model.generation_config),
            )
        return RulesLogitsProcessor(self._rules, prompt_ids, attention_mask)

    @torch.inference_mode()
    def loglikelihood(
        self, contexts: list[str], continuations: list[str], batch_size: int | None = None
    ) -> list[float]:
        """Sum of log p(continuation tokens | context) for each pair, batched with right padding."""
        if len(contexts) != len(continuations):
            raise ValueError("contexts and continuations differ in length")
        pairs = [encode_pair(self.tokenizer, c, x) for c, x in zip(contexts, continuations)]
        seqs = [(ctx + cont)[-self.max_positions :] for ctx, cont in pairs]
        n_cont = [len(cont) for _, cont in pairs]
        scores = [0.0] * len(pairs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        step = batch_size or self.config.max_batch_size
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(idx):
                end = len(seqs[i])
                targets = ids[row, end - n_cont[i] : end].to(self.device)
                rows = logprobs[row, end - n_cont[i] - 1 : end - 1]
                scores[i] = rows.gather(-1, targets[:, None]).sum().item()
        return scores

    @torch.inference_mode()
    def shared_context_logprobs(
        self, contexts: list[list[int]], continuations: list[list[list[int]]]
    ) -> list[list[float]]:
        """log p(continuation | context) for rows of several continuations each: every context runs once and
        its key/value cache is shared by its continuations (TruthfulQA's choices, response ranking's responses).

        Contexts are left-padded into one batch, so all end in the last column; positions are passed
        explicitly, so padding shifts no token's position.
        """
        device, pad = self.device, self.tokenizer.pad_token_id
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for r, c in enumerate(contexts):
            ids[r, width - len(c) :] = torch.tensor(c)
            mask[r, width - len(c) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        owners = [r for r, conts in enumerate(continuations) for _ in conts]
        flat = [c for conts in continuations for c in conts]
        scores = [first[r, c[0]].item() for r, c in zip(owners, flat)]
        longest = max(len(c) for c in flat)
        if longest > 1:
            cache = out.cache
            cache.batch_select_indices(torch.tensor(owners, device=device))
            cids = torch.full((len(flat), longest), pad, dtype=torch.long)
            cmask = torch.cat([mask[owners], torch.zeros((len(flat), longest), dtype=torch.long)], dim=1)
            cpos = torch.zeros((len(flat), longest), dtype=torch.long)
            for n, (r, c) in enumerate(zip(owners, flat)):
                cids[n, : len(c)] = torch.tensor(c)
                cmask[n, width : width + len(c)] = 1
                cpos[n] = len(contexts[r]) + torch.arange(longest)
            logits = self.model(input_ids=cids.to(device), attention_mask=cmask.to(device),
                                position_ids=cpos.to(device), cache=cache).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for n, c in enumerate(flat):
                steps = torch.arange(len(c) - 1, device=logprobs.device)
                targets = torch.tensor(c[1:], dtype=torch.long, device=logprobs.device)
                scores[n] += logprobs[n, steps, targets].sum().item()
        out_rows, pos = [], 0
        for conts in continuations:
            out_rows.append(scores[pos : pos + len(conts)])
            pos += len(conts)
        return out_rows

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
