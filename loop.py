"""The online loop every algorithm shares, and the pieces of Algorithm 1 that are not DAR's own.

    train(cfg, ctx, step_fn)   load pi_0 (and pi_theta, and PPO's value model), then one step_fn per online
                               batch, with checkpoints, resume, logging and the fault policy
    sample, judge_batch        steps 1 and 2: K responses per prompt from pi_t, and their rewards
    group_advantages           step 3: A_i = r_i - mean_K r
    pi_t_logps, score          step 4: log pi_t and log pi_0 of the sampled tokens, once per batch
    minibatch_updates          step 6's optimizer steps, with gradient accumulation under DDP / FSDP2
    online_metrics             what every online algorithm logs
    evaluate_during_training   --eval-every: the policy against pi_0 on held-out prompts (eval/*), and the best
    sft_step                   supervised fine-tuning (the toy task's pi_0 is made with it)

A reader of dar.py can take these by their names; infra.py below holds what a learner can skip entirely.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import rollout
import tasks
from config import (NO_EVALUATION, OFFLINE, VALUE_MODEL, Config, check_resumable, prompt_limit, resolve_schedule,
                    trainer_state, usable_window)
from infra import (SAMPLES, Dist, Logger, TermSignal, barrier, checkpoint_name, gather, is_sharded_checkpoint,
                   kill_point, latest_checkpoint, load_model, load_sharded_checkpoint, load_state, load_tokenizer,
                   load_value_model, local_gradients, model_dtype, no_dropout, optimizer_and_schedule, optimizer_step,
                   pooled_means, print_samples, prune_checkpoints, rank_means, resume_checkpoint, rng_state,
                   sample_rows, save_checkpoint, save_final, seed_everything, set_rng_state, silent_ranks,
                   trained_modules, write_atomic)
from judge import AnnotatorUnavailable, make_judge
from rewards import (NO_JUDGE, TRAINING_REWARD, CombinedReward, RewardFunctionError, describe_reward, judge_rollout,
                     with_functions)


# ---------------------------------------------------------------------------------------------------
# Pieces of Algorithm 1 that the baselines share. Per-sequence tensors, shape [N]. Every loss in this project
# returns one term per sequence (or per pair): the objective is their mean over the online batch, and the loop
# divides a minibatch's sum by its size.
# ---------------------------------------------------------------------------------------------------
def group_advantages(rewards, k):
    """Monte-Carlo advantage of Algorithm 1: A(x, y_i) = r(x, y_i) - (1/K) sum_j r(x, y_j).

    rewards: [B*K], the K responses of a prompt adjacent; NaN marks an invalid judgment. Invalid samples
    are left out of their group's mean and get A = NaN (the loss gives them zero weight). When all K
    rewards of a prompt tie, every A is 0: that group carries no preference signal.
    """
    r = rewards.view(-1, k)                                                   # [B, K]
    valid = ~torch.isnan(r)
    mean = torch.where(valid, r, 0.0).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    return torch.where(valid, r - mean, math.nan).view(-1)                    # [B*K]


def advantage_stats(adv):
    """(mu_A, sigma_A) over the valid entries of adv (Algorithm 1's batch-based mean and std)."""
    a = adv[~torch.isnan(adv)].double()
    if a.numel() < 2:
        return 0.0, 1.0
    return a.mean().item(), a.std(correction=0).item()


def k3(logp, logp_ref, mask):
    """Schulman's k3 estimate of KL(pi || pi_ref) per sequence, from tokens sampled from pi: [N].

    Per token, with r = pi_ref/pi: (r - 1) - log r >= 0, unbiased for that token's KL; summed over the
    response (chain rule) it estimates the sequence-level KL. expm1 keeps it accurate when the policies
    are close (exp(d) - 1 - d in float32 loses most digits at |d| ~ 1e-3).
    """
    d = logp_ref - logp
    return torch.where(mask.bool(), torch.expm1(d) - d, 0.0).sum(1)


def sft_loss(logp, length_norm=1.0):
    """-log pi_theta(y_i|x_i) / length_norm per sequence [N]: supervised fine-tuning (DAR's weighted SFT with
    every w_i = 1). logp: token sums with gradient; length_norm: a constant (the loop uses max_new_tokens)."""
    return -logp / length_norm


# ---------------------------------------------------------------------------------------------------
# The run: what a step works on, and the loop over online batches with its fault policy
# ---------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a training step works on besides the config and the process group."""
    task: object
    tok: object
    judge: object            # None for offline algorithms
    policy: torch.nn.Module  # pi_theta, unwrapped
    ddp: torch.nn.Module     # pi_theta, DDP-wrapped when there are several ranks (the one to call for gradients)
    ref: object              # pi_0, frozen; None for --algo sft
    opt: object
    sched: object
    value: object = None     # the PPO family's value model, unwrapped
    value_ddp: object = None
    sampler: object = None   # a rollout.VllmSampler with --rollout vllm; None = transformers generate on the policy
    init: str = ""           # pi_0's model directory
    batches: int = 0         # online batches done before the one being trained (the reward functions' trainer_state)
    best: dict = None        # the best evaluation so far (--eval-every): what best.json holds; each checkpoint keeps it

    @property
    def trained(self):
        """The modules the optimizer updates, as called for gradients (DDP-wrapped)."""
        return [m for m in (self.ddp, self.value_ddp) if m is not None]


MAX_NONFINITE_BATCHES = 3  # online batches in a row with a non-finite loss before the run stops


class JudgeFailure(Exception):
    """More invalid judgments in an online batch than --max-invalid-frac allows, a reward function that raised,
    or an annotator that did not answer for --judge-patience seconds."""


class SkippedBatch(Exception):
    """An online batch with nothing to learn from (skip_unusable): train logs `metrics` and goes on to the next
    batch without an update."""

    def __init__(self, why, metrics):
        super().__init__(why)
        self.metrics = metrics


def start_run(cfg, ctx):
    """(Run, first step): the task, the tokenizer, pi_theta (from the last intact checkpoint with --resume, with its
    optimizer, schedule and RNG state), PPO's value model, pi_0, the judge and the sampler, placed for this rank."""
    init = cfg.model
    if not init:
        base, sft = ensure_toy_models(cfg, ctx)
        init = base if cfg.algo == "sft" else sft
    seed_everything(cfg.seed + 1000 * ctx.rank)  # after the (maybe) in-process SFT that made pi_0
    task = tasks.load_task(cfg.task, cfg.data, cfg.eval_fraction, cfg.valid_fraction)  # bad data stops here
    tok = load_tokenizer(init, cfg.trust_remote_code, cfg.chat_template_kwargs)
    start, run_best, ckpt = 0, None, resume_checkpoint(cfg, ctx) if cfg.resume else None  # the newest intact one
    if cfg.resume and ckpt is None and ctx.master:
        print(f"--resume: no checkpoint in {cfg.out_dir}, starting from scratch", flush=True)
    sharded_ckpt = ckpt is not None and is_sharded_checkpoint(ckpt)  # its weights are read in after sharding
    weights = init if sharded_ckpt else ckpt or init
    policy = load_model(weights, cfg, ctx.device, sharded=cfg.fsdp)
    policy.config.use_cache = False
    task, skipped = fitting_task(cfg, task, tok, policy.config)
    if ctx.master:
        report_long_prompts(cfg, skipped)
        report_small_splits(cfg, task)
    resolve_schedule(cfg, task)
    value = None
    if cfg.algo in VALUE_MODEL:
        value = load_value_model(os.path.join(ckpt, "value") if ckpt and not sharded_ckpt
                                 else cfg.value_model or init, cfg, ctx.device, sharded=cfg.fsdp)
    models = [m for m in (policy, value) if m is not None]
    for m in models:  # the loss's passes run in train mode (where gradient checkpointing acts), dropout off
        no_dropout(m).train()
    if cfg.gradient_checkpointing:  # the no-grad passes (eval mode: score, generate) keep their activations
        for m in models:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt, sched = optimizer_and_schedule(cfg, models)
    if ckpt:
        state = load_state(os.path.join(ckpt, "state.pt"))
        check_resumable(cfg, state["config"])
        if sharded_ckpt:
            load_sharded_checkpoint(ckpt, trained_modules(policy, value), opt)
        else:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, run_best = state["step"], state.get("best")
        if ctx.rank < len(state["rng"]):  # the random streams of the ranks the checkpoint had go on
            set_rng_state(state["rng"][ctx.rank])
        if len(state["rng"]) != ctx.world and ctx.master:
            print(ranks_changed(ckpt, len(state["rng"]), ctx.world), flush=True)
    wrapped = models  # a sharded model is called as it is: FSDP2 has no wrapper
    if ctx.world > 1 and not cfg.fsdp:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = [DistributedDataParallel(m, device_ids=ids) for m in models]
    ref = None
    if cfg.algo != "sft":  # pi_0: a frozen copy of the initial policy
        ref = load_model(init, cfg, ctx.device, sharded=cfg.fsdp, frozen=True)
    run = Run(task, tok, training_reward(cfg, task, tok) if cfg.algo not in OFFLINE else None, policy, wrapped[0], ref,
              opt, sched, value, wrapped[1] if value is not None else None, init=init, best=run_best)
    if cfg.rollout == "vllm" and cfg.algo not in OFFLINE:
        run.sampler = rollout.VllmSampler(weights, model_dtype(cfg, ctx.device), cfg.seed + 1000 * ctx.rank,
                                          context_window(cfg, policy.config), cfg.vllm_gpu_memory, ctx.world,
                                          cfg.trust_remote_code, tempered_logprobs=logp_temperature(cfg) != 1)
        if sharded_ckpt:
            run.sampler.push_weights(policy)
    return run, start


def ranks_changed(ckpt, saved, world):
    """The line a resume on another number of ranks prints: the run goes on (DDP as FSDP2), not bit-exact."""
    kept = "rank 0 continues its random stream" if min(saved, world) == 1 else \
        f"ranks 0..{min(saved, world) - 1} continue their random streams"
    fresh = f", rank{'s' * (world - saved > 1)} {saved}..{world - 1} start from --seed + 1000 r" \
        if world - saved > 1 else f", rank {saved} starts from --seed + 1000 r" if world > saved else ""
    return (f"--resume: {os.path.basename(ckpt)} was written by {saved} rank{'s' * (saved > 1)} and this run has "
            f"{world}: it goes on, but not bit for bit as {saved} rank{'s' * (saved > 1)} would have: each online "
            f"batch has the same prompts, split over {world} rank{'s' * (world > 1)}, and their responses are "
            f"sampled from other random streams ({kept}{fresh})")


def train(cfg, ctx, step_fn):
    """Run cfg.algo for cfg.steps, one step_fn(step, cfg, ctx, run) -> metrics per online batch (dar.dar_step,
    baselines.STEPS, sft_step); returns the Run (policy trained). Resumes when cfg.resume.

    The fault policy: a batch whose judgments are mostly invalid stops the run before training on it (with a
    checkpoint of the batches before); a batch with nothing to learn from (with --max-invalid-frac 1.0, every
    judgment invalid) is logged and skipped without an update (SkippedBatch); a non-finite loss skips that
    batch's updates and its checkpoint, and MAX_NONFINITE_BATCHES in a row stop the run; SIGTERM or Ctrl-C
    (SIGINT) finishes the batch, checkpoints and exits 143 or 130 (a second Ctrl-C stops at once)."""
    run, start = start_run(cfg, ctx)
    log = Logger(cfg, ctx, start)
    ev = start_training_eval(cfg, ctx, run)
    if ctx.master and start == 0:
        print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not ctx.master,
               desc=cfg.algo, dynamic_ncols=True)
    term, nonfinite_run, finished = TermSignal(ctx.master, lambda: latest_checkpoint(cfg)), 0, False
    try:
        for step in bar:
            t0, rng_before, run.batches = time.time(), rng_state(), step
            try:
                metrics = step_fn(step, cfg, ctx, run)
            except JudgeFailure as e:  # nothing of this batch was trained on: keep the work before it, stop
                set_rng_state(rng_before)  # --resume then draws this batch again, as an uninterrupted run would
                # unless written already (a save step, or the best evaluation's): rewritten, `latest` would name a
                # directory that is gone for a moment
                if step > start and latest_checkpoint(cfg) != os.path.join(cfg.out_dir, checkpoint_name(step)) \
                        and step % cfg.save_every:
                    save_checkpoint(cfg, ctx, step, run)
                last = latest_checkpoint(cfg) or "none yet (no batch was trained)"
                raise SystemExit(f"error: online batch {step + 1}: {e}. Stopped before training on it; the "
                                 f"last checkpoint is {last}. Once the judge (or reward function) works, continue "
                                 "with --resume.")
            except SkippedBatch as e:  # raised on every rank together, before any update of this batch
                # No optimizer step, no LR-schedule step (it counts the updates taken), no weight push. The batch
                # counter advances, so the run still ends after --steps batches, and so does the prompt stream
                # (prompt_indices is a function of the batch index): these prompts are not drawn again, which
                # keeps --resume exact. The batch is checkpointed like any other.
                metrics = {**e.metrics, "train/lr": run.sched.get_last_lr()[0]}
                if ctx.master:
                    tqdm.write(f"warning: online batch {step + 1}: {e}; skipped without an update")
            skipped = bool(metrics.setdefault("train/skipped", 0))
            if run.sampler is not None and not skipped:  # step 7 for the vLLM sampler: pi_{t+1} <- pi_theta
                t1 = time.time()
                run.sampler.push_weights(run.policy)
                metrics["perf/weight_sync_s"] = time.time() - t1
            metrics.update({"step": step + 1, "perf/seconds_per_batch": time.time() - t0})
            finite = skipped or math.isfinite(metrics["train/loss"])
            if not skipped:  # a skipped batch has no loss: it neither ends nor extends a run of non-finite ones
                nonfinite_run = 0 if finite else nonfinite_run + 1
            metrics["train/nonfinite_batches_in_a_row"] = nonfinite_run
            evaluated = ev is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)
            if evaluated:
                metrics.update(evaluate_during_training(step, cfg, ctx, run, ev))
            log.log(metrics)  # before the checkpoint: a checkpoint never holds a batch whose row is lost
            if not finite:  # optimizer_step skipped every update whose gradient was not finite
                last = latest_checkpoint(cfg) or "none yet"
                if nonfinite_run >= MAX_NONFINITE_BATCHES:
                    raise SystemExit(f"error: non-finite loss in {nonfinite_run} online batches in a row (up to "
                                     f"{step + 1}); stopped. The last good checkpoint is {last}: lower --lr or "
                                     f"check the rewards, then --resume")
                if ctx.master:
                    tqdm.write(f"warning: online batch {step + 1}: non-finite loss; its non-finite updates were "
                               f"skipped and no checkpoint is written at it ({nonfinite_run} in a row; "
                               f"{MAX_NONFINITE_BATCHES} stop the run)")
            if ctx.master and ((step + 1) % cfg.print_every == 0 or step + 1 == cfg.steps):
                bar.write(summary_line(metrics))
            # The best evaluation so far gets a checkpoint, named in out_dir/best. It is decided before that
            # checkpoint is written, which carries it (state.pt's "best"): a run killed between the checkpoint and
            # best.json resumes with the best that the uninterrupted run has.
            new_best = evaluated and finite and better_eval(metrics, run.best)
            if new_best:
                run.best = best_record(cfg, step + 1, ev, metrics)
            saved = finite and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or new_best)
            if saved:
                save_checkpoint(cfg, ctx, step + 1, run)
            if new_best:
                publish_best(cfg, ctx, run.best)
            stop = term.received(ctx)
            if stop:  # pre-emption or Ctrl-C: keep this batch's work, then stop (the last one's too: no final eval)
                if not saved:
                    save_checkpoint(cfg, ctx, step + 1, run)
                if ctx.master:
                    print(f"{TermSignal.NAMES[stop]} after online batch {step + 1}: checkpoint "
                          f"{latest_checkpoint(cfg)} written; continue with --resume", file=sys.stderr, flush=True)
                raise SystemExit(128 + stop)
        finished = True
    except Exception as e:
        if ctx.world > 1:  # a dead or hung peer surfaces here as a collective's error (or its --dist-timeout)
            silent = silent_ranks(ctx, step) if "Timed out" in str(e) else None  # gloo's --dist-timeout
            culprit = (f"; rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} stopped answering (hung)"
                       if silent else "")
            print(f"error: rank {ctx.rank} failed in online batch {step + 1} ({type(e).__name__}){culprit}; torchrun "
                  f"stops the other ranks. The last checkpoint is {latest_checkpoint(cfg) or 'none yet'}: once the "
                  f"cause is fixed, continue with --resume", file=sys.stderr, flush=True)
        raise
    finally:
        term.restore()
        log.close(failed=not finished)  # the trackers' runs end (wandb: failed, when the run stops early)
    bar.close()
    save_final(cfg, ctx, [m for m in (run.policy, run.value) if m is not None], run.tok)
    return run


