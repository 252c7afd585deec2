"""GRPO math against values worked out by hand (the working is in each comment)."""

import math

import pytest
import torch

from learner.grpo import (
    aggregate,
    aggregate_share,
    group_advantages,
    grpo_loss,
    kl_k3,
    policy_loss,
)

LOG_HALF = math.log(0.5)


def test_group_advantages_std_and_all_equal_group():
    # group 1: r = [1, 0, 0, 1], mean 0.5, deviations ±0.5,
    #   sample std = sqrt((4 · 0.25) / 3) = sqrt(1/3) = 0.57735 -> A = ±0.5 / 0.57735 = ±0.866025
    # group 2: r = [2, 2, 2, 2], all equal -> A = 0 (0 / (0 + eps))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    a = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_advantages_dr_grpo_unscaled():
    # scale="none": r - mean(r) only. group 1 mean 1/3 -> [2/3, -1/3, -1/3]; group 2 mean 4 -> [-1, 2, -1]
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 6.0, 3.0])
    adv = group_advantages(rewards, group_size=3, scale="none")
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.0, 2.0, -1.0]))


def test_group_advantages_rejects_ragged_batch():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)


def test_kl_k3():
    # π_θ = 0.5, π_ref = 0.25: π_ref/π_θ = 0.5 -> 0.5 - log(0.5) - 1 = 0.193147
    # equal policies -> 1 - 0 - 1 = 0
    logp = torch.tensor([[LOG_HALF, LOG_HALF]])
    logp_ref = torch.tensor([[math.log(0.25), LOG_HALF]])
    torch.testing.assert_close(kl_k3(logp, logp_ref), torch.tensor([[0.5 - LOG_HALF - 1, 0.0]]))


def test_policy_loss_clipped_token_has_no_gradient():
    # eps = 0.2, w = 1 (behaviour == old), tokens:
    #   t0: ratio 1.5, A=+1 -> min(1.5, clip 1.2) = 1.2 (clipped) -> loss -1.2, d/dlogp = 0
    #   t1: ratio 1.0, A=+1 -> min(1, 1) = 1 -> loss -1, d/dlogp = -ratio·A = -1
    #   t2: ratio 1.5, A=-1 -> min(-1.5, -1.2) = -1.5 (unclipped) -> loss 1.5, d/dlogp = -ratio·A = 1.5
    #   t3: ratio 0.5, A=-1 -> min(-0.5, -0.8) = -0.8 (clipped) -> loss 0.8, d/dlogp = 0
    logp_old = torch.full((4, 1), LOG_HALF)
    ratio = torch.tensor([[1.5], [1.0], [1.5], [0.5]])
    logp = (logp_old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss = policy_loss(logp, logp_old, logp_old, adv, eps_low=0.2, eps_high=0.2, is_cap=2.0)
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [-1.0], [1.5], [0.8]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [-1.0], [1.5], [0.0]]))


def test_policy_loss_asymmetric_clip():
    # eps_low = 0.2, eps_high = 0.28 (DAPO clip-higher): ratio 1.25, A=+1 is inside [0.8, 1.28]
    #   -> loss -1.25; ratio 1.5 -> clipped to 1.28 -> loss -1.28
    logp_old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.25), math.log(1.5)]])
    loss = policy_loss(logp, logp_old, logp_old, torch.tensor([1.0]), 0.2, 0.28, None)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28]]))


def test_importance_weight_is_capped_and_has_no_gradient():
    # ratio = 1 (logp == logp_old), A = +1, so loss = -w:
    #   t0: π_old/μ = 0.5/0.125 = 4 -> capped at C = 2 -> loss -2
    #   t1: π_old/μ = 0.5/1.0 = 0.5 -> loss -0.5
    # d loss / d logp = -w · ratio · A = [-2, -0.5]; no gradient reaches logp_old or μ.
    logp_old = torch.full((1, 2), LOG_HALF, requires_grad=True)
    logp_behaviour = torch.tensor([[math.log(0.125), 0.0]], requires_grad=True)
    logp = torch.full((1, 2), LOG_HALF, requires_grad=True)
    loss = policy_loss(logp, logp_old, logp_behaviour, torch.tensor([1.0]), 0.2, 0.2, is_cap=2.0)
    torch.testing.assert_close(loss, torch.tensor([[-2.0, -0.5]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -0.5]]))
    assert logp_old.grad is None and logp_behaviour.grad is None
    # is_cap=None: w = 1 whatever μ says -> loss -1 on both tokens
    no_is = policy_loss(logp, logp_old, logp_behaviour, torch.tensor([1.0]), 0.2, 0.2, is_cap=None)
    torch.testing.assert_close(no_is, torch.tensor([[-1.0, -1.0]]))


