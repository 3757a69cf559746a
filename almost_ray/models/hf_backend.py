"""The transformers backend: batched, left-padded generation and log-likelihood scoring on CPU or GPU."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from almost_ray.config import ModelConfig, SamplingParams
from almost_ray.models.generator import encode_pair, prompt_seed, truncate_at_stop
from almost_ray.models.loading import load_causal_lm, load_tokenizer


class SeededSampler(LogitsProcessor):
    """Temperature + top-p sampling with one `torch.Generator` per row.

    It runs last in the processor list and returns a one-hot score row, so HF's greedy step takes
    exactly the token it drew. Per-row generators make each prompt's samples independent of the
    other prompts in its batch (and so of sharding across Ray replicas).
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # drop a token when the mass before it already reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, picks, 0.0)


class HFGenerator:
    """One model replica on transformers. Equal to batch-1 output under greedy decoding."""

    def __init__(self, model: ModelConfig, device: str | None = None):
        self.config = model
        self.model = load_causal_lm(model.ref, model.dtype, model.num_layers, device)
        self.tokenizer = load_tokenizer(model.ref, padding_side="left")
        self.device = self.model.device
        self.max_positions = getattr(self.model.config, "max_position_embeddings", 4096)
        self._rules = None  # RuleTables, resolved on first use when model.rules.enabled

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams,
        logits_processors: list[LogitsProcessor] | None = None,
    ) -> list[list[str]]:
        """`params.n` completions per prompt; prompts are batched by length, results keep input order."""
        results: list[list[str]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        step = self.config.max_batch_size
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            texts = self._generate_batch([prompts[i] for i in idx], params, logits_processors or [])
            for k, i in enumerate(idx):
                results[i] = texts[k * params.n : (k + 1) * params.n]
        return results

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[str], params: SamplingParams, extra: list) -> list[str]:
        limit = max(self.max_positions - params.max_new_tokens, 1)
        self.tokenizer.truncation_side = "left"  # keep the end of an over-long few-shot prompt
        enc = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=limit,
            add_special_tokens=False,
        ).to(self.device)
        if params.n > 1:  # one row per sample; HF refuses num_return_sequences without do_sample
            enc = {k: v.repeat_interleave(params.n, dim=0) for k, v in enc.items()}
        processors = LogitsProcessorList(extra)
        if self.config.rules.enabled:  # Hewitt et al.'s 3-rule adapter, before sampling
            processors.insert(0, self._rules_processor(enc["input_ids"].shape[1]))
        if params.temperature > 0:
            seeds = [prompt_seed(params.seed, p, j) for p in prompts for j in range(params.n)]
            processors.append(SeededSampler(seeds, params.temperature, params.top_p, self.device))
        out = self.model.generate(
            **enc,
            do_sample=False,  # sampling, when wanted, is done by SeededSampler
            num_beams=1,
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
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at_stop(t, params.stop).strip() for t in texts]

    @torch.inference_mode()
    def generate_token_ids(
        self, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int, temperature: float, top_p: float
    ) -> tuple[list[list[int]], list[bool]]:
        """One sampled response per tokenized prompt, as token ids cut after the first EOS (kept), and
        whether it ended with EOS. Row `i` samples with its own generator seeded `seeds[i]` (PPO rollouts:
        a response depends on its seed, not on its batch). Prompts are left-padded in batches."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        pad = self.tokenizer.pad_token_id
        responses: list[list[int]] = [[] for _ in prompt_ids]
        ended = [False] * len(prompt_ids)
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        for start in range(0, len(order), self.config.max_batch_size):
            idx = order[start : start + self.config.max_batch_size]
            width = max(len(prompt_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
                mask[row, width - len(prompt_ids[i]) :] = 1
            sampler = SeededSampler([seeds[i] for i in idx], temperature, top_p, self.device)
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False, num_beams=1,
                max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=pad, temperature=None, top_p=None, top_k=None,
            )
            for row, i in enumerate(idx):
                tokens = out[row, width:].tolist()
                cut = next((k + 1 for k, t in enumerate(tokens) if t in eos_ids), None)
                responses[i], ended[i] = (tokens[:cut], True) if cut else (tokens, False)
        return responses, ended

    def _rules_processor(self, prompt_length: int):
        from almost_ray.adapters.rules import RulesLogitsProcessor, RuleTables

        if self._rules is None:
            eos = self.model.generation_config.eos_token_id
            eos_ids = eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id]
            self._rules = RuleTables.from_tokenizer(
                self.tokenizer, self.config.rules, self.model.config.vocab_size, eos_ids
            )
        return RulesLogitsProcessor(self._rules, prompt_length)

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

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
