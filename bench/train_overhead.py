"""Where a training step's time goes, in counts that do not depend on what else runs on the machine.

The same RM and SFT steps (the embedded SmolLM2-135M, fp32, HH-RLHF data as in bench/train.py) run through
the real loop (`train/loop.py`, unchanged) in three places:

  driver        `num_workers: 0`: Ray Train's local mode, the loop on the driver's main thread;
  actor         the same local-mode loop inside a plain Ray actor (a Ray worker process, its main thread);
  train-worker  one Ray Train worker (`num_workers: 1`), which runs the loop in a thread of its own.

each under an allocator setting (`--runs` pairs them): `none` (glibc's defaults), `mmap` (MALLOC_MMAP_MAX_=0 and a
64 GiB trim threshold) and `workers` (what `cluster.connect.worker_runtime_env` gives every Ray worker now).
The driver gets the setting through its environment (a subprocess); Ray workers through the job's
runtime_env, as `init_ray` gives it.

A probe task (the real task module with `micro_loss` and `step_metrics` wrapped; the loop accepts any
task object) records, per optimizer step: minor page faults, system and user CPU seconds of the process
and of the loop's own thread (getrusage), involuntary context switches; and for one step, a
torch.profiler trace whose self times are split into forward (the model's forward), loss, backward
(autograd), optimizer (AdamW step and zero_grad), data preparation (the rest of the task's `micro_loss`:
packing, label tensors) and the loop's other work (clipping, loss scaling, stats, report). Page faults
are deterministic for a given step, and the shares are ratios of times measured on the same step, so
both hold on a busy machine; wall seconds are printed only as a sanity check.

Run: `.venv/bin/python bench/train_overhead.py [--tasks rm,sft --runs driver:none,train-worker:workers
--examples 32]`. Writes bench/results/train_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REF = "embedded:smollm2-135m-instruct"
HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_base_test_500.jsonl"
MMAP_ONLY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
CATEGORIES = ("forward", "loss", "backward", "optimizer", "data", "loop other", "outside ops")
MARK = "train-overhead rows: "
RUNS = ("driver:none", "driver:workers", "actor:mmap", "actor:workers", "train-worker:mmap", "train-worker:workers")
LOSS_OPS = ("cross_entropy", "nll_loss", "log_softmax", "log_sigmoid", "logsigmoid")


def allocator_envs() -> dict[str, dict[str, str]]:
    from almost_ray.cluster.connect import WORKER_ENV_VARS

    return {"none": {}, "mmap": MMAP_ONLY, "workers": dict(WORKER_ENV_VARS)}


class Probe:
    """A training task for `loop.fit`: `module`'s task functions, with per-step counters.

    `step_metrics` runs once per optimizer step, after the optimizer (`loop.train_worker`), so the counters
    read there bound one step; the first `warmup` steps are left out of the averages, and step
    `profile_step` (1-based) is traced with torch.profiler.
    """

    def __init__(self, module: str, profile_step: int):
        self.module, self.profile_step = module, profile_step
        self.name = module.rsplit(".", 1)[-1]
        self._task = None

    def __getstate__(self):
        return {"module": self.module, "profile_step": self.profile_step, "name": self.name}

    def __setstate__(self, state):
        self.__dict__.update(state, _task=None)

    @property
    def task(self):
        if self._task is None:
            import importlib

            self._task = importlib.import_module(self.module)
            self._reset()
        return self._task

    def _reset(self):
        self._step, self._prof, self._last = 0, None, None
        self._hooked = set()

    def __getattr__(self, attr):  # load_config, load_model, empty_model, load_tokenizer, length, units
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.task, attr)

    def _counters(self) -> dict[str, float]:
        import resource
        import threading

        me = resource.getrusage(resource.RUSAGE_SELF)
        loop = resource.getrusage(resource.RUSAGE_THREAD)
        return {"t": time.perf_counter(), "faults": me.ru_minflt, "major_faults": me.ru_majflt,
                "sys_s": me.ru_stime, "user_s": me.ru_utime, "invol_switches": me.ru_nivcsw,
                "loop_faults": loop.ru_minflt, "loop_sys_s": loop.ru_stime, "loop_user_s": loop.ru_utime,
                "main_thread": float(threading.current_thread() is threading.main_thread())}

    def _hook(self, model):
        """Mark the model's forward as a profiler range (a module hook pair, so the loop stays as it is)."""
        if id(model) in self._hooked:
            return
        from torch.autograd.profiler import record_function

        ranges = []
        model.register_forward_pre_hook(lambda m, a: ranges.append(record_function("probe.forward").__enter__()))
        model.register_forward_hook(lambda m, a, out: ranges.pop().__exit__(None, None, None))
        self._hooked.add(id(model))

    def micro_loss(self, model, rows, device, padding_free=False, **options):
        from torch.autograd.profiler import record_function

        task = self.task
        if self._last is None:  # the first micro-batch of the run: the counters start here
            self._last = self._counters()
            self._info = _thread_info()
        self._hook(model)
        with record_function("probe.micro_loss"):
            return task.micro_loss(model, rows, device, padding_free, **options)

    def step_metrics(self, totals, units, samples):
        import torch

        metrics = self.task.step_metrics(totals, units, samples)
        self._step += 1
        now = self._counters()
        for key in ("faults", "major_faults", "sys_s", "user_s", "invol_switches", "loop_faults", "loop_sys_s",
                    "loop_user_s"):
            metrics[f"probe/{key}"] = now[key] - self._last[key]
        metrics["probe/wall_s"] = now["t"] - self._last["t"]
        metrics["probe/main_thread"] = now["main_thread"]
        if self._step == 1:
            metrics.update({f"probe/{k}": v for k, v in self._info.items()})
        if self._prof is not None:  # the traced step ends here
            self._prof.stop()
            metrics.update({f"probe/share/{k}": v for k, v in shares(self._prof.events(), now["t"] - self._t0).items()})
            self._prof = None
        if self._step + 1 == self.profile_step:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU])
            self._prof.start()
            self._t0 = time.perf_counter()
        self._last = self._counters()  # the probe's own work is not the next step's
        metrics["probe/torch_threads"] = torch.get_num_threads()
        return metrics