# ---------------------------------------------------------------------------------------------------
# What every online algorithm's step does the same way (baselines.py uses these too): sample, judge, the
# log-probs of pi_t and pi_0, minibatch updates with gradient accumulation under DDP, the common metrics
# ---------------------------------------------------------------------------------------------------
def sample(step, cfg, ctx, run):
    """Step 1: this rank's share of the online batch's prompts, K responses each from pi_t: a Rollout [N]."""
    per_rank_prompts = cfg.online_batch // cfg.k // ctx.world
    idx = prompt_indices(step, cfg.online_batch // cfg.k, len(run.task.train_prompts), cfg.seed)
    idx = idx[ctx.rank * per_rank_prompts:(ctx.rank + 1) * per_rank_prompts]
    prompts = [run.task.train_prompts[i] for i in idx]
    if run.sampler is not None:
        batch = run.sampler.generate(run.tok, prompts, cfg.k, cfg.max_new_tokens, cfg.temperature,
                                     rollout.eos_ids(run.policy, run.tok))
        run.sampler.sleep()  # on GPUs: the engine's memory is the updates' until the weight sync wakes it
        return batch
    return rollout.generate(run.policy, run.tok, prompts, cfg.k, cfg.max_new_tokens, cfg.temperature,
                            record_logp=cfg.logp_source == "sampler" or cfg.tis_cap > 0,  # --tis-cap needs them
                            synced=cfg.fsdp and ctx.world > 1,
                            logp_temperature=logp_temperature(cfg))


def logp_temperature(cfg):
    """The temperature of every log-prob of an online batch (--logp-temperature; 0 = the sampling temperature):
    the losses see the distribution that was sampled (rollout.py's layout says why)."""
    return cfg.logp_temperature or cfg.temperature


def judge_batch(cfg, ctx, run, batch, pending=None, timer=None):
    """Step 2: rewards r(x, y_i) [N] (float64, NaN = invalid judgment, an infinite one included) and the number
    of invalid ones. pending: judge_async's handle when the judge's call was started before the log-probs (then
    this waits for it); timer gets judge (the call's own seconds) and judge_wait (what this thread waited).

    Raises JudgeFailure (on every rank alike) when the share of invalid judgments over the whole online batch
    exceeds cfg.max_invalid_frac: a judge that is down or answering garbage, whose batch must not be trained on."""
    judged = judge_or_fail(ctx, pending or judge_async(cfg, run, batch, overlap=False), timer)
    rewards = torch.tensor(judged.rewards, dtype=torch.float64)
    if torch.isinf(rewards).any():  # an infinite reward (a reward model overflowing) is no judgment either
        judged.reasons["infinite reward"] = int(torch.isinf(rewards).sum())
        rewards = torch.where(torch.isinf(rewards), math.nan, rewards)
    invalid = int(torch.isnan(rewards).sum())
    frac = invalid_share(ctx, rewards)
    if frac > cfg.max_invalid_frac:
        reasons = ", ".join(f"{n} {why}" for why, n in judged.reasons.items()) or "no reasons given"
        raise JudgeFailure(f"{frac:.0%} of its judgments are invalid, above --max-invalid-frac "
                           f"{cfg.max_invalid_frac:g} ({judge_name(cfg)}; on this rank: {reasons})")
    return rewards, invalid


_JUDGE_THREAD = ThreadPoolExecutor(1, thread_name_prefix="judge_async")  # one call in flight, in batch order


def judge_async(cfg, run, batch, overlap=None, pairs=None):
    """Start the judge's call on the batch: a Future of (Judgment or None, a RewardFunctionError's message,
    seconds) for judge_batch(pending=). overlap (default --judge-overlap: auto = with --judge llm, whose thread
    only waits on HTTP, while a rule, --reward functions or a reward model would take the log-probs' cores or
    GPU): on a thread while this one computes the log-probs; else here and now. Only the call runs there, no
    collective (two threads issuing them could interleave differently on different ranks and hang). pairs:
    (first, second) row indices [P]: the call is judge.prefer on those pairs instead, its result P(first
    preferred) [P] (online DAP's labels, baselines.judge_preferences); calls run one after another, in order."""
    if pairs is None:  # --reward functions get the sampled token ids and TRL's trainer_state too
        state = trainer_state(cfg, run.batches, len(run.task.train_prompts), run.sched.last_epoch)
        fn, args = judge_rollout, (run.judge, batch, state)
    else:  # prompts of the first rows, responses of the first and of the second rows
        fn = run.judge.prefer
        args = ([batch.prompts[i] for i in pairs[0]], *([batch.responses[i] for i in rows] for rows in pairs))

    def call():
        t = time.time()
        try:
            return fn(*args), "", time.time() - t
        except (RewardFunctionError, AnnotatorUnavailable) as e:  # judge_or_fail stops every rank on it
            return None, str(e), time.time() - t
    if cfg.judge_overlap == "on" or cfg.judge_overlap == "auto" and cfg.judge == "llm" if overlap is None else overlap:
        return _JUDGE_THREAD.submit(call)  # a concurrent.futures.Future: no in_place
    done = Future()
    done.set_result(call())
    done.in_place = True
    return done


def judge_name(cfg):
    """The judge (and --reward functions), as the fault messages name it."""
    where = {"llm": f"the annotator at {cfg.judge_url}", "reward_model": f"the reward model {cfg.reward_model}"}
    return describe_reward(cfg, where.get(cfg.judge, "judge " + cfg.judge))


def training_reward(cfg, task, tok=None, state=None):
    """The training judge, with the --reward functions (rewards.py) when there are any; tok and state: what they
    get for completion_ids of texts that were not sampled and as trainer_state when a call gives none
    (rewards.with_functions)."""
    judge = None if cfg.judge == NO_JUDGE else make_judge(cfg.judge, task, cfg)
    return with_functions(cfg, task, judge, tok, state)


def eval_judge(cfg, task, tok=None, state=None):
    """The evaluation judge: --eval-judge, built from evaluator_config(cfg); --eval-judge reward: the training
    reward itself (--judge with the --reward functions, weighted as in training, tok and state as for
    training_reward), for rewards that are the ground truth (a checked answer) rather than a proxy."""
    if cfg.eval_judge == TRAINING_REWARD:
        return training_reward(cfg, task, tok, state)
    return make_judge(cfg.eval_judge, task, evaluator_config(cfg))


def judge_or_fail(ctx, pending, timer=None, name="judge"):
    """judge_async's result once its call is done (timer: NAME, the call's seconds, and NAME_wait, this thread's
    wait, all of the call when it ran in place); when a reward function raised or the annotator ran out of
    --judge-patience on any rank, JudgeFailure on every rank (a rank stopping alone would leave the others waiting
    in the checkpoint's collectives)."""
    t = time.time()
    judged, error, seconds = pending.result()
    if timer is not None:
        waited = time.time() - t + (seconds if getattr(pending, "in_place", 0) else 0)
        timer.update({name: seconds, name + "_wait": waited})
    failed = gather(ctx, torch.tensor([float(bool(error))], device=ctx.device))
    if failed.any():
        raise JudgeFailure(error or f"the judge failed on rank {int(failed.nonzero()[0])} (its message there)")
    return judged


def reward_components(ctx, judge):
    """reward/<name>: each component's mean over its valid values in the online batch (all ranks), when the
    reward combines a judge with --reward functions (rewards.CombinedReward.components); and under its own name,
    each value the functions gave log_metric, averaged over the batch's calls on every rank, as TRL does."""
    if not isinstance(judge, CombinedReward):
        return {}
    out = {}
    for name, values in judge.components.items():
        v = torch.tensor(values, dtype=torch.float64)
        s = gather(ctx, torch.stack([torch.nan_to_num(v, nan=0.0).sum(), (~torch.isnan(v)).sum().double()])
                   .to(ctx.device)).view(-1, 2).sum(0)
        out[f"reward/{name}"] = (s[0] / s[1]).item() if s[1] else math.nan
    return {**out, **pooled_means(ctx, judge.logged)}


def invalid_share(ctx, judgments):
    """The share of NaN (invalid) entries in every rank's judgments [n] together: the fault policy's measure
    (judge_batch for rewards, baselines.judge_preferences for preference labels), the same on every rank."""
    counts = gather(ctx, torch.tensor([float(torch.isnan(judgments).sum()), float(len(judgments))],
                                      device=ctx.device)).view(-1, 2).sum(0)
    return (counts[0] / counts[1]).item()


def skip_unusable(cfg, ctx, judgments, used, none_used, kind="judgments", key="train/invalid_judgments", extra=None):
    """Raise SkippedBatch when no unit of the online batch, on any rank, is one the loss can use: then no
    update is made (the loss would be 0, yet an optimizer step would still move the weights, and the batch's
    statistics are empty). Every online step calls it after judging, before its updates.

    judgments: this rank's judgments [n], NaN = invalid (rewards, or --pair-labels preference's labels);
    used: which of this rank's units the loss uses [u] bool (a response, a prompt's group, a pair);
    none_used: what the message says when some judgments are valid, e.g. "no prompt has 2 valid judgments";
    kind, key: what the judgments are called in the message and under which metric their invalid count is logged;
    extra: more batch-wide metrics for the skipped batch's row (an online DAP step's pair counts).
    The counts are gathered first, so every rank decides alike and skips the same batch: a rank skipping
    alone would leave the others waiting in the update's collectives.
    """
    counts = gather(ctx, torch.tensor([float(used.sum()), float(torch.isnan(judgments).sum()), float(len(judgments))],
                                      dtype=torch.float64, device=ctx.device)).view(-1, 3).sum(0)
    n_used, n_invalid, n = (int(c) for c in counts.tolist())
    if n_used:
        return
    why = f"all {n} {kind} are invalid" if n_invalid == n else f"{none_used} ({n_invalid} of its {n} {kind} invalid)"
    raise SkippedBatch(f"{why} ({judge_name(cfg)})", {**(extra or {}), "train/skipped": 1, key: n_invalid,
                                                      "train/invalid_frac": n_invalid / max(n, 1)})


def pi_t_logps(cfg, ctx, run, batch):
    """log pi_t(y_j | x, y_<j) of the batch [N, R], once per online batch, and when the sampler gave its own
    log-probs, the mean absolute difference between them and the policy's per sequence (else None).

    The policy's forward pass is the default source: the sampler's copy may differ (bf16 kernels, a
    missed weight sync), and training on its numbers would be silently off-policy. --logp-source sampler
    uses the sampler's instead (vLLM's, or those transformers' generate recorded while sampling) and saves
    that pass: the policy then scores only the first micro-batch, enough to log the difference
    (rollout/logp_abs_diff, logged either way) and to see a missed weight sync.

    Also sets batch.entropy [N, R], pi_t's entropy where each token was sampled (train/entropy), from the
    policy's pass; with --logp-source sampler transformers' generate recorded it already, and vLLM gives none,
    so it is the policy-scored first micro-batch's (NaN on the other rows: train/entropy is over those rows).
    """
    if batch.sampler_logp is None:
        logp, batch.entropy = score(run.policy, batch, cfg.micro_batch, entropy=True)
        return logp, None
    sampler = batch.sampler_logp.to(ctx.device).float()
    rows = slice(None) if cfg.logp_source == "policy" else slice(0, min(cfg.micro_batch, len(batch)))
    logp, entropy = score(run.policy, batch.select(torch.arange(len(batch))[rows]), cfg.micro_batch, entropy=True)
    R = logp.shape[1]  # select() trims the columns that are padding in every row
    if cfg.logp_source == "policy" or batch.entropy is None:
        batch.entropy = torch.full(batch.response_mask.shape, math.nan, device=entropy.device)
        batch.entropy[rows, :R] = entropy
    mask = batch.response_mask[rows, :R].to(logp.device)
    diff = ((sampler[rows, :R] - logp).abs() * mask).sum(1) / mask.sum(1).clamp(min=1)
    if cfg.logp_source == "sampler":
        return sampler, diff
    return torch.nn.functional.pad(logp, (0, sampler.shape[1] - R)), diff


def score(model, batch, micro_batch, per_token=rollout.token_logps, entropy=False):
    """Token log-probs (or any per_token(model, batch) -> [n, R], e.g. PPO's values) of a whole batch under a
    frozen view of `model`, in micro-batches: [N, R]. entropy=True: (log-probs, entropies) [N, R] each, from
    per_token(model, batch, entropy=True) (rollout.token_logps: the distributions' entropies, same chunks).

    Rows go through in order of length, so each micro-batch holds rows of similar length and select() trims
    the padding they share; the results are put back in the batch's order. Inference mode: no autograd
    bookkeeping at all; the returned tensor is an ordinary one (a clone), usable in later losses. A sharded
    model (--fsdp) runs under no_grad instead: FSDP2 keeps the buffers its all-gathers fill and trains
    through them later, which a tensor made in inference mode cannot be.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = torch.argsort(batch.lengths(), stable=True)
    with torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode():
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=device)
        ent = torch.zeros_like(out) if entropy else None
        for i in range(0, len(batch), micro_batch):
            rows = order[i:i + micro_batch]
            part = batch.select(rows).to(device)
            got = per_token(model, part, entropy=True) if entropy else (per_token(model, part),)
            for t, x in zip((out, ent), got):
                t[rows.to(device), :part.response_mask.shape[1]] = x.float()
    model.train(was_training)
    return (out.clone(), ent.clone()) if entropy else out.clone()


def minibatch_updates(cfg, ctx, run, n_units, n_updates, micro_units, loss_fn, epochs, cost=None, used=None):
    """Optimizer steps on one online batch: per epoch, a fresh shuffle of this rank's n_units units (a
    sequence, or a prompt's group), split into n_updates minibatches; each minibatch in micro-batches
    of micro_units units whose gradients accumulate (DDP syncs on the last one only).

    loss_fn(rows) -> (sum of the per-unit losses of units `rows`, {name: float}); the minibatch loss
    is that sum over the minibatch size, so micro-batching never changes the gradient. cost: tokens per
    unit [n_units]; a minibatch's units are then cut into micro-batches in order of cost, so each
    micro-batch pads to similar lengths (the minibatch, hence the update, is the same). used: which units
    count [n_units] bool (None = all); the divisor is then (used units of the minibatch, all ranks) / ranks,
    and DDP averages the ranks' gradients: the gradient is the mean over the units used, and a unit left
    out (an online DAP pair without a preference) dilutes nothing; a minibatch with no used unit on any rank
    takes no optimizer step. used may also be a float weight per unit: with a sequence's response tokens as
    its weight and loss_fn returning token sums, the gradient is the mean over every token of the minibatch on
    all ranks (GRPO's --loss-agg token), whatever the micro-batches. Returns
    {"loss", "grad_norm", and the mean of every reported stat}.
    """
    per_update = n_units // n_updates
    losses, norms, stats = [], [], {}
    for _ in range(epochs):
        order = torch.randperm(n_units)
        for u in range(n_updates):
            rows = order[u * per_update:(u + 1) * per_update]
            if cost is not None:
                rows = rows[torch.argsort(cost[rows], stable=True)]
            micro = [rows[i:i + micro_units] for i in range(0, len(rows), max(1, micro_units))]
            divisor = per_update
            if used is not None:  # the same count on every rank, so every rank skips or steps together
                count = gather(ctx, used[rows].sum().double().to(ctx.device)[None]).sum().item()
                if not count:  # nothing to learn from: no step (Adam's moments would still move the weights)
                    continue
                divisor = count / ctx.world
            loss_sum = 0.0
            for j, mb in enumerate(micro):
                with contextlib.ExitStack() as stack:
                    if ctx.world > 1 and j < len(micro) - 1:
                        for m in run.trained:
                            stack.enter_context(local_gradients(m))
                    loss, info = loss_fn(mb)
                    (loss / divisor).backward()
                loss_sum += loss.item() / divisor
                for k, v in info.items():
                    stats.setdefault(k, []).append(v)
            losses.append(loss_sum)
            norms.append(optimizer_step(cfg, run.trained, run.opt, run.sched))
    if not losses:  # every minibatch skipped (the batch-wide check, skip_unusable, normally comes first)
        return {"loss": 0.0, "grad_norm": 0.0}
    return {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(norms)),
            **{k: float(np.mean(v)) for k, v in stats.items()}}


def online_metrics(step, cfg, ctx, run, batch, rewards, invalid, logp_t_tok, logp_0_tok, upd, timer, extra,
                   logp_diff=None):
    """The metrics every online algorithm logs, over the whole online batch (all ranks), plus `extra`
    (already global) and every stat minibatch_updates reported (averaged over ranks) as train/<name>."""
    g = lambda x: gather(ctx, x.to(ctx.device, torch.float64)).cpu()
    R = g(rewards)
    valid = ~torch.isnan(R)
    lengths, ended = g(batch.response_mask.sum(1)), g(batch.ended)
    kl0 = g(k3(logp_t_tok, logp_0_tok, batch.response_mask.to(logp_t_tok.device)))
    n_invalid = g(torch.tensor([float(invalid)]))
    samples = {}
    if ctx.master and (step + 1) % cfg.sample_every == 0:
        # rank 0's rows, with the columns the reward functions gave log_extra; Logger.log writes the table into
        # metrics.jsonl and sends it to the trackers
        samples[SAMPLES] = sample_rows(batch, rewards.tolist(), getattr(run.judge, "extra", None))
        print_samples(samples[SAMPLES])
    return {
        "train/reward_mean": R[valid].mean().item(), "train/reward_std": R[valid].std(correction=0).item(),
        "train/invalid_judgments": int(n_invalid.sum().item()), "train/invalid_frac": n_invalid.sum().item() / len(R),
        **{f"train/{k}": v for k, v in rank_means(ctx, upd).items()},
        **reward_components(ctx, run.judge),
        "train/kl_pi0": kl0.mean().item(),
        "train/response_len": lengths.mean().item(), "train/missing_eos": 1 - ended.mean().item(),
        "train/lr": run.sched.get_last_lr()[0], **mean_entropy(ctx, batch),
        **({} if logp_diff is None else {"rollout/logp_abs_diff": g(logp_diff).mean().item()}),
        **extra,
        "perf/tokens_per_s": lengths.sum().item() / max(timer["sample"], 1e-9),
        **{f"perf/{k}_s": v for k, v in timer.items()},
        **samples,
    }


def mean_entropy(ctx, batch):
    """{"train/entropy": mean entropy of pi_t at the batch's temperature over the sampled response tokens of the
    whole online batch (all ranks)}, from batch.entropy (pi_t_logps; rows that are NaN, not scored, left out),
    or {} when there is none."""
    if batch.entropy is None:
        return {}
    h = batch.entropy.to(ctx.device, torch.float64)
    mask = batch.response_mask.to(ctx.device).bool() & ~torch.isnan(h)
    s = gather(ctx, torch.stack([torch.where(mask, h, 0.0).sum(), mask.sum().double()])).view(-1, 2).sum(0)
    return {"train/entropy": (s[0] / s[1]).item() if s[1] else math.nan}


def sft_step(step, cfg, ctx, run):
    """Supervised fine-tuning on the task's demonstrations: the weighted-SFT loss with every w_i = 1."""
    per_rank = cfg.minibatch // ctx.world
    idx = prompt_indices(step, cfg.minibatch, len(run.task.sft_data), cfg.seed)[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    pairs = [run.task.sft_data[i] for i in idx]
    batch = rollout.from_texts(run.tok, [p for p, _ in pairs], [r for _, r in pairs])

    def loss_fn(mb):
        part = batch.select(mb).to(ctx.device)
        logp_tok = rollout.token_logps(run.ddp, part, seq_grad=torch.ones(len(mb)))          # [n, R]
        loss = sft_loss(logp_tok.sum(1), cfg.max_new_tokens)
        return loss.sum(), {"nll_sum": -logp_tok.detach().sum().item(), "tokens": part.response_mask.sum().item()}

    upd = minibatch_updates(cfg, ctx, run, per_rank, 1, cfg.micro_batch, loss_fn, epochs=1)
    s = gather(ctx, torch.tensor([upd["loss"], upd["nll_sum"], upd["tokens"], upd["grad_norm"]],
                                 dtype=torch.float64, device=ctx.device)).view(-1, 4)
    return {"train/loss": s[:, 0].mean().item(), "train/nll_per_token": (s[:, 1].sum() / s[:, 2].sum()).item(),
            "train/grad_norm": s[:, 3].mean().item(), "train/lr": run.sched.get_last_lr()[0]}


# ---------------------------------------------------------------------------------------------------
# The run's prompts, the toy pi_0, printing
# ---------------------------------------------------------------------------------------------------
def prompt_indices(step, per_step, n, seed):
    """Indices of the prompts of online batch `step`: a fresh permutation of all n prompts every epoch.

    Stateless (a function of step and seed), so a resumed run draws exactly the prompts it would have.
    """
    perms, out = {}, []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][i]))
    return out


