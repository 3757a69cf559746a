"""GRPO throughput: our `almost-ray ppo` with `advantage_estimator: grpo` next to TRL 1.16's `GRPOTrainer`, in one
run, with a per-phase table.

Same policy (SmolLM2-135M-Instruct; `--model tiny:llama` for a smoke run), same RM (a sequence classifier:
`--reward-model`, else the policy with a seeded fresh head, as bench/ppo.py builds it), the same prompts
rendered as `Human:`/`Assistant:` text, the same group size (`--group` answers per prompt), rollout batch
(answers per generation), minibatch (answers per optimizer step, one micro-batch), passes over each batch
(TRL's `num_iterations`, our `ppo_epochs`), answer length, temperature 1, no top-k/top-p, GRPO's
advantages ((r - group mean) / group std), its KL as a k3 loss term with coefficient `--beta` (TRL `beta`,
our `kl_coef` with `use_kl_loss`), clip 0.2, token-mean loss over the minibatch (TRL `loss_type="dapo"`,
ours always), a constant lr of 1e-6, fp32 on the CPU (`--bf16`: bf16 mixed precision on both sides).

TRL runs in this process on 2 threads, with its defaults for everything not named above (gradient
checkpointing on) and with gradient checkpointing off. It generates with the model it trains (HF
`generate`, the whole generation batch at once) and scores with the RM in-process. We time, through its
instance methods, `_generate` (rollout), `_calculate_rewards` and no-grad `_get_per_token_logps_and_entropies`
(scoring: reference and, when needed, old log-probs); the rest of `train()` is training. Ours runs on a
local Ray of 2 CPUs in configs/demo.yaml's layout: policy, reference and reward actors share one bundle
(no critic), an HF rollout engine generates with both threads, and the policy's weights reach the engine
after each iteration (`sync`); its `metrics.jsonl` gives each phase.

Answers per second = answers / the loop's wall time (TRL: `train()`; ours: the sum of iteration times), and
end to end for ours (Ray start, actors, model loads). Sampled answers differ between the two sides, so
their mean length is shown: an answer that stops early at EOS is cheaper.

The machine must be otherwise idle for numbers worth quoting (the script prints the load average and warns).
Real measurement: `.venv/bin/python bench/grpo.py` (64 answers: 4 iterations of 4 prompts x 4, minibatch 8,
64 new tokens). Smoke run: `--model tiny:llama --answers 8 --rollout-batch 4 --group 2 --minibatch 2
--response-length 8 --no-trl-gc-off`. Writes bench/results/grpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from ppo import PROMPTS, phase_timer, reward_model_dir
from side_by_side import add_ratios, is_idle, load_1m, machine, warn_if_busy

from almost_ray.cluster.config import RayConfig
from almost_ray.config import Config
from almost_ray.models.loading import resolve_model_dir
from almost_ray.prompts.templates import human_assistant
from almost_ray.rl.config import PPOConfig

LR = 1e-6


def prompts_for(args) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(args.answers // args.group)]


# -- TRL ----------------------------------------------------------------------------------------------------


def trl_grpo(args, policy: Path, rm: Path, gc: bool) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PrinterCallback,
    )
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, dtype=torch.float32)
    reward_tokenizer = AutoTokenizer.from_pretrained(rm)
    data = Dataset.from_list([{"prompt": human_assistant([{"role": "user", "content": p}])} for p in prompts_for(args)])
    steps_per_generation = args.rollout_batch // args.minibatch
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
            per_device_train_batch_size=args.minibatch, gradient_accumulation_steps=1,
            steps_per_generation=steps_per_generation, num_generations=args.group, num_iterations=args.epochs,
            max_steps=args.answers // args.rollout_batch * steps_per_generation * args.epochs,
            max_completion_length=args.response_length, temperature=1.0, top_p=1.0, top_k=0,
            beta=args.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group", learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, activation_checkpointing=gc, bf16=args.bf16, use_cpu=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tokenizer, reward_processing_classes=reward_tokenizer)
        trainer.remove_callback(PrinterCallback)  # logging_steps=1 keeps every step's reward; no need to print it
        phases = defaultdict(float)
        timed = phase_timer(phases)
        trainer._generate = timed("rollout_s", trainer._generate)
        trainer._calculate_rewards = timed("scoring_s", trainer._calculate_rewards)
        trainer._get_per_token_logps_and_entropies = timed("scoring_s", trainer._get_per_token_logps_and_entropies,
                                                           only_no_grad=True)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        logged = [row for row in trainer.state.log_history if "reward" in row]
    phases = dict(phases)
    phases["training_s"] = wall - sum(phases.values())
    answers = trainer.state.global_step * args.minibatch // args.epochs
    return {"method": f"TRL 1.16 GRPOTrainer ({'defaults, ' if gc else ''}grad ckpt {'on' if gc else 'off'})",
            "answers": answers, "loop_s": round(wall, 2), "answers_per_s": round(answers / wall, 3),
            "phases_s": {k: round(v, 2) for k, v in phases.items()}, "end_to_end_s": None,
            "mean_length": round(sum(r.get("completions/mean_length", 0) for r in logged) / len(logged), 1)
            if logged else None,
            "reward_first_last": [logged[0]["reward"], logged[-1]["reward"]] if logged else None}


# -- ours ---------------------------------------------------------------------------------------------------


def ours(args, policy: Path, rm: Path, work: Path) -> dict:
    from almost_ray.data.metrics_log import read_metrics
    from almost_ray.rl import stage

    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(prompts_for(args)) + "\n")
    section = PPOConfig(
        policy=str(policy), reward_model=str(rm), prompts=str(prompts), prompt_format="human_assistant",
        advantage_estimator="grpo", n_samples_per_prompt=args.group, use_kl_loss=True, kl_estimator="k3",
        kl_coef=args.beta, total_episodes=args.answers, rollout_batch_size=args.rollout_batch,
        minibatch_size=args.minibatch, micro_batch_size=args.minibatch, ppo_epochs=args.epochs,
        max_new_tokens=args.response_length, temperature=1.0, top_p=1.0, clip_range=0.2, lr=LR, min_lr=LR,
        seed=0, dtype="float32", mixed_precision="bf16" if args.bf16 else "fp32", checkpoint_every=10_000,
        colocate=[["policy", "reference", "reward"]], torch_threads=1,
        **{f"{role}_resources": {"replicas": 1, "num_cpus": 0.25} for role in ("policy", "reference", "reward")},
        rollout={"backend": "hf", "engines": 1, "num_cpus": 1, "max_batch_size": args.rollout_batch,
                 "torch_threads": 2},
    )
    cfg = Config(runs_dir=work, run_name="ours", ray=RayConfig(num_cpus=2), ppo=section)
    start = time.perf_counter()
    stage_dir = stage.run(cfg)
    end_to_end = time.perf_counter() - start
    rows = read_metrics(stage_dir / "metrics.jsonl")
    phases: dict[str, float] = defaultdict(float)
    for row in rows:
        for key in ("time_rollout_s", "time_scoring_s", "time_training_s", "time_sync_s"):
            phases[key.removeprefix("time_")] += row[key]
    loop = sum(r["iteration_s"] for r in rows)
    answers = sum(r["episodes"] for r in rows)
    return {"method": "almost_ray ppo, advantage_estimator grpo", "answers": answers, "loop_s": round(loop, 2),
            "answers_per_s": round(answers / loop, 3), "phases_s": {k: round(v, 2) for k, v in phases.items()},
            "end_to_end_s": round(end_to_end, 2),
            "mean_length": round(sum(r["response_length"] for r in rows) / len(rows), 1),
            "reward_first_last": [rows[0]["reward_mean"], rows[-1]["reward_mean"]]}


# -- table --------------------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    keys = ["rollout_s", "scoring_s", "training_s", "sync_s"]
    lines = [f"{'method':<44} {'answers':>7} {'ans/s':>7} {'loop s':>7} {'e2e s':>7} {'len':>5} {'x TRL':>6} "
             f"{'x fastest':>9}  " + "  ".join(keys)]
    for r in results:
        e2e = f"{r['end_to_end_s']:>7.1f}" if r["end_to_end_s"] else f"{'-':>7}"
        cells = "  ".join(f"{r['phases_s'].get(k, 0.0):>{len(k)}.1f}" for k in keys)
        lines.append(f"{r['method']:<44} {r['answers']:>7} {r['answers_per_s']:>7.3f} {r['loop_s']:>7.1f} {e2e} "
                     f"{r['mean_length'] or 0:>5.1f} {r['ratio_vs_trl_defaults'] or 0:>6.2f} "
                     f"{r['ratio_vs_trl_fastest'] or 0:>9.2f}  {cells}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="policy reference (tiny:llama: smoke run)")
    ap.add_argument("--reward-model", help="RM directory (default: the policy with a fresh seeded head)")
    ap.add_argument("--answers", type=int, default=64, help="answers sampled in all (a multiple of --rollout-batch)")
    ap.add_argument("--rollout-batch", type=int, default=16, help="answers per generation (prompts x group)")
    ap.add_argument("--group", type=int, default=4, help="answers per prompt")
    ap.add_argument("--minibatch", type=int, default=8, help="answers per optimizer step")
    ap.add_argument("--epochs", type=int, default=1, help="passes over each generation (TRL num_iterations: 1)")
    ap.add_argument("--response-length", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04, help="the KL's coefficient (GRPO's paper: 0.04)")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides")
    ap.add_argument("--no-trl-gc-off", action="store_true", help="skip TRL with gradient checkpointing off")
    ap.add_argument("--out", default="bench/results/grpo.json")
    args = ap.parse_args()
    if args.rollout_batch % args.group or args.rollout_batch % args.minibatch or args.answers % args.rollout_batch:
        ap.error("--rollout-batch must be a multiple of --group and --minibatch, --answers of --rollout-batch")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    loads = [load_1m()]
    warn_if_busy(loads)
    policy = resolve_model_dir(args.model)
    rm = reward_model_dir(policy, args.reward_model)
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        for kind in ["trl-gc", "ours", *([] if args.no_trl_gc_off else ["trl-nogc"])]:
            print(f"{kind} ...", flush=True)
            if kind == "ours":
                import ray

                results.append(ours(args, policy, rm, Path(tmp)))
                ray.shutdown()  # no idle Ray processes during the next TRL run
            else:
                results.append(trl_grpo(args, policy, rm, gc=kind == "trl-gc"))
            results[-1]["load_average_1m"] = load_1m()
    loads.append(load_1m())
    add_ratios(results, "answers_per_s")
    print(table(results))
    warn_if_busy(loads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "policy": str(policy), "reward_model": str(rm),
        "load_average_1m_before_after": loads, "idle": is_idle(loads),
        "machine": machine(),
        "results": results,
        "note": "answers/s over the training loop; ratios are to TRL with its defaults and to the fastest TRL row, "
                "on the same prompts in this run",
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