def _thread_info() -> dict[str, float]:
    import torch

    return {"omp_num_threads": float(os.environ.get("OMP_NUM_THREADS", "0") or 0),
            "interop_threads": torch.get_num_interop_threads(),
            "affinity_cpus": len(os.sched_getaffinity(0)),
            "process_threads": len(os.listdir("/proc/self/task")),
            "arena_max_set": float("MALLOC_ARENA_MAX" in os.environ),
            "mmap_max_set": float("MALLOC_MMAP_MAX_" in os.environ)}


def shares(events, wall_s: float) -> dict[str, float]:
    """Each category's share of the traced step's wall time, from the profiler's self times (µs).

    Self times of nested ranges add up to the time inside the outermost range on that thread (Python time
    between ops included), so the categories and "outside ops" (the loop's Python and Ray outside any op)
    add up to the step. Only the loop's thread is counted: intra-op worker threads run inside its ops.
    """
    by_cat = dict.fromkeys(CATEGORIES, 0.0)
    loop_threads = {e.thread for e in events if e.name == "probe.micro_loss"}
    for e in events:
        if e.thread not in loop_threads:
            continue
        chain, node = [], e
        while node is not None:
            chain.append(node.name)
            node = node.cpu_parent
        top = chain[-1]
        if top.startswith("autograd::engine::evaluate_function") or top.startswith("torch::autograd"):
            cat = "backward"
        elif top.startswith("Optimizer."):
            cat = "optimizer"
        elif "probe.forward" in chain:
            cat = "forward"
        elif "probe.micro_loss" in chain:
            cat = "loss" if any(op in name for name in chain for op in LOSS_OPS) else "data"
        else:
            cat = "loop other"
        by_cat[cat] += e.self_cpu_time_total / 1e6
    by_cat["outside ops"] = max(0.0, wall_s - sum(by_cat.values()))
    return {k: round(v / wall_s, 4) for k, v in by_cat.items()}


def select_examples(task: str, model: str, n: int, max_length: int) -> list[dict]:
    """bench/train.py's data (`train.select_data`: the first n HH-RLHF pairs, or single-turn chosen dialogues,
    that fit), encoded as our RM and SFT stages encode it."""
    from train import select_data

    from almost_ray.models.loading import resolve_model_dir
    from almost_ray.train import rm, sft
    from almost_ray.train.config import TrainSFTConfig

    model_dir = resolve_model_dir(model)
    tok = rm.load_tokenizer(model_dir) if task == "rm" else sft.load_tokenizer(model_dir)
    pairs, dialogues = select_data(HH, tok, n, max_length)
    if task == "rm":
        return rm.encode_pairs(pairs, tok, max_length)
    return sft.encode_conversations(dialogues, tok, TrainSFTConfig(max_length=max_length))


def train_config(task: str, context: str, args):
    from almost_ray.train.config import TrainRMConfig, TrainSFTConfig

    cls, lr = (TrainRMConfig, 1e-5) if task == "rm" else (TrainSFTConfig, 2e-5)
    return cls(model=args.model, num_workers=1 if context == "train-worker" else 0, cpus_per_worker=2,
               global_batch_size=args.batch, micro_batch_size=args.batch, max_length=args.max_length, epochs=1,
               lr=lr, checkpoint_every=10_000)


def fit_once(task: str, cfg, examples: list[dict], work: str, profile_step: int) -> list[dict]:
    """`loop.fit` with the probe task; returns the rows of metrics.jsonl."""
    from almost_ray.data.metrics_log import read_metrics
    from almost_ray.models.loading import resolve_model_dir
    from almost_ray.train import loop

    probe = Probe(loop.TASKS[task], profile_step)
    stage = Path(work) / task
    loop.fit(probe, cfg, examples, resolve_model_dir(cfg.model), stage)
    return read_metrics(stage / loop.METRICS)


