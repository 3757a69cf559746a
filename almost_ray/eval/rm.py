"""The `eval_rm` stage (`almost-ray eval-rm`): pairwise accuracy of a reward model, next to the always-longer baseline.

ALMoST Table 3 reports RM accuracy on HH-RLHF's helpful-base split (Bai et al., 2022) next to a
"lengthy baseline" that always prefers the longer response (59.4 %). Any comparisons file works
too (see `preferences.py` for the formats). Scoring runs on a Ray Data actor pool of
RM replicas (one RM per actor); a tie counts as half a correct pair, for both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.pools import stream_pool
from almost_ray.cluster.replicas import ModelReplica, reward_model
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.atomic import write_json
from almost_ray.data.preferences import PreferencePair, load_pairs
from almost_ray.eval.config import EvalRMConfig
from almost_ray.models.loading import check_model_ref, resolve_model_dir
from almost_ray.models.reward import score_conversations
from almost_ray.runs import paths
from almost_ray.runs.stage import Outcome, Stage


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
    """RM scores of every chosen and rejected conversation, through a Ray Data pool of RM replicas."""
    rows = [{"i": 2 * k, "conversation": json.dumps(p.chosen)} for k, p in enumerate(pairs)]
    rows += [{"i": 2 * k + 1, "conversation": json.dumps(p.rejected)} for k, p in enumerate(pairs)]
    rows.sort(key=lambda r: len(r["conversation"]))  # similar lengths per batch: less padding
    kwargs = dict(answer=score_conversations,
                  model=reward_model(model, max_length=cfg.max_length, batch_size=cfg.resources.batch_size))
    scores = {int(r["i"]): float(r["reward"])
              for r in stream_pool(rows, ModelReplica, kwargs, cfg.resources, "eval_rm.resources")}
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


def scored_files(cfg: Config) -> tuple[list[Path], list[Path]]:
    """(the files eval_rm scores, configured files that are missing): train_rm's held-out split when it has
    pairs, then `eval_rm.inputs` (third-party data such as HH-RLHF, absent from a user's clone)."""
    heldout = paths.rm_heldout_file(cfg)
    files = [heldout] if heldout is not None and heldout.is_file() and heldout.stat().st_size else []
    present = [Path(p) for p in cfg.eval_rm.inputs if Path(p).is_file()]
    return files + present, [Path(p) for p in cfg.eval_rm.inputs if not Path(p).is_file()]


def notes(cfg: Config) -> list[str]:
    files, missing = scored_files(cfg)
    out = [f"eval_rm.inputs: {p} not found, not scored (third-party data, see docs/evaluation.md)" for p in missing]
    if (heldout := paths.rm_heldout_file(cfg)) is not None and heldout not in files:
        out.append(f"{heldout}: no held-out pairs to score (the split held out no query)")
    return out


def check(cfg: Config) -> None:
    """Every pair of every file scored, and the RM (a one-output sequence classifier), before Ray starts."""
    files, _ = scored_files(cfg)
    if not files:
        raise ConfigError("eval_rm: nothing to score: set train_rm.heldout_fraction > 0 or eval_rm.inputs "
                          "(files that exist)")
    for path in files:
        load_pairs(path, limit=cfg.eval_rm.limit)
    check_model_ref(paths.eval_rm_model(cfg), "eval_rm.model", "reward_model",
                    made_by=None if cfg.eval_rm.model else "train-rm")


def work(cfg: Config) -> Outcome:
    """Score every pair with the RM on one actor pool; `rm_accuracy.json` and `.png` beside the manifest."""
    e = cfg.eval_rm
    model = paths.eval_rm_model(cfg)
    files, _ = scored_files(cfg)
    started = time.time()
    resolve_model_dir(model)  # a GGUF is converted once here, not in every actor
    data = [(path, load_pairs(path, limit=e.limit)) for path in files]
    init_ray(cfg.ray)
    # one actor pool for all files: each replica loads the RM once
    chosen, rejected = score_pairs(model, [p for _, pairs in data for p in pairs], e)
    results, start = [], 0
    for path, pairs in data:
        end = start + len(pairs)
        results.append(file_result(path, pairs, chosen[start:end], rejected[start:end]))
        start = end
    output = paths.rm_accuracy_file(cfg)
    write_json(output, {"model": model, "config": e.model_dump(mode="json"), "results": results,
                        "wall_time_s": round(time.time() - started, 2)})
    plot(results, output.with_suffix(".png"))
    print(format_table(results))
    return Outcome(counts={Path(r["file"]).stem: r["pairs"] for r in results},
                   metrics={Path(r["file"]).stem: {k: r[k] for k in ("rm_accuracy", "length_baseline")}
                            for r in results})


def _inputs(cfg: Config) -> dict[str, Path | str]:
    files, _ = scored_files(cfg)
    model = paths.local_model_path(paths.eval_rm_model(cfg))  # a tiny:/embedded: ref is in the config hash
    return {**({"reward_model": model} if model else {}), **{f"pairs_{i}": p for i, p in enumerate(files)}}


STAGE = Stage(
    "eval_rm", "RM accuracy on held-out synthetic comparisons and HH-RLHF, vs prefer-longer",
    section=lambda c: c.eval_rm, inputs=_inputs,
    outputs=lambda c: {"report": paths.rm_accuracy_file(c)},
    work=work, check=check, notes=notes,
)


def run(cfg: Config) -> Path:
    """RM accuracy into `<run dir>/eval_rm/rm_accuracy.json`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)
