"""Shared-prefix generation: a few-shot header's key/value cache is computed once per replica and reused,
with outputs identical to plain left-padded generation."""

from __future__ import annotations

import pytest

from almost_ray.models import hf_backend
from almost_ray.models.config import SamplingParams
from almost_ray.models.hf_backend import pad_after_prefix
from almost_ray.models.packing import common_prefix_length

HEADER = ("Below are conversations between a curious human and a helpful, honest and harmless assistant. "
          "The assistant answers carefully and says when it does not know.\n\n-----\n\nHuman: What is the "
          "boiling point of water at sea level?\n\nAssistant: It is 100 degrees Celsius.\n\n-----\n\n")
QUERIES = ["Human: Name a prime number.\n\nAssistant:", "Human: Why is the sky blue?\n\nAssistant:",
           "Human: How many legs does a spider have, and why?\n\nAssistant:"]


def test_common_prefix_leaves_every_row_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert common_prefix_length([[7, 8], [9]]) == 0


def test_padding_goes_between_prefix_and_rest():
    ids, mask = pad_after_prefix([[1, 2, 3], [1, 2, 4, 5, 6]], 2, 0)
    assert ids.tolist() == [[1, 2, 0, 0, 3], [1, 2, 4, 5, 6]]
    assert mask.tolist() == [[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]]


def _generate(generator, prompts, params, share: bool, monkeypatch):
    monkeypatch.setattr(hf_backend, "PREFIX_MIN_TOKENS", 8 if share else 10**9)
    generator.prefix_cache = hf_backend.PrefixCache()
    return generator.generate(prompts, params), generator.prefix_cache


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_new_tokens=12),
    SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, n=2, seed=3),
], ids=["greedy", "sampled"])
def test_shared_prefix_equals_plain_generation(tiny_generator, params, monkeypatch):
    prompts = [HEADER + q for q in QUERIES]
    plain, unused = _generate(tiny_generator, prompts, params, False, monkeypatch)
    shared, cache = _generate(tiny_generator, prompts, params, True, monkeypatch)
    assert unused.hits == 0 and cache.hits >= 1 and cache.prefill_tokens_saved > 0
    assert shared == plain


def test_the_prefix_is_computed_once_per_replica(tiny_generator, monkeypatch):
    params = SamplingParams(temperature=0, max_new_tokens=4)
    _generate(tiny_generator, [HEADER + q for q in QUERIES[:2]], params, True, monkeypatch)
    cache = tiny_generator.prefix_cache
    first = cache.cache
    tiny_generator.generate([HEADER + QUERIES[2], HEADER + QUERIES[0]], params)
    assert cache.cache is first and cache.hits == 2  # the second batch reused the first one's prefix
    tiny_generator.generate(["Human: hello there\n\nAssistant:", "Human: bye\n\nAssistant:"], params)
    assert cache.hits == 2  # no shared header: plain generation


def test_a_replica_playing_two_roles_keeps_both_headers(tiny_generator, monkeypatch):
    """RMSP's assistant and user on one replica alternate two headers: each is prefilled once, and the
    outputs equal plain generation."""
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=5)
    other = HEADER.replace("assistant answers carefully", "human asks a follow-up question")
    batches = [[HEADER + q for q in QUERIES[:2]], [other + q for q in QUERIES[1:]],
               [HEADER + QUERIES[2], HEADER + QUERIES[0]], [other + QUERIES[0], other + QUERIES[2]]]
    plain = [_generate(tiny_generator, b, params, False, monkeypatch)[0] for b in batches]
    monkeypatch.setattr(hf_backend, "PREFIX_MIN_TOKENS", 8)
    cache = tiny_generator.prefix_cache = hf_backend.PrefixCache()
    shared = [tiny_generator.generate(b, params) for b in batches]
    assert shared == plain
    assert (cache.prefills, cache.hits) == (2, 4)  # one prefill per header, every batch from a cache
