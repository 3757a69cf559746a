"""DPO throughput: our `train_dpo` stage (Ray Train, FSDP2, padding-free) next to TRL 1.16's `DPOTrainer`, in one run.

Same model (SmolLM2-135M-Instruct; `--model tiny:llama` for a smoke run), same 64 HH-RLHF helpful-base pairs
(both sides within `--max-length`, so neither side truncates or drops one), same global batch (8), one
epoch, sigmoid loss, beta 0.1, lr 1e-6 (TRL's defaults), fp32 on the CPU (`--bf16`: bf16 mixed precision
on both sides). The reference is the starting model on both sides.

TRL runs in this process on 2 threads: with its defaults (gradient checkpointing on, the reference model's
forward in every step), with gradient checkpointing off, and with the reference log-probs computed once
before training as ours are (`precompute_ref_log_probs=True`; TRL 1.16's `padding_free` is "temporarily
unavailable" for DPO and falls back to padding, so it is not a row). Ours runs on a local Ray of 2 CPUs:
one unsharded worker with 2 threads, and FSDP2 over gloo on 2 workers with 1 CPU each (`--workers`).

The headline rate is pairs / (reference pass + training loop), wherever each side does its reference pass:
TRL precomputes in `DPOTrainer.__init__` (timed with its tokenization), or inside the loop by default; ours
in a Ray task before the loop (the stage's `metrics.reference_logps_s`), then the sum of step times. Ours
also shows end to end (Ray start, worker start, model loads). Ratios are to TRL's defaults and to the
fastest TRL row, all from one run.

The machine must be otherwise idle for numbers worth quoting: every process shares the same 2 cores, and a
busy machine slows the sides unequally (the script prints the load average before and after, and warns).
Run: `make bench` or `.venv/bin/python bench/dpo.py [--pairs 64 --batch 8 --max-length 256]`.
Smoke run: `--model tiny:llama --pairs 8 --batch 4 --workers 1 --no-trl-extra`. Writes bench/results/dpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from side_by_side import add_ratios, is_idle, load_1m, machine, warn_if_busy
from train import HH, select_data, step_timer

from almost_ray.cluster.config import RayConfig
from almost_ray.config import Config
from almost_ray.data.records import write_jsonl
from almost_ray.models.loading import resolve_model_dir
from almost_ray.models.reward import rm_text
from almost_ray.prompts.templates import human_assistant
from almost_ray.train.config import TrainDPOConfig


def trl_dpo(model_dir: Path, pairs, batch: int, max_length: int, gc: bool, precompute: bool, bf16: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [{"prompt": human_assistant(p.chosen[:-1]), "chosen": " " + p.chosen_response.strip(),
             "rejected": " " + p.rejected_response.strip()} for p in pairs]
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-6, beta=0.1,
            loss_type=["sigmoid"], max_length=max_length, activation_checkpointing=gc, bf16=bf16, use_cpu=True,
            precompute_ref_log_probs=precompute, precompute_ref_batch_size=batch, report_to="none",
            save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=0,
        )
        times = step_timer()
        start = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[times])
        prepared = time.perf_counter()
        assert len(trainer.train_dataset) == len(pairs), "TRL dropped pairs: lengths differ"
        trainer.train()
        end = time.perf_counter()
    steps = [b - a for a, b in zip([times.begin, *times.ends], times.ends)]
    loop = end - prepared
    training = loop + (prepared - start if precompute else 0.0)  # its tokenization counted with the precompute
    return {"pairs": len(pairs), "reference_s": round(prepared - start, 2) if precompute else None,
            "loop_s": round(loop, 2), "training_s": round(training, 2), "pairs_per_s": round(len(pairs) / training, 3),
            "steady_pairs_per_s": round(batch * (len(steps) - 1) / sum(steps[1:]), 3) if len(steps) > 1 else None,
            "end_to_end_s": None}


def ours(pairs, batch: int, max_length: int, workers: int, bf16: bool, work: Path, model: str) -> dict:
    from almost_ray.data.metrics_log import read_metrics
    from almost_ray.runs.manifest import read_manifest
    from almost_ray.train import dpo

    work.mkdir(parents=True, exist_ok=True)
    data = work / "pairs.jsonl"
    write_jsonl(data, ({"chosen": rm_text(p.chosen), "rejected": rm_text(p.rejected)} for p in pairs))  # HH format
    section = TrainDPOConfig(
        model=model, comparisons=str(data), num_workers=workers, cpus_per_worker=2 / workers,
        global_batch_size=batch, micro_batch_size=max(1, batch // workers), max_length=max_length, epochs=1,
        lr=1e-6, beta=0.1, loss_type="sigmoid", mixed_precision="bf16" if bf16 else "fp32",
        checkpoint_every=10_000, reshard_after_forward=False,
    )
    cfg = Config(runs_dir=work, run_name="ours", ray=RayConfig(num_cpus=2), train_dpo=section)
    start = time.perf_counter()
    stage_dir = dpo.run(cfg)
    end_to_end = time.perf_counter() - start
    rows = read_metrics(stage_dir / "metrics.jsonl")
    reference = read_manifest(stage_dir)["metrics"]["reference_logps_s"]
    loop = sum(r["step_time_s"] for r in rows)
    steady = sum(r["step_time_s"] for r in rows[1:])
    samples = sum(r["samples"] for r in rows)
    return {"pairs": samples, "reference_s": reference, "loop_s": round(loop, 2),
            "training_s": round(loop + reference, 2), "pairs_per_s": round(samples / (loop + reference), 3),
            "steady_pairs_per_s": round(sum(r["samples"] for r in rows[1:]) / steady, 3) if steady else None,
            "end_to_end_s": round(end_to_end, 2)}


def write_results(args, results: list[dict], loads: list, complete: bool) -> None:
    add_ratios(results, "pairs_per_s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "data": str(args.data), "pairs": args.pairs, "batch": args.batch,
        "max_length": args.max_length, "workers": args.workers, "bf16": args.bf16, "complete": complete,
        "load_average_1m_before_after": loads, "idle": is_idle(loads),
        "machine": machine(),
        "results": results,
        "note": "pairs/s over the reference pass plus the training loop; ratios are to TRL with its defaults and to "
                "the fastest TRL row, on the same data in this run",
    }, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="tiny:llama for a smoke run")
    ap.add_argument("--data", type=Path, default=HH, help="HH-RLHF-format .jsonl")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--workers", default="1,2", help="our rows: Ray Train worker counts sharing the 2 CPUs")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides")
    ap.add_argument("--no-trl-extra", action="store_true",
                    help="only TRL's defaults (skip gradient checkpointing off and precomputed reference rows)")
    ap.add_argument("--out", default="bench/results/dpo.json")
    args = ap.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found (pass --data with an HH-RLHF-format file)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    loads = [load_1m()]
    warn_if_busy(loads)
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(args.model)
    pairs, _ = select_data(args.data, AutoTokenizer.from_pretrained(model_dir), args.pairs, args.max_length)
    torch.set_num_threads(2)
    plan = [("TRL", True, False)] + [("ours", w, None) for w in (int(x) for x in str(args.workers).split(","))]
    if not args.no_trl_extra:
        plan += [("TRL", False, False), ("TRL", False, True)]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        for side, a, precompute in plan:
            if side == "ours":
                import ray

                print(f"almost_ray train_dpo ({a} workers) ...", flush=True)
                row = ours(pairs, args.batch, args.max_length, a, args.bf16, Path(work) / f"ours-{a}", args.model)
                ray.shutdown()  # no idle Ray processes during the next TRL run
                method = f"almost_ray train_dpo {'FSDP2 ' if a > 1 else ''}({a} x {2 / a:g} CPU)"
            else:
                what = ("defaults, " if a else "") + f"grad ckpt {'on' if a else 'off'}" + \
                       (", precomputed reference" if precompute else "")
                print(f"TRL DPOTrainer ({what}) ...", flush=True)
                row = trl_dpo(model_dir, pairs, args.batch, args.max_length, a, precompute, args.bf16)
                method = f"TRL 1.16 DPOTrainer ({what})"
            results.append({"method": method, **row, "load_average_1m": load_1m()})
            write_results(args, results, loads, complete=False)  # a long bench leaves what it measured
    loads.append(load_1m())
    write_results(args, results, loads, complete=True)

    head = (f"{'method':<60} {'pairs':>5} {'ref s':>6} {'loop s':>7} {'pairs/s':>8} {'steady/s':>8} {'e2e s':>6} "
            f"{'x TRL':>6} {'x fastest':>9}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        ref = f"{r['reference_s']:>6.1f}" if r["reference_s"] is not None else f"{'in loop':>6}"
        e2e = f"{r['end_to_end_s']:>6.1f}" if r["end_to_end_s"] else f"{'-':>6}"
        print(f"{r['method']:<60} {r['pairs']:>5} {ref} {r['loop_s']:>7.1f} {r['pairs_per_s']:>8.3f} "
              f"{r['steady_pairs_per_s'] or 0:>8.3f} {e2e} {r['ratio_vs_trl_defaults'] or 0:>6.2f} "
              f"{r['ratio_vs_trl_fastest'] or 0:>9.2f}")
    warn_if_busy(loads)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
