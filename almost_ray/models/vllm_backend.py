"""The vLLM backend (GPU, `almost-ray[gpu]`), written against vLLM's public `LLM`/`SamplingParams` API.

vLLM is imported lazily, inside the replica, so the package imports and tests on machines without
it. The interface is the HF backend's: same prompts in, same `list[list[str]]` out, same per-prompt
seeds, same stop-string handling, same log-likelihood split. vLLM is given token ids
(`TokensPrompt(prompt_token_ids=...)`), built by `models.text.prompt_token_ids` after the shared
length policy (`models.text.fit_prompt`), never text: given text, vLLM would add the tokenizer's BOS,
which no stage of training adds, and would refuse an over-long prompt by failing the whole batch.
"""

from __future__ import annotations

from typing import Any

from almost_ray.adapters.config import RulesConfig
from almost_ray.adapters.rules import RULES_EXTRA_ARG, RULES_VLLM_PROCESSOR
from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.loading import resolve_model_dir, truncated_model_dir
from almost_ray.models.text import (
    FittedPrompt,
    encode_pair,
    fit_prompt,
    prompt_seed,
    prompt_token_ids,
    truncate_at_stop,
)


def fit_prompts(
    tokenizer, prompts: list[str], params: SamplingParams, max_model_len: int, on_overlong: str
) -> list[FittedPrompt]:
    """Each prompt's ids under the shared length policy: prompt and new tokens fit `max_model_len`."""
    limit = max(max_model_len - params.max_new_tokens, 1)
    encode = lambda text: prompt_token_ids(tokenizer, text)  # noqa: E731
    return [fit_prompt(p, encode, limit, on_overlong, f"prompt {i}") for i, p in enumerate(prompts)]


def vllm_sampling_kwargs(params: SamplingParams, prompt: str, rules: RulesConfig | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` for one prompt (pure; tested without vLLM)."""
    greedy = params.temperature == 0
    kwargs = dict(
        n=params.n,
        temperature=params.temperature,
        top_p=1.0 if greedy else params.top_p,
        max_tokens=params.max_new_tokens,
        stop=list(params.stop) or None,
        seed=None if greedy else prompt_seed(params.seed, prompt),
    )
    if rules is not None and rules.enabled:  # read by almost_ray.adapters.rules_vllm in the engine
        kwargs["extra_args"] = {RULES_EXTRA_ARG: rules.model_dump(mode="json")}
    return kwargs


def vllm_engine_kwargs(model: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (pure; tested without vLLM)."""
    path = resolve_model_dir(model.ref)
    if model.num_layers is not None:
        path = truncated_model_dir(path, model.num_layers)
    return dict(
        model=str(path),
        dtype="auto" if model.dtype == "auto" else model.dtype,
        tensor_parallel_size=model.tensor_parallel_size,
        gpu_memory_utilization=model.gpu_memory_utilization,
        trust_remote_code=False,
        seed=0,
        **({"logits_processors": [RULES_VLLM_PROCESSOR]} if model.rules.enabled else {}),
    )


class VLLMGenerator:
    """One vLLM engine per replica; `tensor_parallel_size` GPUs per engine."""

    def __init__(self, model: ModelConfig):
        import vllm

        self._vllm = vllm
        self.config = model
        self.llm = vllm.LLM(**vllm_engine_kwargs(model))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.last_fits: list[FittedPrompt] = []

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        """`params.n` completions per prompt (none for a skipped one), in input order."""
        from vllm.inputs import TokensPrompt

        fits = self.last_fits = fit_prompts(self.tokenizer, prompts, params, self.max_model_len,
                                            self.config.on_overlong)
        live = [i for i, f in enumerate(fits) if not f.skipped]
        inputs = [TokensPrompt(prompt_token_ids=fits[i].ids) for i in live]
        sampling = [
            self._vllm.SamplingParams(**vllm_sampling_kwargs(params, prompts[i], self.config.rules)) for i in live
        ]
        results: list[list[str]] = [[] for _ in prompts]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False) if live else []
        for i, out in zip(live, outputs):
            results[i] = [truncate_at_stop(o.text, params.stop).strip() for o in out.outputs]
        return results

    def loglikelihood(self, contexts: list[str], continuations: list[str]) -> list[float]:
        """Uses `prompt_logprobs=0`: vLLM returns the log-prob of each prompt token as it stands."""
        from vllm.inputs import TokensPrompt

        pairs = [encode_pair(self.tokenizer, c, x) for c, x in zip(contexts, continuations)]
        prompts = [TokensPrompt(prompt_token_ids=ctx + cont) for ctx, cont in pairs]
        sampling = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        scores = []
        for (ctx, cont), out in zip(pairs, outputs):
            ids = ctx + cont
            per_token = out.prompt_logprobs  # position 0 is None: nothing predicts the first token
            scores.append(sum(per_token[i][ids[i]].logprob for i in range(len(ctx), len(ids))))
        return scores
