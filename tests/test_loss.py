"""The DAR loss (Eq. 4) and its pieces, against hand computations on small tensors."""
import math

import numpy as np
import pytest
import torch

from dar import dar_loss, dar_weights, weighted_sft_loss
from loop import advantage_stats, group_advantages, k3

ALPHA, BETA, CLIP = 0.1, 0.05, 20.0


def hand_weights(adv, logp_t, logp_0, alpha, beta, clip, normalize):
    """Eq. 4 written out with numpy, in plain (not log) space."""
    adv, lt, l0 = (np.asarray(x, dtype=np.float64) for x in (adv, logp_t, logp_0))
    if normalize:
        adv = (adv - adv.mean()) / adv.std()
    w = (np.exp(l0) / np.exp(lt)) ** alpha * np.exp(adv / beta)
    return np.minimum(w, clip) if clip is not None else w


def test_group_advantages_subtract_the_mean_of_each_prompts_k_rewards():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0,   5.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    adv = group_advantages(r, k=4)
    assert torch.allclose(adv, torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_group_advantages_leave_invalid_judgments_out():
    r = torch.tensor([1.0, math.nan, 3.0, 5.0], dtype=torch.float64)
    adv = group_advantages(r, k=4)
    assert torch.isnan(adv[1])
    assert torch.allclose(adv[[0, 2, 3]], torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64))  # mean of 1, 3, 5


def test_weights_match_hand_computation_without_normalisation():
    adv = torch.tensor([0.02, -0.01, 0.0, 0.5])
    logp_t = torch.tensor([-3.0, -5.0, -2.0, -4.0])
    logp_0 = torch.tensor([-4.0, -2.0, -2.0, -9.0])
    w, _ = dar_weights(adv, logp_t, logp_0, ALPHA, BETA, CLIP, normalize=False)
    expect = hand_weights(adv, logp_t, logp_0, ALPHA, BETA, CLIP, normalize=False)
    assert np.allclose(w.numpy(), expect, rtol=1e-6)
    # third sample: A = 0 and pi_0 = pi_t, so its weight is exactly 1; last one is clipped
    assert w[2].item() == pytest.approx(1.0)
    assert w[3].item() == pytest.approx(CLIP)


def test_weights_match_hand_computation_with_normalisation_and_clipping():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(12, generator=g)
    logp_t, logp_0 = -torch.rand(12, generator=g) * 10, -torch.rand(12, generator=g) * 10
    w, parts = dar_weights(adv, logp_t, logp_0, ALPHA, BETA, CLIP, normalize=True)
    expect = hand_weights(adv, logp_t, logp_0, ALPHA, BETA, CLIP, normalize=True)
    assert np.allclose(w.numpy(), expect, rtol=1e-5)
    assert 0 < parts["clipped"].sum() < 12  # the test covers both sides of the clip
    assert torch.equal(parts["clipped"], torch.from_numpy(expect == CLIP))


def test_external_batch_statistics_are_used_when_given():
    adv = torch.tensor([0.5, -0.5, 1.0])
    lt = lz = torch.zeros(3)
    w, _ = dar_weights(adv, lt, lz, ALPHA, beta=1.0, w_clip=None, normalize=True, adv_mean=0.5, adv_std=2.0)
    assert np.allclose(w.numpy(), np.exp((adv.numpy() - 0.5) / 2.0), rtol=1e-6)


def test_clipping_off_gives_the_exact_eq4_weight():
    adv, lt, l0 = torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([-1.5])
    w, _ = dar_weights(adv, lt, l0, ALPHA, BETA, w_clip=None, normalize=False)
    assert w.item() == pytest.approx(math.exp(ALPHA * -0.5 + 1.0 / BETA), rel=1e-6)


def test_gradient_is_minus_mean_of_w_times_grad_log_pi():
    # log pi_theta(y_i) = theta . phi_i with a known feature per sample, so grad log pi = phi_i
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(6, 3, generator=g)
    theta = torch.randn(3, requires_grad=True, generator=g)
    adv, lt, l0 = torch.randn(6, generator=g) * 0.1, -torch.rand(6, generator=g) * 5, -torch.rand(6, generator=g) * 5
    loss, w = dar_loss(phi @ theta, lt, l0, adv, ALPHA, BETA, CLIP, normalize=True)
    loss.mean().backward()
    expect = -(w[:, None] * phi).mean(0)
    assert torch.allclose(theta.grad, expect, atol=1e-6)