def toy_paths(cfg):
    """(random-init toy model, its SFT pi_0) directories in the cache, keyed by what makes them."""
    cache = os.path.expanduser(cfg.cache_dir)
    key = f"{tasks.TOY_MODEL['hidden_size']}x{tasks.TOY_MODEL['num_hidden_layers']}"
    return os.path.join(cache, f"toy-base-{key}"), os.path.join(cache, f"toy-sft-{key}-{cfg.sft_steps}-{cfg.sft_lr:g}")


def ensure_toy_models(cfg, ctx):
    """Build the toy model and SFT it into pi_0 once (rank 0, single process); every rank then reuses it."""
    base, sft = toy_paths(cfg)
    if ctx.master:
        if not os.path.isfile(os.path.join(base, "config.json")):
            print(f"building the toy Qwen2 model at {base}", flush=True)
            os.makedirs(os.path.dirname(base), exist_ok=True)
            tasks.build_toy_model(base, seed=0)
        if cfg.algo != "sft" and not os.path.isfile(os.path.join(sft, "final", "config.json")):
            print(f"making the toy pi_0: {cfg.sft_steps} SFT steps on sloppy demonstrations -> {sft}", flush=True)
            # pi_0 depends on the SFT settings alone (the cache key), never on this run's other flags
            sft_cfg = Config(algo="sft", model=base, steps=cfg.sft_steps, lr=cfg.sft_lr, sft_steps=cfg.sft_steps,
                             sft_lr=cfg.sft_lr, cache_dir=cfg.cache_dir, dtype=cfg.dtype, out_dir=sft,
                             resume=os.path.isdir(sft), save_every=500, print_every=100)
            train(sft_cfg, Dist(device=ctx.device), sft_step)
    barrier(ctx)
    return base, os.path.join(sft, "final")


