"""PPO throughput: our `almost-ray ppo` stage next to TRL 1.12's PPO, in one run, with a per-phase table.

Same policy (the embedded SmolLM2-135M-Instruct converted to HF, or `tiny:llama` for a smoke run),
same RM (a sequence classifier directory; built once from the policy with a seeded fresh head when
`--reward-model` is not given), critic initialised from the RM on both sides, the same prompts
(Human:/Assistant: rendered), rollout batch, minibatch, PPO epochs, response length, temperature 1,
KL coefficient 0.05 (k1), gamma 1, lambda 0.95, clip 0.2, fp32 on CPU (`--bf16`: bf16 mixed precision on
both sides, TRL `bf16=True` and our `ppo.mixed_precision: bf16`, fp32 weights).

TRL: `trl.experimental.ppo.PPOTrainer` of trl==1.12.0, the last TRL with PPO (docs/ppo.md). It is
installed once with `pip install --no-deps --target ~/.cache/almost_ray/bench-trl-1.12.0` and run in a
subprocess with that directory first on sys.path (it works with our transformers 5.x, with deprecation
warnings the subprocess silences). TRL has no phase timers: we time the functions its `train()` calls
through its module globals -- `batch_generation` (rollout), `get_reward` and no-grad `forward`
(scoring: value, reward and reference log-probs) -- and count the rest of the loop (GAE, PPO epochs,
logging) as training. TRL has no weight sync: it generates with the model it trains. TRL's rollout
batch is `per_device_train_batch_size * gradient_accumulation_steps` and accelerate steps the optimizer
once per `gradient_accumulation_steps` micro-batches, so for one optimizer step per minibatch (the
paper's PPO and ours) it gets `per_device_train_batch_size = rollout`, `gradient_accumulation_steps =
1`, `num_mini_batches = rollout / minibatch`: each minibatch is one micro-batch and one step. Its
optimizer is Trainer's default, fused AdamW, as ours (`train/optim.py`).

Ours: `almost_ray.rl.stage.run(PPOConfig, RayConfig, run_dir, prompts)` on a local Ray; its
`<run dir>/ppo/metrics.jsonl` gives `episodes_per_s` and the seconds of each phase per iteration
(its `time_*_s` keys summed over iterations; the loop time is the sum of
`rollout_batch_size / episodes_per_s`).

Episodes/s = episodes / wall time of the training loop (TRL: `train()`; ours: the sum of iteration
times from its metrics) and end to end (ours with Ray start, actors and model loading). The machine
is shared: compare within one run, never across runs.
Real measurement: `.venv/bin/python bench/ppo.py` (32 episodes, rollout 16, minibatch 4, 4 epochs,
64 new tokens); smoke run: `--model tiny:llama --episodes 4 --rollout-batch 2 --minibatch 1 --response-length 8`.
Writes bench/results/ppo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRL_VERSION = "1.12.0"
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "How do I boil an egg?", "What is the capital of France?", "Give me three tips for better sleep.",
    "Explain photosynthesis in one paragraph.", "How can I learn to play the guitar?",
    "What should I pack for a weekend hike?", "Why is the sky blue?", "Write a short poem about rain.",
    "How do I make a cup of tea?", "What are the benefits of regular exercise?",
    "How do I start saving money?", "What is a prime number?", "Suggest a name for a pet cat.",
    "How does a refrigerator keep food cold?", "What is the difference between weather and climate?",
    "How can I improve my handwriting?",
]


def trl_dir() -> Path:
    """trl==1.12.0 in its own target directory, installed on first use (no deps: ours are used)."""
    from almost_ray.models.loading import cache_root

    target = cache_root() / f"bench-trl-{TRL_VERSION}"
    if not (target / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                        "--target", str(target), f"trl=={TRL_VERSION}"], check=True)
    return target


def reward_model_dir(policy_dir: Path, given: str | None) -> Path:
    """The RM both sides use: `--reward-model`, else the policy with a fresh seeded one-output head."""
    if given:
        return Path(given)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from almost_ray.models.loading import cache_root

    out = cache_root() / f"bench-rm-{policy_dir.name}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rm.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def settings(args, policy: Path, rm: Path) -> dict:
    return {"policy": str(policy), "reward_model": str(rm), "episodes": args.episodes,
            "rollout_batch": args.rollout_batch, "minibatch": args.minibatch, "ppo_epochs": args.ppo_epochs,
            "response_length": args.response_length, "lr": 1e-6, "kl_coef": 0.05, "seed": 0,
            "threads": args.threads, "torch_threads": args.torch_threads, "bf16": args.bf16,
            "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
            "prompts": [PROMPTS[i % len(PROMPTS)] for i in range(max(len(PROMPTS), args.rollout_batch))]}


# -- TRL side (runs in a subprocess with trl 1.12 first on sys.path) --------------------------------------


def phase_timer(phases: dict[str, float]):
    """`timed(name, fn)`: `fn`, adding its wall seconds to `phases[name]`; with `only_no_grad`, only its calls
    under `torch.no_grad` (the scoring passes; the same function in the training step is not scoring).
    How the TRL rows here and in bench/grpo.py split a trainer's time into rollout and scoring."""
    import torch

    def timed(name: str, fn, only_no_grad: bool = False):
        def wrapper(*a, **kw):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] += time.perf_counter() - t
        return wrapper

    return timed


