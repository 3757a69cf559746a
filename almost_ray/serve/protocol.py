"""The OpenAI-compatible wire format: request models, the checks every request passes, response shapes.

Pure Python and pydantic, no Ray and no model, so every rule is unit-tested on its own. A request is
parsed in three steps, each answering a 4xx in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) that names the offending field:

1. `parse_json_body`: size, nesting depth and JSON syntax, before anything is built from the body
   (a deeply nested body would otherwise exhaust the parser's recursion limit: a 500);
2. the pydantic models: strict types (no `"1"` for 1, no `true` for 1), known fields only, known roles;
3. `check_chat` / `check_reward`: the configured bounds (`RequestLimits`), which are deployment
   settings and so cannot be static field constraints.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from almost_ray.serve.config import RequestLimits

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class APIError(Exception):
    """A request that cannot be served; rendered as OpenAI's error object with `status`."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400,
        code: str | None = "invalid_value", type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type

    def __reduce__(self):  # crosses Ray's process boundary with every field
        return (APIError, (self.message, self.param, self.status, self.code, self.type))

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.param, self.code, self.type)


def error_body(message: str, param: str | None, code: str | None, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class RequestModel(BaseModel):
    """Strict: unknown fields are errors and types are not coerced (OpenAI rejects both too)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Role
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(RequestModel):
    include_usage: bool = False


class ChatCompletionRequest(RequestModel):
    """OpenAI's chat completion request, the fields this server honours; `rules_adapter` is ours
    (the `openai` client sends `extra_body` keys as top-level fields)."""

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    rules_adapter: bool | None = None


class RewardInput(RequestModel):
    """One conversation to score: a `{prompt, response}` pair, or `messages` ending with the assistant turn."""

    prompt: str | None = None
    response: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> RewardInput:
        pair = self.prompt is not None or self.response is not None
        if pair == (self.messages is not None):
            raise ValueError("give either prompt and response, or messages")
        if pair and (self.prompt is None or self.response is None):
            raise ValueError("a pair needs both prompt and response")
        return self


class RewardRequest(RequestModel):
    model: str | None = None
    input: list[RewardInput]


@dataclass(frozen=True)
class ChatJob:
    """A checked chat request, in the terms the chat deployment works in."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    rules: bool | None
    stream: bool = False
    include_usage: bool = False


@dataclass
class Choice:
    text: str
    finish_reason: FinishReason
    completion_tokens: int


@dataclass
class ChatResult:
    choices: list[Choice]
    prompt_tokens: int


# --- parsing -----------------------------------------------------------------------------------------

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    for b in _BRACKETS.findall(_STRING.sub(b'""', raw)):
        if b in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, limits: RequestLimits) -> dict[str, Any]:
    """The body as a JSON object, or an APIError: too large (413), too deep, not JSON, not an object."""
    if len(raw) > limits.max_body_bytes:
        raise APIError(
            f"request body is {len(raw)} bytes, the limit is {limits.max_body_bytes}",
            status=413, code="request_too_large",
        )
    if json_depth(raw) > limits.max_json_depth:
        raise APIError(f"JSON nested deeper than {limits.max_json_depth} levels", code="invalid_json")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as err:
        raise APIError(f"invalid JSON body: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\]|function-.*)$")


