"""The Serve application over real HTTP on 127.0.0.1, called with the official `openai` client and raw requests.

One Serve instance for the module: `tiny:llama` as the chat model and a tiny sequence-classifier RM
saved from it. Every field the client sends is accepted and honoured (or a 400 names it where it cannot
be honoured), the legacy `/v1/completions` answers as harnesses call it, `/health` follows the replicas,
and after every malformed request the next well-formed one still succeeds (the replica keeps serving).
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
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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
    r = httpx.get(f"{server}/health")
    health = r.json()
    assert r.status_code == 200 and health["status"] == "ok" and health["model"] == "tiny:llama"
    assert {name: d["running_replicas"] for name, d in health["deployments"].items()} == {
        "OpenAIIngress": 1, "ChatModel": 1, "RewardScorer": 1}
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
    ({"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": MESSAGES, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"messages": MESSAGES, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"messages": MESSAGES, "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ({"messages": MESSAGES, "logit_bias": {"5": 101}}, 400, "logit_bias['5']"),
    ({"messages": MESSAGES, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": MESSAGES, "functions": [{"name": "f"}]}, 400, "functions"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format"),
    ({"messages": MESSAGES, "modalities": ["text", "audio"]}, 400, "modalities"),
    ({"messages": MESSAGES, "audio": {"voice": "alloy", "format": "wav"}}, 400, "audio"),
    ({"messages": MESSAGES, "web_search_options": {}}, 400, "web_search_options"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "1"}]},
                   {"role": "tool", "content": "4", "tool_call_id": "1"}, {"role": "user", "content": "ok"}]}, 400,
     "messages[1].tool_calls"),
    ({"messages": [{"role": "tool", "content": "4", "tool_call_id": "1"}, {"role": "user", "content": "ok"}]}, 400,
     "messages[0].role"),
    ({"messages": MESSAGES, "temprature": 0.5}, 400, "temprature"),
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


# --- the OpenAI API as current clients call it ---------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from almost_ray.models.loading import load_tokenizer

    return load_tokenizer("tiny:llama")


def test_every_field_of_the_clients_requests_is_known():
    """A field the installed `openai` client can send is a field of our request models (honoured,
    ignored or refused by name), never "unknown field"."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    from almost_ray.serve.protocol import ChatCompletionRequest, CompletionRequest

    chat_fields = set(chat_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert chat_fields - set(ChatCompletionRequest.model_fields) == set()
    legacy_fields = set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    assert legacy_fields - set(CompletionRequest.model_fields) == set()


def test_client_fields_are_accepted_and_honoured(client):
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    out = client.chat.completions.create(
        model="tiny:llama", messages=developer, max_completion_tokens=6, temperature=0, n=2, seed=5,
        stop=["\n\n\n"], presence_penalty=0.0, frequency_penalty=0.0, logit_bias={}, logprobs=True, top_logprobs=3,
        response_format={"type": "text"}, user="u-1", metadata={"run": "test"}, store=False, service_tier="auto",
        safety_identifier="s-1", prompt_cache_key="k", reasoning_effort="low", verbosity="low",
        parallel_tool_calls=False, tool_choice="none", modalities=["text"],
        prediction={"type": "content", "content": "Blue."},
    )
    assert len(out.choices) == 2
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy: n equal answers
    for choice in out.choices:
        content = choice.logprobs.content
        assert sum(len(c.top_logprobs) == 3 for c in content) == len(content) > 0
        assert len(content) == out.usage.completion_tokens // 2
        for step in content:
            assert step.logprob <= 0 and step.bytes == list(step.token.encode())
            # greedy without penalties or bias: the chosen token is the most likely one
            assert step.token == step.top_logprobs[0].token and step.logprob == pytest.approx(step.top_logprobs[0].logprob)
    # the developer role is the system role: the same prompt, the same answer
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    same = client.chat.completions.create(model="tiny:llama", messages=system, max_tokens=6, temperature=0)
    assert same.choices[0].message.content == out.choices[0].message.content


def test_logit_bias_is_honoured(client, tokenizer):
    forced = tokenizer(" blue", add_special_tokens=False).input_ids[0]
    out = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=4, temperature=0,
                                         logit_bias={str(forced): 100}, logprobs=True)
    assert [step.token for step in out.choices[0].logprobs.content] == [tokenizer.decode([forced])] * 4
    greedy = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=1, temperature=0,
                                            logprobs=True, top_logprobs=1)
    first = greedy.choices[0].logprobs.content[0].token
    first_id = tokenizer(first, add_special_tokens=False).input_ids[-1]
    banned = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=1, temperature=0,
                                            logit_bias={str(first_id): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first


def test_penalties_are_honoured(client, tokenizer):
    def token_ids(**fields) -> list[str]:
        out = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=24, temperature=0,
                                             logprobs=True, **fields)
        return [step.token for step in out.choices[0].logprobs.content]

    plain = token_ids()
    assert len(set(plain)) < len(plain)  # a random model's greedy loop repeats itself
    # presence: every token said once is pushed down by 2 logits: fewer repeats
    presence = token_ids(presence_penalty=2.0)
    assert presence != plain and len(set(presence)) > len(set(plain))
    frequency = token_ids(frequency_penalty=2.0)
    assert frequency != plain and len(set(frequency)) > len(set(plain))


