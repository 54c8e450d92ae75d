"""Evaluation of trained policies against the initial policy pi_0, aggregation over seeds, and the paper's plots.

    python eval.py runs/toy-dar-s0 runs/toy-dar-s1 runs/toy-dar-s2            # final models, table over seeds
    python eval.py runs/* --out runs/eval --checkpoints                         # and the best checkpoint
    python eval.py runs/helpful-dar-s* --eval-judge-url https://api.openai.com/v1 --eval-judge-model gpt-4-turbo
    python eval.py runs/helpful-dar-s0 --greedy                                # greedy decoding (MT-Bench setting)

The test prompts are a seeded random subset of the task's held-out prompts (--n-prompts, default the paper's
1,000, capped at what the task has; --seed), the same that dar.py's end-of-run report uses (data.random_subset).
Reported per model (Section 5 of the paper; golden reward and KL estimator of the IS-DPO appendix, C-D):
  * mean reward of pi_0 and of the policy under the evaluation judge, one sample per test prompt at
    temperature 0.9 (the training-time evals) or greedy;
  * the reference win rate over pi_0, `win_rate` (Tables 2-3, Fig. 3; per prompt 1 if the policy's response
    wins, 1/2 a tie): of an LLM evaluator, its pairwise preference asked in both orders (`pref_win_rate`, the
    paper's protocol); of a scorer (toy rules, reward model), the reward comparison (`reward_win_rate`), its own
    preference (the gold rule's with its EOS check, which RuleJudge.prefer leaves out). The other is beside it;
  * golden-reward win rate (IS-DPO appendix, "Golden reward Evaluation"): the gold scorer (the eval judge)
    scores 2 policy samples per prompt and the data set's reference completion; win rate over all pairs;
  * KL(pi_theta || pi_0) with k3 on the policy's own samples, of the models at the temperature the compared
    responses are sampled with (`kl_temperature`; 1 with greedy decoding), and for DAR the alpha-interpolated
    KL of Section 5.2 (see alpha_kl);
  * missing-EOS rate, mean response length (tokens) and distinct-1/2 (loop.distinct_n) of the responses.

Also, when the run was trained on another judge than the eval judge, the reward under the training judge (up
while the eval reward goes down: reward hacking), and the share of responses at the best score of a bounded scale.

With --checkpoints every kept checkpoint is evaluated too, and "the best checkpoint" (Table 2) is the one with the
highest win rate on the task's validation prompts (Task.valid_prompts: disjoint from the test prompts and from
all training data), reported on the test prompts beside the final model.

Over runs: mean and 95% t-interval over seeds (Tables 2-3; a seed counted once), final and best side by side
(table.csv), training curves with 95% bands (Figs. 3, 5a-b, 6), with --checkpoints win-rate and reward curves
over the kept checkpoints, reward-KL Pareto frontiers with second-order fits (Fig. 4), ablations of alpha, beta,
K, w_clip (Fig. 5c-f), seconds per online batch by phase (Table 8). Writes into --out: one JSON per run,
summary.json, table.csv, curves.{csv,png}, eval_curves.{csv,png}, pareto.{csv,png}, ablation_PARAM.{csv,png},
timing.csv. For Table 4, --alpacaeval FILE and --mtbench FILE write each final model's answers in their formats.
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import signal

if __name__ == "__main__":  # Ctrl-C while torch and transformers import (seconds): the default action, no traceback
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import numpy as np
import torch
import transformers

import data
import rollout
import tasks
from config import USED_BY, VALUE_BEFORE_FIELD, Config, check_judge_flags, config_from_dict, trainer_state
from infra import Dist, check_checkpoint, exit_on_ctrl_c, fetch_from_hub, load_model, load_tokenizer
from judge import JUDGES, AnnotatorUnavailable
from loop import (distinct_n, ensure_toy_models, eval_judge, evaluator_config, fitting_task, golden_win_rate, k3,
                  mean_ci, score, t975, training_reward, win_rate)
from rewards import TRAINING_REWARD, describe_reward, judge_rollout

ABLATION_PARAMS = ("alpha", "beta", "k", "w_clip")  # Fig. 5(c)-(f)
# Config fields that never make two runs different experiments (bookkeeping, endpoints, the seed itself)
NOT_HYPERPARAMETERS = {"seed", "out_dir", "resume", "overwrite", "cache_dir", "print_every", "sample_every",
                       "save_every", "keep_checkpoints", "eval_prompts", "eval_seed", "eval_judge_url",
                       "eval_judge_model", "eval_judge_api_key_env", "judge_url", "judge_api_key_env",
                       "judge_concurrency", "judge_timeout", "judge_patience", "rollout", "vllm_gpu_memory", "backend",
                       "dtype", "logp_source", "steps", "prompt_epochs", "pref_epochs", "gradient_checkpointing",
                       "max_invalid_frac", "judge_log", "eval_every", "eval_every_prompts"}


def alpha_kl(logp, logp_0, logp_prev, mask, alpha):
    """The alpha-interpolated KL that Section 5.2 / Fig. 4 plots for DAR, per sequence: [N].

    Our reading: the regulariser of the dual-KL objective (Eq. 3) without beta,
        alpha * KL(pi_theta || pi_0) + (1 - alpha) * KL(pi_theta || pi_t),
    which by Proposition 4.1 equals KL(pi_theta || pi_ref) - log C(x) for the log-interpolated target
    pi_ref = pi_0^alpha pi_t^(1-alpha) / C(x) ("DAR employs dual-KL regularization" and "report the
    alpha-interpolated KL regularization", Section 5.2). The sum is what beta multiplies in Eq. 3 and needs no
    normaliser C(x) (intractable for sequences); k3 with the unnormalised interpolation in place of pi_ref
    would be biased by C - 1. So each KL is estimated with k3 on the policy's own samples (Schulman's
    estimator, as in the IS-DPO appendix's "KL estimation") and the two are mixed with alpha.
    pi_t, the policy the last online batch was sampled from, is not saved; the closest saved policy is the
    previous checkpoint (save_every batches earlier), so KL(pi_theta || pi_prev) is an upper-ish proxy of the
    one-batch KL. With alpha = 1 this is KL(pi_theta || pi_0), the x-axis of the baselines in Fig. 4.
    """
    return alpha * k3(logp, logp_0, mask) + (1 - alpha) * k3(logp, logp_prev, mask)


def evaluator_note(cfg):
    if cfg.eval_judge == "llm" and not cfg.eval_judge_url:
        return ("note: --eval-judge llm without --eval-judge-url: the training annotator (--judge-url) evaluates; "
                "the paper's evaluator is a separate, stronger model (GPT-4-Turbo / GPT-5.1)")
    return None


# What the headline win rate is, per eval judge (see the module docstring)
WIN_RATE_DEFS = {"pref_win_rate": "the eval judge's pairwise preference, both orders, ties 1/2",
                 "reward_win_rate": "the eval judge's rewards compared, ties 1/2"}


def headline_key(eval_judge):
    """The report key the headline `win_rate` is taken from: an LLM evaluator's pairwise preference (the
    paper's protocol), else a scorer's reward comparison (the scorer's own preference)."""
    return "pref_win_rate" if eval_judge == "llm" else "reward_win_rate"


@torch.no_grad()
def compare_with_reference(policy, ref, tok, prompts, cfg, task=None, seed=1234, *, greedy=False, temperature=None,
                           pairwise=True, references=None, golden_samples=2, prev=None, alpha=None,
                           win_rate_only=False, state=None):
    """Evaluate `policy` against `ref` (pi_0) on held-out prompts (Tables 2-3, Figs. 3-4); a dict of numbers.

    greedy / temperature: decoding of the compared responses (default cfg.temperature); pairwise: also the
    judge's pairwise preference win rate (always asked of an LLM evaluator: it is the headline); references: the
    data set's reference completion per prompt, for the golden-reward win rate with `golden_samples` policy
    samples per prompt; prev, alpha: a previous policy and DAR's alpha, for the alpha-interpolated KL
    (alpha_kl); win_rate_only: stop after the win rates (no training judge, golden win rate or KL: the
    validation pass that picks the best checkpoint). The eval judge is built from evaluator_config(cfg); --reward
    functions get `state` as trainer_state (config.trainer_state of the evaluated policy). Runs in its own RNG
    stream (fork_rng), so an evaluation never changes what training samples next.
    """
    temperature = cfg.temperature if temperature is None else temperature
    evaluator = evaluator_config(cfg)
    judge = eval_judge(cfg, task, tok, state)
    # The training judge too when it is another one (the paper's annotator vs. its stronger evaluator; the toy
    # proxy vs. the gold rule): reward going up under it and down under the eval judge is reward hacking.
    other = ((cfg.judge != cfg.eval_judge or cfg.reward or evaluator is not cfg) and cfg.eval_judge != TRAINING_REWARD
             and (cfg.judge != "llm" or cfg.judge_url))
    train_judge = None
    if other and not win_rate_only:  # with the --reward functions when there are any
        train_judge = training_reward(cfg, task, tok, state)
    report = {"n_prompts": len(prompts), "judge": cfg.eval_judge, "decoding": "greedy" if greedy else f"T={temperature}",
              "eval_seed": seed, "prompts_sha256": hashlib.sha256(
                  "\n".join(data.prompt_key(p) for p in prompts).encode("utf-8")).hexdigest()[:16]}
    if cfg.eval_judge == "llm":
        report["evaluator"] = getattr(judge, "model", "") + ("" if cfg.eval_judge_url else " at --judge-url")
    rewards, batches = {}, {}
    with torch.random.fork_rng(devices=[]):
        for name, model in (("pi_0", ref), ("policy", policy)):
            torch.manual_seed(seed)
            batch = batches[name] = rollout.generate(model, tok, prompts, 1, cfg.max_new_tokens, temperature, greedy)
            j = judge_rollout(judge, batch)
            rewards[name] = j.rewards
            report[f"{name}/reward"], report[f"{name}/reward_ci"] = mean_ci(j.rewards)
            report[f"{name}/missing_eos"] = 1 - batch.ended.double().mean().item()
            report[f"{name}/length"] = batch.response_mask.sum(1).double().mean().item()
            for n in (1, 2):  # lexical diversity: repetition ("great great great!!!") games lexicon scorers
                report[f"{name}/distinct{n}"] = distinct_n(batch.responses, n)
            if getattr(judge, "top", None) is not None:  # share of responses at the scale's best score
                report[f"{name}/top_score"] = (torch.tensor(j.rewards) == judge.top).double().mean().item()
            report[f"{name}/invalid_judgments"] = j.invalid
            if train_judge is not None:
                report[f"{name}/train_judge_reward"] = mean_ci(judge_rollout(train_judge, batch).rewards)[0]
        if train_judge is not None:
            report["train_judge"] = describe_reward(cfg, cfg.judge if cfg.judge != cfg.eval_judge or cfg.reward
                                                    else f"{cfg.judge} annotator")
        if getattr(judge, "top", None) is not None:
            report["top"] = judge.top
        report["reward_win_rate"], report["reward_win_rate_ci"] = win_rate(rewards["policy"], rewards["pi_0"])
        if pairwise or cfg.eval_judge == "llm":  # P(policy preferred) per prompt; both orders, ties/disagreement 1/2
            p = judge.prefer(list(prompts), batches["policy"].responses, batches["pi_0"].responses)
            report["pref_win_rate"], report["pref_win_rate_ci"] = mean_ci(p)
            report["pref_invalid"] = sum(math.isnan(x) for x in p)
        key = report["win_rate_from"] = headline_key(cfg.eval_judge)
        report["win_rate"], report["win_rate_ci"] = report[key], report[key + "_ci"]
        if win_rate_only:
            return report
        if references is not None and all(r is not None for r in references):
            s = 1 if greedy else golden_samples
            torch.manual_seed(seed + 2)
            gs = rollout.generate(policy, tok, prompts, s, cfg.max_new_tokens, temperature, greedy)
            r_s = judge_rollout(judge, gs).rewards
            r_ref = judge(list(prompts), list(references), [True] * len(references)).rewards
            report["golden/win_rate"], report["golden/win_rate_ci"] = golden_win_rate(
                torch.tensor(r_s, dtype=torch.float64).view(len(prompts), s), r_ref)
            report["golden/reference_reward"] = mean_ci(r_ref)[0]
            report["golden/samples_per_prompt"] = s
        torch.manual_seed(seed + 1)  # the KL of the distributions sampled (at T, log-probs at T too: rollout.py)
        report["kl_temperature"] = 1.0 if greedy else temperature
        own = rollout.generate(policy, tok, prompts, 1, cfg.max_new_tokens, report["kl_temperature"])
        logp, logp_0 = score(policy, own, cfg.micro_batch), score(ref, own, cfg.micro_batch)
        report["kl_pi0"], report["kl_pi0_ci"] = mean_ci(k3(logp, logp_0, own.response_mask))
        if prev is not None and alpha is not None:
            logp_prev = score(prev, own, cfg.micro_batch)
            report["kl_prev"], report["kl_prev_ci"] = mean_ci(k3(logp, logp_prev, own.response_mask))
            report["kl_alpha"], report["kl_alpha_ci"] = mean_ci(alpha_kl(logp, logp_0, logp_prev, own.response_mask,
                                                                         alpha))
    return report


def print_report(r):
    invalid = r["pi_0/invalid_judgments"] + r["policy/invalid_judgments"]
    print(f"\nEvaluation on {r['n_prompts']} held-out prompts (a random subset, seed {r['eval_seed']}; judge: "
          f"{r['judge']}" + (f", {r['evaluator']}" if "evaluator" in r else "")
          + (f"; {invalid} invalid judgments left out" if invalid else "") + ")")
    top, proxy = r.get("top"), r.get("train_judge")
    print(f"  {'':8} {'reward':>16}" + (f" {f'{top:g}/{top:g}':>7}" if top is not None else "")
          + f" {'no EOS':>7} {'length':>7} {'dist-1':>6} {'dist-2':>6}"
          + (f"   reward under the training judge ({proxy})" if proxy else ""))
    for name in ("pi_0", "policy"):
        print(f"  {name:8} {r[name + '/reward']:8.2f} ± {r[name + '/reward_ci']:<5.2f}"
              + (f" {r[name + '/top_score']:7.1%}" if top is not None else "")
              + f" {r[name + '/missing_eos']:7.1%} {r[name + '/length']:7.1f}"
              + f" {r.get(name + '/distinct1', math.nan):6.3f} {r.get(name + '/distinct2', math.nan):6.3f}"
              + (f"   {r[name + '/train_judge_reward']:8.2f}" if proxy else ""))
    print(f"  win rate of the policy over pi_0 ({WIN_RATE_DEFS[r['win_rate_from']]}): {r['win_rate']:.1%} "
          f"± {r['win_rate_ci']:.1%}")
    for k in WIN_RATE_DEFS:
        if k in r and k != r["win_rate_from"]:
            print(f"    by {WIN_RATE_DEFS[k]}: {r[k]:.1%} ± {r[k + '_ci']:.1%}")
    if "golden/win_rate" in r:
        print(f"  golden win rate over the references (all pairs): {r['golden/win_rate']:.1%} "
              f"± {r['golden/win_rate_ci']:.1%}")
    print(f"  KL(policy || pi_0) at T={r.get('kl_temperature', 1.0):g}, k3 estimate: {r['kl_pi0']:.3f} "
          f"± {r['kl_pi0_ci']:.3f} nats")
    if "kl_alpha" in r:
        print(f"  alpha-interpolated KL (alpha KL(pi||pi_0) + (1-alpha) KL(pi||pi_prev)): {r['kl_alpha']:.3f} nats")


# ---------------------------------------------------------------------------------------------------
# One run directory: rebuild its config, load pi_0, the checkpoint and the previous checkpoint
# ---------------------------------------------------------------------------------------------------
def load_run_config(run_dir):
    """The run's config.Config from its config.json (fields this version does not know are ignored)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        return config_from_dict(json.load(f))


def checkpoint_step(run_dir, ckpt_dir, cfg):
    """The online batch a model directory holds: N for ckpt-N, the last logged step for final/."""
    m = re.fullmatch(r"ckpt-(\d+)", os.path.basename(os.path.normpath(ckpt_dir)))
    if m:
        return int(m.group(1))
    rows = read_metrics(run_dir)
    return int(rows[-1]["step"]) if rows else cfg.steps


def checkpoints(run_dir):
    """[(step, path)] of the complete checkpoints kept in a run directory, oldest first."""
    out = []
    for d in os.listdir(run_dir):
        m = re.fullmatch(r"ckpt-(\d+)", d)
        if m and os.path.isfile(os.path.join(run_dir, d, "config.json")):
            out.append((int(m.group(1)), os.path.join(run_dir, d)))
    return sorted(out)


@torch.no_grad()
def evaluate_checkpoint(run_dir, ckpt_dir, n_prompts, greedy=False, temperature=0.9, seed=1234, golden_samples=2,
                        device=None, validation=False, evaluator=None):
    """Evaluate one model directory of a run against pi_0 (Tables 2-3, Fig. 3 points, Fig. 4 markers).

    Rebuilds the run's config from config.json (evaluator: {field: value} over it, e.g. eval_judge_url); pi_0 is
    the config's model (the toy SFT pi_0 when it is '', made in the cache if missing); the eval judge, and the
    seeded random subset of n_prompts test prompts with their references (data.random_subset). Returns
    compare_with_reference's report plus the golden win rate, for DAR the alpha-interpolated KL against the
    previous kept checkpoint (kl_alpha; absent when there is none), "step", and "run" (task, algo, seed, step,
    checkpoint and the run's config) for grouping. validation: also the win rate on as many of the task's
    validation prompts ("valid/win_rate", NaN when the task has none), which picks the best checkpoint.
    """
    check_checkpoint(ckpt_dir)  # a damaged one is named before anything loads
    cfg = dataclasses.replace(load_run_config(run_dir), **(evaluator or {}))
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fetch_from_hub(cfg, Dist(device=device))  # a saved Hub snapshot this machine's cache lacks: the same commit
    init = cfg.model
    if not init:
        base, sft = ensure_toy_models(cfg, Dist(device=device))
        init = base if cfg.algo == "sft" else sft
    tok = load_tokenizer(ckpt_dir, cfg.trust_remote_code, cfg.chat_template_kwargs)
    policy = load_model(ckpt_dir, cfg, device).eval()
    task = tasks.load_task(cfg.task, cfg.data, cfg.eval_fraction, cfg.valid_fraction)  # the run's prompts
    task, _ = fitting_task(cfg, task, tok, policy.config)
    ref = load_model(init, cfg, device).eval()
    step = checkpoint_step(run_dir, ckpt_dir, cfg)
    state = trainer_state(cfg, step, len(task.train_prompts))
    prev, prev_step = None, None
    if cfg.algo == "dar":
        earlier = [(s, p) for s, p in checkpoints(run_dir) if s < step]
        if earlier:
            prev_step, path = earlier[-1]
            check_checkpoint(path)
            prev = load_model(path, cfg, device).eval()
    prompts, refs = data.random_subset(task.eval_prompts, n_prompts, seed, task.references)
    report = compare_with_reference(policy, ref, tok, prompts, cfg, task=task, seed=seed, greedy=greedy,
                                    temperature=temperature, references=refs, golden_samples=golden_samples,
                                    prev=prev, alpha=cfg.alpha, state=state)
    if prev is not None:
        report["kl_alpha/prev_step"] = prev_step
    if validation:
        report["valid/win_rate"], report["valid/win_rate_ci"], report["valid/n_prompts"] = math.nan, math.nan, 0
        if task.valid_prompts:
            valid, _ = data.random_subset(task.valid_prompts, n_prompts, seed)
            v = compare_with_reference(policy, ref, tok, valid, cfg, task=task, seed=seed, greedy=greedy,
                                       temperature=temperature, win_rate_only=True, state=state)
            report["valid/win_rate"], report["valid/win_rate_ci"], report["valid/n_prompts"] = (
                v["win_rate"], v["win_rate_ci"], len(valid))
    report["step"] = step
    report["run"] = dict(run_dir=os.path.abspath(run_dir), checkpoint=os.path.abspath(ckpt_dir), step=step,
                         task=cfg.task, algo=cfg.algo, seed=cfg.seed, config=dataclasses.asdict(cfg))
    return report


# ---------------------------------------------------------------------------------------------------
# Over seeds and runs
# ---------------------------------------------------------------------------------------------------
def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def aggregate_seeds(reports):
    """Mean and 95% confidence interval over seeds for every numeric key (Tables 2-3: "averaged over 3 seeds").

    The interval is Student's t: half-width t_{0.975, n-1} * sd / sqrt(n), sd with Bessel's correction
    (t = 4.303 for n = 3 seeds). A key is aggregated when it is numeric in every report; NaNs are left out
    (n counts the valid values; with n < 2 the interval is NaN).
    Returns {key: {"mean", "ci", "n"}}.
    """
    keys = [k for k in reports[0] if all(k in r and _is_number(r[k]) for r in reports)]
    out = {}
    for k in keys:
        x = np.array([r[k] for r in reports], dtype=np.float64)
        x = x[~np.isnan(x)]
        n = len(x)
        mean = float(x.mean()) if n else math.nan
        ci = float(t975(n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        out[k] = {"mean": mean, "ci": ci, "n": n}
    return out


def hyperparameters(config):
    """The settings that make a run's experiment: every field but the seed and NOT_HYPERPARAMETERS, leaving out
    those its algorithm never reads (config.USED_BY); a field that an older run's config lacks takes the
    value that reproduces what the code then did (config.VALUE_BEFORE_FIELD), else today's default, and a field
    this version does not know (a setting it no longer has) is left out, as config_from_dict leaves it out."""
    known = dataclasses.asdict(Config())
    full = {**known, **VALUE_BEFORE_FIELD, **{k: v for k, v in config.items() if k in known}}
    return {k: v for k, v in full.items() if k not in NOT_HYPERPARAMETERS
            and full["algo"] in USED_BY.get(k, (full["algo"],))}


def experiment_key(config):
    """What makes runs the same experiment: task, algorithm and every hyperparameter except the seed."""
    return tuple(sorted((k, json.dumps(v)) for k, v in hyperparameters(config).items()))


def experiment_label(config, configs):
    """algo, plus the hyperparameters in which this experiment differs from the usual value (the strictly most
    common one among the experiments of the same algo and task; without one, every experiment shows its
    value): "dar" for the base run of a sweep, "dar alpha=0" or "dar k=8 online_batch=512" around it."""
    config = hyperparameters(config)
    same = [hyperparameters(c) for c in configs if c["algo"] == config["algo"] and c["task"] == config["task"]]

    def usual(k):  # the strictly most common value, else None (every experiment then shows its own)
        values = [json.dumps(c.get(k)) for c in same]
        counts = sorted((values.count(v) for v in set(values)), reverse=True)
        return max(values, key=values.count) if len(counts) == 1 or counts[0] > counts[1] else None
    diff = sorted(k for k in config if json.dumps(config[k]) != usual(k))
    return config["algo"] + "".join(f" {k}={config[k]:g}" if _is_number(config[k]) else f" {k}={config[k]}"
                                    for k in diff)


def group_runs(items, config_of):
    """Group items (run dirs or reports) by experiment_key of their config: {label: [items]}, label order kept.

    One item per seed: two runs of one experiment with the same seed are the same computation (bit-identical
    on CPU), not another sample, so only the first counts and a warning names the seed.
    """
    groups, configs, seeds = {}, {}, {}
    for it in items:
        c = config_of(it)
        key = experiment_key(c)
        configs[key] = c
        if c["seed"] in seeds.setdefault(key, set()):
            print(f"warning: two runs of {c['algo']} ({c['task']}) with seed {c['seed']}: the same experiment and "
                  f"seed, counted once ({c.get('out_dir')} left out)", flush=True)
            continue
        seeds[key].add(c["seed"])
        groups.setdefault(key, []).append(it)
    allc = list(configs.values())
    return {experiment_label(configs[k], allc): v for k, v in groups.items()}


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _config_of_dir(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _pyplot():
    import matplotlib  # optional: only the plots need it (and the Agg backend, which needs no display)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional, as above
    return plt


def band_curves(series, keys, out_dir, name, xlabel="online batch"):
    """Mean and 95% t-band over seeds of each key against the step, one line per experiment: the drawing
    behind curves() and checkpoint_curves(). series: {label: [{step: {key: value}} per seed]}; only the steps
    every seed has are drawn. Writes NAME.csv (experiment, key, step, mean, ci95, n_seeds) and NAME.png (one
    panel per key). Returns {label: {key: (steps, mean, ci)}}.
    """
    result, rows = {}, []
    for label, logs in series.items():
        steps = sorted(set.intersection(*(set(l) for l in logs)))
        result[label] = {}
        for key in keys:
            mean, ci = [], []
            for s in steps:
                agg = aggregate_seeds([{key: float(l[s].get(key, math.nan))} for l in logs]).get(key)
                mean.append(agg["mean"] if agg else math.nan)
                ci.append(agg["ci"] if agg else math.nan)
                rows.append([label, key, s, mean[-1], ci[-1], len(logs)])
            result[label][key] = (np.array(steps), np.array(mean), np.array(ci))
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, f"{name}.csv"), ["experiment", "key", "step", "mean", "ci95", "n_seeds"], rows)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, per_key in result.items():
            steps, mean, ci = per_key[key]
            ax.plot(steps, mean, label=label)
            ax.fill_between(steps, mean - np.nan_to_num(ci), mean + np.nan_to_num(ci), alpha=0.25)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("mean and 95% CI over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=120)
    plt.close(fig)
    return result


def curves(run_dirs, out_dir, keys=("train/reward_mean", "train/kl_pi0"), name="curves"):
    """Training curves per experiment (Figs. 3, 5(a)-(b), 6, 7): each key of metrics.jsonl against the online
    batch, mean and 95% band over the seeds of an experiment (runs grouped by config except seed).
    Writes NAME.csv and NAME.png (band_curves); returns {label: {key: (steps, mean, ci)}}.
    """
    series = {label: [{int(r["step"]): r for r in read_metrics(d)} for d in dirs]
              for label, dirs in group_runs(run_dirs, _config_of_dir).items()}
    return band_curves(series, keys, out_dir, name)


def checkpoint_curves(reports, out_dir, keys=("win_rate", "policy/reward"), name="eval_curves"):
    """Evaluation curves over training (Fig. 3: win rate over pi_0 and reward against online batches): each key
    of the reports of a run's kept checkpoints and final model, mean and 95% band over seeds. Step 0 is pi_0
    itself: win rates 1/2, KL 0, its own reward etc. (the pi_0 half of each report).

    reports: evaluate_checkpoint reports of all runs, checkpoints included (a run's final/ and its last
    ckpt-N are the same step: the final one counts). Writes NAME.csv and NAME.png; returns band_curves' dict.
    """
    by_run = {}
    for r in reports:
        by_run.setdefault(r["run"]["run_dir"], {})[r["run"]["step"]] = r
    def at_step0(r, key):  # pi_0 against itself
        if key.endswith("win_rate"):
            return 0.5
        if key.startswith("kl_"):
            return 0.0
        return r.get(key.replace("policy/", "pi_0/"), math.nan)
    per_run = []
    for steps in by_run.values():
        last = steps[max(steps)]
        log = {s: r for s, r in steps.items()}
        log[0] = {k: at_step0(last, k) for k in keys}
        per_run.append((last["run"]["config"], log))
    series = {label: [log for _, log in items]
              for label, items in group_runs(per_run, lambda it: it[0]).items()}
    return band_curves(series, keys, out_dir, name)


def pareto(points, out_dir, name="pareto"):
    """Reward-KL Pareto frontier of a beta sweep (Fig. 4, Appendix B.4): points [{"algo", "kl", "reward", ...}],
    one marker each; per algorithm a second-order polynomial fit reward ~ kl (numpy.polyfit, deg 2, with >= 3
    distinct KL values), drawn solid; a dashed line at DAR's peak fitted reward. Writes NAME.csv (points and
    each fit's coefficients) and NAME.png. Returns {algo: [c2, c1, c0]} (highest power first).
    """
    fits, rows = {}, []
    by_algo = {}
    for p in points:
        by_algo.setdefault(p["algo"], []).append(p)
    for algo, ps in by_algo.items():
        kl = np.array([p["kl"] for p in ps], dtype=np.float64)
        rw = np.array([p["reward"] for p in ps], dtype=np.float64)
        ok = ~(np.isnan(kl) | np.isnan(rw))
        if len(np.unique(kl[ok])) >= 3:
            fits[algo] = [float(c) for c in np.polyfit(kl[ok], rw[ok], 2)]
        rows += [[algo, "point", p.get("beta", ""), p["kl"], p["reward"], "", "", ""] for p in ps]
        if algo in fits:
            rows.append([algo, "fit", "", "", ""] + fits[algo])
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, f"{name}.csv"), ["algo", "row", "beta", "kl", "reward", "c2", "c1", "c0"], rows)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (algo, ps) in enumerate(by_algo.items()):
        color = f"C{i}"
        kl = np.array([p["kl"] for p in ps], dtype=np.float64)
        ax.scatter(kl, [p["reward"] for p in ps], color=color, label=algo)
        if algo in fits:
            xs = np.linspace(np.nanmin(kl), np.nanmax(kl), 100)
            ax.plot(xs, np.polyval(fits[algo], xs), color=color)
            if algo == "dar":
                ax.axhline(np.polyval(fits[algo], xs).max(), color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("KL (DAR: alpha-interpolated)")
    ax.set_ylabel("reward (eval judge)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=120)
    plt.close(fig)
    return fits


# What an ablation shows, one panel each: the win rate and reward under the eval judge, the reward under the
# training judge (when another), and the signs of reward hacking: missing EOS, length, KL to pi_0
ABLATION_METRICS = ("win_rate", "policy/reward", "policy/train_judge_reward", "policy/missing_eos", "policy/length",
                    "kl_pi0")
ABLATION_TITLES = {"win_rate": "win rate over pi_0", "policy/reward": "reward (eval judge)",
                   "policy/train_judge_reward": "reward (training judge)", "policy/missing_eos": "missing EOS",
                   "policy/length": "length (tokens)", "kl_pi0": "KL(pi || pi_0)"}


def ablation_plot(runs, param, out_dir, metrics=ABLATION_METRICS):
    """Ablation of one hyperparameter (Fig. 5(c) alpha, (d) beta, (e) K, (f) w_clip): each metric of the final
    models against the value of `param`, mean and 95% t-interval over seeds, one line per algorithm, one panel
    per metric the reports have. runs: evaluate_checkpoint reports (with "run"). Writes ablation_PARAM.csv /
    .png; returns {metric: {algo: [(value, mean, ci, n)]}} sorted by value.
    """
    metrics = [m for m in metrics if all(m in r for r in runs)]
    groups = {}
    for r in runs:
        c = r["run"]["config"]
        groups.setdefault((c["algo"], c[param]), []).append(r)
    result, rows = {m: {} for m in metrics}, []
    for (algo, value), rs in sorted(groups.items()):
        agg = aggregate_seeds(rs)
        for m in metrics:
            a = agg.get(m, {"mean": math.nan, "ci": math.nan, "n": 0})
            result[m].setdefault(algo, []).append((value, a["mean"], a["ci"], a["n"]))
            rows.append([algo, param, value, m, a["mean"], a["ci"], a["n"]])
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, f"ablation_{param}.csv"),
               ["algo", "param", "value", "metric", "mean", "ci95", "n_seeds"], rows)
    plt = _pyplot()
    cols = min(3, len(metrics))
    rows_ = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.2 * rows_), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, metrics):
        for algo, pts in result[m].items():
            v, mean, ci, _ = zip(*pts)
            ax.errorbar(v, mean, yerr=np.nan_to_num(np.array(ci, dtype=np.float64)), marker="o", capsize=3,
                        label=algo)
        ax.set_xlabel(param)
        ax.set_title(ABLATION_TITLES.get(m, m), fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"ablation of {param}: final models, mean and 95% CI over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"ablation_{param}.png"), dpi=110)
    plt.close(fig)
    return result


# ---------------------------------------------------------------------------------------------------
# Time per online batch (Table 8)
# ---------------------------------------------------------------------------------------------------
# perf/PHASE_s of metrics.jsonl; "logp" is pi_t and pi_0 together, as runs logged it before the two were split
PHASES = ("sample", "judge", "logp", "logp_t", "logp_0", "values", "update", "weight_sync")


def timing_table(run_dirs, out_dir, warmup=1, name="timing"):
    """Seconds per online batch and where they go (Table 8): per run the median of perf/seconds_per_batch and
    of each phase (perf/PHASE_s: sampling, judging, the pi_t/pi_0 log-prob passes, the updates, the weight push
    to vLLM) over its batches after the first `warmup` (allocation, compilation); per experiment the mean over
    its runs. Wall-clock seconds of this hardware, so compare rows of one machine. Writes NAME.csv; returns
    {label: {"total": s, PHASE: s, "n_runs": n}}.
    """
    out = {}
    for label, dirs in group_runs(run_dirs, _config_of_dir).items():
        medians = {}
        for d in dirs:
            rows = read_metrics(d)[warmup:]
            for key in ("total",) + PHASES:
                metric = "perf/seconds_per_batch" if key == "total" else f"perf/{key}_s"
                vals = [r[metric] for r in rows if metric in r]
                if vals:
                    medians.setdefault(key, []).append(float(np.median(vals)))
        if "total" in medians:
            out[label] = {k: float(np.mean(v)) for k, v in medians.items()}
            out[label]["n_runs"] = len(medians["total"])
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, f"{name}.csv"), ["experiment", "seconds_per_batch"] + [f"{p}_s" for p in PHASES]
               + ["n_runs"], [[label, t["total"]] + [t.get(p, "") for p in PHASES] + [t["n_runs"]]
                              for label, t in out.items()])
    return out


def print_timing(timing):
    dar_rows = [label for label in timing if label.split()[0] == "dar"]
    base = timing["dar" if "dar" in timing else dar_rows[0]]["total"] if dar_rows else None
    phases = [p for p in PHASES if any(p in t for t in timing.values())]
    print(f"\n{'experiment':36} {'s/batch':>8} {'vs dar':>7}" + "".join(f" {p:>11}" for p in phases))
    for label, t in timing.items():
        ratio = f"{t['total'] / base:7.2f}" if base else f"{'-':>7}"
        print(f"{label[:36]:36} {t['total']:8.2f} {ratio}" + "".join(
            f" {t[p]:11.3f}" if p in t else f" {'-':>11}" for p in phases))


# ---------------------------------------------------------------------------------------------------
# Command line: evaluate runs, aggregate over seeds, write the plots the runs allow, print a table
# ---------------------------------------------------------------------------------------------------
def kl_of(report):
    """The x-axis of Fig. 4: DAR's alpha-interpolated KL when measured, else KL(pi || pi_0)."""
    return report.get("kl_alpha", report["kl_pi0"])


def sweeps(reports):
    """Which comparisons the runs allow.

    ablation: {param: [reports]} for each of alpha, beta, k, w_clip: per algorithm and task, the largest set of
    experiments that agree in every hyperparameter except that one (k may bring online_batch along: an
    ablation of K keeps the prompts per batch) and take >= 2 values of it. Several sweeps around one base
    run (the ablation grids) are found separately, the base run counting in each.
    pareto: {algo: [reports]}: the beta ablation of each algorithm, the reward-KL frontier of Fig. 4.
    """
    out = {"pareto": {}, "ablation": {}}
    for param in ABLATION_PARAMS:
        free = {param, "online_batch"} if param == "k" else {param}
        groups = {}
        for r in reports:
            hp = hyperparameters(r["run"]["config"])  # a run saved before a field existed still joins its sweep
            rest = tuple(sorted((k, json.dumps(v)) for k, v in hp.items() if k not in free))
            groups.setdefault(rest, []).append(r)
        best = {}  # (task, algo) -> the largest sweep of param
        for rs in groups.values():
            c = rs[0]["run"]["config"]
            n_values = len({json.dumps(r["run"]["config"][param]) for r in rs})
            if n_values >= 2 and n_values > best.get((c["task"], c["algo"]), (0, None))[0]:
                best[(c["task"], c["algo"])] = (n_values, rs)
        for (task, algo), (_, rs) in best.items():
            out["ablation"].setdefault(param, []).extend(rs)
            if param == "beta":
                out["pareto"][algo] = rs
    return out


def best_checkpoint(reports):
    """Of a run's evaluated models (final/ and its kept checkpoints), the one with the highest validation win rate:
    Table 2's "best checkpoints", chosen on validation prompts, never on the test prompts it is reported on. On a
    tie the earliest; None when no model has a validation win rate (a task without validation prompts)."""
    scored = [r for r in reports if not math.isnan(r.get("valid/win_rate", math.nan))]
    return max(scored, key=lambda r: (r["valid/win_rate"], -r["step"]), default=None)


def summarize(pairs):
    """[(final report, best report or None)] of the runs -> {label: mean and CI over seeds of the final models'
    numbers, with "best": the same over the best checkpoints (empty without --checkpoints) and "win_rate_from"}."""
    out = {}
    for label, items in group_runs(pairs, lambda fb: fb[0]["run"]["config"]).items():
        bests = [b for _, b in items if b is not None]
        out[label] = dict(aggregate_seeds([f for f, _ in items]), best=aggregate_seeds(bests) if bests else {},
                          win_rate_from=items[0][0]["win_rate_from"], seeds=[f["run"]["seed"] for f, _ in items])
    return out


# table.csv: these numbers of the final and of the best models, mean and 95% CI over seeds
TABLE_KEYS = ("win_rate", "reward_win_rate", "pref_win_rate", "golden/win_rate", "valid/win_rate", "step",
              "policy/reward", "kl_pi0", "policy/missing_eos", "policy/length", "policy/distinct1", "policy/distinct2",
              "policy/train_judge_reward")


def write_table(summary, path):
    rows = []
    for label, agg in summary.items():
        row = [label, len(agg["seeds"]), agg["win_rate_from"]]
        for which in ("final", "best"):
            a = agg if which == "final" else agg["best"]
            row += [v for k in TABLE_KEYS for v in ((a[k]["mean"], a[k]["ci"]) if k in a else ("", ""))]
        rows.append(row)
    _write_csv(path, ["experiment", "seeds", "win_rate_from"] + [f"{which} {k}{ci}" for which in ("final", "best")
                                                                  for k in TABLE_KEYS for ci in ("", " ci95")], rows)


def print_table(summary):
    """Per experiment, mean ± 95% CI over seeds (Tables 2-3): the headline win rate over pi_0 of the final model
    and of the best checkpoint (with --checkpoints; its step, mean over seeds), reward of both, KL(pi || pi_0) of
    the final model (as for every method; DAR's alpha-interpolated KL is Fig. 4's x-axis, in the per-run JSON and
    the Pareto plot), missing EOS and, when it differs from the eval judge, the reward under the training judge
    (reward hacking shows as this up and the eval reward down). The other win rates are in table.csv."""
    proxy = any("policy/train_judge_reward" in agg for agg in summary.values())
    print(f"\n{'experiment':30} {'win rate: final':>17} {'best':>17} {'at':>5} {'reward: final':>15} {'best':>15} "
          f"{'KL: final':>15} {'no EOS':>7}" + (f" {'train judge':>11}" if proxy else "") + f" {'seeds':>5}")
    for label, agg in summary.items():
        def cell(a, k, pct=False):
            if k not in a:
                return f"{'-':>17}" if pct else f"{'-':>15}"
            m, c = a[k]["mean"], a[k]["ci"]
            return f"{m:8.1%} ± {c:6.1%}" if pct else f"{m:7.3f} ± {c:5.3f}"
        best = agg["best"]
        at = f"{best['step']['mean']:5.0f}" if "step" in best else f"{'-':>5}"
        print(f"{label[:30]:30} {cell(agg, 'win_rate', True)} {cell(best, 'win_rate', True)} {at} "
              f"{cell(agg, 'policy/reward')} {cell(best, 'policy/reward')} {cell(agg, 'kl_pi0')} "
              f"{agg['policy/missing_eos']['mean']:7.1%}"
              + (f" {agg.get('policy/train_judge_reward', {'mean': math.nan})['mean']:11.2f}" if proxy else "")
              + f" {len(agg['seeds']):5d}")
    for key in dict.fromkeys(agg["win_rate_from"] for agg in summary.values()):
        print(f"  win rate over pi_0: {WIN_RATE_DEFS[key]}" + (" (--eval-judge llm)" if key == "pref_win_rate" else ""))
    if any(agg["best"] for agg in summary.values()):
        print("  best: the kept checkpoint with the highest win rate on the validation prompts, on the test prompts; "
              "at: its online batch (mean over seeds)")


def export_benchmarks(run_dir, out_dir, alpacaeval=None, mtbench=None, temperature=0.9, seed=1234, device=None):
    """The final model's answers to AlpacaEval instructions and MT-Bench questions (already loaded), written as
    OUT/NAME-alpacaeval.json and OUT/NAME-mtbench.jsonl (model id NAME), at most the run's max_new_tokens each.
    AlpacaEval uses `temperature` (0 greedy), MT-Bench its per-category temperatures."""
    cfg = load_run_config(run_dir)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    final = os.path.join(run_dir, "final")
    check_checkpoint(final)
    tok = load_tokenizer(final, cfg.trust_remote_code, cfg.chat_template_kwargs)
    model = load_model(final, cfg, device).eval()
    name = os.path.basename(os.path.normpath(run_dir))
    written = []
    if alpacaeval:
        outputs = tasks.answer(model, tok, alpacaeval, cfg.max_new_tokens, temperature, seed, cfg.micro_batch)
        written.append(os.path.join(out_dir, f"{name}-alpacaeval.json"))
        tasks.export_alpacaeval(alpacaeval, outputs, name, written[-1])
    if mtbench:
        turns = tasks.mtbench_answers(model, tok, mtbench, cfg.max_new_tokens, seed, cfg.micro_batch)
        written.append(os.path.join(out_dir, f"{name}-mtbench.jsonl"))
        tasks.export_mtbench([q["question_id"] for q in mtbench], turns, name, written[-1])
    return written


def arg_parser():
    p = argparse.ArgumentParser(description="Evaluate DAR runs against pi_0; aggregate over seeds; plots.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run directories (runs/TASK-ALGO-sSEED) holding config.json and final/")
    p.add_argument("--out", default="eval_out", help="where per-run JSON, summary.json, CSV and PNG files go")
    p.add_argument("--n-prompts", type=int, default=Config.eval_prompts,
                   help="test prompts per evaluation, a random subset drawn with --seed (as dar.py's --eval-prompts "
                        "and --eval-seed), capped at the task's; validation uses as many")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of temperature 0.9")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature of the compared responses")
    p.add_argument("--checkpoints", action="store_true",
                   help="also evaluate every kept ckpt-N of each run: win-rate and reward curves (eval_curves), and "
                        "the best checkpoint by its win rate on the validation prompts")
    p.add_argument("--seed", type=int, default=Config.eval_seed,
                   help="seed of the evaluation: which test prompts, and the sampling of the compared responses")
    p.add_argument("--eval-judge", default="", help="the judge that evaluates (as dar.py's --eval-judge: a judge, or "
                                                    "reward, the run's training reward); '' = the run's")
    for flag, what in (("url", "the evaluator's endpoint for --eval-judge llm"), ("model", "the evaluator's model"),
                       ("api-key-env", "the variable that holds the evaluator's API key")):
        p.add_argument(f"--eval-judge-{flag}", default="", help=f"{what}; '' = the run's (config.json; see dar.py)")
    p.add_argument("--reuse", action="store_true",
                   help="take a run's evaluation from OUT/NAME.json when one was made with the same settings "
                        "(redraw tables and plots without evaluating again)")
    p.add_argument("--alpacaeval", metavar="FILE",
                   help="AlpacaEval's alpaca_eval.json: write each final model's answers for alpaca_eval")
    p.add_argument("--mtbench", metavar="FILE",
                   help="MT-Bench's question.jsonl: write each final model's answers for FastChat's gen_judgment")
    return p


def evaluate_run(run_dir, args, evaluator):
    """A run's final model and, with --checkpoints, its kept checkpoints with the choice of the best one: the
    per-run JSON's content (from OUT/NAME.json with --reuse when the settings match)."""
    kw = dict(greedy=args.greedy, temperature=args.temperature, seed=args.seed, evaluator=evaluator)
    path = os.path.join(args.out, os.path.basename(os.path.normpath(run_dir)) + ".json")
    settings = dict(kw, n_prompts=args.n_prompts, checkpoints=args.checkpoints)
    if args.reuse and os.path.isfile(path):
        with open(path) as f:
            per_run = json.load(f)
        if per_run.get("eval_settings") == settings and per_run["run"]["run_dir"] == os.path.abspath(run_dir):
            return per_run
    note = evaluator_note(dataclasses.replace(load_run_config(run_dir), **evaluator))
    if note:
        print(note, flush=True)
    per_run = evaluate_checkpoint(run_dir, os.path.join(run_dir, "final"), args.n_prompts, validation=args.checkpoints,
                                  **kw)
    if args.checkpoints:  # the last ckpt-N holds the same weights as final/
        per_run["checkpoints"] = [evaluate_checkpoint(run_dir, ckpt, args.n_prompts, validation=True, **kw)
                                  for step, ckpt in checkpoints(run_dir) if step < per_run["run"]["step"]]
        best = best_checkpoint([per_run] + per_run["checkpoints"])
        per_run["best_step"] = best["step"] if best else None
    per_run["eval_settings"] = settings
    with open(path, "w") as f:
        json.dump(per_run, f, indent=1)
    return per_run


def main(argv=None):
    args = arg_parser().parse_args(argv)
    alpaca = tasks.load_alpacaeval(args.alpacaeval) if args.alpacaeval else None
    mtbench = tasks.load_mtbench(args.mtbench) if args.mtbench else None
    for d in args.run_dirs:
        if not os.path.isfile(os.path.join(d, "final", "config.json")):
            raise SystemExit(f"error: {d} has no final/ model; a run writes it when it finishes (resume it with "
                             f"`python dar.py --out-dir {d} --resume`)")
    if args.n_prompts < 1:
        raise SystemExit(f"error: --n-prompts must be >= 1, got {args.n_prompts}")
    names = ("eval_judge", "eval_judge_url", "eval_judge_model", "eval_judge_api_key_env")
    evaluator = {k: getattr(args, k) for k in names if getattr(args, k)}
    for d in args.run_dirs:
        check_judge_flags(dataclasses.replace(load_run_config(d), **evaluator))  # --eval-judge-url, before loading
        judge = evaluator.get("eval_judge") or load_run_config(d).eval_judge
        if judge not in JUDGES + (TRAINING_REWARD,):
            raise SystemExit(f"error: {d} was trained with --eval-judge {judge} (no evaluation); give eval.py "
                             f"--eval-judge JUDGE: one of {', '.join(JUDGES)}, or {TRAINING_REWARD} (its training "
                             "reward)")
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)
    finals, pairs, every = [], [], []
    for run_dir in args.run_dirs:
        try:
            per_run = evaluate_run(run_dir, args, evaluator)
        except AnnotatorUnavailable as e:  # nothing of this run's evaluation is written
            raise SystemExit(f"error: evaluating {run_dir}: {e}") from None
        report = {k: v for k, v in per_run.items() if k not in ("checkpoints", "best_step")}
        models = [report] + per_run.get("checkpoints", [])
        best = next((r for r in models if r["step"] == per_run.get("best_step")), None)
        every += per_run.get("checkpoints", [])
        print(f"{os.path.basename(os.path.normpath(run_dir))}: win rate {report['win_rate']:.1%}, reward "
              f"{report['policy/reward']:.3f}, KL {report['kl_pi0']:.3f}" + (
                  f"; best: step {best['step']} (validation win rate {best['valid/win_rate']:.1%}), win rate "
                  f"{best['win_rate']:.1%}" if best else ""), flush=True)
        if alpaca or mtbench:
            for path in export_benchmarks(run_dir, args.out, alpaca, mtbench, 0.0 if args.greedy else args.temperature,
                                          args.seed):
                print(f"  wrote {path}", flush=True)
        finals.append(report)
        pairs.append((report, best))
    summary = summarize(pairs)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    write_table(summary, os.path.join(args.out, "table.csv"))
    dirs_with_logs = [d for d in args.run_dirs if read_metrics(d)]
    if dirs_with_logs:
        curves(dirs_with_logs, args.out)
    if every:
        checkpoint_curves(finals + every, args.out)
    found = sweeps(finals)
    if found["pareto"]:
        pareto([dict(algo=algo, beta=r["run"]["config"]["beta"], kl=kl_of(r), reward=r["policy/reward"])
                for algo, rs in found["pareto"].items() for r in rs], args.out)
    for param, rs in found["ablation"].items():
        ablation_plot(rs, param, args.out)
    print_table(summary)
    if dirs_with_logs:
        print_timing(timing_table(dirs_with_logs, args.out))
    print(f"\nwritten to {args.out}: " + ", ".join(sorted(os.listdir(args.out))))


if __name__ == "__main__":
    exit_on_ctrl_c(lambda: "Ctrl-C: evaluation stopped; run eval.py again to evaluate")
    main()
