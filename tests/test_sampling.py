"""Seeded sampling draws the same tokens as `torch.multinomial` over a fully sorted nucleus, and the decode
cache with reserved room gives the same keys, values and text as transformers' own cache."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from almost_ray.models import hf_backend
from almost_ray.models.config import SamplingParams
from almost_ray.models.hf_backend import ReservedLayer
from almost_ray.models.sampling import SeededSampler, nucleus_probs, race_sample, sorted_nucleus_probs

VOCAB = 49152  # the embedded model's: the nucleus and the noise span all of it


def multinomial_sample(scores: torch.Tensor, generators: list, temperature: float, top_p: float) -> torch.Tensor:
    """The sampler as it was written first: full sort for top-p, one `torch.multinomial` per row."""
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = sorted_nucleus_probs(probs, top_p)
    return torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def logits(kind: str, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, VOCAB, generator=g)
    if kind == "peaked":  # a trained model's step: a few tokens hold most of the mass
        return x * 4
    if kind == "flat":  # a wide nucleus, beyond the top-k candidates
        return x * 0.3
    x = (x * 4).round()  # many equal logits, ties at the nucleus boundary
    x[:, :40] = x[:, :1]
    return x


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_keeps_the_tokens_a_full_sort_keeps(kind, top_p):
    for seed in range(3):
        probs = torch.softmax(logits(kind, 8, seed), dim=-1)
        assert torch.equal(nucleus_probs(probs, top_p), sorted_nucleus_probs(probs, top_p))


def test_the_first_token_always_stays_in_the_nucleus():
    probs = torch.zeros(1, 100)
    probs[0, 3], probs[0, 5], probs[0, 7] = 0.7, 0.2, 0.1
    kept = nucleus_probs(probs, 0.1)
    assert kept.nonzero().tolist() == [[0, 3]] and kept[0, 3] == probs[0, 3]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_race_sample_draws_what_multinomial_draws(top_p):
    probs = torch.softmax(logits("peaked", 6, 0), dim=-1)
    if top_p < 1:
        probs = sorted_nucleus_probs(probs, top_p)
    mine = [torch.Generator().manual_seed(s) for s in range(6)]
    ref = [torch.Generator().manual_seed(s) for s in range(6)]
    for _ in range(5):
        expected = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, ref)])
        assert torch.equal(race_sample(probs, mine), expected)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(mine, ref))


def test_race_sample_refuses_what_multinomial_refuses():
    with pytest.raises(ValueError, match="nan"):
        race_sample(torch.zeros(1, 8), [torch.Generator().manual_seed(0)])
    with pytest.raises(ValueError, match="nan"):
        race_sample(torch.full((1, 8), float("nan")), [torch.Generator().manual_seed(0)])


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.9), (0.7, 0.95), (1.0, 1.0)])
def test_seeded_sampler_draws_the_multinomial_tokens_step_after_step(temperature, top_p):
    """The same seeds give the same samples as the sort + multinomial sampler did, so text generated before
    (the demo's, a resumed stage's) comes out again."""
    seeds = [11, 12, 13, 14]
    sampler = SeededSampler(seeds, temperature, top_p, torch.device("cpu"), record_logprobs=True)
    ref = [torch.Generator().manual_seed(s) for s in seeds]
    for step, kind in enumerate(["peaked", "flat", "ties", "peaked", "peaked"]):
        scores = logits(kind, len(seeds), 100 + step)
        expected = multinomial_sample(scores, ref, temperature, top_p)
        out = sampler(None, scores.clone())
        assert torch.equal(out.argmax(-1, keepdim=True), expected)
        assert (out == 0).sum() == len(seeds) and torch.isinf(out).sum() == len(seeds) * (VOCAB - 1)
        expected_logprob = torch.log_softmax(scores / temperature, -1).gather(-1, expected)[:, 0]
        assert torch.equal(sampler.logprobs[:, step], expected_logprob)


def test_reserved_layer_holds_what_the_dynamic_layer_holds():
    plain, reserved = DynamicLayer(), ReservedLayer(room=3)
    g = torch.Generator().manual_seed(0)
    rows = slice(None)
    for i, n in enumerate([5, 1, 1, 1, 1, 1, 1]):  # past the room: it reserves again
        k = torch.randn(2, 3, n, 4, generator=g)[rows]
        a, b = plain.update(k, -k), reserved.update(k, -k)
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and reserved.get_seq_length() == plain.get_seq_length()
        if i == 2:  # what beam search and row selection do: the next update starts from the new tensors
            plain.batch_select_indices(torch.tensor([1]))
            reserved.batch_select_indices(torch.tensor([1]))
            rows = slice(1, 2)
        if i == 4:
            plain.crop(-2)
            reserved.crop(-2)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_new_tokens=10),
    SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, n=2, seed=4),
], ids=["greedy", "sampled"])
def test_generation_with_reserved_room_equals_the_dynamic_cache(tiny_generator, params, monkeypatch):
    prompts = ["Hello", "The capital of France is a city that", "Write a list:"]
    reserved = tiny_generator.generate(prompts, params)
    monkeypatch.setattr(hf_backend, "reserve_room", lambda cache, room: cache)
    assert tiny_generator.generate(prompts, params) == reserved