def test_null_fields_mean_defaults(server):
    body = {"messages": MESSAGES, "max_tokens": 4, "temperature": None, "top_p": None, "n": None, "stop": None,
            "seed": None, "stream": False, "logprobs": None, "response_format": None, "tools": None}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_stream_with_logprobs_and_usage(client):
    stream = client.chat.completions.create(model="tiny:llama", messages=MESSAGES, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logprobs=True)
    chunks = list(stream)
    tokens = [s.token for c in chunks if c.choices and c.choices[0].logprobs for s in c.choices[0].logprobs.content]
    assert len(tokens) == chunks[-1].usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


# --- legacy completions, as evaluation harnesses call them ------------------------------------------


def test_completions_text_prompts_n_and_seed(client):
    out = client.completions.create(model="tiny:llama", prompt=["Once upon a time", "The sea is"], max_tokens=5,
                                    temperature=1.0, n=2, seed=3)
    assert out.object == "text_completion" and [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    again = client.completions.create(model="tiny:llama", prompt=["Once upon a time", "The sea is"], max_tokens=5,
                                      temperature=1.0, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    assert out.usage.completion_tokens <= 20 and out.usage.prompt_tokens > 4
    default = client.completions.create(model="tiny:llama", prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens <= 16  # the legacy endpoint's documented default


def test_completions_echo_logprobs_score_a_continuation(client, tokenizer):
    """lm-evaluation-harness's loglikelihood request: token ids, `echo`, `logprobs`, one new token. The
    echoed prompt's log-probs are the model's own (checked against a forward pass here)."""
    import torch

    from almost_ray.models.loading import load_causal_lm

    ids = tokenizer("The capital of France is Paris", add_special_tokens=False).input_ids
    out = client.completions.create(model="tiny:llama", prompt=ids, max_tokens=1, temperature=0, echo=True,
                                    logprobs=1)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert out.choices[0].text.startswith(tokenizer.decode(ids))
    model = load_causal_lm("tiny:llama", "float32")
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected.tolist(), abs=1e-4)
    # the generated token is the greedy one: it tops its own top_logprobs
    last = lp.top_logprobs[-1]
    assert max(last, key=last.get) == lp.tokens[-1]


def test_completions_best_of_stream_and_refusals(server, client):
    best = client.completions.create(model="tiny:llama", prompt="The sea is", max_tokens=4, temperature=1.0,
                                     n=1, best_of=3, seed=1)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    chunks = list(client.completions.create(model="tiny:llama", prompt="The sea is", max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    whole = client.completions.create(model="tiny:llama", prompt="The sea is", max_tokens=4, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    for body, param in [({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": []}, "prompt"),
                        ({"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
                        ({"prompt": "x", "n": 2, "best_of": 1}, "best_of"), ({"prompt": "x", "logprobs": 6}, "logprobs"),
                        ({"prompt": [[1, 2], [3, -1]]}, "prompt[1]"), ({"prompt": [10**9]}, "prompt"),
                        ({"prompt": "x", "max_tokens": 0}, "max_tokens"), ({"prompt": "x", "messages": []}, "messages")]:
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param
    _ok(client)


def test_health_follows_the_replicas(server, client):
    """A chat replica that dies turns `/health` to 503 until Serve has replaced it (run last: it kills one)."""
    import time

    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#ChatModel#" in a["name"]]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    seen, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline and not (503 in seen and seen[-1] == 200):
        r = httpx.get(f"{server}/health", timeout=30)
        if not seen or seen[-1] != r.status_code:
            seen.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["deployments"]["ChatModel"]["running_replicas"] == 0
        time.sleep(0.2)
    assert seen[-2:] == [503, 200], seen
    _ok(client)
