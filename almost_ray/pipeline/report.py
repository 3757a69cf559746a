"""The report stage: `<run>/report/report.md`, `report.json` and PNG plots for the whole pipeline.

What a reader needs to judge a run, read from the stages' manifests and reports (never recomputed):

- per stage: whether it ran, its headline counts and metrics, its wall time and peak memory (driver /
  the most any of its actors used);
- the results table: base vs SFT vs PPO (and, when the optional stages ran, GRPO and DPO) on the same
  items of Static HHH and TruthfulQA MC1, the RM on held-out synthetic comparisons and on HH-RLHF next to
  the prefer-longer baseline (ALMoST Table 3), RMSP vs plain self-play (Table 5), PPO vs SFT under the
  order-swapped judge, every model's mean RM score on the same held-out prompts (`rm_score`); every
  proportion with its 95 % Wilson interval (`eval/stats.py`), every mean score with its standard error
  over prompts, every row whose stage or model did not run saying so and why;
- which subsets of the benchmarks and which prompts the config scored;
- the same seed queries answered greedily by every model side by side (through the generate stage), so
  a regression shows instead of hiding behind an average.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

from almost_ray.cluster.memory import peak_cell
from almost_ray.config import Config
from almost_ray.data.atomic import atomic_open, write_json
from almost_ray.data.records import Response, write_jsonl
from almost_ray.data.sources import load_queries, read_rows
from almost_ray.eval import stage as eval_stage
from almost_ray.eval.stage import MODEL_NAMES, missing_model, models
from almost_ray.eval.stats import proportion
from almost_ray.generate import stage as generate
from almost_ray.pipeline.stages import EVERY_STAGE
from almost_ray.prompts.templates import packaged_text
from almost_ray.runs import paths
from almost_ray.runs.manifest import MANIFEST, read_manifest, reset_if_changed, summary, summary_line
from almost_ray.runs.stage import Outcome, Stage

MODELS = MODEL_NAMES  # base, sft, ppo, ppo_grpo (PPO with GRPO's advantages), dpo
BENCHMARKS = {"hhh": "Static HHH accuracy", "truthfulqa": "TruthfulQA MC1 accuracy"}


def seed_queries(cfg: Config) -> list[tuple[str, str]]:
    """The first `report.num_queries` of `report.seed_queries` (default: the project's own seed queries)."""
    if cfg.report.seed_queries is not None:
        queries = [(q.id, q.text) for q in load_queries(cfg.report.seed_queries)]
    else:
        lines = [t.strip() for t in packaged_text("seed_queries.txt").splitlines() if t.strip()]
        queries = [(f"seed-{i}", t) for i, t in enumerate(lines, 1)]
    return queries[: cfg.report.num_queries]


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# --- the side-by-side answers ---------------------------------------------------------------------------

def answers(cfg: Config, out_dir: Path) -> dict[str, dict[str, str]]:
    """model name -> query id -> greedy answer, for every model the pipeline has (base, SFT, PPO, GRPO, DPO).

    A finetuned model is prompted in the format it was trained on (`train_sft.prompt_format`), the base
    model in `generate.prompt_format`.
    """
    prompts = out_dir / "answers" / "prompts.jsonl"
    write_jsonl(prompts, ({"id": i, "text": t} for i, t in seed_queries(cfg)))
    out: dict[str, dict[str, str]] = {}
    for name, ref in models(cfg).items():
        if ref is None:
            continue
        model_dir = out_dir / "answers" / name
        reset_if_changed(model_dir, [p for p in [paths.local_model_path(ref)] if p is not None])
        gen = cfg.generate.model_copy(update={
            "model": cfg.generate.model.model_copy(update={"ref": ref}),
            "sampling": cfg.generate.sampling.model_copy(update={"temperature": 0.0, "n": 1}),
            "prompt_format": cfg.generate.prompt_format if name == "base" else cfg.train_sft.prompt_format,
            "prompts": str(prompts), "output": model_dir / "responses.jsonl",
        })
        generate.run(cfg.model_copy(update={"generate": gen}))
        out[name] = {r.query_id: r.responses[0] for r in read_rows(model_dir / "responses.jsonl", Response)}
    return out


# --- the results table ------------------------------------------------------------------------------------

def row(group: str, what: str, p: dict | None = None, note: str = "", text: str | None = None) -> dict:
    """One line of the results table: a proportion with its interval, or a text value, or why it is missing."""
    return {"result": group, "what": what, "value": None if p is None else p.get("value"),
            "ci_low": None if p is None else p.get("ci_low"), "ci_high": None if p is None else p.get("ci_high"),
            "n": None if p is None else p.get("n"), "text": text, "note": note}


def benchmark_rows(cfg: Config) -> list[dict]:
    eval_dir = paths.stage_dir(cfg, "eval")
    summary = _read_json(paths.eval_summary_file(cfg))
    rows = []
    for suite, title in BENCHMARKS.items():
        for name in MODELS:
            if summary is None:
                rows.append(row(title, name, note="did not run: the eval stage has not run"))
                continue
            why = summary["not_run"].get(name) or summary["not_run"].get(suite)
            rep = _read_json(eval_dir / name / "report.json")
            if not why and name not in summary["runs"]:  # an eval from before this model's stage ran
                why = missing_model(name) if models(cfg)[name] is None else "the eval stage ran before this model existed"
            if why or rep is None or suite not in rep["suites"]:
                rows.append(row(title, name, note=f"did not run: {why or 'not in eval.suites'}"))
                continue
            s = rep["suites"][suite]
            note = f"chance {100 * s['chance']:.1f} %" if "chance" in s else "chance 50 %"
            if s.get("subsets"):
                note += "; items: " + ", ".join(f"{k} {v['n']}" for k, v in s["subsets"].items() if v["n"])
            rows.append(row(title, name, s["accuracy"], note=note))
    return rows


def rm_rows(cfg: Config) -> list[dict]:
    """RM accuracy and prefer-longer on each file eval_rm scored (ties count half, as `rm_accuracy` does)."""
    rep = _read_json(paths.rm_accuracy_file(cfg))
    heldout = paths.rm_heldout_file(cfg)
    wanted = ([("held-out synthetic comparisons", heldout)] if heldout else []) + \
             [(f"HH-RLHF {Path(p).stem}", Path(p)) for p in cfg.eval_rm.inputs]
    if not wanted:
        return [row("RM accuracy", "—", note="did not run: no held-out split (train_rm.heldout_fraction) "
                                              "and no eval_rm.inputs")]
    by_file = {Path(r["file"]): r for r in (rep or {}).get("results", [])}
    rows = []
    for label, path in wanted:
        r = by_file.get(path)
        if r is None:
            why = ("the eval_rm stage has not run" if rep is None else f"{path} was not scored ("
                   + ("no held-out pairs" if label.startswith("held-out") else "file not found") + ")")
            rows.append(row(f"RM accuracy, {label}", "reward model", note=f"did not run: {why}"))
            continue
        n = r["pairs"]
        for what, key in (("reward model", "rm_accuracy"), ("prefer-longer baseline", "length_baseline")):
            rows.append(row(f"RM accuracy, {label}", what, proportion(round(r[key] * n), n)))
    return rows


def rmsp_rows(cfg: Config) -> list[dict]:
    rep = _read_json(paths.rmsp_vs_self_play_dir(cfg) / "report.json")
    title = "RMSP vs plain self-play (RM score of the kept reply)"
    if rep is None:
        why = (_read_json(paths.eval_summary_file(cfg)) or {}).get("not_run", {}).get(
            "rmsp_vs_self_play", "the eval stage has not run")
        return [row(title, "—", note=f"did not run: {why}")]
    rows = []
    for t, r in rep["per_turn"].items():
        n = r["paired_dialogues"]
        if not n:
            rows.append(row(title, f"turn {t}", note="no dialogue reached this turn in both arms"))
            continue
        text = f"{r['rmsp_mean_reward']:.3f} vs {r['self_play_mean_reward']:.3f} ({r['mean_difference']:+.3f})"
        rows.append(row(title, f"turn {t}: mean score, RMSP vs self-play", text=text, note=f"{n} paired dialogues"))
        rows.append(row(title, f"turn {t}: RMSP scored higher", proportion(round(r["rmsp_higher_share"] * n), n)))
    return rows


def judge_rows(cfg: Config) -> list[dict]:
    title = "PPO vs SFT, order-swapped judge"
    rep = _read_json(paths.stage_dir(cfg, "eval") / paths.PPO_VS_SFT / "report.json")
    if rep is None:
        why = (_read_json(paths.eval_summary_file(cfg)) or {}).get("not_run", {}).get(
            paths.PPO_VS_SFT, "the eval stage has not run")
        return [row(title, "—", note=f"did not run: {why}")]
    s = rep["suites"]["judge"]
    return [row(title, f"PPO {k}", s["overall"][k], note=s["judge_label"] if k == "win" else "")
            for k in ("win", "tie", "loss")]


RM_SCORE = "RM mean score on held-out prompts (± SE over prompts)"


def rm_score_rows(cfg: Config) -> list[dict]:
    """Every model's mean RM score on the same prompts, and its paired difference to the SFT model."""
    rep = _read_json(paths.rm_score_file(cfg))
    if rep is None:
        return [row(RM_SCORE, "—", note="did not run: the optional rm_score stage has not run (--with rm_score)")]
    rows = []
    for name in MODELS:
        r = rep["results"].get(name)
        if r is None or r["mean"] is None:
            rows.append(row(RM_SCORE, name, note=f"did not run: {rep['not_run'].get(name, 'no answers')}"))
            continue
        se = f" ± {r['se']:.3f}" if r["se"] is not None else ""
        note = f"{r['n']} answers"
        if (d := r.get("vs_sft")) and d["mean"] is not None:
            d_se = f" ± {d['se']:.3f}" if d["se"] is not None else ""
            note += f"; vs SFT {d['mean']:+.3f}{d_se}, higher on {d['higher']:.0%} of prompts"
        rows.append({**row(RM_SCORE, name, text=f"{r['mean']:.3f}{se}", note=note), "n": r["prompts"]})
    return rows


def results(cfg: Config) -> list[dict]:
    return [*benchmark_rows(cfg), *rm_rows(cfg), *rmsp_rows(cfg), *judge_rows(cfg), *rm_score_rows(cfg)]


def stage_rows(cfg: Config) -> list[dict]:
    """Every stage before the report (the optional ones too): done or not, headline numbers, wall time."""
    out = []
    for st in EVERY_STAGE:
        m = read_manifest(st.stage_dir(cfg))
        if m is None:
            out.append({"stage": st.name, "status": "did not run", "summary": "", "wall_time_s": None})
        else:
            s = summary(m)
            out.append({"stage": st.name, "status": "done", "summary": summary_line(st.headline, s),
                        "wall_time_s": s["wall_time_s"], "memory": s["memory"], "counts": s["counts"],
                        "metrics": s["metrics"]})
    return out


def subsets(cfg: Config) -> dict[str, str]:
    out = eval_stage.subsets(cfg.eval)
    out["eval_rm"] = (f"held-out: the comparisons of {100 * cfg.train_rm.heldout_fraction:.0f} % of queries "
                      f"(stable hash); HH-RLHF: " + (f"the first {cfg.eval_rm.limit} pairs of each file"
                                                     if cfg.eval_rm.limit else "every pair"))
    queries = f"the first {cfg.rmsp.num_queries} queries" if cfg.rmsp.num_queries else "every query"
    out["rmsp_vs_self_play"] = f"{queries}, {cfg.rmsp.max_turns} assistant turns, best of {cfg.rmsp.best_of}"
    out["rm_score"] = rm_score_prompts_text(cfg)
    return out


def rm_score_prompts_text(cfg: Config) -> str:
    """Which prompts rm_score asked, in words: their source, how many, and which training stage saw them."""
    s = cfg.rm_score
    source = (f"the queries of train_rm's held-out comparisons ({paths.rm_heldout_file(cfg)}), which the RM "
              "never trained on") if s.prompts is None else f"{s.prompts}"
    text = (f"{source}{f', the first {s.limit}' if s.limit else ''}; {s.samples_per_prompt} answers per prompt "
            f"and model at temperature {s.sampling.temperature:g}, at most {s.sampling.max_new_tokens} new tokens")
    rep = _read_json(paths.rm_score_file(cfg))
    if rep is not None:
        seen = ", ".join(f"{k}: {v}" for k, v in rep["prompts"]["seen_in_training"].items()) or "none checked"
        text += f"; {len(rep['prompts']['ids'])} prompts, of which also in training inputs: {seen}"
    return text


# --- rendering ---------------------------------------------------------------------------------------------

def _pct(r: dict) -> tuple[str, str]:
    if r["text"] is not None:
        return r["text"], ""
    if r["value"] is None:
        return "—", ""
    return f"{100 * r['value']:.1f}", f"{100 * r['ci_low']:.1f}–{100 * r['ci_high']:.1f}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def results_markdown(rows: list[dict]) -> list[str]:
    lines = ["| result | model / arm | % (or score) | 95 % CI | n | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        value, ci = _pct(r)
        lines.append(f"| {r['result']} | {r['what']} | {value} | {ci} | {r['n'] if r['n'] is not None else ''} "
                     f"| {_cell(r['note'])} |")
    return lines


def markdown(report: dict) -> str:
    lines = [f"# Pipeline report: run `{report['run_name']}`", "",
             "Every proportion has its 95 % Wilson score interval. RM accuracies count a tie as half a pair. "
             "Mean RM scores carry one standard error over prompts (n: prompts).", "",
             "## Results", "", *results_markdown(report["results"]), "", "## Subsets scored (from the config)", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["subsets"].items()]
    lines += ["", "## Stages", "", "| stage | status | wall time s | peak MiB (driver / actors) | counts and key metrics |",
              "|---|---|---:|---:|---|"]
    for s in report["stages"]:
        wall = f"{s['wall_time_s']:.0f}" if s["wall_time_s"] is not None else ""
        lines.append(f"| {s['stage']} | {s['status']} | {wall} | {peak_cell(s.get('memory'))} | {_cell(s['summary'])} |")
    names = [m for m in MODELS if m in report["answers"]]
    lines += ["", "## The same queries, answered by each model (greedy)", ""]
    if not names:
        lines.append("No model answered (the report ran without Ray models).")
    else:
        lines += ["| query | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for qid, text in report["queries"]:
            cells = [_cell(report["answers"][m].get(qid, "")) or "(empty)" for m in names]
            lines.append(f"| {_cell(text)} | " + " | ".join(cells) + " |")
        missing = [m for m in MODELS if m not in report["answers"]]
        if missing:
            lines.append(f"\nNot answered: {', '.join(missing)} (no such model in this run).")
    lines += ["", "## Plots", "", *[f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]], ""]
    return "\n".join(lines)


def plot(report: dict, out_dir: Path) -> list[Path]:
    """`results.png` (benchmarks and RM accuracy with Wilson error bars) and `stage_times.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    bench = [r for r in report["results"] if r["result"] in BENCHMARKS.values()]
    width = 0.8 / len(MODELS)
    for k, name in enumerate(MODELS):
        rs = [r for r in bench if r["what"] == name]
        xs = [i + (k - (len(MODELS) - 1) / 2) * width for i in range(len(rs))]
        vals = [r["value"] or 0 for r in rs]
        errs = [[(r["value"] - r["ci_low"]) if r["value"] is not None else 0 for r in rs],
                [(r["ci_high"] - r["value"]) if r["value"] is not None else 0 for r in rs]]
        ax1.bar(xs, vals, width, yerr=errs, capsize=3, label=name)
    ax1.set_xticks(range(len(BENCHMARKS)), list(BENCHMARKS.values()))
    ax1.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax1.set_ylim(0, 1)
    ax1.set_title("base, SFT, PPO, GRPO, DPO (missing bar: did not run)")
    ax1.legend(fontsize=8)
    rm = [r for r in report["results"] if r["result"].startswith("RM accuracy") and r["value"] is not None]
    labels = [f"{r['result'].removeprefix('RM accuracy, ')}\n{r['what']}" for r in rm]
    ax2.barh(range(len(rm)), [r["value"] for r in rm],
             xerr=[[r["value"] - r["ci_low"] for r in rm], [r["ci_high"] - r["value"] for r in rm]], capsize=3,
             color=["#36a" if r["what"] == "reward model" else "#bbb" for r in rm])
    ax2.set_yticks(range(len(rm)), labels, fontsize=7)
    ax2.invert_yaxis()
    ax2.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax2.set_xlim(0, 1)
    ax2.set_title("RM pairwise accuracy vs prefer-longer" if rm else "RM accuracy: did not run")
    fig.tight_layout()
    paths = [out_dir / "results.png", out_dir / "stage_times.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    timed = [s for s in report["stages"] if s["wall_time_s"] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(report["stages"]) + 1))
    ax.barh([s["stage"] for s in timed], [s["wall_time_s"] for s in timed], color="#3a7")
    ax.invert_yaxis()
    ax.set_xlabel("wall time, s (from each stage's manifest)")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def _inputs(cfg: Config) -> dict[str, Path]:
    found = {f"{s.name}_manifest": s.stage_dir(cfg) / MANIFEST for s in EVERY_STAGE}
    found["rmsp_compare"] = paths.rmsp_vs_self_play_dir(cfg) / "report.json"
    return {k: p for k, p in found.items() if p.is_file()}


def write_report(cfg: Config, out_dir: Path, answered: dict[str, dict[str, str]]) -> dict:
    """Collect everything from the run's files, plot, write report.json and report.md; returns the report."""
    report = {"run_name": cfg.run_name, "results": results(cfg), "subsets": subsets(cfg),
              "stages": stage_rows(cfg), "queries": seed_queries(cfg), "answers": answered}
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = [str(p) for p in plot(report, out_dir)]
    write_json(out_dir / "report.json", report)
    with atomic_open(out_dir / "report.md") as f:
        f.write(markdown(report))
    return report


def work(cfg: Config) -> Outcome:
    """Collect, plot and write `report.md`/`report.json`; every model the run has answers side by side."""
    out_dir = paths.report_dir(cfg)
    report = write_report(cfg, out_dir, answers(cfg, out_dir))
    return Outcome(counts={"stages_done": sum(s["status"] == "done" for s in report["stages"]),
                           "result_rows": len(report["results"]),
                           "rows_not_run": sum(r["note"].startswith("did not run") for r in report["results"]),
                           "answers": sum(len(a) for a in report["answers"].values())})


STAGE = Stage(
    "report", "report.md, report.json and plots; the same queries answered by every model",
    section=lambda c: c.report, inputs=_inputs,
    outputs=lambda c: {"markdown": paths.report_dir(c) / "report.md", "json": paths.report_dir(c) / "report.json"},
    work=work, check=lambda c: seed_queries(c), headline=("counts.*",),
)


def run(cfg: Config) -> Path:
    """`<run>/report/`: report.md, report.json, results.png, stage_times.png; manifest.json last."""
    return STAGE.run(cfg)


def terminal_summary(out_dir: Path) -> str:
    """The results table as text, the answers in short, and where the report and plots are."""
    report = json.loads((Path(out_dir) / "report.json").read_text())
    width = min(shutil.get_terminal_size((120, 40)).columns, 140)
    lines = ["Results (95 % Wilson intervals):"]
    for r in report["results"]:
        value, ci = _pct(r)
        n = f"n={r['n']}" if r["n"] is not None else ""
        lines.append(f"  {r['result'][:44]:<44} {r['what'][:34]:<34} {value:>9} {ci:>12} {n:>6}  {r['note'][:60]}")
    lines.append("\nThe same queries, greedy:")
    for qid, text in report["queries"]:
        lines.append(f"  Q: {text}")
        for m in MODELS:
            if m in report["answers"]:
                answer = " ".join(report["answers"][m].get(qid, "").split()) or "(empty)"
                lines.append(textwrap.shorten(f"    {m:>8}: {answer}", width=width, placeholder=" …"))
    lines.append(f"\nreport: {Path(out_dir) / 'report.md'}")
    lines += [f"plot:   {p}" for p in report["plots"]]
    return "\n".join(lines)