def context_window(cfg, model_config):
    """Tokens a prompt and its response may fill together: the model's positions, capped for vLLM's engine
    (config.usable_window)."""
    return usable_window(cfg, model_config.max_position_embeddings)


def fitting_task(cfg, task, tok, model_config):
    """(task, skipped): the task without the prompts longer than --max-prompt-tokens (default: what the context
    window leaves after --max-new-tokens), counted per list (tasks.without_long_prompts)."""
    limit = prompt_limit(cfg, context_window(cfg, model_config))  # as config.check_config found it
    return tasks.without_long_prompts(task, tok, limit)


def report_long_prompts(cfg, skipped):
    """A note for the skipped prompts, and data.json in the run directory with the counts."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_atomic(os.path.join(cfg.out_dir, "data.json"), json.dumps({"long_prompts_skipped": skipped}, indent=1))
    if any(skipped.values()):
        what = {"train_prompts": "training prompts", "eval_prompts": "evaluation prompts",
                "sft_data": "SFT demonstrations", "pref_data": "preference pairs",
                "valid_prompts": "validation prompts"}
        print("note: skipped the prompts longer than --max-prompt-tokens: " +
              ", ".join(f"{n} {what[name]}" for name, n in skipped.items() if n) +
              f" (counts in {os.path.join(cfg.out_dir, 'data.json')})", flush=True)


SMALL_SPLIT = 32  # fewer evaluation or validation prompts than this: a win rate on them says little


def report_small_splits(cfg, task):
    """A note at the start when an evaluation of this run rests on fewer than SMALL_SPLIT prompts (and the run asked
    for more): how many, out of how many, and the flag that sets the split."""
    n_train = len(task.train_prompts) + len(task.valid_prompts)
    evaluated = cfg.algo != "sft" and cfg.eval_prompts > 0 and cfg.eval_judge != NO_EVALUATION
    if evaluated and len(task.eval_prompts) < min(SMALL_SPLIT, cfg.eval_prompts):
        how = ("the EVAL file of --data TRAIN,EVAL holds them: give a larger one" if "," in cfg.data else
               f"held out by --eval-fraction {cfg.eval_fraction:g}: raise it, or give your own split as --data "
               "TRAIN,EVAL" if cfg.data else "the data set's test split")
        n = len(task.eval_prompts)
        print(f"note: the evaluation against pi_0 will use {n} prompt{'s' * (n != 1)} (beside {n_train} "
              f"training prompts), too few for its win rate to say much; {how}", flush=True)
    if cfg.eval_every and len(task.valid_prompts) < min(SMALL_SPLIT, cfg.eval_every_prompts):
        print(f"note: --eval-every and the best checkpoint will use {len(task.valid_prompts)} validation prompts "
              f"(--valid-fraction {cfg.valid_fraction:g} of {n_train} training prompts), too few to choose a "
              "checkpoint by; raise --valid-fraction", flush=True)


def summary_line(m):
    keys = [("step", "step", "d"), ("train/reward_mean", "reward", ".3f"), ("train/nll_per_token", "nll", ".4f"),
            ("weights/w_mean", "w", ".2f"), ("weights/clip_frac", "clip", ".2f"), ("train/kl_pi0", "kl0", ".3f"),
            ("train/response_len", "len", ".1f"), ("train/missing_eos", "noeos", ".2f"),
            ("train/loss", "loss", ".4f"), ("train/grad_norm", "gnorm", ".2f"), ("perf/seconds_per_batch", "s", ".2f")]
    return "  ".join(f"{short} {m[k]:{fmt}}" for k, short, fmt in keys if k in m)


# ---------------------------------------------------------------------------------------------------
# Evaluation during training (--eval-every): the held-out curve against pi_0 that shows reward hacking while it
# happens (eval/reward falling as train/reward_mean rises), and the best checkpoint by it
# ---------------------------------------------------------------------------------------------------
@dataclass
class TrainingEval:
    """What a run's evaluations share: the prompts (one subset for the whole run), the eval judge (built once),
    pi_0's figures on those prompts (sampled at the first evaluation, then reused) and the best evaluation so far."""
    prompts: list
    source: str              # which of the task's prompt lists they come from, for the summary line
    judge: object
    pi_0: dict = None        # {"rewards", "lengths", "ended"}: [n] each, every rank's responses together


