"""The HF generator on tiny:llama: batching, sampling, stop strings and log-likelihood."""

import pytest
import torch

from almost_ray.models.config import SamplingParams
from almost_ray.models.sampling import SeededSampler
from almost_ray.models.text import encode_pair, prompt_seed, truncate_at_stop

PROMPTS = ["Hello", "The capital of France is a city that", "Write a list:", "Q: What is two plus two?\nA:"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


def test_left_padded_batch_equals_one_at_a_time(tiny_generator):
    batched = tiny_generator.generate(PROMPTS, GREEDY)
    single = [tiny_generator.generate([p], GREEDY)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(out) == 1 and out[0] for out in batched)


def test_n_samples_per_prompt_in_input_order(tiny_generator):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=1)
    out = tiny_generator.generate(PROMPTS[:2], params)
    assert [len(o) for o in out] == [3, 3]
    assert len(set(out[0])) > 1  # distinct seeds per sample
    # each prompt's samples equal what that prompt gets alone: order is kept, rows are independent
    assert tiny_generator.generate(PROMPTS[1:2], params)[0] == out[1]


def test_sampling_is_seeded_per_prompt_not_per_batch(tiny_generator):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    a = tiny_generator.generate(PROMPTS, params)
    b = tiny_generator.generate(list(reversed(PROMPTS)), params)
    assert a == list(reversed(b))
    c = tiny_generator.generate(PROMPTS, params.model_copy(update={"seed": 8}))
    assert a != c


def test_a_checkpoint_saved_without_cache_still_decodes_one_token_per_step(tiny_generator):
    """A trained model's generation config says use_cache false (training turned it off); generating
    must still feed one new token per step, not the whole sequence again (quadratic and ~4x slower)."""
    model = tiny_generator.model
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, args, kw: widths.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    saved = model.generation_config.use_cache
    model.generation_config.use_cache = False
    try:
        tiny_generator.generate(PROMPTS[:1], GREEDY)
    finally:
        model.generation_config.use_cache = saved
        hook.remove()
    assert len(widths) == GREEDY.max_new_tokens and widths[1:] == [1] * (len(widths) - 1)


def test_stop_string_cuts_the_completion(tiny_generator):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)
    full = tiny_generator.generate([PROMPTS[0]], params)[0][0]
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    cut = tiny_generator.generate([PROMPTS[0]], params.model_copy(update={"stop": [stop]}))[0][0]
    assert cut == full[: full.index(stop)].strip()
    assert stop.strip() not in cut.split()[-1:]


def test_truncate_at_stop_takes_the_earliest():
    assert truncate_at_stop("a\nHuman: b\n\n-----c", ["\n\n-----", "\nHuman:"]) == "a"
    assert truncate_at_stop("no stop here", ["\nHuman:"]) == "no stop here"
    assert truncate_at_stop("x", []) == "x"


def test_prompt_seed_is_stable_and_distinct():
    assert prompt_seed(0, "p", 0) == prompt_seed(0, "p", 0)
    assert len({prompt_seed(0, "p", 0), prompt_seed(0, "p", 1), prompt_seed(1, "p", 0), prompt_seed(0, "q", 0)}) == 4
    assert prompt_seed(0, "p") < 2**63


def test_top_p_keeps_only_the_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = SeededSampler([0], temperature=1.0, top_p=0.6, device=torch.device("cpu"))
    picks = {int(sampler(None, scores.clone()).argmax()) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 < 0.6, so the second token is needed; the rest never drawn
    greedyish = SeededSampler([0], temperature=1.0, top_p=0.4, device=torch.device("cpu"))
    assert {int(greedyish(None, scores.clone()).argmax()) for _ in range(50)} == {0}


def test_loglikelihood_matches_a_hand_computed_forward_pass(tiny_generator):
    tok, model = tiny_generator.tokenizer, tiny_generator.model
    contexts = ["The capital of France is", "Hi", "A much longer context that pads the others in the batch,"]
    continuations = [" Paris", " there friend", " surely"]
    got = tiny_generator.loglikelihood(contexts, continuations)
    for ctx, cont, value in zip(contexts, continuations, got, strict=True):
        c_ids = tok(ctx, add_special_tokens=False).input_ids
        x_ids = tok(ctx + cont, add_special_tokens=False).input_ids[len(c_ids):]
        ids = torch.tensor([c_ids + x_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = sum(logp[len(c_ids) + k - 1, t].item() for k, t in enumerate(x_ids))
        assert value == pytest.approx(expected, abs=1e-4)
    assert all(v < 0 for v in got)


def test_encode_pair_moves_trailing_space_and_handles_empty_context(tiny_generator):
    tok = tiny_generator.tokenizer
    ctx, cont = encode_pair(tok, "The answer is ", "Paris")
    assert tok.decode(ctx) == "The answer is" and tok.decode(cont) == " Paris"
    ctx, cont = encode_pair(tok, "", "Paris")
    assert ctx == [tok.eos_token_id] and tok.decode(cont) == "Paris"
