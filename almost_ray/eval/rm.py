"""`almost-ray eval-rm`: pairwise accuracy of a reward model, next to the always-longer baseline.

ALMoST Table 3 reports RM accuracy on HH-RLHF's helpful-base split (Bai et al., 2022) next to a
"lengthy baseline" that always prefers the longer response (59.4 %). Any comparisons file works
too (see `preferences.py` for the formats). Scoring runs on a Ray Data actor pool of
`RewardReplica`s (one RM per actor); a tie counts as half a correct pair, for both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from almost_ray.cluster.config import RayConfig
from almost_ray.cluster.pools import stream_pool
from almost_ray.data.atomic import write_json
from almost_ray.data.preferences import PreferencePair, load_pairs
from almost_ray.eval.config import EvalRMConfig
from almost_ray.models.loading import resolve_model_dir
from almost_ray.runs.manifest import is_done, write_manifest


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs whose chosen side scores higher; ties count one half."""
    if not chosen or len(chosen) != len(rejected):
        raise ValueError("need equally many chosen and rejected scores, at least one")
    right = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return right / len(chosen)


def length_baseline(pairs: Sequence[PreferencePair]) -> float:
    """ALMoST's lengthy baseline: prefer the reply with more characters."""
    return pairwise_accuracy(
        [len(p.chosen_response) for p in pairs], [len(p.rejected_response) for p in pairs]
    )


def score_pairs(model: str, pairs: Sequence[PreferencePair], cfg: EvalRMConfig) -> tuple[list[float], list[float]]:
    """RM scores of every chosen and rejected conversation, through a Ray Data pool of RewardReplicas."""
    from almost_ray.models.reward import RewardReplica

    rows = [{"i": 2 * k, "conversation": json.dumps(p.chosen)} for k, p in enumerate(pairs)]
    rows += [{"i": 2 * k + 1, "conversation": json.dumps(p.rejected)} for k, p in enumerate(pairs)]
    rows.sort(key=lambda r: len(r["conversation"]))  # similar lengths per batch: less padding
    kwargs = {"ref": model, "max_length": cfg.max_length, "batch_size": cfg.resources.batch_size}
    scores = {int(r["i"]): float(r["reward"])
              for r in stream_pool(rows, RewardReplica, kwargs, cfg.resources, "eval_rm.resources")}
    return [scores[2 * k] for k in range(len(pairs))], [scores[2 * k + 1] for k in range(len(pairs))]


def file_result(path: str | Path, pairs: Sequence[PreferencePair], chosen: list[float], rejected: list[float]) -> dict:
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "file": str(path),
        "pairs": len(pairs),
        "rm_accuracy": pairwise_accuracy(chosen, rejected),
        "length_baseline": length_baseline(pairs),
        "mean_margin": sum(margins) / len(margins),
    }


def format_table(results: list[dict]) -> str:
    head = f"{'data':<44} {'pairs':>6} {'RM acc':>8} {'longer':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        name = Path(r["file"]).name
        lines.append(f"{name:<44} {r['pairs']:>6} {r['rm_accuracy']:>8.3f} {r['length_baseline']:>8.3f}")
    return "\n".join(lines)


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + 2.5 * len(results), 3.5))
    xs = range(len(results))
    ax.bar([x - 0.2 for x in xs], [r["rm_accuracy"] for r in results], 0.4, label="reward model")
    ax.bar([x + 0.2 for x in xs], [r["length_baseline"] for r in results], 0.4, label="prefer longer")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [Path(r["file"]).stem[:24] for r in results])
    ax.set_ylim(0, 1)
    ax.set_ylabel("pairwise accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run(model: str, inputs: Sequence[str | Path], cfg: EvalRMConfig, ray_cfg: RayConfig, output: str | Path) -> dict:
    """Evaluate `model` on every file; print the table, write JSON (and a PNG and manifest.json beside it).

    Skipped when the manifest beside `output` matches the config, the model and the files."""
    from almost_ray.cluster.connect import init_ray

    output = Path(output)
    model_dir = resolve_model_dir(model)  # a bad reference fails early; a GGUF is converted once, not per actor
    hashed = {"reward_model": model_dir, **{f"pairs_{i}": path for i, path in enumerate(inputs)}}
    if is_done(output.parent, cfg, hashed) and output.is_file():
        return json.loads(output.read_text())
    started = time.time()
    data = [(path, load_pairs(path, limit=cfg.limit)) for path in inputs]  # bad input fails before Ray starts
    init_ray(ray_cfg)
    # one actor pool for all files: each replica loads the RM once
    chosen, rejected = score_pairs(model, [p for _, pairs in data for p in pairs], cfg)
    results, start = [], 0
    for path, pairs in data:
        end = start + len(pairs)
        results.append(file_result(path, pairs, chosen[start:end], rejected[start:end]))
        start = end
    report = {"model": model, "config": cfg.model_dump(mode="json"), "results": results,
              "wall_time_s": round(time.time() - started, 2)}
    write_json(output, report)
    plot(results, output.with_suffix(".png"))
    write_manifest(output.parent, "eval-rm", cfg, hashed, started,
                   counts={Path(r["file"]).stem: r["pairs"] for r in results},
                   metrics={Path(r["file"]).stem: {k: r[k] for k in ("rm_accuracy", "length_baseline")}
                            for r in results})
    print(format_table(results))
    return report
