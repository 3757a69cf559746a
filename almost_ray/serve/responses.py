"""OpenAI's response shapes: chat completions and legacy completions, whole or as server-sent events.

Pure functions of a `ChatResult` (no Ray, no model), so each shape is unit-tested against what the
`openai` client parses. A streamed answer on the CPU path is generated whole inside its batch and then
sent as chunks (docs/serving.md); the GPU path streams token by token (vLLM).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from almost_ray.serve.protocol import ChatResult, TokenLogprob


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(result: ChatResult) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in result.choices)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """`choices[i].logprobs` of a chat completion: per generated token its text, log-prob, UTF-8 bytes and
    the `top_logprobs` most likely tokens at that step."""
    if entries is None:
        return None
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e.token),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, lp in e.top]}
        for e in entries
    ], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """`choices[i].logprobs` of a legacy completion: parallel lists, `text_offset` into the choice's text.
    Each `top_logprobs` entry holds the k most likely tokens and the chosen one (up to k + 1, as the API
    says), so a harness can tell whether the chosen token was the greedy one."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {**dict(e.top), e.token: e.logprob} for e in entries],
        "text_offset": offsets,
    }


def chat_body(result: ChatResult, model: str, cid: str, created: int | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
             "logprobs": chat_logprobs(c.logprobs), "finish_reason": c.finish_reason}
            for i, c in enumerate(result.choices)
        ],
        "usage": usage(result),
    }


def completion_body(result: ChatResult, model: str, cid: str, created: int | None = None) -> dict:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": c.text, "logprobs": completion_logprobs(c.logprobs),
             "finish_reason": c.finish_reason}
            for i, c in enumerate(result.choices)
        ],
        "usage": usage(result),
    }


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def chat_events(result: ChatResult, model: str, cid: str, include_usage: bool,
                created: int | None = None) -> Iterator[str]:
    """Server-sent events of a finished chat result: per choice a role delta, its content (with its
    logprobs), its finish reason; then the usage chunk when asked for (`stream_options.include_usage`,
    and every other chunk then carries `usage: null`); then `[DONE]`."""
    created = created or int(time.time())
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, delta: dict, finish: str | None, logprobs: Any = None) -> str:
        return _event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                       **extra})

    for i, c in enumerate(result.choices):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
        if c.text or c.logprobs:
            yield chunk(i, {"content": c.text}, None, chat_logprobs(c.logprobs))
        yield chunk(i, {}, c.finish_reason)
    if include_usage:
        yield _event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": [], "usage": usage(result)})
    yield "data: [DONE]\n\n"


def completion_events(result: ChatResult, model: str, cid: str, include_usage: bool,
                      created: int | None = None) -> Iterator[str]:
    """Server-sent events of a finished legacy completion: per choice its text, then its finish reason;
    then the usage chunk when asked for; then `[DONE]`."""
    created = created or int(time.time())
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict]) -> str:
        return _event({"id": cid, "object": "text_completion", "created": created, "model": model,
                       "choices": choices, **extra})

    for i, c in enumerate(result.choices):
        yield chunk([{"index": i, "text": c.text, "logprobs": completion_logprobs(c.logprobs),
                      "finish_reason": None}])
        yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": c.finish_reason}])
    if include_usage:
        yield _event({"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                      "usage": usage(result)})
    yield "data: [DONE]\n\n"
