"""PPO math for RLSF (ALMoST Section 2.3, Appendix D.3): pure functions of tensors.

Layout: every per-token tensor is `[episodes, response tokens]`, right-padded, with a `mask` that is
1 on the response tokens of each episode (a prefix of the row) and 0 after them. Prompt tokens never
appear here: only the policy's own actions carry reward, value and loss.

The paper follows trlX (Appendix D.3): reward r(x, y) - lambda * KL(pi || pi_SFT) with lambda 0.05, the RM
score placed on the last response token, gamma 1, GAE, clip 0.2, no reward normalisation and no
entropy bonus. Like `almost_ray/train/losses.py`, the two losses return *sums* over tokens: the
driver divides by the number of response tokens in the whole global minibatch, so the update is the
same whether the minibatch runs on one replica or is split over several.

Beside GAE (a learned critic's values as the baseline), the critic-free estimators that OpenRLHF 0.11.2
(`--algo.advantage.estimator`) and TRL ship: the baseline of a response's score is the other responses to
the same prompt (GRPO, Dr. GRPO, RLOO; `n_samples_per_prompt` responses per prompt, laid out consecutively
as one group) or the whole batch (REINFORCE++). They follow OpenRLHF's `compute_advantages_and_returns`
(read in its 0.11.2 wheel): the baseline is applied to the scalar score, the per-token KL penalty is added
as for PPO, and the advantage of a token is its return to go; only REINFORCE++ then normalises over the batch.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the tokens where `mask` is 1 (padding never dilutes a mean)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean) over the masked tokens, as trlX whitens advantages.

    Only advantages are whitened; the paper applies no normalisation to the reward score.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled token (Schulman's estimators).

    k1 = log pi - log pi_ref, unbiased and the one trlX (and so ALMoST) uses; it can be negative on a
    token. k3 = (r - 1) - log r with r = pi_ref / pi, also unbiased and never negative.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k3"
            ) -> torch.Tensor:
    """The KL to the reference as a loss term instead of a reward penalty, summed over response tokens.

    GRPO (Shao et al. 2024, DeepSeekMath, Section 4.1, Eq. 3 and 4) adds beta * KL(pi || pi_ref) to the
    objective with the k3 estimator, which is never negative and whose gradient at pi = pi_ref is zero;
    the rewards then carry no KL (OpenRLHF's `--algo.kl.use_loss`). The caller multiplies by the coefficient
    and divides by the minibatch's token count, like the policy loss.
    """
    return masked_sum(kl_per_token(logprobs, ref_logprobs, estimator), mask)


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Add `penalty` (a negative number) to the RM score of responses cut at max_new_tokens without EOS."""
    if penalty is None:
        return scores
    return scores + penalty * (~has_eos.bool()).to(scores.dtype)


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -lambda * KL on every response token, plus the RM score on the LAST one.

    ALMoST Section 2.3: the policy maximises r(x, y) - lambda * KL(pi(y|x) || pi_SFT(y|x)) with lambda 0.05;
    the RM judges the whole response, so its score is the reward of the final action only.
    """
    rewards = -kl_coef * kl.float() * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    has_tokens = mask.sum(dim=1) > 0
    rewards[rows, last] += scores.float() * has_tokens
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each response, and the returns.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero after
    the last response token (the episode ends there). Returns = A + V, the critic's regression target.
    """
    rewards, values, mask = rewards.float(), values.float() * mask, mask.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] * mask[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[prompts, group_size]`: the scores of each prompt's responses, which lie next to each other."""
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size} (at least 2) responses")
    return scores.float().reshape(-1, group_size)


def grpo(scores: torch.Tensor, group_size: int, eps: float = 1e-9) -> torch.Tensor:
    """GRPO's outcome advantage (Shao et al. 2024, DeepSeekMath, Section 4.1.2): each response's score
    normalised within its group, (r_i - mean(r)) / (std(r) + eps).

    The group of responses to one prompt replaces the critic as the baseline. std is the unbiased sample
    standard deviation with eps 1e-9, as OpenRLHF's `group_norm`; a group whose responses all score the
    same gets 0 everywhere (nothing to prefer).
    """
    g = _groups(scores, group_size)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).reshape(-1)


def dr_grpo(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", Section 3.2): r_i - mean(r).

    GRPO's division by the group's std weights prompts whose responses barely differ (too easy or too
    hard) the most, and its per-response 1/|o_i| makes long wrong answers cheap; Dr. GRPO drops both.
    The length term lives in the loss, not here: our policy loss is a token sum divided by the minibatch's
    token count, the same divisor for every response (OpenRLHF's `token-mean`), never a per-response mean.
    """
    g = _groups(scores, group_size)
    return (g - g.mean(1, keepdim=True)).reshape(-1)


def rloo(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740,
    the RLOO estimator): r_i - (1 / (k - 1)) * sum_{j != i} r_j over the k responses to the same prompt.

    The baseline of a response is the mean score of the OTHER responses, so it does not depend on the
    response itself and the gradient estimate stays unbiased (a mean that includes r_i would not).
    """
    g = _groups(scores, group_size)
    return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{t' >= t} gamma^(t' - t) r_t' over each response (REINFORCE's return, Williams 1992).

    With the score on the last token and -lambda * KL on every token, G_t is the score minus the KL
    penalties still to come: the per-token advantage of every critic-free estimator.
    """
    rewards, mask = rewards.float() * mask, mask.float()
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def reinforce_pp(returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv 2501.03262, "global advantage normalisation"): the returns
    normalised over every response token of the whole batch, (G - mean) / std, with no critic and no
    per-prompt group.

    The batch's statistics are the baseline: the paper argues that normalising within one prompt's few
    responses (GRPO's) is biased for a finite group and overfits, while the batch's are not.
    """
    return whiten(returns, mask)


GROUP_BASELINES = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}


def critic_free_advantages(estimator: str, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                           kl_coef: float, group_size: int, gamma: float = 1.0) -> torch.Tensor:
    """Per-token advantages of a critic-free estimator, in OpenRLHF 0.11.2's order.

    1. the group baseline on the scalar score (grpo, dr_grpo, rloo; reinforce_pp has none here);
    2. rewards as for PPO: that score on the last response token, -kl_coef * KL on every token (pass a
       zero `kl` when the KL is a loss term instead, `kl_loss`);
    3. the return to go of each token is its advantage (no critic, no GAE);
    4. reinforce_pp normalises them over the batch; the group estimators are not normalised again.
    """
    if estimator in GROUP_BASELINES:
        scores = GROUP_BASELINES[estimator](scores, group_size)
    elif estimator != "reinforce_pp":
        raise ValueError(f"unknown critic-free advantage estimator {estimator!r} (grpo, dr_grpo, rloo, reinforce_pp)")
    returns = returns_to_go(shaped_rewards(scores, kl, mask, kl_coef), mask, gamma)
    return reinforce_pp(returns, mask) if estimator == "reinforce_pp" else returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), summed over response tokens.

    max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) with r = pi / pi_old. Also returns token sums of the clip
    fraction (tokens where the clipped term won) and of the approximate KL(pi_old || pi) = (r - 1) - log r.
    """
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_sum(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_sum((clipped > unclipped).float(), mask),
            "approx_kl": masked_sum(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), summed over response tokens.

    V_clip = V_old + clip(V - V_old, -eps, eps) keeps one update from moving a value far from the one
    the advantages were computed with (PPO as in trlX / OpenAI baselines). Also the token sum of the
    clip fraction.
    """
    values = values.float()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_sum((clipped_loss > unclipped_loss).float(), mask)}
    return loss, stats
