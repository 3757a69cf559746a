"""Loss functions: pure functions of tensors.

Each loss returns a *sum* over its items, never a mean: the training loop divides by the number
of items in the whole global batch (pairs for the RM, supervised tokens for SFT), so the gradient
is the same whether a global batch runs on one worker or is split over many, and whatever the
micro-batch size (see `almost_ray/train/loop.py`).
"""

from __future__ import annotations

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
