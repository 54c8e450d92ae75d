"""Evaluation of a trained policy against the initial policy pi_0.

Reported (Section 5 of the paper; KL estimator of the IS-DPO appendix):
  * mean reward of pi_0 and of the policy under the evaluation judge, one sample per held-out prompt
    at the training temperature;
  * reference win rate: per prompt, 1 if the policy's response scores higher than pi_0's, 1/2 on a tie,
    0 otherwise; mean with a 95% normal-approximation interval;
  * KL(pi_theta || pi_0), estimated with k3 on the policy's own samples at temperature 1 (the KL of the
    model distributions, which is what Eq. 3 regularises);
  * missing-EOS rate and mean response length (tokens) for both.
"""
import math

import torch

import rollout
from judge import make_judge


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


@torch.no_grad()
def compare_with_reference(policy, ref, tok, prompts, cfg, task=None, seed=1234):
    """Evaluate `policy` against `ref` (pi_0) on held-out prompts; returns a dict of numbers.

    Runs in its own RNG stream (fork_rng), so an evaluation never changes what training samples next.
    """
    from dar import k3, score
    judge = make_judge(cfg.eval_judge, task, cfg)
    report = {"n_prompts": len(prompts), "judge": cfg.eval_judge}
    rewards = {}
    with torch.random.fork_rng(devices=[]):
        for name, model in (("pi_0", ref), ("policy", policy)):
            torch.manual_seed(seed)
            batch = rollout.generate(model, tok, prompts, 1, cfg.max_new_tokens, cfg.temperature)
            j = judge(batch.prompts, batch.responses, batch.ended.tolist())
            rewards[name] = j.rewards
            report[f"{name}/reward"], report[f"{name}/reward_ci"] = mean_ci(j.rewards)
            report[f"{name}/missing_eos"] = 1 - batch.ended.double().mean().item()
            report[f"{name}/length"] = batch.response_mask.sum(1).double().mean().item()
            report[f"{name}/top_score"] = (torch.tensor(j.rewards) == 10).double().mean().item()  # 10/10: exact
            report[f"{name}/invalid_judgments"] = j.invalid
        report["win_rate"], report["win_rate_ci"] = win_rate(rewards["policy"], rewards["pi_0"])
        torch.manual_seed(seed + 1)
        own = rollout.generate(policy, tok, prompts, 1, cfg.max_new_tokens, temperature=1.0)
        kl = k3(score(policy, own, cfg.micro_batch), score(ref, own, cfg.micro_batch), own.response_mask)
        report["kl_pi0"], report["kl_pi0_ci"] = mean_ci(kl)
    return report


def print_report(r):
    invalid = r["pi_0/invalid_judgments"] + r["policy/invalid_judgments"]
    print(f"\nEvaluation on {r['n_prompts']} held-out prompts (judge: {r['judge']}"
          + (f"; {invalid} invalid judgments left out" if invalid else "") + ")")
    print(f"  {'':8} {'reward':>16} {'10/10':>7} {'no EOS':>7} {'length':>7}")
    for name in ("pi_0", "policy"):
        print(f"  {name:8} {r[name + '/reward']:8.2f} ± {r[name + '/reward_ci']:<5.2f} "
              f"{r[name + '/top_score']:7.1%} {r[name + '/missing_eos']:7.1%} {r[name + '/length']:7.1f}")
    print(f"  win rate of the policy over pi_0 (ties count 1/2): {r['win_rate']:.1%} ± {r['win_rate_ci']:.1%}")
    print(f"  KL(policy || pi_0), k3 estimate: {r['kl_pi0']:.3f} ± {r['kl_pi0_ci']:.3f} nats")
