"""RMSP on the demo config, timed: >= 50 two-turn dialogues from the embedded model, and the RM score of
RMSP's chosen responses next to plain self-play's on the same queries (ALMoST Table 5's two arms).

Both arms run in this one call (`almost_ray.rmsp.vs_self_play.run_compare`): RMSP into runs/<run>/rmsp, self-play
into runs/<run>/rmsp-plain, the report into runs/<run>/rmsp-compare/report.{json,png}.

The RM: `--rm PATH` (e.g. runs/demo/rm/model from `almost-ray train-rm`); without it, runs/demo/rm/model
when it exists, else a STAND-IN: the embedded model with a random score head (seed 0), saved once under
the cache so every RM replica has the same head. A stand-in shows the machinery and the cost, not
alignment: best-of-N raises any RM's own score. Queries: `--queries FILE`, else ALMoST's 100 seed
queries (../shared/data/almost/seed_prompts.txt, developers' checkout) as a stand-in for step 1.
The CPU may be shared with other work: the mean load average is recorded next to the wall time, and the
CPU time this run's own processes used (driver, local Ray, actors), a bound on the idle-machine wall time.

Run: `.venv/bin/python bench/rmsp_demo.py [--rm DIR] [--queries FILE] [--set rmsp.key=value ...]`.
Writes bench/results/rmsp_demo.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch

from almost_ray.config import load_config
from almost_ray.data.atomic import write_json
from almost_ray.models.loading import cache_root, resolve_model_dir
from almost_ray.rmsp.vs_self_play import run_compare, summary_lines

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "data" / "almost" / "seed_prompts.txt"
EMBEDDED = "embedded:smollm2-135m-instruct"


def standin_rm(seed: int = 0) -> Path:
    """The embedded model with a seeded random score head, as an HF directory (made once)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = cache_root() / f"standin-rm-smollm2-135m-seed{seed}"
    if (out / "config.json").is_file():
        return out
    base = resolve_model_dir(EMBEDDED)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def seed_queries(run_dir: Path) -> Path:
    if not SEEDS.is_file():
        raise SystemExit(f"no --queries given and {SEEDS} is absent")
    lines = [t.strip() for t in SEEDS.read_text(encoding="utf-8").splitlines()[1:] if t.strip()]
    path = run_dir / "seed_queries.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--run-name", default="rmsp-bench")
    ap.add_argument("--rm", help="reward model directory (default: runs/demo/rm/model, else a stand-in)")
    ap.add_argument("--queries", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, [f"run_name={args.run_name}", *args.overrides])
    trained = cfg.runs_dir / "demo" / "rm" / "model"
    rm = Path(args.rm) if args.rm else trained if (trained / "config.json").is_file() else None
    standin = rm is None
    rm = rm or standin_rm()
    cfg = cfg.model_copy(update={"rmsp": cfg.rmsp.model_copy(update={
        "reward_model": cfg.rmsp.reward_model.model_copy(update={"ref": str(rm)})})})
    queries = args.queries or seed_queries(cfg.run_dir)
    loads: list[float] = []
    cpu_s: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        # The CPU is shared: record how busy it was, and the CPU time our own processes (this driver, its
        # local Ray and the actors) used, which is what the run would need on an idle machine. Actors are
        # sampled while alive (up to 5 s of each one's last moments can be missed).
        me = psutil.Process()
        while not done.wait(5):
            loads.append(os.getloadavg()[0])
            for proc in [me, *me.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    cpu_s[proc.pid] = max(cpu_s.get(proc.pid, 0.0), t.user + t.system)
                except psutil.Error:
                    pass

    threading.Thread(target=sample, daemon=True).start()

    started = time.time()
    report = run_compare(cfg.rmsp, cfg.ray, cfg.run_dir, queries)
    wall = time.time() - started
    done.set()
    mean_load = sum(loads) / len(loads) if loads else os.getloadavg()[0]
    print("\n".join(summary_lines(report)))
    rmsp_counts = report["counts"]["rmsp"]
    complete = rmsp_counts.get(f"complete_{cfg.rmsp.max_turns}_turn", 0)
    print(f"\nRM: {rm}{' (STAND-IN: random head, seed 0)' if standin else ''}")
    print(f"RMSP: {complete} complete {cfg.rmsp.max_turns}-turn dialogues of {rmsp_counts['queries']} queries "
          f"in {report['wall_time_s']['rmsp']:.0f} s; both arms and the report: {wall:.0f} s "
          f"(mean 1-min load average {mean_load:.1f} on {os.cpu_count()} CPUs)")
    used = sum(cpu_s.values())
    print(f"CPU time used by this run's processes: {used:.0f} s, i.e. >= {used / os.cpu_count():.0f} s of wall "
          f"time on {os.cpu_count()} idle CPUs")
    write_json(ROOT / "bench" / "results" / "rmsp_demo.json", {
        "reward_model": str(rm), "stand_in_rm": standin, "queries": str(queries),
        "complete_dialogues": complete, "wall_time_s": round(wall, 1),
        "cpu_time_s": round(sum(cpu_s.values()), 1), "mean_load_average_1m": round(mean_load, 2), "cpus": os.cpu_count(), "platform": platform.platform(),
        "config": cfg.rmsp.model_dump(mode="json"), "report": report,
    })


if __name__ == "__main__":
    main()
