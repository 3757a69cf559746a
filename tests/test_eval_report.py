"""Wilson intervals, templates, and the written report (JSON, markdown, PNGs)."""

from __future__ import annotations

import json

import pytest

from almost_ray.config_base import ConfigError
from almost_ray.eval.config import EvalPrompt
from almost_ray.eval.report import markdown, summary_lines, write_report
from almost_ray.eval.stats import mean_over_prompts, paired_difference, proportion, wilson_interval
from almost_ray.eval.templates import continuation, load_template, parse_dialogue, render


def test_wilson_interval_known_values():
    # reference values from the closed form (e.g. statsmodels' proportion_confint(method="wilson"))
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    assert wilson_interval(81, 100) == pytest.approx((0.722, 0.8751), abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert proportion(1, 4)["value"] == 0.25


def test_mean_score_and_paired_difference_take_the_prompt_as_the_unit():
    # two prompts with 2 answers each: per-prompt means 1.0 and 3.0 -> mean 2.0, SE sd([1, 3]) / sqrt(2) = 1.0
    a = {"p1": [0.5, 1.5], "p2": [3.0, 3.0]}
    assert mean_over_prompts(a) == {"mean": 2.0, "se": pytest.approx(1.0), "prompts": 2, "n": 4}
    assert mean_over_prompts({"p1": [4.0, 2.0]}) == {"mean": 3.0, "se": None, "prompts": 1, "n": 2}
    assert mean_over_prompts({}) == {"mean": None, "se": None, "prompts": 0, "n": 0}
    # b trails a by 0.5 on p1 and 1.5 on p2 (p3 only b answered): differences 0.5, 1.5 -> mean 1.0, SE 0.5
    b = {"p1": [0.5, 0.5], "p2": [1.0, 2.0], "p3": [9.0]}
    assert paired_difference(a, b) == {"mean": 1.0, "se": pytest.approx(0.5), "prompts": 2, "higher": 1.0}
    assert paired_difference(b, a)["higher"] == 0.0
    assert paired_difference({"x": [1.0]}, b) == {"mean": None, "se": None, "prompts": 0, "higher": None}


def test_template_checks_and_sources(tmp_path):
    with pytest.raises(ConfigError, match="placeholders"):
        load_template(EvalPrompt(), {"question", "answer"}, "eval.x", "\n\nHuman: {question}\n\nAssistant:")
    with pytest.raises(ConfigError, match="Assistant"):
        load_template(EvalPrompt(template="Q: {question}"), {"question"}, "eval.x", "unused")
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"mine": "\n\nHuman: {question}?\n\nAssistant: Well,"}))
    prompt = EvalPrompt(template_file=table, template_key="mine")
    assert load_template(prompt, {"question"}, "eval.x", "unused").endswith("Well,")
    with pytest.raises(ConfigError, match="not both"):
        load_template(prompt.model_copy(update={"template": "x"}), {"question"}, "eval.x", "unused")
    with pytest.raises(ConfigError, match="no such key"):
        load_template(prompt.model_copy(update={"template_key": "other"}), {"question"}, "eval.x", "unused")


def test_render_keeps_turn_markers_inside_fields(tiny_generator):
    template = "\n\nHuman: Context: {question}\n\nAssistant: The answer is"
    field = "first turn\n\nAssistant: a reply\n\nHuman: second turn"
    chat = render(template, {"question": field}, "chat", tiny_generator.tokenizer)
    assert chat.count("<|im_start|>user") == 1 and "Assistant: a reply" in chat
    assert chat.endswith("<|im_start|>assistant\nThe answer is")
    assert render(template, {"question": "x"}, "human_assistant") == "\n\nHuman: Context: x\n\nAssistant: The answer is"
    assert continuation("Assistant:", " Yes") == " Yes" and continuation("assistant\n", " Yes") == "Yes"
    assert parse_dialogue("\n\nHuman: a\n\nAssistant: b") == [{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]


def report_fixture() -> dict:
    p = proportion
    return {
        "model_label": "tiny:llama", "suites": {
            "hhh": {"mode": "letter", "accuracy": p(120, 221), "n_items": 221,
                    "subsets": {"harmless": p(30, 58), "helpful": p(31, 59), "honest": p(35, 61), "other": p(24, 43)},
                    "position": {"accuracy_better_first": p(150, 221), "accuracy_better_second": p(90, 221),
                                 "accuracy_both_orders": p(60, 221), "rate_answer_a": p(280, 442),
                                 "mean_a_logodds": 0.4}},
            "truthfulqa": {"mode": "answer", "normalize": "none", "accuracy": p(200, 817), "chance": 0.22,
                           "n_items": 817},
            "ranking": {"ranking_capability": p(70, 100), "n_items": 100, "n_triples": 100},
            "judge": {"vs_label": "tiny:llama+rules", "judge_kind": "model", "judge_label": "tiny judge",
                      "tie_margin": 0.0,
                      "overall": {"win": p(3, 10), "tie": p(5, 10), "loss": p(2, 10), "win_rate_ties_half": 0.55,
                                  "n": 10},
                      "sets": {"vicuna": {"win": p(3, 10), "tie": p(5, 10), "loss": p(2, 10),
                                          "win_rate_ties_half": 0.55, "n": 10}}},
        },
    }


def test_report_files(tmp_path):
    report = report_fixture()
    written = write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["suites"]["hhh"]["accuracy"]["k"] == 120
    for name in ("hhh", "truthfulqa", "ranking", "judge"):
        png = written[name].read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    md = markdown(report)
    assert "| all | 54.3 | 47.7–60.7 | 221 |" in md
    assert "Wilson" in md and "| vicuna | 30.0 (10.8–60.3)" in md
    lines = summary_lines(report)
    assert lines[0].startswith("Static HHH accuracy: 54.3 % (95 % CI 47.7–60.7, n=221")
    assert lines[1] == "TruthfulQA MC1 accuracy: 24.5 % (95 % CI 21.7–27.5, n=817)"
