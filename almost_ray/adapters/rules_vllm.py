"""The 3-rule adapter inside vLLM (V1 logits-processor API), for the GPU path.

vLLM loads this class by name at engine start (`LLM(..., logits_processors=[RULES_VLLM_PROCESSOR])`) in
its engine process, so only vLLM imports this module; nothing else in almost_ray does. A request turns
the rules on through `SamplingParams.extra_args[RULES_EXTRA_ARG]` (a `RulesConfig` as a dict), which
`almost_ray.models.vllm_backend` sets when `ModelConfig.rules.enabled`. The math is `RuleTables`, the
same code the transformers backend runs (tested there without vLLM), with the same EOS ids
(`models.loading.eos_token_ids`: the generation config's list, not only the tokenizer's EOS); the tables'
bias vector is placed on the engine's device once, not copied at every step.
"""

from __future__ import annotations

import json

import torch
from transformers import GenerationConfig
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from almost_ray.adapters.rules import RULES_EXTRA_ARG, RuleTables, rules_from_extra_arg
from almost_ray.models.loading import eos_token_ids, load_tokenizer


def _generation_config(model_dir: str):
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's EOS
        return None


class RulesAdapterProcessor(AdapterLogitsProcessor):
    """Wraps `RuleTables.apply_row` as vLLM's per-request processor `(prompt_ids, output_ids, logits) -> logits`
    (rule 3's scope starts in the prompt, after its last user tag)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        model_config = vllm_config.model_config
        self.tokenizer = load_tokenizer(model_config.tokenizer)
        self.vocab_size = model_config.get_vocab_size()
        self.eos_ids = eos_token_ids(self.tokenizer, _generation_config(model_config.model))
        self.device = device
        self._tables: dict[str, RuleTables] = {}

    @classmethod
    def validate_params(cls, params) -> None:
        raw = (params.extra_args or {}).get(RULES_EXTRA_ARG)
        if raw is not None:
            try:
                rules_from_extra_arg(raw)
            except ValueError as err:
                raise ValueError(f"extra_args[{RULES_EXTRA_ARG!r}]: {err}") from None

    def is_argmax_invariant(self) -> bool:
        return False  # the rules change which token is most likely

    def new_req_logits_processor(self, params):
        raw = (params.extra_args or {}).get(RULES_EXTRA_ARG)
        if raw is None:
            return None
        cfg = rules_from_extra_arg(raw)
        if not cfg.enabled:
            return None
        key = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
        if key not in self._tables:
            tables = RuleTables.from_tokenizer(self.tokenizer, cfg, self.vocab_size, self.eos_ids)
            tables.bias_on(self.device, self.vocab_size)  # placed once; every step reuses it
            self._tables[key] = tables
        return self._tables[key].apply_row
