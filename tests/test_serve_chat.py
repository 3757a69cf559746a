"""The chat deployment's batching, without Serve: a request's answer must not depend on what it was
batched with (seeds per row, `max_tokens` per row), and the rules switch must follow the config."""

from __future__ import annotations

import pytest

from almost_ray.serve.protocol import Sampling

MESSAGES = [{"role": "user", "content": "Name a color."}]


def _model(**chat):
    from almost_ray.serve.chat import ChatModel

    return ChatModel.func_or_class({"dtype": "float32", **chat}, "tiny:llama")


@pytest.fixture(scope="module")
def chat_model():
    return _model()


def _item(model, content="Name a color.", n=1, max_tokens=6, seed=3, top_k=None, **sampling):
    from almost_ray.models.text import prompt_token_ids
    from almost_ray.prompts.templates import render_prompt
    from almost_ray.serve.chat import GenerationItem

    prompt = render_prompt(model.prompt_format, [{"role": "user", "content": content}], model.generator.tokenizer)
    ids = prompt_token_ids(model.generator.tokenizer, prompt)
    return GenerationItem(ids, prompt, n, seed, max_tokens, Sampling(**{"temperature": 1.0, "top_p": 0.9, **sampling}),
                          top_k)


def test_answers_do_not_depend_on_the_batch(chat_model):
    alone = chat_model.generate_batch([_item(chat_model, n=2)])[0]
    batched = chat_model.generate_batch([
        _item(chat_model, "Tell me a long story about the sea.", max_tokens=10, seed=9),
        _item(chat_model, n=2),
        _item(chat_model, "Hi", temperature=0.0),  # another group: greedy
    ])
    assert [c.text for c in batched[1]] == [c.text for c in alone]
    assert [c.completion_tokens for c in batched[1]] == [c.completion_tokens for c in alone]
    assert all(c.completion_tokens <= 6 for c in batched[1]) and all(c.completion_tokens <= 10 for c in batched[0])
    assert alone[0].text != alone[1].text  # n samples differ


def test_rules_default_comes_from_the_config_and_a_request_overrides_it(chat_model):
    ruled_model = _model(rules={"enabled": True})
    greedy = dict(temperature=0.0, max_tokens=12)
    plain = chat_model.generate_batch([_item(chat_model, **greedy)])[0][0].text
    by_config = ruled_model.generate_batch([_item(ruled_model, **greedy)])[0][0].text
    by_request = chat_model.generate_batch([_item(chat_model, rules=True, **greedy)])[0][0].text
    switched_off = ruled_model.generate_batch([_item(ruled_model, rules=False, **greedy)])[0][0].text
    assert by_config == by_request != plain
    assert switched_off == plain


def test_prompt_format_of_a_model_without_manifest_is_its_chat_template(chat_model):
    assert chat_model.prompt_format == "chat"
    assert chat_model.format_stop == ()
