"""The report stage on a run folder built by hand: the results table, "did not run" rows, stages, plots."""

from __future__ import annotations

import json
import re
import time

from almost_ray.config import Config
from almost_ray.data.atomic import write_json
from almost_ray.eval.stats import proportion
from almost_ray.pipeline.report import markdown, terminal_summary, write_report
from almost_ray.runs.manifest import build_manifest, write_manifest

PNG = b"\x89PNG\r\n\x1a\n"


def build_run(tmp_path) -> Config:
    cfg = Config(runs_dir=tmp_path / "runs", run_name="r")
    cfg = cfg.model_copy(update={
        "train_rm": cfg.train_rm.model_copy(update={"heldout_fraction": 0.1}),
        "eval_rm": cfg.eval_rm.model_copy(update={"inputs": [tmp_path / "hh.jsonl"], "limit": 100}),
        "eval": cfg.eval.model_copy(update={"hhh": cfg.eval.hhh.model_copy(update={"limit": 40})}),
    })
    run = cfg.run_dir
    started = time.time() - 98
    write_manifest(run / "queries", build_manifest("queries", cfg.queries, {}, started,
                                                   counts={"kept": 40, "parsed": 90}))
    write_manifest(run / "rm", build_manifest("train_rm", cfg.train_rm, {}, started,
                                              counts={"pairs": 90, "heldout_pairs": 12},
                                              metrics={"final_loss": 0.61, "tail_accuracy": 0.7}))
    heldout = str(run / "rm" / "heldout_comparisons.jsonl")
    write_json(run / "eval_rm" / "rm_accuracy.json", {"results": [
        {"file": heldout, "pairs": 12, "rm_accuracy": 0.75, "length_baseline": 0.5},
        {"file": str(tmp_path / "hh.jsonl"), "pairs": 100, "rm_accuracy": 0.49, "length_baseline": 0.6}]})
    write_json(run / "eval" / "summary.json", {
        "models": {"base": "embedded:x", "sft": str(run / "sft" / "model"), "ppo": None},
        "runs": {"base": ["hhh", "truthfulqa"], "sft": ["hhh", "truthfulqa"]},
        "not_run": {"ppo": "no ppo model: the ppo stage has not run",
                    "ppo-vs-sft": "needs both the PPO and the SFT model"}})
    for name, k in (("base", 20), ("sft", 26)):
        write_json(run / "eval" / name / "report.json", {"suites": {
            "hhh": {"accuracy": proportion(k, 40), "subsets": {"harmless": proportion(k, 40)}},
            "truthfulqa": {"accuracy": proportion(k // 2, 80), "chance": 0.223}}})
    write_json(run / "rm_score" / "rm_score.json", {
        "prompts": {"source": heldout, "ids": ["q1", "q2", "q3"], "seen_in_training": {"ppo and ppo_grpo prompts": 1}},
        "results": {"base": {"mean": -0.25, "se": 0.1, "prompts": 3, "n": 24},
                    "sft": {"mean": 0.5, "se": 0.2, "prompts": 3, "n": 24,},
                    "dpo": {"mean": 0.75, "se": 0.125, "prompts": 3, "n": 24,
                            "vs_sft": {"mean": 0.25, "se": 0.05, "prompts": 3, "higher": 2 / 3}}},
        "not_run": {"ppo": "no ppo model: the ppo stage has not run",
                    "ppo_grpo": "no ppo_grpo model: the optional ppo_grpo stage has not run"}})
    write_json(run / "rmsp-compare" / "report.json", {"per_turn": {
        "1": {"paired_dialogues": 20, "rmsp_mean_reward": 1.2, "self_play_mean_reward": 0.6,
              "mean_difference": 0.6, "rmsp_higher_share": 0.75},
        "2": {"paired_dialogues": 0, "rmsp_mean_reward": None, "self_play_mean_reward": None,
              "mean_difference": None, "rmsp_higher_share": None}}})
    return cfg


def test_report_tables_did_not_run_rows_and_plots(tmp_path):
    cfg = build_run(tmp_path)
    out = cfg.run_dir / "report"
    answers = {"base": {"seed-1": "Paris."}, "sft": {"seed-1": "Paris | a logical fallacy"}}
    report = write_report(cfg, out, answers)

    rows = {(r["result"], r["what"]): r for r in report["results"]}
    sft = rows[("Static HHH accuracy", "sft")]
    assert sft["value"] == 26 / 40 and sft["n"] == 40 and sft["ci_low"] == proportion(26, 40)["ci_low"]
    assert rows[("Static HHH accuracy", "ppo")]["value"] is None
    assert rows[("Static HHH accuracy", "ppo")]["note"] == "did not run: no ppo model: the ppo stage has not run"
    assert rows[("TruthfulQA MC1 accuracy", "base")]["note"] == "chance 22.3 %"
    held = rows[("RM accuracy, held-out synthetic comparisons", "reward model")]
    assert (held["value"], held["n"]) == (9 / 12, 12)
    assert rows[("RM accuracy, HH-RLHF hh", "prefer-longer baseline")]["value"] == 0.6
    assert rows[("RMSP vs plain self-play (RM score of the kept reply)", "turn 1: mean score, RMSP vs self-play")][
        "text"] == "1.200 vs 0.600 (+0.600)"
    assert rows[("RMSP vs plain self-play (RM score of the kept reply)", "turn 2")]["note"].startswith("no dialogue")
    judge = rows[("PPO vs SFT, order-swapped judge", "—")]
    assert judge["note"] == "did not run: needs both the PPO and the SFT model"
    # the optional models: an eval summary written before their stages existed still says why they are missing
    assert rows[("Static HHH accuracy", "ppo_grpo")]["note"] == (
        "did not run: no ppo_grpo model: the optional ppo_grpo stage has not run (almost-ray pipeline --with ppo_grpo)")
    assert rows[("TruthfulQA MC1 accuracy", "dpo")]["value"] is None
    score = "RM mean score on held-out prompts (± SE over prompts)"
    assert (rows[(score, "sft")]["text"], rows[(score, "sft")]["n"]) == ("0.500 ± 0.200", 3)
    assert rows[(score, "dpo")]["note"] == "24 answers; vs SFT +0.250 ± 0.050, higher on 67% of prompts"
    assert rows[(score, "ppo_grpo")]["note"] == "did not run: no ppo_grpo model: the optional ppo_grpo stage has not run"
    assert "3 prompts, of which also in training inputs: ppo and ppo_grpo prompts: 1" in report["subsets"]["rm_score"]

    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["queries"]["status"] == "done" and stages["queries"]["summary"].startswith("kept=40, parsed=90")
    assert stages["queries"]["wall_time_s"] >= 98
    assert stages["compare"]["status"] == "did not run"
    assert stages["ppo"]["status"] == "did not run"
    assert stages["train_dpo"]["status"] == stages["rm_score"]["status"] == "did not run"
    assert "the first 40 items" in report["subsets"]["hhh"] and "first 100 pairs" in report["subsets"]["eval_rm"]

    md = (out / "report.md").read_text()
    assert md == markdown(json.loads((out / "report.json").read_text()))
    assert "| Static HHH accuracy | sft | 65.0 | 49.5–77.9 | 40 | chance 50 %; items: harmless 40 |" in md
    assert "| PPO vs SFT, order-swapped judge | — | — |  |  | did not run: needs both the PPO and the SFT model |" in md
    assert "| query | base | sft |" in md and "Paris \\| a logical fallacy" in md
    assert "Not answered: ppo, ppo_grpo, dpo" in md
    assert "| RM mean score on held-out prompts (± SE over prompts) | dpo | 0.750 ± 0.125 |  | 3 |" in md
    assert "| stage | status | wall time s | peak MiB (driver / actors) | counts and key metrics |" in md
    peak = stages["queries"]["memory"]["driver_peak_mib"]  # this test process's, in MiB (not KiB or bytes)
    assert 20 < peak < 100_000 and re.search(rf"\| queries \| done \| \d+ \| {peak:.0f} / (\d+|—) \| kept=40", md)
    for name in ("results.png", "stage_times.png"):
        assert (out / name).read_bytes()[:8] == PNG and f"]({name})" in md
    text = terminal_summary(out)
    assert "Results (95 % Wilson intervals):" in text and str(out / "results.png") in text and "sft: Paris" in text


def test_report_of_an_empty_run_says_every_result_did_not_run(tmp_path):
    cfg = Config(runs_dir=tmp_path / "runs", run_name="empty")
    report = write_report(cfg, cfg.run_dir / "report", {})
    notes = [r["note"] for r in report["results"]]
    assert all(n.startswith("did not run") for n in notes), notes
    assert "did not run: the optional rm_score stage has not run (--with rm_score)" in notes
    assert all(s["status"] == "did not run" for s in report["stages"])
    assert "No model answered" in (cfg.run_dir / "report" / "report.md").read_text()
