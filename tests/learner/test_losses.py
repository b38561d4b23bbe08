"""GRPO math against hand-computed values (STYLE.md: small pure functions, proved by hand)."""
import math

import pytest
import torch

from learner.losses import (aggregate, group_advantages, grpo_loss, kl_k3, masked_entropy, sft_loss,
                            truncated_is_weight)


def test_advantages_without_std_scaling():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, scale_by_std=False)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_advantages_with_std_scaling_by_hand():
    # group mean 0.25, population std sqrt(0.25*0.75)=0.4330
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale_by_std=True, eps=0.0)
    std = math.sqrt(0.1875)
    assert adv.tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])


def test_equal_rewards_give_zero_advantage_either_way():
    r = torch.tensor([0.7, 0.7, 0.7, 1.0, 1.0, 1.0])
    for scale in (True, False):
        assert group_advantages(r, 3, scale).abs().max().item() == 0.0


def test_groups_are_independent():
    adv = group_advantages(torch.tensor([1.0, 0.0, 5.0, 5.0]), 2, scale_by_std=False)
    assert adv.tolist() == [0.5, -0.5, 0.0, 0.0]


def test_advantages_reject_ragged_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)


def test_ratio_one_gives_minus_mean_advantage():
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, -4.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, st = grpo_loss(lp, lp.clone(), adv, torch.ones(2, 3))
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert st["clip_frac"] == 0.0 and st["ratio_mean"] == pytest.approx(1.0)


def test_clipping_by_hand():
    # one token, ratio e^0.5=1.6487; clip_high 0.2 -> 1.2. Positive advantage: min(1.6487A, 1.2A) = 1.2A.
    old = torch.zeros(1, 1)
    lp = torch.full((1, 1), 0.5, requires_grad=True)
    loss, st = grpo_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert st["clip_frac"] == 1.0
    loss.backward()
    assert lp.grad.item() == 0.0  # clipped: no gradient
    # negative advantage with the same ratio is not clipped (pessimistic bound): -min(-1.6487, -1.2)
    loss, st = grpo_loss(torch.full((1, 1), 0.5), old, torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(math.exp(0.5))
    assert st["clip_frac"] == 0.0


def test_asymmetric_clip():
    old = torch.zeros(1, 1)
    lp = torch.full((1, 1), math.log(1.25))
    loss, _ = grpo_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25)  # inside [0.8, 1.28]: unclipped
    lp = torch.full((1, 1), math.log(0.7))
    loss, _ = grpo_loss(lp, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(0.8)  # below 1-0.2 with A<0: clipped to 0.8


def test_kl_k3_zero_when_equal_and_positive_otherwise():
    lp = torch.tensor([[-1.0, -2.0]])
    assert kl_k3(lp, lp).abs().max().item() == 0.0
    # r = ref - logp = -0.5 -> e^-0.5 + 0.5 - 1
    assert kl_k3(torch.tensor([0.0]), torch.tensor([-0.5])).item() == pytest.approx(math.exp(-0.5) - 0.5)
    assert (kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()


def test_kl_term_added_with_coefficient():
    lp = torch.zeros(1, 2)
    ref = torch.full((1, 2), -0.5)
    loss, st = grpo_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 2), ref_logprobs=ref, kl_coef=0.1)
    k = math.exp(-0.5) - 0.5
    assert st["kl"] == pytest.approx(k)
    assert loss.item() == pytest.approx(0.1 * k)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 2), kl_coef=0.1)


def test_aggregations_by_hand():
    loss_tok = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(loss_tok, mask, "token_mean").item() == pytest.approx(8 / 5)
    assert aggregate(loss_tok, mask, "seq_mean_token_mean").item() == pytest.approx((1 + 4) / 2)
    assert aggregate(loss_tok, mask, "seq_mean_token_sum_norm", 8).item() == pytest.approx((4 / 8 + 4 / 8) / 2)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(loss_tok, mask, "bogus")


def test_padding_is_ignored():
    lp = torch.tensor([[-1.0, 123.0]])
    loss, _ = grpo_loss(lp, torch.tensor([[-1.0, -7.0]]), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.0)


def test_truncated_is_weight():
    old = torch.tensor([0.0, 0.0, -1.0])
    rollout = torch.tensor([0.0, -2.0, 0.0])
    w = truncated_is_weight(old, rollout, cap=2.0)
    assert w.tolist() == pytest.approx([1.0, 2.0, math.exp(-1.0)])


def test_is_weights_scale_the_policy_gradient():
    lp = torch.zeros(1, 1)
    loss, _ = grpo_loss(lp, lp, torch.tensor([1.0]), torch.ones(1, 1), is_weights=torch.full((1, 1), 0.5))
    assert loss.item() == pytest.approx(-0.5)


def test_sft_loss_and_entropy():
    lp = torch.tensor([[-1.0, -3.0, -100.0]])
    assert sft_loss(lp, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(2.0)
    uniform = torch.zeros(1, 2, 4)
    assert masked_entropy(uniform, torch.ones(1, 2)) == pytest.approx(math.log(4))


@pytest.mark.parametrize("value", [0.1, 0.7, 1.1, 2.2, 0.3 + 1.1, -0.9])
@pytest.mark.parametrize("scale", [True, False])
def test_equal_inexact_rewards_give_exactly_zero_for_every_group_size(value, scale):
    # 0.1, 0.7, 1.1 are not exact in binary; float32 round-off used to give solved groups
    # (12 x 1.1) an advantage of -0.1065 on every sample
    for g in range(2, 17):
        for r in (torch.full((g,), value), torch.full((g,), value, dtype=torch.float64),
                  torch.tensor([value] * g, dtype=torch.float32)):
            adv = group_advantages(torch.cat([r, r]), g, scale)
            assert adv.abs().max().item() == 0.0, (value, g, scale)


def test_zero_variance_groups_are_counted_and_mixed_groups_keep_their_signal():
    from learner.losses import zero_variance_groups

    r = torch.tensor([1.1, 1.1, 1.1, 1.1, 0.1, 1.1, 0.1, 1.1, 0.0, 0.0, 0.0, 0.0])
    assert zero_variance_groups(r, 4) == 2
    adv = group_advantages(r, 4)
    assert adv[:4].tolist() == [0.0] * 4 and adv[8:].tolist() == [0.0] * 4
    assert adv[4:8].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0], abs=1e-5)


def test_dual_clip_caps_negative_advantage_loss_by_hand():
    # ratio e^2 = 7.39 on a negative advantage of -1: the PPO term is max(7.39, 1.28) * 1 = 7.39;
    # the dual clip caps it at clip_ratio_c * 1 = 3
    lp, old = torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2)
    m = torch.tensor([[1.0, 0.0]])
    off, _ = grpo_loss(lp, old, torch.tensor([-1.0]), m, aggregation="token_mean")
    on, _ = grpo_loss(lp, old, torch.tensor([-1.0]), m, aggregation="token_mean", clip_ratio_c=3.0)
    assert off.item() == pytest.approx(math.exp(2.0))
    assert on.item() == pytest.approx(3.0)
    # positive advantages are untouched (clip-high already bounds them)
    pos, _ = grpo_loss(lp, old, torch.tensor([1.0]), m, aggregation="token_mean", clip_ratio_c=3.0)
    assert pos.item() == pytest.approx(-1.2)  # clip_high 0.2