def trl_worker(spec_file: str, out_file: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*experimental.*")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from collections import defaultdict

    import torch
    import transformers
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from almost_ray.prompts.templates import human_assistant

    transformers.logging.set_verbosity_error()
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    phase = defaultdict(float)
    timed = phase_timer(phase)
    ppo_module.batch_generation = timed("rollout_s", ppo_module.batch_generation)
    ppo_module.get_reward = timed("scoring_s", ppo_module.get_reward)
    ppo_module.forward = timed("scoring_s", ppo_module.forward, only_no_grad=True)

    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [human_assistant([{"role": "user", "content": p}]) for p in spec["prompts"]]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False).input_ids for t in texts]})
    f32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], **f32)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy"], **f32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **f32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, **f32)
    for m in (policy, ref):
        m.generation_config.pad_token_id = tokenizer.pad_token_id
    n_minibatches = spec["rollout_batch"] // spec["minibatch"]
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, report_to=[], save_strategy="no", logging_steps=1, num_sample_generations=0,
            per_device_train_batch_size=spec["rollout_batch"], gradient_accumulation_steps=1,
            num_mini_batches=n_minibatches, local_rollout_forward_batch_size=spec["rollout_batch"],
            total_episodes=spec["episodes"], num_ppo_epochs=spec["ppo_epochs"],
            response_length=spec["response_length"], temperature=1.0, stop_token="eos",
            learning_rate=spec["lr"], lr_scheduler_type="constant", kl_coef=spec["kl_coef"], kl_estimator="k1", cliprange=0.2,
            cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, seed=spec["seed"],
            bf16=spec["bf16"], fp16=False, gradient_checkpointing=spec["trl_gradient_checkpointing"],
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        )
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                             reward_model=reward, value_model=value, train_dataset=dataset)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        episodes = trainer.state.episode
        log = [row for row in trainer.state.log_history if "objective/scores" in row]
    phases = dict(phase)
    phases["training_s"] = wall - sum(phases.values())
    phases["weight_sync_s"] = 0.0
    Path(out_file).write_text(json.dumps({
        "method": f"TRL {TRL_VERSION} PPOTrainer{' bf16' if spec['bf16'] else ''}", "episodes": episodes, "loop_s": wall,
        "episodes_per_s": episodes / wall, "phases_s": phases,
        "mean_score_first_last": [log[0]["objective/scores"], log[-1]["objective/scores"]] if log else None,
    }))


def run_trl(spec: dict, work: Path) -> dict:
    spec_file, out_file = work / "trl_spec.json", work / "trl_result.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(trl_dir()), str(REPO)]), TRL_EXPERIMENTAL_SILENCE="1",
               OMP_NUM_THREADS=str(spec["threads"]))
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--trl-worker", str(spec_file), str(out_file)], env=env, check=True)
    result = json.loads(out_file.read_text())
    result["end_to_end_s"] = time.perf_counter() - start
    return result


# -- our side ------------------------------------------------------------------------------------------


PHASE_NAMES = {"time_sync_s": "weight_sync_s"}  # our metrics' phase keys, named as the TRL side's


