"""Records and I/O: TRL field names, errors that name file and line, atomic writes, resumable shards."""

import json

import pytest

from almost_ray.data.atomic import atomic_open
from almost_ray.data.records import Comparison, Dialogue, RecordError, write_jsonl
from almost_ray.data.shards import ShardedJsonl
from almost_ray.data.sources import load_queries, read_rows


def test_round_trip_keeps_metadata(tmp_path):
    path = tmp_path / "c.jsonl"
    recs = [Comparison(prompt="q", chosen="a", rejected="b", chosen_rung="A", score=0.5)]
    assert write_jsonl(path, recs) == 1
    back = list(read_rows(path, Comparison))
    assert back[0].chosen == "a" and back[0].chosen_rung == "A" and back[0].score == 0.5
    assert json.loads(path.read_text()) == {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_rung": "A", "score": 0.5}


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n{"prompt": "q", "chosen": \n')
    with pytest.raises(RecordError, match=rf"^{path}:3: invalid JSON"):
        list(read_rows(path, Comparison))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(RecordError, match=rf"^{path}:2: rejected: Field required"):
        list(read_rows(path, Comparison))


def test_dialogue_roles_are_checked(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(RecordError, match=rf"^{path}:1: messages\.0\.role:"):
        list(read_rows(path, Dialogue))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write('{"a": 2}\n')
            raise RuntimeError("crash mid-write")
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_load_queries_from_text(tmp_path):
    path = tmp_path / "seeds.txt"
    path.write_text("What is 2+2?\n\n  Why?  \n")
    assert [(q.id, q.text) for q in load_queries(path)] == [("seeds-1", "What is 2+2?"), ("seeds-3", "Why?")]


def test_shards_resume_without_redoing_finished_work(tmp_path):
    out = tmp_path / "out.jsonl"
    rows = [{"id": str(i)} for i in range(7)]
    processed = []

    def process(todo):
        for r in todo:
            processed.append(r["id"])
            yield {**r, "double": int(r["id"]) * 2}

    first = ShardedJsonl(out, shard_size=3)
    todo = first.pending(rows)

    def crash_after_first_shard(todo):
        for i, r in enumerate(process(todo)):
            if i == 3:
                raise KeyboardInterrupt
            yield r

    with pytest.raises(KeyboardInterrupt):
        first.collect(crash_after_first_shard(todo))
    assert not out.exists()
    processed.clear()

    second = ShardedJsonl(out, shard_size=3)
    assert second.collect(process(second.pending(rows))) == 2  # shards 1 and 2 only
    assert processed == ["3", "4", "5", "6"]
    assert second.finalize() == 7
    assert [r["double"] for r in read_rows(out)] == [0, 2, 4, 6, 8, 10, 12]
    assert not second.dir.exists()


def test_shards_of_other_inputs_are_discarded(tmp_path):
    out = tmp_path / "out.jsonl"
    a = ShardedJsonl(out, 2)
    a.collect({**r, "v": 1} for r in a.pending([{"id": "x"}, {"id": "y"}]))
    b = ShardedJsonl(out, 2)
    assert len(b.pending([{"id": "z"}, {"id": "y"}])) == 2
