"""The Serve application: an OpenAI-compatible FastAPI ingress over the chat and reward deployments.

    serve run almost_ray.serve.app:app                       # defaults (the demo's aligned model)
    serve deploy serve/config.yaml                           # import_path almost_ray.serve.app:build_app
    almost-ray serve --config configs/demo.yaml              # the `serve:` section of a project config

Every request is read with a size limit, parsed, type-checked and bounds-checked (`protocol.py`) before a
model sees it; whatever is wrong is a 4xx in OpenAI's error shape naming the field, and nothing a client
sends turns into a 500. The HTTP proxy binds 127.0.0.1 unless told otherwise (docs/serving.md).

FastAPI reads the endpoints' annotations at run time, so this module does not use postponed annotations.
"""

import json
import logging
import signal
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from almost_ray.config_base import ConfigError
from almost_ray.serve.chat import ChatModel, model_id_of, resolve_chat_model
from almost_ray.serve.config import RequestLimits, ServeConfig
from almost_ray.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_chat,
    check_completion,
    error_body,
    validate_model,
    validation_error,
)
from almost_ray.serve.responses import (
    chat_body,
    chat_events,
    completion_body,
    completion_events,
    completion_id,
)
from almost_ray.serve.routes import check_model, health_response, read_json, reward_deployment, reward_scores

logger = logging.getLogger("ray.serve")
api = FastAPI(title="almost_ray", description="OpenAI-compatible chat completions, completions and reward scoring")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = validation_error(exc.errors())
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(json.JSONDecodeError)
async def _bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
    return JSONResponse(error_body(f"invalid JSON body: {exc}", None, "invalid_json"), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), None, code), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug or a dead replica, not the client
    logger.exception("request failed")
    return JSONResponse(error_body("internal error", None, None, "server_error"), status_code=500)


@serve.deployment
@serve.ingress(api)
class OpenAIIngress:
    """The HTTP face: checks requests and calls the model deployments through their handles."""

    def __init__(self, chat: DeploymentHandle | None, reward: DeploymentHandle | None, limits: dict,
                 model_id: str | None, reward_id: str | None):
        self.chat, self.reward = chat, reward
        self.limits = RequestLimits.model_validate(limits)
        self.model_id, self.reward_id = model_id, reward_id
        self.created = int(time.time())

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return await health_response({"model": self.model_id, "reward_model": self.reward_id})

    @api.get("/v1/models")
    async def models(self) -> dict:
        served = [(name, kind) for name, kind in ((self.model_id, "chat"), (self.reward_id, "reward")) if name]
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "almost_ray", "kind": kind}
            for name, kind in served
        ]}

    def _chat_model(self, name: str | None) -> DeploymentHandle:
        if self.chat is None:
            raise APIError("no chat model is served here (serve.chat.enabled is false)", None, 503,
                           "chat_model_unavailable", type="service_unavailable")
        check_model(name, self.model_id)
        return self.chat

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = validate_model(ChatCompletionRequest, await read_json(request, self.limits))
        chat = self._chat_model(req.model)
        job = check_chat(req, self.limits)
        result = await chat.chat.remote(job)
        if isinstance(result, APIError):
            raise result
        cid = completion_id()
        if job.stream:
            return StreamingResponse(chat_events(result, self.model_id, cid, job.include_usage),
                                     media_type="text/event-stream")
        return chat_body(result, self.model_id, cid)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = validate_model(CompletionRequest, await read_json(request, self.limits))
        chat = self._chat_model(req.model)
        job = check_completion(req, self.limits)
        result = await chat.complete.remote(job)
        if isinstance(result, APIError):
            raise result
        cid = completion_id("cmpl")
        if job.stream:
            return StreamingResponse(completion_events(result, self.model_id, cid, job.include_usage),
                                     media_type="text/event-stream")
        return completion_body(result, self.model_id, cid)

    @api.post("/v1/reward")
    async def reward_scores(self, request: Request) -> dict:
        return await reward_scores(request, self.reward, self.limits, self.reward_id)


def parse_args(args: dict[str, Any] | ServeConfig | None) -> ServeConfig:
    if isinstance(args, ServeConfig):
        return args
    try:
        return ServeConfig.model_validate(args or {})
    except ValidationError as err:
        lines = [f"serve args: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None


def build_app(args: dict[str, Any] | ServeConfig | None = None):
    """The Serve application builder (`import_path: almost_ray.serve.app:build_app`, `args`: ServeConfig).

    `chat.backend: hf` composes our ingress with our chat and reward deployments; `chat.backend: vllm`
    composes Ray's LLM deployment with our reward deployment (`llm_app.py`; needs vLLM, the `[gpu]`
    extra). Either way the same routes answer under one base URL.
    """
    cfg = parse_args(args)
    if cfg.chat.enabled and cfg.chat.backend == "vllm":
        try:
            from almost_ray.serve.llm_app import build_llm_app
        except ImportError as err:
            raise ConfigError(f"serve.chat.backend: vllm needs vLLM (pip install 'almost-ray[gpu]'): {err}") from None
        return build_llm_app(cfg)
    chat_ref = resolve_chat_model(cfg) if cfg.chat.enabled else None
    chat = None
    if chat_ref is not None:
        chat = ChatModel.options(**cfg.chat.deployment.serve_options()).bind(cfg.chat.model_dump(mode="json"), chat_ref)
    reward, reward_id = reward_deployment(cfg)
    return OpenAIIngress.options(**cfg.ingress.serve_options()).bind(
        chat, reward, cfg.limits.model_dump(mode="json"),
        (cfg.chat.model_id or model_id_of(chat_ref)) if chat_ref else None, reward_id,
    )


app = build_app()


def run(cfg: ServeConfig, ray_cfg, block: bool = True) -> str:
    """`almost-ray serve`: start (or join) Ray, start Serve on `cfg.http`, deploy, print the URL, block.

    Ctrl-C or SIGTERM (a container stop) shuts Serve down, also while the replicas are still loading.
    """
    from almost_ray.cluster.connect import init_ray

    init_ray(ray_cfg)
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    if block:
        signal.signal(signal.SIGTERM, _interrupt)  # after init_ray: Ray installs its own handler
    try:
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        serve.run(build_app(cfg), name="almost_ray", route_prefix="/")
        print(f"serving {url}/v1 (chat completions, completions, models, reward) and {url}/health; Ctrl-C stops",
              flush=True)
        while block:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return url


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
