"""DAR: Dual-regularized Advantage Regression (Algorithm 1 of "Unifying Stable Optimization and Reference
Regularization in RLHF", ICLR 2026), as one online loop around one weighted-SFT loss.

    python dar.py                                    # built-in toy task on a CPU, a few minutes
    torchrun --nproc_per_node 2 dar.py               # the same, 2 processes (gloo on CPU)
    torchrun --nproc_per_node 8 dar.py --task helpful --model Qwen/Qwen2-7B-SFT   # H100s (NCCL, bf16)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 dar.py ...
    python dar.py --algo sft                         # supervised fine-tuning: the same loss, weights = 1
    python dar.py --algo grpo                        # any baseline of the paper (baselines.py), same loop
    python dar.py --resume                           # continue the run in --out-dir from its last checkpoint

What each online batch t does (Section 4.3, Algorithm 1):
    1. sample prompts x and K responses y_1..y_K ~ pi_t(.|x) each                      (rollout.py)
    2. score them: r(x, y_i)                                                          (judge.py)
    3. Monte-Carlo advantage A_i = r_i - mean_K r, then batch normalisation
    4. log pi_t(y|x) and log pi_0(y|x), once, before any update
    5. weights w_i = min((pi_0/pi_t)^alpha * exp(A_norm/beta), w_clip)                 (Eq. 4)
    6. a few optimizer steps on the weighted-SFT loss -mean_i w_i log pi_theta(y_i|x)  (Eq. 4)
    7. pi_{t+1} <- pi_theta: the next batch is sampled from the updated policy
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import rollout
import tasks
from judge import JUDGES, make_judge

ALGOS = ("dar", "sft",                                           # this file
         "ppo", "dual_ppo", "dual_ppo_clip", "dual_mix_ppo",      # baselines.py: RL with a value model
         "dao", "dao_ppo", "rloo", "grpo", "iter_sft",            # RL from K samples per prompt, no critic
         "online_dpo", "ipo", "slic",                             # online direct alignment, pairs from K samples
         "dpo", "simpo", "is_dpo")                                # offline direct alignment on a preference set

# The paper's hyperparameters per algorithm (Appendix B.2-B.3, Table 5), over the Config defaults (DAR's);
# a flag given on the command line wins over both. beta is each method's regularisation strength. Learning
# rates stay the toy task's (the paper's are for 7B models: 5e-7 online DAP, 1e-6 RLHF, 3e-6 Dual-PPO).
ALGO_DEFAULTS = {
    "ppo": dict(beta=0.03, epochs=4, clip_eps=0.2),
    "dual_ppo": dict(alpha=0.3, beta=0.02, epochs=1, clip_eps=math.inf),
    "dual_ppo_clip": dict(alpha=0.9, beta=0.01, epochs=1, clip_eps=0.2),
    "dual_mix_ppo": dict(alpha=0.3, beta=0.02, epochs=1, clip_eps=math.inf),
    "rloo": dict(beta=0.03),
    "grpo": dict(beta=0.04, clip_eps=0.2),
    "online_dpo": dict(beta=0.1, k=2), "ipo": dict(beta=1.0, k=2), "slic": dict(beta=0.002, k=2),
    "dpo": dict(beta=0.1), "simpo": dict(beta=2.0), "is_dpo": dict(beta=0.1),
}


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    task: str = arg("toy", "prompt set and judge; 'toy' is built in (tasks.py)")
    algo: str = arg("dar", f"training algorithm: {', '.join(ALGOS)}")
    model: str = arg("", "initial policy pi_0, a Hugging Face model directory; '' = the toy task's own")
    judge: str = arg("toy_gold", "reward r(x, y) used for training (judge.py): " + ", ".join(JUDGES))
    eval_judge: str = arg("toy_gold", "reward used for the final evaluation against pi_0")
    data: str = arg("", "a local JSONL(.gz) or parquet file in the task's data set schema, used instead of the "
                        "Hub (5% of prompts held out by hash), or TRAIN,EVAL: two such files")
    # the LLM annotator behind an OpenAI-compatible HTTP endpoint (--judge llm) and reward models
    judge_url: str = arg("", "base URL of the annotator's endpoint, e.g. http://127.0.0.1:8000/v1 (--judge llm)")
    judge_model: str = arg("", "model name sent to the endpoint (paper: Qwen2-72B-Instruct, Qwen3-32B)")
    judge_api_key_env: str = arg("DAR_JUDGE_API_KEY", "environment variable that holds the endpoint's API key")
    judge_concurrency: int = arg(16, "annotator requests in flight at once")
    judge_timeout: float = arg(120.0, "seconds allowed per annotator request")
    judge_retries: int = arg(5, "retries per request on connection errors, timeouts, 429 and 5xx (backoff)")
    reward_model: str = arg("", "a sequence-classification reward model directory (--judge reward_model)")
    # DAR (Section 4.3 and Appendix B.2; paper values)
    alpha: float = arg(0.1, "trade-off between KL(pi||pi_0) (alpha) and KL(pi||pi_t) (1 - alpha), Eq. 3")
    beta: float = arg(0.05, "regularisation strength: DAR/DAO w_adv = exp(A_norm / beta) (Eq. 4); KL coefficient "
                            "of ppo/rloo/grpo; beta of dpo/ipo/slic/simpo/is_dpo (per-algorithm defaults: --help)")
    w_clip: float = arg(20.0, "clip threshold on the product w_reg * w_adv")
    normalize_adv: bool = arg(True, "batch normalisation of the Monte-Carlo advantage (Algorithm 1)")
    # baselines (baselines.py, Appendix B.3)
    clip_eps: float = arg(0.2, "policy-ratio clip range of ppo, dual_ppo_clip, grpo; inf = no clipping")
    vf_coef: float = arg(10.0, "PPO value-loss coefficient (paper: 10)")
    value_clip: float = arg(0.2, "PPO value clipping range around the rollout's values")
    gae_lambda: float = arg(0.95, "PPO GAE lambda")
    gamma: float = arg(1.0, "PPO discount per token")
    missing_eos_penalty: float = arg(1.0, "PPO family: subtracted from the reward of a response without EOS")
    value_model: str = arg("", "PPO value model: a Hugging Face directory; '' = pi_0's network, fresh scalar head")
    simpo_gamma: float = arg(1.6, "SimPO target reward margin gamma")
    is_clip: float = arg(1.0, "IS-DPO: upper clip of the importance ratio pi_theta/pi_0 of a pair")
    # online sampling (Appendix B.1)
    k: int = arg(4, "responses sampled per prompt, the Monte-Carlo sample size K")
    temperature: float = arg(0.9, "sampling temperature for online data and evaluation")
    max_new_tokens: int = arg(16, "longest response, in tokens (paper: 64 TL;DR, 256 HH, 1000 HelpSteer2)")
    # batch sizes, counted in responses over all ranks (Appendix B.1: 512 / 128)
    steps: int = arg(60, "online batches T (for --algo sft: optimizer steps)")
    prompt_epochs: float = arg(0.0, "passes over the training prompts; > 0 sets --steps to prompt_epochs x prompts "
                                    "/ prompts per online batch (paper: 1 TL;DR, 2 HH for RLHF; 5 for online DAP)")
    online_batch: int = arg(256, "responses per online batch = prompts x K (paper: 512)")
    minibatch: int = arg(64, "responses per optimizer step; online_batch / minibatch steps per batch (paper: 128)")
    micro_batch: int = arg(64, "responses per forward/backward on one rank; gradients accumulate to a minibatch")
    epochs: int = arg(1, "passes over each online batch")
    # optimisation (Appendix B.1: Adafactor without relative step, 15 warm-up steps, constant LR)
    lr: float = arg(3e-4, "learning rate after warm-up (paper, 7B: 5e-7 to 1e-6)")
    warmup_steps: int = arg(15, "optimizer steps of linear warm-up")
    weight_decay: float = arg(0.0, "Adafactor weight decay")
    max_grad_norm: float = arg(1.0, "gradient norm clip; 0 = no clipping")
    # the toy task's pi_0: SFT of the freshly built model on the sloppy demonstrations
    sft_steps: int = arg(1500, "SFT optimizer steps that make the toy pi_0")
    sft_lr: float = arg(3e-3, "SFT learning rate for the toy pi_0")
    cache_dir: str = arg("~/.cache/dar", "where the built toy model and its SFT pi_0 are kept and reused")
    # bookkeeping
    seed: int = arg(0, "seed for python, numpy and torch; rank r uses seed + 1000 r")
    out_dir: str = arg("", "run directory (metrics.jsonl, checkpoints, final/); '' = runs/TASK-ALGO-sSEED")
    resume: bool = arg(False, "continue from the last checkpoint in --out-dir")
    save_every: int = arg(20, "checkpoint every N online batches (and at the end); 0 = 10 checkpoints a run")
    keep_checkpoints: int = arg(2, "how many recent checkpoints to keep")
    print_every: int = arg(1, "print a one-line summary every N steps (the toy pi_0's SFT prints every 100)")
    sample_every: int = arg(20, "print a table of sample prompt / response / reward every N batches")
    eval_prompts: int = arg(256, "held-out prompts for the final comparison with pi_0")
    dtype: str = arg("auto", "auto (bf16 on GPUs that have it, else float32), float32 or bfloat16")
    gradient_checkpointing: bool = arg(False, "recompute the layers' activations in backward: less memory for "
                                              "long responses, one more forward pass of the layers per update")
    rollout: str = arg("hf", "sampler: hf (transformers generate) or vllm (a colocated engine per rank)")
    vllm_gpu_memory: float = arg(0.3, "share of GPU memory vLLM may take (weights + KV cache), --rollout vllm")
    logp_source: str = arg("policy", "log pi_t for the loss: policy (a forward pass of the trained model) or "
                                     "sampler (the sampler's log-probs of the sampled tokens: no pi_t pass)")
    backend: str = arg("", "torch.distributed backend; '' = nccl on GPU, gloo on CPU")
    fsdp: bool = arg(False, "shard parameters, gradients and optimizer state over the ranks (FSDP2, per decoder "
                            "layer) instead of a full copy per rank (DDP); pi_0 and PPO's value model too")
    export_hf: str = arg("", "write this checkpoint (ckpt-N, sharded or not) as an ordinary Hugging Face model "
                             "directory at --out-dir and exit")
    fsdp_offload: bool = arg(False, "--fsdp: keep the shards and optimizer state in CPU memory (slower; for "
                                    "models whose shards do not fit the GPUs)")
    dist_timeout: float = arg(30.0, "minutes a rank waits in a collective for the others before the job fails "
                                    "(a rank that died or hangs)")
    trust_remote_code: bool = arg(False, "run Python code shipped with a model directory (its auto_map) when "
                                         "loading it; only for code you have read")
    max_prompt_tokens: int = arg(0, "longest prompt, in tokens with the chat template; longer ones are skipped "
                                    "and counted; 0 = the context window minus --max-new-tokens")
    max_invalid_frac: float = arg(0.5, "stop (with a checkpoint) when more of an online batch's judgments than "
                                       "this are invalid: an unreachable or broken judge, not noise to train on")


# Fields a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_CHANGES = {"resume", "steps", "prompt_epochs", "save_every", "keep_checkpoints", "sample_every",
                     "eval_prompts", "gradient_checkpointing", "max_invalid_frac", "judge_url",
                     "judge_concurrency", "judge_timeout", "judge_retries", "dist_timeout", "trust_remote_code",
                     "fsdp_offload", "export_hf", "out_dir"}


def config_from_dict(saved):
    """The Config a run saved (its config.json, a checkpoint's state.pt); fields this version does not know
    are ignored."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in known})


def parse_config(argv=None):
    """Each setting comes from, in order of precedence: the command line; the paper's setting for this task
    and algorithm (tasks.TASK_ALGO_DEFAULTS); for this algorithm (ALGO_DEFAULTS); for this task
    (tasks.TASK_DEFAULTS: lengths, judge); else Config's default."""
    import argparse
    epilog = "per-algorithm defaults: " + "; ".join(
        f"{a}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for a, d in ALGO_DEFAULTS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog)
    for f in dataclasses.fields(Config):
        flag, help = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default})"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help)
    given = vars(p.parse_args(argv))
    task, algo = given.get("task", Config.task), given.get("algo", Config.algo)
    if "steps" in given and given.get("prompt_epochs", 0) > 0:
        p.error("give --steps or --prompt-epochs, not both")
    if "export_hf" in given and "out_dir" not in given:
        p.error("--export-hf needs --out-dir, the new directory to write the model to")
    if "steps" in given:  # an explicit length wins over the task's passes over the prompts
        given["prompt_epochs"] = 0.0
    cfg = Config(**{**tasks.TASK_DEFAULTS.get(task, {}), **ALGO_DEFAULTS.get(algo, {}),
                    **tasks.TASK_ALGO_DEFAULTS.get((task, algo), {}), **given})
    if not cfg.out_dir:
        cfg.out_dir = f"runs/{cfg.task}-{cfg.algo}-s{cfg.seed}"
    return cfg


