"""The OpenAI-compatible wire format: request models, the checks every request passes, the jobs they become.

Pure Python and pydantic, no Ray and no model, so every rule is unit-tested on its own. A request is
parsed in three steps, each answering a 4xx in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`) that names the offending field:

1. `parse_json_body`: size, nesting depth and JSON syntax, before anything is built from the body
   (a deeply nested body would otherwise exhaust the parser's recursion limit: a 500);
2. the pydantic models: every field of OpenAI's current chat-completions and (legacy) completions
   requests, strict types (no `"1"` for 1), and nothing else: an unknown field is refused, as OpenAI
   refuses it, so a typo never silently changes the answer;
3. `check_chat` / `check_completion` / `check_reward`: the configured bounds (`RequestLimits`, which are
   deployment settings and so cannot be static field constraints), and the contract: a field is honoured,
   or accepted and ignored when it only configures OpenAI's platform (`user`, `store`, `service_tier`, ...),
   or refused with a 400 naming it when ignoring it would change what the client gets (`tools`, a JSON
   `response_format`, audio). The table is in docs/serving.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from almost_ray.serve.config import RequestLimits

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

# OpenAI's documented ranges
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_TOP_LOGPROBS = 20  # chat completions
MAX_COMPLETION_LOGPROBS = 5  # legacy completions
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the legacy endpoint's documented default


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


def unsupported(param: str, what: str) -> APIError:
    """A field this server cannot honour and must not ignore."""
    return APIError(f"{param}: {what}", param, code="unsupported_parameter")


class RequestModel(BaseModel):
    """Strict: unknown fields are errors and types are not coerced (OpenAI rejects both too)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(BaseModel):
    """One part of a message's content. Any part type parses, so that a non-text part (an image, audio, a
    file) is answered "not supported" by name rather than "unknown field"."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(RequestModel):
    """A message of any of OpenAI's roles; `developer` is the newer name of `system`."""

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


class StreamOptions(RequestModel):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding against traffic analysis on OpenAI's network; ignored


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(RequestModel):
    """The sampling fields both generation endpoints share (null means "the default", as OpenAI reads it)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, int | float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    rules_adapter: bool | None = None  # ours; the `openai` client sends `extra_body` keys as top-level fields


class ChatCompletionRequest(SamplingFields):
    """OpenAI's chat completion request, every field of the current API reference."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    """OpenAI's legacy completion request (`POST /v1/completions`), as evaluation harnesses send it."""

    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


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


# --- jobs: checked requests, in the terms the chat deployment works in ---------------------------------


@dataclass(frozen=True)
class Sampling:
    """What requests must share to run in one `generate` call (the batch key)."""

    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    rules: bool | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def key(self) -> Sampling:
        """Greedy decoding ignores top-p: greedy requests batch together whatever top-p they sent."""
        if self.temperature > 0:
            return self
        return Sampling(0.0, 1.0, self.stop, self.rules, self.presence_penalty, self.frequency_penalty, self.logit_bias)


@dataclass(frozen=True)
class ChatJob:
    messages: list[dict[str, str]]
    max_tokens: int
    n: int
    seed: int | None
    sampling: Sampling
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class CompletionJob:
    prompts: tuple[str | tuple[int, ...], ...]
    max_tokens: int
    n: int
    best_of: int
    seed: int | None
    sampling: Sampling
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    include_usage: bool = False


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None for the first echoed prompt token, which has no context
    top: list[tuple[str, float]]


@dataclass
class Choice:
    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


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


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\]|function-.*)$")
_MODEL_TAGS = ("ContentPart", "StreamOptions", "ResponseFormat")


def param_of(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI names a field: `messages[0].role` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _TYPE_TAG.match(part) and part not in _MODEL_TAGS:
            out += f".{part}" if out else part
    return out or None


def validate_model(model: type[BaseModel], data: dict[str, Any]) -> Any:
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


# --- bounds and the contract ---------------------------------------------------------------------------


def _bound(value: float, low: float, high: float, param: str, low_open: bool = False) -> None:
    if value != value or value < low or (low_open and value == low) or value > high:
        left = "(" if low_open else "["
        raise APIError(f"{param} must be in {left}{low}, {high}], got {value}", param)


def message_text(message: ChatMessage, param: str) -> str:
    """The text of a message's content; a non-text part is refused (this serves text models)."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if part.type == "text" or (part.type == "refusal" and message.role == "assistant"):
            text = part.text if part.type == "text" else (part.model_extra or {}).get("refusal")
            if not isinstance(text, str):
                raise APIError(f"{param}.content[{j}] has no text", f"{param}.content[{j}]")
            texts.append(text)
        else:
            raise unsupported(f"{param}.content[{j}].type", f"{part.type!r} parts are not supported; this server "
                              "serves a text-only model")
    return "".join(texts)