def test_micro_batch_losses_add_up_to_the_minibatch_loss():
    g = torch.Generator().manual_seed(2)
    logp, adv = -torch.rand(8, generator=g), torch.randn(8, generator=g)
    lt, l0 = -torch.rand(8, generator=g), -torch.rand(8, generator=g)
    mu, sd = advantage_stats(adv)
    full = dar_loss(logp, lt, l0, adv, adv_mean=mu, adv_std=sd, length_norm=16.0)[0].mean()
    # the loop's reduction: each micro-batch's sum over the minibatch size
    halves = sum(dar_loss(logp[s], lt[s], l0[s], adv[s], adv_mean=mu, adv_std=sd, length_norm=16.0)[0].sum() / 8
                 for s in (slice(0, 4), slice(4, 8)))
    assert torch.allclose(full, halves, atol=1e-7)


def test_weights_carry_no_gradient():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    lt = torch.tensor([-1.5, -2.5], requires_grad=True)
    l0 = torch.tensor([-1.2, -2.2], requires_grad=True)
    adv = torch.tensor([0.3, -0.3], requires_grad=True)
    loss, _ = dar_loss(logp, lt, l0, adv)
    loss.sum().backward()
    assert logp.grad is not None
    assert lt.grad is None and l0.grad is None and adv.grad is None


def test_no_nan_when_all_rewards_tie():
    rewards = torch.full((8,), 7.0, dtype=torch.float64)
    adv = group_advantages(rewards, k=4)
    logp = torch.tensor([-1.0] * 8, requires_grad=True)
    lt, l0 = torch.full((8,), -1.0), torch.full((8,), -1.3)
    loss, w = dar_loss(logp, lt, l0, adv, ALPHA, BETA, CLIP, normalize=True)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    # a tie carries no preference: w_adv = 1 and the weight is the regularisation weight alone
    assert torch.allclose(w, torch.full((8,), math.exp(ALPHA * -0.3)), rtol=1e-6)


def test_no_nan_or_inf_with_extreme_log_ratios():
    adv = torch.tensor([50.0, -50.0, 0.0, 1e3])
    lt = torch.tensor([-1e4, -1.0, -1e4, 0.0])
    l0 = torch.tensor([-1.0, -1e4, -1.0, -1e4])
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    loss, w = dar_loss(logp, lt, l0, adv, ALPHA, BETA, CLIP, normalize=False)
    loss.sum().backward()
    assert torch.isfinite(w).all() and torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert (w >= 0).all() and (w <= CLIP).all()
    assert w[1].item() == 0.0  # exp(-1000 - 1000) underflows to 0, not NaN


def test_invalid_judgments_get_zero_weight_and_are_left_out_of_normalisation():
    adv = torch.tensor([1.0, math.nan, -1.0, 0.0])
    lt = l0 = torch.zeros(4)
    w, _ = dar_weights(adv, lt, l0, ALPHA, beta=1.0, w_clip=None, normalize=True)
    assert w[1].item() == 0.0
    valid = np.array([1.0, -1.0, 0.0])
    assert np.allclose(w[[0, 2, 3]].numpy(), np.exp((valid - valid.mean()) / valid.std()), rtol=1e-5)


def test_sft_is_the_weighted_loss_with_unit_weights():
    logp = torch.tensor([-2.0, -4.0])
    assert weighted_sft_loss(logp, torch.ones(2)).tolist() == pytest.approx([2.0, 4.0])
    assert weighted_sft_loss(logp, torch.ones(2), length_norm=2.0).mean().item() == pytest.approx(1.5)


def test_k3_is_zero_for_identical_policies_and_positive_otherwise():
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    mask = torch.ones_like(lp)
    assert k3(lp, lp, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert k3(lp, lp - 0.3, mask).item() > 0
    assert k3(lp, lp - 0.3, torch.zeros_like(lp)).item() == 0.0
