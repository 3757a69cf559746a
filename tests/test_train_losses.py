"""Loss functions and the LR schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from almost_ray.train.losses import (
    IGNORE_INDEX,
    pairwise_loss,
    pairwise_stats,
    preference_loss,
    preference_stats,
    token_nll_sum,
)
from almost_ray.train.optim import cosine_with_warmup


def test_pairwise_loss_matches_hand_values():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 2.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for margins 1, 0, -3
    expected = [math.log(1 + math.exp(-1)), math.log(2), math.log(1 + math.exp(3))]
    assert pairwise_loss(chosen, rejected).tolist() == pytest.approx(expected, rel=1e-6)


def test_pairwise_loss_is_stable_for_large_margins():
    loss = pairwise_loss(torch.tensor([-100.0, 100.0]), torch.tensor([0.0, 0.0]))
    assert loss.tolist() == pytest.approx([100.0, 0.0], abs=1e-5)


def test_pairwise_stats_sums_and_half_credit_for_ties():
    stats = pairwise_stats(torch.tensor([3.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 2.0]))
    assert stats["accuracy"].item() == pytest.approx(1.5)  # right, tie, wrong
    assert stats["margin"].item() == pytest.approx(2.0 + 0.0 - 1.5)
    assert stats["loss"].item() == pytest.approx(
        math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(1.5)), rel=1e-6
    )


def test_token_nll_sum_skips_ignored_tokens():
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[2, 0, IGNORE_INDEX]])
    nll, count = token_nll_sum(logits, labels)
    # p(2) = 2/4 at position 0; p(0) = e/(e+2) at position 1; position 2 ignored
    expected = -math.log(0.5) - math.log(math.e / (math.e + 2))
    assert nll.item() == pytest.approx(expected, rel=1e-6)
    assert count.item() == 2


def test_cosine_with_warmup_shape():
    total, warmup = 20, 4
    lrs = [cosine_with_warmup(s, total, warmup) for s in range(total)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])  # linear, never a wasted zero step
    assert lrs[4] == pytest.approx(1.0)
    assert cosine_with_warmup(12, total, warmup) == pytest.approx(0.5)  # half way through the decay
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert cosine_with_warmup(total, total, warmup, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(0, 1, 0) == pytest.approx(1.0)


# ------------------------------------------------------------------------------- DPO, IPO, SimPO
# two pairs: policy and reference log-probs of each reply (summed over its tokens) and its token count
LOGPS = dict(chosen_logps=torch.tensor([-10.0, -20.0]), rejected_logps=torch.tensor([-12.0, -15.0]),
             ref_chosen_logps=torch.tensor([-11.0, -20.0]), ref_rejected_logps=torch.tensor([-11.0, -16.0]),
             chosen_tokens=torch.tensor([4.0, 10.0]), rejected_tokens=torch.tensor([2.0, 5.0]))


def test_dpo_sigmoid_loss_and_rewards_by_hand():
    # h_c = [1, 0], h_r = [-1, 1]; beta 0.5: rewards [0.5, 0] and [-0.5, 0.5]; margins [1, -0.5]
    loss, chosen, rejected = preference_loss("sigmoid", **LOGPS, beta=0.5)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))], rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.5])
    stats = preference_stats(loss, chosen, rejected)
    assert stats["rewards/margins"].item() == pytest.approx(0.5)
    assert stats["rewards/accuracies"].item() == 1.0  # the second pair is ranked wrong
    assert stats["loss"].item() == pytest.approx(loss.sum().item())


def test_ipo_loss_averages_log_ratios_per_token():
    # h_c / |y_c| = [1/4, 0], h_r / |y_r| = [-1/2, 1/5]; beta 0.5 -> target margin 1 / (2 * 0.5) = 1
    loss, chosen, rejected = preference_loss("ipo", **LOGPS, beta=0.5)
    assert loss.tolist() == pytest.approx([(0.75 - 1.0) ** 2, (-0.2 - 1.0) ** 2], rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0])  # rewards as DPO's: beta * h, not averaged


def test_simpo_loss_is_reference_free_and_length_normalised():
    # beta / |y| * log pi with beta 2: chosen [-5, -4], rejected [-12, -6]; gamma 0.5
    loss, chosen, rejected = preference_loss("simpo", **{**LOGPS, "ref_chosen_logps": None, "ref_rejected_logps": None},
                                             beta=2.0, simpo_gamma=0.5)
    assert chosen.tolist() == pytest.approx([-5.0, -4.0]) and rejected.tolist() == pytest.approx([-12.0, -6.0])
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-6.5)), math.log(1 + math.exp(-1.5))], rel=1e-6)


def test_preference_loss_gradient_raises_the_chosen_reply():
    chosen = torch.tensor([-10.0], requires_grad=True)
    rejected = torch.tensor([-10.0], requires_grad=True)
    loss, _, _ = preference_loss("sigmoid", chosen, rejected, torch.tensor([-10.0]), torch.tensor([-10.0]),
                                 torch.tensor([3.0]), torch.tensor([3.0]), beta=0.1)
    loss.sum().backward()
    # d/dh_c -log sigma(beta * (h_c - h_r)) at 0 = -beta * sigma(0) = -0.05; the rejected reply's is +0.05
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", chosen, rejected, None, None, torch.tensor([3.0]), torch.tensor([3.0]), beta=0.1)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("hinge", chosen, rejected, chosen, rejected, torch.tensor([3.0]), torch.tensor([3.0]), beta=0.1)
