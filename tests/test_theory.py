"""The paper's theory, checked numerically on small discrete distributions with this project's own loss.

Every test draws random policies over a finite response set Y, small enough to enumerate, so that
expectations, KL divergences and partition functions are exact sums. Two kinds of response set:
    single-token responses  Y = {0..V-1}, V in {5, 8, 50}: one logits table, pi(y) = softmax(table)[y]
    multi-token sequences   Y = {0,1,2}^3 (27 sequences): a tabular autoregressive model, one logits
                            table per prefix, log pi(y) = sum_i log pi(y_i | y_<i)
Notation follows the paper: pi_0 (initial/reference policy), pi_t (current policy, the sampler),
A(y) = r(y) - E_{pi_t}[r] (advantage; one prompt x, left implicit), alpha, beta (Eq. 3).

Claims checked (section / equation of the paper):
  1. Proposition 4.1 (Sec. 4.2, App. A.1): the dual-KL penalty is one KL to the log-space interpolation,
     alpha KL(pi||pi_0) + (1-alpha) KL(pi||pi_t) = KL(pi || pi_0^alpha pi_t^(1-alpha) / C) - log C.
  2. Theorem 4.2 (Sec. 4.3, App. A.2): pi* = pi_0^alpha pi_t^(1-alpha) exp(A/beta) / Z maximises Eq. 3;
     indeed J(pi) = beta log Z - beta KL(pi || pi*) for every pi.
  3. Eq. 4 (App. A.3): minimising dar.dar_loss (no clipping, no normalisation) over a tabular policy
     recovers pi*: exactly with exact expectations under pi_t, within Monte-Carlo error with samples.
  4. Iterating the DAR update with a fixed reward converges to pi_0 exp(r / (alpha beta)) / Z, with the
     log-space deviation shrinking by exactly (1 - alpha) per iteration: the effective reference
     strength at the fixed point is alpha * beta, not beta.
  5. Weight clipping (Sec. 4.3 "Practical Implementation"): the clipped minimiser is the policy
     proportional to pi_t min(w, w_clip); each clipped step moves toward the target, never farther than
     the unclipped step, and the clipped iteration lags the unclipped one at every iteration. It stalls
     (never moves) when every weight is clipped, which requires w_clip < 1.
  6. DAO (App. A.4, baselines.dao_loss): the REINFORCE-style gradient is the exact gradient of Eq. 3.
  7. Dual-PPO (App. B.3, baselines.dual_ppo_rewards): the shaped per-token reward sums to the sequence-level
     dual-KL penalty, and its expected return is Eq. 3; Dual-Mix-PPO's (Eq. 9) is a per-token forward KL.
  8. The k3 estimator used for evaluation (loop.k3) is unbiased for KL(pi || pi_ref), also for sequences
     (per-token k3 summed over tokens), and non-negative per sample, unlike log(pi/pi_ref).
  9. IS-DPO (IS-DPO appendix, Theorem 1; baselines.is_dpo_loss): importance weighting makes the loss on
     pi_ref's pairs an unbiased estimate of online DPO, and the weighted squared loss has the gradient of
     KL(pi_theta || pi_ref) (with the constant the appendix drops).
 10. One temperature (rollout.py, loop.logp_temperature): responses are sampled at T, so the losses must see
     pi at T. With zero advantages the DAR iteration then stays at pi_0; with log-probs at 1 and samples at
     T = 0.9 its target is pi_0^alpha pi_t^(1/T - alpha), an exponent above 1 at alpha 0.1, and it drifts.

Everything is float64; dar_weights and k3 return float32, which bounds the agreement with the float64
closed forms to about 1e-6 relative, far below the gaps that a wrong sign, a dropped alpha or a swapped
KL direction produce (each test checks that such a wrong variant is far off).
"""
import math

import pytest
import torch

from baselines import dao_loss, dpo_loss, dual_mix_ppo_rewards, dual_ppo_rewards, ipo_loss, is_dpo_loss, is_weights
from dar import dar_loss, dar_weights, weighted_sft_loss
import config
import rollout
from loop import k3, logp_temperature

DT = torch.float64
SEEDS = [0, 1, 2]


# ---------------------------------------------------------------------------------------------------
# Response sets and tabular policies
# ---------------------------------------------------------------------------------------------------
class Tabular:
    """All responses y = (y_1..y_L) over a vocabulary of V tokens, and a tabular autoregressive policy.

    The policy's parameters are one logits row per prefix y_<i (1 + V + ... + V^(L-1) rows of V logits):
    pi(y_i | y_<i) = softmax(table[prefix id of y_<i])[y_i]. With L = 1 this is a single softmax over V
    outcomes. The family contains every distribution over Y with full support.
    """

    def __init__(self, vocab, length):
        self.V, self.L = vocab, length
        grids = torch.meshgrid(*[torch.arange(vocab)] * length, indexing="ij")
        self.Y = torch.stack([g.reshape(-1) for g in grids], 1)              # all responses  [|Y|, L]
        prefix, offset = [], 0
        for i in range(length):                      # prefix y_<i as a base-V number, offset by its length
            digits = vocab ** torch.arange(i - 1, -1, -1)                        # [i]
            prefix.append(offset + (self.Y[:, :i] * digits).sum(1))
            offset += vocab ** i
        self.prefix = torch.stack(prefix, 1)                          # prefix id of each token  [|Y|, L]
        self.n_prefix = offset

    @property
    def size(self):
        return self.Y.shape[0]

    def token_logp(self, table):
        """log pi(y_i | y_<i) for every response and position: [|Y|, L]. table: [n_prefix, V]."""
        return table.log_softmax(-1)[self.prefix, self.Y]

    def seq_logp(self, table):
        """log pi(y) = sum_i log pi(y_i | y_<i): [|Y|]."""
        return self.token_logp(table).sum(1)

    def random_table(self, gen, scale=1.0):
        return torch.randn(self.n_prefix, self.V, generator=gen, dtype=DT) * scale   # [n_prefix, V]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add latency (on a busy 2-core machine a 13x3
    log_softmax took 8 ms with 2 threads, 2 us with 1). Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SPACES = {"V5": Tabular(5, 1), "V50": Tabular(50, 1), "V3xL3": Tabular(3, 3)}
space_params = pytest.mark.parametrize("space", list(SPACES.values()), ids=list(SPACES))


def random_problem(space, seed, scale=1.0):
    """Random pi_0, pi_t (as tables and log-probs [|Y|]) and a random sequence-level reward r [|Y|]."""
    g = torch.Generator().manual_seed(seed)
    table_0, table_t = space.random_table(g, scale), space.random_table(g, scale)
    r = torch.randn(space.size, generator=g, dtype=DT)
    return dict(table_0=table_0, table_t=table_t, logp_0=space.seq_logp(table_0),
                logp_t=space.seq_logp(table_t), r=r, gen=g)


# ---------------------------------------------------------------------------------------------------
# Exact quantities on the enumerated support (all arguments are log-probabilities over Y, shape [|Y|])
# ---------------------------------------------------------------------------------------------------
def kl(logp, logq):
    """KL(p || q) = sum_y p(y) (log p(y) - log q(y))."""
    return (logp.exp() * (logp - logq)).sum()


