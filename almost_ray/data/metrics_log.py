"""What a training run leaves for a person: a summary of `metrics.jsonl` and a PNG of its curves."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """`metrics.jsonl`, one line per step (training) or iteration (PPO), keyed by `key`; on resume, the
    lines after the checkpoint are dropped so a resumed run's log reads as an uninterrupted one's."""

    def __init__(self, path: Path, keep_until: int, key: str = "step"):
        self.path = path
        kept = []
        if keep_until and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)[key] <= keep_until]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return [json.loads(ln) for ln in lines if ln.strip()]


def summarize(path: str | Path) -> dict:
    """Final and tail-averaged loss, throughput without the first (warm-up) step, time in the loop."""
    rows = read_metrics(path)
    if not rows:
        return {}
    tail = rows[-max(1, len(rows) // 10) :]
    steady = rows[1:] or rows
    time_s = sum(r["step_time_s"] for r in steady)
    out = {
        "steps": rows[-1]["step"],
        "final_loss": rows[-1]["loss"],
        "tail_loss": sum(r["loss"] for r in tail) / len(tail),
        "train_time_s": round(sum(r["step_time_s"] for r in rows), 3),
        "samples_per_s": round(sum(r["samples"] for r in steady) / time_s, 4) if time_s else None,
        "tokens_per_s": round(sum(r["tokens"] for r in steady) / time_s, 2) if time_s else None,
    }
    if "accuracy" in rows[-1]:
        out["tail_accuracy"] = sum(r["accuracy"] for r in tail) / len(tail)
    for key in ("rewards/accuracies", "rewards/margins"):  # DPO, under TRL's names
        if key in rows[-1]:
            out[f"tail_{key.replace('/', '_')}"] = sum(r[key] for r in tail) / len(tail)
    return out


def plot_metrics(
    path: str | Path, png: str | Path, keys: list[str], title: str = "", x: str = "step", xlabel: str = "optimizer step"
) -> Path | None:
    """One panel per metric against `x` (the step; PPO: the iteration) (matplotlib, Agg: no display needed)."""
    rows = read_metrics(path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    steps = [r[x] for r in rows]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [r.get(key) for r in rows], marker="." if len(rows) < 50 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
