"""The GPU application: Ray's LLM deployment (vLLM) composed with our reward model behind one ingress.

`build_app` calls `build_llm_app` when `serve.chat.backend: vllm`. The chat model is `ray.serve.llm`'s
`LLMServer` (vLLM: continuous batching, token-by-token streaming, tensor parallelism), built by Ray's
`build_llm_deployment` from `llm.llm_config`. The ingress is Ray's `OpenAiIngress` (its
`/v1/chat/completions`, `/v1/completions`, `/v1/models`, ...) with three additions, so that a client sees
the routes and fields of the CPU path: `POST /v1/reward` (our `RewardScorer` deployment, bound into the
same application), `GET /health` (Serve's replica states, as on the CPU path) and the `rules_adapter`
request field (turned into the `vllm_xargs` entry the adapter's vLLM processor reads). The composition is
the one Ray's `OpenAiIngress` docstring shows (LLMServer deployments bound into an ingress made by
`make_fastapi_ingress`); nothing of Ray's routing or streaming is rewritten.

This module imports `ray.serve.llm`, which needs vLLM: only `build_app` imports it, on a GPU machine.
FastAPI reads the endpoints' annotations at run time, so this module does not use postponed annotations.
"""

from typing import Any

from fastapi import Request
from ray import serve
from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList, to_model_metadata
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import JSONResponse, Response

from almost_ray.serve.chat import resolve_chat_model
from almost_ray.serve.config import RequestLimits, ServeConfig
from almost_ray.serve.llm import llm_config, rules_xargs
from almost_ray.serve.protocol import APIError
from almost_ray.serve.routes import health_response, reward_deployment, reward_scores


class LLMIngress(OpenAiIngress):
    """Ray's OpenAI ingress plus our reward route, health route and rules-adapter switch."""

    def __init__(self, llm_deployments: dict[str, DeploymentHandle], model_cards: dict[str, ModelCard], *,
                 reward: DeploymentHandle | None, reward_id: str | None, limits: dict, rules: dict,
                 **kwargs: Any):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self.reward, self.reward_id = reward, reward_id
        self.limits = RequestLimits.model_validate(limits)
        self.rules = rules

    def _prepare(self, body):
        body.vllm_xargs = rules_xargs(body.model_extra, body.vllm_xargs, self.rules.get("enabled", False), self.rules)
        return body

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        for message in body.messages:  # `developer` is OpenAI's newer name for `system`, as on the CPU path
            if isinstance(message, dict) and message.get("role") == "developer":
                message["role"] = "system"
        return await super().chat(self._prepare(body), request)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await super().completions(self._prepare(body), request)

    async def models(self) -> ModelList:
        listed = await super().models()
        if self.reward_id is not None:
            listed.data.append(ModelCard(id=self.reward_id, object="model", owned_by="almost_ray", permission=[],
                                         metadata={"kind": "reward"}))
        return listed

    async def reward_scores(self, request: Request) -> Response:
        try:
            return JSONResponse(await reward_scores(request, self.reward, self.limits, self.reward_id))
        except APIError as err:
            return JSONResponse(err.body(), status_code=err.status)

    async def health(self) -> Response:
        return await health_response({"model": next(iter(self._model_cards)), "reward_model": self.reward_id})


ENDPOINTS = {
    **DEFAULT_ENDPOINTS,
    "reward_scores": lambda app: app.post("/v1/reward"),
    "health": lambda app: app.get("/health"),
}


def build_llm_app(cfg: ServeConfig):
    """The application: `LLMServer` (vLLM) and `RewardScorer` bound into `LLMIngress`."""
    llm = LLMConfig.model_validate(llm_config(cfg, resolve_chat_model(cfg)))
    server = build_llm_deployment(llm)
    reward, reward_id = reward_deployment(cfg)
    options = maybe_apply_llm_deployment_config_defaults(
        LLMIngress.get_deployment_options([llm]), cfg.ingress.serve_options()
    )
    ingress = make_fastapi_ingress(LLMIngress, endpoint_map=ENDPOINTS)
    return serve.deployment(ingress, **options).bind(
        llm_deployments={llm.model_id: server},
        model_cards={llm.model_id: to_model_metadata(llm.model_id, llm)},
        reward=reward, reward_id=reward_id, limits=cfg.limits.model_dump(mode="json"),
        rules=cfg.chat.rules_config().model_dump(mode="json"),
    )
