"""Settings of `almost-ray serve`: the chat and reward deployments, request bounds, HTTP binding.

The same section is the `args` of the Serve application builder `almost_ray.serve.app:build_app`
(`serve/config.yaml`, a KubeRay `RayService`), so a `serve deploy` file and `configs/*.yaml` say the
same thing in the same words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from almost_ray.adapters.config import RulesConfig
from almost_ray.config_base import StrictModel

ServePromptFormat = Literal["auto", "chat", "human_assistant", "tulu", "raw"]


class DeploymentOptions(StrictModel):
    """One Serve deployment's scaling: fixed `num_replicas` or an `autoscaling_config` (Ray's own keys,
    e.g. `{min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}`), and what each replica reserves."""

    num_replicas: int | None = Field(default=1, ge=1, description="null when autoscaling_config is set")
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = Field(default=16, ge=1, description="requests a replica holds at once")
    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentOptions:
        if self.autoscaling_config is not None and self.num_replicas is not None:
            if "num_replicas" in self.model_fields_set:
                raise ValueError("set num_replicas or autoscaling_config, not both")
            self.num_replicas = None
        if self.autoscaling_config is None and self.num_replicas is None:
            raise ValueError("set num_replicas or autoscaling_config")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options(...)` (and of a `serve deploy` deployment entry)."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ChatDeploymentConfig(StrictModel):
    """The chat model: with `backend: hf` our deployment (an HF generator per replica, concurrent requests
    sharing forward passes: the `max_batch_size`, `batch_wait_timeout_s` and `max_rows` settings), with
    `backend: vllm` Ray's `ray.serve.llm` deployment (vLLM; `serve.llm` holds its engine settings).

    `model: null` serves the aligned model of `run_dir` (`ppo/model`, else `sft/model`), else the
    embedded SmolLM2. `prompt_format: auto` reads the format the model was trained on from its stage's
    manifest (`<model>/../manifest.json`, `config.prompt_format`, written by train-sft and ppo), else
    uses the tokenizer's chat template, else `human_assistant`.
    """

    enabled: bool = Field(default=True, description="false: the RM only")
    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="hf: our deployment (CPU or GPU); vllm: Ray's `ray.serve.llm` deployment (GPU)"
    )
    model: str | None = None
    model_id: str | None = Field(default=None, description="the name in /v1/models (default: from the model)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    prompt_format: ServePromptFormat = "auto"
    max_batch_size: int = Field(default=8, ge=1, description="requests per @serve.batch call")
    batch_wait_timeout_s: float = Field(default=0.05, ge=0, description="how long a batch waits to fill")
    max_rows: int = Field(default=32, ge=1, description="sequences (requests x n) per forward pass")
    rules: dict[str, Any] = Field(
        default_factory=dict,
        description="Hewitt et al.'s adapter, `RulesConfig` fields; `enabled` is the default, a request's "
        "`rules_adapter` overrides it",
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @field_validator("rules")
    @classmethod
    def _rules_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        return RulesConfig.model_validate(value).model_dump(mode="json")

    def rules_config(self) -> RulesConfig:
        return RulesConfig.model_validate(self.rules)


class RewardDeploymentConfig(StrictModel):
    """The reward model behind `POST /v1/reward`. `model: null` uses `<run_dir>/rm/model` when it exists;
    without an RM the endpoint answers 503."""

    enabled: bool = True
    model: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(default=1024, ge=8, description="tokens per scored conversation (left-truncated)")
    max_batch_size: int = Field(default=16, ge=1, description="conversations per @serve.batch call")
    batch_wait_timeout_s: float = Field(default=0.02, ge=0)
    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=0.5))


class RequestLimits(StrictModel):
    """Bounds every request is checked against before it reaches a model (answered with 4xx)."""

    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_json_depth: int = Field(default=16, ge=4)
    max_messages: int = Field(default=64, ge=1)
    max_message_chars: int = Field(default=8000, ge=1)
    max_total_chars: int = Field(default=32000, ge=1)
    max_tokens: int = Field(default=512, ge=1, description="upper bound of a request's max_tokens")
    default_max_tokens: int = Field(default=128, ge=1, description="when a request gives none")
    max_n: int = Field(default=4, ge=1)
    max_temperature: float = Field(default=2.0, ge=0)
    max_stop: int = Field(default=4, ge=0)
    max_stop_chars: int = Field(default=64, ge=1)
    max_reward_items: int = Field(default=32, ge=1, description="conversations per /v1/reward request")
    max_prompts: int = Field(default=16, ge=1, description="prompts per /v1/completions request")
    max_logit_bias: int = Field(default=300, ge=0, description="entries of a request's logit_bias")

    @model_validator(mode="after")
    def _default_within_bound(self) -> RequestLimits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must be <= max_tokens")
        return self


class HTTPConfig(StrictModel):
    """Where Serve's proxy listens. Loopback by default: put an authenticating proxy in front (docs/serving.md)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)


class LLMBackendConfig(StrictModel):
    """`chat.backend: vllm`: the chat model on Ray's `ray.serve.llm` (vLLM); see `serve/llm.py`."""

    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments; max_model_len defaults to the model's max_position_embeddings",
    )
    tensor_parallel_size: int = Field(default=1, ge=1)
    accelerator_type: str | None = Field(default=None, description="e.g. A100, H100 (Ray's accelerator names)")


class ServeConfig(StrictModel):
    """`almost-ray serve` / `almost_ray.serve.app:build_app(args)`."""

    run_dir: Path = Field(default=Path("runs/demo"), description="where `model: null` looks for the aligned models")
    chat: ChatDeploymentConfig = Field(default_factory=ChatDeploymentConfig)
    reward: RewardDeploymentConfig = Field(default_factory=RewardDeploymentConfig)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    llm: LLMBackendConfig = Field(default_factory=LLMBackendConfig)
    ingress: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.1, max_ongoing_requests=64),
        description="the FastAPI ingress deployment",
    )
