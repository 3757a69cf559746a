"""Measure the ladder's order instead of assuming it (ALMoST Section 2.1's rule of thumb, tested).

The ladder says rung i writes better responses than rung i+1. This module asks an independent judge
how often that holds on the responses a `compare` run produced, and how often the kept comparisons'
chosen response beats the rejected one.

The judge is a language model's pointwise, reference-free score of a response y to a query x:
the per-token pointwise mutual information

    pmi(y; x) = [log p(y | x) - log p(y | no query)] / |y|

under the judge's chat (or Human:/Assistant:) format. It rewards responses that the query makes more
likely, i.e. relevant and on topic, and does not reward length or generic fluency (both terms carry
the same fluency). Being pointwise, it has no position bias, so no order swap is needed. `calibrate`
measures its agreement with human labels (BIG-bench HHH alignment, HH-RLHF helpful-base test) so the
verdicts come with their reliability; docs/synthetic-comparisons.md has the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from almost_ray.config import load_config
from almost_ray.data.atomic import write_json
from almost_ray.data.sources import read_rows
from almost_ray.eval.stats import wilson_interval
from almost_ray.models.config import ModelConfig
from almost_ray.models.hf_backend import HFGenerator
from almost_ray.runs import paths


class PMIJudge:
    """Pointwise PMI scores of responses under one language model (in-process, HF backend)."""

    def __init__(self, model: ModelConfig, prompt_format: str = "chat"):

        self.generator = HFGenerator(model)
        self.prompt_format = prompt_format

    def _context(self, query: str) -> str:
        if self.prompt_format == "chat":
            return self.generator.chat_prompt([{"role": "user", "content": query}])
        return f"\n\nHuman: {query}\n\nAssistant:"

    def components(self, pairs: list[tuple[str, str]]) -> list[tuple[float, float, int] | None]:
        """(log p(y | x), log p(y | no query), tokens of y) per (query x, response y); None if y is empty."""
        contexts, continuations, keep = [], [], []
        for i, (query, response) in enumerate(pairs):
            if not response.strip():
                continue
            keep.append(i)
            text = " " + response.strip()
            contexts += [self._context(query), self._context("")]
            continuations += [text, text]
        logps = self.generator.loglikelihood(contexts, continuations)
        out: list[tuple[float, float, int] | None] = [None] * len(pairs)
        for k, i in enumerate(keep):
            n = len(self.generator.tokenizer(continuations[2 * k], add_special_tokens=False).input_ids)
            out[i] = (logps[2 * k], logps[2 * k + 1], max(n, 1))
        return out

    def scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        """pmi(y; x) per token for each (query x, response y); an empty response scores -inf."""
        return [pmi(c) for c in self.components(pairs)]


def pmi(c: tuple[float, float, int] | None) -> float:
    return -math.inf if c is None else (c[0] - c[1]) / c[2]


def win_rate(wins: int, losses: int, ties: int) -> dict:
    """Share of decided comparisons won, with a 95% Wilson interval (`eval.stats`)."""
    n = wins + losses
    p = wins / n if n else float("nan")
    lo, hi = wilson_interval(wins, n) if n else (float("nan"), float("nan"))
    return {"wins": wins, "losses": losses, "ties": ties, "win_rate": round(p, 3),
            "ci95": [round(lo, 3), round(hi, 3)]}


# Pointwise judges computed from the same (log p(y|x), log p(y|no query), tokens) components.
JUDGES = {
    "pmi_per_token": pmi,
    "mean_logprob": lambda c: -math.inf if c is None else c[0] / c[2],
    "sum_logprob": lambda c: -math.inf if c is None else c[0],
}
LADDER_JUDGES = ("pmi_per_token", "mean_logprob")  # sum_logprob only measures shortness


def order_stats(rungs: list[str], by_query: dict[str, dict[str, str]], score: dict, comparisons: list[dict]) -> dict:
    """One judge's verdicts: every rung pair's win rate, the mean score per rung, the kept pairs' agreement."""
    matrix = {}
    for i, hi in enumerate(rungs):
        for lo in rungs[i + 1:]:
            w = sum(score[(q, hi)] > score[(q, lo)] for q in by_query)
            lose = sum(score[(q, hi)] < score[(q, lo)] for q in by_query)
            matrix[f"{hi}>{lo}"] = win_rate(w, lose, len(by_query) - w - lose)
    adjacent = {f"{a}>{b}": matrix[f"{a}>{b}"] for a, b in zip(rungs, rungs[1:])}
    mean_score = {rung: round(sum(score[(q, rung)] for q in by_query if math.isfinite(score[(q, rung)]))
                              / max(1, sum(math.isfinite(score[(q, rung)]) for q in by_query)), 4)
                  for rung in rungs}
    kept = [(c["query_id"], c["chosen_rung"], c["rejected_rung"]) for c in comparisons]
    w = sum(score[(q, a)] > score[(q, b)] for q, a, b in kept)
    lose = sum(score[(q, a)] < score[(q, b)] for q, a, b in kept)
    return {"adjacent": adjacent, "all_pairs": matrix, "mean_score": mean_score,
            "kept_comparisons": win_rate(w, lose, len(kept) - w - lose)}


