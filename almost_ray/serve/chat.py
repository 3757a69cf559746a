"""The chat model deployment (CPU/HF path): one HF generator per replica, concurrent requests batched
into shared forward passes with `@serve.batch`; it answers chat completions and legacy completions.

Requests in a batch that share their sampling controls (`protocol.Sampling`: temperature, top-p, stop
strings, rules-adapter switch, penalties, logit_bias) run in one `generate` call: each request brings its
own rows (`n`, or `best_of`), its own per-row seeds (so a seeded request gets the same text whatever it
was batched with, as everywhere in almost_ray) and its own `max_tokens` (the group generates up to the
largest; each row is cut at its own bound, which gives the same tokens it would get alone). `usage`,
`finish_reason` and logprobs come from the generated token ids.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from ray import serve

from almost_ray.models.text import prompt_seed, prompt_token_ids, truncate_at_stop
from almost_ray.prompts.templates import default_stop, render_prompt
from almost_ray.runs.paths import aligned_model_in
from almost_ray.serve.config import ChatDeploymentConfig, ServeConfig
from almost_ray.serve.protocol import (
    APIError,
    ChatJob,
    ChatResult,
    Choice,
    CompletionJob,
    Sampling,
    TokenLogprob,
)
from almost_ray.serve.sampling import LogitBias, LogprobRecorder, OpenAIPenalties, prompt_logprobs

EMBEDDED = "embedded:smollm2-135m-instruct"


def resolve_chat_model(cfg: ServeConfig) -> str:
    """The configured model (a path made absolute, since replicas may run elsewhere), else the run's
    aligned model (PPO's, then SFT's: `runs/paths.py`), else the embedded SmolLM2."""
    if cfg.chat.model:
        path = Path(cfg.chat.model).expanduser()
        return str(path.resolve()) if path.exists() else cfg.chat.model
    found = aligned_model_in(cfg.run_dir)
    return str(found.resolve()) if found is not None else EMBEDDED


def model_id_of(ref: str) -> str:
    """The name a model is served under: `demo/ppo` for `runs/demo/ppo/model`, the reference otherwise."""
    path = Path(ref)
    if path.is_absolute() and path.name == "model":
        return f"{path.parent.parent.name}/{path.parent.name}"
    return path.name if path.is_absolute() else ref


def trained_prompt_format(ref: str) -> str | None:
    """The prompt format a stage trained the model on, from its manifest (`config.prompt_format`)."""
    manifest = Path(ref).parent / "manifest.json"
    if not Path(ref).is_dir() or not manifest.is_file():
        return None
    try:
        fmt = json.loads(manifest.read_text()).get("config", {}).get("prompt_format")
    except (OSError, ValueError):
        return None
    return fmt if fmt in ("chat", "human_assistant", "tulu", "raw") else None


def resolve_prompt_format(setting: str, ref: str, tokenizer) -> str:
    if setting != "auto":
        return setting
    return trained_prompt_format(ref) or ("chat" if getattr(tokenizer, "chat_template", None) else "human_assistant")


def read_completion(ids: list[int], max_tokens: int, stop: tuple[str, ...], end_ids: set[int],
                    pad_id: int | None, decode, strip: bool = True) -> Choice:
    """One generated row -> text, token count and OpenAI's finish reason.

    The row is cut at its own `max_tokens` first. It ends at its first EOS (counted, as OpenAI and vLLM
    count it) or at padding (a stop string ended it inside the batch); a row with neither ran to the
    bound ("length") unless its text holds a stop string. Chat answers are stripped of surrounding
    whitespace; completions are not (a harness joins prompt and completion).
    """
    row = ids[:max_tokens]
    tidy = str.strip if strip else (lambda t: t)
    for i, tok in enumerate(row):
        if tok in end_ids or tok == pad_id:
            text = decode(row[:i])
            cut = truncate_at_stop(text, list(stop))
            # an EOS is a generated token, unless it is the padding after a stop string (pad == EOS)
            generated_eos = tok in end_ids and len(cut) == len(text)
            return Choice(tidy(cut), "stop", i + generated_eos)
    text = decode(row)
    cut = truncate_at_stop(text, list(stop))
    reason = "stop" if len(cut) < len(text) or len(row) < max_tokens else "length"
    return Choice(tidy(cut), reason, len(row))


def decode_after(decode, context: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context` (a prompt's last tokens). A SentencePiece tokenizer drops the
    leading space of a sequence's first word, so a completion decoded alone would read "isParis" when
    joined to its prompt; decoded after the context it keeps its space, as vLLM's incremental detokenizer
    keeps it."""
    head = decode(context)
    text = decode(list(context) + list(ids))
    return text[len(head):] if text.startswith(head) else decode(ids)


