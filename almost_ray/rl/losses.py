"""PPO math for RLSF (ALMoST Section 2.3, Appendix D.3): pure functions of tensors.

Layout: every per-token tensor is `[episodes, response tokens]`, right-padded, with a `mask` that is
1 on the response tokens of each episode (a prefix of the row) and 0 after them. Prompt tokens never
appear here: only the policy's own actions carry reward, value and loss.

The paper follows trlX (Appendix D.3): reward r(x, y) - lambda * KL(pi || pi_SFT) with lambda 0.05, the RM
score placed on the last response token, gamma 1, GAE, clip 0.2, no reward normalisation and no
entropy bonus. Like `almost_ray/train/losses.py`, the two losses return *sums* over tokens: the
driver divides by the number of response tokens in the whole global minibatch, so the update is the
same whether the minibatch runs on one replica or is split over several.
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
