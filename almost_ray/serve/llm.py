"""The GPU path: the chat model through Ray's own `ray.serve.llm` (vLLM), generated from `ServeConfig`.

On GPUs the chat model is served by `ray.serve.llm:build_openai_app` (continuous batching, token
streaming, tensor parallelism) instead of our HF deployment; the RM stays our deployment (the same
`build_app` with `chat.enabled: false`, under its own route prefix). This module writes the
`serve deploy` file for that; nothing here imports `ray.serve.llm`, which needs vLLM (the `[gpu]`
extra), so the file can be generated and checked on any machine.

What carries over from the CPU path:
- the prompt format: a model trained on `human_assistant` or `tulu` turns gets a chat template that
  renders exactly what `almost_ray.prompts.templates` renders (vLLM's frontend argument `chat_template`);
  clients should send that format's stop strings (`"\\nHuman:"`), which vLLM does not add by itself;
- the rules adapter: its vLLM logits processor is loaded into the engine when `chat.rules.enabled`, and
  a request turns it on with `vllm_xargs` (see `almost_ray.adapters.rules_vllm`).
- deployment options: `chat.deployment` becomes the LLM deployment's `deployment_config`.
"""

from __future__ import annotations

from typing import Any

from almost_ray.serve.chat import model_id_of, resolve_chat_model, trained_prompt_format
from almost_ray.serve.config import ServeConfig

LLM_IMPORT_PATH = "ray.serve.llm:build_openai_app"
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


def llm_config(cfg: ServeConfig, model_ref: str | None = None) -> dict[str, Any]:
    """One `ray.serve.llm.LLMConfig`, as the dict a `serve deploy` file holds."""
    from almost_ray.adapters.rules import RULES_VLLM_PROCESSOR

    ref = model_ref or resolve_chat_model(cfg)
    if ref.startswith(("embedded:", "tiny:")):
        raise ValueError(f"vLLM loads an HF directory or hub id; {ref!r} is a CPU-only reference")
    engine_kwargs: dict[str, Any] = {"tensor_parallel_size": cfg.llm.tensor_parallel_size}
    if cfg.chat.dtype != "auto":
        engine_kwargs["dtype"] = cfg.chat.dtype
    fmt = cfg.chat.prompt_format if cfg.chat.prompt_format != "auto" else trained_prompt_format(ref)
    if fmt in CHAT_TEMPLATES:
        engine_kwargs["chat_template"] = CHAT_TEMPLATES[fmt]
    if cfg.chat.rules_config().enabled:
        engine_kwargs["logits_processors"] = [RULES_VLLM_PROCESSOR]
    engine_kwargs.update(cfg.llm.engine_kwargs)
    deployment = cfg.chat.deployment.serve_options()
    deployment.pop("ray_actor_options")  # the engine's GPUs come from tensor_parallel_size / placement
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.chat.model_id or model_id_of(ref), "model_source": ref},
        "engine_kwargs": engine_kwargs,
        "deployment_config": deployment,
    }
    if cfg.llm.accelerator_type:
        out["accelerator_type"] = cfg.llm.accelerator_type
    return out


def llm_application(cfg: ServeConfig, model_ref: str | None = None) -> dict[str, Any]:
    """The `serve deploy` application entry serving the chat model with `ray.serve.llm`."""
    return {
        "name": "llm",
        "route_prefix": "/",
        "import_path": LLM_IMPORT_PATH,
        "args": {"llm_configs": [llm_config(cfg, model_ref)]},
    }


def gpu_deploy_config(cfg: ServeConfig, model_ref: str | None = None) -> dict[str, Any]:
    """A whole `serve deploy` file: the chat model on vLLM at `/v1`, our RM deployment at `/rm/v1/reward`."""
    rm_args = cfg.model_dump(mode="json", exclude={"llm"})
    rm_args["chat"]["enabled"] = False
    rm_args["run_dir"] = str(cfg.run_dir.resolve())
    return {
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "applications": [
            llm_application(cfg, model_ref),
            {"name": "almost_ray_rm", "route_prefix": "/rm", "import_path": APP_IMPORT_PATH, "args": rm_args},
        ],
    }
