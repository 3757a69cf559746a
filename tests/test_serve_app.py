"""The Serve application over real HTTP on 127.0.0.1, called with the official `openai` client.

One Serve instance for the module: `tiny:llama` as the chat model and a tiny sequence-classifier RM
saved from it. Every malformed request gets its 4xx in OpenAI's error shape, and the next well-formed
request still succeeds (the replica keeps serving).
"""

from __future__ import annotations

import socket

import httpx
import pytest

openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from almost_ray.models.loading import resolve_model_dir

    src = resolve_model_dir("tiny:llama")
    out = tmp_path_factory.mktemp("rm") / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    tok = AutoTokenizer.from_pretrained(src)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def server(tiny_rm):
    import ray
    from ray import serve

    from almost_ray.serve.app import build_app

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({
            "chat": {"model": "tiny:llama", "dtype": "float32", "max_batch_size": 4,
                     "deployment": {"num_cpus": 0.5}},
            "reward": {"model": tiny_rm, "dtype": "float32", "deployment": {"num_cpus": 0.5}},
            "limits": {"max_tokens": 32, "default_max_tokens": 8, "max_n": 3, "max_messages": 4,
                       "max_message_chars": 500, "max_total_chars": 800, "max_body_bytes": 4096,
                       "max_json_depth": 8},
        }), name="almost_ray_test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]


def _ok(client) -> None:
    """A well-formed request that must succeed (after every bad one)."""
    out = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_health_and_models(server, client):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny:llama"
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny:llama" and len(ids) == 2


def test_chat_completion(client):
    out = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert out.usage.prompt_tokens > 5
    assert 1 <= out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # random weights rarely emit EOS within 6 tokens: a full-length answer must say "length"
    if out.usage.completion_tokens == 6:
        assert choice.finish_reason == "length"
    # greedy decoding is deterministic
    again = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_seeded_n_samples_are_reproducible(client):
    kwargs = dict(model="tiny:llama", messages=MESSAGES, max_tokens=5, temperature=1.0, top_p=0.9, n=3, seed=7)
    out = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # three different samples
    assert [c.message.content for c in client.chat.completions.create(**kwargs).choices] == texts
    assert 3 <= out.usage.completion_tokens <= 15  # 1 to 5 tokens for each of the three samples


def test_streamed_completion(client):
    full = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(
        model="tiny:llama", messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done(server):
    body = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_rules_adapter_per_request(client):
    plain = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=12, temperature=0)
    ruled = client.chat.completions.create(
        model="tiny:llama", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"rules_adapter": True}
    )
    # rule 3 penalises every repeated token: a random model's greedy loop cannot survive it unchanged
    assert ruled.choices[0].message.content != plain.choices[0].message.content


def test_reward_scores_pairs_and_messages(server):
    body = {"input": [
        {"prompt": "Name a color.", "response": "Blue."},
        {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]},
        {"prompt": "Name a color.", "response": "I do not know."},
    ]}
    r = httpx.post(f"{server}/v1/reward", json=body, timeout=120)
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in r.json()["data"]]
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)  # the same conversation in both forms
    assert scores[0] != scores[2]


LONG = "x" * 501
BAD_CHAT = [
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "y" * 400}, {"role": "assistant", "content": "y" * 400},
                   {"role": "user", "content": "hi"}]}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 5}, 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": MESSAGES, "max_tokens": 33}, 400, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": "8"}, 400, "max_tokens"),
    ({"messages": MESSAGES, "n": 4}, 400, "n"),
    ({"messages": MESSAGES, "temperature": 2.5}, 400, "temperature"),
    ({"messages": MESSAGES, "temperature": True}, 400, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    ({"messages": MESSAGES, "stop": ["a", ""]}, 400, "stop[1]"),
    ({"messages": MESSAGES, "logprobs": True}, 400, "logprobs"),
    ({"messages": MESSAGES, "model": "gpt-4"}, 404, "model"),
    ({"max_tokens": 4}, 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD_CHAT)
def test_bad_chat_request(server, client, body, status, param):
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    _ok(client)


RAW_BAD = [
    (b'{"messages": [', 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"messages": NaN}', 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b'{"a":' * 20 + b"1" + b"}" * 20, 400, "invalid_json"),
    (b'{"messages": "' + b"z" * 5000 + b'"}', 413, "request_too_large"),
]


@pytest.mark.parametrize("raw,status,code", RAW_BAD)
def test_bad_body(server, client, raw, status, code):
    r = httpx.post(f"{server}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    _ok(client)


def test_oversize_stream_without_content_length(server, client):
    def chunks():
        for _ in range(10):
            yield b" " * 1000  # 10 kB of whitespace, no Content-Length (chunked transfer)

    r = httpx.post(f"{server}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    _ok(client)


def test_unknown_route_and_method(server):
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


BAD_REWARD = [
    ({"input": []}, "input"),
    ({"input": [{"prompt": "q"}]}, "input[0]"),
    ({"input": [{"prompt": "q", "response": "a", "messages": []}]}, "input[0]"),
    ({"input": [{"messages": [{"role": "user", "content": "q"}]}]}, "input[0].messages"),
    ({"input": [{"prompt": "q", "response": 3}]}, "input[0].response"),
    ({"input": [{"prompt": "q", "response": "a"}], "extra": 1}, "extra"),
]


@pytest.mark.parametrize("body,param", BAD_REWARD)
def test_bad_reward_request(server, body, param):
    r = httpx.post(f"{server}/v1/reward", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = httpx.post(f"{server}/v1/reward", json={"input": [{"prompt": "q", "response": "a"}]}, timeout=60)
    assert ok.status_code == 200