def evaluator_config(cfg):
    """The settings the eval judge is built from: with --eval-judge-url, that endpoint, --eval-judge-model and
    the key in --eval-judge-api-key-env in place of the training annotator's; without, cfg itself (the training
    annotator's endpoint judges; eval.evaluator_note says so)."""
    if not cfg.eval_judge_url:
        return cfg
    return dataclasses.replace(cfg, judge_url=cfg.eval_judge_url, judge_model=cfg.eval_judge_model,
                               judge_api_key_env=cfg.eval_judge_api_key_env)


def start_training_eval(cfg, ctx, run):
    """The TrainingEval of a run with --eval-every (else None): --eval-every-prompts of the task's validation
    prompts (disjoint from training and test prompts; the test prompts when a task has none), drawn with
    --eval-seed. best.json and `best` are written again from the best so far that the resumed checkpoint holds
    (run.best), so they agree with it whatever a killed run wrote after it; a new run removes an old run's."""
    ev = None
    if cfg.eval_every:
        pool, source = run.task.valid_prompts, "validation"
        if not pool:
            pool, source = run.task.eval_prompts, "test"
            if ctx.master:
                print(f"note: task {cfg.task} has no validation prompts; --eval-every evaluates on test prompts, "
                      "which the end-of-run report uses too", flush=True)
        prompts, _ = data.random_subset(pool, cfg.eval_every_prompts, cfg.eval_seed)
        ev = TrainingEval(prompts, source, eval_judge(cfg, run.task, run.tok))
    best, why = run.best, ""
    if best is not None and not os.path.isdir(os.path.join(cfg.out_dir, best["checkpoint"])):
        why = f"its checkpoint {best['checkpoint']} is gone"
    elif best is not None and ev is not None and \
            (best["eval_seed"], best["prompts"]) != (cfg.eval_seed, len(ev.prompts)):
        why = "it was evaluated on other prompts (--eval-seed, --eval-every-prompts)"
    if why:
        run.best = None
        if ctx.master:
            print(f"note: the best evaluation so far of {cfg.out_dir} ({best['checkpoint']}) is dropped: {why}; this "
                  "run's best starts afresh", flush=True)
    publish_best(cfg, ctx, run.best, prune=False)
    return ev


