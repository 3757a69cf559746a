"""The one training loop: Ray Train's TorchTrainer, FSDP2 sharding, accumulation to a global batch.

Every training stage (reward model, SFT, response tuning, single-task finetuning, DPO) is a *task*
module (`reward.py`, `sft.py`, `dpo.py`) that says how to load its model, how long an example is, how
many loss units it holds, and the loss of a micro-batch (with the task's own `loss_options`, e.g. DPO's
beta). This module does the rest, the same for all:

- `fit` starts `num_workers` Ray Train workers (`ScalingConfig`), with `FailureConfig(max_failures)`:
  a dead worker group restarts from the latest checkpoint; running `fit` again with the same
  config and data resumes the same Ray Train run (same storage path and run name).
- `train_worker` (one per worker) shards the model with FSDP2 when there are two workers or more —
  `fully_shard` on every decoder block, then the root, built on the meta device and filled from rank
  0's copy of the weights (`load_for_training`), so no rank holds the whole model on its device — over
  gloo on CPU and NCCL on GPU (Ray's `prepare_model(parallel_strategy="fsdp")` refuses CPU, see
  docs/training.md), with bf16 compute on GPU; a single worker trains the plain model; AdamW; cosine schedule with
  linear warm-up; gradient clipping; gradient accumulation so one optimizer step sees exactly
  `global_batch_size` examples whatever the worker count (ALMoST Appendix D: FSDP, batch 64 / 128).
- Checkpoints (model and optimizer through `torch.distributed.checkpoint`, scheduler, step, RNG)
  every `checkpoint_every` steps and at the end; the data position is the step (see `data.py`).
- The final model is written as a plain HF directory (safetensors + tokenizer).

Loss normalisation: a task returns loss *sums*; each worker divides by the number of loss units
(pairs, or supervised tokens) in the whole global batch and multiplies by the world size, because
FSDP averages gradients over workers. The update is then the global-batch mean on any world size.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

from almost_ray.cluster import dashboard
from almost_ray.cluster.connect import init_ray
from almost_ray.cluster.memory import ensure_ledger, report_peak
from almost_ray.cluster.preflight import preflight, train_bundles
from almost_ray.config import Config
from almost_ray.config_base import config_hash
from almost_ray.data.atomic import atomic_directory, write_json
from almost_ray.data.metrics_log import MetricsLog, plot_metrics, summarize
from almost_ray.models.loading import ready_for_generation
from almost_ray.models.packing import use_packed_attention
from almost_ray.plan.preflight import plan_preflight
from almost_ray.runs.paths import MODEL
from almost_ray.train.config import TrainConfig
from almost_ray.train.data import global_batches, rank_micro_batches
from almost_ray.train.optim import adamw, cosine_with_warmup
from almost_ray.train.sharding import shard_from_rank0

TASKS = {"rm": "almost_ray.train.rm", "sft": "almost_ray.train.sft", "dpo": "almost_ray.train.dpo"}
METRICS = "metrics.jsonl"


def task_name(task: str | Any) -> str:
    return task if isinstance(task, str) else task.name


def start_workers(cfg: Config, stage: str, section: TrainConfig | None = None) -> None:
    """Before a model is converted or encoded: Ray up, and the worker group of `stage` checked against the
    cluster — its CPUs and GPUs (`cluster/preflight.py`) and what each GPU will hold (`plan/preflight.py`, the
    numbers of `almost-ray plan`) — so a group that cannot start fails in seconds, naming the stage.
    `section`: the stage's section as it will train, when it differs from the config's (DPO's resolved model)."""
    section = section or getattr(cfg, stage)
    if section.num_workers > 0:
        init_ray(cfg.ray)
        preflight(f"{stage} workers", train_bundles(section))
        plan_preflight(cfg.model_copy(update={stage: section}), stage)


def train_and_plot(task: str, cfg: TrainConfig, examples: list[dict], model_dir: Path, stage_dir: Path,
                   plot_keys: list[str], title: str, loss_options: dict[str, Any] | None = None) -> dict:
    """`fit`, then `training.png` of `plot_keys`; returns the summary of `metrics.jsonl` for the manifest.
    `loss_options` go to the task's `micro_loss`."""
    fit(task, cfg, examples, model_dir, stage_dir, loss_options=loss_options)
    plot_metrics(stage_dir / METRICS, stage_dir / "training.png", plot_keys, title=title)
    return summarize(stage_dir / METRICS)


def fit(
    task: str | Any,
    cfg: TrainConfig,
    examples: list[dict],
    model_dir: Path,
    stage_dir: Path,
    loss_options: dict[str, Any] | None = None,
) -> Path:
    """Train `examples` with `task` on Ray Train; returns the saved HF model directory.

    `task` names a task module (`TASKS`), or is any object with the task functions and a `name` (sent to
    the workers as it is). `loss_options` are keyword arguments of the task's `micro_loss` (settings of its
    own config section, which the loop's `TrainConfig` does not carry).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    stage_dir = Path(stage_dir).resolve()
    stage_dir.mkdir(parents=True, exist_ok=True)
    loop_cfg = TrainConfig.model_validate({k: getattr(cfg, k) for k in TrainConfig.model_fields})
    job = {
        "task": task,
        "cfg": loop_cfg.model_dump(mode="json"),
        "model_dir": str(Path(model_dir).resolve()),
        "stage_dir": str(stage_dir),
        "examples": examples,
        "loss_options": loss_options or {},
    }
    storage = Path(cfg.storage_path or stage_dir / "ray").resolve()
    # One Ray Train run per (config, data): re-running resumes it, a changed config starts afresh.
    name = f"{task_name(task)}-{config_hash(cfg)}-{_examples_hash(examples)}"
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job,
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
        ),
    )
    import ray

    if ray.is_initialized():
        ensure_ledger()  # the workers report their peak memory to it (memory.py)
    trainer.fit()
    return stage_dir / MODEL


def scaling_config(cfg: TrainConfig):
    """Ray Train's workers: `num_workers`, each reserving `cpus_per_worker` CPUs (and `gpus_per_worker` GPUs)."""
    from ray.train import ScalingConfig

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def _examples_hash(examples: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for ex in examples:
        for key in sorted(ex):
            h.update(key.encode())
            h.update(memoryview(ex[key]).tobytes() if hasattr(ex[key], "tobytes") else repr(ex[key]).encode())
    return h.hexdigest()[:12]


def train_worker(job: dict[str, Any]) -> None:
    """The per-worker loop: read top to bottom, one optimizer step per global batch."""
    import ray.train
    import torch.distributed as dist

    cfg = TrainConfig.model_validate(job["cfg"])
    _quiet_logs()
    task = importlib.import_module(TASKS[job["task"]]) if isinstance(job["task"], str) else job["task"]
    name = task_name(job["task"])
    examples: list[dict] = job["examples"]
    stage_dir = Path(job["stage_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # one worker has nothing to shard: FSDP2 would only wrap every parameter in a DTensor
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    write_json(stage_dir / "workers" / f"rank-{rank}.json",  # where each rank ran (multi-node checks)
               {"rank": rank, "world": world,
                "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""})
    device = _device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    model = load_for_training(task, job["model_dir"], cfg, device, rank, world, distributed, bf16)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not distributed else nullcontext()

    optimizer = adamw(model.parameters(), cfg.lr, cfg.adam_betas, cfg.weight_decay)
    lengths = [task.length(ex) for ex in examples]
    plan = global_batches(lengths, cfg.global_batch_size, cfg.epochs, cfg.seed)
    total = min(len(plan), cfg.max_steps or len(plan))
    warmup = math.ceil(cfg.warmup_ratio * total)
    schedule = partial(cosine_with_warmup, total_steps=total, warmup_steps=warmup, min_ratio=cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    start = load_checkpoint(ray.train.get_checkpoint(), model, optimizer, scheduler, rank)
    log = MetricsLog(stage_dir / METRICS, keep_until=start) if rank == 0 else None
    if rank == 0:
        _say(f"[train {name}] {len(examples)} examples, {total} steps of {cfg.global_batch_size} "
             f"on {world} worker(s){', resuming after step ' + str(start) if start else ''}")

    model.train()
    for step in range(start, total):
        t0 = time.perf_counter()
        batch = plan[step]
        units = sum(task.units(examples[i]) for i in batch)
        pieces = rank_micro_batches(batch, lengths, rank, world, cfg.micro_batch_size)
        sums: dict[str, torch.Tensor] = {}
        for k, piece in enumerate(pieces):
            if distributed:  # reduce-scatter gradients once per step, after the last micro-batch
                model.set_requires_gradient_sync(k == len(pieces) - 1)
            rows = [examples[i] for i in piece] or [examples[batch[0]]]  # empty piece: weight 0
            weight = 1.0 if piece else 0.0
            with autocast:
                loss_sum, stats = task.micro_loss(model, rows, device, cfg.padding_free, **job["loss_options"])
            (loss_sum * (weight * world / units)).backward()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0) + weight * value.detach().float().cpu()
        grad_norm = _clip(model, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        totals = _all_reduce_sums(sums, distributed)
        elapsed = time.perf_counter() - t0
        metrics = task.step_metrics(totals, units, len(batch))
        metrics.update(
            step=step + 1, epoch=round((step + 1) / max(1, len(plan) / cfg.epochs), 4), lr=lr,
            grad_norm=grad_norm, samples=len(batch), tokens=sum(lengths[i] for i in batch),
            step_time_s=round(elapsed, 4), samples_per_s=round(len(batch) / elapsed, 4),
        )
        if log is not None:
            log.write(metrics)
            _say(_progress_line(metrics, total))
            dashboard.set_gauges(dashboard.run_of(stage_dir), f"train_{name}", {**metrics, "progress": (step + 1) / total})
        last = step + 1 == total
        if cfg.num_workers > 0 and ((step + 1) % cfg.checkpoint_every == 0 or last):
            save_checkpoint(metrics, model, optimizer, scheduler, step + 1, rank)
        else:
            ray.train.report(metrics)
    save_hf_model(model, task, job["model_dir"], stage_dir / MODEL, rank, distributed, getattr(torch, cfg.save_dtype))
    report_peak(f"train_{name}.worker")  # for the stage's manifest; a no-op when not in a Ray worker


def _say(line: str) -> None:
    # Ray Train patches `print` into a logger that Ray then echoes a second time; write directly.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_logs() -> None:
    """One progress line per step instead of Ray Train's per-report INFO lines and transformers'
    load report (the RM head is *meant* to be missing from the base checkpoint)."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray Train v2 logs every report under a logger named after its source file
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    hf_logging.set_verbosity_error()


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        from ray.train.torch import get_device

        return get_device()
    return torch.device("cpu")


def load_for_training(task, model_dir: str, cfg: TrainConfig, device: torch.device, rank: int, world: int,
                      distributed: bool, bf16: bool) -> torch.nn.Module:
    """The task's model, ready to train: sharded over the workers when distributed.

    Distributed, no rank holds the whole model on its device: every rank builds it on the meta device
    (no memory) and shards it (FSDP2), the shards are allocated, and rank 0 alone reads the weights (fp32
    on the CPU, as `task.load_model` gives them) and broadcasts them into every rank's shards
    (`set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`). A fresh head (the RM's
    `score`) is drawn once, seeded, on rank 0, so all ranks start from the same one. Buffers that are not
    in the state dict (rotary frequencies) are broadcast from rank 0 as well. One worker (or
    `num_workers: 0`, in the driver) loads the whole model unsharded: there is no one to share it with.
    """
    torch.manual_seed(cfg.seed)  # the fresh head is the same in every run
    flash = bf16 and device.type == "cuda"
    if not distributed:
        model = task.load_model(model_dir).to(device)
        _prepare(model, cfg, flash)
        return model

    full = task.load_model(model_dir) if rank == 0 else None
    model = task.empty_model(task.load_config(model_dir)).to(torch.float32)  # on the meta device
    _prepare(model, cfg, flash)
    return shard_from_rank0(model, full, device, world, bf16, cfg.reshard_after_forward)


def _prepare(model: torch.nn.Module, cfg: TrainConfig, flash: bool) -> None:
    """Training settings of the model; `flash`: bf16 compute on a GPU, where packed rows may use
    flash-attention 2 (`models.packing.use_packed_attention`)."""
    model.config.use_cache = False
    if cfg.padding_free:
        use_packed_attention(model, flash=flash)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # FSDP-safe


def _clip(model: torch.nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return round(float(norm), 6)


def _all_reduce_sums(sums: dict[str, torch.Tensor], distributed: bool) -> dict[str, float]:
    keys = sorted(sums)
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys])
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


def _progress_line(m: dict[str, Any], total: int) -> str:
    extra = "".join(f" {k} {m[k]:.4g}" for k in ("accuracy", "margin", "rewards/accuracies", "rewards/margins")
                    if k in m)
    return (f"[train] step {m['step']}/{total} loss {m['loss']:.4f}{extra} lr {m['lr']:.3g} "
            f"{m['samples_per_s']:.2f} samples/s")


def save_checkpoint(metrics, model, optimizer, scheduler, step: int, rank: int) -> None:
    """Report a Ray Train checkpoint: sharded model + optimizer (DCP), scheduler and step, each rank's RNG.

    Every worker writes its own shard into a local directory; Ray Train merges the directories
    into one checkpoint in the run's storage.
    """
    import ray.train
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with tempfile.TemporaryDirectory(prefix="almost-ray-ckpt-") as tmp:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        if rank == 0:
            state = {"step": step, "scheduler": scheduler.state_dict()}
            Path(tmp, "trainer_state.json").write_text(json.dumps(state, default=_no_callables))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, Path(tmp, f"rng_rank{rank}.pt"))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{step:07d}"
        )


def _no_callables(obj: Any) -> None:
    return None  # LambdaLR's state holds its lambda: rebuilt from config on load, not stored


def load_checkpoint(checkpoint, model, optimizer, scheduler, rank: int) -> int:
    """Restore from a Ray Train checkpoint; returns the number of steps already taken (0 without one)."""
    if checkpoint is None:
        return 0
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with checkpoint.as_directory() as path:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer_state = json.loads(Path(path, "trainer_state.json").read_text())
        sched_state = trainer_state["scheduler"]
        sched_state.pop("lr_lambdas", None)
        scheduler.load_state_dict({**scheduler.state_dict(), **sched_state})
        rng_file = Path(path, f"rng_rank{rank}.pt")
        if rng_file.exists():  # a different world size has no file for new ranks: seeded state is fine
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
    return int(trainer_state["step"])


def _save_safetensors(model, out: Path) -> None:
    """`save_pretrained`, with safetensors' I/O failures (a full disk) raised as the OSError they are,
    so the CLI reports the path instead of a traceback."""
    import re

    from safetensors import SafetensorError

    try:
        model.save_pretrained(out, safe_serialization=True)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(out)) from err


def save_hf_model(model, task, base_dir: str, out: Path, rank: int, distributed: bool,
                  dtype: torch.dtype = torch.float32) -> None:
    """Gather the full weights on rank 0 and write them as an HF directory in `dtype`, atomically.

    A fresh model of the base class is filled with the weights (on the meta device, no copy), so the
    saved config names the plain transformers architecture, not FSDP's wrapper class.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        fresh = task.empty_model(model.config)
        fresh.load_state_dict({k: v.to(dtype) for k, v in full.items()}, assign=True)
        fresh.config.dtype = dtype
        fresh.tie_weights()
        ready_for_generation(fresh)
        with atomic_directory(out) as tmp:
            _save_safetensors(fresh, tmp)
            task.load_tokenizer(base_dir).save_pretrained(tmp)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
