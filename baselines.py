"""Baselines: every method the DAR paper compares with (and IS-DPO), as losses for the online loop of loop.py.

    python dar.py --algo grpo                        # any name below, with the paper's hyperparameters
    torchrun --nproc_per_node 2 dar.py --algo ppo    # the same sampling, judging, logging, checkpoints, DDP

Each algorithm is one loss function headed by the equation it implements, and one step function that
follows the same numbered steps as dar.dar_step (sample, judge, log-probs, advantages, updates); the
pieces they share (sampling, judging, minibatch updates, metrics) live once in loop.py. Per-algorithm defaults
(Appendix B.3, Table 5) are config.ALGO_DEFAULTS.

  RL with a value model   ppo, dual_ppo, dual_ppo_clip, dual_mix_ppo   token-level rewards, GAE, Eq. 2
  RL without a critic     dao, dao_ppo, rloo, grpo                      K samples per prompt as the baseline
  filtered SFT            iter_sft                                      SFT on the best of K
  online direct alignment online_dpo, ipo, slic                         pairs labelled by the annotator
  offline direct align.   dpo, simpo, is_dpo                            a fixed preference data set

Notation as in dar.py: logp = log pi_theta(y|x) (with gradient), logp_t = log pi_t (the policy that sampled
the batch), logp_0 = log pi_0 (the frozen initial policy), all token sums [N] unless named *_tok [N, R]
(per response token, 0 past the end); mask [N, R] marks response tokens. Every loss returns one term per
sequence (or per pair); the objective is their mean, and the loop divides a minibatch's sum by its size (online
DPO/IPO/SLiC: by its pairs that carry a preference).
"""
import math

import torch
import torch.nn.functional as F

import infra
import loop
import rollout


def masked_mean(x, mask):
    """Mean over each sequence's response tokens: [N, R] -> [N] (the 1/|y| sum_i of Eq. 2)."""
    return (x * mask).sum(1) / mask.sum(1).clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# RL with a value model: PPO (Section 3, Eq. 2) and the dual-KL variants (Section 4.1, Appendix B.3, C.4)
# ---------------------------------------------------------------------------------------------------
def add_score_at_end(token_rewards, score, mask):
    """The sequence reward r(x, y) lands on the last response token (EOS, or the last one of a cut
    response): scalar reward at the end of the sequence (Appendix B.3, following Xu et al. 2024). [N, R]"""
    last = mask.sum(1).long().clamp(min=1) - 1
    out = token_rewards.clone()
    out[torch.arange(len(score)), last] += score.to(out.dtype)
    return out


def ppo_rewards(score, logp_t_tok, logp_0_tok, mask, beta):
    """r_i = -beta log(pi_t(y_i|x, y_<i) / pi_0(y_i|x, y_<i)), plus r(x, y) at the last token  (Section 3)

    The reference regularisation of Eq. 1 as token-level reward shaping; pi_t is the sampling policy, so
    these rewards are fixed for the whole online batch. [N, R]
    """
    return add_score_at_end(-beta * (logp_t_tok - logp_0_tok) * mask, score, mask)


def dual_ppo_rewards(score, logp_tok, logp_t_tok, logp_0_tok, mask, alpha, beta):
    """r_i = -beta (alpha log(pi/pi_0) + (1 - alpha) log(pi/pi_t)) per token, plus r(x, y) at the end
    (Appendix B.3; Eq. 3's dual-KL penalty, token by token).

    pi is the policy being trained, so the (1 - alpha) term is 0 when an online batch's first update
    starts (pi = pi_t) and grows as pi_theta moves away from pi_t within the batch: the step recomputes
    these rewards at every update, and that term, not ratio clipping, is what keeps Dual-PPO stable.
    Summed over tokens the penalty is the sequence-level beta (alpha log pi/pi_0 + (1 - alpha) log pi/pi_t),
    whose expectation under pi is the dual-KL penalty of Eq. 3 (tests/test_theory.py). [N, R]
    """
    kl = alpha * (logp_tok - logp_0_tok) + (1 - alpha) * (logp_tok - logp_t_tok)
    return add_score_at_end(-beta * kl * mask, score, mask)


def dual_mix_ppo_rewards(score, logp_tok, logp_t_tok, logp_0_tok, mask, alpha, beta):
    """r_i = -beta (alpha log(pi/pi_0) + (1 - alpha) (pi_t/pi) log(pi_t/pi)) per token, plus r(x, y)
    (Eq. 9, Appendix C.4): the stability term is the forward KL(pi_t || pi), importance-weighted to
    samples from pi. pi is the policy being trained, as in dual_ppo_rewards. [N, R]"""
    log_r = logp_t_tok - logp_tok                                            # log(pi_t / pi)  [N, R]
    kl = alpha * (logp_tok - logp_0_tok) + (1 - alpha) * log_r.exp() * log_r
    return add_score_at_end(-beta * kl * mask, score, mask)


