"""Every baseline loss of baselines.py against a hand computation on small tensors (values and gradients),
and every algorithm training for a few online batches on the toy task through loop.train (conftest.train)."""
import dataclasses
import json
import math
import os

import pytest
import torch

import baselines as B
import config
import infra
import loop
from conftest import TINY, TORCHRUN, comparable, read_metrics, run_dar, train

T = torch.tensor


def grad_of(f, x):
    x = x.clone().requires_grad_(True)
    f(x).sum().backward()
    return x.grad


# ---------------------------------------------------------------------------------------------------
# PPO family
# ---------------------------------------------------------------------------------------------------
MASK = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])      # responses of 3 and 2 tokens


def test_ppo_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_token():
    lt, l0 = T([[-1.0, -2.0, -0.5], [-0.3, -0.1, 0.0]]), T([[-1.5, -1.0, -0.5], [-0.2, -0.6, -9.0]])
    r = B.ppo_rewards(T([5.0, 2.0]), lt, l0, MASK, beta=0.1)
    expect = T([[-0.1 * 0.5, -0.1 * -1.0, 0.0 + 5.0], [-0.1 * -0.1, -0.1 * 0.5 + 2.0, 0.0]])
    assert torch.allclose(r, expect, atol=1e-6)


def test_dual_ppo_rewards_by_hand_and_summed_over_tokens():
    lp, lt, l0 = T([[-1.0, -2.0, -0.5]]), T([[-1.2, -1.5, -0.5]]), T([[-0.7, -3.0, -1.0]])
    alpha, beta, m = 0.3, 0.02, T([[1.0, 1.0, 1.0]])
    r = B.dual_ppo_rewards(T([4.0]), lp, lt, l0, m, alpha, beta)
    per_tok = [-beta * (alpha * (a - c) + (1 - alpha) * (a - b)) for a, b, c in zip(lp[0], lt[0], l0[0])]
    assert torch.allclose(r[0], T(per_tok) + T([0.0, 0.0, 4.0]), atol=1e-6)
    seq = 4.0 - beta * (alpha * (lp.sum() - l0.sum()) + (1 - alpha) * (lp.sum() - lt.sum()))
    assert r.sum().item() == pytest.approx(seq.item(), abs=1e-6)
    # with pi = pi_t (the first update of a batch) the stability term vanishes: PPO's reward with alpha*beta
    assert torch.allclose(B.dual_ppo_rewards(T([4.0]), lt, lt, l0, m, alpha, beta),
                          B.ppo_rewards(T([4.0]), lt, l0, m, alpha * beta), atol=1e-7)


def test_dual_mix_ppo_rewards_use_the_forward_kl_term_of_eq9():
    lp, lt, l0 = T([[-1.0, -2.0]]), T([[-1.5, -1.0]]), T([[-0.5, -2.5]])
    alpha, beta, m = 0.3, 0.02, T([[1.0, 1.0]])
    r = B.dual_mix_ppo_rewards(T([1.0]), lp, lt, l0, m, alpha, beta)
    expect = [-beta * (alpha * (a - c) + (1 - alpha) * math.exp(b - a) * (b - a)) for a, b, c in zip(lp[0], lt[0], l0[0])]
    assert torch.allclose(r[0], T(expect) + T([0.0, 1.0]), atol=1e-6)


def gae_by_loop(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for n in range(len(rewards)):
        last, L = 0.0, int(mask[n].sum())
        for i in reversed(range(L)):
            v_next = values[n, i + 1] if i + 1 < L else 0.0
            last = rewards[n, i] + gamma * v_next - values[n, i] + gamma * lam * last
            adv[n, i] = last
    return adv


def test_gae_matches_the_textbook_backward_recursion():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
        adv, ret = B.gae(rewards * MASK, values, MASK, gamma, lam)
        expect = gae_by_loop(rewards, values, MASK, gamma, lam)
        assert torch.allclose(adv, expect, atol=1e-6)
        assert torch.allclose(ret, (expect + values) * MASK, atol=1e-6)
    # lam = 1, gamma = 1: the advantage is the return-to-go minus the value
    adv, _ = B.gae(rewards * MASK, values, MASK, 1.0, 1.0)
    togo = (rewards * MASK).flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, (togo - values) * MASK, atol=1e-6)


