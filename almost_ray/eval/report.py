"""The eval report: `report.json`, `report.md` (markdown tables) and one PNG bar plot per suite.

Every number is a proportion with its count and a 95 % Wilson score interval (`stats.py`); plots draw
the intervals as error bars and chance as a dashed line.
"""

from __future__ import annotations

from pathlib import Path

from almost_ray.data.atomic import atomic_open, write_json

CI_NOTE = "95 % confidence intervals are Wilson score intervals."
SUITE_TITLES = {
    "hhh": "Static HHH alignment",
    "truthfulqa": "TruthfulQA MC1",
    "ranking": "Response ranking (Hewitt et al.)",
    "judge": "Pairwise judging with order swap",
}


def pct(p: dict) -> str:
    return "—" if p["value"] is None else f"{100 * p['value']:.1f}"


def ci(p: dict) -> str:
    return f"{100 * p['ci_low']:.1f}–{100 * p['ci_high']:.1f}"


def _judge_protocol(s: dict) -> str:
    """One sentence on how a judge suite decided its pairs."""
    if s["judge_kind"] != "model":
        return f"Reward difference within {s['tie_margin']} is a tie."
    if s.get("decision", "both_orders") == "margin_sum":
        return "Each pair judged in both orders; decided on the sum of the two orders' log-odds."
    return "Each pair judged in both orders; a tie when they disagree."


def markdown(report: dict) -> str:
    lines = [f"# Evaluation of `{report['model_label']}`", "", CI_NOTE, ""]
    suites = report["suites"]
    if "hhh" in suites:
        s = suites["hhh"]
        lines += [f"## {SUITE_TITLES['hhh']} ({s['mode']} mode)", "", "| split | accuracy % | 95 % CI | n |",
                  "|---|---:|---:|---:|"]
        for name, p in [*s["subsets"].items(), ("all", s["accuracy"])]:
            lines.append(f"| {name} | {pct(p)} | {ci(p)} | {p['n']} |")
        if "position" in s:
            pos = s["position"]
            lines += ["", "Both orders of the two replies were scored; `all` decides on the sum of the two "
                      "orders' log-odds, which cancels a fixed preference for a position.", "",
                      "| position measure | % | 95 % CI | n |", "|---|---:|---:|---:|"]
            for label, key in (("accuracy, better reply shown first", "accuracy_better_first"),
                               ("accuracy, better reply shown second", "accuracy_better_second"),
                               ("right in both orders", "accuracy_both_orders"),
                               ("answers 'A' (50 = no position bias)", "rate_answer_a")):
                lines.append(f"| {label} | {pct(pos[key])} | {ci(pos[key])} | {pos[key]['n']} |")
            lines.append(f"\nMean log-odds of 'A' over 'B', whatever the content: {pos['mean_a_logodds']:+.3f}.")
        lines.append("")
    if "truthfulqa" in suites:
        s = suites["truthfulqa"]
        mode = s["mode"] + (f", normalize={s['normalize']}" if s.get("normalize") else "")
        p = s["accuracy"]
        lines += [f"## {SUITE_TITLES['truthfulqa']} ({mode})", "", "| metric | % | 95 % CI | n |",
                  "|---|---:|---:|---:|", f"| accuracy | {pct(p)} | {ci(p)} | {p['n']} |",
                  f"| chance (1 / choices) | {100 * s['chance']:.1f} | | |", ""]
    if "ranking" in suites:
        p = suites["ranking"]["ranking_capability"]
        lines += [f"## {SUITE_TITLES['ranking']}", "", "| metric | % | 95 % CI | triples |", "|---|---:|---:|---:|",
                  f"| p(own response) > p(other's response) | {pct(p)} | {ci(p)} | {p['n']} |", ""]
    if "judge" in suites:
        s = suites["judge"]
        lines += [f"## {SUITE_TITLES['judge']}: `{report['model_label']}` vs `{s['vs_label']}`", "",
                  f"Judge: {s['judge_label']}. {_judge_protocol(s)}",
                  "", "| questions | win % | tie % | loss % | win, ties half % | n |", "|---|---:|---:|---:|---:|---:|"]
        for name, r in [*s["sets"].items(), ("all", s["overall"])]:
            lines.append(f"| {name} | {pct(r['win'])} ({ci(r['win'])}) | {pct(r['tie'])} ({ci(r['tie'])}) | "
                         f"{pct(r['loss'])} ({ci(r['loss'])}) | {100 * r['win_rate_ties_half']:.1f} | {r['n']} |")
        if "answers" in s:
            a, b = s["answers"]["a"], s["answers"]["b"]
            lines += ["", "| answers of | mean words | repeated-word fraction | empty | n |", "|---|---:|---:|---:|---:|",
                      f"| `{report['model_label']}` | {a['mean_words']:.1f} | {a['mean_repeated_word_fraction']:.3f} "
                      f"| {a['empty']} | {a['n']} |",
                      f"| `{s['vs_label']}` | {b['mean_words']:.1f} | {b['mean_repeated_word_fraction']:.3f} "
                      f"| {b['empty']} | {b['n']} |"]
        if "judge_rate_answer_a" in s:
            p = s["judge_rate_answer_a"]
            lines.append(f"\nThe judge answered 'A' in {pct(p)} % of its {p['n']} verdicts ({ci(p)}; 50 = no position bias).")
        lines.append("")
    return "\n".join(lines)