def gae(token_rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016), without a per-token Python loop:

        delta_i = r_i + gamma V_{i+1} - V_i   (V past the last response token = 0: the episode ends)
        A_i = sum_{l >= 0} (gamma lam)^l delta_{i+l},   returns_i = A_i + V_i

    token_rewards, values, mask: [N, R]. The sum is one product with an upper-triangular [R, R] matrix of
    powers of gamma*lam. Returns (A, returns), both [N, R], 0 past the end.
    """
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    delta = (token_rewards + gamma * next_values - values) * mask                      # [N, R]
    R = delta.shape[1]
    steps = torch.arange(R, device=delta.device)
    ahead = steps[None, :] - steps[:, None]                                            # [R, R]: j - i
    discount = torch.where(ahead >= 0, (gamma * lam) ** ahead.clamp(min=0).double(), 0.0)
    adv = (delta.double() @ discount.T).to(delta.dtype) * mask                          # [N, R]
    return adv, (adv + values) * mask


def ppo_token_loss(logp_tok, logp_t_tok, adv_tok, clip_eps, clip_eps_high=0.0, tis=None):
    """-w_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps_high) A_i) per token,  rho_i = pi_theta / pi_t  [N, R]

    PPO's clipped surrogate (Eq. 2; Schulman et al. 2017). clip_eps_high: the upper clip range, larger than
    the lower one in DAPO's clip-higher (Yu et al. 2025); 0 = clip_eps, symmetric. clip_eps = inf switches
    clipping off (Dual-PPO). tis: per-token weights w_i (tis_weights, detached), None = 1."""
    ratio = (logp_tok - logp_t_tok).exp()
    clipped = ratio.clamp(1 - clip_eps, 1 + (clip_eps_high or clip_eps))
    loss = -torch.min(ratio * adv_tok, clipped * adv_tok)
    return loss if tis is None else loss * tis


def ppo_policy_loss(logp_tok, logp_t_tok, adv_tok, mask, clip_eps, clip_eps_high=0.0, tis=None):
    """-(1/|y|) sum_i w_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps_high) A_i): ppo_token_loss, the mean over
    each response's tokens (Eq. 2). [N]"""
    return masked_mean(ppo_token_loss(logp_tok, logp_t_tok, adv_tok, clip_eps, clip_eps_high, tis), mask)


def outside_clip(ratio, clip_eps, clip_eps_high=0.0):
    """Where a ratio left [1 - clip_eps, 1 + clip_eps_high] (0 = clip_eps): the clipped share's numerator."""
    return (ratio < 1 - clip_eps) | (ratio > 1 + (clip_eps_high or clip_eps))


def tis_weights(logp_t_tok, sampler_logp_tok, mask, cap):
    """w_i = min(pi_t(y_i|x, y_<i) / pi_sampler(y_i|x, y_<i), C) per token, and where the ratio exceeded C:
    truncated importance sampling (Yao et al. 2025; TRL's vllm_importance_sampling_cap, token_truncate mode).

    The sampler (vLLM's kernels, generate's recorded log-probs) and the trainer's forward pass give slightly
    different pi_t; the loss's ratio pi_theta / pi_t uses the trainer's, so the samples are off-policy by
    pi_t / pi_sampler, corrected token by token and capped at C against rare huge ratios. In log space (no
    overflow), detached. ([N, R] weights, 0 past the end; [N, R] bool)"""
    log_ratio = (logp_t_tok - sampler_logp_tok).detach()
    return log_ratio.clamp(max=math.log(cap)).exp() * mask, (log_ratio > math.log(cap)) & mask.bool()


def value_loss(values, values_old, returns, mask, value_clip):
    """(1/|y|) sum_i 1/2 max((V_i - R_i)^2, (V_old_i + clip(V_i - V_old_i, +-c) - R_i)^2): the clipped value
    loss of PPO as in TRL (Appendix B.3: "a clip range of 0.2, including on the value"). [N]"""
    v_clipped = values_old + (values - values_old).clamp(-value_clip, value_clip)
    return masked_mean(0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def token_values(value_model, batch):
    """V(x, y_<i) for every response token i: the value head read at the position before y_i. [N, R]"""
    ids, mask, P, R = batch.input_ids, batch.attention_mask, batch.prompt_len, batch.response_mask.shape[1]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    v = value_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, P - 1:P - 1 + R, 0]
    return v.float() * batch.response_mask


# ---------------------------------------------------------------------------------------------------
# RL from K samples per prompt, no critic: DAO (Appendix A.4), RLOO, GRPO
# ---------------------------------------------------------------------------------------------------
def reinforce_surrogate(logp, coef, logp_old, clip_eps, clip_eps_high=0.0):
    """-c log pi_theta(y|x), c held constant, for y sampled from pi_theta itself (logp_old None). For y sampled
    from an earlier policy pi_old (an online batch's later updates, after pi_theta has moved):
        -min(rho c, clip(rho, 1 - eps, 1 + eps) c),   rho = pi_theta(y|x) / pi_old(y|x) of the whole sequence,
    PPO's clipped ratio (Eq. 2) at the sequence level, as in TRL's RLOO trainer. Both have the gradient
    -c grad log pi_theta at pi_theta = pi_old (the batch's first update); later the second weighs it by rho
    inside the clip range and drops it outside, in the direction of c. clip_eps = inf: plain importance
    sampling, E_{pi_old}[rho c grad log pi_theta] = E_{pi_theta}[c grad log pi_theta]. clip_eps_high: the
    upper clip range (clip-higher, as in ppo_token_loss); 0 = clip_eps. [N]"""
    coef = coef.detach()
    if logp_old is None:
        return -coef * logp
    rho = (logp - logp_old).exp()
    return -torch.min(rho * coef, rho.clamp(1 - clip_eps, 1 + (clip_eps_high or clip_eps)) * coef)