def check_messages(messages: list[ChatMessage], limits: RequestLimits, param: str = "messages") -> list[dict[str, str]]:
    """The bounds, the roles this server can honour; the messages as `{role, content}` dicts, with
    `developer` read as `system` (OpenAI's newer name for the same instructions)."""
    if not messages:
        raise APIError(f"{param} must not be empty", param)
    if len(messages) > limits.max_messages:
        raise APIError(f"{param} has {len(messages)} messages, the limit is {limits.max_messages}", param)
    total, out = 0, []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if m.role in ("tool", "function"):
            raise unsupported(f"{where}.role", f"{m.role!r} messages answer tool calls, which this server does not make")
        for field in ("tool_calls", "function_call", "audio"):
            if getattr(m, field):
                raise unsupported(f"{where}.{field}", "tool calls and audio are not supported")
        text = message_text(m, where)
        if not text.strip():
            raise APIError(f"{where}.content is empty", f"{where}.content")
        if len(text) > limits.max_message_chars:
            raise APIError(f"{where}.content has {len(text)} characters, the limit is {limits.max_message_chars}",
                           f"{where}.content")
        total += len(text)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    if total > limits.max_total_chars:
        raise APIError(f"{param} total {total} characters, the limit is {limits.max_total_chars}", param)
    return out


def check_sampling(req: SamplingFields, limits: RequestLimits) -> Sampling:
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    _bound(temperature, 0, limits.max_temperature, "temperature")
    _bound(top_p, 0, 1, "top_p", low_open=True)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stop:
        raise APIError(f"stop has {len(stop)} strings, the limit is {limits.max_stop}", "stop")
    for i, s in enumerate(stop):
        if not s or len(s) > limits.max_stop_chars:
            raise APIError(f"stop strings must have 1 to {limits.max_stop_chars} characters", f"stop[{i}]")
    presence = req.presence_penalty or 0.0
    frequency = req.frequency_penalty or 0.0
    _bound(presence, *PENALTY_RANGE, "presence_penalty")
    _bound(frequency, *PENALTY_RANGE, "frequency_penalty")
    bias = []
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit():
            raise APIError(f"logit_bias keys are token ids, got {key!r}", "logit_bias")
        _bound(value, *LOGIT_BIAS_RANGE, f"logit_bias[{key!r}]")
        bias.append((int(key), float(value)))
    if len(bias) > limits.max_logit_bias:
        raise APIError(f"logit_bias has {len(bias)} entries, the limit is {limits.max_logit_bias}", "logit_bias")
    return Sampling(temperature, top_p, tuple(stop), req.rules_adapter, presence, frequency, tuple(sorted(bias)))


def check_seed_and_stream(req: SamplingFields) -> tuple[bool, bool]:
    if req.seed is not None:
        _bound(req.seed, -(2**63), 2**63 - 1, "seed")
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise APIError("stream_options needs stream: true", "stream_options")
    return stream, bool(req.stream_options and req.stream_options.include_usage)


