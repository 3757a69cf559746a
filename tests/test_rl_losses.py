"""The PPO math of almost_ray/rl/losses.py against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from almost_ray.rl import losses

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # episode 0: 3 response tokens, episode 1: 1


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0]])
    assert losses.masked_mean(x, MASK).item() == pytest.approx((1 + 2 + 3 + 10) / 4)
    assert losses.masked_sum(x, MASK).item() == pytest.approx(16.0)


def test_whiten_over_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 99.0, 99.0]])
    w = losses.whiten(x, MASK)
    vals = torch.tensor([1.0, 2.0, 3.0, 10.0])
    expected = (vals - vals.mean()) / vals.var(unbiased=False).sqrt()
    assert torch.allclose(w[MASK.bool()], expected, atol=1e-5)
    assert torch.all(w[~MASK.bool()] == 0)


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(losses.kl_per_token(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    # k3 = exp(ref - logp) - 1 - (ref - logp)
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    assert torch.allclose(losses.kl_per_token(logp, ref, "k3"), torch.tensor([k3]))
    with pytest.raises(ValueError):
        losses.kl_per_token(logp, ref, "k2")


def test_rm_score_lands_on_the_last_response_token():
    kl = torch.tensor([[0.2, 0.4, -0.2], [1.0, 5.0, 5.0]])
    rewards = losses.shaped_rewards(torch.tensor([2.0, -1.0]), kl, MASK, kl_coef=0.5)
    expected = torch.tensor([[-0.1, -0.2, 0.1 + 2.0], [-0.5 - 1.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 1.0])
    has_eos = torch.tensor([True, False])
    assert torch.equal(losses.penalize_missing_eos(scores, has_eos, -2.0), torch.tensor([1.0, -1.0]))
    assert torch.equal(losses.penalize_missing_eos(scores, has_eos, None), scores)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.25, 0.5], [1.0, 9.0, 9.0]])
    gamma, lam = 0.9, 0.8
    adv, ret = losses.gae(rewards, values, MASK, gamma, lam)
    # episode 0, backwards: d2 = 1 - 0.5 = 0.5; d1 = 0 + 0.9*0.5 - 0.25 = 0.2; d0 = 0 + 0.9*0.25 - 0.5 = -0.275
    a2 = 0.5
    a1 = 0.2 + gamma * lam * a2
    a0 = -0.275 + gamma * lam * a1
    # episode 1 ends after one token: A = r - V = 1, and the padded values 9 must not leak in
    expected = torch.tensor([[a0, a1, a2], [1.0, 0.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + values) * MASK, atol=1e-6)


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 3.0]])
    values = torch.tensor([[1.0, 2.0, 0.5]])
    adv, ret = losses.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    to_go = torch.tensor([[2.9, 2.8, 3.0]])
    assert torch.allclose(ret, to_go, atol=1e-6)
    assert torch.allclose(adv, to_go - values, atol=1e-6)


def test_policy_loss_clips_and_counts():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = losses.policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped). token 1: ratio 0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx(-1.2 + 0.8)
    assert stats["clip_frac"].item() == pytest.approx(2.0)
    approx_kl = (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))
    assert stats["approx_kl"].item() == pytest.approx(approx_kl, rel=1e-5)


def test_policy_loss_unclipped_gradient_is_minus_advantage():
    logp = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([[0.5, -2.0]])
    loss, stats = losses.policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), clip_range=0.2)
    loss.backward()
    assert torch.allclose(logp.grad, -adv)
    assert stats["clip_frac"].item() == 0


def test_value_loss_clipped():
    old = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[2.0, 1.1, 5.0]])
    returns = torch.tensor([[3.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = losses.value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: (0.1)^2 both -> 0.01
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01))
    assert stats["value_clip_frac"].item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------- critic-free estimators
SCORES = torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two prompts, three responses each


def test_grpo_normalises_within_each_group():
    # group 1: mean 1, unbiased std sqrt((4 + 1 + 1) / 2) = sqrt(3); group 2: all equal, no signal
    s3 = math.sqrt(3.0)
    assert losses.grpo(SCORES, 3).tolist() == pytest.approx([2 / s3, -1 / s3, -1 / s3, 0.0, 0.0, 0.0], abs=1e-6)


def test_dr_grpo_only_subtracts_the_group_mean():
    assert losses.dr_grpo(SCORES, 3).tolist() == pytest.approx([2.0, -1.0, -1.0, 0.0, 0.0, 0.0])


def test_rloo_baseline_is_the_mean_of_the_others():
    # 3 - (0 + 0) / 2 = 3; 0 - (3 + 0) / 2 = -1.5 (twice); equal scores: 0
    assert losses.rloo(SCORES, 3).tolist() == pytest.approx([3.0, -1.5, -1.5, 0.0, 0.0, 0.0])


def test_group_estimators_need_whole_groups():
    for fn in (losses.grpo, losses.dr_grpo, losses.rloo):
        with pytest.raises(ValueError, match="groups of 4"):
            fn(SCORES, 4)
        with pytest.raises(ValueError, match="at least 2"):
            fn(SCORES, 1)


def test_returns_to_go_by_hand():
    rewards = torch.tensor([[0.1, -0.2, 3.0], [2.0, 7.0, 7.0]])
    # episode 0 with gamma 0.5: G2 = 3, G1 = -0.2 + 1.5 = 1.3, G0 = 0.1 + 0.65 = 0.75; episode 1 ends after
    # one token, and the 7s past its end must not flow back
    got = losses.returns_to_go(rewards, MASK, gamma=0.5)
    assert torch.allclose(got, torch.tensor([[0.75, 1.3, 3.0], [2.0, 0.0, 0.0]]))


def test_critic_free_advantages_rloo_and_reinforce_pp_by_hand():
    scores = torch.tensor([1.0, 0.0])  # one prompt, two responses
    kl = torch.tensor([[0.2, 0.4, -0.2], [1.0, 5.0, 5.0]])
    # rloo: scores become [1, -1]; rewards [-0.1, -0.2, 0.1 + 1] and [-0.5 - 1]; returns to go, no whitening
    rloo = losses.critic_free_advantages("rloo", scores, kl, MASK, kl_coef=0.5, group_size=2)
    assert torch.allclose(rloo, torch.tensor([[0.8, 0.9, 1.1], [-1.5, 0.0, 0.0]]))
    # reinforce_pp: no baseline, rewards [-0.1, -0.2, 1.1] and [-0.5]; returns [0.8, 0.9, 1.1] and [-0.5],
    # then normalised over the four response tokens of the batch
    pp = losses.critic_free_advantages("reinforce_pp", scores, kl, MASK, kl_coef=0.5, group_size=2)
    returns = torch.tensor([0.8, 0.9, 1.1, -0.5])
    expected = (returns - returns.mean()) / returns.var(unbiased=False).sqrt()
    assert torch.allclose(pp[MASK.bool()], expected, atol=1e-5)
    assert torch.all(pp[~MASK.bool()] == 0)
    # grpo and dr_grpo on the same pair: [1, 0] -> +-1/sqrt(2) (unbiased std of two is |d|/sqrt(2)) and +-0.5
    grpo = losses.critic_free_advantages("grpo", scores, torch.zeros(2, 3), MASK, kl_coef=0.5, group_size=2)
    assert torch.allclose(grpo, torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]) / math.sqrt(2), atol=1e-6)
    dr = losses.critic_free_advantages("dr_grpo", scores, torch.zeros(2, 3), MASK, kl_coef=0.5, group_size=2)
    assert torch.allclose(dr, torch.tensor([[0.5, 0.5, 0.5], [-0.5, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="unknown critic-free"):
        losses.critic_free_advantages("gae", scores, kl, MASK, kl_coef=0.5, group_size=2)


def test_kl_loss_k3_value_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = losses.kl_loss(logp, ref, mask)
    assert loss.item() == pytest.approx((math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0), rel=1e-6)
    loss.backward()
    # d/dlogp [exp(ref - logp) - 1 + logp - ref] = 1 - exp(ref - logp): pulls logp towards ref, 0 when equal
    assert logp.grad[0].tolist() == pytest.approx([1 - math.exp(-0.5), 1 - math.exp(1.0), 0.0], rel=1e-6)
    at_ref = torch.tensor([[-1.5, -1.0]], requires_grad=True)
    losses.kl_loss(at_ref, at_ref.detach(), torch.ones(1, 2)).backward()
    assert torch.all(at_ref.grad == 0)