def dao_loss(logp, logp_t, logp_0, adv, alpha, beta, length_norm=1.0, logp_old=None, clip_eps=math.inf,
             clip_eps_high=0.0):
    """-(A - beta log(pi_theta / (pi_0^alpha pi_t^(1-alpha)))) log pi_theta(y|x), the bracket held constant:
    the REINFORCE-style DAO of Appendix A.4, whose expected gradient under y ~ pi_theta is the exact gradient
    of the dual-KL objective J (Eq. 3, via Proposition 4.1; tests/test_theory.py checks it). For samples of
    an earlier policy (logp_old), the clipped ratio of reinforce_surrogate. [N]"""
    penalty = logp.detach() - alpha * logp_0 - (1 - alpha) * logp_t          # log pi / (pi_0^a pi_t^(1-a))  [N]
    return reinforce_surrogate(logp, adv - beta * penalty, logp_old, clip_eps, clip_eps_high) / length_norm


def dao_ppo_loss(logp, logp_t, logp_0, adv, alpha, beta, length_norm=1.0):
    """-[rho A - beta rho log(pi_theta / (pi_0^alpha pi_t^(1-alpha)))],  rho = pi_theta(y|x) / pi_t(y|x):
    the PPO-style (importance-sampled) DAO of Appendix A.4, samples from pi_t, no clipping; gradients
    flow through rho and the log term. [N]"""
    rho = (logp - logp_t).exp()
    return -(rho * adv - beta * rho * (logp - alpha * logp_0 - (1 - alpha) * logp_t)) / length_norm


def kl_penalised_rewards(rewards, logp_t, logp_0, beta):
    """r(x, y) - beta log(pi_t(y|x) / pi_0(y|x)): the sequence-level KL-regularised reward of RLOO (as in
    TRL's RLOO trainer; Ahmadian et al. 2024). [N]"""
    return rewards - beta * (logp_t - logp_0).to(rewards.dtype)


def rloo_advantages(rewards, k):
    """A_i = r_i - 1/(K-1) sum_{j != i} r_j: the leave-one-out baseline of RLOO (Ahmadian et al. 2024,
    Eq. 5). rewards [B*K], NaN = invalid (left out of every baseline, A = NaN). [B*K]"""
    r = rewards.view(-1, k)
    valid = ~torch.isnan(r)
    total, count = torch.where(valid, r, 0.0).sum(1, keepdim=True), valid.sum(1, keepdim=True)
    baseline = (total - torch.where(valid, r, 0.0)) / (count - 1).clamp(min=1)
    return torch.where(valid & (count > 1), r - baseline, math.nan).view(-1)


def rloo_loss(logp, adv, length_norm=1.0, logp_old=None, clip_eps=math.inf, clip_eps_high=0.0):
    """-A_i log pi_theta(y_i|x): REINFORCE with the leave-one-out baseline (Ahmadian et al. 2024); for samples
    of an earlier policy (logp_old), the clipped ratio of reinforce_surrogate. [N]"""
    return reinforce_surrogate(logp, adv, logp_old, clip_eps, clip_eps_high) / length_norm