def check_chat_contract(req: ChatCompletionRequest) -> None:
    """The fields this server cannot honour and must not ignore: a 400 naming each."""
    if req.tools:
        raise unsupported("tools", "tool calling is not supported by this server")
    if req.functions:
        raise unsupported("functions", "function calling is not supported by this server")
    if isinstance(req.tool_choice, dict) or req.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", "only 'none' or 'auto' without tools; tool calling is not supported")
    if isinstance(req.function_call, dict) or req.function_call not in (None, "none", "auto"):
        raise unsupported("function_call", "only 'none' or 'auto'; function calling is not supported")
    if req.response_format is not None and req.response_format.type != "text":
        raise unsupported("response_format", f"{req.response_format.type!r} needs constrained decoding, which the "
                          "transformers backend does not do (vLLM does: the GPU path)")
    if req.modalities and set(req.modalities) != {"text"}:
        raise unsupported("modalities", "this server generates text only")
    if req.audio is not None:
        raise unsupported("audio", "this server generates text only")
    if req.web_search_options is not None:
        raise unsupported("web_search_options", "this server cannot search the web")
    if req.moderation is not None:
        raise unsupported("moderation", "this server runs no moderation model")


def check_chat(req: ChatCompletionRequest, limits: RequestLimits) -> ChatJob:
    """The configured bounds and the contract; returns the job the chat deployment runs."""
    check_chat_contract(req)
    messages = check_messages(req.messages, limits)
    if messages[-1]["role"] != "user":
        raise APIError("the last message must be from the user", f"messages[{len(req.messages) - 1}].role")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise APIError("max_tokens and max_completion_tokens differ", "max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    _bound(max_tokens, 1, limits.max_tokens, param)
    n = 1 if req.n is None else req.n
    _bound(n, 1, limits.max_n, "n")
    top_logprobs = None
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise APIError("top_logprobs needs logprobs: true", "top_logprobs")
        _bound(req.top_logprobs, 0, MAX_TOP_LOGPROBS, "top_logprobs")
    if req.logprobs:
        top_logprobs = req.top_logprobs or 0
    stream, include_usage = check_seed_and_stream(req)
    return ChatJob(messages=messages, max_tokens=max_tokens, n=n, seed=req.seed,
                   sampling=check_sampling(req, limits), top_logprobs=top_logprobs, stream=stream,
                   include_usage=include_usage)


def check_completion(req: CompletionRequest, limits: RequestLimits) -> CompletionJob:
    """The legacy completions request: one or more prompts (text or token ids), `n` (of `best_of`) each."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError("prompt must not be empty", "prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(f"prompt has {len(prompts)} prompts, the limit is {limits.max_prompts}", "prompt")
    total = 0
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 and prompts[0] is prompt else f"prompt[{i}]"
        if not p or (isinstance(p, str) and not p.strip()):
            raise APIError(f"{where} is empty", where)
        if isinstance(p, list) and any(t < 0 for t in p):
            raise APIError(f"{where} holds a negative token id", where)
        total += len(p)
    if total > limits.max_total_chars:
        raise APIError(f"prompt totals {total} characters (or tokens), the limit is {limits.max_total_chars}", "prompt")
    if req.suffix:
        raise unsupported("suffix", "inserting text before a suffix needs a fill-in-the-middle model")
    echo = bool(req.echo)
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    _bound(max_tokens, 0 if echo else 1, limits.max_tokens, "max_tokens")  # echo with 0 scores the prompt only
    n = 1 if req.n is None else req.n
    _bound(n, 1, limits.max_n, "n")
    best_of = n if req.best_of is None else req.best_of
    _bound(best_of, n, limits.max_n, "best_of")
    stream, include_usage = check_seed_and_stream(req)
    if stream and best_of > n:
        raise APIError("best_of cannot be used with stream (the best choices are known only at the end)", "best_of")
    if req.logprobs is not None:
        _bound(req.logprobs, 0, MAX_COMPLETION_LOGPROBS, "logprobs")
    return CompletionJob(
        prompts=tuple(p if isinstance(p, str) else tuple(p) for p in prompts), max_tokens=max_tokens, n=n,
        best_of=best_of, seed=req.seed, sampling=check_sampling(req, limits), logprobs=req.logprobs, echo=echo,
        stream=stream, include_usage=include_usage,
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
        conversation = check_messages(item_messages, limits, param)
        if conversation[-1]["role"] != "assistant":
            raise APIError("the last message must be the assistant turn being scored", param)
        conversations.append(conversation)
    return conversations