def ladder_order(responses: list[dict], comparisons: list[dict], judge: PMIJudge) -> dict:
    """How often each rung beats the next one (and every lower one), and the kept pairs' agreement.

    The PMI judge's verdicts are the report's top level; `by_judge` holds every judge in LADDER_JUDGES.
    """
    by_query: dict[str, dict[str, str]] = defaultdict(dict)
    prompts: dict[str, str] = {}
    rungs: list[str] = []
    for r in responses:
        by_query[r["query_id"]][r["generator"]] = r["responses"][0]
        prompts[r["query_id"]] = r["prompt"]
        if r["generator"] not in rungs:
            rungs.append(r["generator"])
    items = [(qid, rung) for qid in by_query for rung in rungs]
    components = judge.components([(prompts[q], by_query[q][rung]) for q, rung in items])
    by_judge = {name: order_stats(rungs, by_query, {it: JUDGES[name](c) for it, c in zip(items, components)},
                                  comparisons)
                for name in LADDER_JUDGES}
    pmi_stats = by_judge["pmi_per_token"]
    return {"rungs": rungs, "queries": len(by_query), "adjacent": pmi_stats["adjacent"],
            "all_pairs": pmi_stats["all_pairs"], "mean_pmi": pmi_stats["mean_score"],
            "kept_comparisons": pmi_stats["kept_comparisons"], "by_judge": by_judge}


def calibrate(judge: PMIJudge, data_dir: Path, hh_limit: int = 150) -> dict:
    """The judge's agreement with human labels: HHH alignment (221) and single-turn HH-RLHF pairs.

    Next to the PMI judge it reports the plain log-likelihood judges (mean and sum over tokens) and the
    always-longer baseline, to show what the PMI judge adds.
    """
    sets: dict[str, list[tuple[str, str, str]]] = {"hhh_alignment": [], "hh_helpful_base_test": []}
    for obj in read_rows(data_dir / "hhh_alignment.jsonl"):
        good = next(t["text"] for t in obj["targets"] if t["score"] == 1)
        bad = next(t["text"] for t in obj["targets"] if t["score"] == 0)
        sets["hhh_alignment"].append((obj["input"], good, bad))
    for obj in read_rows(data_dir / "hh_helpful_base_test_500.jsonl"):
        if obj["chosen"].count("\n\nHuman:") != 1 or len(sets["hh_helpful_base_test"]) >= hh_limit:
            continue
        query, chosen = obj["chosen"].split("\n\nAssistant:", 1)
        rejected = obj["rejected"].split("\n\nAssistant:", 1)[1]
        if chosen.strip() and rejected.strip() and chosen.strip() != rejected.strip():
            sets["hh_helpful_base_test"].append((query.replace("\n\nHuman:", "").strip(), chosen, rejected))
    out = {}
    for name, triples in sets.items():
        comps = judge.components([(q, y) for q, a, b in triples for y in (a, b)])
        out[name] = {"pairs": len(triples), "always_longer_baseline": round(
            sum(len(a.strip()) > len(b.strip()) for _, a, b in triples) / max(1, len(triples)), 3)}
        for jname, fn in JUDGES.items():
            scores = [fn(c) for c in comps]
            w = sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(triples)))
            lose = sum(scores[2 * i] < scores[2 * i + 1] for i in range(len(triples)))
            out[name][jname] = win_rate(w, lose, len(triples) - w - lose)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(report["adjacent"]) + ["kept comparisons"]
    stats = list(report["adjacent"].values()) + [report["kept_comparisons"]]
    rates = [s["win_rate"] for s in stats]
    err = [[r - s["ci95"][0] for r, s in zip(rates, stats)], [s["ci95"][1] - r for r, s in zip(rates, stats)]]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(pairs) + 1.5))
    ax.barh(pairs, rates, xerr=err, color="#58a", capsize=3)
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("higher rung wins (PMI judge), 95% CI")
    ax.set_title(f"ladder order on {report['queries']} queries")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--judge", default="embedded:smollm2-135m-instruct", help="judge model reference")
    parser.add_argument("--format", default="chat", choices=["chat", "human_assistant"])
    parser.add_argument("--calibrate", type=Path, help="also measure the judge on human labels in this data dir")
    parser.add_argument("--hh-limit", type=int, default=150, help="single-turn HH-RLHF pairs to calibrate on")
    parser.add_argument("--output", type=Path, help="default: <run dir>/compare/ladder_order.json")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    stage = paths.stage_dir(cfg, "compare")
    # small batches: the backend takes a log-softmax over the whole vocabulary at every position
    judge = PMIJudge(ModelConfig(ref=args.judge, max_batch_size=4), args.format)
    report = ladder_order(list(read_rows(stage / "responses.jsonl")),
                          list(read_rows(stage / "comparisons.jsonl")), judge)
    report["judge"] = {"ref": args.judge, "format": args.format, "method": "per-token PMI"}
    if args.calibrate:
        report["judge"]["human_agreement"] = calibrate(judge, args.calibrate, args.hh_limit)
    output = args.output or stage / "ladder_order.json"
    write_json(output, report)
    plot(report, output.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("adjacent", "kept_comparisons", "mean_pmi")}, indent=1))
    if "human_agreement" in report["judge"]:
        print(json.dumps(report["judge"]["human_agreement"], indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
