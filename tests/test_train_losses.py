"""Loss functions and the LR schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from almost_ray.train.losses import IGNORE_INDEX, pairwise_loss, pairwise_stats, token_nll_sum
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