def check_config(cfg, world):
    """Reject bad settings with a message that names the flag, before any model is loaded."""
    def bad(msg):
        raise SystemExit(f"error: {msg}")
    if cfg.algo not in ALGOS:
        bad(f"unknown --algo {cfg.algo!r}; valid algorithms: {', '.join(ALGOS)}")
    if cfg.task not in tasks.TASKS:
        bad(f"unknown --task {cfg.task!r}; valid tasks: {', '.join(tasks.TASKS)}")
    for flag, name in (("--judge", cfg.judge), ("--eval-judge", cfg.eval_judge)):
        if name not in JUDGES:
            bad(f"unknown {flag} {name!r}; valid judges: {', '.join(JUDGES)}")
    if not 0.0 <= cfg.alpha <= 1.0:
        bad(f"--alpha must lie in [0, 1] (it weighs KL to pi_0 against KL to pi_t), got {cfg.alpha}")
    for name in ("beta", "w_clip", "clip_eps", "is_clip"):
        if not getattr(cfg, name) > 0:
            bad(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.k < 2:
        bad(f"--k must be >= 2: the Monte-Carlo baseline needs several responses per prompt, got {cfg.k}")
    if not cfg.temperature > 0:
        bad(f"--temperature must be > 0, got {cfg.temperature}")
    for name in ("steps", "online_batch", "minibatch", "micro_batch", "epochs", "max_new_tokens", "warmup_steps"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("save_every", "prompt_epochs", "max_prompt_tokens"):
        if getattr(cfg, name) < 0:
            bad(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.online_batch % (cfg.k * world):
        bad(f"--online-batch {cfg.online_batch} must be a multiple of K x ranks = {cfg.k} x {world}")
    if cfg.online_batch % cfg.minibatch:
        bad(f"--online-batch {cfg.online_batch} must be a multiple of --minibatch {cfg.minibatch}")
    # online pair methods update on whole prompts (K responses each), offline pair methods on pairs
    unit = cfg.k if cfg.algo in ("online_dpo", "ipo", "slic") else 2 if cfg.algo in ("dpo", "simpo", "is_dpo") else 1
    if cfg.minibatch % (world * unit):
        bad(f"--minibatch {cfg.minibatch} must split evenly into {world} ranks" +
            (f" in whole groups of {unit} responses" if unit > 1 else ""))
    used = ([cfg.judge] if cfg.algo not in OFFLINE else []) + ([cfg.eval_judge] if cfg.algo != "sft" else [])
    if "llm" in used and not cfg.judge_url:
        bad("--judge llm (this task's default) needs --judge-url, the annotator's OpenAI-compatible endpoint, e.g. "
            "http://127.0.0.1:8000/v1 (python judge.py --serve --task toy --port 8000 starts a stand-in)")
    if "reward_model" in used and not os.path.isfile(os.path.join(cfg.reward_model, "config.json")):
        bad(f"--judge reward_model needs --reward-model, a sequence-classification model directory "
            f"(got {cfg.reward_model!r})")
    if cfg.task != "toy" and not cfg.model:
        bad(f"--task {cfg.task} needs --model, the SFT policy pi_0 as a Hugging Face model directory "
            "(the paper: Qwen2-7B fine-tuned on the task's demonstrations; --algo sft makes one)")
    if cfg.model and not os.path.isfile(os.path.join(cfg.model, "config.json")):
        bad(f"--model {cfg.model!r} is not a model directory (no config.json there); give the path of a "
            "Hugging Face model directory, or omit --model on the toy task to build one")
    if cfg.value_model and not os.path.isfile(os.path.join(cfg.value_model, "config.json")):
        bad(f"--value-model {cfg.value_model!r} is not a model directory (no config.json there)")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        bad(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.rollout not in ("hf", "vllm"):
        bad(f"--rollout must be hf or vllm, got {cfg.rollout!r}")
    if cfg.logp_source not in ("policy", "sampler"):
        bad(f"--logp-source must be policy or sampler, got {cfg.logp_source!r}")
    if cfg.fsdp_offload and not cfg.fsdp:
        bad("--fsdp-offload offloads the shards of --fsdp; add --fsdp")
    if cfg.fsdp_offload and not torch.cuda.is_available():
        bad("--fsdp-offload moves shards between GPU and CPU memory; without a GPU they are in CPU memory already")
    if not 0 < cfg.vllm_gpu_memory <= 1:
        bad(f"--vllm-gpu-memory is a share of the GPU's memory in (0, 1], got {cfg.vllm_gpu_memory}")


OFFLINE = ("sft", "dpo", "simpo", "is_dpo")             # train on a fixed data set: no sampling, no judge
VALUE_MODEL = ("ppo", "dual_ppo", "dual_ppo_clip", "dual_mix_ppo")   # need a learned value V(x, y_<i)


# ---------------------------------------------------------------------------------------------------
# The DAR loss (Eq. 4) and its pieces. Per-sequence tensors, shape [N]; usable on their own.
# Every loss in this project (here and in baselines.py) returns one term per sequence (or per pair):
# the objective is their mean over the online batch, and the loop divides a minibatch's sum by its size.
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


def k3(logp, logp_ref, mask):
    """Schulman's k3 estimate of KL(pi || pi_ref) per sequence, from tokens sampled from pi: [N].

    Per token, with r = pi_ref/pi: (r - 1) - log r >= 0, unbiased for that token's KL; summed over the
    response (chain rule) it estimates the sequence-level KL. expm1 keeps it accurate when the policies
    are close (exp(d) - 1 - d in float32 loses most digits at |d| ~ 1e-3).
    """
    d = logp_ref - logp
    return torch.where(mask.bool(), torch.expm1(d) - d, 0.0).sum(1)


# ---------------------------------------------------------------------------------------------------
# Processes, seeds, models
# ---------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(cfg):
    """Read RANK / WORLD_SIZE / LOCAL_RANK from torchrun; one process without them (with --fsdp, a process
    group of one, since sharded modules need one)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ and not cfg.fsdp:
        return Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    import datetime
    import torch.distributed as tdist
    if not cfg.dist_timeout > 0:
        raise SystemExit(f"error: --dist-timeout must be > 0 minutes, got {cfg.dist_timeout}")
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    store = {} if "RANK" in os.environ else dict(store=tdist.HashStore(), rank=0, world_size=1)
    tdist.init_process_group(cfg.backend or ("nccl" if cuda else "gloo"),
                             timeout=datetime.timedelta(minutes=cfg.dist_timeout), **store)
    return Dist(rank, world, local, device)


def barrier(ctx):
    if ctx.world > 1:
        torch.distributed.barrier()


def gather(ctx, t):
    """Concatenate a 1-D tensor from every rank (same length everywhere), rank order: [world * n]."""
    if ctx.world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_dtype(cfg, device):
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_model(path, cfg, device, sharded=False, frozen=False):
    """A causal LM from a model directory or a checkpoint (sharded ones too), on `device`, or sharded over the
    ranks (--fsdp: place); frozen: eval mode, no gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM
    import importlib.util
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    kwargs = dict(dtype=model_dtype(cfg, device), attn_implementation="flash_attention_2" if flash else "sdpa")

    def read():
        if is_sharded_checkpoint(path):  # one process reading a sharded checkpoint: eval.py, --export-hf
            return load_sharded_weights(path, build())
        return tasks.load_pretrained(AutoModelForCausalLM, path, cfg.trust_remote_code, **kwargs)

    def build():
        from transformers import GenerationConfig
        config = tasks.load_pretrained(AutoConfig, path, cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, **kwargs)
        if os.path.isfile(os.path.join(path, "generation_config.json")):  # stop tokens, as read() has them
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model
    return place(read, build, cfg, device, sharded, lambda m: m.eval().requires_grad_(False) if frozen else None)


def place(read, build, cfg, device, sharded, prepare):
    """A model on `device`, or sharded over the ranks (--fsdp). read() loads it (weights and all); build() makes
    the same architecture without its weights; prepare(model) runs before placing (freezing, a fresh head).

    Sharded, the model is read from disk once: rank 0 reads it into CPU memory, the other ranks build it on
    the meta device (no memory), shard it, and receive their shards from rank 0. Host memory at load is then
    one copy of the model, not one per rank, and no GPU ever holds the whole model."""
    with torch.random.fork_rng(devices=[]):  # a fresh head's initialisation must not shift the run's stream
        if not sharded:
            model = read()
            prepare(model)
            return model.to(device)
        master = torch.distributed.get_rank() == 0
        if master:
            model = read()
        else:
            with torch.device("meta"):
                model = build().eval()  # as from_pretrained leaves it: dropout off
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    prepare(model)
    whole = model.state_dict() if master else {}
    shard(model, cfg)
    if not master:
        model.to_empty(device="cpu" if cfg.fsdp_offload else device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # outside the state dict (rotary frequencies): rank 0's are the real ones
        torch.distributed.broadcast(buffer, src=0)
    return model


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer
    tok = tasks.load_pretrained(AutoTokenizer, path, trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------------
# Sharding (--fsdp, PyTorch's FSDP2): each rank keeps 1/world of every parameter, gradient and optimizer
# state; a decoder layer's whole parameters exist only while it runs (all-gathered before, freed after).
# ---------------------------------------------------------------------------------------------------
def decoder_layers(model):
    """The repeated blocks of a transformers model: instances of the classes it names in _no_split_modules."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SystemExit(f"error: --fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) "
                         "to shard by")
    return layers


def shard(model, cfg):
    """fully_shard every decoder layer, then the root (embeddings, final norm, head: one group). Parameters stay
    in the model's dtype (bf16 on GPUs) and gradients are reduce-scattered in float32; --fsdp-offload keeps the
    shards (and so the optimizer's work) in CPU memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard
    dtype, world = next(model.parameters()).dtype, torch.distributed.get_world_size()

    def placement(p):  # rows, unless there are fewer rows than ranks (PPO's value head [1, d]): then columns
        return Shard(1) if p.dim() > 1 and p.shape[0] < world <= p.shape[1] else Shard(0)
    kwargs = dict(mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
                  shard_placement_fn=placement)
    if cfg.fsdp_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def trained_modules(policy, value):
    """The models the optimizer updates as one module (keys policy.*, value.*): the unit of a sharded
    checkpoint, whose optimizer state spans both."""
    return torch.nn.ModuleDict({"policy": policy, **({"value": value} if value is not None else {})})


def is_sharded_checkpoint(path):
    return os.path.isdir(os.path.join(path, "dcp"))


def save_sharded_checkpoint(ctx, path, run, state):
    """A checkpoint of an --fsdp run, written by every rank: its shards of the models and the optimizer state
    (torch.distributed.checkpoint, in dcp/, loadable on any number of ranks), and from rank 0 state.pt, the
    tokenizer and the models' configs. Written beside `path` and renamed into place once all ranks succeeded;
    if any failed, nothing of it is left and every rank raises the error."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp, error = path + ".tmp", None
    if ctx.master:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(ctx)
    try:
        model_sd, optim_sd = get_state_dict(trained_modules(run.policy, run.value), run.opt)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
        if ctx.master:
            run.policy.config.save_pretrained(tmp)
            run.policy.generation_config.save_pretrained(tmp)
            run.tok.save_pretrained(tmp)
            if run.value is not None:
                run.value.config.save_pretrained(os.path.join(tmp, "value"))
            torch.save(state, os.path.join(tmp, "state.pt"))
    except (OSError, dcp.api.CheckpointException) as e:
        error = e
    failed = torch.tensor([float(error is not None)], device=ctx.device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if failed.item():
        if ctx.master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{type(error).__name__}: {error}" if error else "another rank could not write its shards")
    if ctx.master:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


def load_sharded_checkpoint(path, modules, opt):
    """Restore the shards of the models (trained_modules) and the optimizer state from a sharded checkpoint,
    resharded for this run's ranks (their number may differ from the run that wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(modules, opt)
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(modules, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_sharded_weights(path, model, prefix="policy."):
    """Read a sharded checkpoint's weights of one model (prefix: its key in trained_modules) into an ordinary,
    unsharded `model` of the same architecture, in this process alone."""
    import torch.distributed.checkpoint as dcp
    saved = dcp.FileSystemReader(os.path.join(path, "dcp")).read_metadata().state_dict_metadata
    # tied weights (embeddings = head) may be saved under one name; loading it fills both
    weights = {prefix + k: v for k, v in model.state_dict().items() if f"model.{prefix}{k}" in saved}
    dcp.load({"model": weights}, checkpoint_id=os.path.join(path, "dcp"), no_dist=True)  # this process alone
    return model


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
            train(sft_cfg, Dist(device=ctx.device))
    barrier(ctx)
    return base, os.path.join(sft, "final")


# ---------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary directory, then renamed; `latest` names the newest complete one
# ---------------------------------------------------------------------------------------------------
def rng_state():
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # plain lists load with weights_only=True
    return dict(python=py, numpy=np_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    n = dict(s["numpy"])
    n["state"] = dict(n["state"], key=np.array(n["state"]["key"], dtype=np.uint32))
    np.random.set_state(n)
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(cfg, ctx, step, run):
    states = [None] * ctx.world
    if ctx.world > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    name = f"ckpt-{step:06d}"
    state = dict(step=step, scheduler=run.sched.state_dict(), rng=states, config=dataclasses.asdict(cfg))
    try:
        if cfg.fsdp:
            save_sharded_checkpoint(ctx, os.path.join(cfg.out_dir, name), run, state)
        elif ctx.master:
            save_model_dir(os.path.join(cfg.out_dir, name), run.policy, run.tok,
                           dict(state, optimizer=run.opt.state_dict()), value=run.value)
    except OSError as e:  # a full disk, a quota: `latest` still names the previous, complete checkpoint
        raise SystemExit(f"error: could not write checkpoint {name} ({e}); the previous checkpoint "
                         f"{latest_checkpoint(cfg) or '(none)'} is intact. Free space or fix the cause, then "
                         f"continue with --resume.") from e
    if ctx.master:
        write_atomic(os.path.join(cfg.out_dir, "latest"), name)
        ckpts = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("ckpt-") and not d.endswith(".tmp"))
        for old in ckpts[:-cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(cfg.out_dir, old), ignore_errors=True)
    barrier(ctx)


def load_state(path):
    """A checkpoint's state.pt: tensors and plain data only (weights_only), never arbitrary pickled objects,
    whose loading can run any code."""
    import pickle
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise SystemExit(f"error: {path} holds objects other than tensors and plain data" +
                         (f" ({named.group(1)})" if named else "") + ", and is not loaded: unpickling them could "
                         "run any code. Resume from a checkpoint that dar.py wrote") from None


def save_model_dir(path, model, tok, state=None, value=None, weights=None):
    """A Hugging Face model directory (plus state.pt and value/), written beside `path`, renamed into place.
    weights: the model's whole state dict when the model itself is sharded (--fsdp)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)
        tok.save_pretrained(tmp)
        if value is not None:
            value.save_pretrained(os.path.join(tmp, "value"))
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
    except BaseException:  # a half-written directory is removed; what `path` held is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def export_hf(ckpt, out):
    """A checkpoint (a sharded one too) as an ordinary Hugging Face model directory at `out`, in the dtype it was
    trained in: for evaluation elsewhere and for release. One process, no GPU needed."""
    from transformers import AutoConfig
    if not os.path.isfile(os.path.join(ckpt, "state.pt")):
        raise SystemExit(f"error: {ckpt} is not a checkpoint of dar.py (no state.pt there)")
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} exists and is not empty; give a new directory to export to")
    cfg = config_from_dict(load_state(os.path.join(ckpt, "state.pt"))["config"])
    trained_in = tasks.load_pretrained(AutoConfig, ckpt, cfg.trust_remote_code).dtype
    cfg = dataclasses.replace(cfg, dtype=str(trained_in or torch.float32).removeprefix("torch."))
    save_model_dir(out, load_model(ckpt, cfg, torch.device("cpu")), load_tokenizer(ckpt, cfg.trust_remote_code))


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(cfg):
    pointer = os.path.join(cfg.out_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    return os.path.join(cfg.out_dir, open(pointer).read().strip())


def check_resumable(cfg, saved):
    diff = [k for k, v in saved.items() if k not in RESUMABLE_CHANGES and getattr(cfg, k, v) != v]
    if diff:
        raise SystemExit("error: --resume with settings that differ from the checkpoint's: " +
                         ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)!r} (was {saved[k]!r})" for k in diff) +
                         f"; resume with the original flags, or start a new run with another --out-dir")


# ---------------------------------------------------------------------------------------------------
# Logging: stable, namespaced keys; one JSON line per online batch (README lists every key)
# ---------------------------------------------------------------------------------------------------
class Logger:
    def __init__(self, cfg, ctx, start_step):
        self.ctx, self.path = ctx, os.path.join(cfg.out_dir, "metrics.jsonl")
        if ctx.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            kept = []
            if start_step > 0 and os.path.exists(self.path):  # drop lines past the resumed checkpoint
                kept = [l for l in open(self.path) if l.strip() and json.loads(l)["step"] <= start_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)

    def log(self, metrics):
        if self.ctx.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")


def print_samples(batch, rewards, n=4):
    from tqdm import tqdm
    rows = [f"  {'prompt':<22} | {'response':<24} | reward"]
    for i in range(0, len(batch), max(1, len(batch) // n))[:n]:
        resp = batch.responses[i] + ("" if batch.ended[i] else " [no EOS]")
        prompt = batch.prompts[i] if isinstance(batch.prompts[i], str) else rollout.plain_dialogue(batch.prompts[i])
        rows.append(f"  {prompt.strip()[-22:]:<22} | {resp[:24]!r:<24} | {rewards[i]:.2f}")
    tqdm.write("\n".join(rows))


# ---------------------------------------------------------------------------------------------------
# Training
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


def no_dropout(model):
    """Dropout off everywhere (as TRL does for RLHF): the loss's log-probs must be the function that pi_t's and
    pi_0's no-grad passes computed. transformers' from_pretrained leaves models in eval mode, where dropout is
    off anyway; the loop trains in train mode, which gradient checkpointing needs."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def optimizer_and_schedule(cfg, models):
    """One Adafactor over every trained model (the policy, and PPO's value model), warm-up then constant."""
    from transformers.optimization import Adafactor
    params = [p for m in models for p in m.parameters()]
    opt = Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                    weight_decay=cfg.weight_decay)
    if cfg.fsdp:
        opt.register_step_pre_hook(shard_adafactor_state)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    return opt, sched


def shard_adafactor_state(opt, args, kwargs):
    """Before an Adafactor step under --fsdp: transformers' Adafactor makes its factored second-moment statistics
    as plain tensors, which cannot meet a sharded (DTensor) gradient. Made here as DTensors instead (sharded
    where they keep the gradient's sharded dimension, else whole), every step is computed on the global
    tensors, so the update is the one an unsharded Adafactor makes."""
    from torch.distributed.tensor import DTensor, Replicate

    def settled(t):  # a mean over the sharded dimension is a pending sum (Partial): make it a whole one
        return t.redistribute(placements=[Replicate() if p.is_partial() else p for p in t.placements])
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state or not isinstance(p.grad, DTensor) or p.grad.dim() < 2:
                continue
            g = p.grad.float()
            state.update(step=0, RMS=0, exp_avg_sq_row=torch.zeros_like(settled(g.mean(dim=-1))),
                         exp_avg_sq_col=torch.zeros_like(settled(g.mean(dim=-2))))


def optimizer_step(cfg, models, opt, sched):
    """Clip each model's gradient norm on its own, then step; a non-finite gradient skips the step.

    Clipping per model keeps PPO's value loss (large on a 0-10 reward scale) from shrinking the policy's
    step. Returns the policy's gradient norm (the first model's).
    """
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.max_grad_norm or float("inf")) for m in models]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]  # --fsdp: a DTensor
    if all(torch.isfinite(n) for n in norms):
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return norms[0].item()


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

    @property
    def trained(self):
        """The modules the optimizer updates, as called for gradients (DDP-wrapped)."""
        return [m for m in (self.ddp, self.value_ddp) if m is not None]


def resolve_schedule(cfg, task):
    """The run's length from passes over the training prompts (prompt_epochs > 0; Appendix B.1 counts epochs),
    and save_every 0 as 10 checkpoints a run (B.1). Offline methods keep --steps: they read pairs, not prompts."""
    if cfg.prompt_epochs > 0 and cfg.algo not in OFFLINE:
        cfg.steps = max(1, math.ceil(cfg.prompt_epochs * len(task.train_prompts) / (cfg.online_batch // cfg.k)))
    if cfg.save_every == 0:
        cfg.save_every = max(1, cfg.steps // 10)


def context_window(cfg, model_config):
    """Tokens a prompt and its response may fill together: the model's positions (vLLM's engine caps its
    KV cache at 8192 per sequence, VllmSampler)."""
    window = model_config.max_position_embeddings
    return min(window, 8192) if cfg.rollout == "vllm" else window


def fitting_task(cfg, task, tok, model_config):
    """(task, skipped): the task without the prompts longer than --max-prompt-tokens (default: what the context
    window leaves after --max-new-tokens), counted per list (tasks.without_long_prompts)."""
    window = context_window(cfg, model_config)
    limit = cfg.max_prompt_tokens or window - cfg.max_new_tokens
    if limit < 1 or limit + cfg.max_new_tokens > window:
        given = f"--max-prompt-tokens {limit} plus " if cfg.max_prompt_tokens else ""
        raise SystemExit(f"error: {given}--max-new-tokens {cfg.max_new_tokens} leave no room in the model's context "
                         f"window of {window} tokens; lower {'one of them' if given else 'it'}")
    return tasks.without_long_prompts(task, tok, limit)


def report_long_prompts(cfg, skipped):
    """A note for the skipped prompts, and data.json in the run directory with the counts."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "data.json"), "w") as f:
        json.dump({"long_prompts_skipped": skipped}, f, indent=1)
    if any(skipped.values()):
        what = {"train_prompts": "training prompts", "eval_prompts": "evaluation prompts",
                "sft_data": "SFT demonstrations", "pref_data": "preference pairs"}
        print("note: skipped the prompts longer than --max-prompt-tokens: " +
              ", ".join(f"{n} {what[name]}" for name, n in skipped.items() if n) +
              f" (counts in {os.path.join(cfg.out_dir, 'data.json')})", flush=True)


class TermSignal:
    """Remembers a SIGTERM (a scheduler pre-empting the job, torchrun passing it on) instead of dying in the
    middle of an update; the loop asks after each online batch, all ranks together so they stop at the same
    batch. Only the main thread can install a handler; elsewhere (tests calling train()) nothing changes."""

    def __init__(self):
        self.seen, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.seen = True

    def received(self, ctx):
        flag = torch.tensor([float(self.seen)], device=ctx.device)
        if ctx.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def train(cfg, ctx):
    """Run cfg.algo for cfg.steps; returns the Run (policy trained). Resumes when cfg.resume."""
    from tqdm import tqdm
    import baselines

    init = cfg.model
    if not init:
        base, sft = ensure_toy_models(cfg, ctx)
        init = base if cfg.algo == "sft" else sft
    seed_everything(cfg.seed + 1000 * ctx.rank)  # after the (maybe) in-process SFT that made pi_0
    task = tasks.load_task(cfg.task, cfg.data)  # bad data stops the run before any model is loaded
    tok = load_tokenizer(init, cfg.trust_remote_code)
    start, ckpt = 0, latest_checkpoint(cfg) if cfg.resume else None
    if cfg.resume and ckpt is None and ctx.master:
        print(f"--resume: no checkpoint in {cfg.out_dir}, starting from scratch", flush=True)
    sharded_ckpt = ckpt is not None and is_sharded_checkpoint(ckpt)  # its weights are read in after sharding
    weights = init if sharded_ckpt else ckpt or init
    policy = load_model(weights, cfg, ctx.device, sharded=cfg.fsdp)
    policy.config.use_cache = False
    task, skipped = fitting_task(cfg, task, tok, policy.config)
    if ctx.master:
        report_long_prompts(cfg, skipped)
    resolve_schedule(cfg, task)
    value = None
    if cfg.algo in VALUE_MODEL:
        value = baselines.load_value_model(os.path.join(ckpt, "value") if ckpt and not sharded_ckpt
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
        start = state["step"]
        if len(state["rng"]) == ctx.world:
            set_rng_state(state["rng"][ctx.rank])
    wrapped = models  # a sharded model is called as it is: FSDP2 has no wrapper
    if ctx.world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = [DistributedDataParallel(m, device_ids=ids) for m in models]
    ref = None
    if cfg.algo != "sft":  # pi_0: a frozen copy of the initial policy
        ref = load_model(init, cfg, ctx.device, sharded=cfg.fsdp, frozen=True)
    run = Run(task, tok, make_judge(cfg.judge, task, cfg) if cfg.algo not in OFFLINE else None, policy, wrapped[0], ref,
              opt, sched, value, wrapped[1] if value is not None else None, init=init)
    if cfg.rollout == "vllm" and cfg.algo not in OFFLINE:
        run.sampler = rollout.VllmSampler(weights, model_dtype(cfg, ctx.device), cfg.seed + 1000 * ctx.rank,
                                          context_window(cfg, policy.config), cfg.vllm_gpu_memory, ctx.world,
                                          cfg.trust_remote_code)
        if sharded_ckpt:
            run.sampler.push_weights(policy)
    log = Logger(cfg, ctx, start)
    if ctx.master and start == 0:
        print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    step_fn = {"dar": dar_step, "sft": sft_step}.get(cfg.algo) or baselines.STEPS[cfg.algo]
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not ctx.master,
               desc=cfg.algo, dynamic_ncols=True)
    term, nonfinite_run = TermSignal(), 0
    try:
        for step in bar:
            t0, rng_before = time.time(), rng_state()
            try:
                metrics = step_fn(step, cfg, ctx, run)
            except JudgeFailure as e:  # nothing of this batch was trained on: keep the work before it, stop
                set_rng_state(rng_before)  # --resume then draws this batch again, as an uninterrupted run would
                if step > start and step % cfg.save_every:
                    save_checkpoint(cfg, ctx, step, run)
                last = latest_checkpoint(cfg) or "none yet (no batch was trained)"
                raise SystemExit(f"error: online batch {step + 1}: {e}. Stopped before training on it; the "
                                 f"last checkpoint is {last}. Once the judge works, continue with --resume.")
            if run.sampler is not None:  # step 7 for the vLLM sampler: pi_{t+1} <- pi_theta
                t1 = time.time()
                run.sampler.push_weights(policy)
                metrics["perf/weight_sync_s"] = time.time() - t1
            metrics.update({"step": step + 1, "perf/seconds_per_batch": time.time() - t0})
            finite = math.isfinite(metrics["train/loss"])
            nonfinite_run = 0 if finite else nonfinite_run + 1
            metrics["train/nonfinite_batches_in_a_row"] = nonfinite_run
            log.log(metrics)
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
            saved = finite and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps)
            if saved:
                save_checkpoint(cfg, ctx, step + 1, run)
            if term.received(ctx) and step + 1 < cfg.steps:  # pre-emption: keep this batch's work, then stop
                if not saved:
                    save_checkpoint(cfg, ctx, step + 1, run)
                print(f"SIGTERM after online batch {step + 1}: checkpoint {latest_checkpoint(cfg)} written; "
                      f"continue with --resume", file=sys.stderr, flush=True)
                raise SystemExit(143)
    except Exception as e:
        if ctx.world > 1:  # a dead or hung peer surfaces here as a collective's error (or its --dist-timeout)
            print(f"error: rank {ctx.rank} failed in online batch {step + 1} ({type(e).__name__}); torchrun stops "
                  f"the other ranks. The last checkpoint is {latest_checkpoint(cfg) or 'none yet'}: once the cause "
                  f"is fixed, continue with --resume", file=sys.stderr, flush=True)
        raise
    finally:
        term.restore()
    bar.close()
    if cfg.fsdp:  # the final model as an ordinary Hugging Face directory, gathered onto rank 0's CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        whole = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if getattr(policy.config, "tie_word_embeddings", False):  # the head is the embedding: saved once
            for name in getattr(policy, "_tied_weights_keys", None) or ():
                whole.pop(name, None)
        if ctx.master:
            save_model_dir(os.path.join(cfg.out_dir, "final"), policy, tok, weights=whole)
    else:
        for m in models:
            check_ranks_agree(ctx, m)
        if ctx.master:
            save_model_dir(os.path.join(cfg.out_dir, "final"), policy, tok)
    barrier(ctx)
    return run


def check_ranks_agree(ctx, model):
    """DDP keeps every rank's replica identical; check it at the end of a run (one number per tensor)."""
    if ctx.world == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(ctx.device)
    per_rank = gather(ctx, sums).view(ctx.world, -1)
    diff = (per_rank - per_rank[0]).abs().max().item()
    if diff > 0:
        raise SystemExit(f"error: parameters differ across ranks (max checksum difference {diff:g})")
    if ctx.master:
        print(f"parameters identical on all {ctx.world} ranks", flush=True)


def summary_line(m):
    keys = [("step", "step", "d"), ("train/reward_mean", "reward", ".3f"), ("train/nll_per_token", "nll", ".4f"),
            ("weights/w_mean", "w", ".2f"), ("weights/clip_frac", "clip", ".2f"), ("train/kl_pi0", "kl0", ".3f"),
            ("train/response_len", "len", ".1f"), ("train/missing_eos", "noeos", ".2f"),
            ("train/loss", "loss", ".4f"), ("train/grad_norm", "gnorm", ".2f"), ("perf/seconds_per_batch", "s", ".2f")]
    return "  ".join(f"{short} {m[k]:{fmt}}" for k, short, fmt in keys if k in m)


# ---------------------------------------------------------------------------------------------------
# The pieces every online algorithm shares (baselines.py uses them too): sample, judge, log-probs of
# pi_t and pi_0, minibatch updates with gradient accumulation under DDP, and the common metrics.
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
                            record_logp=cfg.logp_source == "sampler", synced=cfg.fsdp and ctx.world > 1)


def pi_t_logps(cfg, ctx, run, batch):
    """log pi_t(y_j | x, y_<j) of the batch [N, R], once per online batch, and when the sampler gave its own
    log-probs, the mean absolute difference between them and the policy's per sequence (else None).

    The policy's forward pass is the default source: the sampler's copy may differ (bf16 kernels, a
    missed weight sync), and training on its numbers would be silently off-policy. --logp-source sampler
    uses the sampler's instead (vLLM's, or those transformers' generate recorded while sampling) and saves
    that pass: the policy then scores only the first micro-batch, enough to log the difference
    (rollout/logp_abs_diff, logged either way) and to see a missed weight sync.
    """
    if batch.sampler_logp is None:
        return score(run.policy, batch, cfg.micro_batch), None
    sampler = batch.sampler_logp.to(ctx.device).float()
    rows = slice(None) if cfg.logp_source == "policy" else slice(0, min(cfg.micro_batch, len(batch)))
    logp = score(run.policy, batch.select(torch.arange(len(batch))[rows]), cfg.micro_batch)
    R = logp.shape[1]  # select() trims the columns that are padding in every row
    mask = batch.response_mask[rows, :R].to(logp.device)
    diff = ((sampler[rows, :R] - logp).abs() * mask).sum(1) / mask.sum(1).clamp(min=1)
    if cfg.logp_source == "sampler":
        return sampler, diff
    return torch.nn.functional.pad(logp, (0, sampler.shape[1] - R)), diff


MAX_NONFINITE_BATCHES = 3  # online batches in a row with a non-finite loss before the run stops


class JudgeFailure(Exception):
    """More invalid judgments in an online batch than --max-invalid-frac allows."""


def judge_batch(cfg, ctx, run, batch):
    """Step 2: rewards r(x, y_i) [N] (float64, NaN = invalid judgment, an infinite one included) and the number
    of invalid ones.

    Raises JudgeFailure (on every rank alike) when the share of invalid judgments over the whole online batch
    exceeds cfg.max_invalid_frac: a judge that is down or answering garbage, whose batch must not be trained on.
    """
    judged = run.judge(batch.prompts, batch.responses, batch.ended.tolist())
    rewards = torch.tensor(judged.rewards, dtype=torch.float64)
    if torch.isinf(rewards).any():  # an infinite reward (a reward model overflowing) is no judgment either
        judged.reasons["infinite reward"] = int(torch.isinf(rewards).sum())
        rewards = torch.where(torch.isinf(rewards), math.nan, rewards)
    invalid = int(torch.isnan(rewards).sum())
    counts = gather(ctx, torch.tensor([float(invalid), float(len(batch))], device=ctx.device)).view(-1, 2)
    frac = (counts[:, 0].sum() / counts[:, 1].sum()).item()
    if frac > cfg.max_invalid_frac:
        where = {"llm": f"the annotator at {cfg.judge_url}", "reward_model": f"the reward model {cfg.reward_model}"}
        reasons = ", ".join(f"{n} {why}" for why, n in judged.reasons.items()) or "no reasons given"
        raise JudgeFailure(f"{frac:.0%} of its judgments are invalid, above --max-invalid-frac "
                           f"{cfg.max_invalid_frac:g} ({where.get(cfg.judge, 'judge ' + cfg.judge)}; on this rank: "
                           f"{reasons})")
    return rewards, invalid


def minibatch_updates(cfg, ctx, run, n_units, n_updates, micro_units, loss_fn, epochs, cost=None):
    """Optimizer steps on one online batch: per epoch, a fresh shuffle of this rank's n_units units (a
    sequence, or a prompt's group), split into n_updates minibatches; each minibatch in micro-batches
    of micro_units units whose gradients accumulate (DDP syncs on the last one only).

    loss_fn(rows) -> (sum of the per-unit losses of units `rows`, {name: float}); the minibatch loss
    is that sum over the minibatch size, so micro-batching never changes the gradient. cost: tokens per
    unit [n_units]; a minibatch's units are then cut into micro-batches in order of cost, so each
    micro-batch pads to similar lengths (the minibatch, hence the update, is the same). Returns
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
            loss_sum = 0.0
            for j, mb in enumerate(micro):
                with contextlib.ExitStack() as stack:
                    if ctx.world > 1 and j < len(micro) - 1:
                        for m in run.trained:
                            stack.enter_context(local_gradients(m))
                    loss, info = loss_fn(mb)
                    (loss / per_update).backward()
                loss_sum += loss.item() / per_update
                for k, v in info.items():
                    stats.setdefault(k, []).append(v)
            losses.append(loss_sum)
            norms.append(optimizer_step(cfg, run.trained, run.opt, run.sched))
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
    if ctx.master and (step + 1) % cfg.sample_every == 0:
        print_samples(batch, rewards.tolist())
    return {
        "train/reward_mean": R[valid].mean().item(), "train/reward_std": R[valid].std(correction=0).item(),
        "train/invalid_judgments": int(n_invalid.sum().item()),
        **{f"train/{k}": v for k, v in rank_means(ctx, upd).items()},
        "train/kl_pi0": kl0.mean().item(),
        "train/response_len": lengths.mean().item(), "train/missing_eos": 1 - ended.mean().item(),
        "train/lr": run.sched.get_last_lr()[0],
        **({} if logp_diff is None else {"rollout/logp_abs_diff": g(logp_diff).mean().item()}),
        **extra,
        "perf/tokens_per_s": lengths.sum().item() / max(timer["sample"], 1e-9),
        **{f"perf/{k}_s": v for k, v in timer.items()},
    }


def rank_means(ctx, stats):
    """{name: mean over ranks} of per-rank float statistics (every rank reports the same names)."""
    names = sorted(stats)
    local = torch.tensor([stats[k] for k in names], dtype=torch.float64, device=ctx.device)
    return {k: v.item() for k, v in zip(names, gather(ctx, local).view(ctx.world, -1).mean(0))}


@contextlib.contextmanager
def local_gradients(model):
    """Accumulate this micro-batch's gradients on the rank, without syncing them (DDP's no_sync; FSDP2's
    set_requires_gradient_sync): only a minibatch's last micro-batch pays for the reduction."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def timed(timer, name):
    t = time.time()
    yield
    timer[name] = timer.get(name, 0.0) + time.time() - t


def dar_step(step, cfg, ctx, run):
    """One online batch of Algorithm 1. Returns its metrics."""
    timer = {}

    # 1. sample prompts x (this rank's share) and K responses each from pi_t          [N = prompts * K]
    with timed(timer, "sample"):
        batch = sample(step, cfg, ctx, run)

    # 2. rewards r(x, y_i) from the judge; NaN = invalid judgment                       [N]
    with timed(timer, "judge"):
        rewards, invalid = judge_batch(cfg, ctx, run, batch)

    # 3. advantages: A_i = r_i - mean_K r (per prompt, on this rank), then batch statistics mu_A, sigma_A over
    #    the whole online batch (all ranks), so the result does not depend on the number of ranks  [N]
    adv = group_advantages(rewards, cfg.k)
    adv_mean, adv_std = advantage_stats(gather(ctx, adv.to(ctx.device)).cpu())

    # 4. log pi_t(y|x) and log pi_0(y|x), once per online batch: pi_t is the policy that sampled the batch
    with timed(timer, "logp_t"):
        logp_t_tok, logp_diff = pi_t_logps(cfg, ctx, run, batch)                               # [N, R]
    with timed(timer, "logp_0"):
        logp_0_tok = score(run.ref, batch, cfg.micro_batch)                                     # [N, R]
    logp_t, logp_0 = logp_t_tok.sum(1).cpu(), logp_0_tok.sum(1).cpu()                  # [N]

    # 5. weights w_i = min((pi_0/pi_t)^alpha * exp(A_norm/beta), w_clip)  (Eq. 4)        [N]
    w, parts = dar_weights(adv, logp_t, logp_0, cfg.alpha, cfg.beta, cfg.w_clip, cfg.normalize_adv,
                           adv_mean, adv_std)

    # 6. weighted-SFT updates: online_batch / minibatch optimizer steps per epoch, each on a random minibatch
    def loss_fn(mb):
        logp = rollout.token_logps(run.ddp, batch.select(mb).to(ctx.device)).sum(1)             # [n]
        loss, _ = dar_loss(logp, logp_t[mb], logp_0[mb], adv[mb], cfg.alpha, cfg.beta, cfg.w_clip,
                           cfg.normalize_adv, adv_mean, adv_std, length_norm=cfg.max_new_tokens)
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


def score(model, batch, micro_batch, per_token=rollout.token_logps):
    """Token log-probs (or any per_token(model, batch) -> [n, R], e.g. PPO's values) of a whole batch under a
    frozen view of `model`, in micro-batches: [N, R].

    Rows go through in order of length, so each micro-batch holds rows of similar length and select() trims
    the padding they share; the results are put back in the batch's order. Inference mode: no autograd
    bookkeeping at all; the returned tensor is an ordinary one (a clone), usable in later losses. A sharded
    model (--fsdp) runs under no_grad instead: FSDP2 keeps the buffers its all-gathers fill and trains
    through them later, which a tensor made in inference mode cannot be.
    """
    from torch.distributed.fsdp import FSDPModule
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = torch.argsort(batch.lengths(), stable=True)
    with torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode():
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=device)
        for i in range(0, len(batch), micro_batch):
            rows = order[i:i + micro_batch]
            part = batch.select(rows).to(device)
            out[rows.to(device), :part.response_mask.shape[1]] = per_token(model, part).float()
    model.train(was_training)
    return out.clone()


def sft_step(step, cfg, ctx, run):
    """Supervised fine-tuning on the task's demonstrations: the weighted-SFT loss with every w_i = 1."""
    per_rank = cfg.minibatch // ctx.world
    idx = prompt_indices(step, cfg.minibatch, len(run.task.sft_data), cfg.seed)[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    pairs = [run.task.sft_data[i] for i in idx]
    batch = rollout.from_texts(run.tok, [p for p, _ in pairs], [r for _, r in pairs])

    def loss_fn(mb):
        part = batch.select(mb).to(ctx.device)
        logp_tok = rollout.token_logps(run.ddp, part)                                          # [n, R]
        loss = weighted_sft_loss(logp_tok.sum(1), torch.ones(len(mb), device=ctx.device), cfg.max_new_tokens)
        return loss.sum(), {"nll_sum": -logp_tok.detach().sum().item(), "tokens": part.response_mask.sum().item()}

    upd = minibatch_updates(cfg, ctx, run, per_rank, 1, cfg.micro_batch, loss_fn, epochs=1)
    s = gather(ctx, torch.tensor([upd["loss"], upd["nll_sum"], upd["tokens"], upd["grad_norm"]],
                                 dtype=torch.float64, device=ctx.device)).view(-1, 4)
    return {"train/loss": s[:, 0].mean().item(), "train/nll_per_token": (s[:, 1].sum() / s[:, 2].sum()).item(),
            "train/grad_norm": s[:, 3].mean().item(), "train/lr": run.sched.get_last_lr()[0]}


def main(argv=None):
    import transformers
    transformers.utils.logging.disable_progress_bar()  # one tqdm bar: ours
    cfg = parse_config(argv)
    if cfg.export_hf:
        export_hf(cfg.export_hf, cfg.out_dir)
        print(f"wrote {cfg.out_dir}", flush=True)
        return
    ctx = setup_distributed(cfg)
    check_config(cfg, ctx.world)
    run = None
    try:
        run = train(cfg, ctx)
        if cfg.algo != "sft" and ctx.master and cfg.eval_prompts > 0:
            from eval import compare_with_reference, print_report
            policy, ref = run.policy, run.ref
            if cfg.fsdp:  # sharded models answer only when every rank calls them: rank 0 evaluates whole copies
                policy = load_model(os.path.join(cfg.out_dir, "final"), cfg, ctx.device, frozen=True)
                ref = load_model(run.init, cfg, ctx.device, frozen=True)
            report = compare_with_reference(policy, ref, run.tok, run.task.eval_prompts[:cfg.eval_prompts], cfg,
                                            task=run.task)
            with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
                json.dump(report, f, indent=1)
            print_report(report)
        barrier(ctx)
    finally:
        if run is not None and run.sampler is not None:
            run.sampler.close()  # vLLM's shutdown may take the default process group down with it
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.modules.setdefault("dar", sys.modules["__main__"])  # baselines.py's `import dar` gets this module, not a copy
    main()
