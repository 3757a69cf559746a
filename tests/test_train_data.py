"""Rendering and assistant-only masks, the global-batch plan, and preference-pair parsing."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from almost_ray.data.preferences import load_pairs, pair_from_record, parse_human_assistant, split_hh
from almost_ray.data.records import RecordError
from almost_ray.prompts.templates import human_assistant, tulu
from almost_ray.train.config import TrainSFTConfig
from almost_ray.train.data import global_batches, rank_micro_batches
from almost_ray.train.losses import IGNORE_INDEX
from almost_ray.train.sft import encode_conversations, load_conversations, render

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from almost_ray.models.loading import load_tokenizer

    return load_tokenizer("tiny:llama", padding_side="right")


def test_render_matches_generation_templates():
    text, spans = render(TWO_TURNS, "human_assistant")
    assert text == human_assistant(TWO_TURNS, add_generation_prompt=False)
    assert [text[a:b] for a, b in spans] == [" Paris.", " Rome, since 1871."]
    # the prompt generation sees for the second reply is a prefix of the training text
    assert text.startswith(human_assistant(TWO_TURNS[:3]))
    text, spans = render(TWO_TURNS, "tulu")
    assert text.startswith(tulu(TWO_TURNS[:3]))
    assert [text[a:b] for a, b in spans] == ["Paris.", "Rome, since 1871."]


def test_assistant_only_mask_on_two_turn_dialogue(tokenizer):
    cfg = TrainSFTConfig(model="tiny:llama", max_length=256)
    (ex,) = encode_conversations([TWO_TURNS], tokenizer, cfg)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))  # a label is its token or ignored
    # exactly the two replies and the closing EOS carry loss; no prefix, no user text
    assert tokenizer.decode(supervised) == " Paris. Rome, since 1871." + tokenizer.eos_token
    masked = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    assert masked == "\n\nHuman: What is the capital of France?\n\nAssistant:\n\nHuman: And of Italy?\n\nAssistant:"


def test_response_tuning_empties_the_instruction(tokenizer):
    cfg = TrainSFTConfig(model="tiny:llama", mode="response_tuning")
    assert (cfg.prompt_format, cfg.lr, cfg.warmup_ratio, cfg.global_batch_size) == ("tulu", 1e-5, 0.1, 64)
    (ex,) = encode_conversations([TWO_TURNS[:2]], tokenizer, cfg)
    assert tokenizer.decode(ex["input_ids"]) == "<|user|>\n\n<|assistant|>\nParis." + tokenizer.eos_token
    learned = [t for t in ex["labels"].tolist() if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Paris." + tokenizer.eos_token


def test_truncation_drops_dialogues_without_supervised_tokens(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    cfg = TrainSFTConfig(model="tiny:llama", max_length=32)
    assert encode_conversations([long_prompt], tokenizer, cfg) == []
    (ex,) = encode_conversations([TWO_TURNS], tokenizer, cfg)
    assert len(ex["input_ids"]) == 32


def test_load_conversations_formats_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"messages": TWO_TURNS}) + "\n" + json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    convs = load_conversations(good)
    assert convs[1] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": TWO_TURNS}) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: messages.0.role"):
        load_conversations(bad)
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(RecordError, match="none.jsonl:1: messages: no assistant turn"):
        load_conversations(none)


def test_global_batches_cover_each_epoch_and_bucket_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=100).tolist()
    plan = global_batches(lengths, batch_size=8, epochs=2, seed=3)
    assert plan == global_batches(lengths, batch_size=8, epochs=2, seed=3)
    assert len(plan) == 2 * 13 and sorted(len(b) for b in plan)[:2] == [4, 4]
    assert Counter(i for b in plan for i in b) == Counter({i: 2 for i in range(100)})
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    shuffled = [list(rng.permutation(100)[k : k + 8]) for k in range(0, 100, 8)] * 2
    padded_random = sum(len(b) * max(lengths[i] for i in b) for b in shuffled)
    assert padded < 0.75 * padded_random


def test_rank_micro_batches_split_every_batch_evenly():
    lengths = list(range(100, 0, -1))
    batch = [3, 17, 42, 8, 99, 51, 60]
    for world in (1, 2, 3):
        shares = [rank_micro_batches(batch, lengths, r, world, micro_batch_size=2) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # same number of forward passes on every worker
        assert sorted(i for s in shares for piece in s for i in piece) == sorted(batch)
        assert all(len(piece) <= 2 for s in shares for piece in s)
    # a global batch smaller than the world leaves a worker an empty (zero-weight) piece
    assert rank_micro_batches([5], lengths, 1, 2, micro_batch_size=4) == [[]]


def test_hh_dialogues_split_at_the_last_assistant_turn():
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue, like the sky."
    assert split_hh(text) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue, like the sky."},
    ]
    assert human_assistant(split_hh(text), add_generation_prompt=False) == text


def test_comparison_prompt_forms():
    plain = pair_from_record({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."})
    assert plain.chosen == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    rendered = pair_from_record({"prompt": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Colour?", "chosen": "Red",
                                 "rejected": "?"})
    assert rendered.rejected == [*parse_human_assistant("\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Colour?"),
                                 {"role": "assistant", "content": "?"}]
    trl = pair_from_record({"prompt": [{"role": "user", "content": "Q"}],
                            "chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]})
    assert trl.chosen_response == "A" and trl.rejected_response == "B"


def test_load_pairs_names_file_line_and_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(RecordError, match=r"c.jsonl:3: rejected: field required"):  # blank lines count
        load_pairs(path)
    path.write_text(json.dumps({"chosen": "no turns here", "rejected": "x"}) + "\n")
    with pytest.raises(RecordError, match=r"c.jsonl:1: chosen: not an HH-RLHF dialogue"):
        load_pairs(path)


def test_hh_file_reads(shared_data):
    pairs = load_pairs(shared_data / "hh_helpful_base_test_500.jsonl")
    assert len(pairs) == 500
    assert all(p.chosen[-1]["role"] == "assistant" and p.chosen[0]["role"] == "user" for p in pairs)


def test_stack_exchange_pairs_read_for_the_as_is_rm(tmp_path, tokenizer):
    """ALMoST's As-is RM is trained on paired StackExchange answers: response_j is the preferred one."""
    from almost_ray.models.reward import rm_text
    from almost_ray.train.rm import encode_pairs

    path = tmp_path / "se.jsonl"
    rows = [{"qid": 1, "question": "How do I reverse a list?", "date": "2020", "metadata": [],
             "response_j": "Use reversed(xs).", "response_k": "You cannot."},
            {"qid": 2, "question": "Tabs or spaces?", "response_j": "Spaces.", "response_k": "Tabs."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(path)
    assert pairs[0].chosen == [{"role": "user", "content": "How do I reverse a list?"},
                               {"role": "assistant", "content": "Use reversed(xs)."}]
    assert pairs[0].rejected_response == "You cannot." and pairs[1].chosen_response == "Spaces."
    encoded = encode_pairs(pairs, tokenizer, max_length=64)  # what `train-rm` trains on
    assert encoded[0]["chosen"].tolist() == tokenizer(rm_text(pairs[0].chosen), add_special_tokens=False).input_ids

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "response_j": "a"}) + "\n")
    with pytest.raises(RecordError, match=r"se.jsonl:2: response_k: field required"):
        load_pairs(path)
    path.write_text(json.dumps({"question": "q", "response_j": 3, "response_k": "b"}) + "\n")
    with pytest.raises(RecordError, match=r"se.jsonl:1: response_j: expected a string, got int"):
        load_pairs(path)
    path.write_text(json.dumps({"question": " ", "response_j": "a", "response_k": "b"}) + "\n")
    with pytest.raises(RecordError, match=r"se.jsonl:1: question: empty"):
        load_pairs(path)
