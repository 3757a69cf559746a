"""`almost-ray eval` end to end on tiny:llama: every suite, the report, resume, and the CLI on a local Ray."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import pytest
import yaml

from almost_ray.cli import main
from almost_ray.config import load_config
from almost_ray.eval import evaluate, hhh, truthfulqa
from almost_ray.eval.evaluate import apply_cli, in_process_backends
from almost_ray.eval.scoring import score_in_process


@pytest.fixture
def data(tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    return {
        "hhh": write("hhh.jsonl", [
            {"subset": s, "input": f"Question {i} about {s}?", "targets": [
                {"text": f"A careful answer {i}.", "score": 1}, {"text": f"Whatever {i}.", "score": 0}]}
            for i, s in enumerate(["helpful", "honest", "harmless", "other"])]),
        "truthfulqa": write("tqa.jsonl", [
            {"question": "Is the earth flat?", "mc1_targets": {"No.": 1, "Yes.": 0, "Only on Sundays.": 0}},
            {"question": "Do fish swim?", "mc1_targets": {"Never.": 0, "Yes, most do.": 1}}]),
        "ranking": write("rank.jsonl", [{"prompt": f"Say {w}.", "response": f"{w}!"} for w in ("hi", "bye", "yes")]),
        "vicuna": write("vicuna.jsonl", [{"question_id": i, "category": "generic", "turns": [t]}
                                         for i, t in ((1, "Name a fruit."), (2, "Say hello."))]),
        "dir": tmp_path,
    }


def config_file(data, **eval_extra) -> str:
    cfg = {
        "run_name": "t", "runs_dir": str(data["dir"] / "runs"), "ray": {"num_cpus": 2},
        "eval": {
            "model": {"ref": "tiny:llama", "dtype": "float32", "max_batch_size": 4},
            "resources": {"concurrency": 1, "num_cpus": 1, "batch_size": 4},
            "shard_size": 4,
            "hhh": {"data": data["hhh"]},
            "truthfulqa": {"data": data["truthfulqa"]},
            "ranking": {"data": data["ranking"]},
            "judge": {"questions": {"vicuna": data["vicuna"]}, "model": {"ref": "tiny:llama", "dtype": "float32"},
                      "prompt_format": "human_assistant", "sampling": {"temperature": 0, "max_new_tokens": 6}},
            **eval_extra,
        },
    }
    path = data["dir"] / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_every_suite_end_to_end(data, tiny_generator):
    """All four suites through `run` (in process here; the Ray pool is covered by test_eval_scoring and the CLI test)."""
    # judge "tiny + rules" against plain tiny: --vs copies the model settings without the rules
    cfg = load_config(config_file(data), ["eval.model.rules.enabled=true"])
    cfg = apply_cli(cfg, None, "hhh,truthfulqa,ranking,judge", "tiny:llama", False)
    assert cfg.eval.vs.ref == "tiny:llama" and not cfg.eval.vs.rules.enabled and cfg.eval.vs.max_batch_size == 4
    out = data["dir"] / "report"
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"output_dir": out})})
    in_process = replace(evaluate.STAGE, work=partial(evaluate.evaluate, backends=in_process_backends(cfg)))
    assert in_process.run(cfg) == out
    report = json.loads((out / "report.json").read_text())

    assert report["model_label"] == "tiny:llama+rules" and report["suites"]["judge"]["vs_label"] == "tiny:llama"
    for name in ("report.json", "report.md", "hhh.png", "truthfulqa.png", "ranking.png", "judge.png",
                 "manifest.json", "metrics.jsonl", "hhh/items.jsonl", "judge/items.jsonl"):
        assert (out / name).is_file(), name
    # the numbers are those of the suite functions on the model's scores
    items = hhh.load_items(data["hhh"])
    local = score_in_process(tiny_generator)
    want, _ = hhh.summarize(items, local(hhh.build_rows(items, cfg.eval.hhh)), "letter")
    assert report["suites"]["hhh"]["accuracy"] == want["accuracy"]
    assert report["suites"]["hhh"]["position"]["mean_a_logodds"] == pytest.approx(
        want["position"]["mean_a_logodds"], abs=1e-4)
    tq = truthfulqa.load_items(data["truthfulqa"])
    want_tq, _ = truthfulqa.summarize(tq, local(truthfulqa.build_rows(tq, cfg.eval.truthfulqa)), cfg.eval.truthfulqa)
    assert report["suites"]["truthfulqa"]["accuracy"] == want_tq["accuracy"]
    assert report["suites"]["ranking"]["n_triples"] == 3
    judged = [json.loads(line) for line in (out / "judge/items.jsonl").read_text().splitlines()]
    assert len(judged) == 2 and all(j["outcome"] in ("win", "tie", "loss") for j in judged)
    assert all(j["outcome"] == "tie" or j["verdict_first"] == j["verdict_swapped"] for j in judged)
    assert report["suites"]["judge"]["overall"]["n"] == 2

    # a second run with the same config and data is skipped: its manifest says it is done
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert evaluate.run(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == stamp


def test_cli_prints_accuracies_and_reports_config_errors(ray_local, data, capsys):
    path = config_file(data)
    assert main(["eval", "--config", path, "--suite", "hhh,truthfulqa"]) == 0
    printed = capsys.readouterr().out
    assert "Static HHH accuracy:" in printed and "95 % CI" in printed and "TruthfulQA MC1 accuracy:" in printed
    assert (data["dir"] / "runs/t/eval/tiny-llama/report.md").is_file()

    assert main(["eval", "--config", path, "--suite", "hhh", "--set", "eval.hhh.data=null"]) == 2
    assert "eval.hhh.data: not set" in capsys.readouterr().err
    assert main(["eval", "--config", path, "--suite", "judge"]) == 2
    assert "eval.vs" in capsys.readouterr().err
    assert main(["eval", "--config", path, "--suite", "ranking", "--reward-model"]) == 2
    assert "reward model" in capsys.readouterr().err