def tv(logp, logq):
    """Total variation distance (1/2) sum_y |p(y) - q(y)|."""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum()


def advantage(r, logp_t):
    """A(y) = r(y) - V^{pi_t}, V^{pi_t} = E_{y~pi_t}[r(y)] (exact baseline; App. A.2)."""
    return r - (logp_t.exp() * r).sum()


def dual_kl_objective(logpi, A, logp_0, logp_t, alpha, beta):
    """J(pi) = E_pi[A] - beta (alpha KL(pi||pi_0) + (1 - alpha) KL(pi||pi_t))   (Eq. 3)."""
    return (logpi.exp() * A).sum() - beta * (alpha * kl(logpi, logp_0) + (1 - alpha) * kl(logpi, logp_t))


def log_pi_star(logp_0, logp_t, A, alpha, beta):
    """log pi* = alpha log pi_0 + (1 - alpha) log pi_t + A / beta - log Z   (Theorem 4.2, Eq. 6)."""
    return (alpha * logp_0 + (1 - alpha) * logp_t + A / beta).log_softmax(0)


def log_fixed_point(logp_0, r, alpha, beta):
    """log pi_inf = log pi_0 + r / (alpha beta) - log Z: the limit of the DAR iteration (claim 4)."""
    return (logp_0 + r / (alpha * beta)).log_softmax(0)


def logit_gradient(objective, logpi):
    """d objective(softmax(z)) / dz at z = log pi: the gradient on the simplex through softmax logits,
    pi (g - E_pi[g]) with g = d objective / d pi. Zero exactly at stationary points. [|Y|]"""
    z = logpi.clone().requires_grad_()
    objective(z.log_softmax(0)).backward()
    return z.grad


def centred(d):
    """d - mean_y d(y): a log-space deviation (defined up to a constant by normalisation) made unique."""
    return d - d.mean()


def log_dar_weight(logp_0, logp_t, A, alpha, beta):
    """log w = alpha (log pi_0 - log pi_t) + A / beta: the unclipped Eq. 4 weight, in float64."""
    return alpha * (logp_0 - logp_t) + A / beta


# ---------------------------------------------------------------------------------------------------
# Minimising the project's loss over a tabular policy
# ---------------------------------------------------------------------------------------------------
def fit_tabular(loss_fn, space, init=None, tol=1e-11):
    """argmin over tables of loss_fn(log pi_theta(y) [|Y|]); returns (log pi_theta [|Y|], table).

    Damped Newton (Levenberg-Marquardt, steps capped at 2 nats per logit) on the free logits, the last
    logit of each row fixed at 0 (the softmax is shift-invariant; this removes the flat direction). The
    DAR loss is a positive-weighted cross-entropy, convex in the logits, so this converges quadratically
    where first-order methods crawl (pi* often has entries of 1e-6); the cap keeps non-convex losses
    (-J of Eq. 3) from jumping onto the flat region near a vertex of the simplex.
    init: a starting table [n_prefix, V] (default: uniform), e.g. pi_t's, as the training loop starts
    pi_theta at pi_t. Fails the test if the gradient does not vanish.
    """
    P, V = space.n_prefix, space.V
    table0 = torch.zeros(P, V, dtype=DT) if init is None else init - init[:, -1:]
    x = table0[:, :-1].reshape(-1).clone()                                         # free logits  [P*(V-1)]
    as_table = lambda x: torch.cat([x.view(P, V - 1), torch.zeros(P, 1, dtype=DT)], 1)  # noqa: E731
    f = lambda x: loss_fn(space.seq_logp(as_table(x)))                           # noqa: E731
    eye = torch.eye(len(x), dtype=DT)
    damping = 1e-3
    for _ in range(200):
        x = x.detach().requires_grad_()
        loss = f(x)
        (grad,) = torch.autograd.grad(loss, x)
        if grad.abs().max() < tol:
            break
        hess = torch.func.jacrev(torch.func.jacrev(f))(x.detach())    # [n, n]
        while damping < 1e12:                           # shrink the step until the loss decreases
            step = torch.linalg.solve(hess + damping * eye, -grad)
            step = step * min(1.0, 2.0 / step.abs().max().item())   # trust region: |logit change| <= 2
            if step @ grad < 0 and f(x.detach() + step) < loss:
                x, damping = x.detach() + step, max(damping / 10, 1e-12)
                break
            damping *= 10
        else:
            break                                       # no decrease possible: at the numerical optimum
    x = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(f(x), x)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-7, f"fit did not converge: {grad.abs().max()}"
    table = as_table(x.detach())
    return space.seq_logp(table), table


def exact_dar_loss(logp_t, logp_0, A, alpha, beta, w_clip=None):
    """theta -> E_{y~pi_t}[L_DAR(y)] = sum_y pi_t(y) dar_loss(y), the exact expectation of Eq. 4 over Y.

    dar_loss gives one term per response, -w(y) log pi_theta(y); no advantage normalisation, clipping
    only if w_clip is given.
    """
    def loss_fn(logp):                                                           # logp: [|Y|]
        per_seq, _ = dar_loss(logp, logp_t, logp_0, A, alpha=alpha, beta=beta, w_clip=w_clip, normalize=False)
        return (logp_t.exp() * per_seq).sum()
    return loss_fn


def fit_dar_step(space, logp_0, table_t, r, alpha, beta, w_clip=None):
    """One DAR iteration, pi_{t+1} = argmin_theta E_{pi_t}[dar_loss], fitted from pi_t: (log pi, table)."""
    logp_t = space.seq_logp(table_t)
    A = advantage(r, logp_t)
    return fit_tabular(exact_dar_loss(logp_t, logp_0, A, alpha, beta, w_clip), space, init=table_t)


def closed_form_step(logp_0, logp_t, r, alpha, beta, w_clip=None):
    """The minimiser of the exact (clipped) Eq. 4 loss: pi_{t+1} proportional to pi_t min(w, w_clip).

    Unclipped this is pi* = pi_0^alpha pi_t^(1-alpha) exp(A/beta) / Z (Theorem 4.2): a positive-weighted
    cross-entropy -sum_y pi_t w log pi_theta is minimised by the normalised weights pi_t w (Gibbs).
    """
    log_w = log_dar_weight(logp_0, logp_t, advantage(r, logp_t), alpha, beta)
    if w_clip is not None:
        log_w = log_w.clamp(max=math.log(w_clip))
    return (logp_t + log_w).log_softmax(0)


