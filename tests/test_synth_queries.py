"""Query mining (ALMoST Appendix C.1): parsing, filters, Rouge-L dedup, and a mining run on tiny:llama."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import run_config
from rouge_score import rouge_scorer

from almost_ray.data.sources import read_rows
from almost_ray.synth import queries as mining
from almost_ray.synth.config import QueriesConfig
from almost_ray.synth.queries import (
    RougeDedup,
    build_prompt,
    draw_shots,
    load_seeds,
    parse_queries,
    query_issue,
    split_instruction,
)


def test_parse_first_line_continues_the_open_query():
    completion = " How do I fix a flat bicycle tyre?\nQuery: What is a good name for a goldfish?\nQuery: Why"
    assert parse_queries(completion) == [
        "How do I fix a flat bicycle tyre?", "What is a good name for a goldfish?", "Why"]


def test_parse_stops_when_the_model_drifts_and_cuts_inline_queries():
    completion = "Can you explain tides? Query: another one\nAnswer: Tides are caused by the moon.\nQuery: Ignored?"
    assert parse_queries(completion) == ["Can you explain tides?"]
    assert parse_queries("\nQuery: What is jazz?") == ["What is jazz?"]
    assert parse_queries("   \n") == []
    assert parse_queries("query : lower-case prefix works too?", prefix="Query:") == []
    assert parse_queries(" first?\nquery: second one?") == ["first?", "second one?"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Can you describe the image I sent you earlier today?", "banned_word"),
        ("Please draw a graph of my monthly spending this year.", "banned_word"),
        ("Which VIDEOS should I watch to learn how to juggle?", "banned_word"),
        ("Describe the pictures of the Eiffel Tower in detail.", "banned_word"),
        ("Why?", "too_short"),
        ("How " + "very " * 60 + "tall is the Eiffel Tower?", "too_long"),
        ("Can you tell me how to make a good cup of green tea at", "unfinished"),
    ],
)
def test_query_filters(text, reason):
    assert query_issue(text, QueriesConfig()) == reason


def test_banned_words_are_whole_words():
    cfg = QueriesConfig()
    assert query_issue("Can you imagine a world without electricity?", cfg) is None
    assert query_issue("What is the capital city of Australia, and why?", cfg) is None
    assert query_issue("Can you imagine a world without electricity?", QueriesConfig(banned_words=["imagine"])) == (
        "banned_word"
    )


def test_rouge_dedup_keeps_the_first_of_near_duplicates():
    a = "How can I bake a loaf of sourdough bread at home?"
    b = "How do I bake a loaf of sourdough bread at home?"
    c = "What is the tallest mountain in Africa?"
    dedup = RougeDedup(0.5)
    assert [dedup.offer(t)[0] for t in (a, b, c)] == [True, False, True]
    assert [t for t, _ in dedup.kept] == [a, c]
    dedup = RougeDedup(0.5)
    assert [dedup.offer(t)[0] for t in (b, a, c)] == [True, False, True]
    assert [t for t, _ in dedup.kept] == [b, c]
    # seeds count as kept: a query too close to a seed is dropped
    assert RougeDedup(0.5, initial=[a]).offer(b) == (False, pytest.approx(0.9, abs=0.01))


def test_rouge_dedup_drops_a_query_at_exactly_the_threshold():
    """Keep only if Rouge-L < threshold (strict): F = 0.5 exactly is a near-duplicate at 0.5."""
    a, b = "apple banana cherry date", "apple banana egg fig"  # LCS 2 of 4 and 4: P = R = F = 0.5
    assert rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure == 0.5
    assert RougeDedup(0.5, initial=[a]).offer(b) == (False, 0.5)
    assert RougeDedup(0.51, initial=[a]).offer(b)[0] is True


def test_rouge_dedup_is_order_stable_and_matches_brute_force():
    rng = random.Random(0)
    words = "how what why can you tell me the a best way to make cook learn fix bread tea bike car sleep".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(120)]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = []
    for t in texts:  # the definition, with the public scorer and no pruning
        if all(scorer.score(k, t)["rougeL"].fmeasure < 0.5 for k in expected):
            expected.append(t)
    for _ in range(2):
        dedup = RougeDedup(0.5)
        kept = [t for t in texts if dedup.offer(t)[0]]
        assert kept == expected
    assert 1 < len(expected) < len(texts)


def test_shots_and_prompt():
    seeds = [f"seed {i}?" for i in range(10)]
    mined = [f"mined {i}?" for i in range(5)]
    shots = draw_shots(random.Random("0/0"), seeds, mined, static=7, dynamic=3)
    assert len(shots) == 10 and len(set(shots)) == 10
    assert sum(s.startswith("mined") for s in shots) == 3
    assert shots == draw_shots(random.Random("0/0"), seeds, mined, static=7, dynamic=3)
    # before anything is mined, seeds fill the dynamic slots
    assert all(s.startswith("seed") for s in draw_shots(random.Random(1), seeds, [], 7, 3))
    prompt = build_prompt("Write a query.", ["A?", "B?"])
    assert prompt == "Write a query.\n\nQuery: A?\nQuery: B?\nQuery:"


def test_seeds_take_the_instruction_line():
    instruction, seeds = split_instruction("### Instruction: Please write a query.\nFirst?\n\nSecond?\n".splitlines())
    assert instruction == "Please write a query." and seeds == ["First?", "Second?"]
    assert split_instruction(["Only?"]) == (None, ["Only?"])


def test_seeds_in_any_source_form(tmp_path):
    (tmp_path / "seeds.jsonl").write_text('{"text": "First?"}\n{"text": "Second?"}\n')
    assert load_seeds(str(tmp_path / "seeds.jsonl")) == (None, ["First?", "Second?"])
    import datasets

    datasets.Dataset.from_list([{"question": "A?"}, {"question": "B?"}]).to_parquet(str(tmp_path / "s.parquet"))
    assert load_seeds(f"{tmp_path / 's.parquet'}?columns=question:text") == (None, ["A?", "B?"])


def test_seeds_of_alMoST_file(shared_data):
    instruction, seeds = load_seeds(str(shared_data / "almost" / "seed_prompts.txt"))
    assert instruction.startswith("Please generate") and len(seeds) == 100


def _cfg(tmp_path, **kw) -> QueriesConfig:
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join([
        "How do I clean a cast iron pan?", "What is the tallest building in the world?",
        "Can you suggest a name for my new puppy?", "Why do leaves change colour in autumn?",
        "How long should I boil an egg?", "What are some tips for a first marathon?",
        "Could you explain how vaccines work?", "What should I cook for a picnic?",
    ]) + "\n")
    base = dict(
        seeds=str(seeds), target=6, prompts_per_round=4, max_rounds=6, static_shots=3, dynamic_shots=2,
        min_chars=1, end_chars="", banned_words=[], rouge_threshold=0.7, shard_size=2,
        model={"ref": "tiny:llama", "dtype": "float32", "max_batch_size": 4},
        sampling={"max_new_tokens": 16}, resources={"concurrency": 1, "num_cpus": 1, "batch_size": 2},
    )
    base.update(kw)
    return QueriesConfig.model_validate(base)


def test_mining_on_tiny_llama_is_deterministic_and_resumes(tmp_path, ray_local, monkeypatch):
    cfg = _cfg(tmp_path)

    def mine(section: QueriesConfig, folder: str) -> Path:
        stage_dir = mining.run(run_config(tmp_path, queries=section.model_copy(update={"output_dir": tmp_path / folder})))
        return stage_dir / "queries.jsonl"

    out = mine(cfg, "one")
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(mined) == cfg.target
    assert all(q["source"] == "mined" and q["text"].strip() for q in mined)
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == cfg.target and manifest["counts"]["completions"] % 4 == 0
    rounds = manifest["counts"]["rounds"]
    metrics = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(rounds))

    # two replicas and bigger batches: same queries
    cfg2 = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"concurrency": 2, "batch_size": 1})})
    out2 = mine(cfg2, "two")
    assert [q["text"] for q in read_rows(out2)] == [q["text"] for q in mined]

    # an interrupted run (outputs gone, rounds kept) replays its rounds without generating anything
    (tmp_path / "one" / "manifest.json").unlink()
    out.unlink()

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished round was generated again")

    monkeypatch.setattr("almost_ray.cluster.replicas.ReplicaSet._start", no_generation)
    again = mine(cfg, "one")
    assert [q["text"] for q in read_rows(again)] == [q["text"] for q in mined]
    assert all(m["replayed"] for m in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()))