def eval_responses(cfg, ctx, run, ev, model, state):
    """One response per evaluation prompt from `model` at --temperature, judged by the eval judge (--reward
    functions get `state` as trainer_state): {"rewards" (NaN = invalid), "lengths", "ended"}, [n] float64 each,
    every rank's share together (on every rank).

    The prompts are split over the ranks in equal shares (the last share padded with repeats, dropped after the
    gather): a sharded model (--fsdp) answers only when every rank calls it. The seed is the same at every
    evaluation, so the curve compares policies on the same sampling noise rather than on fresh noise."""
    n = len(ev.prompts)
    per_rank = -(-n // ctx.world)
    mine = [ev.prompts[i % n] for i in range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)]
    torch.manual_seed(cfg.eval_seed + 1000 * ctx.rank)
    # With --rollout vllm too the policy itself samples here (transformers generate): simpler than waking the
    # engine, and exactly the weights being evaluated
    batch = rollout.generate(model, run.tok, mine, 1, cfg.max_new_tokens, cfg.temperature,
                             synced=cfg.fsdp and ctx.world > 1)
    try:
        judged = judge_rollout(ev.judge, batch, state).rewards
    except AnnotatorUnavailable as e:  # this evaluation is lost (invalid, never the best), not the training run
        tqdm.write(f"warning: evaluation on rank {ctx.rank}: {e}; its judgments are invalid", file=sys.stderr)
        judged = [math.nan] * len(mine)
    rewards = torch.tensor(judged, dtype=torch.float64)
    rewards = torch.where(torch.isinf(rewards), math.nan, rewards)  # an infinite reward is no judgment (judge_batch)
    g = lambda x: gather(ctx, x.to(ctx.device, torch.float64)).cpu()[:n]
    return {"rewards": g(rewards), "lengths": g(batch.response_mask.sum(1)), "ended": g(batch.ended)}