# x = [[1, 2, 3], [4, 9, 9]], mask = [[1, 1, 1], [1, 0, 0]] (the 9s are padding)
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("seq-mean-token-mean", 3.0),  # row means 6/3 = 2 and 4/1 = 4 -> (2 + 4) / 2 = 3
        ("token-mean", 2.5),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq-mean-token-sum-norm", 10 / 6),  # (1 + 2 + 3 + 4) / (N·T = 2·3)
    ],
)
def test_aggregate_modes(mode, expected):
    assert aggregate(X, MASK, mode).item() == pytest.approx(expected)


def test_aggregate_seq_mean_ignores_padding_rows():
    # a third all-padding row must not count as a completion: still (2 + 4) / 2 = 3
    x = torch.cat([X, torch.full((1, 3), 7.0)])
    mask = torch.cat([MASK, torch.zeros(1, 3, dtype=MASK.dtype)])
    assert aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)


@pytest.mark.parametrize(
    "mode, shares",
    [
        ("seq-mean-token-mean", (0.5, 0.5)),  # 1 of 2 completions each
        ("token-mean", (0.75, 0.25)),  # 3 and 1 of 4 tokens: 0.75·2 + 0.25·4 = 2.5
        ("seq-mean-token-sum-norm", (0.5, 0.5)),  # 1·3 of 2·3 entries each
    ],
)
def test_aggregate_share_rebuilds_full_batch(mode, shares):
    got = (aggregate_share(MASK[:1], MASK, mode), aggregate_share(MASK[1:], MASK, mode))
    assert got == pytest.approx(shares)
    rebuilt = sum(s * aggregate(X[i : i + 1], MASK[i : i + 1], mode) for i, s in enumerate(got))
    assert rebuilt.item() == pytest.approx(aggregate(X, MASK, mode).item())


def test_grpo_loss_with_kl():
    # one completion, 2 tokens, on-policy (ratio 1, w 1), A = +1 -> policy term -1 per token
    # π_ref = 0.25 vs π_θ = 0.5 -> k3 = 0.193147 per token (see test_kl_k3)
    # per token -1 + 0.04 · 0.193147 = -0.992274; seq-mean-token-mean -> -0.992274
    logp = torch.full((1, 2), LOG_HALF)
    logp_ref = torch.full((1, 2), math.log(0.25))
    k3 = 0.5 - LOG_HALF - 1
    loss, metrics = grpo_loss(logp, logp, logp, logp_ref, torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-1 + 0.04 * k3)
    assert metrics["kl"].item() == pytest.approx(k3)
    assert metrics["ratio"].item() == 1.0 and metrics["is_weight"].item() == 1.0
    assert metrics["clip_fraction"].item() == 0.0


def test_grpo_loss_beta_zero_without_reference():
    # beta = 0, logp_ref None: only the policy term; A = +1, ratio 1.5 clipped to 1.2 on t0,
    # ratio 1 on t1 -> per token [-1.2, -1], token mean -1.1; clip fraction 1/2
    logp_old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), 0.0]])
    loss, metrics = grpo_loss(
        logp, logp_old, logp_old, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0
    )
    assert loss.item() == pytest.approx(-1.1)
    assert metrics["kl"].item() == 0.0
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    assert metrics["ratio"].item() == pytest.approx(1.25)
    with pytest.raises(ValueError):
        grpo_loss(logp, logp_old, logp_old, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1)


def test_behaviour_gap_sees_what_the_mean_is_weight_hides():
    # μ = [0.5, 0.25] on two tokens, π_old = [0.25, 0.5]: w = [0.5, 2], token mean 1.25 would
    # look close to on-policy; |log π_old − log μ| = log 2 on each token, mean 0.693147
    logp_old = torch.log(torch.tensor([[0.25, 0.5]]))
    logp_mu = torch.log(torch.tensor([[0.5, 0.25]]))
    _, metrics = grpo_loss(
        logp_old, logp_old, logp_mu, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0
    )
    assert metrics["is_weight"].item() == pytest.approx(1.25)
    assert metrics["behaviour_gap"].item() == pytest.approx(math.log(2))


def test_grpo_loss_dr_grpo():
    # Dr. GRPO: unscaled advantages and sum / (N·T).
    # rewards [1, 0] -> A = [0.5, -0.5]; on-policy so per token -A: row 0 -0.5, row 1 +0.5
    # mask [[1, 1, 0], [1, 0, 0]] -> sum = 2·(-0.5) + 1·0.5 = -0.5; / (2·3) = -0.083333
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, scale="none")
    logp = torch.full((2, 3), LOG_HALF)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = grpo_loss(logp, logp, logp, None, adv, mask, beta=0.0, mode="seq-mean-token-sum-norm")
    assert loss.item() == pytest.approx(-0.5 / 6)
