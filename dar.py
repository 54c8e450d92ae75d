r"""DAR: Dual-regularized Advantage Regression (Algorithm 1 of "Unifying Stable Optimization and Reference
Regularization in RLHF", ICLR 2026): one online loop around one weighted-SFT loss.

    python dar.py                                    # built-in toy task on a CPU, a few minutes
    torchrun --nproc_per_node 2 dar.py               # the same, 2 processes (gloo on CPU)
    torchrun --nproc_per_node 8 dar.py --task helpful --model Qwen/Qwen2-7B-Instruct \
        --judge-url http://ANNOTATOR:8000/v1         # H100s (NCCL, bf16); the annotator: docs/paper-tasks.md
    python dar.py --algo grpo                        # any baseline of the paper (baselines.py), same loop
    python dar.py --resume                           # continue the run in --out-dir from its last checkpoint
    python dar.py --help                             # every flag with its default, DAR's own first

Each online batch t of Algorithm 1 is one call of dar_step, one function per line of the algorithm box:
    1. prompts x and K responses y_1..y_K ~ pi_t(.|x) each              loop.sample (rollout.py samples)
    2. rewards r(x, y_i)                                                  loop.judge_async, judge_batch (judge.py)
    3. A_i = r_i - mean_K r, then batch statistics mu_A, sigma_A          loop.group_advantages, advantage_stats
    4. log pi_t(y|x) and log pi_0(y|x), once, before any update           loop.pi_t_logps, loop.score
    5. w_i = min((pi_0/pi_t)^alpha exp(A_norm/beta), w_clip)     (Eq. 4)  dar_weights
    6. optimizer steps on -mean_i w_i log pi_theta(y_i|x)         (Eq. 4)  weighted_sft_loss, loop.minibatch_updates
    7. pi_{t+1} <- pi_theta: the next batch samples from the updated policy
loop.train runs the batches (checkpoints, resume, logging, faults); infra.py is plumbing a learner may skip.

Where this code departs from the paper (README: "Where this code departs from the paper"):
    1. pi_theta, pi_t and pi_0 are the models at the sampling temperature (--temperature 0.9): log-probs are
       log softmax(logits / T), so pi_t is the distribution that drew the samples (--logp-temperature 1: raw).
    2. The loss of a sequence is divided by the constant max_new_tokens: a token-mean gradient scale for the
       learning rate, with the same minimiser as Eq. 4.
    3. mu_A and sigma_A are taken over the whole online batch, on all ranks; an invalid judgment gets weight 0.
    4. With no flags it runs a toy task: a 0.3M-parameter Qwen2 and a rule for a judge, instead of Qwen2-7B and
       a 72B annotator, with batch sizes and the learning rate scaled to match.
"""
import json
import math
import os
import signal

if __name__ == "__main__":  # Ctrl-C while torch and transformers import (seconds): the default action, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import torch
import transformers

import baselines
import rollout
import data
from config import NO_EVALUATION, check_config, parse_config, settings_line, trainer_state
from eval import compare_with_reference, evaluator_note, print_report
from infra import (barrier, claim_run_dir, ctrl_c_line, end_distributed, exit_on_ctrl_c, export_hf, fetch_from_hub,
                   gather, kill_point, load_model, setup_distributed, timed, write_atomic)
from judge import AnnotatorUnavailable
from loop import (advantage_stats, group_advantages, judge_async, judge_batch, minibatch_updates, online_metrics,
                  pi_t_logps, sample, score, sft_step, skip_unusable, train)

# DAR's own flags, the first fields of config.Config (`python dar.py --help` lists them first, with the
# paper's values, Appendix B.2), and the symbols of Eq. 3-4 they set:
#   cfg.alpha          alpha: the target pi_0^alpha pi_t^(1-alpha) exp(A/beta) mixes KL(pi||pi_0) and KL(pi||pi_t)
#   cfg.beta           beta: the temperature of the advantage weight exp(A_norm / beta)
#   cfg.w_clip         w_clip: the cap on w_reg * w_adv
#   cfg.normalize_adv  A_norm = (A - mu_A) / sigma_A over the online batch (Algorithm 1)


