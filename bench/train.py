"""Training throughput on the embedded model: our Ray Train + FSDP loop next to TRL, in one run.

Same model (SmolLM2-135M-Instruct, fp32), same data, same global batch (8), same max length (256),
one epoch, learning rates of the papers:
  reward model: 64 HH-RLHF helpful-base pairs (both sides <= 255 tokens, so TRL, which drops longer
                pairs, keeps all 64) — TRL 1.16 `RewardTrainer` vs `almost_ray.train.rm`;
  SFT:          64 single-turn HH-RLHF chosen dialogues as `Human:`/`Assistant:` text, loss on the reply —
                TRL 1.16 `SFTTrainer` (prompt-completion rows) vs `almost_ray.train.sft`.
TRL runs in this process on 2 threads, with its defaults (gradient checkpointing on) and with its fastest
setting on this machine: gradient checkpointing off, and for SFT also `padding_free=True` (TRL 1.16 flattens
each batch into one row with `position_ids`; transformers builds the block-diagonal mask from them for
sdpa/eager attention, so no flash attention is needed; TRL 1.16's `RewardTrainer` has no padding-free mode).
Ours runs on a local Ray of 2 CPUs shared by the workers of each `--workers` row (default `1,2`: one
unsharded worker with 2 threads, and FSDP2 over gloo on 2 workers with 1 CPU each). Each ratio is to TRL's defaults and to
the fastest TRL row of the same task, all rows from one run.

Throughput is samples / time in the training loop (TRL: `trainer.train()`; ours: the sum of step
times, first step included), and end to end (ours: `TorchTrainer.fit()` with worker start-up and
model loading). The CPU is shared with whatever else runs on the machine: compare within one run.
Run: `make bench` or `.venv/bin/python bench/train.py [--pairs 64 --batch 8 --max-length 256]`.
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from side_by_side import add_ratios, machine

from almost_ray.cluster.config import RayConfig
from almost_ray.data.preferences import load_pairs
from almost_ray.data.records import write_jsonl
from almost_ray.models.loading import resolve_model_dir
from almost_ray.models.reward import rm_text
from almost_ray.prompts.templates import human_assistant
from almost_ray.train.config import TrainRMConfig, TrainSFTConfig

REF = "embedded:smollm2-135m-instruct"
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_base_test_500.jsonl"


def select_data(path: Path, tokenizer, n: int, max_length: int):
    """The first n pairs that fit in max_length (with TRL's EOS), and n single-turn chosen dialogues."""
    pairs = load_pairs(path)

    def fits(messages) -> bool:
        return len(tokenizer(rm_text(messages), add_special_tokens=False).input_ids) < max_length

    rm = [p for p in pairs if fits(p.chosen) and fits(p.rejected)][:n]
    sft = [p.chosen for p in pairs if len(p.chosen) == 2 and fits(p.chosen)][:n]
    if len(rm) < n or len(sft) < n:
        raise SystemExit(f"{path}: only {len(rm)} pairs / {len(sft)} dialogues fit in {max_length} tokens")
    return rm, sft


def step_timer():
    """A TrainerCallback that records when each optimizer step ends (for the steady-state rate)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.ends = 0.0, []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    return StepTimer()


def _trl_args(config_cls, out: str, batch: int, max_length: int | None, gc: bool, learning_rate: float, **extra):
    """One epoch on the CPU in float32, no saving or logging: the same settings for both trainers."""
    return config_cls(
        output_dir=out, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=learning_rate,
        max_length=max_length, activation_checkpointing=gc, bf16=False, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=0, **extra,
    )


def trl_reward(model_dir: Path, pairs, batch: int, max_length: int, gc: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    data = Dataset.from_list([{"chosen": rm_text(p.chosen), "rejected": rm_text(p.rejected)} for p in pairs])
    with tempfile.TemporaryDirectory() as out:
        args = _trl_args(RewardConfig, out, batch, max_length, gc, learning_rate=1e-5)
        times = step_timer()
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[times])
        assert len(trainer.train_dataset) == len(pairs), "TRL dropped pairs: lengths differ"
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return _trl_row(len(pairs), batch, wall, times)


def trl_sft(model_dir: Path, dialogues, batch: int, max_length: int, gc: bool, padding_free: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [{"prompt": human_assistant(d[:-1]), "completion": " " + d[-1]["content"].strip()} for d in dialogues]
    with tempfile.TemporaryDirectory() as out:
        # padding-free without packing does not enforce max_length (TRL refuses it set); every dialogue
        # already fits it (select_data), so None trains on the same tokens
        args = _trl_args(SFTConfig, out, batch, None if padding_free else max_length, gc, learning_rate=2e-5,
                         padding_free=padding_free)
        times = step_timer()
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[times])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    return _trl_row(len(dialogues), batch, wall, times)


def _trl_row(samples: int, batch: int, wall: float, times) -> dict:
    steps = [b - a for a, b in zip([times.begin, *times.ends], times.ends)]
    steady = sum(steps[1:])
    return {"samples": samples, "loop_s": round(wall, 2), "samples_per_s": round(samples / wall, 3),
            "steady_samples_per_s": round(batch * (len(steps) - 1) / steady, 3) if steady else None,
            "end_to_end_s": None}


def ours(task: str, data, batch: int, max_length: int, workers: int, work: Path) -> dict:
    """Our stage as a user runs it (`almost-ray train-rm` / `train-sft` on a config); `workers` 0 runs the loop
    in this process (Ray Train's local mode)."""
    from almost_ray.config import Config
    from almost_ray.data.metrics_log import read_metrics
    from almost_ray.train import rm as reward
    from almost_ray.train import sft

    common = dict(model=REF, num_workers=workers, cpus_per_worker=2 / max(1, workers), global_batch_size=batch,
                  micro_batch_size=max(1, batch // max(1, workers)), max_length=max_length, epochs=1,
                  checkpoint_every=10_000, reshard_after_forward=False)
    work.mkdir(parents=True, exist_ok=True)
    if task == "rm":
        path = work / "pairs.jsonl"
        write_jsonl(path, ({"chosen": rm_text(p.chosen), "rejected": rm_text(p.rejected)} for p in data))  # HH format
        cfg = Config(runs_dir=work, run_name="ours", ray=RayConfig(num_cpus=2),
                     train_rm=TrainRMConfig(**common, comparisons=str(path), lr=1e-5))
        stage_run = reward.run
    else:
        path = work / "dialogues.jsonl"
        write_jsonl(path, ({"messages": d} for d in data))
        cfg = Config(runs_dir=work, run_name="ours", ray=RayConfig(num_cpus=2),
                     train_sft=TrainSFTConfig(**common, dialogues=str(path), lr=2e-5))
        stage_run = sft.run
    start = time.perf_counter()
    stage_dir = stage_run(cfg)
    end_to_end = time.perf_counter() - start
    rows = read_metrics(stage_dir / "metrics.jsonl")
    loop_s = sum(r["step_time_s"] for r in rows)
    steady = sum(r["step_time_s"] for r in rows[1:])
    samples = sum(r["samples"] for r in rows)
    return {"samples": samples, "loop_s": round(loop_s, 2), "samples_per_s": round(samples / loop_s, 3),
            "steady_samples_per_s": round(sum(r["samples"] for r in rows[1:]) / steady, 3) if steady else None,
            "end_to_end_s": round(end_to_end, 2), "end_to_end_samples_per_s": round(samples / end_to_end, 3)}


def write_results(args, results: list[dict], complete: bool) -> None:
    add_ratios(results, "samples_per_s", group="task")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": REF, "data": str(args.data), "pairs": args.pairs, "batch": args.batch, "max_length": args.max_length,
        "workers": args.workers, "complete": complete, "load_average": os.getloadavg(),
        "machine": machine(),
        "results": results,
        "note": "samples/s over the training loop; ratios are to TRL with its defaults and to the fastest TRL row "
                "of the same task, on the same data in this run",
    }, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HH, help="HH-RLHF-format .jsonl")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--workers", default="1,2",
                    help="our rows: Ray Train worker counts sharing the 2 CPUs, comma-separated; 0 runs the "
                         "loop in this process (Ray Train's local mode)")
    ap.add_argument("--no-trl-gc-off", action="store_true",
                    help="skip the TRL rows with gradient checkpointing off (and padding-free SFT)")
    ap.add_argument("--out", default="bench/results/train.json")
    args = ap.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found (pass --data with an HH-RLHF-format file)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(REF)
    pairs, dialogues = select_data(args.data, AutoTokenizer.from_pretrained(model_dir), args.pairs, args.max_length)
    torch.set_num_threads(2)
    data = {"rm": pairs, "sft": dialogues}
    trl_fns = {"rm": trl_reward, "sft": trl_sft}
    # the comparison that matters first (TRL defaults vs ours), the extra TRL rows last
    workers = [int(w) for w in str(args.workers).split(",")]
    plan = [(t, kind) for t in ("rm", "sft") for kind in ("trl-gc", *(f"ours-{w}" for w in workers))]
    if not args.no_trl_gc_off:
        plan += [("rm", "trl-nogc"), ("sft", "trl-nogc"), ("sft", "trl-padding-free")]
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        for task, kind in plan:
            if kind.startswith("ours-"):
                import ray

                n = int(kind.removeprefix("ours-"))
                print(f"almost_ray {task} ({n} workers) ...", flush=True)
                row = ours(task, data[task], args.batch, args.max_length, n, Path(work) / kind)
                ray.shutdown()  # no idle Ray processes during the next TRL run
                method = (f"almost_ray Ray Train {'FSDP2 ' if n > 1 else ''}({n} x {2 / n:g} CPU)" if n
                          else "almost_ray loop in this process (2 threads)")
            elif kind == "trl-padding-free":
                print(f"TRL {task} (gradient checkpointing off, padding-free) ...", flush=True)
                row = trl_sft(model_dir, data[task], args.batch, args.max_length, gc=False, padding_free=True)
                method = "TRL 1.16 (grad ckpt off, padding-free)"
            else:
                gc = kind == "trl-gc"
                print(f"TRL {task} (gradient checkpointing {'on' if gc else 'off'}) ...", flush=True)
                row = trl_fns[task](model_dir, data[task], args.batch, args.max_length, gc)
                method = f"TRL 1.16 ({'defaults, ' if gc else ''}grad ckpt {'on' if gc else 'off'})"
            results.append({"task": task, "method": method, **row, "load_average_1m": os.getloadavg()[0]})
            write_results(args, results, complete=False)  # a long bench leaves what it measured

    head = (f"{'task':<5} {'method':<44} {'samples':>7} {'loop s':>7} {'samples/s':>9} {'steady/s':>8} {'e2e s':>6} "
            f"{'x TRL':>6} {'x fastest':>9}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        e2e = f"{r['end_to_end_s']:>6.1f}" if r["end_to_end_s"] else f"{'-':>6}"
        print(f"{r['task']:<5} {r['method']:<44} {r['samples']:>7} {r['loop_s']:>7.1f} {r['samples_per_s']:>9.3f} "
              f"{r['steady_samples_per_s'] or 0:>8.3f} {e2e} {r['ratio_vs_trl_defaults'] or 0:>6.2f} "
              f"{r['ratio_vs_trl_fastest'] or 0:>9.2f}")
    write_results(args, results, complete=True)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
