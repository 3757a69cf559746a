"""The 3-rule adapter (Hewitt et al. Section 6, Table 8): exact rule math, token resolution, HF and vLLM plumbing."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from almost_ray.adapters.config import RulesConfig, TokenBias
from almost_ray.adapters.rules import (
    RULES_EXTRA_ARG,
    RULES_VLLM_PROCESSOR,
    RulesLogitsProcessor,
    RuleTables,
    eos_bonus,
    resolve_strings,
    token_surfaces,
)
from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.models.loading import load_tokenizer, resolve_model_dir


@pytest.fixture(scope="module")
def smollm_tokenizer():
    return load_tokenizer("tiny:llama")  # SmolLM2's real byte-level BPE tokenizer


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A second, SentencePiece-style tokenizer (Llama-2's convention: '▁' marks a space), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["I think We should go. What is it? I should say I am here!", "We like <b> tags | and * lists",
              "Should we? I said: what should I do", "# Title\n## Section\n- item one\n- item two"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_eos_bonus_follows_listing_1():
    cfg = RulesConfig()
    assert eos_bonus(0, cfg) == 0.0
    assert eos_bonus(1, cfg) == pytest.approx(15 / 250)
    assert eos_bonus(100, cfg) == pytest.approx(6.0)
    assert eos_bonus(249, cfg) == pytest.approx(15 * 249 / 250)
    assert eos_bonus(250, cfg) == 0.0  # the paper's code gives nothing from the horizon on
    assert eos_bonus(400, cfg.model_copy(update={"eos_hold_after_horizon": True})) == 15.0


def test_strings_resolve_through_smollm2_tokenizer(smollm_tokenizer):
    tok = smollm_tokenizer
    ids = resolve_strings(token_surfaces(tok), [" I", "I", " should", "\n", "   ", "<"])
    # byte-level BPE spells a leading space 'Ġ' and a newline 'Ċ'
    assert ids[" I"] == [tok.convert_tokens_to_ids("ĠI")]
    assert ids["I"] == [tok.convert_tokens_to_ids("I")]
    assert ids[" should"] == [tok.convert_tokens_to_ids("Ġshould")]
    assert ids["\n"] == [tok.convert_tokens_to_ids("Ċ")]
    assert ids["   "] == [tok.convert_tokens_to_ids("ĠĠĠ")]
    assert ids["<"] == [tok.convert_tokens_to_ids("<")]


def test_strings_resolve_through_a_sentencepiece_style_tokenizer(metaspace_tokenizer):
    tok = metaspace_tokenizer
    surfaces = token_surfaces(tok)
    ids = resolve_strings(surfaces, [" I", "I", " should", " We", "We"])
    # '▁I' is "I" after a space; the bare 'I' piece is "I" glued to what precedes it
    assert ids[" I"] == [tok.convert_tokens_to_ids("▁I")]
    assert ids["I"] == [tok.convert_tokens_to_ids("I")]
    assert ids[" should"] == [tok.convert_tokens_to_ids("▁should")]
    assert ids[" We"] == [tok.convert_tokens_to_ids("▁We")]
    assert ids["We"] == []  # every "We" of the corpus follows a space: no bare piece to bias
    tables = RuleTables.from_tokenizer(tok, RulesConfig())
    assert tables.bias[tok.convert_tokens_to_ids("▁I")] == -5.0
    assert tables.bias[tok.convert_tokens_to_ids("▁We")] == -3.0  # Listing 1 biases word-initial "▁We"
    assert tables.eos_ids == [tok.convert_tokens_to_ids("</s>")]
    strict = RuleTables.from_tokenizer(tok, RulesConfig(biases=[TokenBias(strings=["We"], weight=-3.0)]))
    assert strict.unresolved == ["We"]  # strings with no single token here are reported, not guessed


def test_each_rule_contributes_exactly_on_a_fixed_logit_vector(smollm_tokenizer):
    tok = smollm_tokenizer
    cfg = RulesConfig(enabled=True)
    tables = RuleTables.from_tokenizer(tok, cfg, vocab_size=len(tok))
    torch.manual_seed(0)
    logits = torch.randn(1, len(tok)) * 3
    response = torch.tensor([[100, 200, 100, 300]])  # 4 tokens so far, 3 distinct
    prompt = torch.tensor([[7, 8]])  # no user tag: rule 3's scope is the whole prompt, as in Listing 1
    out = RulesLogitsProcessor(tables, prompt)(torch.cat([prompt, response], 1), logits)

    # p_a ∝ p_base * exp(r): out - log p_base - r is one constant, and out is normalised
    delta = out[0] - torch.log_softmax(logits[0], -1)
    r = torch.zeros(len(tok))
    resolved = resolve_strings(token_surfaces(tok), [s for row in cfg.biases for s in row.strings])
    for row in cfg.biases:
        for s in row.strings:
            r[resolved[s]] = row.weight
    r[[7, 8, 100, 200, 300]] += -1.5  # rule 3, once per distinct token
    r[tok.eos_token_id] = 15 * 4 / 250  # rule 1 after 4 tokens
    const = delta - r
    assert torch.allclose(const, const[0].expand_as(const), atol=1e-4)
    assert torch.logsumexp(out[0], -1).item() == pytest.approx(0.0, abs=1e-5)

    # rule by rule, each read off against the same base
    i_space = tok.convert_tokens_to_ids("ĠI")
    excl = tok.convert_tokens_to_ids("!")
    neutral = 5000
    assert (delta[i_space] - delta[neutral]).item() == pytest.approx(-5.0, abs=1e-4)
    assert (delta[excl] - delta[neutral]).item() == pytest.approx(1.0, abs=1e-4)
    assert (delta[tok.eos_token_id] - delta[neutral]).item() == pytest.approx(0.24, abs=1e-4)
    assert (delta[100] - delta[neutral]).item() == pytest.approx(-1.5, abs=1e-4)


def test_rules_can_be_ablated_one_by_one(smollm_tokenizer):
    tok = smollm_tokenizer
    cfg = RulesConfig(enabled=True, eos_weight=0.0, biases=[], repeat_penalty=0.0)
    tables = RuleTables.from_tokenizer(tok, cfg)
    logits = torch.randn(2, len(tok))
    out = tables.apply(logits, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert torch.allclose(out, torch.log_softmax(logits, -1), atol=1e-5)  # no rules: the base model


def test_custom_bias_and_wider_logits(smollm_tokenizer):
    tok = smollm_tokenizer
    cfg = RulesConfig(enabled=True, biases=[TokenBias(strings=[" cat"], weight=2.5)], eos_weight=0, repeat_penalty=0)
    tables = RuleTables.from_tokenizer(tok, cfg)
    logits = torch.zeros(1, len(tok) + 64)  # padded embeddings: the extra columns get no rule
    r = tables.scores(torch.zeros(1, 0, dtype=torch.long), logits.shape[-1])
    assert r.shape == (1, len(tok) + 64)
    assert r[0, tok.convert_tokens_to_ids("Ġcat")] == 2.5
    assert r.abs().sum().item() == pytest.approx(2.5)


def test_hf_backend_applies_the_rules_from_model_config():
    from almost_ray.models.hf_backend import HFGenerator

    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    base = HFGenerator(ModelConfig(ref="tiny:llama", dtype="float32"), device="cpu")
    prompt = ["The weather today is"]
    plain_ids = base.tokenizer(base.generate(prompt, greedy)[0][0], add_special_tokens=False).input_ids
    assert len(plain_ids) > len(set(plain_ids))  # the random model repeats itself ...

    no_repeats = RulesConfig(enabled=True, eos_weight=0, biases=[], repeat_penalty=-1e4)
    gen = HFGenerator(ModelConfig(ref="tiny:llama", dtype="float32", rules=no_repeats), device="cpu")
    out = gen.model.generate(**gen.tokenizer(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False,
                             logits_processor=[gen._rules_processor(gen.tokenizer(prompt, return_tensors="pt")
                                                                    .input_ids)])
    new = out[0, -12:].tolist()
    assert len(new) == len(set(new))  # ... and never does under rule 3 at -1e4

    stop_soon = RulesConfig(enabled=True, eos_weight=1e4, eos_horizon=1, eos_hold_after_horizon=True, biases=[],
                            repeat_penalty=0)
    gen.config = gen.config.model_copy(update={"rules": stop_soon})
    gen._rules = None
    text = gen.generate(prompt, greedy)[0][0]
    assert len(gen.tokenizer(text, add_special_tokens=False).input_ids) <= 1  # EOS forced after one token


def test_vllm_kwargs_carry_the_rules():
    from almost_ray.models.vllm_backend import vllm_engine_kwargs, vllm_sampling_kwargs

    rules = RulesConfig(enabled=True)
    kw = vllm_sampling_kwargs(SamplingParams(temperature=0), "hi", rules)
    assert RulesConfig.model_validate(kw["extra_args"][RULES_EXTRA_ARG]) == rules
    assert "extra_args" not in vllm_sampling_kwargs(SamplingParams(), "hi", RulesConfig())
    engine = vllm_engine_kwargs(ModelConfig(ref="tiny:llama", rules=rules))
    assert engine["logits_processors"] == [RULES_VLLM_PROCESSOR]
    assert "logits_processors" not in vllm_engine_kwargs(ModelConfig(ref="tiny:llama"))


def test_vllm_processor_against_the_documented_adapter_api(monkeypatch, smollm_tokenizer):
    """vLLM is not installable here: a stand-in for its `AdapterLogitsProcessor` base class (the
    documented V1 contract: `__init__(vllm_config, device, is_pin_memory)`, `new_req_logits_processor(params)`
    returning `(output_ids, logits_row) -> logits_row` or None) checks our subclass's side of it."""

    class AdapterLogitsProcessor:
        def __init__(self, vllm_config, device, is_pin_memory):
            self.req_info = {}

    fake = types.ModuleType("vllm.v1.sample.logits_processor")
    fake.AdapterLogitsProcessor = AdapterLogitsProcessor
    for name in ("vllm", "vllm.v1", "vllm.v1.sample"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.v1.sample.logits_processor", fake)
    monkeypatch.delitem(sys.modules, "almost_ray.adapters.rules_vllm", raising=False)
    import importlib

    module_name, cls_name = RULES_VLLM_PROCESSOR.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    model_config = types.SimpleNamespace(tokenizer=str(resolve_model_dir("tiny:llama")),
                                         model=str(resolve_model_dir("tiny:llama")),
                                         get_vocab_size=lambda: len(smollm_tokenizer))
    proc = cls(types.SimpleNamespace(model_config=model_config), torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False
    assert proc.new_req_logits_processor(types.SimpleNamespace(extra_args=None)) is None
    rules = RulesConfig(enabled=True)
    params = types.SimpleNamespace(extra_args={RULES_EXTRA_ARG: rules.model_dump(mode="json")})
    cls.validate_params(params)
    with pytest.raises(ValueError, match=RULES_EXTRA_ARG):
        cls.validate_params(types.SimpleNamespace(extra_args={RULES_EXTRA_ARG: {"eos_horizon": 0}}))
    row_fn = proc.new_req_logits_processor(params)
    logits = torch.randn(len(smollm_tokenizer))
    prompt = smollm_tokenizer("<|user|>\nhi\n<|assistant|>\n", add_special_tokens=False).input_ids
    tables = RuleTables.from_tokenizer(smollm_tokenizer, rules)
    scoped = [torch.tensor(prompt[tables.repeat_start(prompt):] + [3, 4])]
    expected = tables.apply(logits[None], torch.tensor([[3, 4]]), scoped)[0]
    assert torch.allclose(row_fn(prompt, [3, 4], logits), expected, atol=1e-5)


@pytest.mark.slow
def test_rules_make_the_embedded_model_stop_sooner_and_repeat_less():
    """Greedy decoding of the embedded model on a fixed prompt, with and without the adapter."""
    from almost_ray.models.hf_backend import HFGenerator
    from almost_ray.prompts.templates import render_prompt

    greedy = SamplingParams(temperature=0, max_new_tokens=160)
    base = HFGenerator(ModelConfig(ref="embedded:smollm2-135m-instruct", dtype="float32"), device="cpu")
    prompt = [render_prompt("human_assistant", [{"role": "user", "content": "Give me some tips for a healthy life."}])]
    params = greedy.model_copy(update={"stop": ["\nHuman:"]})
    plain = base.generate(prompt, params)[0][0]
    base.config = base.config.model_copy(update={"rules": RulesConfig(enabled=True)})
    ruled = base.generate(prompt, params)[0][0]

    def stats(text: str) -> tuple[int, float]:
        ids = base.tokenizer(text, add_special_tokens=False).input_ids
        return len(ids), 1 - len(set(ids)) / len(ids)

    (n_plain, rep_plain), (n_ruled, rep_ruled) = stats(plain), stats(ruled)
    assert n_ruled < n_plain
    assert rep_ruled < rep_plain


USER_TAG, ASSISTANT_TAG = "<|user|>", "<|assistant|>"
# Listing 1 (Hewitt et al., the released combined_model.py), rule 2 as Llama-2 pieces written as text.
LISTING1_BIASES = {"<": -4, " <": -4, "|": -4, " I": -5, "I": -5, " We": -3, "What": -5, " should": -6,
                   " *": 1, " -": 1, "   ": 1, " #": 1, " ##": 1, "\n": 1, "!": 1}


def listing1_scores(tok, idlist: list[int], vocab: int) -> torch.Tensor:
    """Listing 1's forward pass for one sequence, written out from the paper (not from our adapter).

    The tag searches take the ids of "\\n{TAG}\\n" without those of "\\n<" (the 5 last ids on Llama-2,
    which Listing 1 hard-codes as `[-5:]`); here that is the last 5 as well (see the assert).
    """
    output = torch.zeros(vocab)
    for text, weight in LISTING1_BIASES.items():
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) == 1:  # a single piece of this vocabulary
            output[ids[0]] = weight
    user_start_tag = tok(f"\n{USER_TAG}\n", add_special_tokens=False)["input_ids"][-5:]
    assistant_start_tag = tok(f"\n{ASSISTANT_TAG}\n", add_special_tokens=False)["input_ids"][-6:]
    first_token_index = next((i + 5 for i in range(len(idlist)) if idlist[i : i + 5] == user_start_tag), None)
    for w in set(idlist[first_token_index:]):
        output[w] -= 1.5
    prefix_len = len(idlist) - next(i + 6 for i in range(len(idlist)) if idlist[i : i + 6] == assistant_start_tag)
    if 0 < prefix_len < 250:
        output[tok.eos_token_id] = max(0, prefix_len / 250) * 15
    return output


def test_default_rules_reproduce_listing1_step_by_step(smollm_tokenizer):
    """Every decoding step's logit change equals Listing 1's rule scores (word-initial ' We', 'What' -5,
    the repetition penalty on the instruction's tokens too)."""
    tok = smollm_tokenizer
    assert tok(f"\n{USER_TAG}\n", add_special_tokens=False).input_ids[-5:] == \
        tok(f"\n{USER_TAG}\n", add_special_tokens=False).input_ids[len(tok("\n<", add_special_tokens=False).input_ids):]
    from almost_ray.prompts.templates import tulu

    prompt = tulu([{"role": "user", "content": "What should We cook tonight? I like rice!"}])
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    response = tok(" We could cook rice. What rice? I like rice", add_special_tokens=False).input_ids
    tables = RuleTables.from_tokenizer(tok, RulesConfig(enabled=True), vocab_size=len(tok))
    proc = RulesLogitsProcessor(tables, torch.tensor([prompt_ids]))
    torch.manual_seed(0)
    for step in range(len(response) + 1):
        ids = prompt_ids + response[:step]
        logits = torch.randn(1, len(tok))
        ours = proc(torch.tensor([ids]), logits)[0]
        reference = listing1_scores(tok, ids, len(tok))
        expected = torch.log_softmax(torch.log_softmax(logits[0], -1) + reference, -1)
        assert torch.allclose(ours, expected, atol=1e-5), f"step {step}"
    assert tables.bias[tok(" We", add_special_tokens=False).input_ids[0]] == -3.0


def test_repeat_scope_options_and_table8_what(smollm_tokenizer):
    tok = smollm_tokenizer
    from almost_ray.adapters.config import WHAT_WEIGHT_TABLE8
    from almost_ray.prompts.templates import tulu

    turns = [{"role": "user", "content": "apple"}, {"role": "assistant", "content": "banana"},
             {"role": "user", "content": "cherry"}]
    ids = tok(tulu(turns), add_special_tokens=False).input_ids
    word = lambda w: tok(w, add_special_tokens=False).input_ids[0]  # noqa: E731
    last = RuleTables.from_tokenizer(tok, RulesConfig(enabled=True))
    start = last.repeat_start(ids)
    assert word("cherry") in ids[start:] and word("apple") not in ids[start:]  # after the LAST user tag
    response_only = RuleTables.from_tokenizer(tok, RulesConfig(enabled=True, repeat_scope="response"))
    assert response_only.repeat_start(ids) == len(ids)
    table8 = RulesConfig(biases=[TokenBias(strings=["What"], weight=WHAT_WEIGHT_TABLE8)])
    assert RuleTables.from_tokenizer(tok, table8).bias[word("What")] == -3.0


def test_eos_ids_are_shared_by_both_backends(tmp_path, monkeypatch, smollm_tokenizer):
    """The generation config's EOS list, not only tokenizer.eos_token_id, in HF and in the vLLM processor;
    the vLLM processor places its bias on the device once and reuses it every step."""
    from transformers import GenerationConfig

    from almost_ray.models.loading import eos_token_ids

    tok = smollm_tokenizer
    assert eos_token_ids(tok) == [tok.eos_token_id]
    assert eos_token_ids(tok, GenerationConfig(eos_token_id=[7, tok.eos_token_id, 7])) == sorted({7, tok.eos_token_id})
    assert eos_token_ids(tok, GenerationConfig(eos_token_id=9)) == [9]
    GenerationConfig(eos_token_id=[tok.eos_token_id, 7]).save_pretrained(tmp_path)

    class AdapterLogitsProcessor:
        def __init__(self, vllm_config, device, is_pin_memory):
            pass

    fake = types.ModuleType("vllm.v1.sample.logits_processor")
    fake.AdapterLogitsProcessor = AdapterLogitsProcessor
    for name in ("vllm", "vllm.v1", "vllm.v1.sample"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.v1.sample.logits_processor", fake)
    monkeypatch.delitem(sys.modules, "almost_ray.adapters.rules_vllm", raising=False)
    from almost_ray.adapters.rules_vllm import RulesAdapterProcessor

    model_config = types.SimpleNamespace(tokenizer=str(resolve_model_dir("tiny:llama")), model=str(tmp_path),
                                         get_vocab_size=lambda: len(tok))
    device = torch.device("cpu")
    proc = RulesAdapterProcessor(types.SimpleNamespace(model_config=model_config), device, False)
    assert proc.eos_ids == sorted({7, tok.eos_token_id})
    rules = RulesConfig(enabled=True)
    row_fn = proc.new_req_logits_processor(
        types.SimpleNamespace(extra_args={RULES_EXTRA_ARG: rules.model_dump(mode="json")}))
    tables = row_fn.__self__
    assert tables.eos_ids == proc.eos_ids
    placed = tables.bias_on(device, len(tok))
    moves = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moves.append(self.shape) or real_to(self, *a, **k))
    for step in range(3):
        out = row_fn([1, 2], list(range(10, 10 + step)), torch.randn(len(tok)))
        assert out[7] > -float("inf")
    assert tables.bias_on(device, len(tok)) is placed
    assert (len(tok),) not in moves  # the vocabulary-wide bias was not copied at any step
