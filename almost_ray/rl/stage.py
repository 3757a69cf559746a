"""`almost-ray ppo`: ALMoST step 3, RLSF (Section 2.3, Appendix D.3), as a pipeline stage.

Inputs: the SFT policy (`ppo.policy`, else `<run dir>/sft/model`), the synthetic RM (`ppo.reward_model`,
else `<run dir>/rm/model`) and prompts: the FIRST USER TURN of each RMSP dialogue (`<run dir>/rmsp/
dialogues.jsonl`, as in the paper), or any `.jsonl`/`.txt` of queries (`ppo.prompts` or `--prompts`).
Everything is checked here, before a single actor starts. Outputs in `<run dir>/ppo/`: `model/` (the
final policy, an HF directory like `sft/model`), `metrics.jsonl`, `ppo.png` (reward and KL per
iteration), `placement.json` (the node of every role replica), `checkpoints/`, `restarts.jsonl` (role
actor deaths survived, if any) and `manifest.json` last.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from almost_ray.cluster_config import RayConfig
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.models.loading import ModelRefError, load_tokenizer, resolve_model_dir
from almost_ray.preflight import plan_preflight
from almost_ray.records import RecordError
from almost_ray.rl.config import PPOConfig, shared_gpu_ranks
from almost_ray.rl.failures import restarts
from almost_ray.rl.prompts import load_prompts, prompts_path
from almost_ray.rl.trainer import METRICS, MODEL_DIR, Prompt
from almost_ray.templates import render_prompt

STAGE = "ppo"


def model_dir(ref: str | None, default: Path, field: str, producer: str) -> Path:
    """The HF directory of a model reference, or a clear error naming the field and how to make it."""
    ref = ref or str(default)
    try:
        return resolve_model_dir(ref)
    except ModelRefError as err:
        hint = f" (run `almost-ray {producer}` first, or set ppo.{field})" if ref == str(default) else ""
        raise ModelRefError(f"ppo.{field}: {err}{hint}") from None


def check_reward_model(path: Path) -> None:
    """The RM must be a sequence classifier with ONE output: the score r(x, y) (ALMoST Eq. 1)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if config.num_labels != 1:
        raise ModelRefError(
            f"ppo.reward_model: {path} has {config.num_labels} outputs ({', '.join(config.architectures or [])}); "
            "a reward model has a one-output score head (train one with `almost-ray train-rm`)"
        )


def encode_prompts(texts: list[str], tokenizer, cfg: PPOConfig) -> tuple[list[Prompt], int]:
    """The policy's prompt for each user turn, rendered as the SFT model was trained; over-long ones dropped."""
    out, dropped = [], 0
    for text in texts:
        rendered = render_prompt(cfg.prompt_format, [{"role": "user", "content": text}], tokenizer)
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
        if len(ids) > cfg.max_prompt_tokens:
            dropped += 1
            continue
        out.append(Prompt(text=text, ids=ids))
    return out, dropped


def summarize(path: Path) -> dict:
    from almost_ray.train.report import read_metrics

    rows = read_metrics(path)
    if not rows:
        return {}
    keys = ("reward_mean", "kl", "policy_loss", "value_loss", "clip_frac", "approx_kl", "response_length", "eos_rate")
    return {
        "iterations": rows[-1]["iteration"],
        "first_reward_mean": rows[0]["reward_mean"],
        **{f"final_{k}": rows[-1][k] for k in keys},
        "episodes_per_s": round(sum(r["episodes"] for r in rows) / sum(r["iteration_s"] for r in rows), 4),
    }


def run(
    cfg: PPOConfig,
    ray_cfg: RayConfig,
    run_dir: Path,
    prompts: Path | None = None,
    *,
    scorer: Callable | None = None,
    fault_at_iteration: int | None = None,
) -> Path:
    """Train the SFT policy against the RM with PPO into `run_dir/ppo/model`; returns `run_dir/ppo`.

    Skipped when its manifest matches this config and these inputs; resumed from the latest
    checkpoint otherwise. `scorer` and `fault_at_iteration` are for tests (see `trainer.train`).
    """
    from almost_ray.cluster import init_ray
    from almost_ray.manifest import is_done, write_manifest
    from almost_ray.rl.trainer import train
    from almost_ray.train.report import plot_metrics

    run_dir = Path(run_dir)
    stage_dir = run_dir / STAGE
    policy_dir = model_dir(cfg.policy, run_dir / "sft" / "model", "policy", "train-sft")
    rm_dir = model_dir(cfg.reward_model, run_dir / "rm" / "model", "reward_model", "train-rm")
    check_reward_model(rm_dir)
    if problems := shared_gpu_ranks(cfg):
        raise ConfigError("ppo." + "\nppo.".join(problems))
    source = prompts_path(cfg, run_dir, prompts)
    texts = load_prompts(cfg, run_dir, prompts)
    inputs = {"policy": policy_dir, "reward_model": rm_dir, "prompts": source}
    if is_done(stage_dir, cfg, inputs) and (stage_dir / MODEL_DIR / "config.json").is_file():
        print(f"ppo: {stage_dir} is up to date")
        return stage_dir
    started = time.time()
    tokenizer = load_tokenizer(policy_dir, padding_side="left")
    encoded, dropped = encode_prompts(texts, tokenizer, cfg)
    if not encoded:
        raise RecordError(f"{source}: every prompt is longer than ppo.max_prompt_tokens={cfg.max_prompt_tokens}")
    critic_dir = rm_dir if cfg.critic_init == "reward" else policy_dir

    init_ray(ray_cfg)
    # GPU memory and placement, as `almost-ray plan` counts them, before any actor starts
    plan_preflight(Config(ppo=cfg.model_copy(update={"policy": str(policy_dir), "reward_model": str(rm_dir)})), STAGE)
    stage_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, encoded, stage_dir, str(policy_dir), str(critic_dir), str(rm_dir), tokenizer, run_dir.name,
          scorer=scorer, fault_at_iteration=fault_at_iteration)
    plot_metrics(stage_dir / METRICS, stage_dir / "ppo.png", ["reward_mean", "kl"], title="PPO (RLSF)",
                 x="iteration", xlabel="PPO iteration")
    counts = {"prompts": len(texts), "prompts_dropped_too_long": dropped, "iterations": cfg.iterations,
              "episodes": cfg.iterations * cfg.rollout_batch_size}
    metrics = {**summarize(stage_dir / METRICS), "role_restarts": restarts(stage_dir)}  # rl/failures.py
    write_manifest(stage_dir, STAGE, cfg, inputs, started, counts=counts, metrics=metrics)
    return stage_dir