# ---------------------------------------------------------------------------------------------------
# 1. Proposition 4.1
# ---------------------------------------------------------------------------------------------------
@space_params
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_proposition_4_1_dual_kl_is_one_kl_to_the_log_interpolation(space, seed, alpha):
    """Prop. 4.1 (Sec. 4.2, App. A.1, Eq. 5): for every pi_theta,
        alpha KL(pi_theta||pi_0) + (1-alpha) KL(pi_theta||pi_t) = KL(pi_theta || pi_ref) - log C,
        pi_ref = pi_0^alpha pi_t^(1-alpha) / C,  C = sum_y pi_0^alpha pi_t^(1-alpha)  (<= 1, Hoelder).
    The -log C term is a constant in pi_theta, which is why the two objectives have the same maximiser.
    """
    p = random_problem(space, seed)
    logp_0, logp_t = p["logp_0"], p["logp_t"]
    log_C = torch.logsumexp(alpha * logp_0 + (1 - alpha) * logp_t, 0)
    log_ref = alpha * logp_0 + (1 - alpha) * logp_t - log_C                       # [|Y|]
    assert log_C < -1e-3                                       # pi_0 != pi_t, so C < 1 strictly
    forward_gaps = []
    for _ in range(10):
        logpi = space.seq_logp(space.random_table(p["gen"], 2.0))
        dual = alpha * kl(logpi, logp_0) + (1 - alpha) * kl(logpi, logp_t)
        assert dual.item() == pytest.approx((kl(logpi, log_ref) - log_C).item(), abs=1e-12)
        assert abs(dual - kl(logpi, log_ref)) > 1e-3              # wrong: without the -log C term
        forward = alpha * kl(logp_0, logpi) + (1 - alpha) * kl(logp_t, logpi)
        forward_gaps.append(abs(forward - (kl(logpi, log_ref) - log_C)).item())
    assert max(forward_gaps) > 0.05                               # wrong: the KLs in forward direction


# ---------------------------------------------------------------------------------------------------
# 2. Theorem 4.2
# ---------------------------------------------------------------------------------------------------
@space_params
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha,beta", [(0.1, 0.5), (0.3, 2.0)])
def test_theorem_4_2_pi_star_maximises_the_dual_kl_objective(space, seed, alpha, beta):
    """Theorem 4.2 (Sec. 4.3, App. A.2, Eqs. 6-8): pi* = pi_0^alpha pi_t^(1-alpha) exp(A/beta) / Z maximises
    J(pi) = E_pi[A] - beta (alpha KL(pi||pi_0) + (1-alpha) KL(pi||pi_t))  (Eq. 3). Eq. 7-8 say more:
        J(pi) = beta log Z - beta KL(pi || pi*)   for every pi,
    so J(pi*) = beta log Z and J(pi) < J(pi*) for pi != pi*. Checked on random policies of every
    temperature, and against pi* with alpha dropped (pi_t exp(A/beta)) and with alpha and 1-alpha swapped.
    """
    p = random_problem(space, seed)
    logp_0, logp_t = p["logp_0"], p["logp_t"]
    A = advantage(p["r"], logp_t)
    star = log_pi_star(logp_0, logp_t, A, alpha, beta)
    log_Z = torch.logsumexp(alpha * logp_0 + (1 - alpha) * logp_t + A / beta, 0)
    J = lambda logpi: dual_kl_objective(logpi, A, logp_0, logp_t, alpha, beta)  # noqa: E731

    assert J(star).item() == pytest.approx(beta * log_Z.item(), abs=1e-10)
    for scale in [0.1, 0.5, 1.0, 3.0] * 10:                                       # 40 random policies
        logpi = space.seq_logp(space.random_table(p["gen"], scale))
        assert J(logpi).item() == pytest.approx((beta * (log_Z - kl(logpi, star))).item(), abs=1e-10)
        assert J(logpi) < J(star)
    no_alpha = (logp_t + A / beta).log_softmax(0)
    swapped = ((1 - alpha) * logp_0 + alpha * logp_t + A / beta).log_softmax(0)
    assert J(no_alpha) < J(star) - 1e-3 * beta and J(swapped) < J(star) - 1e-3 * beta