def one(args) -> None:
    """One (task, context, env) measurement; prints its metrics rows as JSON on a line that starts with MARK."""
    import ray

    examples = select_examples(args.task, args.model, args.examples, args.max_length)
    cfg = train_config(args.task, args.context, args)
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as work:
        if args.context == "driver":
            rows = fit_once(args.task, cfg, examples, work, args.profile_step)
        else:
            env = allocator_envs()[args.env]
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
            if args.context == "actor":
                runner = ray.remote(num_cpus=2)(fit_once)
                rows = ray.get(runner.remote(args.task, cfg, examples, work, args.profile_step))
            else:
                rows = fit_once(args.task, cfg, examples, work, args.profile_step)
            ray.shutdown()
    print(MARK + json.dumps(rows))


def summarize(rows: list[dict], warmup: int, profile_step: int) -> dict:
    """Per-step means over the steps after `warmup` but the traced one (the profiler allocates too), the
    traced step's shares, and the per-step lists."""
    steady = [r for r in rows[warmup:] if r["step"] != profile_step] or rows[warmup:]
    keys = ("faults", "sys_s", "user_s", "loop_faults", "loop_sys_s", "invol_switches", "wall_s")
    out = {f"{k}_per_step": round(sum(r[f"probe/{k}"] for r in steady) / max(1, len(steady)), 4) for k in keys}
    out["faults_by_step"] = [int(r["probe/faults"]) for r in rows]
    out["tokens_by_step"] = [r["tokens"] for r in rows]
    out["loop_on_main_thread"] = bool(rows[0]["probe/main_thread"])
    out["threads"] = {k.removeprefix("probe/"): rows[0][k] for k in rows[0]
                      if k.removeprefix("probe/") in ("omp_num_threads", "interop_threads", "affinity_cpus",
                                                      "process_threads", "torch_threads")}
    out["shares"] = {k.removeprefix("probe/share/"): v for r in rows for k, v in r.items() if k.startswith("probe/share/")}
    out["losses"] = [r["loss"] for r in rows]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="rm,sft")
    ap.add_argument("--runs", default=",".join(RUNS), help="context:allocator pairs, see the docstring")
    ap.add_argument("--examples", type=int, default=32, help="pairs (RM) or dialogues (SFT): examples/batch steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the per-step means")
    ap.add_argument("--profile-step", type=int, default=0, help="the traced step (1-based); 0: the last")
    ap.add_argument("--model", default=REF)
    ap.add_argument("--out", default="bench/results/train_overhead.json")
    ap.add_argument("--one", nargs=3, metavar=("TASK", "CONTEXT", "ENV"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.profile_step == 0:
        args.profile_step = args.examples // args.batch
    if args.one:
        args.task, args.context, args.env = args.one
        one(args)
        return

    envs = allocator_envs()
    results = []
    for task in args.tasks.split(","):
        for context, env_name in (run.split(":") for run in args.runs.split(",")):
            print(f"{task} {context} {env_name} ...", flush=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            if context == "driver":  # Ray workers get theirs from the runtime_env
                env.update(envs[env_name])
            cmd = [sys.executable, __file__, "--one", task, context, env_name, "--examples", str(args.examples),
                   "--batch", str(args.batch), "--max-length", str(args.max_length),
                   "--profile-step", str(args.profile_step), "--model", args.model]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
            rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith(MARK))[len(MARK):])
            results.append({"task": task, "context": context, "env": env_name, "env_vars": envs[env_name],
                            **summarize(rows, args.warmup, args.profile_step), "load_average_1m": os.getloadavg()[0]})
            _write(args, results)  # a long run leaves what it measured
    _print(results)
    print(f"\nwrote {args.out}")


def _write(args, results: list[dict]) -> None:
    import platform

    import torch

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "data": str(HH), "examples": args.examples, "batch": args.batch, "max_length": args.max_length,
        "warmup_steps": args.warmup, "profile_step": args.profile_step,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "note": "faults, system seconds and shares are per optimizer step after the warm-up; wall seconds depend "
                "on the machine's load and are not a benchmark",
        "results": results}, indent=2) + "\n")


def _print(results: list[dict]) -> None:
    head = (f"{'task':<4} {'context':<13} {'env':<8} {'thread':<6} {'faults':>8} {'sys s':>6} {'user s':>7} "
            + " ".join(f"{c[:8]:>8}" for c in CATEGORIES))
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        print(f"{r['task']:<4} {r['context']:<13} {r['env']:<8} {'main' if r['loop_on_main_thread'] else 'other':<6} "
              f"{r['faults_per_step']:>8.0f} {r['sys_s_per_step']:>6.2f} {r['user_s_per_step']:>7.2f} "
              + " ".join(f"{100 * r['shares'].get(c, 0):>7.1f}%" for c in CATEGORIES))


if __name__ == "__main__":
    main()