def test_ppo_policy_loss_clips_in_the_direction_of_the_advantage():
    lt = T([[0.0, 0.0, 0.0, 0.0]])
    lp = T([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(1.1)]])   # ratios 1.5, 1.5, 0.5, 1.1
    adv = T([[1.0, -1.0, -1.0, 2.0]])
    m = torch.ones(1, 4)
    loss = B.ppo_policy_loss(lp, lt, adv, m, clip_eps=0.2)
    # min(rho A, clip(rho) A): 1.2 (clipped), -1.5, -0.8 (clipped), 2.2
    assert loss.item() == pytest.approx(-(1.2 - 1.5 - 0.8 + 2.2) / 4, abs=1e-6)
    grad = grad_of(lambda x: B.ppo_policy_loss(x, lt, adv, m, 0.2), lp)
    # clipped tokens get no gradient; the others -A rho / |y|
    assert torch.allclose(grad, T([[0.0, 1.5 / 4, 0.0, -2.0 * 1.1 / 4]]), atol=1e-6)
    # eps = inf is the unclipped surrogate rho A
    assert B.ppo_policy_loss(lp, lt, adv, m, math.inf).item() == pytest.approx(-(1.5 - 1.5 - 0.5 + 2.2) / 4, abs=1e-6)


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    v, v_old, ret, m = T([[1.0, 0.0]]), T([[0.5, 0.0]]), T([[2.0, -1.0]]), torch.ones(1, 2)
    # token 1: unclipped (1-2)^2 = 1, clipped 0.7 -> (0.7-2)^2 = 1.69; token 2: 1 and 1
    assert B.value_loss(v, v_old, ret, m, 0.2).item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# DAO, RLOO, GRPO
# ---------------------------------------------------------------------------------------------------
def test_dao_loss_gradient_is_the_advantage_minus_the_dual_kl_log_ratio():
    lp, lt, l0, adv = T([-1.0, -3.0]), T([-1.2, -2.0]), T([-0.8, -4.0]), T([0.5, -1.0])
    alpha, beta = 0.1, 0.05
    grad = grad_of(lambda x: B.dao_loss(x, lt, l0, adv, alpha, beta), lp)
    assert torch.allclose(grad, -(adv - beta * (lp - alpha * l0 - (1 - alpha) * lt)), atol=1e-6)
    assert torch.allclose(B.dao_loss(lp, lt, l0, adv, alpha, beta, length_norm=4.0),
                          -(adv - beta * (lp - alpha * l0 - (1 - alpha) * lt)) * lp / 4, atol=1e-6)


def test_dao_ppo_loss_value_and_gradient():
    lp, lt, l0, adv = T([-1.0, -3.0]), T([-1.2, -3.0]), T([-0.8, -4.0]), T([0.5, -1.0])
    a, b = 0.1, 0.05
    rho = (lp - lt).exp()
    pen = lp - a * l0 - (1 - a) * lt
    assert torch.allclose(B.dao_ppo_loss(lp, lt, l0, adv, a, b), -(rho * adv - b * rho * pen), atol=1e-6)
    # d/dlogp of rho (A - b pen) = rho (A - b pen) - b rho
    grad = grad_of(lambda x: B.dao_ppo_loss(x, lt, l0, adv, a, b), lp)
    assert torch.allclose(grad, -(rho * (adv - b * pen) - b * rho), atol=1e-6)


def test_rloo_leave_one_out_advantages_and_loss():
    r = T([1.0, 2.0, 6.0, math.nan, 3.0, 3.0], dtype=torch.float64)
    adv = B.rloo_advantages(r, k=3)
    assert adv[:3].tolist() == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5])
    assert math.isnan(adv[3]) and adv[4:].tolist() == [0.0, 0.0]   # NaN left out of its neighbours' baseline
    grad = grad_of(lambda x: B.rloo_loss(x, T([2.0, -1.0]), length_norm=2.0), T([-1.0, -2.0]))
    assert grad.tolist() == pytest.approx([-1.0, 0.5])
    assert B.kl_penalised_rewards(T([5.0]), T([-1.0]), T([-3.0]), 0.03).item() == pytest.approx(5 - 0.06)


def test_rloo_and_dao_losses_at_a_later_update_have_the_clipped_ratio():
    """Samples of pi_t (logp_old) after pi_theta moved: the gradient is -rho c / |y| inside 1 +- eps, 0 outside it
    in the direction of c (rho 1.5 with c > 0; rho 0.5 with c < 0), and REINFORCE's -c / |y| at rho = 1."""
    lp, lt, adv = T([math.log(1.5), math.log(1.5), math.log(0.5), math.log(1.1), 0.0]), torch.zeros(5), \
        T([1.0, -1.0, -1.0, 2.0, 3.0])
    grad = grad_of(lambda x: B.rloo_loss(x, adv, 2.0, logp_old=lt, clip_eps=0.2), lp)
    assert grad.tolist() == pytest.approx([0.0, 1.5 / 2, 0.0, -2.0 * 1.1 / 2, -3.0 / 2])
    assert torch.allclose(grad_of(lambda x: B.rloo_loss(x, adv, 2.0, logp_old=x.detach(), clip_eps=0.2), lp),
                          grad_of(lambda x: B.rloo_loss(x, adv, 2.0), lp))          # pi_theta = pi_old: REINFORCE
    l0, a, b = T([-0.5] * 5), 0.1, 0.05
    coef = adv - b * (lp - a * l0 - (1 - a) * lt)
    grad = grad_of(lambda x: B.dao_loss(x, lt, l0, adv, a, b, logp_old=lt, clip_eps=0.2), lp)
    rho = (lp - lt).exp()
    inside = ((rho <= 1.2) | (coef < 0)) & ((rho >= 0.8) | (coef > 0))
    assert torch.allclose(grad, torch.where(inside, -rho * coef, 0.0), atol=1e-6)


