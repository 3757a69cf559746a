"""What both ingresses answer alike: the OpenAI-style ingress of `app.py` (CPU, HF chat) and the one
composed with Ray's LLM deployments (`llm_app.py`, GPU, vLLM): reading a bounded body, `POST /v1/reward`,
`GET /health`, and the reward deployment they share. Both import this module, so `llm_app.py` needs nothing
from `app.py` (which imports `llm_app.py` only when `chat.backend: vllm` asks for it).

FastAPI reads the endpoints' annotations at run time, so this module does not use postponed annotations.
"""

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from almost_ray.serve.chat import model_id_of
from almost_ray.serve.config import RequestLimits, ServeConfig
from almost_ray.serve.protocol import APIError, RewardRequest, check_reward, parse_json_body, validate_model
from almost_ray.serve.reward import RewardScorer, resolve_reward_model


async def read_json(request: Request, limits: RequestLimits) -> dict[str, Any]:
    """The body, refused early when Content-Length says it is too large and cut off when it grows past it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError("invalid Content-Length header", code="invalid_header")
        if int(declared) > limits.max_body_bytes:
            raise APIError(f"request body is {declared} bytes, the limit is {limits.max_body_bytes}",
                           status=413, code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise APIError(f"request body exceeds {limits.max_body_bytes} bytes", status=413, code="request_too_large")
    return parse_json_body(bytes(body), limits)


def check_model(name: str | None, served: str | None) -> None:
    if name is not None and name != served:
        raise APIError(f"model {name!r} is not served here (serving {served!r})", "model", 404, "model_not_found")


async def reward_scores(request: Request, reward: DeploymentHandle | None, limits: RequestLimits,
                        reward_id: str | None) -> dict:
    """`POST /v1/reward`, the same on the CPU and the GPU ingress."""
    req = validate_model(RewardRequest, await read_json(request, limits))
    if reward is None:
        raise APIError("no reward model is configured (serve.reward)", None, 503, "reward_model_unavailable",
                       type="service_unavailable")
    check_model(req.model, reward_id)
    conversations = check_reward(req, limits)
    scores = await asyncio.gather(*(reward.score.remote(c) for c in conversations))
    return {"object": "list", "model": reward_id,
            "data": [{"object": "reward", "index": i, "score": s} for i, s in enumerate(scores)]}


def deployment_health(deployments: dict[str, tuple[str, int]]) -> tuple[bool, dict[str, dict]]:
    """Serve's view of each deployment (`name -> (status, running replicas)`): the application is healthy
    when every deployment has a running replica and none is marked unhealthy."""
    report = {name: {"status": status, "running_replicas": running} for name, (status, running) in deployments.items()}
    healthy = bool(deployments) and all(running > 0 and status != "UNHEALTHY" for status, running in deployments.values())
    return healthy, report


async def health_response(extra: dict[str, Any]) -> JSONResponse:
    """`GET /health`: 200 when every deployment of this application has a running replica, else 503."""
    app_name = serve.get_replica_context().app_name
    status = await asyncio.to_thread(serve.status)
    app = status.applications.get(app_name)
    deployments = {} if app is None else {
        name: (str(d.status.value), int(d.replica_states.get("RUNNING", 0))) for name, d in app.deployments.items()
    }
    healthy, report = deployment_health(deployments)
    body = {"status": "ok" if healthy else "unavailable", **extra, "deployments": report}
    return JSONResponse(body, status_code=200 if healthy else 503)


def reward_deployment(cfg: ServeConfig):
    """The bound reward deployment and the id it is served under, or (None, None) without an RM."""
    ref = resolve_reward_model(cfg)
    if ref is None:
        return None, None
    scorer = RewardScorer.options(**cfg.reward.deployment.serve_options()).bind(cfg.reward.model_dump(mode="json"), ref)
    return scorer, model_id_of(ref)