def grpo_advantages(rewards, k, eps=1e-4, scale="group", batch_rewards=None):
    """A_i = (r_i - mean_K r) / (std r + eps): group-normalised advantages (Shao et al. 2024, Section 4.1.2).

    scale (TRL's scale_rewards): group = the sample std over the valid responses of the prompt (the paper);
    batch = the sample std of every valid reward of batch_rewards (the whole online batch, all ranks; default
    `rewards`), the mean still the group's (as in TRL); none = no division, A = r - mean_K r (Dr. GRPO, Liu
    et al. 2025: the std favours prompts whose rewards barely differ). [B*K], NaN where undefined."""
    r = rewards.view(-1, k)
    valid = ~torch.isnan(r)
    count = valid.sum(1, keepdim=True)
    mean = torch.where(valid, r, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    if scale == "group":
        var = torch.where(valid, (r - mean) ** 2, 0.0).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        adv = (r - mean) / (var.sqrt() + eps)
    elif scale == "batch":
        every = rewards if batch_rewards is None else batch_rewards
        every = every[~torch.isnan(every)]
        adv = (r - mean) / ((every.std(correction=1) if len(every) > 1 else 0.0) + eps)
    else:
        adv = r - mean
    return torch.where(valid & (count > 1), adv, math.nan).view(-1)


def grpo_loss(logp_tok, logp_t_tok, logp_0_tok, adv, mask, clip_eps, beta, clip_eps_high=0.0, agg="sequence",
              length_norm=1.0, tis=None):
    """(1/|y|) sum_i [ -w_i min(rho_i A, clip(rho_i, 1 - eps, 1 + eps_high) A) + beta k3_i(pi_theta, pi_0) ]
    (Shao et al. 2024, Eq. 3), k3_i = pi_0/pi_theta - log(pi_0/pi_theta) - 1 per token, with gradient through
    pi_theta; w_i: tis_weights (None = 1), on the policy-gradient term only, as TRL. adv: [N] per sequence.

    agg, how the per-token terms l_i add up per sequence (--loss-agg; TRL's loss_type in brackets):
      sequence  (1/|y|) sum_i l_i: each response's mean, then the mean over responses, the original GRPO ["grpo"]
      token     sum_i l_i: the loop divides the minibatch's sum by its token count over all ranks (sequence_step
                passes the tokens as minibatch_updates' `used`): one mean over every token, DAPO (Yu et al.
                2025) ["dapo", TRL's default; "bnpo" is the same over one rank's micro-batch, not offered]
      dr_grpo   sum_i l_i / length_norm (max_new_tokens), then the mean over responses: Dr. GRPO (Liu et al.
                2025) ["dr_grpo"]
    The last two weigh every token alike, where sequence favours the tokens of short responses. [N]
    """
    d = logp_0_tok - logp_tok
    k3_tok = d.exp() - d - 1
    tok = ppo_token_loss(logp_tok, logp_t_tok, adv[:, None].to(logp_tok.dtype), clip_eps, clip_eps_high, tis) + \
        beta * k3_tok
    if agg == "sequence":
        return masked_mean(tok, mask)
    return (tok * mask).sum(1) / (length_norm if agg == "dr_grpo" else 1.0)


# ---------------------------------------------------------------------------------------------------
# Filtered SFT and direct alignment from preferences
# ---------------------------------------------------------------------------------------------------
def best_of_k(rewards, k):
    """Index (into [B*K]) of each prompt's highest-reward response (first on ties), and whether the prompt
    has any valid judgment: iterative SFT trains on these (Appendix B.3). ([B], [B] bool)"""
    r = rewards.view(-1, k)
    best = torch.where(torch.isnan(r), -math.inf, r).argmax(1)
    return torch.arange(len(r)) * k + best, (~torch.isnan(r)).any(1)


def reward_pairs(rewards, k):
    """--pair-labels reward: (first, second, p) per prompt, its highest- and lowest-reward responses by the judge's
    reward-prompt scores, and p = P(first preferred): 1, 0.5 when they tie, NaN with fewer than 2 valid
    judgments. ([B], [B], [B])"""
    r = rewards.view(-1, k)
    nan = torch.isnan(r)
    hi, lo = torch.where(nan, -math.inf, r), torch.where(nan, math.inf, r)
    first, second = hi.argmax(1), lo.argmin(1)
    rows = torch.arange(len(r))
    p = torch.where(hi[rows, first] > lo[rows, second], 1.0, 0.5).double()
    p = torch.where((~nan).sum(1) < 2, math.nan, p)
    return rows * k + first, rows * k + second, p


def disjoint_pairs(n, k):
    """--pair-labels preference: the pairs (y_1, y_2), (y_3, y_4), ... of each prompt's K samples (K even; rows
    of a prompt are adjacent). Each is two independent samples of pi_t, the pair OAIF labels (Guo et al. 2024),
    and each sample is shown to the annotator in one pair. ([N/2], [N/2])"""
    assert k % 2 == 0, "disjoint pairs need an even K (config.check_config says so)"
    return torch.arange(0, n, 2), torch.arange(1, n, 2)


def label_pairs(first, second, p):
    """(chosen, rejected, used) from p = P(first preferred): y_w is `first` where p > 1/2. A pair is used only
    with a preference: p = 1/2 (a tie, or an annotator whose two orders disagree) and NaN (invalid) are not.
    ([P], [P], [P] bool)"""
    a_wins = p > 0.5
    return torch.where(a_wins, first, second), torch.where(a_wins, second, first), ~torch.isnan(p) & (p != 0.5)


def judge_preferences(cfg, ctx, run, batch, first, second, pending=None, timer=None):
    """Step 2b of the online DAP methods with --pair-labels preference: p = P(y_first preferred over y_second)
    per pair [P] from judge.prefer (an LLM annotator: the preference prompt of Tables 12-14, asked in both orders,
    Appendix C.1), NaN = invalid. pending: loop.judge_async(pairs=)'s handle when the call was started before
    the log-probs; timer gets prefer and prefer_wait, as judge_batch's judge and judge_wait. Like
    loop.judge_batch for rewards, raises loop.JudgeFailure (on every rank) when more than --max-invalid-frac of
    the online batch's pairs got no valid judgment."""
    pending = pending or loop.judge_async(cfg, run, batch, overlap=False, pairs=(first, second))
    p = torch.tensor(loop.judge_or_fail(ctx, pending, timer, "prefer"), dtype=torch.float64)
    frac = loop.invalid_share(ctx, p)
    if frac > cfg.max_invalid_frac:
        raise loop.JudgeFailure(f"{frac:.0%} of its preference judgments are invalid, above --max-invalid-frac "
                                f"{cfg.max_invalid_frac:g} ({loop.judge_name(cfg)}; its messages above say why)")
    return p


def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """-log sigma(beta h),  h = log(pi_theta(y_w)/pi_0(y_w)) - log(pi_theta(y_l)/pi_0(y_l))
    (Rafailov et al. 2023, Eq. 7; online DPO samples the pair from pi_t, Guo et al. 2024). [P]"""
    h = (logp_w - ref_w) - (logp_l - ref_l)
    return -F.logsigmoid(beta * h)


def ipo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """(h - 1/(2 tau))^2 with tau = beta, h as in dpo_loss (Azar et al. 2023, Eq. 17). [P]"""
    h = (logp_w - ref_w) - (logp_l - ref_l)
    return (h - 1 / (2 * beta)) ** 2


def slic_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """max(0, 1 - beta h), h as in dpo_loss: the hinge (calibration) loss of SLiC-HF (Zhao et al. 2023) on
    log-ratios to pi_0, the form used by Guo et al. 2024 and TRL's "hinge" loss (margin 1/beta). [P]"""
    h = (logp_w - ref_w) - (logp_l - ref_l)
    return torch.relu(1 - beta * h)


def simpo_loss(logp_w, logp_l, len_w, len_l, beta, gamma):
    """-log sigma(beta/|y_w| log pi_theta(y_w) - beta/|y_l| log pi_theta(y_l) - gamma)
    (Meng et al. 2024, Eq. 6): length-normalised, no reference model, target margin gamma. [P]"""
    return -F.logsigmoid(beta * logp_w / len_w - beta * logp_l / len_l - gamma)


def is_weights(logp_w, logp_l, ref_w, ref_l, clip):
    """rho = min(pi_theta(y_w|x) pi_theta(y_l|x) / (pi_0(y_w|x) pi_0(y_l|x)), clip), held constant.

    The importance ratio of the IS-DPO appendix (Theorem 1): pairs in the data set were drawn from pi_ref,
    here pi_0 (the SFT policy, standing in for the data's behaviour policy), and the online objective is
    under pairs from the current pi_theta. The ratio is of whole sequences (token sums) of both responses
    of the pair, computed in log space, and detached: it reweights the loss, it is not differentiated.
    clip = inf (the default) keeps the estimator unbiased; a finite clip lowers the variance of the rare
    large ratios and biases the loss downwards (tests/test_baselines.py). [P]
    """
    log_rho = ((logp_w + logp_l) - (ref_w + ref_l)).detach()
    return log_rho.clamp(max=math.log(clip)).exp()


def is_dpo_loss(logp_w, logp_l, ref_w, ref_l, beta, clip):
    """rho * (-log sigma(beta h)): DPO importance-weighted towards the current policy's own pairs (IS-DPO
    appendix, Theorem 1: unbiased for online DPO when clip = inf). [P]"""
    return is_weights(logp_w, logp_l, ref_w, ref_l, clip) * dpo_loss(logp_w, logp_l, ref_w, ref_l, beta)


PAIR_LOSSES = {"online_dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}


# ---------------------------------------------------------------------------------------------------
# Step functions: one online batch (or, offline, one minibatch of the data set) each, numbered like
# dar.dar_step. They return the metrics loop.train logs.
# ---------------------------------------------------------------------------------------------------
def sample_judge_score(step, cfg, ctx, run, timer, ask_more=None):
    """Steps 1, 2 and the log-probs of every online algorithm: the Rollout, rewards [N] (NaN = invalid),
    the invalid count, log pi_t, log pi_0 per token [N, R] (once per online batch, before any update), and
    the sampler-vs-policy log-prob difference [N] (None without vLLM). ask_more(batch): called once the batch
    exists, after the judge's call has started, to start more annotator calls the log-prob passes overlap."""
    with infra.timed(timer, "sample"):
        batch = loop.sample(step, cfg, ctx, run)                                       # 1. y ~ pi_t   [N]
    pending = loop.judge_async(cfg, run, batch)                 # 2. r(x, y) [N]; --judge-overlap: while 3. runs
    if ask_more:
        ask_more(batch)
    with infra.timed(timer, "logp_t"):
        logp_t_tok, logp_diff = loop.pi_t_logps(cfg, ctx, run, batch)                  # 3. [N, R]
    with infra.timed(timer, "logp_0"):
        logp_0_tok = loop.score(run.ref, batch, cfg.micro_batch)
    rewards, invalid = loop.judge_batch(cfg, ctx, run, batch, pending, timer)
    return batch, rewards, invalid, logp_t_tok, logp_0_tok, logp_diff


def truncated_is(cfg, ctx, batch, logp_t_tok):
    """--tis-cap: the per-token weights of tis_weights [N, R] (None when off) from the sampler's log-probs of the
    batch, and their metrics over the online batch, all ranks: train/tis_weight_mean (per response token) and
    train/tis_clip_frac (share of response tokens whose ratio pi_t / pi_sampler exceeded the cap)."""
    if not cfg.tis_cap:
        return None, {}
    mask = batch.response_mask.to(logp_t_tok.device).float()
    w, capped = tis_weights(logp_t_tok, batch.sampler_logp.to(logp_t_tok.device).float(), mask, cfg.tis_cap)
    s = infra.gather(ctx, torch.stack([w.sum(), capped.sum(), mask.sum()]).double().to(ctx.device)).view(-1, 3).sum(0)
    return w, {"train/tis_weight_mean": (s[0] / s[2]).item(), "train/tis_clip_frac": (s[1] / s[2]).item()}


def ppo_step(step, cfg, ctx, run):
    """PPO and its dual-KL variants: token-level shaped rewards, a value model, GAE, clipped updates."""
    timer = {}
    batch, rewards, invalid, logp_t_tok, logp_0_tok, logp_diff = sample_judge_score(step, cfg, ctx, run, timer)
    dev, mask = ctx.device, batch.response_mask.to(ctx.device).float()
    tis, tis_metrics = truncated_is(cfg, ctx, batch, logp_t_tok)                        # --tis-cap  [N, R]

    # 2b. the score of a response that never emitted EOS is lowered (TRL's missing_eos_penalty); an invalid
    #     judgment (NaN) leaves its sequence out of the loss
    score = (rewards - cfg.missing_eos_penalty * (~batch.ended).double()).to(dev)
    valid = ~torch.isnan(score)
    loop.skip_unusable(cfg, ctx, rewards, valid, "")  # no valid judgment on any rank: no update (loop.train)
    score = torch.nan_to_num(score)

    # 3b. V_old(x, y_<i) of the value model at sampling time                              [N, R]
    with infra.timed(timer, "values"):
        values_old = loop.score(run.value, batch, cfg.micro_batch, per_token=token_values).to(dev)

    # 4. token rewards as a function of the trained policy's log-probs (only the dual variants use them),
    #    GAE, and whitening statistics of the advantages at sampling time (pi = pi_t), over all ranks
    def shaped(rows, logp_tok, R):
        s, m, lt, l0 = score[rows], mask[rows, :R], logp_t_tok[rows, :R], logp_0_tok[rows, :R]
        if cfg.algo == "ppo":
            return ppo_rewards(s, lt, l0, m, cfg.beta)
        fn = dual_mix_ppo_rewards if cfg.algo == "dual_mix_ppo" else dual_ppo_rewards
        return fn(s, logp_tok, lt, l0, m, cfg.alpha, cfg.beta)

    all_rows = torch.arange(len(batch))
    adv0, _ = gae(shaped(all_rows, logp_t_tok, mask.shape[1]), values_old, mask, cfg.gamma, cfg.gae_lambda)
    tok_valid = mask.bool() & valid[:, None]
    moments = infra.gather(ctx, torch.stack([adv0[tok_valid].sum(), (adv0[tok_valid] ** 2).sum(),
                                             tok_valid.sum().float()]).double()).view(-1, 3).sum(0)
    adv_mean = (moments[0] / moments[2]).item()
    adv_std = (moments[1] / moments[2] - adv_mean ** 2).clamp(min=0).sqrt().item()

    # 5. updates: per micro-batch, rewards from the current pi (detached), GAE, whitened advantages,
    #    clipped policy loss (Eq. 2) + vf_coef x clipped value loss
    def loss_fn(mb):
        part = batch.select(mb).to(dev)
        R = part.response_mask.shape[1]
        m = mask[mb, :R]
        logp_tok = rollout.token_logps(run.ddp, part)                                       # [n, R]
        values = token_values(run.value_ddp, part)                                           # [n, R]
        adv, returns = gae(shaped(mb, logp_tok.detach(), R), values_old[mb, :R], m, cfg.gamma, cfg.gae_lambda)
        adv = (adv - adv_mean) / (adv_std + 1e-8)
        pg = ppo_policy_loss(logp_tok, logp_t_tok[mb, :R], adv, m, cfg.clip_eps, cfg.clip_eps_high,
                             None if tis is None else tis[mb, :R])
        vf = value_loss(values, values_old[mb, :R], returns, m, cfg.value_clip)
        loss = torch.where(valid[mb], pg + cfg.vf_coef * vf, 0.0)
        ratio = (logp_tok.detach() - logp_t_tok[mb, :R]).exp()
        return loss.sum(), {"policy_loss": pg.mean().item(), "value_loss": vf.mean().item(),
                            "ratio_clip_frac": masked_mean(outside_clip(ratio, cfg.clip_eps, cfg.clip_eps_high).float(),
                                                           m).mean().item(),
                            "kl_pi_t": (logp_t_tok[mb, :R] - logp_tok.detach()).sum(1).mean().item()}

    with infra.timed(timer, "update"):
        upd = loop.minibatch_updates(cfg, ctx, run, len(batch), cfg.online_batch // cfg.minibatch, cfg.micro_batch,
                                     loss_fn, cfg.epochs, cost=batch.lengths())
    return loop.online_metrics(step, cfg, ctx, run, batch, rewards, invalid, logp_t_tok, logp_0_tok, upd, timer,
                               logp_diff=logp_diff, extra={"train/adv_mean": adv_mean, "train/adv_std": adv_std,
                                                           **tis_metrics})


def sequence_step(step, cfg, ctx, run):
    """DAO (both forms), RLOO and GRPO: K samples per prompt, per-sequence advantages, no value model."""
    timer = {}
    batch, rewards, invalid, logp_t_tok, logp_0_tok, logp_diff = sample_judge_score(step, cfg, ctx, run, timer)
    logp_t, logp_0 = logp_t_tok.sum(1).cpu(), logp_0_tok.sum(1).cpu()                      # [N]
    mask = batch.response_mask.float()
    tis, tis_metrics = truncated_is(cfg, ctx, batch, logp_t_tok)                        # --tis-cap  [N, R]

    # 4. advantages                                                                         [N]
    if cfg.algo == "rloo":
        adv = rloo_advantages(kl_penalised_rewards(rewards, logp_t, logp_0, cfg.beta), cfg.k)
    elif cfg.algo == "grpo":
        every = infra.gather(ctx, rewards.to(ctx.device)).cpu() if cfg.scale_rewards == "batch" else None
        adv = grpo_advantages(rewards, cfg.k, scale=cfg.scale_rewards, batch_rewards=every)
    else:  # DAO: DAR's Monte-Carlo advantage and batch normalisation (Algorithm 1)
        adv = loop.group_advantages(rewards, cfg.k)
        if cfg.normalize_adv:
            mu, sigma = loop.advantage_stats(infra.gather(ctx, adv.to(ctx.device)).cpu())
            adv = (adv - mu) / (sigma + 1e-8)
    valid = ~torch.isnan(adv)
    # RLOO and GRPO need 2 valid judgments in a prompt's group; none such on any rank: no update (loop.train)
    loop.skip_unusable(cfg, ctx, rewards, valid, "no prompt has 2 valid judgments")
    adv = torch.nan_to_num(adv).float()                       # invalid: A = 0, and masked out of the loss below

    # 5. updates
    def loss_fn(mb):
        part = batch.select(mb).to(ctx.device)
        R = part.response_mask.shape[1]
        logp_tok = rollout.token_logps(run.ddp, part)                                       # [n, R]
        logp = logp_tok.sum(1)
        a, lt, l0 = adv[mb].to(logp.device), logp_t[mb].to(logp.device), logp_0[mb].to(logp.device)
        if cfg.algo == "grpo":
            loss = grpo_loss(logp_tok, logp_t_tok[mb, :R], logp_0_tok[mb, :R], a, mask[mb, :R].to(logp.device),
                             cfg.clip_eps, cfg.beta, cfg.clip_eps_high, cfg.loss_agg, cfg.max_new_tokens,
                             None if tis is None else tis[mb, :R])
        # rloo, dao: a batch's later updates see samples of pi_t, not of the moved pi_theta: the clipped ratio
        elif cfg.algo == "rloo":
            loss = rloo_loss(logp, a, cfg.max_new_tokens, logp_old=lt, clip_eps=cfg.clip_eps,
                             clip_eps_high=cfg.clip_eps_high)
        elif cfg.algo == "dao":
            loss = dao_loss(logp, lt, l0, a, cfg.alpha, cfg.beta, cfg.max_new_tokens, logp_old=lt,
                            clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high)
        else:
            loss = dao_ppo_loss(logp, lt, l0, a, cfg.alpha, cfg.beta, cfg.max_new_tokens)
        loss = torch.where(valid[mb].to(logp.device), loss, 0.0)
        rho = (logp.detach() - lt).exp()
        return loss.sum(), {"kl_pi_t": (lt - logp.detach()).mean().item(),
                            "ratio_clip_frac": outside_clip(rho, cfg.clip_eps, cfg.clip_eps_high).float().mean().item()}

    # --loss-agg token: a minibatch's loss is divided by its response tokens (of valid sequences, all ranks), not
    # by its sequences: each sequence counts as many times as it has tokens (minibatch_updates' `used`)
    tokens = mask.sum(1) * valid if cfg.algo == "grpo" and cfg.loss_agg == "token" else None
    with infra.timed(timer, "update"):
        upd = loop.minibatch_updates(cfg, ctx, run, len(batch), cfg.online_batch // cfg.minibatch, cfg.micro_batch,
                                     loss_fn, cfg.epochs, cost=batch.lengths(), used=tokens)
    A = infra.gather(ctx, torch.where(valid, adv.double(), math.nan).to(ctx.device)).cpu()
    A = A[~torch.isnan(A)]
    return loop.online_metrics(step, cfg, ctx, run, batch, rewards, invalid, logp_t_tok, logp_0_tok, upd, timer,
                               logp_diff=logp_diff, extra={"train/adv_abs_mean": A.abs().mean().item(),
                                "train/adv_zero_frac": (A == 0).double().mean().item(), **tis_metrics})


def iter_sft_step(step, cfg, ctx, run):
    """Iterative SFT: the best of K responses per prompt, one SFT update per online batch (Appendix B.3)."""
    timer = {}
    batch, rewards, invalid, logp_t_tok, logp_0_tok, logp_diff = sample_judge_score(step, cfg, ctx, run, timer)

    # 4. the best response of each prompt                                                    [B]
    best, has_valid = best_of_k(rewards, cfg.k)
    loop.skip_unusable(cfg, ctx, rewards, has_valid, "")  # no valid judgment on any rank: no update (loop.train)

    # 5. one optimizer step: SFT (weight 1) on the B best responses, micro-batched
    def loss_fn(mb):
        valid = has_valid[mb].float()
        logp = rollout.token_logps(run.ddp, batch.select(best[mb]).to(ctx.device), seq_grad=valid).sum(1)
        return (loop.sft_loss(logp, cfg.max_new_tokens) * valid.to(logp.device)).sum(), {}

    with infra.timed(timer, "update"):
        upd = loop.minibatch_updates(cfg, ctx, run, len(best), 1, cfg.micro_batch, loss_fn, epochs=1,
                                     cost=batch.lengths()[best])
    best_r = infra.gather(ctx, rewards[best].to(ctx.device)).cpu()
    return loop.online_metrics(step, cfg, ctx, run, batch, rewards, invalid, logp_t_tok, logp_0_tok, upd, timer,
                               logp_diff=logp_diff, extra={"train/best_reward_mean": best_r[~torch.isnan(best_r)].mean().item()})


def pair_step(step, cfg, ctx, run):
    """Online DPO, IPO, SLiC: pairs of each prompt's samples, labelled by the annotator's preference (OAIF) or
    ranked by reward (--pair-labels)."""
    timer, asked = {}, []

    def ask_preferences(batch):  # step 4's annotator call, sent with step 2's (--judge-overlap: during 3.)
        asked.append(loop.judge_async(cfg, run, batch, pairs=disjoint_pairs(len(batch), cfg.k)))
    batch, rewards, invalid, logp_t_tok, logp_0_tok, logp_diff = sample_judge_score(
        step, cfg, ctx, run, timer, ask_preferences if cfg.pair_labels == "preference" else None)
    logp_0 = logp_0_tok.sum(1)                                                              # [N]

    # 4. pairs (y_w, y_l): two samples labelled by the annotator's preference prompt in both orders (Appendix B.1,
    #    B.3 after Guo et al. 2024), or the best and worst of K by the reward prompt's scores           [P]
    if cfg.pair_labels == "preference":
        first, second = disjoint_pairs(len(batch), cfg.k)
        p = judge_preferences(cfg, ctx, run, batch, first, second, asked[0], timer)
    else:
        first, second, p = reward_pairs(rewards, cfg.k)
    chosen, rejected, used = label_pairs(first, second, p)
    P = infra.gather(ctx, p.to(ctx.device)).cpu()                                # every rank's pairs
    ties, invalid_pairs = int((P == 0.5).sum()), int(torch.isnan(P).sum())
    counts = {"pairs/used": len(P) - ties - invalid_pairs, "pairs/ties": ties, "pairs/invalid": invalid_pairs}
    if cfg.pair_labels == "preference":  # no pair with a preference on any rank: no update (loop.train)
        n_invalid = int(torch.isnan(infra.gather(ctx, rewards.to(ctx.device))).sum())  # the reward judgments'
        loop.skip_unusable(cfg, ctx, p, used, "no pair has a preference", "preference judgments", "pairs/invalid",
                           extra={**counts, "train/invalid_judgments": n_invalid})
    else:
        loop.skip_unusable(cfg, ctx, rewards, used, "no prompt has 2 valid judgments of different rewards",
                           extra=counts)
    loss_of = PAIR_LOSSES[cfg.algo]

    # 5. updates: the mean loss over the pairs with a preference; a tie, an inconsistent or an invalid label
    #    adds nothing to a minibatch's loss nor to its divisor (minibatch_updates' `used`)
    def loss_fn(mb):
        n = len(mb)
        logp = rollout.token_logps(run.ddp, batch.select(torch.cat([chosen[mb], rejected[mb]])).to(ctx.device)).sum(1)
        lw, ll = logp[:n], logp[n:]
        rw, rl = logp_0[chosen[mb]].to(lw.device), logp_0[rejected[mb]].to(lw.device)
        loss = torch.where(used[mb].to(lw.device), loss_of(lw, ll, rw, rl, cfg.beta), 0.0)
        return loss.sum(), {"margin": ((lw - rw) - (ll - rl)).detach()[used[mb]].mean().item()
                            if used[mb].any() else 0.0}

    with infra.timed(timer, "update"):
        upd = loop.minibatch_updates(cfg, ctx, run, len(chosen), cfg.online_batch // cfg.minibatch,
                                     max(1, cfg.micro_batch // 2), loss_fn, cfg.epochs,
                                     cost=torch.maximum(batch.lengths()[chosen], batch.lengths()[rejected]), used=used)
    return loop.online_metrics(step, cfg, ctx, run, batch, rewards, invalid, logp_t_tok, logp_0_tok, upd, timer,
                               logp_diff=logp_diff,
                               extra={**counts, "pairs/with_preference_frac": counts["pairs/used"] / len(P)})


def offline_pair_step(step, cfg, ctx, run):
    """Offline DPO, SimPO, IS-DPO: one optimizer step on a minibatch of the task's preference data set."""
    per_rank = cfg.minibatch // 2 // ctx.world                                 # pairs on this rank
    data = run.task.pref_data
    idx = loop.prompt_indices(step, cfg.minibatch // 2, len(data), cfg.seed)[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    prompts, chosen, rejected = zip(*(data[i] for i in idx))
    # rows 0..n-1 hold y_w, rows n..2n-1 hold y_l of the same prompts
    batch = rollout.from_texts(run.tok, list(prompts) * 2, list(chosen) + list(rejected))
    ref = loop.score(run.ref, batch, cfg.micro_batch).sum(1)                                # log pi_0  [2n]
    lengths = batch.response_mask.sum(1).float()
    ratios = []  # unclipped pi_theta/pi_0 of each pair at its update: how far --is-clip is from the data  [n]

    def loss_fn(mb):
        rows = torch.cat([mb, mb + per_rank])
        logp = rollout.token_logps(run.ddp, batch.select(rows).to(ctx.device)).sum(1)
        n = len(mb)
        lw, ll, rw, rl = logp[:n], logp[n:], ref[mb].to(logp.device), ref[mb + per_rank].to(logp.device)
        if cfg.algo == "simpo":
            loss = simpo_loss(lw, ll, lengths[mb].to(lw.device), lengths[mb + per_rank].to(lw.device),
                              cfg.beta, cfg.simpo_gamma)
        elif cfg.algo == "is_dpo":
            loss = is_dpo_loss(lw, ll, rw, rl, cfg.beta, cfg.is_clip)
        else:
            loss = dpo_loss(lw, ll, rw, rl, cfg.beta)
        margin = ((lw - rw) - (ll - rl)).detach()
        ratios.append(is_weights(lw, ll, rw, rl, math.inf).double())
        return loss.sum(), {"margin": margin.mean().item(), "pair_accuracy": (margin > 0).float().mean().item()}

    upd = loop.minibatch_updates(cfg, ctx, run, per_rank, 1, max(1, cfg.micro_batch // 2), loss_fn, epochs=1)
    rho = infra.gather(ctx, torch.cat(ratios).to(ctx.device)).cpu()
    return {**{f"train/{k}": v for k, v in infra.rank_means(ctx, upd).items()}, "train/lr": run.sched.get_last_lr()[0],
            "train/is_weight_mean": rho.mean().item(), "train/is_weight_max": rho.max().item(),
            "train/is_clip_frac": (rho > cfg.is_clip).double().mean().item()}


STEPS = {"ppo": ppo_step, "dual_ppo": ppo_step, "dual_ppo_clip": ppo_step, "dual_mix_ppo": ppo_step,
         "dao": sequence_step, "dao_ppo": sequence_step, "rloo": sequence_step, "grpo": sequence_step,
         "iter_sft": iter_sft_step,
         "online_dpo": pair_step, "ipo": pair_step, "slic": pair_step,
         "dpo": offline_pair_step, "simpo": offline_pair_step, "is_dpo": offline_pair_step}