def evaluate_during_training(step, cfg, ctx, run, ev):
    """--eval-every: the current policy against pi_0 (run.ref) on the evaluation prompts; eval/* metrics for
    this online batch's row, the same on every rank. Training's random stream is saved and restored around it, so
    a run draws the same batches with and without evaluations."""
    t0, rng = time.time(), rng_state()
    state = trainer_state(cfg, step + 1, len(run.task.train_prompts), run.sched.last_epoch)  # after this batch
    try:
        if ev.pi_0 is None:
            ev.pi_0 = eval_responses(cfg, ctx, run, ev, run.ref, state)
        policy = eval_responses(cfg, ctx, run, ev, run.policy, state)
    finally:
        set_rng_state(rng)
    figures = {"eval/reward": mean_ci(policy["rewards"])[0],
               "eval/win_rate": win_rate(policy["rewards"], ev.pi_0["rewards"])[0],  # per prompt; a tie counts 1/2
               "eval/pi0_reward": mean_ci(ev.pi_0["rewards"])[0],
               "eval/length": policy["lengths"].mean().item(), "eval/no_eos": 1 - policy["ended"].mean().item(),
               "eval/invalid_judgments": int(torch.isnan(policy["rewards"]).sum())}
    if ctx.master:
        tqdm.write(f"eval after batch {step + 1} on {len(ev.prompts)} {ev.source} prompts: win rate over pi_0 "
                   f"{figures['eval/win_rate']:.3f}, reward {figures['eval/reward']:.3f} (pi_0 "
                   f"{figures['eval/pi0_reward']:.3f}), len {figures['eval/length']:.1f}, no-EOS "
                   f"{figures['eval/no_eos']:.2f}" + (", best so far" if better_eval(figures, run.best) else ""))
    return {**figures, "perf/eval_s": time.time() - t0}