def tabular_later_update(loss_of, penalty_of, n=6, seed=0, spread=1.0):
    """One prompt, n responses, exact sums: pi_t sampled the batch, pi_theta has moved since (its logits are
    pi_t's plus spread x noise). Returns (the gradient in pi_theta's logits of E_{y ~ pi_t}[loss_of(log pi_theta,
    log pi_t, log pi_0, A)], of minus the objective J(pi_theta) = E_{pi_theta}[A - penalty_of(log pi_theta, log pi_t,
    log pi_0)] the loss stands for, and of E_{y ~ pi_t} of the
    on-policy form loss_of(..., on_policy=True), the max |rho - 1|)."""
    g = torch.Generator().manual_seed(seed)
    logp_t = torch.randn(n, generator=g, dtype=torch.float64).log_softmax(0)
    theta = (logp_t + spread * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()
    logp_0, adv = torch.randn(n, generator=g, dtype=torch.float64).log_softmax(0), torch.randn(n, generator=g, dtype=torch.float64)
    logp = theta.log_softmax(0)
    grads = [torch.autograd.grad(x, theta, retain_graph=True)[0] for x in (
        (logp_t.exp() * loss_of(logp, logp_t, logp_0, adv)).sum(),
        -(logp.exp() * (adv - penalty_of(logp, logp_t, logp_0))).sum(),
        (logp_t.exp() * loss_of(logp, logp_t, logp_0, adv, on_policy=True)).sum())]
    return *grads, ((logp - logp_t).exp() - 1).abs().max().item()


def later_update_losses(clip_eps):
    """rloo_loss and dao_loss as sequence_step calls them (logp_old = log pi_t), each with the penalty of the
    objective J = E_{pi_theta}[A - penalty] its gradient follows (Eq. 3 for DAO; none for RLOO, whose KL is in A)."""
    a, b = 0.1, 0.5

    def rloo(logp, logp_t, logp_0, adv, on_policy=False):
        return B.rloo_loss(logp, adv, logp_old=None if on_policy else logp_t, clip_eps=clip_eps)

    def dao(logp, logp_t, logp_0, adv, on_policy=False):
        return B.dao_loss(logp, logp_t, logp_0, adv, a, b, logp_old=None if on_policy else logp_t, clip_eps=clip_eps)
    return [(rloo, lambda logp, logp_t, logp_0: torch.zeros_like(logp)),
            (dao, lambda logp, logp_t, logp_0: b * (logp - a * logp_0 - (1 - a) * logp_t))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_and_dao_on_a_moved_policy_follow_the_on_policy_gradient(seed):
    """A later update on an online batch: the samples came from pi_t, pi_theta has moved. With the ratio (unclipped)
    the expected gradient is exactly that of the on-policy objective at pi_theta (REINFORCE under y ~ pi_theta);
    with the default clip it still is while every ratio lies within 1 +- clip_eps. Without a ratio, treating
    pi_t's samples as pi_theta's, it is another vector."""
    for loss, penalty in later_update_losses(math.inf):
        got, exact, no_ratio, _ = tabular_later_update(loss, penalty, seed=seed)
        assert torch.allclose(got, exact, rtol=1e-9, atol=1e-13)
        assert (no_ratio - exact).norm() > 1e-2 * exact.norm()
    for loss, penalty in later_update_losses(config.parse_config(["--algo", "rloo"]).clip_eps):
        got, exact, _, moved = tabular_later_update(loss, penalty, seed=seed, spread=0.05)
        assert 0 < moved < 0.2 and torch.allclose(got, exact, rtol=1e-9, atol=1e-13)


def test_grpo_advantages_are_group_normalised():
    r = T([1.0, 2.0, 6.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    adv = B.grpo_advantages(r, k=3, eps=0.0 + 1e-12)
    x = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    assert torch.allclose(adv[:3], (x - x.mean()) / x.std(), atol=1e-6)   # sample std, as in TRL
    assert adv[3:].abs().max().item() < 1e-6                                 # a tied group: no signal


def test_grpo_loss_value_and_gradient_at_pi_t_equal_pi_0():
    lp = T([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    adv = T([1.5, -0.5])
    loss = B.grpo_loss(lp, lp, lp, adv, MASK, clip_eps=0.2, beta=0.04)
    assert torch.allclose(loss, -adv, atol=1e-6)              # ratio 1, k3 = 0
    grad = grad_of(lambda x: B.grpo_loss(x, lp, lp, adv, MASK, 0.2, 0.04), lp)
    assert torch.allclose(grad, -adv[:, None] * MASK / MASK.sum(1, keepdim=True), atol=1e-6)   # k3' = 0 at pi_0
    # away from pi_0 the penalty is beta * mean k3 and pulls log pi back towards log pi_0
    l0 = lp - 0.5
    k3_pen = B.grpo_loss(lp, lp, l0, torch.zeros(2), MASK, 0.2, 0.04)
    assert torch.allclose(k3_pen, T([0.04 * (math.exp(-0.5) + 0.5 - 1)] * 2), atol=1e-6)
    assert (grad_of(lambda x: B.grpo_loss(x, lp, l0, torch.zeros(2), MASK, 0.2, 0.04), lp)[MASK.bool()] > 0).all()


# ---------------------------------------------------------------------------------------------------
# TRL-compatible options: --scale-rewards, --loss-agg, --clip-eps-high, --tis-cap
# ---------------------------------------------------------------------------------------------------
def test_grpo_advantages_scaled_by_the_batch_std_or_not_at_all():
    r = T([1.0, 2.0, 6.0, 5.0, 5.0, 5.0], dtype=torch.float64)       # group means 3 and 5
    centred = T([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(B.grpo_advantages(r, 3, scale="none"), centred)              # Dr. GRPO: r - mean
    # batch: mean 4, squared deviations 9 4 4 1 1 1 = 20, sample variance 20 / 5 = 4, std 2
    assert torch.allclose(B.grpo_advantages(r, 3, scale="batch"), centred / (2 + 1e-4))
    # the batch of every rank (here another rank's 3 rewards, one invalid): 8 valid, mean 4, 20 / 7
    every = torch.cat([r, T([math.nan, 4.0, 4.0], dtype=torch.float64)])
    assert torch.allclose(B.grpo_advantages(r, 3, scale="batch", batch_rewards=every),
                          centred / (math.sqrt(20 / 7) + 1e-4))
    # an invalid judgment stays NaN, and out of its group's mean, with every scaling
    r2 = T([1.0, math.nan, 3.0], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        a = B.grpo_advantages(r2, 3, scale=scale)
        assert math.isnan(a[1]) and a[0] == pytest.approx(-a[2]) and a[0] < 0


def test_clip_higher_widens_only_the_upper_clip():
    lt = T([[0.0, 0.0, 0.0, 0.0]])
    lp = T([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(1.25)]])   # ratios 1.5, 1.5, 0.5, 1.25
    adv, m = T([[1.0, -1.0, -1.0, 2.0]]), torch.ones(1, 4)
    # clip to [0.8, 1.28]: min(rho A, clip(rho) A) = 1.28, -1.5, -0.8, 2.5 (1.25 is inside the wider range)
    loss = B.ppo_policy_loss(lp, lt, adv, m, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-(1.28 - 1.5 - 0.8 + 2.5) / 4, abs=1e-6)
    # symmetric (0 = clip_eps): 1.25 is clipped to 1.2
    assert B.ppo_policy_loss(lp, lt, adv, m, 0.2, 0.0).item() == pytest.approx(-(1.2 - 1.5 - 0.8 + 2.4) / 4, abs=1e-6)
    ratio = lp.exp()
    assert B.outside_clip(ratio, 0.2, 0.28).tolist() == [[True, True, True, False]]
    assert B.outside_clip(ratio, 0.2).tolist() == [[True, True, True, True]]
    # GRPO and the sequence-level surrogate of RLOO / DAO clip the same way
    g = lambda high: B.grpo_loss(lp[:, 3:], lt[:, 3:], lt[:, 3:], T([2.0]), torch.ones(1, 1), 0.2, 0.0, high).item()
    assert g(0.28) == pytest.approx(-2.5, abs=1e-6) and g(0.0) == pytest.approx(-2.4, abs=1e-6)
    seq = B.reinforce_surrogate(T([math.log(1.5), math.log(1.25)]), T([1.0, 1.0]), T([0.0, 0.0]), 0.2, 0.28)
    assert torch.allclose(seq, T([-1.28, -1.25]), atol=1e-6)
    assert torch.allclose(B.rloo_loss(T([math.log(1.25)]), T([1.0]), 2.0, T([0.0]), 0.2, 0.28), T([-1.25 / 2]))


def test_tis_weights_are_the_capped_detached_sampler_ratio():
    lt = torch.log(T([[0.5, 0.2, 0.9], [0.3, 0.4, 0.5]])).requires_grad_(True)
    ls = torch.log(T([[0.25, 0.2, 0.1], [0.6, 0.04, 0.5]]))     # ratios 2, 1, 9 and 0.5, 10, (padding)
    w, capped = B.tis_weights(lt, ls, MASK, cap=3.0)
    assert torch.allclose(w, T([[2.0, 1.0, 3.0], [0.5, 3.0, 0.0]]), atol=1e-6)
    assert capped.tolist() == [[False, False, True], [False, True, False]]
    assert not w.requires_grad
    # huge log-ratios give the cap, not inf
    assert B.tis_weights(T([[0.0]]), T([[-1e4]]), torch.ones(1, 1), 2.0)[0].item() == pytest.approx(2.0)


def grpo_by_hand():
    """Two responses (3 and 2 tokens), pi_theta = pi_t (ratio 1: the policy-gradient term of a token is -A w_i
    with its TIS weight w_i), log pi_0 = log pi_theta - 0.5 (k3 = e^-0.5 - 0.5 ... per token, c below)."""
    lp = T([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    tis = T([[2.0, 1.0, 0.5], [1.0, 3.0, 0.0]])
    c = math.exp(-0.5) + 0.5 - 1
    return lp, tis, c


def test_grpo_loss_aggregations_by_hand():
    lp, tis, c = grpo_by_hand()
    adv, beta = T([1.5, -0.5]), 0.04
    # per-token terms: -1.5 * (2, 1, 0.5) + beta c = (-3, -1.5, -0.75) + beta c; 0.5 * (1, 3) + beta c
    sums = T([-5.25 + 3 * beta * c, 2.0 + 2 * beta * c])
    f = lambda agg: B.grpo_loss(lp, lp, lp - 0.5, adv, MASK, 0.2, beta, agg=agg, length_norm=16.0, tis=tis)
    assert torch.allclose(f("sequence"), T([-1.75 + beta * c, 1.0 + beta * c]), atol=1e-6)  # mean per response
    assert torch.allclose(f("token"), sums, atol=1e-6)                   # the loop divides by the 5 tokens
    assert torch.allclose(f("dr_grpo"), sums / 16, atol=1e-6)            # by max_new_tokens
    # TIS weighs the policy-gradient term only: the KL penalty is the same with and without it
    no_pg = lambda t: B.grpo_loss(lp, lp, lp - 0.5, torch.zeros(2), MASK, 0.2, beta, agg="token", tis=t)
    assert torch.allclose(no_pg(tis), no_pg(None))


@pytest.mark.parametrize("agg", ["token", "sequence", "dr_grpo"])
def test_loss_agg_gradient_through_minibatch_updates_is_independent_of_micro_batching(agg):
    """The loop's update with --loss-agg token is one mean over the minibatch's valid tokens, for any
    --micro-batch: the gradient of a hand-written token mean (sequence, dr_grpo: of their own means)."""
    g = torch.Generator().manual_seed(0)
    mask = T([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    feat, base = torch.randn(4, 4, generator=g), -torch.rand(4, 4, generator=g)
    adv, valid, beta = T([1.0, -2.0, 0.5, -0.5]), T([True, True, False, True]), 0.04

    def tokens(theta, rows):  # log pi_theta per token, a function of 4 parameters
        return base[rows] + theta * feat[rows] * 0.1

    def update(micro):
        theta = torch.nn.Parameter(torch.zeros(4))
        model = torch.nn.Module()
        model.theta = theta
        opt = torch.optim.SGD([theta], lr=1.0)
        run = type("Run", (), {"trained": [model], "opt": opt,
                               "sched": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)})()

        def loss_fn(rows):
            lp = tokens(theta, rows)
            loss = B.grpo_loss(lp, base[rows], base[rows] - 0.3, adv[rows], mask[rows], 0.2, beta, agg=agg,
                               length_norm=8.0)
            return torch.where(valid[rows], loss, 0.0).sum(), {}
        used = mask.sum(1) * valid if agg == "token" else None
        cfg = config.Config(max_grad_norm=0.0)
        loop.minibatch_updates(cfg, infra.Dist(), run, 4, 1, micro, loss_fn, epochs=1, used=used)
        return -theta.detach()                                               # SGD, lr 1: the gradient

    theta = torch.zeros(4, requires_grad=True)
    lp = base + theta * feat * 0.1
    d = (base - 0.3) - lp
    tok = -adv[:, None] * (lp - base).exp() + beta * (d.exp() - d - 1)      # ratio 1: inside the clip range
    tok = tok * mask * valid[:, None]
    want = {"token": tok.sum() / (mask.sum(1) * valid).sum(),                # one mean over 3 + 1 + 3 tokens
            "sequence": (tok.sum(1) / mask.sum(1)).sum() / 4, "dr_grpo": (tok.sum(1) / 8.0).sum() / 4}[agg]
    want.backward()
    for micro in (1, 2, 4):
        assert torch.allclose(update(micro), theta.grad, atol=1e-6), micro


def test_trl_options_are_checked():
    def check(**kw):
        cfg = config.Config(**{"algo": "grpo", **kw})
        config.check_config(cfg, 1)
    check(loss_agg="token", scale_rewards="batch", clip_eps_high=0.28, tis_cap=2.0)
    for kw, words in [(dict(loss_agg="bnpo"), "--loss-agg must be one of sequence, token, dr_grpo, or TRL's names "
                                              r"grpo \(= sequence\) and dapo \(= token\), got 'bnpo'"),
                      (dict(scale_rewards="std"), "--scale-rewards must be one of group, batch, none"),
                      (dict(algo="rloo", loss_agg="token"), "--loss-agg token is read by --algo grpo only; --algo "
                                                            "rloo does not use it"),
                      (dict(algo="dar", scale_rewards="none"), "--scale-rewards none is read by --algo grpo only"),
                      (dict(clip_eps_high=-0.1), "--clip-eps-high must be >= 0"),
                      (dict(algo="dpo", clip_eps_high=0.28), "--algo ppo, dual_ppo, dual_ppo_clip, dual_mix_ppo, "
                                                             "grpo, rloo, dao only; --algo dpo does not use it"),
                      (dict(tis_cap=0.5), "--tis-cap must be >= 1"),
                      (dict(algo="rloo", tis_cap=2.0), "--tis-cap 2.0 is read by --algo grpo, ppo, dual_ppo, "
                                                       "dual_ppo_clip, dual_mix_ppo only"),
                      (dict(tis_cap=2.0, logp_source="sampler"), "--tis-cap with --logp-source sampler")]:
        with pytest.raises(SystemExit, match=words):
            check(**kw)


def test_trls_loss_type_names_are_stored_as_ours():
    """--loss-agg dapo is token and grpo is sequence: the config (and so every checkpoint) holds our name, and a
    run started with one name resumes with the other."""
    for trl, ours in (("dapo", "token"), ("grpo", "sequence")):
        cfg = config.parse_config(["--algo", "grpo", "--loss-agg", trl])
        config.check_config(cfg, 1)
        assert cfg.loss_agg == ours
        saved = dataclasses.asdict(config.parse_config(["--algo", "grpo", "--loss-agg", ours]))
        assert saved["loss_agg"] == ours
        config.check_resumable(cfg, saved)
        config.check_resumable(config.parse_config(["--algo", "grpo", "--loss-agg", ours]),
                               dataclasses.asdict(cfg))
    with pytest.raises(SystemExit, match="--loss-agg 'sequence' \\(was 'token'\\)"):
        config.check_resumable(config.parse_config(["--algo", "grpo", "--loss-agg", "grpo"]),
                               dataclasses.asdict(config.parse_config(["--algo", "grpo", "--loss-agg", "dapo"])))
    # an alias is the default (grpo) or an option of --algo grpo (dapo), like the name it stands for
    config.check_config(config.parse_config(["--loss-agg", "grpo"]), 1)
    with pytest.raises(SystemExit, match="--loss-agg token is read by --algo grpo only; --algo dar does not use it"):
        config.check_config(config.parse_config(["--loss-agg", "dapo"]), 1)


def test_a_checkpoint_from_before_the_trl_options_resumes_only_with_their_defaults():
    saved = {k: v for k, v in dataclasses.asdict(config.Config(algo="grpo")).items()
             if k not in ("loss_agg", "scale_rewards", "clip_eps_high", "tis_cap")}
    config.check_resumable(config.Config(algo="grpo", resume=True), saved)
    with pytest.raises(SystemExit, match="--loss-agg 'token' \\(was 'sequence'\\)"):
        config.check_resumable(config.Config(algo="grpo", loss_agg="token"), saved)


@pytest.mark.slow
def test_grpo_with_trl_options_trains_and_logs_the_tis_weights(toy_cache, tmp_path):
    cfg = config.parse_config(TINY + ["--algo", "grpo", "--steps", "2", "--cache-dir", toy_cache, "--out-dir",
                                      str(tmp_path), "--print-every", "1000", "--eval-prompts", "0",
                                      "--loss-agg", "token", "--scale-rewards", "batch", "--clip-eps-high", "0.28",
                                      "--tis-cap", "2"])
    config.check_config(cfg, 1)
    train(cfg)
    lines = read_metrics(tmp_path)
    assert len(lines) == 2
    for l in lines:
        assert math.isfinite(l["train/loss"]) and l["train/grad_norm"] > 0
        # generate recorded its log-probs for the correction: the same model, so the ratios are ~1
        assert 0 < l["train/tis_weight_mean"] <= 2 and l["train/tis_weight_mean"] == pytest.approx(1, abs=1e-2)
        assert l["train/tis_clip_frac"] == 0 and "rollout/logp_abs_diff" in l


# ---------------------------------------------------------------------------------------------------
# Filtered SFT and direct alignment
# ---------------------------------------------------------------------------------------------------
def test_best_of_k_and_reward_pairs_handle_ties_and_invalid_judgments():
    r = T([1.0, 7.0, 3.0, math.nan, 4.0, 4.0, math.nan, math.nan, math.nan], dtype=torch.float64)
    best, has = B.best_of_k(r, 3)
    assert best.tolist() == [1, 4, 6] and has.tolist() == [True, True, False]
    first, second, p = B.reward_pairs(r, 3)
    assert first[0].item() == 1 and second[0].item() == 0
    assert p[:2].tolist() == [1.0, 0.5] and math.isnan(p[2])        # a tie; fewer than 2 valid: invalid
    chosen, rejected, used = B.label_pairs(first, second, p)
    assert chosen[0].item() == 1 and rejected[0].item() == 0 and used.tolist() == [True, False, False]


W, L, RW, RL = T([-2.0]), T([-3.0]), T([-2.5]), T([-2.0])     # h = (-2 + 2.5) - (-3 + 2) = 1.5


def test_dpo_ipo_slic_losses_by_hand():
    h = 1.5
    assert B.dpo_loss(W, L, RW, RL, 0.1).item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-6)
    assert B.ipo_loss(W, L, RW, RL, 1.0).item() == pytest.approx((h - 0.5) ** 2, abs=1e-6)
    assert B.slic_loss(W, L, RW, RL, 0.002).item() == pytest.approx(1 - 0.002 * h, abs=1e-6)
    assert B.slic_loss(W, L, RW, RL, 1.0).item() == 0.0                       # margin met: no loss
    # gradients w.r.t. log pi(y_w): -beta sigma(-beta h), 2 (h - 1/(2 tau)), -beta
    assert grad_of(lambda x: B.dpo_loss(x, L, RW, RL, 0.1), W).item() == pytest.approx(
        -0.1 / (1 + math.exp(0.15)), abs=1e-6)
    assert grad_of(lambda x: B.ipo_loss(x, L, RW, RL, 1.0), W).item() == pytest.approx(2 * (h - 0.5), abs=1e-6)
    assert grad_of(lambda x: B.slic_loss(x, L, RW, RL, 0.002), W).item() == pytest.approx(-0.002, abs=1e-7)
    assert grad_of(lambda x: B.dpo_loss(W, x, RW, RL, 0.1), L).item() == pytest.approx(
        0.1 / (1 + math.exp(0.15)), abs=1e-6)


def test_simpo_loss_is_length_normalised_and_reference_free():
    beta, gamma = 2.0, 1.6
    z = beta * -2.0 / 4 - beta * -3.0 / 2 - gamma
    loss = B.simpo_loss(W, L, T([4.0]), T([2.0]), beta, gamma)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-z)), abs=1e-6)
    assert grad_of(lambda x: B.simpo_loss(x, L, T([4.0]), T([2.0]), beta, gamma), W).item() == pytest.approx(
        -(beta / 4) / (1 + math.exp(z)), abs=1e-6)


def test_is_dpo_weights_are_the_clipped_detached_pair_ratio():
    rho = math.exp((-2.0 - 3.0) - (-2.5 - 2.0))                                # exp(-0.5)
    assert B.is_weights(W, L, RW, RL, clip=10.0).item() == pytest.approx(rho, rel=1e-6)
    assert B.is_weights(W + 2, L, RW, RL, clip=1.0).item() == pytest.approx(1.0)   # clipped from above
    w = W.clone().requires_grad_(True)
    loss = B.is_dpo_loss(w, L, RW, RL, 0.1, clip=10.0)
    assert loss.item() == pytest.approx(rho * B.dpo_loss(W, L, RW, RL, 0.1).item(), rel=1e-6)
    loss.backward()   # the ratio is a constant: the gradient is rho times DPO's
    assert w.grad.item() == pytest.approx(rho * -0.1 / (1 + math.exp(0.15)), rel=1e-5)


def tabular_is_dpo(clip, beta=0.1, n=6, seed=0):
    """Exact expectations on one prompt with n responses (float64): pi_theta and pi_0 are softmaxes of random
    logits, each ordered pair (y1, y2) is labelled by a random reward (y_w the higher). Returns (online DPO loss
    E_{pairs ~ pi_theta}[dpo_loss], IS-DPO's E_{pairs ~ pi_0}[is_dpo_loss with `clip`], their gradients in the
    logits, the unclipped ratios) by enumeration. The pair distribution is not differentiated (online DPO
    samples, then takes the gradient of the loss)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, generator=g, dtype=torch.float64).requires_grad_()
    logp_0, r = torch.randn(n, generator=g, dtype=torch.float64).log_softmax(0), torch.randn(n, generator=g)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    i, j = i[i != j], j[i != j]
    w, l = torch.where(r[i] > r[j], i, j), torch.where(r[i] > r[j], j, i)
    logp = theta.log_softmax(0)
    online = ((logp[w] + logp[l]).exp().detach() * B.dpo_loss(logp[w], logp[l], logp_0[w], logp_0[l], beta)).sum()
    is_est = ((logp_0[w] + logp_0[l]).exp() * B.is_dpo_loss(logp[w], logp[l], logp_0[w], logp_0[l], beta, clip)).sum()
    grads = [torch.autograd.grad(x, theta, retain_graph=True)[0] for x in (online, is_est)]
    return online.item(), is_est.item(), *grads, B.is_weights(logp[w], logp[l], logp_0[w], logp_0[l], math.inf)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_is_dpo_with_the_default_clip_is_unbiased_for_online_dpo(seed):
    """IS-DPO appendix, Theorem 1: pairs from pi_0 weighted by rho = pi_theta(y_w) pi_theta(y_l) / (pi_0(y_w)
    pi_0(y_l)) give online DPO's loss and gradient exactly, in expectation, when rho is not clipped; the run's
    default --is-clip must be that estimator."""
    clip = config.parse_config(["--algo", "is_dpo"]).is_clip
    online, is_est, g_online, g_is, rho = tabular_is_dpo(clip, seed=seed)
    assert (rho > 1).any()                                       # pi_theta has moved away from pi_0
    assert is_est == pytest.approx(online, rel=1e-10)
    assert torch.allclose(g_is, g_online, rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_is_dpo_with_a_clip_below_the_ratios_is_biased_low(seed):
    """A clip from above that some ratio exceeds removes weight: the estimate lies below the online loss and
    its gradient is another vector. A clip above every ratio changes nothing."""
    online, clipped, g_online, g_clipped, rho = tabular_is_dpo(1.0, seed=seed)
    assert clipped < online and (online - clipped) / online > 0.05
    assert not torch.allclose(g_clipped, g_online, rtol=1e-3)
    _, above, _, g_above, _ = tabular_is_dpo(rho.max().item() * 1.01, seed=seed)
    assert above == pytest.approx(online, rel=1e-10) and torch.allclose(g_above, g_online, rtol=1e-8, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# Every algorithm through the real loop
# ---------------------------------------------------------------------------------------------------
def params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("algo", config.ALGOS)
def test_every_algorithm_trains_on_the_toy_task(algo, toy_cache, tmp_path):
    out = tmp_path / algo
    cfg = config.parse_config(TINY + ["--algo", algo, "--steps", "3", "--cache-dir", toy_cache, "--out-dir", str(out),
                                      "--print-every", "1000", "--save-every", "2"])
    assert cfg.beta == config.ALGO_DEFAULTS.get(algo, {}).get("beta", config.Config.beta)   # the paper's default
    base, sft = loop.toy_paths(cfg)
    start = params(infra.load_model(base if algo == "sft" else os.path.join(sft, "final"), cfg, torch.device("cpu")))
    run = train(cfg)
    assert not torch.allclose(params(run.policy), start)                       # the policy moved
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert all(math.isfinite(l["train/loss"]) and math.isfinite(l["train/grad_norm"]) for l in lines)
    if algo not in config.OFFLINE:  # every online algorithm logs pi_t's entropy on its samples
        assert all(0 < l["train/entropy"] < math.log(run.policy.config.vocab_size) for l in lines)
    assert os.path.isfile(out / "final" / "config.json")
    ckpt = out / open(out / "latest").read().strip()
    assert (ckpt / "value" / "config.json").is_file() == (algo in config.VALUE_MODEL)
    if run.ref is not None:
        assert torch.allclose(params(run.ref), start)                         # pi_0 stays frozen


@pytest.mark.slow
def test_ppo_resumes_with_its_value_model_to_the_same_metrics(toy_cache, tmp_path):
    def go(out, steps, resume=False):
        cfg = config.parse_config(TINY + ["--algo", "ppo", "--steps", str(steps), "--cache-dir", toy_cache,
                                          "--out-dir", str(out), "--print-every", "1000", "--save-every", "1"]
                                  + (["--resume"] if resume else []))
        return train(cfg)
    go(tmp_path / "a", 2)
    go(tmp_path / "b", 1)
    run = go(tmp_path / "b", 2, resume=True)
    assert comparable(read_metrics(tmp_path / "a")) == comparable(read_metrics(tmp_path / "b"))
    assert run.value is not None


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo", "iter_sft", "online_dpo", "dpo",   # one per step function
                                  "grpo --loss-agg token --scale-rewards batch --tis-cap 2"])  # token counts of 2 ranks
def test_baselines_run_under_torchrun_with_identical_replicas(algo, toy_cache, tmp_path):
    algo, *extra = algo.split()
    p = run_dar(TINY + ["--algo", algo, "--cache-dir", toy_cache, "--out-dir", str(tmp_path / algo), "--steps", "2"]
                + extra, cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    # the policy, and PPO's value model too
    assert p.stdout.count("parameters identical on all 2 ranks") == (2 if algo == "ppo" else 1)
    assert "win rate of the policy over pi_0" in p.stdout
