"""Loss functions: pure functions of tensors.

Each loss returns a *sum* over its items, never a mean: the training loop divides by the number
of items in the whole global batch (pairs for the RM, supervised tokens for SFT), so the gradient
is the same whether a global batch runs on one worker or is split over many, and whatever the
micro-batch size (see `almost_ray/train/loop.py`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a token that carries no loss (prompt, user turns, padding)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair reward-model loss −log σ(r(x, y_c) − r(x, y_r)) (ALMoST Section 2.1, Eq. 1).

    `logsigmoid` is the numerically stable form: a margin of −100 gives a loss of 100, not inf.
    """
    return -F.logsigmoid(chosen.float() - rejected.float())


def pairwise_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs of what an RM run reports: loss, pairs ranked right (a tie counts a half), margin."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    margin = chosen - rejected
    correct = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {
        "loss": pairwise_loss(chosen, rejected).sum(),
        "accuracy": correct.sum(),
        "margin": margin.sum(),
    }


PreferenceLoss = Literal["sigmoid", "ipo", "simpo"]


def preference_loss(
    loss_type: PreferenceLoss,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss of direct preference optimisation and each reply's implicit reward.

    `*_logps` are log pi(reply | prompt) summed over the reply's tokens (`*_tokens` of them); the reference's
    are fixed numbers, computed once before training.

    - `sigmoid`, DPO (Rafailov et al. 2023, Eq. 7): -log sigma(beta * (h_c - h_r)) with h = log pi - log
      pi_ref: the Bradley-Terry loss of a reward model (`pairwise_loss`) with the policy's own implicit
      reward beta * h (their Eq. 5) in place of the RM's score.
    - `ipo` (Azar et al. 2023, Eq. 17): (h_c / |y_c| - h_r / |y_r| - 1 / (2 beta))^2, a squared loss that
      stops at a fixed margin instead of pushing it to infinity (DPO overfits deterministic preferences);
      h is averaged over each reply's tokens, as TRL 1.16 does (with the IPO authors' agreement) so that
      beta does not depend on reply length.
    - `simpo` (Meng et al. 2024, Eq. 6): -log sigma(beta / |y_c| log pi(y_c) - beta / |y_r| log pi(y_r) -
      gamma), reference-free: the reward is the length-normalised log-likelihood itself (Eq. 4), and gamma
      a target margin (TRL's CPO `simpo_gamma`).

    Rewards are those TRL logs as `rewards/chosen` and `rewards/rejected`: beta * h for DPO and IPO
    (TRL's `DPOTrainer`), beta * log pi / |y| for SimPO (TRL's `CPOTrainer`).
    """
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    if loss_type == "simpo":
        chosen = beta * chosen_logps / chosen_tokens.clamp(min=1)
        rejected = beta * rejected_logps / rejected_tokens.clamp(min=1)
        return -F.logsigmoid(chosen - rejected - simpo_gamma), chosen.detach(), rejected.detach()
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs the reference's log-probabilities")
    chosen_ratio = chosen_logps - ref_chosen_logps.float()
    rejected_ratio = rejected_logps - ref_rejected_logps.float()
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss_type!r} (sigmoid, ipo or simpo)")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def preference_stats(loss: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """Sums over pairs of TRL's DPO metrics: loss, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
    and `rewards/accuracies` (pairs whose chosen reward is strictly higher; a tie counts as wrong, as in TRL)."""
    return {
        "loss": loss.detach().sum(),
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
    }


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over supervised tokens, and their count.

    `logits[:, t]` predicts `labels[:, t]` (the caller has already shifted); tokens labelled
    `IGNORE_INDEX` carry no loss. This is SFT's objective restricted to assistant tokens (ALMoST
    Section 2.2; Hewitt et al. Eq. 1 and 2).
    """
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (labels != IGNORE_INDEX).sum()
