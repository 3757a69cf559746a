"""Every CUDA path of almost_ray that runs without Ray and vLLM, on one GPU in one command, with absolute
figures and TRL 1.16 beside ours in the same run (docs/performance.md, "GPU (one H200)").

Made for one NVIDIA H200 lent for minutes: no network, no Ray, no vLLM, torch and transformers installed,
everything else carried (`--prepare`, below). Models are randomly initialised from published shapes
(`configs/model-shapes/`: SmolLM2-135M and Llama-3.2-1B; config.json only, no weights travel), with the
embedded SmolLM2 tokenizer (its ids fit both vocabularies; a random Llama-3.2-1B samples ids past it, which
decode to nothing). Token ids are drawn at random, lengths from seeded ranges, so every path sees the same data.

Paths, each timed after a warm-up step and reported with its peak GPU memory (`max_memory_allocated`):

- train_rm / train_sft: the training loop's own step (`train.loop.prepare_worker` + `train_step`: bf16
  autocast over fp32 master weights, packed micro-batches with flash-attention 2 when installed, else SDPA
  per sequence), one process; tokens/s and MFU. TRL 1.16's RewardTrainer / SFTTrainer on the same model
  directory, examples (pre-tokenized), micro-batch, gradient accumulation, steps and lengths, bf16: with
  its defaults (activation checkpointing on), with checkpointing off, and SFT padding-free; ours/TRL.
- fsdp2_1proc / fsdp2_2proc: the same loop step sharded with FSDP2 (meta-device build, rank-0 load and
  broadcast, bf16 MixedPrecisionPolicy, NCCL on GPU, gloo on CPU) in one process, then in two processes
  sharing the GPU (NCCL may refuse two ranks on one GPU: its answer is recorded), and the sharded model
  gathered and saved as an HF directory (`loop.save_hf_model`).
- ppo: `rl.trainer.ppo_iteration` itself, unchanged, over the role classes held in this process
  (`InProcess`: `actor.method.remote(...)` runs at once and `ray.get` hands the result back): the HF
  rollout engine, policy and reference log-probs, critic values, the RM, GAE, the policy's and critic's
  minibatch steps (fp32 master weights, bf16 compute), the weight sync to the engine; episodes/s and
  seconds per phase, per iteration.
- rm_scoring: `models.reward.RewardModel.score_texts` (bf16); tokens/s.
- generation: `models.hf_backend.HFGenerator.generate_ids` (bf16, seeded top-p sampling) with the 3-rule
  adapter off and on; new tokens/s.

MFU counts model FLOPs as PaLM does (Chowdhery et al. 2022, Appendix B): 6 per parameter of every matmul
per token (the LM head over every token for SFT, whatever an implementation skips), plus causal
attention's 6·layers·width·length per token, over the peak of `--peak-tflops` (an 8192³ bf16 matmul ran at
769-798 TFLOP/s on this kind of machine; the run measures its own and reports it too).

Here, once, to fill `.gpu/` (wheels for Python 3.12 on x86-64 and the tokenizer; needs PyPI); it prints the
device command (`DEVICE_COMMAND`, quoted in docs/performance.md), to run with `.gpu` carried:
    .venv/bin/python bench/gpu_check.py --prepare
On CPU, small shapes, every path (tests/test_gpu_check.py runs this in `make test`):
    .venv/bin/python bench/gpu_check.py --cpu
Writes bench/results/gpu_check.json (gpu_check-cpu.json with --cpu) after every path, so a run cut short
leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

# first, as every stage does: no layer kernels from the Hub for either side, ours or TRL (models/loading.py)
import almost_ray.models.loading  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SHAPES_DIR = ROOT / "configs" / "model-shapes"
GPU_SHAPES = ("smollm2-135m", "llama-3.2-1b")
ASSETS = ROOT / ".gpu"  # git-ignored; carried to the GPU machine (`--prepare` fills it)
PEAK_TFLOPS = 790.0
# What the GPU machine's image lacks, or has older than this project needs (transformers 5.17 there,
# pyproject asks >= 5.25, which needs huggingface_hub >= 2.4 and its httpx2): installed there with
# `pip install --no-deps --target`, so every one is named. Versions are the project venv's (`--prepare`).
WHEELS = ("transformers", "huggingface_hub", "httpx2", "httpcore2", "truststore", "pydantic", "pydantic_core",
          "annotated_types", "typing_inspection", "typing_extensions", "trl", "datasets", "dill", "multiprocess")
# The device tool's command (`run`, carry [".gpu"], timeout_s 570). The wheels go under the interpreter's
# prefix: datasets hashes TRL's map functions with dill, which pickles by value every module outside
# sys.prefix, and fails on pyarrow's types there (seen on CPU with these packages outside the prefix).
DEVICE_COMMAND = (
    "set -o pipefail; S=$(python3 -c 'import sys; print(sys.prefix)')/almost-ray-carry; "
    "mkdir -p $S 2>/dev/null || S=/tmp/almost-ray-carry; "
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $S .gpu/wheels/*.whl || exit 3; "
    "export PYTHONPATH=$PWD:$S PYTHONUNBUFFERED=1; "
    "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "
    "python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log"
)
VERSIONS = ("torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "huggingface_hub",
            "safetensors", "pyarrow", "numpy", "pydantic", "flash_attn")


@dataclass
class Sizes:
    """How much each path does: on the GPU, steps of tens of thousands of tokens and the papers' PPO rollout
    shape (128 new tokens, 4 PPO epochs) at a smaller batch; on the CPU, just enough to run the same code."""

    steps: int  # optimizer steps per training row (the first is the warm-up)
    rm_batch: int  # pairs per optimizer step
    rm_micro: int  # pairs per forward pass
    rm_lengths: tuple[int, int]  # tokens of each side, drawn uniformly
    sft_batch: int
    sft_micro: int
    sft_lengths: tuple[int, int]
    ppo_rollout: int  # episodes per iteration
    ppo_minibatch: int
    ppo_micro: int
    ppo_epochs: int
    ppo_new_tokens: int
    ppo_prompt_lengths: tuple[int, int]
    ppo_iterations: int
    score_texts: int
    score_lengths: tuple[int, int]
    score_batch: int
    gen_prompts: int
    gen_lengths: tuple[int, int]
    gen_new_tokens: int
    gen_batch: int
    fsdp_steps: int
    trl_variants: tuple[str, ...] = ("defaults", "no-checkpointing", "padding-free")
    shapes: tuple[str, ...] = GPU_SHAPES
    fsdp_shape: str = "llama-3.2-1b"


GPU_SIZES = Sizes(steps=6, rm_batch=32, rm_micro=8, rm_lengths=(64, 512), sft_batch=64, sft_micro=16,
                  sft_lengths=(128, 1024), ppo_rollout=64, ppo_minibatch=16, ppo_micro=8, ppo_epochs=4,
                  ppo_new_tokens=128, ppo_prompt_lengths=(64, 192), ppo_iterations=2, score_texts=256,
                  score_lengths=(128, 512), score_batch=32, gen_prompts=64, gen_lengths=(32, 256), gen_new_tokens=128,
                  gen_batch=32, fsdp_steps=4)
CPU_SIZES = Sizes(steps=2, rm_batch=4, rm_micro=2, rm_lengths=(8, 24), sft_batch=4, sft_micro=2, sft_lengths=(8, 32),
                  ppo_rollout=4, ppo_minibatch=2, ppo_micro=2, ppo_epochs=1, ppo_new_tokens=6,
                  ppo_prompt_lengths=(8, 16), ppo_iterations=1, score_texts=8, score_lengths=(8, 24), score_batch=4,
                  gen_prompts=4, gen_lengths=(8, 16), gen_new_tokens=8, gen_batch=4, fsdp_steps=2,
                  shapes=("tiny",), fsdp_shape="tiny")
# The CPU shape: SmolLM2-135M's config, narrow and two blocks deep (its vocabulary kept).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    work: Path
    tokenizer_dir: Path
    deadline: float
    out: dict = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def save(self, complete: bool = False) -> None:
        self.out["complete"] = complete
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.out, indent=2, default=str) + "\n")
        tmp.replace(path)

    def attempt(self, name: str, shape: str, method: str, fn, *args) -> dict:
        """One path: its row (`ok`, figures, peak GPU memory, wall seconds, or the error), saved at once."""
        row = {"path": name, "shape": shape, "method": method}
        if time.monotonic() > self.deadline:
            row.update(ok=False, skipped="out of time (--budget-s)")
            print(f"[gpu_check] {name} {shape} {method}: skipped, out of time", flush=True)
        else:
            print(f"[gpu_check] {name} {shape} {method} ...", flush=True)
            free_memory()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            start, cpu = time.perf_counter(), cpu_seconds()
            try:
                row.update(fn(*args))
                row["ok"] = True
            except Exception as err:  # a failing path is a finding: record it and go on with the rest
                row.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000],
                           traceback=traceback.format_exc()[-4000:])
                print(row["traceback"], file=sys.stderr, flush=True)
            row["wall_s"] = round(time.perf_counter() - start, 2)
            row["cpu_s"] = round(cpu_seconds() - cpu, 2)  # this process and the children it waited for
            if self.cuda:
                row.setdefault("peak_gib", round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2))
            free_memory()
            print(f"[gpu_check]   {summary(row)}", flush=True)
        self.out["rows"].append(row)
        self.save()
        return row


def cpu_seconds() -> float:
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summary(row: dict) -> str:
    if not row.get("ok"):
        return row.get("skipped") or row.get("error", "failed")
    keys = ("tokens_per_s", "mfu", "episodes_per_s", "peak_gib", "attention", "wall_s", "cpu_s")
    return ", ".join(f"{k} {row[k]}" for k in keys if row.get(k) is not None)


def environment(device: torch.device) -> dict:
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import transformers

    env = {"python": platform.python_version(), "prefix": sys.prefix, "versions": versions, "cpus": os.cpu_count(),
           "cuda": torch.version.cuda, "device": str(device), "transformers_from": transformers.__file__,
           "hub_kernels": os.environ.get("USE_HUB_KERNELS")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, nccl=".".join(map(str, torch.cuda.nccl.version())),
                   bf16=torch.cuda.is_bf16_supported())
    from transformers.utils import is_flash_attn_2_available

    env["flash_attention_2"] = is_flash_attn_2_available()
    return env


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 dense matmul rate on random data (the ceiling MFU is read against), as KINDS.md measured it."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


# ---------------------------------------------------------------------------------------------- models and data
def shape_config(shape: str, tokenizer) -> dict:
    """The shape's published config.json, with the carried tokenizer's special ids (a random model has none)."""
    name = "smollm2-135m" if shape == "tiny" else shape
    config = json.loads((SHAPES_DIR / name / "config.json").read_text())
    if shape == "tiny":
        config.update(TINY)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return config


def make_model_dir(run: Run, shape: str) -> Path:
    """A causal LM directory of `shape`: random weights (seeded, drawn on the device, saved in bf16 on the GPU
    and fp32 on the CPU) and the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = run.work / "models" / shape
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    config = AutoConfig.for_model(**shape_config(shape, tokenizer))
    torch.manual_seed(0)
    with torch.device(run.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(torch.bfloat16 if run.cuda else torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    return out


def random_ids(rng: np.random.Generator, lengths: tuple[int, int], vocab: int) -> np.ndarray:
    """A sequence of random ordinary token ids (past the tokenizer's special tokens) of a random length."""
    return rng.integers(100, vocab, size=int(rng.integers(lengths[0], lengths[1] + 1)), dtype=np.int32)


def rm_examples(sizes: Sizes, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"chosen": random_ids(rng, sizes.rm_lengths, vocab), "rejected": random_ids(rng, sizes.rm_lengths, vocab)}
            for _ in range(sizes.rm_batch * sizes.steps)]


def sft_examples(sizes: Sizes, vocab: int, seed: int = 1, steps: int | None = None) -> list[dict]:
    """Sequences whose first 30 % is a prompt (no loss) and the rest a reply (labels as `train.sft` makes them)."""
    from almost_ray.train.losses import IGNORE_INDEX

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(sizes.sft_batch * (steps or sizes.steps)):
        ids = random_ids(rng, sizes.sft_lengths, vocab)
        labels = ids.copy()
        labels[: int(0.3 * len(ids))] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def random_texts(tokenizer, n: int, lengths: tuple[int, int], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [tokenizer.decode(random_ids(rng, lengths, len(tokenizer)).tolist(), skip_special_tokens=True)
            for _ in range(n)]


def example_tokens(task: str, example: dict) -> list[int]:
    """The sequence lengths one example puts through the model."""
    if task == "rm":
        return [len(example["chosen"]), len(example["rejected"])]
    return [len(example["input_ids"])]


def model_flops(config, lengths: list[int], lm_head: bool) -> float:
    """Model FLOPs of one forward and backward over sequences of `lengths` (see the module docstring)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * config.intermediate_size
    params = layers * per_layer + (config.vocab_size * hidden if lm_head else hidden)
    tokens = sum(lengths)
    return 6 * params * tokens + 6 * layers * heads * head_dim * sum(s * s for s in lengths)


def step_lengths(task: str, examples: list[dict], batches: list[list[int]]) -> list[list[int]]:
    """The sequence lengths each step put through the model."""
    return [[s for i in batch for s in example_tokens(task, examples[i])] for batch in batches]


def throughput(run: Run, config, lm_head: bool, lengths: list[list[int]], times: list[float]) -> dict:
    """tokens/s and MFU over the steps after the first (the warm-up); `lengths[k]`: what step k computed."""
    steady = slice(1, None) if len(times) > 1 else slice(None)
    seconds = sum(times[steady])
    tokens = sum(sum(x) for x in lengths[steady])
    flops = sum(model_flops(config, x, lm_head) for x in lengths[steady])
    out = {"steps": len(times), "step_s": [round(t, 4) for t in times], "tokens_per_s": round(tokens / seconds, 1),
           "model_tflops_per_s": round(flops / seconds / 1e12, 2)}
    out["mfu"] = round(flops / seconds / 1e12 / run.args.peak_tflops, 4) if run.cuda else None
    return out


# ---------------------------------------------------------------------------------------------- training: ours
def train_config(run: Run, task: str, model_dir: Path, steps: int):
    from almost_ray.train.config import TrainRMConfig, TrainSFTConfig

    s = run.sizes
    common = dict(model=str(model_dir), epochs=1, max_steps=steps, lr=1e-5, warmup_ratio=0.0, seed=0,
                  padding_free=True, mixed_precision="auto", use_gpu=run.cuda, num_workers=1)
    if task == "rm":
        return TrainRMConfig(**common, global_batch_size=s.rm_batch, micro_batch_size=s.rm_micro,
                             max_length=s.rm_lengths[1])
    return TrainSFTConfig(**common, global_batch_size=s.sft_batch, micro_batch_size=s.sft_micro,
                          max_length=s.sft_lengths[1])


def task_module(task: str):
    from almost_ray.train import rm, sft

    return rm if task == "rm" else sft


def examples_for(run: Run, task: str, vocab: int) -> list[dict]:
    return rm_examples(run.sizes, vocab) if task == "rm" else sft_examples(run.sizes, vocab)


def ours_train(run: Run, task: str, shape: str) -> dict:
    """The training loop's step, one process: what a one-worker Ray Train group runs."""
    from almost_ray.train import loop
    from almost_ray.train.data import global_batches

    model_dir, module = run.models[shape], task_module(task)
    examples = examples_for(run, task, vocab_of(run))
    cfg = train_config(run, task, model_dir, run.sizes.steps)
    lengths = [module.length(ex) for ex in examples]
    plan = global_batches(lengths, cfg.global_batch_size, 1, cfg.seed)[: run.sizes.steps]
    worker = loop.prepare_worker(module, str(model_dir), cfg, run.device, 0, 1, False, len(plan))
    worker.model.train()
    times, losses = [], []
    for batch in plan:
        start = time.perf_counter()
        done = loop.train_step(worker, module, cfg, examples, lengths, batch, {})
        run.sync()
        times.append(time.perf_counter() - start)
        losses.append(round(done.totals["loss"] / done.units, 4))
    weights = {str(p.dtype) for p in worker.model.parameters()}
    return {**throughput(run, worker.model.config, task == "sft", step_lengths(task, examples, plan), times),
            "loss": losses,
            "attention": worker.model.config._attn_implementation, "master_weights": sorted(weights),
            "params": sum(p.numel() for p in worker.model.parameters())}


def vocab_of(run: Run) -> int:
    """The tokenizer's vocabulary (every model's is as wide or wider): where random ids are drawn."""
    from almost_ray.models.loading import load_tokenizer

    return len(load_tokenizer(next(iter(run.models.values()))))


# ---------------------------------------------------------------------------------------------- training: TRL
def step_timer(run: Run):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """When each optimizer step ends, the device drained first."""

        def __init__(self):
            self.begin, self.ends = 0.0, []

        def on_train_begin(self, args, state, control, **kw):
            run.sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            run.sync()
            self.ends.append(time.perf_counter())

    return StepTimer()


def trl_train(run: Run, task: str, shape: str, variant: str) -> dict:
    """TRL 1.16 on the same model directory, examples (pre-tokenized, so TRL adds no token), micro-batch,
    accumulation, steps and lengths; bf16 on the GPU as ours. `variant`: TRL's defaults (activation
    checkpointing on), checkpointing off, or (SFT) also padding-free."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    s, model_dir = run.sizes, run.models[shape]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = examples_for(run, task, vocab_of(run))
    micro, batch = (s.rm_micro, s.rm_batch) if task == "rm" else (s.sft_micro, s.sft_batch)
    common = dict(per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
                  max_steps=s.steps, learning_rate=1e-5, activation_checkpointing=variant == "defaults",
                  bf16=run.cuda, use_cpu=not run.cuda, report_to="none", save_strategy="no", logging_steps=10**6,
                  disable_tqdm=True, seed=0, dataloader_num_workers=0)
    timer = step_timer(run)
    with tempfile.TemporaryDirectory(dir=run.work) as out:
        if task == "rm":
            from trl import RewardConfig, RewardTrainer

            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
            model.config.pad_token_id = tokenizer.pad_token_id
            rows = [{"chosen_ids": e["chosen"].tolist(), "rejected_ids": e["rejected"].tolist()} for e in examples]
            trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=out, max_length=s.rm_lengths[1], **common),
                                    train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer])
        else:
            from trl import SFTConfig, SFTTrainer

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            rows = [{"input_ids": e["input_ids"].tolist(), "labels": e["labels"].tolist()} for e in examples]
            padding_free = variant == "padding-free"
            # padding-free without packing does not enforce max_length (TRL refuses it set); every example fits
            args = SFTConfig(output_dir=out, max_length=None if padding_free else s.sft_lengths[1],
                             padding_free=padding_free, **common)
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                 callbacks=[timer])
        if len(trainer.train_dataset) != len(examples):
            raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(examples)} examples")
        trainer.train()
    times = [b - a for a, b in zip([timer.begin, *timer.ends], timer.ends)]
    # TRL's sampler shuffles and does not say which examples a step saw: every step is counted as the mean
    # step (the examples split in order); over the run that is exactly what TRL computed
    order = [list(range(k * batch, (k + 1) * batch)) for k in range(len(times))]
    return {**throughput(run, model.config, task == "sft", step_lengths(task, examples, order), times),
            "attention": model.config._attn_implementation}


# ---------------------------------------------------------------------------------------------- FSDP2
def fsdp_worker(rank: int, world: int, backend: str, port: int, model_dir: str, sizes: Sizes, cuda: bool,
                save_to: str, result: str) -> None:
    """One rank of the sharded loop step (a process of its own, or this one at world 1): FSDP2 over the
    process group, then the sharded model gathered and saved by rank 0. Writes its row to `result`."""
    import torch.distributed as dist

    from almost_ray.train import loop
    from almost_ray.train import sft as module
    from almost_ray.train.data import global_batches

    row: dict = {"rank": rank}
    started, cpu = time.perf_counter(), cpu_seconds()
    try:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
            torch.cuda.reset_peak_memory_stats(device)
        elif world > 1:
            torch.set_num_threads(1)
        # a rank whose peer failed gives up within the minute instead of torch's default half hour
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=device if cuda else None, timeout=timedelta(seconds=60))
        try:
            vocab = len(module.load_tokenizer(model_dir))
            examples = sft_examples(sizes, vocab, seed=2, steps=sizes.fsdp_steps)
            cfg = train_config_fsdp(sizes, model_dir, cuda)
            lengths = [module.length(ex) for ex in examples]
            plan = global_batches(lengths, cfg.global_batch_size, 1, cfg.seed)[: sizes.fsdp_steps]
            worker = loop.prepare_worker(module, model_dir, cfg, device, rank, world, True, len(plan))
            worker.model.train()
            times, losses = [], []
            for batch in plan:
                start = time.perf_counter()
                done = loop.train_step(worker, module, cfg, examples, lengths, batch, {})
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
                losses.append(round(done.totals["loss"] / done.units, 4))
            start = time.perf_counter()
            loop.save_hf_model(worker.model, module, model_dir, Path(save_to), rank, True, torch.bfloat16)
            row.update(times=times, losses=losses, save_s=round(time.perf_counter() - start, 2),
                       sharded=type(next(worker.model.parameters())).__name__ == "DTensor",
                       lengths=step_lengths("sft", examples, plan), cpu_s=round(cpu_seconds() - cpu, 2),
                       peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None, ok=True)
        finally:
            dist.destroy_process_group()
    except Exception as err:
        row.update(ok=False, error=f"{type(err).__name__}: {err}"[:2000], traceback=traceback.format_exc()[-4000:])
    row["wall_s"] = round(time.perf_counter() - started, 2)
    Path(result).write_text(json.dumps(row))


def train_config_fsdp(sizes: Sizes, model_dir: str, cuda: bool):
    from almost_ray.train.config import TrainSFTConfig

    return TrainSFTConfig(model=model_dir, epochs=1, max_steps=sizes.fsdp_steps, lr=1e-5, warmup_ratio=0.0, seed=0,
                          padding_free=True, mixed_precision="auto", use_gpu=cuda, num_workers=2,
                          global_batch_size=sizes.sft_batch, micro_batch_size=sizes.sft_micro,
                          max_length=sizes.sft_lengths[1])


class NcclRefused(RuntimeError):
    """NCCL's answer to two ranks of one group on one GPU: a finding about NCCL, not a failure of ours."""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp(run: Run, world: int) -> dict:
    """The sharded step at `world` ranks: in this process at 1, in `world` processes of their own otherwise
    (forked by a fork server, so the row's `cpu_s` leaves them out: `ranks_cpu_s` has theirs)."""
    import multiprocessing

    shape = run.sizes.fsdp_shape
    backend = "nccl" if run.cuda else "gloo"
    files = [run.work / f"fsdp{world}-rank{r}.json" for r in range(world)]
    args = [world, backend, free_port(), str(run.models[shape]), run.sizes, run.cuda,
            str(run.work / f"fsdp{world}-model")]
    if world == 1:
        fsdp_worker(0, *args, str(files[0]))
    else:
        # a fork server imports the heavy modules once for both ranks, and holds no CUDA context to fork
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", "almost_ray.train.loop", "almost_ray.train.sft"])
        procs = [ctx.Process(target=fsdp_worker, args=(r, *args, str(files[r]))) for r in range(world)]
        for p in procs:
            p.start()
        limit = time.monotonic() + run.args.fsdp_timeout_s
        for p in procs:
            p.join(max(1.0, limit - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
        if hung:
            raise TimeoutError(f"{len(hung)} of {world} ranks still running after {run.args.fsdp_timeout_s} s")
    ranks = [json.loads(f.read_text()) if f.exists() else {"ok": False, "error": "no result"} for f in files]
    failed = [r for r in ranks if not r.get("ok")]
    if any("Duplicate GPU" in r.get("error", "") for r in failed):
        raise NcclRefused(f"NCCL refused {world} ranks on one GPU: {failed[0]['error']}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {world} ranks failed; rank {failed[0].get('rank')}: "
                           f"{failed[0].get('error')}\n{failed[0].get('traceback', '')}")
    from transformers import AutoConfig

    from almost_ray.train import sft as module

    config = AutoConfig.from_pretrained(run.models[shape])
    times = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]
    saved = module.load_config(run.work / f"fsdp{world}-model")
    return {**throughput(run, config, True, ranks[0]["lengths"], times), "loss": ranks[0]["losses"],
            "sharded": all(r["sharded"] for r in ranks), "save_s": ranks[0]["save_s"],
            "saved_architecture": saved.architectures, "peak_gib": max((r["peak_gib"] or 0) for r in ranks) or None,
            "backend": backend, "world": world, "ranks_cpu_s": [r["cpu_s"] for r in ranks]}


# ---------------------------------------------------------------------------------------------- PPO
class InProcess:
    """A role object called as the PPO driver calls a Ray actor, `actor.method.remote(*args)`: the call runs
    at once, in this process, and its result stands where Ray's ObjectRef would (`local_ray`)."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name: str):
        return types.SimpleNamespace(remote=getattr(self._target, name))


@contextmanager
def local_ray():
    """`ray.get` as the identity while `InProcess` roles answer, so `rl.trainer.ppo_iteration` runs unchanged
    on a machine without Ray (and here, in this process, without starting one)."""
    stand_in = types.ModuleType("ray")
    stand_in.get = lambda refs: refs
    saved = sys.modules.get("ray")
    sys.modules["ray"] = stand_in
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop("ray", None)
        else:
            sys.modules["ray"] = saved


def ppo(run: Run, shape: str) -> dict:
    from almost_ray.models.loading import load_tokenizer
    from almost_ray.rl.config import PPOConfig, RoleResources, RolloutConfig
    from almost_ray.rl.roles import CriticActor, Placement, PolicyActor, ReferenceActor, RewardActor
    from almost_ray.rl.rollout import HFRolloutEngine
    from almost_ray.rl.stage import encode_prompts
    from almost_ray.rl.trainer import Roles, ppo_iteration

    s, model_dir = run.sizes, str(run.models[shape])
    gpus = 0.2 if run.cuda else 0  # every role on this one GPU (role_device: the GPU by index)
    role = RoleResources(num_gpus=gpus)
    cfg = PPOConfig(rollout_batch_size=s.ppo_rollout, minibatch_size=s.ppo_minibatch, micro_batch_size=s.ppo_micro,
                    ppo_epochs=s.ppo_epochs, max_new_tokens=s.ppo_new_tokens, total_episodes=s.ppo_rollout * s.ppo_iterations,
                    max_prompt_tokens=4 * s.ppo_prompt_lengths[1] + 64, policy_resources=role, critic_resources=role,
                    reference_resources=role, reward_resources=role, torch_threads=None if run.cuda else 1,
                    rollout=RolloutConfig(backend="hf", num_gpus=gpus, max_batch_size=s.ppo_rollout,
                                          torch_threads=None if run.cuda else 1))
    c = cfg.model_dump(mode="json")
    started = time.perf_counter()
    actors = {"policy": PolicyActor(c, model_dir), "critic": CriticActor(c, model_dir),
              "reference": ReferenceActor(c, model_dir), "reward": RewardActor(c, model_dir),
              "rollout": HFRolloutEngine(c, model_dir)}
    run.sync()
    load_s = time.perf_counter() - started
    devices = {name: str(getattr(a, "device", None)) for name, a in actors.items()}
    roles = Roles(Placement(group=None, where={}, actors={k: [InProcess(a)] for k, a in actors.items()}), vllm=False)
    tokenizer = load_tokenizer(model_dir)
    texts = random_texts(tokenizer, s.ppo_rollout, s.ppo_prompt_lengths, seed=3)
    prompts, dropped = encode_prompts(texts, tokenizer, cfg)
    if dropped:
        raise RuntimeError(f"{dropped} prompts longer than max_prompt_tokens")
    iterations = []
    with local_ray():
        for it in range(s.ppo_iterations):
            iterations.append(ppo_iteration(roles, cfg, prompts, it, tokenizer, sync=True))
    last = iterations[-1]
    keys = ("episodes_per_s", "time_rollout_s", "time_scoring_s", "time_training_s", "time_sync_s", "iteration_s")
    return {**{k: last[k] for k in keys}, "load_s": round(load_s, 2), "devices": devices,
            "prompt_tokens_mean": round(sum(len(p.ids) for p in prompts) / len(prompts), 1),
            "iterations": iterations, "response_length": last["response_length"],
            "settings": {k: c[k] for k in ("rollout_batch_size", "minibatch_size", "micro_batch_size", "ppo_epochs",
                                            "max_new_tokens", "padding_free", "dtype", "mixed_precision")}}


# ---------------------------------------------------------------------------------------------- scoring, generation
def rm_scoring(run: Run, shape: str) -> dict:
    from almost_ray.models.loading import load_tokenizer
    from almost_ray.models.reward import RewardModel

    s, model_dir = run.sizes, str(run.models[shape])
    tokenizer = load_tokenizer(model_dir)
    texts = random_texts(tokenizer, s.score_texts, s.score_lengths, seed=4)
    tokens = sum(min(len(tokenizer(t, add_special_tokens=False).input_ids), s.score_lengths[1]) for t in texts)
    rm = RewardModel(model_dir, dtype="auto", device=str(run.device), max_length=s.score_lengths[1],
                     batch_size=s.score_batch)
    rm.score_texts(texts[: s.score_batch])  # warm-up
    run.sync()
    start = time.perf_counter()
    scores = rm.score_texts(texts)
    seconds = time.perf_counter() - start
    if not all(np.isfinite(scores)):
        raise RuntimeError("non-finite RM scores")
    return {"tokens_per_s": round(tokens / seconds, 1), "texts": len(texts), "tokens": tokens,
            "dtype": str(next(rm.model.parameters()).dtype), "attention": rm.model.config._attn_implementation}


def generation(run: Run, shape: str, rules: bool) -> dict:
    from almost_ray.adapters.config import RulesConfig
    from almost_ray.models.config import ModelConfig, SamplingParams
    from almost_ray.models.hf_backend import HFGenerator
    from almost_ray.models.loading import eos_token_ids

    s, model_dir = run.sizes, str(run.models[shape])
    generator = HFGenerator(ModelConfig(ref=model_dir, backend="hf", dtype="auto", max_batch_size=s.gen_batch,
                                        rules=RulesConfig(enabled=rules)), device=str(run.device))
    prompts = random_texts(generator.tokenizer, s.gen_prompts, s.gen_lengths, seed=5)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=s.gen_new_tokens, seed=0)
    start = time.perf_counter()
    generator.generate_ids(prompts[:2], params.model_copy(update={"max_new_tokens": 2}))  # warm-up, rule tables
    warmup_s = time.perf_counter() - start
    eos = set(eos_token_ids(generator.tokenizer, generator.model.generation_config))
    order = sorted(prompts, key=len)
    new_tokens = 0
    run.sync()
    start = time.perf_counter()
    for k in range(0, len(order), s.gen_batch):
        out = generator.generate_ids(order[k : k + s.gen_batch], params).tolist()
        new_tokens += sum(next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in out)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": round(new_tokens / seconds, 1), "new_tokens": new_tokens, "prompts": len(prompts),
            "warmup_s": round(warmup_s, 2), "dtype": str(generator.model.dtype), "rules": rules}


# ---------------------------------------------------------------------------------------------- report
def ratios(rows: list[dict]) -> None:
    """ours/TRL tokens/s, per task and shape: to TRL's defaults and to TRL's fastest row of this run."""
    for r in rows:
        if r["path"] not in ("train_rm", "train_sft") or r["method"] != "almost_ray" or not r.get("ok"):
            continue
        trl = [x for x in rows if x["path"] == r["path"] and x["shape"] == r["shape"]
               and x["method"].startswith("TRL") and x.get("ok")]
        defaults = next((x for x in trl if "defaults" in x["method"]), None)
        r["x_trl_defaults"] = round(r["tokens_per_s"] / defaults["tokens_per_s"], 2) if defaults else None
        r["x_trl_fastest"] = round(r["tokens_per_s"] / max(x["tokens_per_s"] for x in trl), 2) if trl else None


def table(rows: list[dict]) -> str:
    def cell(value, fmt="{:.1f}"):
        return "-" if value is None else fmt.format(value)

    head = (f"{'path':<12} {'shape':<13} {'method':<30} {'tokens/s':>10} {'MFU':>6} {'x TRL':>6} {'x fast':>6} "
            f"{'peak GiB':>8} {'wall s':>7}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["path"] == "ppo":
            continue
        note = "" if r.get("ok") else (r.get("skipped") or r.get("error", "")).splitlines()[0][:60]
        note = note or r.get("attention") or ""
        lines.append(f"{r['path']:<12} {r['shape']:<13} {r['method'][:30]:<30} {cell(r.get('tokens_per_s')):>10} "
                     f"{cell(r.get('mfu') and 100 * r['mfu'], '{:.1f}%'):>6} {cell(r.get('x_trl_defaults'), '{:.2f}'):>6} "
                     f"{cell(r.get('x_trl_fastest'), '{:.2f}'):>6} {cell(r.get('peak_gib'), '{:.2f}'):>8} "
                     f"{cell(r.get('wall_s')):>7}  {note}")
    ppo_rows = [r for r in rows if r["path"] == "ppo"]
    if ppo_rows:
        head = (f"\n{'PPO':<12} {'shape':<13} {'episodes/s':>10} {'rollout s':>9} {'scoring s':>9} {'training s':>10} "
                f"{'sync s':>7} {'iter s':>7} {'peak GiB':>8}  note")
        lines += [head, "-" * len(head)]
        for r in ppo_rows:
            note = "" if r.get("ok") else (r.get("skipped") or r.get("error", "")).splitlines()[0][:60]
            lines.append(f"{'ppo':<12} {r['shape']:<13} {cell(r.get('episodes_per_s'), '{:.2f}'):>10} "
                         f"{cell(r.get('time_rollout_s'), '{:.2f}'):>9} {cell(r.get('time_scoring_s'), '{:.2f}'):>9} "
                         f"{cell(r.get('time_training_s'), '{:.2f}'):>10} {cell(r.get('time_sync_s'), '{:.2f}'):>7} "
                         f"{cell(r.get('iteration_s'), '{:.2f}'):>7} {cell(r.get('peak_gib'), '{:.2f}'):>8}  {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- preparing the carry
def prepare(dest: Path) -> None:
    """Fill `dest` (`.gpu/`, git-ignored) with what travels to the GPU machine: the tokenizer, and wheels for
    CPython 3.12 on x86-64 Linux of `WHEELS` at this venv's versions (pip download, no dependencies)."""
    from almost_ray.models.loading import resolve_model_dir

    tokenizer = dest / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    source = resolve_model_dir("embedded:smollm2-135m-instruct")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(source / name, tokenizer / name)
    wheels = dest / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                              "manylinux2014_x86_64", "manylinux1_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels), *pins],
                   check=True)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {len(list(wheels.glob('*.whl')))} wheels ({', '.join(pins)}) and the tokenizer, "
          f"{size / 2**20:.1f} MiB (the device tool carries 64 MiB with the working tree)\n"
          f"the device command (run, carry ['.gpu'], timeout_s 570):\n{DEVICE_COMMAND}")


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="small shapes on the CPU: the same code paths, no figures")
    ap.add_argument("--prepare", action="store_true", help="fill .gpu/ with the wheels and tokenizer that travel")
    ap.add_argument("--out", help="JSON results (default bench/results/gpu_check.json, -cpu with --cpu)")
    ap.add_argument("--only", help="comma-separated paths: train,trl,ppo,rm_scoring,generation,fsdp2")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no path after this many seconds (default 450 on GPU: the run ends within 8 minutes)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="the bf16 peak MFU is read against")
    ap.add_argument("--fsdp-timeout-s", type=float, default=150, help="the two-process FSDP2 run's limit")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(ASSETS)
        return 0
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --cpu for the small CPU run")
    args.out = args.out or str(ROOT / "bench" / "results" / ("gpu_check-cpu.json" if args.cpu else "gpu_check.json"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # fresh score heads are *meant* to be missing from the LM checkpoints
    hf_logging.disable_progress_bar()
    if not cuda:
        torch.set_num_threads(2)
    sizes = GPU_SIZES if cuda else CPU_SIZES
    only = set(args.only.split(",")) if args.only else {"train", "trl", "ppo", "rm_scoring", "generation", "fsdp2"}
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tokenizer_dir = ASSETS / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        from almost_ray.models.loading import resolve_model_dir

        tokenizer_dir = resolve_model_dir("embedded:smollm2-135m-instruct")
    budget = args.budget_s if args.budget_s is not None else (450 if cuda else 600)
    begun = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        run = Run(args, sizes, device, Path(work), tokenizer_dir, begun + budget)
        run.out = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(device),
                   "peak_tflops": args.peak_tflops, "sizes": sizes.__dict__, "rows": []}
        if cuda:
            run.out["matmul_tflops_measured"] = round(matmul_tflops(device), 1)
        for shape in sizes.shapes:
            run.models[shape] = make_model_dir(run, shape)
        run.out["setup_s"] = round(time.monotonic() - begun, 2)
        run.save()
        trl_first = ("defaults",)
        for shape in sizes.shapes:
            for task in ("rm", "sft"):
                if "train" in only:
                    run.attempt(f"train_{task}", shape, "almost_ray", ours_train, run, task, shape)
                if "trl" in only:
                    run.attempt(f"train_{task}", shape, "TRL 1.16 defaults (act. ckpt on)", trl_train, run, task,
                                shape, "defaults")
        for shape in sizes.shapes:
            if "ppo" in only:
                run.attempt("ppo", shape, "almost_ray in-process roles", ppo, run, shape)
            if "rm_scoring" in only:
                run.attempt("rm_scoring", shape, "RewardModel", rm_scoring, run, shape)
            if "generation" in only:
                for rules in (False, True):
                    run.attempt("generation", shape, f"HFGenerator rules {'on' if rules else 'off'}", generation,
                                run, shape, rules)
        if "fsdp2" in only:
            for world in (1, 2):
                run.attempt(f"fsdp2_{world}proc", sizes.fsdp_shape, f"almost_ray FSDP2 {world} rank(s)", fsdp, run,
                            world)
        if "trl" in only:
            for shape in sizes.shapes:
                for task in ("rm", "sft"):
                    for variant in sizes.trl_variants:
                        if variant in trl_first or (variant == "padding-free" and task == "rm"):
                            continue  # TRL 1.16's RewardTrainer has no padding-free mode
                        label = f"TRL 1.16 {variant}" + (" (act. ckpt off)" if variant == "padding-free" else "")
                        run.attempt(f"train_{task}", shape, label, trl_train, run, task, shape, variant)
        ratios(run.out["rows"])
        run.out["wall_s"] = round(time.monotonic() - begun, 1)
        run.save(complete=True)
    print("\n" + table(run.out["rows"]))
    failed = [r for r in run.out["rows"] if not r.get("ok") and not r.get("error", "").startswith("NcclRefused")]
    print(f"\n{len(run.out['rows']) - len(failed)} of {len(run.out['rows'])} paths ran or were refused by NCCL; wrote {args.out} "
          f"({run.out['wall_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