@space_params
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha,beta", [(0.1, 0.5), (0.3, 2.0)])
def test_theorem_4_2_maximising_over_softmax_logits_finds_pi_star(space, seed, alpha, beta):
    """Theorem 4.2: pi* is the stationary point of Eq. 3 on the simplex. Maximising J numerically over
    softmax logits (one logit per response, from uniform; damped Newton ascent, fit_tabular) converges to
    pi*, and at pi* the gradient of J with respect to the logits, pi (dJ/dpi - E_pi[dJ/dpi]), vanishes; at
    the alpha-dropped candidate pi_t exp(A/beta) / Z it does not.
    """
    p = random_problem(space, seed)
    logp_0, logp_t = p["logp_0"], p["logp_t"]
    A = advantage(p["r"], logp_t)
    star = log_pi_star(logp_0, logp_t, A, alpha, beta)
    flat = Tabular(space.size, 1)                              # any distribution over Y: one softmax
    J = lambda logpi: dual_kl_objective(logpi, A, logp_0, logp_t, alpha, beta)  # noqa: E731

    found, _ = fit_tabular(lambda logpi: -J(logpi), flat)
    assert tv(found, star) < 1e-6
    assert logit_gradient(J, star).abs().max() < 1e-10
    assert logit_gradient(J, (logp_t + A / beta).log_softmax(0)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------
# 3. Eq. 4: the project's dar_loss projects onto pi*
# ---------------------------------------------------------------------------------------------------
@space_params
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha,beta", [(0.1, 0.5), (0.3, 2.0)])
def test_eq4_exact_dar_loss_minimiser_is_pi_star(space, seed, alpha, beta):
    """Eq. 4 / App. A.3: argmin_theta -E_{y~pi_t}[(pi_0/pi_t)^alpha exp(A/beta) log pi_theta(y)]
    = argmin_theta KL(pi* || pi_theta) = pi* for a family containing pi* (here: tabular autoregressive).
    The loss is dar.dar_loss (w_clip=None, normalize=False) averaged exactly under pi_t. Minimisers of the
    wrong variants (alpha dropped: pi_t exp(A/beta); alpha's sign flipped) are far from pi*.
    """
    p = random_problem(space, seed)
    logp_0, logp_t = p["logp_0"], p["logp_t"]
    A = advantage(p["r"], logp_t)
    star = log_pi_star(logp_0, logp_t, A, alpha, beta)

    fitted, _ = fit_tabular(exact_dar_loss(logp_t, logp_0, A, alpha, beta), space)
    assert tv(fitted, star) < 1e-6
    assert kl(star, fitted) < 1e-9
    assert tv((logp_t + A / beta).log_softmax(0), star) > 1e-2                    # alpha dropped
    assert tv((logp_t - alpha * (logp_0 - logp_t) + A / beta).log_softmax(0), star) > 1e-2  # sign flipped


def mc_standard_errors(logp_t, log_w, log_star, n):
    """Delta-method standard error of the weighted-count estimate of pi*(y) from n samples of pi_t: [|Y|].

    The MC minimiser is pi_hat(y) = sum_i w_i 1[y_i = y] / sum_i w_i, and
    pi_hat(y) - pi*(y) ~ mean_i w_i (1[y_i = y] - pi*(y)) / E[w], a mean of zero-mean i.i.d. terms.
    """
    pt, w, star = logp_t.exp(), log_w.exp(), log_star.exp()
    onehot = torch.eye(len(pt), dtype=DT)                                         # [|Y|(y'), |Y|(y)]
    var = (pt[:, None] * w[:, None] ** 2 * (onehot - star[None, :]) ** 2).sum(0)  # [|Y|]
    return var.sqrt() / (math.sqrt(n) * (pt * w).sum())


@pytest.mark.parametrize("space", [Tabular(8, 1), Tabular(3, 3)], ids=["V8", "V3xL3"])
@pytest.mark.parametrize("seed", SEEDS)
def test_eq4_monte_carlo_dar_loss_minimiser_approaches_pi_star(space, seed):
    """Eq. 4 with samples y_i ~ pi_t, the form the algorithm uses: the minimiser of
    (1/N) sum_i dar_loss(y_i) over a tabular policy is the weighted empirical distribution
    pi_hat(y) = sum_i w_i 1[y_i = y] / sum_i w_i, a consistent estimate of pi*: every |pi_hat(y) - pi*(y)| is
    within 5 delta-method standard errors (which shrink like 1/sqrt(N)), and the TV error falls with N.
    """
    alpha, beta = 0.3, 2.0
    p = random_problem(space, seed, scale=0.5)
    logp_0, logp_t, g = p["logp_0"], p["logp_t"], p["gen"]
    A = advantage(p["r"], logp_t)
    star = log_pi_star(logp_0, logp_t, A, alpha, beta)
    log_w = log_dar_weight(logp_0, logp_t, A, alpha, beta)                         # [|Y|]

    errors = {}
    for n in (1_000, 100_000):
        idx = torch.multinomial(logp_t.exp(), n, replacement=True, generator=g)   # y_i ~ pi_t   [n]
        assert len(idx.unique()) == space.size           # every y seen: the minimiser has finite logits

        def loss_fn(logp):
            per_seq, _ = dar_loss(logp[idx], logp_t[idx], logp_0[idx], A[idx], alpha=alpha, beta=beta,
                                  w_clip=None, normalize=False)
            return per_seq.mean()
        fitted, _ = fit_tabular(loss_fn, space)
        counts = torch.zeros(space.size, dtype=DT).index_add_(0, idx, log_w[idx].exp())
        assert tv(fitted, (counts / counts.sum()).log()) < 1e-6       # the closed-form MC minimiser
        z = (fitted.exp() - star.exp()).abs() / mc_standard_errors(logp_t, log_w, star, n)
        assert z.max() < 5, f"N={n}: largest error is {z.max():.1f} standard errors"
        errors[n] = tv(fitted, star).item()
    assert errors[100_000] < errors[1_000] / 3                                    # expected ratio 10


# ---------------------------------------------------------------------------------------------------
# 4. The fixed point of the DAR iteration
# ---------------------------------------------------------------------------------------------------
@space_params
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha,beta", [(0.2, 2.0), (0.6, 0.5)])
def test_dar_iteration_converges_to_pi_0_exp_r_over_alpha_beta(space, seed, alpha, beta):
    """Iterating pi_{t+1} = argmin E_{pi_t}[dar_loss] = pi* (Theorem 4.2 + Eq. 4) with a fixed reward r.

    Derivation. A_t(y) = r(y) - V^{pi_t} and the baseline V^{pi_t} is constant in y, so it drops out of
    the normalisation: log pi_{t+1} = alpha log pi_0 + (1-alpha) log pi_t + r/beta + const_t.
    A fixed point satisfies alpha log pi = alpha log pi_0 + r/beta + const, i.e.
        pi_inf = pi_0 exp(r / (alpha beta)) / Z,
    the optimum of the single-KL RLHF objective (Eq. 1) E_pi[r] - (alpha beta) KL(pi||pi_0): the
    effective reference strength at the fixed point is alpha*beta, not beta. With
    delta_t = log pi_t - log pi_inf (centred over Y, since it is defined up to a constant),
        delta_{t+1} = (1 - alpha) delta_t   exactly,
    so the iteration contracts geometrically at rate (1 - alpha) per step from any full-support pi_t.

    The first 3 iterations minimise the project's dar_loss (exact expectation, tabular policy, started at
    pi_t) and must agree with the closed-form update; the remaining ones use the closed form.
    """
    p = random_problem(space, seed)
    logp_0, r = p["logp_0"], p["r"]
    target = log_fixed_point(logp_0, r, alpha, beta)

    table, logp = p["table_0"], logp_0                        # Algorithm 1 starts at pi_t = pi_0
    for _ in range(3):
        fitted, table = fit_dar_step(space, logp_0, table, r, alpha, beta)
        closed = closed_form_step(logp_0, logp, r, alpha, beta)
        assert tv(fitted, closed) < 1e-6
        ratio = centred(fitted - target).norm() / centred(logp - target).norm()
        assert ratio.item() == pytest.approx(1 - alpha, abs=1e-3)   # fit error on tiny pi entries
        logp = fitted
    for _ in range(150):                                       # (1 - alpha)^150 < 1e-14
        new = closed_form_step(logp_0, logp, r, alpha, beta)
        assert torch.allclose(centred(new - target), (1 - alpha) * centred(logp - target), atol=1e-9)
        logp = new
    assert tv(logp, target) < 1e-9 and kl(target, logp) < 1e-12
    # the limit is not pi_0 exp(r / beta), what "beta is the reference strength" would suggest
    assert tv(logp, (logp_0 + r / beta).log_softmax(0)) > 1e-2
    # it is the stationary point of Eq. 1, E_pi[r] - beta_1 KL(pi||pi_0) (Eq. 3 with alpha = 1),
    # for beta_1 = alpha beta, and not for beta_1 = beta
    rlhf = lambda beta_1: lambda logpi: dual_kl_objective(logpi, r, logp_0, logp_0, 1.0, beta_1)  # noqa: E731
    assert logit_gradient(rlhf(alpha * beta), target).abs().max() < 1e-10
    assert logit_gradient(rlhf(beta), target).abs().max() > 1e-3
    # and it does not depend on where the iteration starts
    logp = space.seq_logp(space.random_table(p["gen"], 2.0))
    for _ in range(150):
        logp = closed_form_step(logp_0, logp, r, alpha, beta)
    assert tv(logp, target) < 1e-9


# ---------------------------------------------------------------------------------------------------
# 5. Weight clipping
# ---------------------------------------------------------------------------------------------------
def clipped_problem(space, seed):
    """A problem where the clip bites: alpha = 0.3, beta = 0.5, rewards of scale 2, so at pi_t = pi_0
    the Eq. 4 weights exp(A/beta) span several orders of magnitude around 1."""
    p = random_problem(space, seed)
    p["r"] = 2 * p["r"]
    return p, 0.3, 0.5


@space_params
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("w_clip", [1.0, 3.0])
def test_clipped_dar_loss_minimiser_is_pi_t_times_clipped_weight(space, seed, w_clip):
    """Sec. 4.3 "Practical Implementation": with w = min((pi_0/pi_t)^alpha exp(A/beta), w_clip), the loss
    -E_{pi_t}[w log pi_theta] is still a positive-weighted cross-entropy, so its minimiser is the valid
    policy pi_c(y) = pi_t(y) w(y) / E_{pi_t}[w] (non-negative, sums to 1), no longer pi*. The project's
    clipped dar_loss is minimised from pi_t, on a case where some but not all weights are clipped.
    """
    p, alpha, beta = clipped_problem(space, seed)
    logp_0, table_t, logp_t, r = p["logp_0"], p["table_t"], p["logp_t"], p["r"]
    A = advantage(r, logp_t)
    _, parts = dar_weights(A, logp_t, logp_0, alpha, beta, w_clip, normalize=False)
    assert 0 < parts["clipped"].sum() < space.size

    fitted, _ = fit_dar_step(space, logp_0, table_t, r, alpha, beta, w_clip)
    closed = closed_form_step(logp_0, logp_t, r, alpha, beta, w_clip)
    assert tv(fitted, closed) < 1e-6
    assert (closed.exp() >= 0).all() and closed.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    assert tv(closed, log_pi_star(logp_0, logp_t, A, alpha, beta)) > 1e-2        # the clip changed it


def clipped_iterations(logp_0, logp, r, alpha, beta, w_clip, n):
    """n closed-form (clipped) DAR iterations from log pi [|Y|]; returns the list of n + 1 iterates."""
    out = [logp]
    for _ in range(n):
        out.append(closed_form_step(logp_0, out[-1], r, alpha, beta, w_clip))
    return out


@space_params
@pytest.mark.parametrize("seed", SEEDS)
def test_one_clipped_step_moves_toward_the_target_but_less_than_the_unclipped_step(space, seed):
    """One update from a fixed pi_t, measured by KL(p || .) for the targets p = pi* (this step's
    Theorem 4.2 optimum) and p = pi_inf (claim 4's fixed point):
        KL(p || unclipped step) <= KL(p || clipped step, w_clip) <= KL(p || pi_t),
    and the middle term is non-increasing in w_clip.
    Why: with h = log(p / pi_t), log w = a h + const (a = 1 for pi*, a = alpha for pi_inf), so the clipped
    step is pi_t tilted by g = min(a h + const, log w_clip), a non-decreasing function of h. Along
    log w_clip = b, d/db KL(p || step) = pi_c(S_b) - p(S_b), S_b = {clipped responses} = {h large}; and
    pi_c / p is non-increasing in h, so pi_c puts less mass than p on S_b: the derivative is <= 0. At b
    below every log w the step does not move; at b above all it is the unclipped step.
    """
    p, alpha, beta = clipped_problem(space, seed)
    logp_0, logp_t, r = p["logp_0"], p["logp_t"], p["r"]
    A = advantage(r, logp_t)
    log_w = log_dar_weight(logp_0, logp_t, A, alpha, beta)
    clips = torch.logspace(log_w.min().item(), log_w.max().item(), 25, base=math.e, dtype=DT).tolist()
    for target in (log_pi_star(logp_0, logp_t, A, alpha, beta), log_fixed_point(logp_0, r, alpha, beta)):
        start = kl(target, logp_t).item()
        full = kl(target, closed_form_step(logp_0, logp_t, r, alpha, beta)).item()
        path = [kl(target, closed_form_step(logp_0, logp_t, r, alpha, beta, c)).item() for c in clips]
        assert full <= min(path) + 1e-12 and max(path) <= start + 1e-12
        assert all(a >= b - 1e-12 for a, b in zip(path, path[1:])), "not monotone in w_clip"
        assert path[0] == pytest.approx(start, abs=1e-12)            # everything clipped: no move
        assert path[len(path) // 2] > full + 1e-4                    # a binding clip slows the step
    # the unclipped step reaches pi* (the full path above ends there: its last clip is max w)
    star = log_pi_star(logp_0, logp_t, A, alpha, beta)
    assert kl(star, closed_form_step(logp_0, logp_t, r, alpha, beta)) < 1e-12


@space_params
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("w_clip", [1.0, 3.0])
def test_clipped_iteration_approaches_the_fixed_point_monotonically_and_lags_unclipped(space, seed, w_clip):
    """Iterating the clipped update with a fixed reward, from pi_0, toward pi_inf = pi_0 exp(r/(alpha beta))/Z.

    Claims (each exact, for alpha in (0, 1]):
      (a) pi_inf is still a fixed point: there w = exp(-alpha KL(pi_inf||pi_0)) is the same for every y.
      (b) KL(pi_inf || pi_k) never increases (previous test, applied at each step).
      (c) KL(pi_inf || clipped pi_k) >= KL(pi_inf || unclipped pi_k) for every k. With
          h_k = log(pi_inf / pi_k), the unclipped step is h -> (1-alpha) h + c, the clipped one
          h -> max((1-alpha) h - a_k, h - log w_clip) + c': non-decreasing, slopes in [1-alpha, 1] (a
          clipped response's deviation does not contract). Composing k such maps, the clipped h_k is
          chi(unclipped h_k) with chi(x) - x non-decreasing. For q proportional to p e^-h, KL(p || q) grows
          along h + s d, d = chi(h) - h: its s-derivative E_p[d] - E_q[d] >= 0, as d increases with h
          while q/p decreases with h.
      (d) For w_clip >= 1 it never stalls and strictly decreases until it converges: E_{pi_k}[log w_k]
          = -alpha KL(pi_k || pi_0) <= 0 (the exact advantage has mean 0 under pi_k), so some weight is
          <= 1 <= w_clip, i.e. not clipped. Near pi_inf every weight is below 1 (they tend to
          exp(-alpha KL(pi_inf||pi_0)) < 1), so the clip turns off and the rate is (1 - alpha) again.
    The first 3 iterations minimise the project's clipped dar_loss and must match the closed form.
    """
    p, alpha, beta = clipped_problem(space, seed)
    logp_0, r = p["logp_0"], p["r"]
    target = log_fixed_point(logp_0, r, alpha, beta)

    assert tv(closed_form_step(logp_0, target, r, alpha, beta, w_clip), target) < 1e-12          # (a)
    table, logp = p["table_0"], logp_0
    for _ in range(3):
        fitted, table = fit_dar_step(space, logp_0, table, r, alpha, beta, w_clip)
        assert tv(fitted, closed_form_step(logp_0, logp, r, alpha, beta, w_clip)) < 1e-6
        logp = fitted

    n = 100                                             # converged after at most ~40 iterations
    clipped = clipped_iterations(logp_0, logp_0, r, alpha, beta, w_clip, n)
    unclipped = clipped_iterations(logp_0, logp_0, r, alpha, beta, None, n)
    kl_c = [kl(target, q).item() for q in clipped]
    kl_u = [kl(target, q).item() for q in unclipped]
    A0 = advantage(r, logp_0)
    assert (log_dar_weight(logp_0, logp_0, A0, alpha, beta) > math.log(w_clip)).any()  # the clip bites
    assert kl_c[1] > kl_u[1] + 1e-4                                                  # and slows step 1
    for k in range(n):
        if kl_c[k] > 1e-12:
            assert kl_c[k + 1] < kl_c[k], f"KL increased at iteration {k}"                     # (b), (d)
        assert kl_c[k + 1] >= kl_u[k + 1] - 1e-12, f"clipped ahead of unclipped at {k + 1}"     # (c)
        log_w = log_dar_weight(logp_0, clipped[k], advantage(r, clipped[k]), alpha, beta)
        assert log_w.min() <= 1e-12                                                       # (d)
        if (log_w <= math.log(w_clip)).all():             # clip inactive: the plain (1 - alpha) contraction
            deviation = centred(clipped[k] - target)
            assert torch.allclose(centred(clipped[k + 1] - target), (1 - alpha) * deviation, atol=1e-9)
    assert kl_c[-1] < 1e-10                                                          # converged


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_below_every_weight_stalls_the_iteration(seed):
    """The regime where "clipped DAR moves toward the target" fails: if w_clip < min_y w(y), every weight
    equals w_clip, the clipped loss is plain SFT on pi_t's own samples, its minimiser is pi_t, and the
    iteration stays at pi_t forever (a spurious fixed point). By claim (d) above this needs w_clip < 1.
    Here pi_0 is near uniform and beta is large so that min_y w(y) at pi_t = pi_0 is not tiny.
    """
    space = SPACES["V5"]
    p = random_problem(space, seed, scale=0.1)
    alpha, beta = 0.5, 5.0
    logp_0, r = p["logp_0"], p["r"]
    log_w = log_dar_weight(logp_0, logp_0, advantage(r, logp_0), alpha, beta)
    w_clip = 0.5 * log_w.exp().min().item()
    assert w_clip < 1
    logp_theta = p["logp_t"]                          # any pi_theta: at pi_t = pi_0 the loss is w_clip * SFT
    per_seq, _ = dar_loss(logp_theta, logp_0, logp_0, advantage(r, logp_0), alpha=alpha, beta=beta,
                          w_clip=w_clip, normalize=False)
    sft = weighted_sft_loss(logp_theta, torch.full_like(logp_theta, w_clip))
    assert torch.allclose(per_seq, sft, rtol=1e-6)
    fitted, _ = fit_dar_step(space, logp_0, p["table_0"], r, alpha, beta, w_clip)
    assert tv(fitted, logp_0) < 1e-6                                             # no move
    assert kl(log_fixed_point(logp_0, r, alpha, beta), logp_0) > 1e-2            # though far from pi_inf


# ---------------------------------------------------------------------------------------------------
# 8. The k3 KL estimator used in evaluation
# ---------------------------------------------------------------------------------------------------
@space_params
@pytest.mark.parametrize("seed", SEEDS)
def test_k3_is_exactly_unbiased_for_the_sequence_kl(space, seed):
    """Schulman's k3 (loop.k3; README "train/kl_pi0"): per token, with rho = pi_ref(y_i|y_<i) / pi(y_i|y_<i),
    k3_i = (rho - 1) - log rho >= 0 and E_{y_i ~ pi(.|y_<i)}[rho] = 1, so E[k3_i | y_<i] = KL of the
    conditionals; summed over tokens, by the chain rule sum_y pi(y) sum_i k3_i(y) = KL(pi || pi_ref) of the
    sequence distributions. The naive estimator log(pi(y)/pi_ref(y)) has the same mean but is negative on
    some responses, k3 on none. Swapping k3's arguments estimates something else.
    """
    g = torch.Generator().manual_seed(100 + seed)
    table, table_ref = space.random_table(g), space.random_table(g)
    tok, tok_ref = space.token_logp(table), space.token_logp(table_ref)           # [|Y|, L]
    logpi, logref = tok.sum(1), tok_ref.sum(1)                                   # [|Y|]
    mask = torch.ones_like(tok)
    est = k3(tok, tok_ref, mask).double()                                        # [|Y|]
    exact = kl(logpi, logref)

    assert (logpi.exp() * est).sum().item() == pytest.approx(exact.item(), rel=1e-5)
    swapped = (logpi.exp() * k3(tok_ref, tok, mask).double()).sum()
    assert swapped.item() != pytest.approx(exact.item(), rel=0.05)
    naive = logpi - logref                                                       # k1 per response  [|Y|]
    assert (logpi.exp() * naive).sum().item() == pytest.approx(exact.item(), rel=1e-12)
    assert naive.min() < 0 and est.min() >= -1e-6          # k3 >= 0 (float32 rounding allowance)
    # padding: a masked position with garbage log-probs changes nothing
    pad = torch.full((space.size, 1), -7.0, dtype=DT)
    padded = k3(torch.cat([tok, pad], 1), torch.cat([tok_ref, pad - 3], 1), torch.cat([mask, 0 * pad], 1))
    assert torch.equal(padded, k3(tok, tok_ref, mask))


@space_params
@pytest.mark.parametrize("seed", SEEDS)
def test_k3_sample_mean_converges_to_the_kl(space, seed):
    """The evaluation's estimate, the mean of k3 over n responses sampled from pi (drawn from the
    enumerated joint, equivalent to token-by-token sampling), converges to KL(pi || pi_ref): its error is
    within 4 exact standard errors sqrt(Var_pi[k3] / n), for n = 1e3, 1e4, 1e5.
    """
    g = torch.Generator().manual_seed(200 + seed)
    table, table_ref = space.random_table(g), space.random_table(g)
    tok, tok_ref = space.token_logp(table), space.token_logp(table_ref)           # [|Y|, L]
    pi = tok.sum(1).exp()
    est = k3(tok, tok_ref, torch.ones_like(tok)).double()                         # [|Y|]
    exact = kl(tok.sum(1), tok_ref.sum(1)).item()
    sd = ((pi * (est - exact) ** 2).sum()).sqrt().item()                         # exact std of one sample
    for n in (1_000, 10_000, 100_000):
        idx = torch.multinomial(pi, n, replacement=True, generator=g)            # y ~ pi  [n]
        mean = k3(tok[idx], tok_ref[idx], torch.ones_like(tok[idx])).double().mean().item()
        assert abs(mean - exact) < 4 * sd / math.sqrt(n), f"n={n}"


# ---------------------------------------------------------------------------------------------------
# 6. DAO's REINFORCE gradient (Appendix A.4), with baselines.dao_loss
# ---------------------------------------------------------------------------------------------------
def per_response_gradients(space, table, per_response_loss):
    """grad_table of per_response_loss(log pi)[y] for every response y: [|Y|, n_prefix, V]."""
    grads = []
    for y in range(space.size):
        t = table.detach().clone().requires_grad_()
        per_response_loss(space.seq_logp(t))[y].backward()
        grads.append(t.grad)
    return torch.stack(grads)


@space_params
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha,beta", [(0.1, 0.5), (0.3, 2.0)])
def test_dao_reinforce_gradient_is_the_exact_dual_kl_gradient(space, seed, alpha, beta):
    """Appendix A.4: grad J(pi_theta) = E_{y~pi_theta}[ grad log pi_theta(y) (A(y) - beta log(pi_theta(y) /
    (pi_0(y)^alpha pi_t(y)^(1-alpha)))) ], J the dual-KL objective (Eq. 3). baselines.dao_loss is minus the
    integrand's coefficient times log pi_theta, the coefficient held constant: its expectation under
    pi_theta (exact weights pi_theta(y), held constant as sampling would) has gradient exactly -grad J, for
    the logits table of a single softmax and of a tabular autoregressive policy alike. With y sampled
    from pi_theta, the mean of dao_loss over n samples is within Monte-Carlo error of -grad J.
    Swapping alpha and 1 - alpha (the wrong KL weighting) breaks the equality.
    """
    p = random_problem(space, seed)
    table = space.random_table(p["gen"]).requires_grad_()
    A = advantage(p["r"], p["logp_t"])

    J = dual_kl_objective(space.seq_logp(table), A, p["logp_0"], p["logp_t"], alpha, beta)
    grad_J, = torch.autograd.grad(J, table)                                          # [n_prefix, V]

    def dao(logpi, a=alpha):                                                         # [|Y|]
        return dao_loss(logpi, p["logp_t"], p["logp_0"], A, a, beta)

    logpi = space.seq_logp(table)
    grad_dao, = torch.autograd.grad((logpi.exp().detach() * dao(logpi)).sum(), table, retain_graph=True)
    assert torch.allclose(grad_dao, -grad_J, rtol=1e-8, atol=1e-11)
    swapped, = torch.autograd.grad((logpi.exp().detach() * dao(logpi, 1 - alpha)).sum(), table)
    assert (swapped + grad_J).norm() > 1e-3 * grad_J.norm()

    # Monte Carlo: the mean over samples is sum_y (count_y / n) g_y, g_y the per-response gradient
    g_y = per_response_gradients(space, table, dao)                                  # [|Y|, n_prefix, V]
    pi = logpi.exp().detach()
    sd = (pi[:, None, None] * (g_y + grad_J) ** 2).sum(0).sqrt()                     # one sample's std
    gen = torch.Generator().manual_seed(300 + seed)
    for n in (1_000, 100_000):
        idx = torch.multinomial(pi, n, replacement=True, generator=gen)              # y ~ pi_theta  [n]
        t = table.detach().clone().requires_grad_()
        dao(space.seq_logp(t))[idx].mean().backward()
        assert torch.all((t.grad + grad_J).abs() <= 5 * sd / math.sqrt(n) + 1e-12), f"n={n}"


# ---------------------------------------------------------------------------------------------------
# 7. Dual-PPO's shaped reward (Appendix B.3) and Dual-Mix-PPO's (Eq. 9), with baselines' reward functions
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.02), (0.9, 0.5)])
def test_dual_ppo_shaped_reward_sums_to_the_sequence_dual_kl_penalty(seed, alpha, beta):
    """Dual-PPO's per-token reward r_i = -beta (alpha log(pi/pi_0) + (1 - alpha) log(pi/pi_t))(y_i | y_<i),
    plus A(y) on the last token (baselines.dual_ppo_rewards), summed over a response's tokens is
    A(y) - beta (alpha log(pi(y)/pi_0(y)) + (1 - alpha) log(pi(y)/pi_t(y))) with sequence log-probs (chain
    rule), and its expectation under pi is exactly the dual-KL objective J(pi) of Eq. 3. So PPO's return
    with these rewards optimises Eq. 3, token by token.
    """
    space = Tabular(3, 3)
    g = torch.Generator().manual_seed(400 + seed)
    tok, tok_t, tok_0 = (space.token_logp(space.random_table(g)) for _ in range(3))  # [|Y|, L]
    logpi, logp_t, logp_0 = tok.sum(1), tok_t.sum(1), tok_0.sum(1)                   # [|Y|]
    A = advantage(torch.randn(space.size, generator=g, dtype=DT), logp_t)
    mask = torch.ones_like(tok)

    rewards = dual_ppo_rewards(A, tok, tok_t, tok_0, mask, alpha, beta)              # [|Y|, L]
    seq_penalty = alpha * (logpi - logp_0) + (1 - alpha) * (logpi - logp_t)
    assert torch.allclose(rewards.sum(1), A - beta * seq_penalty, atol=1e-12)
    expected_return = (logpi.exp() * rewards.sum(1)).sum()
    assert expected_return.item() == pytest.approx(
        dual_kl_objective(logpi, A, logp_0, logp_t, alpha, beta).item(), abs=1e-12)
    # alpha on the wrong KL term gives another objective
    wrong = (logpi.exp() * dual_ppo_rewards(A, tok, tok_t, tok_0, mask, 1 - alpha, beta).sum(1)).sum()
    assert abs(wrong - expected_return) > 1e-6


