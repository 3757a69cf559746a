"""The generator ladder and the `compare` stage: pools, prompts, an end-to-end run on tiny:llama, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from almost_ray.cli import main
from almost_ray.config import Config, load_config
from almost_ray.data.records import Comparison
from almost_ray.data.sources import read_rows
from almost_ray.prompts.templates import DIALOGUE_SEPARATOR
from almost_ray.synth import compare, ladder
from almost_ray.synth.config import CompareConfig, RungConfig
from almost_ray.synth.ladder import pool_groups, rung_header, trim_to_sentence

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "raw, trimmed",
    [
        ("The sky is blue. It scatters short waves more than long", "The sky is blue."),
        ('He said "stop!" and left. Then the', 'He said "stop!" and left.'),
        ("Version 2.5 is out! Try it", "Version 2.5 is out!"),
        ("No sentence end here", "No sentence end here"),
        ("  Done.  ", "Done."),
    ],
)
def test_trim_to_sentence(raw, trimmed):
    assert trim_to_sentence(raw) == trimmed


def test_rungs_sharing_a_model_share_a_pool():
    full = {"ref": "embedded:smollm2-135m-instruct"}
    cfg = CompareConfig(ladder=[
        RungConfig(name="a", model=full, prompt="faithful", shots=3),
        RungConfig(name="b", model=full, shots=5),
        RungConfig(name="c", model={**full, "num_layers": 20}, shots=1),
        RungConfig(name="d", model=full, shots=1),
        RungConfig(name="e", model=full, shots=1, resources={"num_gpus": 1}),
    ])
    assert [[r.name for r in g] for g in pool_groups(cfg.ladder)] == [["a", "b", "d"], ["c"], ["e"]]


def test_rung_header_takes_the_first_shots():
    for name in ("faithful", "hhh"):
        rung = RungConfig(name="x", prompt=name, shots=2)
        header = rung_header(rung)
        assert header.count("\n\nHuman:") >= 2 and header.endswith(DIALOGUE_SEPARATOR)
        assert header.count(DIALOGUE_SEPARATOR) == 3
    assert rung_header(RungConfig(name="x", prompt="hhh", shots=0)).count("Human:") == 0
    with pytest.raises(ValueError, match="shots"):
        rung_header(RungConfig(name="x", prompt="faithful", shots=9))


def test_own_prompts_are_original_and_well_formed(shared_data):
    """Our prompts follow ALMoST's block format but are not copies of the paper's."""
    for ours, theirs in (("faithful", "Faithful_prompt.txt"), ("hhh", "HHH_prompt.txt")):
        text = (Path(ladder.__file__).parents[1] / "prompts" / f"{ours}.txt").read_text()
        paper = (shared_data / "almost" / theirs).read_text()
        blocks = [b for b in text.split(DIALOGUE_SEPARATOR)[1:] if b.strip()]
        assert all(b.lstrip("\n").startswith("Human:") for b in blocks)
        assert all(b.rstrip().endswith((".", "!")) for b in blocks)
        ours_lines = {line.strip() for line in text.splitlines() if len(line.strip()) > 30}
        assert not ours_lines & {line.strip() for line in paper.splitlines()}


def test_ladder_config_errors():
    with pytest.raises(ValueError, match="unique"):
        CompareConfig(ladder=[RungConfig(name="a"), RungConfig(name="a")])
    with pytest.raises(ValueError, match="sampling.n"):
        RungConfig(name="a", sampling={"n": 2})
    with pytest.raises(ValueError):
        CompareConfig(ladder=[RungConfig(name="a")])


@pytest.mark.parametrize("name", ["demo.yaml", "paper-llama.yaml"])
def test_shipped_ladders_load(name):
    cfg = load_config(CONFIGS / name)
    assert len(cfg.compare.ladder) >= 3
    for rung in cfg.compare.ladder:
        rung_header(rung)  # every prompt resolves and has enough dialogues
    if name == "paper-llama.yaml":
        assert [r.name[0] for r in cfg.compare.ladder] == list("ABCDE")
        assert len(pool_groups(cfg.compare.ladder)) == 3  # 30B, 13B and 7B: one pool each


TINY = {"ref": "tiny:llama", "dtype": "float32", "max_batch_size": 4}
QUERIES = ["How do I clean a cast iron pan?", "What is the tallest building in the world?",
           "Can you suggest a name for my new puppy?", "Why do leaves change colour in autumn?",
           "How long should I boil an egg?"]


def _config(tmp_path: Path, rm: Path) -> dict:
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(QUERIES)))
    sampling = {"max_new_tokens": 10}
    res = {"concurrency": 1, "num_cpus": 1, "batch_size": 3}
    return {
        "run_name": "t", "runs_dir": str(tmp_path / "runs"),
        "compare": {
            "queries": str(queries), "shard_size": 4,
            "ladder": [
                {"name": "faithful-2", "model": TINY, "prompt": "faithful", "shots": 2, "sampling": sampling,
                 "resources": res},
                {"name": "hhh-1", "model": TINY, "prompt": "hhh", "shots": 1, "sampling": sampling, "resources": res},
                {"name": "hhh-1-l1", "model": {**TINY, "num_layers": 1}, "prompt": "hhh", "shots": 1,
                 "sampling": sampling, "resources": res},
            ],
            # random weights write no sentences: keep only the length rule
            "heuristic_filter": {"min_chars": 0, "required_endings": [], "bad_endings": [], "bad_starts": [],
                                 "bad_patterns": []},
            "as_is_rm": {"ref": str(rm), "dtype": "float32", "resources": res},
        },
    }


def test_compare_end_to_end_on_tiny_llama_and_resume(tmp_path, ray_local, monkeypatch, capsys, tiny_rm):
    raw = _config(tmp_path, tiny_rm)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", "--config", str(path), "--report"]) == 0
    report = capsys.readouterr().out
    stage = tmp_path / "runs" / "t" / "compare"
    assert "comparisons" in report and "As-is RM prefers the rejected" in report

    responses = list(read_rows(stage / "responses.jsonl"))
    assert [(r["query_id"], r["generator"]) for r in responses] == [
        (f"q{i}", rung) for i in range(len(QUERIES)) for rung in ("faithful-2", "hhh-1", "hhh-1-l1")]
    comparisons = list(read_rows(stage / "comparisons.jsonl", Comparison))
    manifest = json.loads((stage / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["comparisons"] == len(comparisons) > 0
    assert counts["pairs_possible"] == 3 * len(QUERIES)
    dropped = sum(counts["pairs_dropped"].values())
    assert counts["pairs_possible"] - dropped == len(comparisons)
    by_id = {(r["query_id"], r["generator"]): r["responses"][0] for r in responses}
    for c in comparisons:
        assert c.prompt in QUERIES and c.chosen_rank < c.rejected_rank
        assert c.chosen == by_id[(c.query_id, c.chosen_rung)] and c.rejected == by_id[(c.query_id, c.rejected_rung)]
        assert c.chosen_score > c.rejected_score  # the As-is RM agreed
    assert (stage / "funnel.png").stat().st_size > 0 and not (stage / "parts").exists()

    # the same run, killed after the first shard of the first pool, then resumed
    raw2 = {**raw, "run_name": "resumed", "compare": {**raw["compare"], "as_is_rm": None}}
    cfg = Config.model_validate(raw2)
    stage2 = cfg.run_dir / "compare"
    real_pool = ladder._run_pool
    seen: list[str] = []

    def crash_after_first_shard(rows, group, name):
        for row in real_pool(rows, group, name):
            if row["_shard"] == 0:
                yield row
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ladder, "_run_pool", crash_after_first_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compare.run(cfg)
    assert not (stage2 / "manifest.json").exists()

    def recording_pool(rows, group, name):
        seen.extend(r["id"] for r in rows)
        yield from real_pool(rows, group, name)

    monkeypatch.setattr(ladder, "_run_pool", recording_pool)
    compare.run(cfg)
    first_pool_rows = [f"q{i}|{r}" for r in ("faithful-2", "hhh-1") for i in range(len(QUERIES))]
    assert not set(first_pool_rows[:4]) & set(seen)  # shard 0 (4 rows) was not generated again
    assert set(first_pool_rows[4:]) <= set(seen)
    # generation is seeded per prompt: the resumed run has the same responses as the uninterrupted one
    assert (stage2 / "responses.jsonl").read_text() == (stage / "responses.jsonl").read_text()
    resumed = json.loads((stage2 / "manifest.json").read_text())["counts"]
    assert resumed["pairs_after_heuristic_filter"] == counts["pairs_after_heuristic_filter"]
    assert "as_is_rm" not in resumed["pairs_dropped"]

    # a finished stage is skipped
    monkeypatch.setattr(ladder, "_run_pool", None)
    compare.run(cfg)
