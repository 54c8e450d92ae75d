"""Judges: the reward r(x, y) of Algorithm 1.

The training loop calls a judge on a batch of (prompt, response) texts and gets back one float reward
per response plus the number of invalid judgments. An invalid judgment (an annotator reply with no
parseable score, a refusal) is NaN in the rewards: the loop leaves that sample out of the advantage
estimate and gives it zero weight, instead of silently scoring it 0 or 10.

Rewards are on the 0-10 scale of the paper's LLM-annotator reward prompts (Appendix D.1), so the KL
coefficients the paper reports for the baselines keep their meaning on the toy task.

Built-in judges for the toy task (tasks.py):
  toy_gold   the exact rule: 10 x the fraction of positions that match the reversed word, 0 when the
             response never ended (no EOS). This is the "gold" reward used for evaluation.
  toy_proxy  an imperfect annotator with a length bias, like LLM judges that prefer longer answers: it
             reads only the first len(target) characters, adds a bonus for every extra character, and
             does not notice a missing EOS. A policy can exploit it by rambling past the answer and
             never stopping; a later issue uses it to show reward hacking and how DAR resists it.
"""
import math
from dataclasses import dataclass

import tasks

JUDGES = ("toy_gold", "toy_proxy")
PROXY_LENGTH_BONUS = 1.0  # proxy points per character past the target's length


@dataclass
class Judgment:
    rewards: list          # [N] floats; NaN marks an invalid judgment
    invalid: int           # how many of them are NaN


def toy_gold_score(prompt, response, ended):
    """The exact rule. prompt: the user message; response: decoded text without EOS; ended: saw EOS."""
    word = tasks.toy_word_of(prompt)
    if word is None:
        return math.nan  # not a toy prompt: no judgment possible
    if not ended:
        return 0.0
    target = tasks.toy_target(word)
    hits = sum(a == b for a, b in zip(response, target))
    return 10.0 * hits / max(len(response), len(target))


def toy_proxy_score(prompt, response, ended):
    """The length-biased annotator (see the module docstring); `ended` is ignored on purpose."""
    word = tasks.toy_word_of(prompt)
    if word is None:
        return math.nan
    target = tasks.toy_target(word)
    hits = sum(a == b for a, b in zip(response, target))
    return 10.0 * hits / len(target) + PROXY_LENGTH_BONUS * max(0, len(response) - len(target))


class RuleJudge:
    """A judge from a per-sample scoring rule (the toy task's judges)."""

    def __init__(self, score):
        self.score = score

    def __call__(self, prompts, responses, ended):
        rewards = [self.score(p, r, e) for p, r, e in zip(prompts, responses, ended)]
        return Judgment(rewards, sum(math.isnan(x) for x in rewards))


def make_judge(name, task=None, cfg=None):
    if name == "toy_gold":
        return RuleJudge(toy_gold_score)
    if name == "toy_proxy":
        return RuleJudge(toy_proxy_score)
    raise SystemExit(f"error: unknown --judge {name!r}; valid judges: {', '.join(JUDGES)}")