@space_params
@pytest.mark.parametrize("seed", SEEDS)
def test_dual_mix_ppo_reward_is_the_forward_kl_of_eq9_per_token(space, seed):
    """Dual-Mix-PPO (Eq. 9, App. C.4): the stability term (pi_t/pi) log(pi_t/pi) per token has expectation
    under pi equal to KL(pi_t || pi) of that token's conditionals, so the expected return is
    E_pi[A] - beta (alpha KL(pi||pi_0) + (1 - alpha) sum_i E_{y_<i ~ pi}[KL(pi_t(.|y_<i) || pi(.|y_<i))]):
    Eq. 9 exactly for single-token responses; for sequences the forward KL is taken per token along pi's
    prefixes (not the sequence-level KL(pi_t || pi), which needs prefixes from pi_t).
    """
    alpha, beta = 0.3, 0.5
    g = torch.Generator().manual_seed(500 + seed)
    tables = [space.random_table(g) for _ in range(3)]
    tok, tok_t, tok_0 = (space.token_logp(t) for t in tables)                        # [|Y|, L]
    logpi, logp_t, logp_0 = tok.sum(1), tok_t.sum(1), tok_0.sum(1)
    A = advantage(torch.randn(space.size, generator=g, dtype=DT), logp_t)
    rewards = dual_mix_ppo_rewards(A, tok, tok_t, tok_0, torch.ones_like(tok), alpha, beta)
    expected_return = (logpi.exp() * rewards.sum(1)).sum()

    # forward KL of the conditionals at every prefix of every response   [|Y|, L]
    cond, cond_t = (t.log_softmax(-1)[space.prefix] for t in tables[:2])             # [|Y|, L, V]
    fwd = (cond_t.exp() * (cond_t - cond)).sum(-1)
    per_token_fwd = (logpi.exp()[:, None] * fwd).sum()
    expect = (logpi.exp() * A).sum() - beta * (alpha * kl(logpi, logp_0) + (1 - alpha) * per_token_fwd)
    assert expected_return.item() == pytest.approx(expect.item(), abs=1e-12)
    if space.L == 1:
        eq9 = (logpi.exp() * A).sum() - beta * (alpha * kl(logpi, logp_0) + (1 - alpha) * kl(logp_t, logpi))
        assert expected_return.item() == pytest.approx(eq9.item(), abs=1e-12)
    else:
        assert abs(per_token_fwd - kl(logp_t, logpi)) > 1e-4


