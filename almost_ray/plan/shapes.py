"""A model's shape and parameter count from its `config.json` alone: no weights, no transformers import.

The LLaMA family (LLaMA 1/2/3, Mistral, Qwen2; Touvron et al. 2023, Table 2 for the sizes the papers use)
is a stack of identical decoder blocks: attention (q, k, v, o projections; k and v narrower under grouped-
query attention), a SwiGLU MLP (gate, up, down) and two RMSNorms; then a final norm, the embedding and the
LM head (one matrix when tied) or a one-output score head for a reward model or critic. Those shapes are
all the GPU memory plan needs: LLaMA-7B comes to 6.74 B parameters, 13B to 13.02 B, 30B to 32.53 B.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from almost_ray.config_base import ConfigError

# config.json `model_type`s laid out as above (Qwen2 adds biases to q, k, v)
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs of a model: sizes from its config.json."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    max_positions: int = 2048  # vLLM's default max_model_len

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projections (narrower than `hidden` under grouped-query attention)."""
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder block: q, k, v, o projections, the SwiGLU MLP and two RMSNorm weights."""
        h, i, q = self.hidden, self.intermediate, self.heads * self.head_dim
        attention = h * q + 2 * h * self.kv_dim + q * h + (q + 2 * self.kv_dim if self.qkv_bias else 0)
        return attention + 3 * h * i + 2 * h

    def params(self, head: str = "lm") -> int:
        """All parameters with an LM head (`lm`, shared with the embedding when tied) or a one-output score
        head (`score`: a reward model or critic, `*ForSequenceClassification` with num_labels 1)."""
        body = self.vocab * self.hidden + self.layers * self.layer_params + self.hidden
        if head == "score":
            return body + self.hidden
        return body + (0 if self.tied else self.vocab * self.hidden)

    def root_params(self, head: str = "lm") -> int:
        """Parameters outside the decoder blocks: FSDP2's root unit (embedding, final norm, head)."""
        return self.params(head) - self.layers * self.layer_params

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV cache of one token over all layers: a key and a value vector per layer."""
        return 2 * self.layers * self.kv_dim * dtype_bytes


def read_shape(config_json: Path) -> ModelShape:
    """The shape of the model whose `config.json` is at this path; a clear error for anything else."""
    try:
        cfg = json.loads(Path(config_json).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{config_json}: not found (the plan reads each model's config.json, no weights)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_json}:{err.lineno}: invalid JSON: {err.msg}") from None
    kind = cfg.get("model_type")
    if kind not in DECODER_TYPES:
        raise ConfigError(f"{config_json}: model_type {kind!r}: the plan knows the LLaMA-style decoders "
                          f"{', '.join(DECODER_TYPES)}")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelShape(
            name=Path(config_json).parent.name, hidden=hidden, intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", kind == "qwen2")),
            max_positions=int(cfg.get("max_position_embeddings") or 2048),
        )
    except KeyError as err:
        raise ConfigError(f"{config_json}: {err.args[0]}: missing (a {kind} config.json has it)") from None