# ---------------------------------------------------------------------------------------------------
# ALGO LOGIC: the DAR loss (Eq. 4) and its pieces. Per-sequence tensors, shape [N]; usable on their own.
# ---------------------------------------------------------------------------------------------------
def dar_weights(adv, logp_t, logp_0, alpha, beta, w_clip, normalize=True, adv_mean=None, adv_std=None):
    """w_i = min(w_reg * w_adv, w_clip) of Eq. 4, computed in log space; no gradient flows through it.

    adv: A(x, y_i) [N] (NaN = invalid, weight 0); logp_t, logp_0: log pi_t(y_i|x), log pi_0(y_i|x) [N],
    sums over response tokens. With normalize, A_norm = (A - mu_A) / sigma_A, where (mu_A, sigma_A) are
    adv_mean/adv_std if given (the loop passes statistics of the whole online batch, all ranks) or else
    those of adv itself. w_clip=None switches clipping off (the exact Eq. 4). Returns (w, parts).
    """
    adv, logp_t, logp_0 = adv.detach().double(), logp_t.detach().double(), logp_0.detach().double()
    valid = ~torch.isnan(adv)
    if normalize:
        mu, sigma = advantage_stats(adv) if adv_mean is None else (adv_mean, adv_std)
        adv = (adv - mu) / (sigma + 1e-8)                                     # A_norm  [N]
    log_w_reg = alpha * (logp_0 - logp_t)                 # log (pi_0 / pi_t)^alpha       [N]
    log_w_adv = adv / beta                                # log exp(A_norm / beta)        [N]
    log_w = log_w_reg + log_w_adv                         # log (w_reg * w_adv)           [N]
    log_clip = math.inf if w_clip is None else math.log(w_clip)
    w = torch.where(valid, log_w.clamp(max=log_clip).exp(), 0.0)  # min(w_reg * w_adv, w_clip)  [N]
    return w.float(), dict(log_w_reg=log_w_reg, log_w_adv=log_w_adv, clipped=valid & (log_w > log_clip))


def weighted_sft_loss(logp, w, length_norm=1.0):
    """-w_i log pi_theta(y_i|x_i) / length_norm per sequence [N]: the weighted SFT objective of Eq. 4.

    logp: log pi_theta(y_i|x_i) [N] (token sums, with gradient); w: [N] constant weights. length_norm is a
    constant (the loop uses max_new_tokens): it rescales the gradient like a token mean would, without
    changing which policy minimises the loss.
    """
    return -w.detach() * logp / length_norm


def dar_loss(logp, logp_t, logp_0, adv, alpha=0.1, beta=0.05, w_clip=20.0, normalize=True,
             adv_mean=None, adv_std=None, length_norm=1.0):
    """L_DAR(theta) = -E_{y~pi_t}[ min((pi_0/pi_t)^alpha exp(A/beta), w_clip) log pi_theta(y|x) ]  (Eq. 4)

    The maximiser of Eq. 3, pi* = pi_0^alpha pi_t^(1-alpha) exp(A/beta) / Z (Theorem 4.2), is projected
    onto the model family by argmin_theta KL(pi* || pi_theta); with samples from pi_t that is the weighted
    SFT above (Appendix A.3). Its gradient is -mean_i w_i grad log pi_theta(y_i|x) (Algorithm 1).
    All inputs are per-sequence [N]; see dar_weights and weighted_sft_loss. Returns (per-sequence loss [N], w).
    """
    w, _ = dar_weights(adv, logp_t, logp_0, alpha, beta, w_clip, normalize, adv_mean, adv_std)
    return weighted_sft_loss(logp, w.to(logp.device), length_norm), w


# ---------------------------------------------------------------------------------------------------
# ALGO LOGIC: one online batch of Algorithm 1
# ---------------------------------------------------------------------------------------------------
def dar_step(step, cfg, ctx, run):
    """One online batch of Algorithm 1 on this rank's share of it. Returns its metrics."""
    timer = {}

    # 1. sample prompts x (this rank's share) and K responses each from pi_t          [N = prompts * K]
    with timed(timer, "sample"):
        batch = sample(step, cfg, ctx, run)

    # 2. rewards r(x, y_i) from the judge, its call started now (NaN = invalid judgment)  [N]
    pending = judge_async(cfg, run, batch)  # --judge-overlap: an annotator judges while step 4 computes

    # 4. log pi_t(y|x) and log pi_0(y|x), once per online batch: pi_t is the policy that sampled the batch
    with timed(timer, "logp_t"):
        logp_t_tok, logp_diff = pi_t_logps(cfg, ctx, run, batch)                               # [N, R]
    with timed(timer, "logp_0"):
        logp_0_tok = score(run.ref, batch, cfg.micro_batch)                                     # [N, R]
    logp_t, logp_0 = logp_t_tok.sum(1).cpu(), logp_0_tok.sum(1).cpu()                  # [N]
    rewards, invalid = judge_batch(cfg, ctx, run, batch, pending, timer)  # step 2's rewards, waited for
    skip_unusable(cfg, ctx, rewards, ~torch.isnan(rewards), "")  # no valid judgment on any rank: no update

    # 3. advantages: A_i = r_i - mean_K r (per prompt, on this rank), then batch statistics mu_A, sigma_A over
    #    the whole online batch (all ranks), so the result does not depend on the number of ranks  [N]
    adv = group_advantages(rewards, cfg.k)
    adv_mean, adv_std = advantage_stats(gather(ctx, adv.to(ctx.device)).cpu())

    # 5. weights w_i = min((pi_0/pi_t)^alpha * exp(A_norm/beta), w_clip)  (Eq. 4)        [N]
    w, parts = dar_weights(adv, logp_t, logp_0, cfg.alpha, cfg.beta, cfg.w_clip, cfg.normalize_adv,
                           adv_mean, adv_std)

    # 6. weighted SFT, -w_i log pi_theta(y_i|x) with the weights of step 5 (Eq. 4): online_batch / minibatch
    #    optimizer steps per epoch, each on a random minibatch; the loop divides a minibatch's sum by its size.
    #    Eq. 4 is linear in log pi_theta, so its gradient (proportional to w_i) is known before the forward:
    #    seq_grad lets the LM head form its gradients there (rollout.head_logps' grad_hint)
    def loss_fn(mb):
        logp = rollout.token_logps(run.ddp, batch.select(mb).to(ctx.device), seq_grad=w[mb]).sum(1)  # [n]
        loss = weighted_sft_loss(logp, w[mb].to(logp.device), length_norm=cfg.max_new_tokens)  # [n]
        return loss.sum(), {"kl_pi_t": (logp_t[mb] - logp.detach().cpu()).mean().item()}

    with timed(timer, "update"):
        upd = minibatch_updates(cfg, ctx, run, len(batch), cfg.online_batch // cfg.minibatch, cfg.micro_batch,
                                loss_fn, cfg.epochs, cost=batch.lengths())

    # 7. pi_{t+1} <- pi_theta: the next online batch samples from the updated policy (nothing to copy with the
    #    transformers sampler; train() pushes the new weights into a vLLM sampler after every online batch)

    g = lambda x: gather(ctx, x.to(ctx.device, torch.float64)).cpu()
    A, W = g(adv), g(w)
    valid = ~torch.isnan(A)
    lw_reg, lw_adv, clipped = g(parts["log_w_reg"]), g(parts["log_w_adv"]), g(parts["clipped"].double())
    return online_metrics(step, cfg, ctx, run, batch, rewards, invalid, logp_t_tok, logp_0_tok, upd, timer,
                          logp_diff=logp_diff, extra={
        "train/adv_mean": adv_mean, "train/adv_std": adv_std,
        "train/adv_tied_frac": (A[valid] == 0).double().mean().item(),
        "weights/w_reg_mean": lw_reg[valid].exp().mean().item(),
        "weights/log_w_reg_min": lw_reg[valid].min().item(), "weights/log_w_reg_max": lw_reg[valid].max().item(),
        "weights/w_adv_median": lw_adv[valid].exp().median().item(),
        "weights/w_mean": W[valid].mean().item(), "weights/w_max": W[valid].max().item(),
        "weights/clip_frac": clipped[valid].mean().item(),
        "weights/zero_frac": (W[valid] < 1e-3).double().mean().item()})