def summary_lines(report: dict) -> list[str]:
    """One line per headline number, for the terminal."""
    out = []
    suites = report["suites"]
    if "hhh" in suites:
        p = suites["hhh"]["accuracy"]
        subs = ", ".join(f"{k} {pct(v)}" for k, v in suites["hhh"]["subsets"].items())
        out.append(f"Static HHH accuracy: {pct(p)} % (95 % CI {ci(p)}, n={p['n']}; {subs})")
    if "truthfulqa" in suites:
        p = suites["truthfulqa"]["accuracy"]
        out.append(f"TruthfulQA MC1 accuracy: {pct(p)} % (95 % CI {ci(p)}, n={p['n']})")
    if "ranking" in suites:
        p = suites["ranking"]["ranking_capability"]
        out.append(f"Response ranking: {pct(p)} % (95 % CI {ci(p)}, triples={p['n']})")
    if "judge" in suites:
        r = suites["judge"]["overall"]
        out.append(f"Judge vs {suites['judge']['vs_label']}: win {pct(r['win'])} % ({ci(r['win'])}), "
                   f"tie {pct(r['tie'])} %, loss {pct(r['loss'])} % (n={r['n']})")
    return out


def plot(report: dict, out_dir: Path) -> list[Path]:
    """One PNG per suite: bars with Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, path: Path) -> Path:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        plt.close(fig)
        return path

    def bars(name: str, labels: list[str], props: list[dict], title: str, chance: float | None) -> None:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels), 3.6))
        values = [100 * (p["value"] or 0) for p in props]
        err = [[v - 100 * p["ci_low"] for v, p in zip(values, props)],
               [100 * p["ci_high"] - v for v, p in zip(values, props)]]
        ax.bar(labels, values, yerr=err, capsize=4, color="#4C72B0")
        for i, p in enumerate(props):
            ax.text(i, 2, f"n={p['n']}", ha="center", color="white", fontsize=8)
        if chance is not None:
            ax.axhline(100 * chance, ls="--", color="grey", lw=1, label="chance")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("% (95 % Wilson CI)")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        written.append(save(fig, out_dir / f"{name}.png"))

    label = report["model_label"]
    suites = report["suites"]
    if "hhh" in suites:
        s = suites["hhh"]
        names = [*s["subsets"], "all"]
        bars("hhh", names, [*s["subsets"].values(), s["accuracy"]], f"Static HHH — {label}", 0.5)
    if "truthfulqa" in suites:
        s = suites["truthfulqa"]
        bars("truthfulqa", ["MC1"], [s["accuracy"]], f"TruthfulQA — {label}", s["chance"])
    if "ranking" in suites:
        bars("ranking", ["ranking"], [suites["ranking"]["ranking_capability"]], f"Response ranking — {label}", 0.5)
    if "judge" in suites:
        s = suites["judge"]
        groups = [*s["sets"].items(), ("all", s["overall"])]
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(groups), 3.6))
        bottom = [0.0] * len(groups)
        for outcome, color in (("win", "#55A868"), ("tie", "#BBBBBB"), ("loss", "#C44E52")):
            vals = [100 * (r[outcome]["value"] or 0) for _, r in groups]
            ax.bar([g for g, _ in groups], vals, bottom=bottom, color=color, label=outcome)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of questions")
        ax.set_title(f"{label} vs {s['vs_label']}", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        written.append(save(fig, out_dir / "judge.png"))
    return written


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md and the PNGs, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    with atomic_open(out_dir / "report.md") as f:
        f.write(markdown(report))
    pngs = plot(report, out_dir)
    return {"json": out_dir / "report.json", "markdown": out_dir / "report.md", **{p.stem: p for p in pngs}}