def ours_config(spec: dict, prompts: Path):
    """Our PPOConfig with the settings TRL gets (critic from the RM, constant lr, no checkpoints)."""
    from almost_ray.rl.config import PPOConfig

    return PPOConfig(
        policy=spec["policy"], reward_model=spec["reward_model"], prompts=prompts, prompt_format="human_assistant",
        total_episodes=spec["episodes"], rollout_batch_size=spec["rollout_batch"], minibatch_size=spec["minibatch"],
        micro_batch_size=spec["minibatch"], ppo_epochs=spec["ppo_epochs"], max_new_tokens=spec["response_length"],
        temperature=1.0, kl_coef=spec["kl_coef"], kl_estimator="k1", gamma=1.0, lam=0.95, clip_range=0.2,
        clip_range_value=0.2, value_loss_coef=0.1, lr=spec["lr"], min_lr=spec["lr"], critic_lr=spec["lr"],
        seed=spec["seed"], dtype="float32", checkpoint_every=10_000, critic_init="reward",
        # configs/demo.yaml's layout on `threads` CPUs: the four roles share one bundle, the rollout engine
        # has the rest and generates with every thread (no role works during the rollout)
        colocate=[["policy", "critic", "reference", "reward"]],
        **{f"{role}_resources": {"replicas": 1, "num_cpus": 0.25} for role in ("policy", "critic", "reference", "reward")},
        rollout={"backend": "hf", "engines": 1, "num_cpus": max(spec["threads"] - 1, 1),
                 "max_batch_size": spec["rollout_batch"], "torch_threads": spec["threads"]},
        torch_threads=spec["torch_threads"], mixed_precision="bf16" if spec["bf16"] else "fp32",
    )


def run_ours(spec: dict, work: Path) -> dict:
    """`almost_ray.rl.stage.run` with the same settings; phases from its metrics.jsonl."""
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(spec["prompts"]) + "\n")
    cfg = ours_config(spec, prompts)
    try:
        from almost_ray.rl import stage
    except ImportError as err:
        return {"method": "almost_ray ppo", "skipped": f"almost_ray.rl.stage not available: {err}"}
    from almost_ray.cluster.config import RayConfig

    run_dir = work / "ours"
    start = time.perf_counter()
    stage.run(cfg, RayConfig(num_cpus=spec["threads"]), run_dir)
    end_to_end = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    phases: dict[str, float] = {}
    for row in rows:
        for key, val in row.items():
            if isinstance(val, (int, float)) and key.startswith("time_"):  # time_rollout_s -> TRL's rollout_s
                name = PHASE_NAMES.get(key, key.removeprefix("time_"))
                phases[name] = phases.get(name, 0.0) + float(val)
    episodes = cfg.iterations * cfg.rollout_batch_size
    # an iteration's time is its episodes over its episodes/s; without that key, the phases' sum
    loop = sum(cfg.rollout_batch_size / r["episodes_per_s"] for r in rows if r.get("episodes_per_s"))
    loop = loop or sum(phases.values())
    method = "almost_ray ppo" + (" bf16" if spec["bf16"] else "")
    return {"method": method, "episodes": episodes, "loop_s": loop, "episodes_per_s": episodes / loop,
            "reported_episodes_per_s": [r.get("episodes_per_s") for r in rows], "phases_s": phases,
            "end_to_end_s": end_to_end}


# -- table ---------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    done = [r for r in results if "skipped" not in r]
    keys = sorted({k for r in done for k in r["phases_s"]})
    lines = [f"{'method':<26} {'episodes':>8} {'ep/s':>7} {'loop s':>8} {'e2e s':>8}  " + "  ".join(keys)]
    for r in done:
        cells = "  ".join(f"{r['phases_s'].get(k, float('nan')):>{len(k)}.1f}" for k in keys)
        lines.append(f"{r['method']:<26} {r['episodes']:>8} {r['episodes_per_s']:>7.3f} {r['loop_s']:>8.1f} "
                     f"{r['end_to_end_s']:>8.1f}  {cells}")
    lines += [f"{r['method']}: skipped ({r['skipped']})" for r in results if "skipped" in r]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="policy reference (tiny:llama for a smoke run)")
    ap.add_argument("--reward-model", help="RM directory (default: the policy with a fresh seeded head)")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--rollout-batch", type=int, default=16)
    ap.add_argument("--minibatch", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--response-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="ours: threads per role actor (configs/demo.yaml's 1: actors that run side by side do not oversubscribe)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default (ours: off)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 mixed precision on both sides (TRL: bf16=True; ours: ppo.mixed_precision: bf16)")
    ap.add_argument("--side", choices=["both", "trl", "ours"], default="both")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ppo.json"))
    args = ap.parse_args()
    if args.rollout_batch % args.minibatch:
        ap.error("--rollout-batch must be a multiple of --minibatch")
    from almost_ray.models.loading import resolve_model_dir

    policy = resolve_model_dir(args.model)
    spec = settings(args, policy, reward_model_dir(policy, args.reward_model))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        if args.side in ("both", "trl"):
            results.append(run_trl(spec, Path(tmp)))
        if args.side in ("both", "ours"):
            results.append(run_ours(spec, Path(tmp)))
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {k: v for k, v in spec.items() if k != "prompts"}, "prompts": len(spec["prompts"]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m": os.getloadavg()[0]},
        "results": results,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