def rank_best_of(choices: list[Choice], n: int) -> list[Choice]:
    """`best_of`: the n choices with the highest log-probability per token (OpenAI's definition)."""
    def mean_logprob(c: Choice) -> float:
        lps = [e.logprob for e in c.logprobs or [] if e.logprob is not None]
        return sum(lps) / len(lps) if lps else float("-inf")

    return sorted(choices, key=mean_logprob, reverse=True)[:n]


@dataclass(frozen=True)
class GenerationItem:
    """One prompt's share of a batch: its ids, `rows` samples, and how each is read back."""

    ids: list[int]
    seed_text: str  # the per-row seeds derive from it, so a prompt's samples do not depend on the batch
    rows: int
    seed: int
    max_tokens: int
    sampling: Sampling
    top_k: int | None = None  # None: no logprobs
    strip: bool = True


@serve.deployment
class ChatModel:
    """One chat model replica (HF backend). Called by the ingress through a deployment handle."""

    def __init__(self, chat: dict, model_ref: str):
        from almost_ray.models.config import ModelConfig
        from almost_ray.models.hf_backend import HFGenerator

        self.cfg = ChatDeploymentConfig.model_validate(chat)
        self.ref = model_ref
        self.generator = HFGenerator(ModelConfig(
            ref=model_ref, backend="hf", dtype=self.cfg.dtype, max_batch_size=self.cfg.max_batch_size,
            rules=self.cfg.rules_config(),
        ))
        tok = self.generator.tokenizer
        self.prompt_format = resolve_prompt_format(self.cfg.prompt_format, model_ref, tok)
        self.format_stop = tuple(default_stop(self.prompt_format))
        eos = self.generator.model.generation_config.eos_token_id
        self.end_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        self.vocab_size = self.generator.model.config.vocab_size
        self._surfaces: list[str] | None = None
        self._generate.set_max_batch_size(self.cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def info(self) -> dict:
        return {"ref": self.ref, "prompt_format": self.prompt_format,
                "max_positions": self.generator.max_positions}

    def _check_fits(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        if prompt_tokens + max_tokens > self.generator.max_positions:
            raise APIError(
                f"{prompt_tokens} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
                f"{self.generator.max_positions}", param, code="context_length_exceeded",
            )

    def _check_vocab(self, sampling: Sampling) -> None:
        bad = [t for t, _ in sampling.logit_bias if t >= self.vocab_size]
        if bad:
            raise APIError(f"logit_bias names token {bad[0]}, the vocabulary has {self.vocab_size}", "logit_bias")

    async def chat(self, job: ChatJob) -> ChatResult | APIError:
        """A checked request -> its result, or an APIError for what only the model can check
        (a format that cannot render the messages, a prompt longer than the context, a token id)."""
        try:
            self._check_vocab(job.sampling)
            prompt = render_prompt(self.prompt_format, job.messages, self.generator.tokenizer)
        except APIError as err:
            return err
        except ValueError as err:
            return APIError(str(err), "messages")
        ids = prompt_token_ids(self.generator.tokenizer, prompt)
        try:
            self._check_fits(len(ids), job.max_tokens, "messages")
        except APIError as err:
            return err
        # the format's own turn markers end an answer, whatever the client sent
        sampling = replace(job.sampling, stop=tuple(dict.fromkeys(job.sampling.stop + self.format_stop)))
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        choices = await self._generate(GenerationItem(ids, prompt, job.n, seed, job.max_tokens, sampling,
                                                      job.top_logprobs))
        return ChatResult(choices=choices, prompt_tokens=len(ids))

    async def complete(self, job: CompletionJob) -> ChatResult | APIError:
        """A legacy completion: each prompt as given (text or token ids, no chat format, no added stop)."""
        tok = self.generator.tokenizer
        prompts: list[tuple[list[int], str]] = []
        try:
            self._check_vocab(job.sampling)
            for i, p in enumerate(job.prompts):
                param = "prompt" if len(job.prompts) == 1 else f"prompt[{i}]"
                if isinstance(p, str):
                    ids, text = prompt_token_ids(tok, p), p
                else:
                    ids = list(p)
                    if max(ids) >= self.vocab_size:
                        raise APIError(f"{param} holds token {max(ids)}, the vocabulary has {self.vocab_size}", param)
                    text = tok.decode(ids)
                self._check_fits(len(ids), job.max_tokens, param)
                prompts.append((ids, text))
        except APIError as err:
            return err
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        wants_logprobs = job.logprobs is not None
        top_k = job.logprobs if wants_logprobs else (0 if job.best_of > job.n else None)
        if job.max_tokens > 0:
            generated = await asyncio.gather(*(
                self._generate(GenerationItem(ids, text, job.best_of, seed, job.max_tokens, job.sampling, top_k,
                                              strip=False))
                for ids, text in prompts
            ))
        else:  # echo with max_tokens 0: the prompt alone, scored
            generated = [[Choice("", "length", 0, [] if wants_logprobs else None)] * job.n for _ in prompts]
        choices = []
        for (ids, text), group in zip(prompts, generated):
            group = rank_best_of(group, job.n) if job.best_of > job.n else group
            if job.echo:
                echoed = await asyncio.to_thread(self._prompt_entries, ids, job.logprobs) if wants_logprobs else None
                group = [Choice(text + c.text, c.finish_reason, c.completion_tokens,
                                (echoed + c.logprobs) if wants_logprobs else None) for c in group]
            elif not wants_logprobs:
                group = [replace(c, logprobs=None) for c in group]
            choices += group
        return ChatResult(choices=choices, prompt_tokens=sum(len(ids) for ids, _ in prompts))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate(self, items: list[GenerationItem]) -> list[list[Choice]]:
        # the decode loop runs in a thread, so the replica keeps answering health checks meanwhile
        return await asyncio.to_thread(self.generate_batch, items)

    def surface(self, token_id: int) -> str:
        """The text a token contributes after other text (a SentencePiece token keeps its leading space)."""
        if self._surfaces is None:
            from almost_ray.adapters.rules import token_surfaces

            self._surfaces = token_surfaces(self.generator.tokenizer)
        return self._surfaces[token_id] if token_id < len(self._surfaces) else ""

    def _entries(self, ids: list[int], logprobs: list[float | None], tops: list[list[tuple[int, float]]],
                 k: int) -> list[TokenLogprob]:
        return [TokenLogprob(self.surface(t), lp, [(self.surface(i), v) for i, v in top[:k]])
                for t, lp, top in zip(ids, logprobs, tops)]

    def _prompt_entries(self, ids: list[int], k: int) -> list[TokenLogprob]:
        logprobs, tops = prompt_logprobs(self.generator.model, ids, k)
        return self._entries(ids, logprobs, tops, k)

    def _decoder(self, item: GenerationItem):
        tok = self.generator.tokenizer
        decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
        if item.strip:  # a chat answer is stripped anyway
            return decode
        context = item.ids[-4:]
        return lambda ids: decode_after(decode, context, ids)

    def generate_batch(self, items: list[GenerationItem]) -> list[list[Choice]]:
        from almost_ray.models.config import SamplingParams

        results: list[list[Choice]] = [[] for _ in items]
        groups: dict[Sampling, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.sampling.key(), []).append(i)
        tok = self.generator.tokenizer
        for sampling, members in groups.items():
            rows, seeds, owners = [], [], []
            for i in members:
                item = items[i]
                for j in range(item.rows):
                    rows.append(item.ids)
                    seeds.append(prompt_seed(item.seed, item.seed_text, j))
                    owners.append(i)
            wanted = [items[i].top_k for i in members if items[i].top_k is not None]
            params = SamplingParams(
                n=1, temperature=sampling.temperature, top_p=sampling.top_p, stop=list(sampling.stop),
                max_new_tokens=max(items[i].max_tokens for i in members),
            )
            for start in range(0, len(rows), self.cfg.max_rows):
                part = slice(start, start + self.cfg.max_rows)
                recorder = LogprobRecorder(max(wanted)) if wanted else None
                extra = [recorder] if recorder else []
                if sampling.presence_penalty or sampling.frequency_penalty:
                    extra.append(OpenAIPenalties(sampling.presence_penalty, sampling.frequency_penalty))
                if sampling.logit_bias:
                    extra.append(LogitBias(sampling.logit_bias))
                new = self.generator.generate_ids([""] * len(rows[part]), params, extra, seeds=seeds[part],
                                                  rules=sampling.rules, ids=rows[part])
                chosen, tops = recorder.finish(new) if recorder else (None, None)
                for r, row in enumerate(new.tolist()):
                    item = items[owners[start + r]]
                    choice = read_completion(row, item.max_tokens, sampling.stop, self.end_ids, tok.pad_token_id,
                                             self._decoder(item), item.strip)
                    if item.top_k is not None:
                        count = choice.completion_tokens
                        choice.logprobs = self._entries(row[:count], chosen[r][:count], tops[r][:count], item.top_k)
                    results[owners[start + r]].append(choice)
        return results