# every --algo: DAR, supervised fine-tuning (loop.py) and the paper's baselines, all through loop.train
STEPS = {"dar": dar_step, "sft": sft_step, **baselines.STEPS}


def main(argv=None):
    transformers.utils.logging.disable_progress_bar()  # one tqdm bar: ours
    cfg = parse_config(argv)
    if cfg.export_hf:
        export_hf(cfg.export_hf, cfg.out_dir)
        print(f"wrote {cfg.out_dir}", flush=True)
        return
    ctx = setup_distributed(cfg)
    check_config(cfg, ctx.world)
    claim_run_dir(cfg, ctx)  # a previous run in --out-dir: refused, or moved aside by --overwrite
    if ctx.master:
        print(settings_line(cfg), flush=True)
    fetch_from_hub(cfg, ctx)  # a Hub id becomes its snapshot directory; rank 0 downloads, before anything loads
    run = None
    try:
        run = train(cfg, ctx, STEPS[cfg.algo])
        evaluated = cfg.algo != "sft" and cfg.eval_prompts > 0 and cfg.eval_judge != NO_EVALUATION
        if evaluated and ctx.master:  # the end-of-run comparison with pi_0
            policy, ref = run.policy, run.ref
            if cfg.fsdp:  # sharded models answer only when every rank calls them: rank 0 evaluates whole copies
                policy = load_model(os.path.join(cfg.out_dir, "final"), cfg, ctx.device, frozen=True)
                ref = load_model(run.init, cfg, ctx.device, frozen=True)
            if evaluator_note(cfg):
                print(evaluator_note(cfg), flush=True)
            prompts, _ = data.random_subset(run.task.eval_prompts, cfg.eval_prompts, cfg.eval_seed)  # as eval.py
            state = trainer_state(cfg, cfg.steps, len(run.task.train_prompts), run.sched.last_epoch)
            try:
                report = compare_with_reference(policy, ref, run.tok, prompts, cfg, task=run.task,
                                                seed=cfg.eval_seed, state=state)
            except AnnotatorUnavailable as e:  # the trained model is saved: only its evaluation is missing
                raise SystemExit(f"error: the final evaluation: {e}. The trained model is in "
                                 f"{os.path.join(cfg.out_dir, 'final')}; evaluate it with `python eval.py "
                                 f"{cfg.out_dir}` once the annotator answers") from None
            kill_point("eval.json")  # test only (infra.kill_point)
            write_atomic(os.path.join(cfg.out_dir, "eval.json"), json.dumps(report, indent=1))
            print_report(report)
        barrier(ctx)
    finally:
        if run is not None and run.sampler is not None:
            run.sampler.close()  # vLLM's shutdown may take the default process group down with it
        end_distributed(run)


if __name__ == "__main__":
    exit_on_ctrl_c(lambda: ctrl_c_line(parse_config()))  # where the run stands when Ctrl-C comes
    main()
