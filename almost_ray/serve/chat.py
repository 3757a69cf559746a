"""The chat model deployment: one HF generator per replica, concurrent requests batched into shared
forward passes with `@serve.batch`.

Requests in a batch that share temperature, top-p, stop strings and the rules-adapter switch run in one
`generate` call: each request brings its own rows (`n` of them), its own per-row seeds (so a seeded
request gets the same text whatever it was batched with, as everywhere in almost_ray) and its own
`max_tokens` (the group generates up to the largest; each row is cut at its own bound, which gives the
same tokens it would get alone). `usage` and `finish_reason` come from the generated token ids.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

from ray import serve

from almost_ray.models.text import prompt_seed, truncate_at_stop
from almost_ray.prompts.templates import default_stop, render_prompt
from almost_ray.runs.paths import aligned_model_in
from almost_ray.serve.config import ChatDeploymentConfig, ServeConfig
from almost_ray.serve.protocol import APIError, ChatJob, ChatResult, Choice

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


def group_key(job: ChatJob) -> tuple:
    """Requests with equal keys share one `generate` call."""
    return (job.temperature if job.temperature > 0 else 0.0, job.top_p, job.stop, job.rules)


def read_completion(ids: list[int], max_tokens: int, stop: tuple[str, ...], end_ids: set[int],
                    pad_id: int | None, decode) -> Choice:
    """One generated row -> text, token count and OpenAI's finish reason.

    The row is cut at its own `max_tokens` first. It ends at its first EOS (counted, as OpenAI and vLLM
    count it) or at padding (a stop string ended it inside the batch); a row with neither ran to the
    bound ("length") unless its text holds a stop string.
    """
    row = ids[:max_tokens]
    for i, tok in enumerate(row):
        if tok in end_ids or tok == pad_id:
            text = decode(row[:i])
            cut = truncate_at_stop(text, list(stop))
            # an EOS is a generated token, unless it is the padding after a stop string (pad == EOS)
            generated_eos = tok in end_ids and len(cut) == len(text)
            return Choice(cut.strip(), "stop", i + generated_eos)
    text = decode(row)
    cut = truncate_at_stop(text, list(stop))
    reason = "stop" if len(cut) < len(text) or len(row) < max_tokens else "length"
    return Choice(cut.strip(), reason, len(row))


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
        self._generate.set_max_batch_size(self.cfg.max_batch_size)
        self._generate.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def info(self) -> dict:
        return {"ref": self.ref, "prompt_format": self.prompt_format,
                "max_positions": self.generator.max_positions}

    async def chat(self, job: ChatJob) -> ChatResult | APIError:
        """A checked request -> its result, or an APIError for what only the model can check
        (a format that cannot render the messages, a prompt longer than the context)."""
        try:
            prompt = render_prompt(self.prompt_format, job.messages, self.generator.tokenizer)
        except ValueError as err:
            return APIError(str(err), "messages")
        prompt_tokens = len(self.generator.tokenizer(prompt, add_special_tokens=False).input_ids)
        if prompt_tokens + job.max_tokens > self.generator.max_positions:
            return APIError(
                f"{prompt_tokens} prompt tokens + max_tokens {job.max_tokens} exceed the model's context of "
                f"{self.generator.max_positions}", "messages", code="context_length_exceeded",
            )
        seed = job.seed if job.seed is not None else secrets.randbits(63)
        choices = await self._generate((job, prompt, seed))
        return ChatResult(choices=choices, prompt_tokens=prompt_tokens)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate(self, items: list[tuple[ChatJob, str, int]]) -> list[list[Choice]]:
        # the decode loop runs in a thread, so the replica keeps answering health checks meanwhile
        return await asyncio.to_thread(self.generate_batch, items)

    def generate_batch(self, items: list[tuple[ChatJob, str, int]]) -> list[list[Choice]]:
        from almost_ray.models.config import SamplingParams

        results: list[list[Choice]] = [[] for _ in items]
        groups: dict[tuple, list[int]] = {}
        for i, (job, _, _) in enumerate(items):
            groups.setdefault(group_key(job), []).append(i)
        tok = self.generator.tokenizer
        for (temperature, top_p, stop, rules), members in groups.items():
            stops = tuple(dict.fromkeys(stop + self.format_stop))
            prompts, seeds, rows = [], [], []
            for i in members:
                job, prompt, seed = items[i]
                for j in range(job.n):
                    prompts.append(prompt)
                    seeds.append(prompt_seed(seed, prompt, j))
                    rows.append(i)
            params = SamplingParams(
                n=1, temperature=temperature, top_p=top_p, stop=list(stops),
                max_new_tokens=max(items[i][0].max_tokens for i in members),
            )
            ids: list[list[int]] = []
            for start in range(0, len(prompts), self.cfg.max_rows):
                part = slice(start, start + self.cfg.max_rows)
                ids += self.generator.generate_ids(prompts[part], params, seeds=seeds[part], rules=rules).tolist()
            for row, i in zip(ids, rows):
                results[i].append(read_completion(
                    row, items[i][0].max_tokens, stops, self.end_ids, tok.pad_token_id,
                    lambda t: tok.decode(t, skip_special_tokens=True),
                ))
        return results
