"""Scoring on tiny:llama: the shared-context paths equal `loglikelihood`; the Ray pool equals in-process; resume."""

from __future__ import annotations

import json

import pytest

from almost_ray.cluster.config import ResourcesConfig
from almost_ray.eval.scoring import score_in_process, score_on_ray, score_rows, scores_path
from almost_ray.models.config import ModelConfig

ROWS = [
    {"key": "0", "context": "\n\nHuman: Which is better?\n\nAssistant: The better reply is Reply",
     "continuations": [" A", " B"]},
    {"key": "1", "context": "Short context", "continuations": [" A", " B", " C"]},
    {"key": "2", "context": "\n\nHuman: What is the capital of France?\n\nAssistant:",
     "continuations": [" Paris is the capital.", " Berlin, surely.", " No", " I think it is Lyon, or maybe Nice."]},
]


def test_shared_context_scores_equal_loglikelihood(tiny_generator):
    got = score_rows(tiny_generator, ROWS)
    for row, res in zip(ROWS, got):
        want = tiny_generator.loglikelihood([row["context"]] * len(row["continuations"]), row["continuations"])
        assert res["logprobs"] == pytest.approx(want, abs=1e-4)
    assert got[0]["lengths"] == [1, 1]
    assert got[2]["lengths"][0] > 1 and got[2]["lengths"][2] == 1  # one shared context, answers of any length


def test_scores_do_not_depend_on_batching(tiny_generator):
    one = score_in_process(tiny_generator)(ROWS)
    each = {}
    for r in ROWS:
        each.update(score_in_process(tiny_generator)([r]))
    for k in one:
        assert one[k]["logprobs"] == pytest.approx(each[k]["logprobs"], abs=1e-4)


def test_ray_pool_matches_in_process_and_resumes(ray_local, tiny_generator, tmp_path, monkeypatch):
    model = ModelConfig(ref="tiny:llama", dtype="float32", max_batch_size=4)
    scorer = score_on_ray(model, ResourcesConfig(concurrency=1, num_cpus=1, batch_size=2), tmp_path, shard_size=2)
    got = scorer(ROWS, "unit")
    want = score_in_process(tiny_generator)(ROWS)
    for k in want:
        assert got[k]["logprobs"] == pytest.approx(want[k]["logprobs"], abs=1e-4)
    files = list(tmp_path.glob("unit-*.scores.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 3

    import ray.data

    def no_ray(*a, **k):
        raise RuntimeError("ray called")

    monkeypatch.setattr(ray.data, "from_items", no_ray)
    assert scorer(ROWS, "unit") == got
    # a changed row is a different job: its own file, computed afresh
    changed = [dict(ROWS[0], context=ROWS[0]["context"] + "!")]
    with pytest.raises(RuntimeError, match="ray called"):
        scorer(changed, "unit")


def test_interrupted_run_keeps_finished_shards(ray_local, tiny_generator, tmp_path):
    """A shard already on disk is not scored again (ShardedJsonl); only the missing rows are."""
    from almost_ray.data.shards import ShardedJsonl

    model = ModelConfig(ref="tiny:llama", dtype="float32")
    scorer = score_on_ray(model, ResourcesConfig(concurrency=1, num_cpus=1, batch_size=2), tmp_path, shard_size=1)
    # the state a run killed after its first shard leaves behind: the shard folder with that shard written
    ordered = sorted(ROWS, key=lambda r: (len(r["context"]), r["key"]))
    want = score_in_process(tiny_generator)(ROWS)
    final = scores_path(tmp_path, "part", model, ROWS)
    shards = ShardedJsonl(final, 1)
    shards.pending([{"key": r["key"]} for r in ordered], key="key")
    first = ordered[0]["key"]
    planted = {"key": first, "logprobs": [123.0] * len(ordered[0]["continuations"]), "lengths": [1, 1]}
    (shards.dir / "shard-00000.jsonl").write_text(json.dumps(planted) + "\n")
    got = scorer(ROWS, "part")
    assert final.is_file() and not shards.dir.exists()
    assert got[first]["logprobs"][0] == 123.0  # the finished shard was kept as it was
    assert all(got[k]["logprobs"] == pytest.approx(want[k]["logprobs"], abs=1e-4) for k in want if k != first)