def param_of(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI names a field: `messages[0].role` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _TYPE_TAG.match(part) and part not in ("TextPart",):
            out += f".{part}" if out else part
    return out or None


def validate_model(model: type[RequestModel], data: dict[str, Any]) -> Any:
    """`model.model_validate(data)`, its first error turned into an APIError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


def validation_error(errors: list[dict[str, Any]] | Any) -> APIError:
    """The first of pydantic's (or FastAPI's) errors as an APIError naming the field."""
    errors = list(errors)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = tuple(first.get("loc", ()))
    if loc and loc[0] == "body":  # FastAPI prefixes body fields
        loc = loc[1:]
    param = param_of(loc)
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return APIError(f"unknown field {param!r}", param, code="unknown_field")
    if kind == "missing":
        return APIError(f"missing required field {param!r}", param, code="missing_field")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(f"{param}: {msg}" if param else msg, param, code="invalid_type" if "type" in kind else "invalid_value")


# --- bounds ------------------------------------------------------------------------------------------


def check_messages(messages: list[ChatMessage], limits: RequestLimits, param: str = "messages") -> None:
    if not messages:
        raise APIError(f"{param} must not be empty", param)
    if len(messages) > limits.max_messages:
        raise APIError(f"{param} has {len(messages)} messages, the limit is {limits.max_messages}", param)
    total = 0
    for i, m in enumerate(messages):
        text = m.text()
        if not text.strip():
            raise APIError(f"{param}[{i}].content is empty", f"{param}[{i}].content")
        if len(text) > limits.max_message_chars:
            raise APIError(
                f"{param}[{i}].content has {len(text)} characters, the limit is {limits.max_message_chars}",
                f"{param}[{i}].content",
            )
        total += len(text)
    if total > limits.max_total_chars:
        raise APIError(f"{param} total {total} characters, the limit is {limits.max_total_chars}", param)


def _bound(value: float, low: float, high: float, param: str, low_open: bool = False) -> None:
    if value != value or value < low or (low_open and value == low) or value > high:
        left = "(" if low_open else "["
        raise APIError(f"{param} must be in {left}{low}, {high}], got {value}", param)


def check_chat(req: ChatCompletionRequest, limits: RequestLimits) -> ChatJob:
    """The configured bounds; returns the job the chat deployment runs."""
    check_messages(req.messages, limits)
    if req.messages[-1].role != "user":
        raise APIError("the last message must be from the user", f"messages[{len(req.messages) - 1}].role")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise APIError("max_tokens and max_completion_tokens differ", "max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    _bound(max_tokens, 1, limits.max_tokens, param)
    _bound(req.temperature, 0, limits.max_temperature, "temperature")
    _bound(req.top_p, 0, 1, "top_p", low_open=True)
    _bound(req.n, 1, limits.max_n, "n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop:
        raise APIError(f"stop has {len(stop)} strings, the limit is {limits.max_stop}", "stop")
    for i, s in enumerate(stop):
        if not s or len(s) > limits.max_stop_chars:
            raise APIError(f"stop strings must have 1 to {limits.max_stop_chars} characters", f"stop[{i}]")
    if req.seed is not None:
        _bound(req.seed, -(2**63), 2**63 - 1, "seed")
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options needs stream: true", "stream_options")
    return ChatJob(
        messages=[{"role": m.role, "content": m.text()} for m in req.messages],
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, n=req.n, stop=tuple(stop),
        seed=req.seed, rules=req.rules_adapter, stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def check_reward(req: RewardRequest, limits: RequestLimits) -> list[list[dict[str, str]]]:
    """The conversations to score, each ending with the assistant turn being judged."""
    if not req.input:
        raise APIError("input must not be empty", "input")
    if len(req.input) > limits.max_reward_items:
        raise APIError(f"input has {len(req.input)} items, the limit is {limits.max_reward_items}", "input")
    conversations = []
    for i, item in enumerate(req.input):
        if item.messages is None:
            item_messages = [ChatMessage(role="user", content=item.prompt), ChatMessage(role="assistant", content=item.response)]
            param = f"input[{i}]"
        else:
            item_messages, param = item.messages, f"input[{i}].messages"
        check_messages(item_messages, limits, param)
        if item_messages[-1].role != "assistant":
            raise APIError("the last message must be the assistant turn being scored", param)
        conversations.append([{"role": m.role, "content": m.text()} for m in item_messages])
    return conversations


# --- responses ---------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result: ChatResult) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in result.choices)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def completion_body(result: ChatResult, model: str, cid: str, created: int | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
             "finish_reason": c.finish_reason}
            for i, c in enumerate(result.choices)
        ],
        "usage": usage(result),
    }


def stream_events(result: ChatResult, model: str, cid: str, include_usage: bool, created: int | None = None):
    """Server-sent events of a finished result: per choice a role delta, its content, its finish reason;
    then the usage chunk when asked for (`stream_options.include_usage`); then `[DONE]`."""
    created = created or int(time.time())

    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    for i, c in enumerate(result.choices):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        if c.text:
            yield chunk([{"index": i, "delta": {"content": c.text}, "logprobs": None, "finish_reason": None}])
        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
    if include_usage:
        yield chunk([], usage=usage(result))
    yield "data: [DONE]\n\n"
