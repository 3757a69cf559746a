"""The GPU path's configuration: the chat model on Ray's `ray.serve.llm` (vLLM), generated from `ServeConfig`.

With `serve.chat.backend: vllm`, `build_app` composes Ray's own LLM deployment (`LLMServer`: vLLM's
continuous batching, token streaming, tensor parallelism) with our reward model and rules adapter behind
one ingress (`llm_app.py`, which needs vLLM). This module holds what that build needs and is pure: it
imports neither vLLM nor `ray.serve.llm`, so every piece is built and checked on any machine
(tests/test_serve_config.py validates it against Ray's `LLMConfig` and `ServeDeploySchema`).

What carries over from the CPU path:
- the prompt format: a model trained on `human_assistant` or `tulu` turns gets a chat template that
  renders exactly what `almost_ray.prompts.templates` renders (vLLM's frontend argument `chat_template`);
  clients should send that format's stop strings (`"\\nHuman:"`), which vLLM does not add by itself;
- the rules adapter: its vLLM logits processor is loaded into the engine, and the ingress turns it on
  per request (`rules_adapter`, default `chat.rules.enabled`) through `vllm_xargs`
  (see `almost_ray.adapters.rules_vllm`);
- deployment options: `chat.deployment` becomes the LLM deployment's `deployment_config`;
- the context: `max_model_len` is the model's own (`max_position_embeddings` in its config.json) unless
  `serve.llm.engine_kwargs` sets a smaller one; vLLM refuses a larger one at engine start.
"""

from __future__ import annotations

import json
from typing import Any

from almost_ray.config_base import ConfigError
from almost_ray.models.loading import context_length
from almost_ray.serve.chat import model_id_of, trained_prompt_format
from almost_ray.serve.config import ServeConfig

APP_IMPORT_PATH = "almost_ray.serve.app:build_app"

# Jinja chat templates rendering what `templates.human_assistant` and `templates.tulu` render.
CHAT_TEMPLATES = {
    "human_assistant": (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ '\\n\\nHuman: ' + m['content'] | trim }}"
        "{%- elif m['role'] == 'assistant' -%}{{ '\\n\\nAssistant: ' + m['content'] | trim }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '\\n\\nAssistant:' }}{%- endif -%}"
    ),
    "tulu": (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{ '<|user|>\\n' + m['content'] + '\\n' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ '<|assistant|>\\n' + m['content'] + '\\n' }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
    ),
}


def engine_kwargs(cfg: ServeConfig, ref: str) -> dict[str, Any]:
    """vLLM's engine arguments: parallelism, dtype, the trained prompt format, the rules processor, the
    context, then `serve.llm.engine_kwargs` on top."""
    from almost_ray.adapters.rules import RULES_VLLM_PROCESSOR

    out: dict[str, Any] = {"tensor_parallel_size": cfg.llm.tensor_parallel_size,
                           "logits_processors": [RULES_VLLM_PROCESSOR]}
    if cfg.chat.dtype != "auto":
        out["dtype"] = cfg.chat.dtype
    fmt = cfg.chat.prompt_format if cfg.chat.prompt_format != "auto" else trained_prompt_format(ref)
    if fmt in CHAT_TEMPLATES:
        out["chat_template"] = CHAT_TEMPLATES[fmt]
    out.update(cfg.llm.engine_kwargs)
    positions = context_length(ref)
    asked = out.get("max_model_len")
    if positions is not None and asked is not None and asked > positions:
        raise ConfigError(f"serve.llm.engine_kwargs.max_model_len: {asked} exceeds the model's context of "
                          f"{positions} (max_position_embeddings in {ref}/config.json); vLLM refuses it")
    if asked is None and positions is not None:
        out["max_model_len"] = positions
    return out


def llm_config(cfg: ServeConfig, ref: str) -> dict[str, Any]:
    """One `ray.serve.llm.LLMConfig` (as a dict) for the resolved chat model `ref`."""
    if ref.startswith(("embedded:", "tiny:")):
        raise ConfigError(f"serve.chat.model: vLLM loads an HF directory or hub id; {ref!r} is a CPU-only reference")
    deployment = cfg.chat.deployment.serve_options()
    deployment.pop("ray_actor_options")  # the engine's GPUs come from tensor_parallel_size (its placement group)
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.chat.model_id or model_id_of(ref), "model_source": ref},
        "engine_kwargs": engine_kwargs(cfg, ref),
        "deployment_config": deployment,
    }
    if cfg.llm.accelerator_type:
        out["accelerator_type"] = cfg.llm.accelerator_type
    return out


def gpu_deploy_config(cfg: ServeConfig) -> dict[str, Any]:
    """A `serve deploy` file for a GPU cluster: `build_app` with `chat.backend: vllm`.

    Model paths stay as written: the cluster resolves them when it builds the application (a path on
    the writer's machine means nothing in a pod). `max_model_len` is written from the model's config.json
    when the writer can read it, and taken from it at build time otherwise. `http_options` names only the
    port, so the proxy takes Ray's default host, every interface of the pod, as KubeRay's own samples
    leave it: a cluster's Service reaches the proxy on the pod's address, and the Service (with what
    authenticates in front of it) is the boundary (docs/serving.md, Authentication). `almost-ray serve`
    on a machine keeps `serve.http.host` (loopback).
    """
    args = cfg.model_dump(mode="json")
    args["chat"]["backend"] = "vllm"
    if cfg.chat.model and "max_model_len" not in cfg.llm.engine_kwargs:
        positions = context_length(cfg.chat.model)
        if positions is not None:
            args["llm"]["engine_kwargs"]["max_model_len"] = positions
    return {
        "http_options": {"port": cfg.http.port},
        "applications": [{"name": "almost_ray", "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": args}],
    }


def rules_xargs(extra: dict[str, Any] | None, xargs: dict[str, Any] | None, default: bool,
                rules: dict[str, Any]) -> dict[str, Any] | None:
    """A vLLM request's `vllm_xargs` with the rules adapter's entry (`RulesConfig` as JSON text, since
    `vllm_xargs` values are strings or numbers) set from its `rules_adapter` field, which is popped from
    the request's extra fields, else from the deployment's default. An entry the client wrote is kept."""
    from almost_ray.adapters.rules import RULES_EXTRA_ARG

    flag = (extra or {}).pop("rules_adapter", None)
    on = default if flag is None else bool(flag)
    if not on or RULES_EXTRA_ARG in (xargs or {}):
        return xargs
    return {**(xargs or {}), RULES_EXTRA_ARG: json.dumps({**rules, "enabled": True})}
