"""The `ppo` stage (`almost-ray ppo`): ALMoST step 3, RLSF (Section 2.3, Appendix D.3).

Inputs (`runs/paths.py`): the SFT policy (`ppo.policy`, else train_sft's model in the folder of its mode),
the synthetic RM (`ppo.reward_model`, else train_rm's) and prompts: the FIRST USER TURN of each RMSP
dialogue (as in the paper), or any source of queries (`ppo.prompts`, the CLI's `--prompts`).
Everything is checked before a single actor starts. Outputs in `<run dir>/ppo/`: `model/` (the
final policy, an HF directory like `sft/model`), `metrics.jsonl`, `ppo.png` (reward and KL per
iteration), `placement.json` (the node of every role replica), `checkpoints/`, `restarts.jsonl` (role
actor deaths survived, if any) and `manifest.json` last.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from almost_ray.cluster.connect import init_ray
from almost_ray.config import Config
from almost_ray.config_base import ConfigError
from almost_ray.data.metrics_log import plot_metrics, read_metrics
from almost_ray.data.records import RecordError
from almost_ray.data.sources import require
from almost_ray.models.loading import check_model_ref, load_tokenizer, resolve_model_dir
from almost_ray.plan.preflight import plan_preflight
from almost_ray.prompts.templates import render_prompt
from almost_ray.rl.config import PPOConfig, shared_gpu_ranks
from almost_ray.rl.failures import restarts
from almost_ray.rl.prompt_data import load_prompts
from almost_ray.rl.trainer import METRICS, Prompt, train
from almost_ray.runs import paths
from almost_ray.runs.stage import Outcome, Stage


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
    rows = read_metrics(path)
    if not rows:
        return {}
    keys = ("reward_mean", "kl", "policy_loss", "value_loss", "clip_frac", "approx_kl", "response_length", "eos_rate")
    return {
        "iterations": rows[-1]["iteration"],
        "first_reward_mean": rows[0]["reward_mean"],
        **{f"final_{k}": rows[-1][k] for k in keys if k in rows[-1]},  # no value_loss without a critic
        "episodes_per_s": round(sum(r["episodes"] for r in rows) / sum(r["iteration_s"] for r in rows), 4),
    }


def check(cfg: Config) -> None:
    """The policy (a causal LM), the RM (one score), the prompts, before Ray starts or a model loads. The
    `ppo_grpo` stage reads the same ones (`runs/paths.py`: the `ppo` section names them)."""
    check_model_ref(paths.ppo_policy(cfg), "ppo.policy", made_by=None if cfg.ppo.policy else "train-sft")
    check_model_ref(paths.ppo_reward_model(cfg), "ppo.reward_model", "reward_model",
                    made_by=None if cfg.ppo.reward_model else "train-rm")
    require(paths.ppo_prompts(cfg), "ppo.prompts", None if cfg.ppo.prompts else "rmsp")
    load_prompts(paths.ppo_prompts(cfg))
    if problems := shared_gpu_ranks(cfg.ppo):  # two ranks of one NCCL group on one GPU: NCCL refuses
        raise ConfigError("ppo." + "\nppo.".join(problems))


def train_policy(cfg: Config, p: PPOConfig, stage_dir: Path, plot_title: str, *, scorer: Callable | None = None,
                 after_iteration: Callable[[int], None] | None = None) -> Outcome:
    """PPO with the settings `p` from the SFT policy against the RM into `<stage_dir>/model`, resuming from
    the latest checkpoint there; `plot_title` heads the curves' plot. The work of `ppo` and of `ppo_grpo`.

    `scorer` (a reward in place of the RM) and `after_iteration` (a driver-side callback) are
    `trainer.train`'s."""
    policy_dir = resolve_model_dir(paths.ppo_policy(cfg))
    rm_dir = resolve_model_dir(paths.ppo_reward_model(cfg))
    source = paths.ppo_prompts(cfg)
    texts = load_prompts(source)
    tokenizer = load_tokenizer(policy_dir, padding_side="left")
    encoded, dropped = encode_prompts(texts, tokenizer, p)
    if not encoded:
        raise RecordError(f"{source}: every prompt is longer than ppo.max_prompt_tokens={p.max_prompt_tokens}")
    critic_dir = rm_dir if p.critic_init == "reward" else policy_dir

    init_ray(cfg.ray)
    # GPU memory and placement, as `almost-ray plan` counts them, before any actor starts
    resolved = p.model_copy(update={"policy": str(policy_dir), "reward_model": str(rm_dir)})
    plan_preflight(cfg.model_copy(update={"ppo": resolved}), "ppo")
    stage_dir.mkdir(parents=True, exist_ok=True)
    train(p, encoded, stage_dir, str(policy_dir), str(critic_dir), str(rm_dir), tokenizer, cfg.run_dir.name,
          scorer=scorer, after_iteration=after_iteration)
    plot_metrics(stage_dir / METRICS, stage_dir / "ppo.png", ["reward_mean", "kl"], title=plot_title,
                 x="iteration", xlabel="PPO iteration")
    counts = {"prompts": len(texts), "prompts_dropped_too_long": dropped, "iterations": p.iterations,
              "episodes": p.iterations * p.rollout_batch_size}
    return Outcome(counts=counts, metrics={**summarize(stage_dir / METRICS), "role_restarts": restarts(stage_dir)})


def title(p: PPOConfig) -> str:
    return "PPO (RLSF)" if p.advantage_estimator == "gae" else f"PPO (RLSF), {p.advantage_estimator} advantages"


def work(cfg: Config, *, scorer: Callable | None = None,
         after_iteration: Callable[[int], None] | None = None) -> Outcome:
    """PPO as `cfg.ppo` says into `<run dir>/ppo/model` (`scorer`, `after_iteration`: `train_policy`'s)."""
    return train_policy(cfg, cfg.ppo, paths.stage_dir(cfg, "ppo"), title(cfg.ppo),
                        scorer=scorer, after_iteration=after_iteration)


def _inputs(cfg: Config) -> dict[str, Path | str]:
    models = {"policy": paths.local_model_path(paths.ppo_policy(cfg)),
              "reward_model": paths.local_model_path(paths.ppo_reward_model(cfg))}
    return {**{k: v for k, v in models.items() if v is not None}, "prompts": paths.ppo_prompts(cfg)}


STAGE = Stage(
    "ppo", "PPO against the synthetic RM (ALMoST step 3, RLSF)",
    section=lambda c: c.ppo, inputs=_inputs,
    outputs=lambda c: {"model": paths.ppo_model(c)},
    work=work, check=check,
    headline=("counts.*", "metrics.first_reward_mean", "metrics.final_reward_mean", "metrics.final_kl",
              "metrics.final_policy_loss", "metrics.final_value_loss", "metrics.episodes_per_s",
              "metrics.role_restarts"),
)


def run(cfg: Config) -> Path:
    """PPO into `<run dir>/ppo/model`; skipped when up to date (`runs/stage.py`)."""
    return STAGE.run(cfg)