# ---------------------------------------------------------------------------------------------------
# 9. IS-DPO (IS-DPO appendix, Theorem 1), with baselines.is_dpo_loss, is_weights, dpo_loss, ipo_loss
# ---------------------------------------------------------------------------------------------------
def all_pairs(space):
    """Every ordered pair (y1, y2) of responses, as two index vectors [|Y|^2]."""
    i, j = torch.meshgrid(torch.arange(space.size), torch.arange(space.size), indexing="ij")
    return i.reshape(-1), j.reshape(-1)


@space_params
@pytest.mark.parametrize("seed", SEEDS)
def test_is_dpo_is_an_unbiased_estimate_of_online_dpo(space, seed):
    """IS-DPO appendix, Theorem 1 (first part): with pairs (y1, y2) drawn from pi_ref = pi_0 and labelled by a
    reward (y_w the higher), the importance-weighted loss E_{pi_ref}[rho is_dpo... ] with
    rho = pi_theta(y_w) pi_theta(y_l) / (pi_ref(y_w) pi_ref(y_l)) equals the online DPO loss
    E_{(y1, y2) ~ pi_theta}[dpo_loss], exactly, and so do their gradients with the samples held fixed
    (rho is a constant of the loss). Clipping rho from above (is_clip) makes the estimate smaller: a bias
    traded for variance.
    """
    beta = 0.1
    g = torch.Generator().manual_seed(600 + seed)
    table, table_ref = space.random_table(g).requires_grad_(), space.random_table(g)
    logref, r = space.seq_logp(table_ref), torch.randn(space.size, generator=g, dtype=DT)
    y1, y2 = all_pairs(space)
    keep = r[y1] != r[y2]                                               # a tie carries no preference
    w = torch.where(r[y1] > r[y2], y1, y2)[keep]
    l = torch.where(r[y1] > r[y2], y2, y1)[keep]

    logpi = space.seq_logp(table)
    online = ((logpi[w] + logpi[l]).exp().detach() * dpo_loss(logpi[w], logpi[l], logref[w], logref[l], beta)).sum()
    p_ref = (logref[w] + logref[l]).exp()
    is_est = (p_ref * is_dpo_loss(logpi[w], logpi[l], logref[w], logref[l], beta, clip=math.inf)).sum()
    assert is_est.item() == pytest.approx(online.item(), rel=1e-10)
    grad_online, = torch.autograd.grad(online, table, retain_graph=True)
    grad_is, = torch.autograd.grad(is_est, table, retain_graph=True)
    assert torch.allclose(grad_is, grad_online, rtol=1e-8, atol=1e-12)

    clipped = (p_ref * is_dpo_loss(logpi[w], logpi[l], logref[w], logref[l], beta, clip=1.0)).sum()
    assert (is_weights(logpi[w], logpi[l], logref[w], logref[l], math.inf) > 1).any()
    assert clipped < is_est
    # without the ratio the loss under pi_ref is another number (this is what IS-DPO corrects)
    plain = (p_ref * dpo_loss(logpi[w], logpi[l], logref[w], logref[l], beta)).sum()
    assert abs(plain - online) > 1e-4


