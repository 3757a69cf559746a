"""The Ray Data actor pool and the `generate` stage on a local Ray with two replicas."""

import json

from almost_ray.cli import main
from almost_ray.cluster.config import ResourcesConfig
from almost_ray.data.records import Response
from almost_ray.data.sources import read_rows
from almost_ray.generate.pool import stream_generation
from almost_ray.models.config import ModelConfig, SamplingParams
from almost_ray.prompts.templates import render_prompt
from almost_ray.runs.manifest import read_manifest

QUERIES = [f"Tell me fact number {i} about the sea." for i in range(8)]
TINY = ModelConfig(ref="tiny:llama", dtype="float32", max_batch_size=4)


def test_two_replicas_give_the_same_answers_as_one_generator(ray_local, tiny_generator):
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=5)
    rows = [{"id": str(i), "messages": json.dumps([{"role": "user", "content": q}])} for i, q in enumerate(QUERIES)]
    resources = ResourcesConfig(concurrency=2, num_cpus=1, batch_size=2)
    out = {r["id"]: r for r in stream_generation(rows, TINY, params, resources, "human_assistant")}
    assert sorted(out, key=int) == [str(i) for i in range(8)]
    prompts = [render_prompt("human_assistant", [{"role": "user", "content": q}]) for q in QUERIES]
    expected = tiny_generator.generate(prompts, params)
    for i, prompt in enumerate(prompts):
        assert out[str(i)]["prompt"] == prompt
        assert out[str(i)]["responses"] == expected[i]  # seeded per prompt: sharding changes nothing


def test_generate_stage_writes_responses_and_skips_when_done(ray_local, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUERIES[:5]))
    out = tmp_path / "gen" / "responses.jsonl"
    args = [
        "generate", "--input", str(prompts), "--output", str(out),
        "--set", "generate.model.ref=tiny:llama", "--set", "generate.prompt_format=human_assistant",
        "--set", "generate.sampling.max_new_tokens=6", "--set", "generate.resources.batch_size=2",
        "--set", "generate.resources.concurrency=2", "--set", "generate.shard_size=2",
    ]
    assert main(args) == 0
    records = list(read_rows(out, Response))
    assert [r.query_id for r in records] == [f"prompts-{i}" for i in range(1, 6)]
    assert all(r.prompt.endswith("\n\nAssistant:") and len(r.responses) == 1 for r in records)
    manifest = read_manifest(out.parent)
    assert manifest["counts"] == {"prompts": 5, "rows": 5, "prompts_shortened": 0, "shots_dropped": 0,
                                  "prompts_skipped": 0} and manifest["stage"] == "generate"
    before = out.stat().st_mtime_ns
    assert main(args) == 0  # same config and input: the stage is skipped
    assert out.stat().st_mtime_ns == before
    prompts.write_text("\n".join(QUERIES[:6]))  # new input: redone
    assert main(args) == 0
    assert len(list(read_rows(out))) == 6


def test_bad_input_line_is_reported_with_exit_2(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "ok"}\n{"question": "wrong field"}\n')
    code = main(["generate", "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")])
    assert code == 2
    assert f"{prompts}:2: expected one of the fields" in capsys.readouterr().err
