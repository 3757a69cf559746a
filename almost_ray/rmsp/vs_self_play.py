"""RMSP against plain self-play on the same queries, measured in one run (ALMoST Table 5, Figure 10).

Both arms run the same models, prompts, seeds and queries; the plain arm keeps the assistant's single
sample (`best_of: 1`) and the RM only scores it, never chooses. The report gives, per assistant turn,
the RM's mean score of each arm's responses over the dialogues both arms reached, their paired
difference, and how often RMSP's response scored higher. Turn 1 is a like-for-like comparison (same
query as context); later turns compare each arm inside its own dialogue.
"""

from __future__ import annotations

import time
from pathlib import Path

from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.atomic import write_json
from almost_ray.data.sources import read_rows
from almost_ray.rmsp import stage, turns
from almost_ray.runs import paths
from almost_ray.runs.manifest import read_manifest


def plain_config(cfg: Config) -> Config:
    """The self-play arm: one sample per turn, scored by the same RM but not chosen by it, in its own folder."""
    plain = cfg.rmsp.model_copy(update={"best_of": 1, "output_dir": paths.rmsp_plain_dir(cfg)})
    return cfg.model_copy(update={"rmsp": plain})


def chosen_scores(records: list[dict]) -> dict[tuple[str, int], float]:
    """(dialogue id, turn) -> RM score of the response the dialogue kept at that turn."""
    out = {}
    for rec in records:
        for t in rec["assistant_turns"]:
            if t["scores"] and t["chosen"] is not None:
                out[(rec["id"], t["turn"])] = t["scores"][t["chosen"]]
    return out


def compare_records(rmsp: list[dict], plain: list[dict], max_turns: int) -> dict[str, dict]:
    """Per turn, over the (id, turn) pairs both arms have: mean RM score of each arm's kept response,
    the mean paired difference (RMSP minus self-play) and the share where RMSP scored higher."""
    a, b = chosen_scores(rmsp), chosen_scores(plain)
    out = {}
    for t in range(1, max_turns + 1):
        keys = sorted(k for k in a if k[1] == t and k in b)
        diffs = [a[k] - b[k] for k in keys]
        n = len(keys)
        out[str(t)] = {
            "paired_dialogues": n,
            "rmsp_mean_reward": sum(a[k] for k in keys) / n if n else None,
            "self_play_mean_reward": sum(b[k] for k in keys) / n if n else None,
            "mean_difference": sum(diffs) / n if n else None,
            "rmsp_higher_share": sum(d > 0 for d in diffs) / n if n else None,
        }
    return out


def _all_records(stage_dir: Path) -> list[dict]:
    return [*read_rows(stage_dir / "dialogues.jsonl"), *read_rows(stage_dir / "dropped.jsonl")]


def run_compare(cfg: Config) -> dict:
    """Run the RMSP arm (`<run>/rmsp`) and the self-play arm (`<run>/rmsp-plain`), each a run of the rmsp
    stage, then write `<run>/rmsp-compare/report.json` and `report.png`."""
    r = cfg.rmsp
    if stage.mode(r) != "rmsp":
        raise ConfigError("rmsp: --compare-plain needs a reward model and best_of > 1 (the RMSP arm)")
    started = time.time()
    rmsp_dir = stage.run(cfg)
    plain_dir = stage.run(plain_config(cfg))
    rmsp_records, plain_records = _all_records(rmsp_dir), _all_records(plain_dir)
    manifests = {"rmsp": read_manifest(rmsp_dir), "self_play": read_manifest(plain_dir)}
    report = {
        "switches": stage.run_meta(r, paths.rmsp_reward_model(cfg)),
        "per_turn": compare_records(rmsp_records, plain_records, r.max_turns),
        "rmsp_per_turn": turns.turn_metrics(rmsp_records, r.max_turns),
        "self_play_per_turn": turns.turn_metrics(plain_records, r.max_turns),
        "counts": {arm: m["counts"] for arm, m in manifests.items()},
        "wall_time_s": {**{arm: m["wall_time_s"] for arm, m in manifests.items()},
                        "this_call": round(time.time() - started, 1)},
    }
    out_dir = paths.rmsp_vs_self_play_dir(cfg)
    write_json(out_dir / "report.json", report)
    plot_compare(report, out_dir / "report.png")
    return report


def summary_lines(report: dict) -> list[str]:
    """A small table for the terminal."""
    lines = ["turn  pairs   RMSP reward   self-play reward   diff    RMSP higher   RMSP best-vs-mean gap"]
    for t, row in report["per_turn"].items():
        if not row["paired_dialogues"]:
            lines.append(f"{t:>4}  {0:>5}   (no dialogue reached this turn in both arms)")
            continue
        gap = report["rmsp_per_turn"][t]["mean_best_minus_mean"]
        lines.append(
            f"{t:>4}  {row['paired_dialogues']:>5}   {row['rmsp_mean_reward']:>11.3f}   "
            f"{row['self_play_mean_reward']:>16.3f}   {row['mean_difference']:>+6.3f}   "
            f"{row['rmsp_higher_share']:>10.0%}   {gap if gap is None else f'{gap:+.3f}':>20}"
        )
    c = report["counts"]
    lines.append(
        f"dialogues: RMSP {c['rmsp']['dialogues']} ({_complete(c['rmsp'])} complete), "
        f"self-play {c['self_play']['dialogues']} ({_complete(c['self_play'])} complete); "
        f"wall time s: {report['wall_time_s']}"
    )
    return lines


def _complete(counts: dict) -> int | None:
    return next((v for k, v in counts.items() if k.startswith("complete_")), None)


def plot_compare(report: dict, path: Path) -> None:
    """Grouped bars per turn: self-play, RMSP's first sample, the mean of RMSP's N, RMSP's chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns_ = list(report["per_turn"])
    series = {
        "self-play (its one sample)": [report["per_turn"][t]["self_play_mean_reward"] for t in turns_],
        "RMSP: first sample": [report["rmsp_per_turn"][t]["mean_first_sample_reward"] for t in turns_],
        "RMSP: mean of N": [report["rmsp_per_turn"][t]["mean_candidate_reward"] for t in turns_],
        "RMSP: chosen (best of N)": [report["rmsp_per_turn"][t]["mean_chosen_reward"] for t in turns_],
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(turns_))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks(range(len(turns_)), [f"assistant turn {t}" for t in turns_])
    ax.set_ylabel("mean RM score")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(f"RMSP vs self-play (RM: {Path(str(report['switches']['reward_model'])).name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