@space_params
@pytest.mark.parametrize("seed", SEEDS)
def test_is_weighted_squared_loss_has_the_gradient_of_kl_to_the_reference(space, seed):
    """IS-DPO appendix, Theorem 1 (second part): for the squared log-ratio loss h^2 (ipo_loss with
    tau = inf, margin 0), h = log(pi_theta(y1)/pi_ref(y1)) - log(pi_theta(y2)/pi_ref(y2)), importance-
    weighted with is_weights on pairs from pi_ref,
        grad E_{(y1, y2) ~ pi_ref}[rho h^2 / 4] = grad KL(pi_theta || pi_ref).
    With rho, pairs are effectively from pi_theta and E[h grad h] = 2 E[a grad log pi] - 2 E[a] E[grad log pi]
    = 2 grad KL (a = log pi_theta/pi_ref; E[grad log pi] = 0). The appendix writes 1/2 h^2 and grad KL: it
    merges the two equal expectations of y_w and y_l into one and drops this factor 2; the constant is
    checked here, so 1/2 h^2 gives 2 grad KL. The squared loss is symmetric, so labels do not matter.
    """
    g = torch.Generator().manual_seed(700 + seed)
    table, table_ref = space.random_table(g).requires_grad_(), space.random_table(g)
    logref = space.seq_logp(table_ref)
    y1, y2 = all_pairs(space)
    logpi = space.seq_logp(table)
    rho = is_weights(logpi[y1], logpi[y2], logref[y1], logref[y2], math.inf)
    sq = ipo_loss(logpi[y1], logpi[y2], logref[y1], logref[y2], math.inf)             # h^2  [|Y|^2]
    objective = ((logref[y1] + logref[y2]).exp() * rho * sq).sum() / 4
    grad_sq, = torch.autograd.grad(objective, table)
    grad_kl, = torch.autograd.grad(kl(space.seq_logp(table), logref), table)
    assert torch.allclose(grad_sq, grad_kl, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(2 * grad_sq, grad_kl, rtol=1e-2)       # the appendix's constant is off by 2


# ---------------------------------------------------------------------------------------------------
# 10. One temperature for sampling and log-probs
# ---------------------------------------------------------------------------------------------------
def logp_at(z, T):
    """log pi(y) of the single-token policy with logits z [V] at temperature T, log softmax(z / T), computed as
    the trainer computes every log-prob (rollout.selected_logps; float32, returned as float64): [V]."""
    V = z.shape[0]
    return rollout.selected_logps(z.expand(1, V, V), torch.arange(V)[None], temperature=T)[0].double()


@pytest.mark.parametrize("seed", SEEDS)
def test_zero_advantages_keep_pi_0_only_when_log_probs_are_at_the_sampling_temperature(seed):
    """The DAR iteration with every A = 0 on 50 outcomes, started at pi_0, responses sampled at T = 0.9 (the
    Config default): batch t samples from q_t = softmax(z_t / T), and the exact minimiser of
    E_{y~q_t}[dar_loss] over the model's logits z is the policy whose log-probs (at T_l) are log(q_t w) + c.
    - log-probs at the sampling temperature (T_l = T, loop.logp_temperature of the default Config): q_t = pi_t
      and w = (pi_0/pi_t)^alpha = 1 at pi_t = pi_0, so nothing moves, as Eq. 3 with A = 0 says it should;
    - log-probs at 1 (--logp-temperature 1): q_t = pi_t^(1/T)/Z, the target pi_0^alpha pi_t^(1/T - alpha) has an
      exponent 1.011 > 1 on pi_t, and the policy sharpens every batch until it collapses onto its mode.
    The first two steps minimise the project's weighted_sft_loss (dar_weights' weights) over a tabular policy.
    """
    alpha, T, V = 0.1, config.Config().temperature, 50
    z_0 = torch.randn(V, generator=torch.Generator().manual_seed(900 + seed), dtype=DT)
    space = SPACES["V50"]
    curves = {}
    for name, cfg in {"matched": config.Config(), "mismatched": config.Config(logp_temperature=1.0)}.items():
        T_l = logp_temperature(cfg)
        logp_0, z, kls = logp_at(z_0, T_l), z_0.clone(), []
        for t in range(150):
            log_q = (z / T).log_softmax(0)                    # the distribution the sampler draws from  [V]
            logp_t = logp_at(z, T_l)
            w, _ = dar_weights(torch.zeros(V), logp_t, logp_0, alpha, 0.05, None, normalize=False)
            closed = (log_q + w.double().log()).log_softmax(0)          # argmin of E_q[-w log pi_theta]
            if t < 2:
                fitted, _ = fit_tabular(lambda logp: (log_q.exp() * weighted_sft_loss(logp, w.double())).sum(),
                                        space)
                assert tv(fitted, closed) < 1e-6
            z = T_l * closed                                  # the model whose log-probs at T_l are `closed`
            kls.append(kl(logp_at(z, T_l), logp_0).item())
        curves[name] = kls, logp_at(z, T_l).exp().max().item()
    kls, _ = curves["matched"]
    assert max(abs(k) for k in kls) < 1e-6
    kls, top = curves["mismatched"]
    assert kls[49] > 0.5 and all(b >= a - 1e-6 for a, b in zip(kls, kls[1:]))   # drifts, every batch
    assert top > 0.99 and logp_0.exp().max() < 0.5                               # onto the mode