def better_eval(figures, best):
    """Whether an evaluation beats the best so far: a higher eval/win_rate, on a tie a higher eval/reward (a NaN
    figure, every judgment invalid, never does)."""
    key = (figures["eval/win_rate"], figures["eval/reward"])
    return not any(map(math.isnan, key)) and (best is None or key > (best["eval/win_rate"], best["eval/reward"]))


def best_record(cfg, step, ev, figures):
    """What best.json holds for an evaluation after `step` online batches: its step, checkpoint, eval_seed, number
    of prompts and eval/* figures."""
    return {"step": step, "checkpoint": checkpoint_name(step), "eval_seed": cfg.eval_seed, "prompts": len(ev.prompts),
            **{k: v for k, v in figures.items() if k.startswith("eval/")}}


def publish_best(cfg, ctx, best, prune=True):
    """best.json and out_dir/best as `best` says (None: neither file), each replaced atomically, on rank 0; then,
    with prune, the previous best checkpoint goes when it is past --keep-checkpoints (infra.prune_checkpoints never
    deletes the one `best` names). The checkpoint is written before: a kill between these writes resumes from one
    whose state.pt holds `best`, and start_training_eval writes both files again."""
    if ctx.master:
        best_json, pointer = os.path.join(cfg.out_dir, "best.json"), os.path.join(cfg.out_dir, "best")
        if best is None:
            for path in (pointer, best_json):
                if os.path.exists(path):
                    os.remove(path)
        else:
            write_atomic(best_json, json.dumps(best, indent=1))
            kill_point("best.json")
            write_atomic(pointer, best["checkpoint"])
            kill_point("best")
            if prune:
                prune_checkpoints(cfg)
    barrier(ctx)


# ---------------------------------------------------------------------------------------------------
# Statistics of an evaluation (eval.py and dar.py's end-of-run report)
# ---------------------------------------------------------------------------------------------------
# 97.5% quantile of Student's t with df = 1..30 degrees of freedom (standard tables)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t975(df):
    """Two-sided 95% critical value of Student's t: the table for df <= 30, beyond it the Cornish-Fisher
    expansion around z = 1.96 (error < 1e-3)."""
    if df < 1:
        return math.nan
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(x):
    """Mean and half-width of a 95% normal-approximation confidence interval, over the valid (non-NaN)
    values: an invalid judgment is left out, never counted as a score."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x[~torch.isnan(x)]
    half = 1.96 * x.std(correction=1).item() / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return x.mean().item(), half


def win_rate(r_policy, r_ref):
    """Per-prompt outcome (1 win, 1/2 tie, 0 loss) -> (mean, 95% half-width); a prompt where either
    judgment is invalid has no outcome and is left out."""
    a, b = torch.as_tensor(r_policy, dtype=torch.float64), torch.as_tensor(r_ref, dtype=torch.float64)
    outcome = (a > b).double() + 0.5 * (a == b).double()
    return mean_ci(torch.where(torch.isnan(a) | torch.isnan(b), math.nan, outcome))


def golden_win_rate(r_samples, r_refs):
    """Golden-reward win rate of the IS-DPO appendix ("Golden reward Evaluation"): every policy sample of a
    prompt against that prompt's reference completion, both scored by the gold scorer; 1 win, 1/2 tie, 0 loss,
    averaged over all valid pairs.

    r_samples: [P, S] gold rewards of S samples per prompt; r_refs: [P] gold rewards of the references.
    Returns (mean over all valid pairs, 95% half-width from the per-prompt means: the S pairs of one prompt
    share a reference and are not independent). NaN rewards (invalid judgments) drop their pairs.
    """
    a = torch.as_tensor(r_samples, dtype=torch.float64)
    b = torch.as_tensor(r_refs, dtype=torch.float64)[:, None].expand_as(a)
    outcome = (a > b).double() + 0.5 * (a == b).double()
    valid = ~(torch.isnan(a) | torch.isnan(b))
    if not valid.any():
        return math.nan, math.nan
    overall = outcome[valid].mean().item()
    per_prompt = torch.where(valid, outcome, 0.0).sum(1) / valid.sum(1)  # NaN for prompts with no valid pair
    return overall, mean_ci(per_prompt)[1]


def distinct_n(texts, n):
    """distinct-n (Li et al., 2016): distinct n-grams / all n-grams over a model's responses, words and runs of
    punctuation lowercased as the units; 1 = no repeats, near 0 = one phrase over and over. NaN when no response
    has n units."""
    grams = [tuple(u[i:i + n]) for u in (re.findall(r"\w+|[^\w\s]+", t.lower()) for t in texts)
             for i in range(len(u) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan
