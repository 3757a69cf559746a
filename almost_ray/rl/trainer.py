"""The PPO driver of RLSF (ALMoST Section 2.3, Appendix D.3): one function per iteration, read top to bottom.

    rollout (engines) -> log-probs (policy = pi_old, reference), values (critic), RM scores
    -> shaped rewards (RM score at the last token - lambda * KL) -> GAE -> ppo_epochs x minibatches of
    updates (policy and critic, data-parallel) -> weight sync to the engines -> metrics

With a critic-free `advantage_estimator` (GRPO, Dr. GRPO, RLOO, REINFORCE++) there is no critic: each
prompt gets `n_samples_per_prompt` responses, and the advantages come from the scores of the group or of
the batch (`losses.critic_free_advantages`) instead of values and GAE.

The driver holds no model: it moves token ids and per-token tensors between the role actors and does
the math of `rl/losses.py` itself (a few KB per episode). `train` adds what makes it a long job:
checkpoints every `checkpoint_every` iterations, resume from the latest one, metrics to
`metrics.jsonl` and the Ray dashboard, and the final policy as an HF directory.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from almost_ray.cluster import dashboard
from almost_ray.data.metrics_log import MetricsLog
from almost_ray.rl import checkpoint, failures, losses
from almost_ray.rl.config import PPOConfig
from almost_ray.rl.episodes import split_rows, take
from almost_ray.rl.roles import (
    CriticActor,
    Placement,
    PolicyActor,
    ReferenceActor,
    RewardActor,
    micro_batch_count,
    reserve,
)
from almost_ray.rl.rollout import (
    backend,
    engine_class,
    episode_seed,
    generate_all,
    old_logprobs_source,
    open_vllm_sync,
    sync_weights,
)

METRICS = "metrics.jsonl"
MODEL_DIR = "model"


@dataclass
class Prompt:
    """One PPO prompt: the user's text (what the RM sees) and the policy's rendered prompt as token ids."""

    text: str
    ids: list[int]


@dataclass
class Roles:
    placement: Placement
    vllm: bool

    def __getitem__(self, role: str) -> list:
        return self.placement.actors[role]

    def node_ids(self) -> dict[str, list[str]]:
        import ray

        return {role: ray.get([a.node_id.remote() for a in actors]) for role, actors in self.placement.actors.items()}


def start_roles(cfg: PPOConfig, policy_dir: str, critic_dir: str, rm_dir: str, scorer: Callable | None) -> Roles:
    """Reserve the placement group, start every actor group, join the trainable groups, wait until ready."""
    import ray

    placement = reserve(cfg, separate_engines=backend(cfg) == "vllm")
    try:
        c = cfg.model_dump(mode="json")
        placement.start("policy", PolicyActor, cfg, c, policy_dir)
        if not cfg.critic_free:
            placement.start("critic", CriticActor, cfg, c, critic_dir)
        placement.start("reference", ReferenceActor, cfg, c, policy_dir)
        placement.start("reward", RewardActor, cfg, c, rm_dir, scorer)
        placement.start("rollout", engine_class(cfg), cfg, c, policy_dir)
        joining = []  # the replicas of a sharded role form a process group, then load their shards
        for role, actors in placement.actors.items():
            if role != "rollout" and cfg.sharded(role):
                host, port = ray.get(actors[0].address.remote())
                joining += [a.join_group.remote(host, port) for a in actors]
        ray.get(joining)
        roles = Roles(placement, vllm=backend(cfg) == "vllm")
        ray.get([a.node_id.remote() for actors in placement.actors.values() for a in actors])
        if roles.vllm:
            open_vllm_sync(roles["policy"][0], roles["rollout"], cfg.rollout.tensor_parallel_size)
        return roles
    except BaseException:
        placement.remove()
        raise


def trainable_roles(cfg: PPOConfig) -> tuple[str, ...]:
    return ("policy",) if cfg.critic_free else ("policy", "critic")


def on_replicas(actors: list, method: str, batch: dict, width: int, micro_batch_size: int) -> torch.Tensor:
    """Split `batch` across a role's replicas, call `method` on each slice (maybe empty: the replicas of a
    sharded role must all take part), concatenate in order."""
    import ray

    n = len(batch["response_ids"])
    count = micro_batch_count(n, len(actors), micro_batch_size)
    refs = [getattr(a, method).remote(take(batch, rows), width, count) for a, rows in zip(actors, split_rows(n, len(actors)))]
    return torch.cat(ray.get(refs))


def rows_to_tensor(rows: list[list[float]], width: int) -> torch.Tensor:
    """Per-token lists, right-padded with zeros to `[len(rows), width]` (the layout of rl/losses.py)."""
    out = torch.zeros(len(rows), width)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def train_on_replicas(actors: list, minibatch: dict, width: int, micro_batch_size: int):
    """One optimizer step of a data-parallel role: every replica takes a slice (maybe empty) and all
    divide by the minibatch's response-token count, so the summed gradient is the minibatch mean."""
    n = len(minibatch["response_ids"])
    tokens = float(sum(len(r) for r in minibatch["response_ids"]))
    count = micro_batch_count(n, len(actors), micro_batch_size)
    return [a.train_step.remote(take(minibatch, rows), tokens, width, count)
            for a, rows in zip(actors, split_rows(n, len(actors)))]


def prompt_order(n_prompts: int, iteration: int, batch: int, seed: int) -> list[int]:
    """Prompt indices of one iteration: consecutive slices of seeded shuffles, one shuffle per pass."""
    out, perms = [], {}
    for episode in range(iteration * batch, (iteration + 1) * batch):
        epoch, pos = divmod(episode, n_prompts)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


def ppo_iteration(roles: Roles, cfg: PPOConfig, prompts: list[Prompt], iteration: int, tokenizer,
                  sync: bool = True) -> dict:
    """One PPO iteration on `prompts_per_iteration` prompts; returns its metrics. `sync=False` (the last
    iteration: no rollout follows) leaves the engines' weights as they are."""
    import ray

    t0 = time.perf_counter()
    # 1. rollout: n_samples_per_prompt sampled responses per prompt (a group, next to each other), seeded per
    #    episode
    prompts = [p for p in prompts for _ in range(cfg.n_samples_per_prompt)]
    first = iteration * cfg.rollout_batch_size
    seeds = [episode_seed(cfg.seed, p.text, first + k) for k, p in enumerate(prompts)]
    responses, has_eos, sampled_logprobs = generate_all(roles["rollout"], [p.ids for p in prompts], seeds)
    batch = {"prompt_ids": [p.ids for p in prompts], "response_ids": [r or [tokenizer.eos_token_id] for r in responses]}
    width = max(len(r) for r in batch["response_ids"])
    t1 = time.perf_counter()

    # 2. scoring: pi_old (unless the engine's are reused) and pi_SFT log-probs, V (with a critic), and the
    #    RM on the Human:/Assistant: text (all in parallel)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in batch["response_ids"]]
    conversations = [[{"role": "user", "content": p.text}, {"role": "assistant", "content": t}]
                     for p, t in zip(prompts, texts)]
    reward_parts = split_rows(len(conversations), len(roles["reward"]))
    passes = (dict(passes=micro_batch_count(len(conversations), len(roles["reward"]), cfg.micro_batch_size))
              if cfg.sharded("reward") else {})
    score_refs = [a.score.remote(conversations[r.start:r.stop], **passes)
                  for a, r in zip(roles["reward"], reward_parts)]
    reuse = old_logprobs_source(cfg) == "rollout" and all(len(lp) == len(r) for lp, r in
                                                         zip(sampled_logprobs, batch["response_ids"]))
    micro = cfg.micro_batch_size
    old_logprobs = rows_to_tensor(sampled_logprobs, width) if reuse else on_replicas(
        roles["policy"], "logprobs", batch, width, micro)
    ref_logprobs = on_replicas(roles["reference"], "logprobs", batch, width, micro)
    values = None if cfg.critic_free else on_replicas(roles["critic"], "values", batch, width, micro)
    scores = torch.tensor([s for part in ray.get(score_refs) for s in part])
    t2 = time.perf_counter()

    # 3. rewards and advantages (rl/losses.py): no reward normalisation; the KL to pi_SFT is a reward penalty,
    #    or (use_kl_loss) a term of the policy loss and then no part of the rewards
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in batch["response_ids"]])[:, None]).float()
    kl = losses.kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
    ended = torch.tensor(has_eos)
    penalized = losses.penalize_missing_eos(scores, ended, cfg.missing_eos_penalty)
    kl_penalty = torch.zeros_like(kl) if cfg.use_kl_loss else kl
    batch.update(old_logprobs=old_logprobs)
    if cfg.use_kl_loss:
        batch.update(ref_logprobs=ref_logprobs)
    if cfg.critic_free:
        batch.update(advantages=losses.critic_free_advantages(cfg.advantage_estimator, penalized, kl_penalty, mask,
                                                              cfg.kl_coef, cfg.n_samples_per_prompt, cfg.gamma))
    else:
        rewards = losses.shaped_rewards(penalized, kl_penalty, mask, cfg.kl_coef)
        advantages, returns = losses.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = losses.whiten(advantages, mask)
        batch.update(advantages=advantages, old_values=values, returns=returns)

    # 4. ppo_epochs passes over the episodes in shuffled minibatches, policy and critic side by side: every
    #    step is queued at once (an actor runs its calls in order), so neither role waits for the other's
    #    step to end before starting its next
    queued: list[tuple[list, list, float]] = []  # (policy refs, critic refs, minibatch tokens)
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration * 1009 + epoch)
        order = torch.randperm(len(prompts), generator=gen)
        for start in range(0, len(prompts), cfg.minibatch_size):
            minibatch = take(batch, order[start : start + cfg.minibatch_size])
            tokens = float(sum(len(r) for r in minibatch["response_ids"]))
            critic_refs = [] if cfg.critic_free else train_on_replicas(roles["critic"], minibatch, width, micro)
            queued.append((train_on_replicas(roles["policy"], minibatch, width, micro), critic_refs, tokens))
    steps = [(_sum(ray.get(p)), _sum(ray.get(c)), tokens) for p, c, tokens in queued]
    t3 = time.perf_counter()

    # 5. the engines get the updated policy before the next rollout
    if sync:
        sync_weights(roles["policy"], roles["rollout"], roles.vllm)
    t4 = time.perf_counter()

    lengths = mask.sum(1)
    critic = {} if cfg.critic_free else {"value_loss": _step_mean(steps, 1, "loss"),
                                         "value_clip_frac": _step_mean(steps, 1, "value_clip_frac")}
    return {
        "iteration": iteration + 1,
        "episodes": len(prompts),
        "reward_mean": round(scores.mean().item(), 6),
        "reward_std": round(scores.std().item(), 6) if len(scores) > 1 else 0.0,
        "kl": round(kl.sum(1).mean().item(), 6),
        "policy_loss": _step_mean(steps, 0, "loss"),
        **critic,
        "clip_frac": _step_mean(steps, 0, "clip_frac"),
        "approx_kl": _step_mean(steps, 0, "approx_kl"),
        **({"kl_loss": _step_mean(steps, 0, "kl_loss")} if cfg.use_kl_loss else {}),
        "lr": steps[-1][0]["lr"] / len(roles["policy"]),
        "response_length": round(lengths.mean().item(), 3),
        "eos_rate": round(ended.float().mean().item(), 4),
        "episodes_per_s": round(len(prompts) / (t4 - t0), 4),
        "time_rollout_s": round(t1 - t0, 3),
        "time_scoring_s": round(t2 - t1, 3),
        "time_training_s": round(t3 - t2, 3),
        "time_sync_s": round(t4 - t3, 3),
        "iteration_s": round(t4 - t0, 3),
    }


def _sum(parts: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out


def _step_mean(steps: list[tuple[dict, dict, float]], which: int, key: str) -> float:
    """Mean over the iteration's optimizer steps of (token sum / minibatch tokens)."""
    return round(sum(s[which].get(key, 0.0) / s[2] for s in steps) / len(steps), 6)


def train(
    cfg: PPOConfig,
    prompts: list[Prompt],
    stage_dir: Path,
    policy_dir: str,
    critic_dir: str,
    rm_dir: str,
    tokenizer,
    run_name: str,
    scorer: Callable | None = None,
    after_iteration: Callable[[int], None] | None = None,
) -> Path:
    """Run (or resume) all iterations; returns the final policy's HF directory `stage_dir/model`.

    A dead role actor restarts every role from the latest checkpoint, at most `cfg.max_failures` times
    (rl/failures.py). `scorer` replaces the RM inside the reward actor (a planted reward in tests);
    `after_iteration(n)` is called on the driver once iteration n is logged and its checkpoint (if due)
    saved, as a Trainer callback's `on_step_end` is: whatever it raises ends the run there (the tests'
    killed driver).
    """
    deaths = 0
    while True:
        attempt = failures.Attempt()
        try:
            return _attempt(cfg, prompts, stage_dir, policy_dir, critic_dir, rm_dir, tokenizer, run_name, scorer,
                            after_iteration, attempt)
        except Exception as err:
            if not failures.is_role_death(err, attempt):
                raise
            deaths += 1
            resume_from = checkpoint.latest_iteration(stage_dir)
            if 0 <= cfg.max_failures < deaths:
                raise failures.RoleActorDied(
                    f"ppo: a role actor died {failures.describe(err, attempt)} and ppo.max_failures="
                    f"{cfg.max_failures} restarts are used up; run the command again to resume from the "
                    f"checkpoint after iteration {resume_from}") from err
            failures.record_restart(stage_dir, err, attempt, resume_from, deaths)
            dashboard.add_counts(run_name, "ppo", {"role_restarts": 1})
            _say(failures.restart_line(err, attempt, resume_from, deaths, cfg.max_failures))


def _attempt(cfg: PPOConfig, prompts: list[Prompt], stage_dir: Path, policy_dir: str, critic_dir: str, rm_dir: str,
             tokenizer, run_name: str, scorer: Callable | None,
             after_iteration: Callable[[int], None] | None, attempt: failures.Attempt) -> Path:
    """Start the roles, restore the latest checkpoint, run the remaining iterations, save the policy."""
    import ray
    from ray.exceptions import RayError

    roles = start_roles(cfg, policy_dir, critic_dir, rm_dir, scorer)
    try:
        (stage_dir / "placement.json").write_text(json.dumps(roles.node_ids(), indent=2))
        trainables = {role: roles[role] for role in trainable_roles(cfg)}
        start = checkpoint.restore(stage_dir, trainables)
        if start:
            sync_weights(roles["policy"], roles["rollout"], roles.vllm)
        log = MetricsLog(stage_dir / METRICS, keep_until=start, key="iteration")
        total = cfg.iterations
        _say(f"[ppo] {len(prompts)} prompts, {total} iterations of {cfg.rollout_batch_size} episodes"
             f"{f' ({cfg.n_samples_per_prompt} per prompt)' if cfg.n_samples_per_prompt > 1 else ''}, advantages: "
             f"{cfg.advantage_estimator}{f', resuming after iteration {start}' if start else ''}")
        for it in range(start, total):
            attempt.iteration = it + 1
            batch = [prompts[i] for i in prompt_order(len(prompts), it, cfg.prompts_per_iteration, cfg.seed)]
            metrics = ppo_iteration(roles, cfg, batch, it, tokenizer, sync=it + 1 < total)
            log.write(metrics)
            dashboard.set_gauges(run_name, "ppo", metrics)
            dashboard.progress(run_name, "ppo", it + 1, total)
            _say(progress_line(metrics, total))
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == total:
                checkpoint.save(stage_dir, it + 1, trainables, cfg.checkpoints_to_keep)
            if after_iteration is not None:
                after_iteration(it + 1)
        attempt.iteration, attempt.phase = None, "while saving the final policy"
        ray.get([p.save_hf.remote(str(stage_dir / MODEL_DIR)) for p in roles["policy"]])
    except RayError:
        attempt.dead = failures.dead_replicas(roles.placement.actors)
        raise
    finally:
        roles.placement.remove()
    return stage_dir / MODEL_DIR


def progress_line(m: dict, total: int) -> str:
    value_loss = f" value_loss {m['value_loss']:.4f}" if "value_loss" in m else ""
    return (f"[ppo] iteration {m['iteration']}/{total} reward {m['reward_mean']:.4f} kl {m['kl']:.4f} "
            f"policy_loss {m['policy_loss']:.4f}{value_loss} clip {m['clip_frac']:.3f} "
            f"len {m['response_length']:.1f} eos {m['eos_rate']:.2f} {m['episodes_per_s']:.2f} episodes/s "
            f"(rollout {m['time_rollout_s']:.1f}s, scoring {m['time_scoring_s']:.1f}s, "
            f"training {m['time_training_s']:.1f}s, sync {m['time_sync_s']:.1f}s)")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
