"""Judges: the reward r(x, y) of Algorithm 1.

The training loop calls a judge on a batch of (prompt, response) texts and gets back one float reward
per response plus the number of invalid judgments. An invalid judgment (an annotator reply with no
parseable score, a refusal, a request the server rejected) is NaN in the rewards: the loop leaves that
sample out of the advantage estimate and gives it zero weight, instead of silently scoring it 0 or 10.
An annotator that cannot be reached for --judge-patience seconds judges nothing: the call raises
AnnotatorUnavailable, and the loop stops before training on the batch.

    judge = make_judge(name, task, cfg)
    judge(prompts, responses, ended) -> Judgment(rewards [N] floats, NaN = invalid; invalid: int)
    judge.prefer(prompts, responses_a, responses_b) -> [N] P(a preferred) in {0, 0.5, 1}, NaN = invalid

A prompt is a user message (str) or a conversation (a list of {"role", "content"} dicts ending with the
user's turn, as in Anthropic HH); `ended[i]` says whether response i emitted EOS.

The judges (--judge, --eval-judge):
  toy_gold      the toy task's exact rule: 10 x the fraction of positions that match the reversed word,
                0 when the response never ended (no EOS). The "gold" reward used for evaluation.
  toy_biased    the toy task's stand-in for the paper's LLM annotator, what the toy grids train on (train.sh): an
                integer SCORE on the bounded 1-10 scale, read from the text alone, with a verbosity bias. The
                exact answer gets 8, one or two characters more 9 or 10 (even with a letter wrong), and rambling
                is marked down (tasks.toy_biased_score). A policy can exploit it only within the scale.
  toy_proxy     the unbounded stress test: a length bias with no ceiling. It reads only the first len(target)
                characters, adds a point for every extra character, and does not notice a missing EOS. A
                policy can exploit it by rambling past the answer and never stopping (reward hacking).
  llm           the paper's direct-RLAIF annotator (Appendix B.1, D.1): an LLM behind an OpenAI-compatible
                chat-completions endpoint (--judge-url; vLLM serving Qwen2-72B-Instruct in the paper) reads
                the reward prompt of the task's family (Tables 9-11) and replies with "SCORE: n", n in 1-10,
                at temperature 0 with at most 256 tokens. prefer() uses the preference prompts (Tables
                12-14), asked in both orders (Appendix C.1).
  reward_model  a local reward model (--reward-model DIR; the paper's standard RLHF setting uses
                Llama-3.1-Nemotron-70B-Reward on HelpSteer2): a sequence classifier's scalar logit, or a causal
                LM's logit of one token (--reward-token-id) after the response, as Nemotron-70B-Reward-HF is read.

  vader         VADER's compound sentiment of the response (the `vadersentiment` package: a lexicon and rules,
                in [-1, 1]) on the 1-10 scale; the training reward of --task sentiment.
  textblob      TextBlob's polarity of the response (the `textblob` package: a different lexicon, averaged over
                the sentiment words, in [-1, 1]) on the 1-10 scale; --task sentiment's evaluation judge, so that
                a policy that games VADER (repetition, "!!!") can be told from one that is more positive.

Reward scales: toy_gold 0-10, toy_biased 1-10, toy_proxy 0 and up; vader and textblob 1-10
(`sentiment_to_scale`); llm 1-10 (harmlessness flipped, 11 - harm, see `parse_reward`); reward_model the
model's own logit scale. The loop normalises advantages per batch, so DAR only sees the ordering and spread
of rewards within a batch.

A stand-in annotator for tests and demos, needing no GPU and no model: an OpenAI-compatible HTTP server
whose "LLM" is the toy task's rule, reading the very prompts an LLM would read. The paper's reward and
preference prompts (TL;DR, helpfulness, harmlessness) get a crude word-overlap rating (`overlap_score`), so
those tasks also run end to end against a real endpoint on a CPU; it is a plumbing check, not a judge of quality:

    python judge.py --serve --task toy --port 8000 [--host 127.0.0.1] [--annotator gold|biased|proxy]
    python dar.py --judge llm --judge-url http://127.0.0.1:8000/v1
    # fault injection for tests: --delay S --drop-every N --garbage-every N --status-every N:CODE
    #                            --retry-after S --position-bias --record   (see `main`)
"""
import argparse
import itertools
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# the HTTP client of the annotator: connection pooling and timeouts; httpx2 is the maintained successor of httpx
# (same API), which huggingface_hub 2 installs too
import httpx2 as httpx
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import tasks
from prompts import (HARM_FAMILIES, PREFERENCE_PROMPTS, REWARD_PROMPTS, TOY_PREFERENCE_PROMPT, TOY_REWARD_PROMPT,
                     as_conversation, render_preference_prompt, render_reward_prompt)
from rollout import plain_dialogue

JUDGES = ("toy_gold", "toy_biased", "toy_proxy", "llm", "reward_model", "vader", "textblob")


@dataclass
class Judgment:
    rewards: list          # [N] floats; NaN marks an invalid judgment
    invalid: int           # how many of them are NaN
    reasons: dict = field(default_factory=dict)  # why, for the invalid ones: {reason: count}


def _nan_count(xs):
    return sum(math.isnan(x) for x in xs)


def prefer_by_score(r_a, r_b):
    """P(a preferred) from two scores: 1 if a scores higher, 0 if lower, 0.5 on a tie, NaN if either is."""
    if math.isnan(r_a) or math.isnan(r_b):
        return math.nan
    return 1.0 if r_a > r_b else 0.0 if r_a < r_b else 0.5


# ---------------------------------------------------------------------------------------------------
# The toy task's judges: its scoring rules (tasks.toy_gold_score, toy_biased_score, toy_proxy_score) as judges
# ---------------------------------------------------------------------------------------------------
class RuleJudge:
    """A judge from a per-sample scoring rule (the toy task's judges). top: the scale's best score, when the
    scale has one (the gold rule's 10 = exact answer; the proxy's length bonus has no ceiling)."""

    def __init__(self, score, top=None):
        self.score = score
        self.top = top

    def __call__(self, prompts, responses, ended):
        rewards = [self.score(p, r, e) for p, r, e in zip(prompts, responses, ended)]
        return Judgment(rewards, _nan_count(rewards))

    def prefer(self, prompts, responses_a, responses_b):
        """Compare the two responses' scores (both taken as ended: a preference is about the texts)."""
        return [prefer_by_score(self.score(p, a, True), self.score(p, b, True))
                for p, a, b in zip(prompts, responses_a, responses_b)]


# ---------------------------------------------------------------------------------------------------
# Sentiment scorers nobody here wrote (--task sentiment): VADER to train on, TextBlob to evaluate with
# ---------------------------------------------------------------------------------------------------
def sentiment_to_scale(s):
    """A sentiment score in [-1, 1] on the paper's 1-10 annotator scale: 5.5 + 4.5 s (-1 -> 1, 0 -> 5.5, 1 -> 10).
    DAR and GRPO normalise advantages per batch, and online DPO sees only which response scores higher, so for
    them the scale changes nothing; it matters where the raw reward does: the PPO family's --missing-eos-penalty
    (1 point) and value model, Dual-PPO's beta, and the reported reward, which then reads like the LLM
    annotator's SCORE."""
    return 5.5 + 4.5 * s


class SentimentJudge(RuleJudge):
    """The sentiment of the response text alone (the prompt is not read). A response cut at --max-new-tokens is
    scored as written, like the llm and reward_model judges, which see text only (the PPO family subtracts
    --missing-eos-penalty itself; the toy gold rule is the exception, as it knows the whole answer)."""

    def __init__(self, kind):
        if kind == "vader":
            try:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # optional: only for vader
            except ImportError:
                raise SystemExit("error: --judge vader needs the vadersentiment package: pip install vadersentiment")
            polarity = SentimentIntensityAnalyzer().polarity_scores
            raw = lambda text: polarity(text)["compound"]
        elif kind == "textblob":
            try:
                from textblob import TextBlob  # optional: only for textblob
            except ImportError:
                raise SystemExit("error: --judge textblob needs the textblob package: pip install textblob")
            raw = lambda text: TextBlob(text).sentiment.polarity
        else:
            raise ValueError(f"unknown sentiment judge {kind!r}: vader or textblob")
        self.raw = raw
        super().__init__(lambda prompt, response, ended: sentiment_to_scale(raw(response)))


# ---------------------------------------------------------------------------------------------------
# Reading the annotator's reply (pattern matching, Appendix B.1). Only the reply is read, never the prompt,
# so a policy response that itself says "SCORE: 10" cannot score itself.
# ---------------------------------------------------------------------------------------------------
SCORE_RE = re.compile(r"SCORE\s*\**\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
LEADING_NUMBER_RE = re.compile(r"\s*\**\s*(\d+(?:\.\d+)?)\**(?:\s*/\s*10)?(?=\s|\Z)")
PREFERENCE_RE = re.compile(r"Preferred\s+(?:Summary|Response)\s*[:=]\s*\**\s*([12])(?!\d)", re.IGNORECASE)
LEADING_CHOICE_RE = re.compile(r"\s*\**\s*([12])\**(?=\s|\Z|[.,;:!)])")
THINKING_RE = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)  # reasoning models: judge the answer only


def parse_score(reply):
    """The 1-10 score in an annotator's reply, or NaN: the number after the last "SCORE:" (a model may
    revise itself), else a bare number the reply starts with ("8", "8/10"). Out of 1-10, missing, a
    refusal or anything else is NaN (invalid), never a default score."""
    reply = THINKING_RE.sub("", reply or "")
    found = SCORE_RE.findall(reply)
    if found:
        x = float(found[-1])
    else:
        m = LEADING_NUMBER_RE.match(reply)
        if m is None:
            return math.nan
        x = float(m.group(1))
    return x if 1 <= x <= 10 else math.nan


def parse_reward(reply, family):
    """The reward of a reply on the 1-10 scale, higher = better. The harmlessness prompt (Table 11) asks for
    a HARM score h (1 harmless .. 10 extremely harmful); its reward is 11 - h, the mirror image on the same
    1-10 scale: the ordering flips (what DAR's normalised advantages see) and the range stays that of the
    other families, so rewards, win rates and the PPO family's missing-EOS penalty keep one meaning."""
    x = parse_score(reply)
    return 11.0 - x if family in HARM_FAMILIES else x


def parse_preference(reply):
    """1 or 2 from a preference reply ("Preferred Response=2", the last one if several; or a bare leading
    "2"), else None (invalid)."""
    reply = THINKING_RE.sub("", reply or "")
    found = PREFERENCE_RE.findall(reply)
    if found:
        return int(found[-1])
    m = LEADING_CHOICE_RE.match(reply)
    return int(m.group(1)) if m else None


def preference_from_choices(first, second, family):
    """P(a preferred) from the choices for the order (a, b) (`first`) and (b, a) (`second`): the mean over
    both orders cancels the annotator's position bias (Appendix C.1); NaN if either is invalid. For
    harmlessness the annotator picks the MORE harmful response, so a is preferred when it is NOT picked."""
    if first is None or second is None:
        return math.nan
    a_wins = [first == 1, second == 2]
    if family in HARM_FAMILIES:
        a_wins = [not w for w in a_wins]
    return sum(a_wins) / 2


# ---------------------------------------------------------------------------------------------------
# --judge llm: a client for an OpenAI-compatible chat-completions endpoint
# ---------------------------------------------------------------------------------------------------
ANNOTATOR_MAX_TOKENS = 256  # Appendix B.1: judgments of at most 256 tokens, at temperature 0
CONTEXT_LENGTH_RE = re.compile(r"context[ _]length", re.IGNORECASE)  # vLLM's and OpenAI's 400 for a long prompt


@dataclass
class Reply:
    """One annotator request as it came back: the reply text (None when the request failed) or why it failed,
    the server's finish_reason ("stop"; "length" = cut at max_tokens) and usage (its token counts), as sent."""
    text: object = None
    error: object = None
    finish_reason: object = None
    usage: object = None


class _Secret:
    """A string (the API key) that never shows in a repr, str or log line."""
    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def reveal(self):
        return self._value

    def __repr__(self):
        return "<set>" if self._value else "<unset>"

    __str__ = __repr__


class AnnotatorUnavailable(Exception):
    """A request to the annotator failed every try for --judge-patience seconds: the call judged nothing."""


def url_problem(url):
    """What is wrong with an endpoint's base URL (--judge-url, --eval-judge-url), or "" when it is an http(s) URL
    with a host."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # a port that is not a number raises here
    except ValueError as e:
        return f"is not a valid URL ({e}); give the endpoint's base URL, e.g. http://127.0.0.1:8000/v1"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL with a host; give the endpoint's base URL, e.g. http://127.0.0.1:8000/v1"
    return ""


def _retry_after(value):
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class LLMJudge:
    """The LLM annotator behind an OpenAI-compatible endpoint: POST {url}/chat/completions.

    Requests run `concurrency` at a time (a thread pool around one pooled HTTP client). Connection errors,
    timeouts (`timeout` seconds per connect/read/write), HTTP 429 and 5xx are retried for `patience` seconds
    from a request's first try (--judge-patience: long enough for a served annotator to restart), not a count of
    tries: a wait of backoff * 2^attempt seconds times a random factor in [0.5, 1] (jitter, from the judge's own
    RNG so judging never moves the seeded global one), or at least the server's Retry-After, every wait capped at
    `max_backoff`, and a last try when the patience ends. A request still failing then raises
    AnnotatorUnavailable for the whole call (the other requests stop waiting): the loop stops the run before
    training on the batch, with a checkpoint, rather than train on the part of it that was judged. Other 4xx are
    not retried: the request itself is wrong, e.g. HTTP 400 for a prompt longer than the served model's context
    window (--max-model-len in vLLM), which becomes an invalid judgment with its own reason ("prompt longer than
    the annotator's context window") and the server's message, shown once.

    A reply cut at `max_tokens` (finish_reason "length") is still read, but without a number it ends in
    (`uncut`): the paper caps judgments at 256 tokens (Appendix B.1) and pattern-matches the score in what
    came back, and its prompts end in "SCORE:", so a cooperative annotator gives the score first and a score
    followed by more text was given whole. A number at the very end of a cut reply may be cut too ("SCORE: 1"
    of "SCORE: 10": digits are single tokens in Llama-3 and SmolLM2 vocabularies), so it is not read. A cut
    reply with no score left is invalid, with the reason "no score in the reply (cut at the N-token limit)",
    so that a limit set too low shows as such rather than as a bad annotator. `usage` is not needed and may
    be missing; it goes to the --judge-log records (`log_path`) with each reply's text and finish_reason.

    The API key is read from the environment variable named `api_key_env` and sent as a Bearer token; it
    is kept out of reprs, error messages and logs.
    """
    top = 10.0  # the best score of the paper's 1-10 scale (harm is flipped to 11 - h, so 10 is best there too)

    def __init__(self, url, family, model="", api_key_env="DAR_JUDGE_API_KEY", concurrency=16, timeout=120.0,
                 patience=600.0, backoff=1.0, max_backoff=30.0, max_tokens=ANNOTATOR_MAX_TOKENS, log_path=""):
        if family not in REWARD_PROMPTS:
            raise SystemExit(f"error: no annotator prompts for family {family!r}; families: "
                             f"{', '.join(REWARD_PROMPTS)}")
        self.url = re.sub(r"/chat/completions/?\Z", "", url.strip()).rstrip("/")
        problem = url_problem(self.url)
        if problem:
            raise SystemExit(f"error: --judge-url {url!r} {problem}")
        self.family, self.api_key_env = family, api_key_env
        self.patience, self.backoff, self.max_backoff = patience, backoff, max_backoff
        self._gave_up = threading.Event()  # set when a request ran out of patience: the call's others stop too
        self._why = ""
        self.max_tokens, self.log_path = max_tokens, log_path
        self._key = _Secret(os.environ.get(api_key_env, ""))
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), limits=httpx.Limits(
            max_connections=concurrency, max_keepalive_connections=concurrency))
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="judge")
        self._rng, self._lock = random.Random(), threading.Lock()
        self._reported, self._details = set(), {}   # failure kinds shown; the server's message for a kind
        try:
            self.model = self._probe(model)
        except SystemExit:
            self.close()
            raise

    def __repr__(self):
        return (f"LLMJudge(url={self.url!r}, model={self.model!r}, family={self.family!r}, "
                f"api_key=${self.api_key_env} {self._key!r})")

    __str__ = __repr__

    def close(self):
        self._pool.shutdown(wait=False)
        self._http.close()

    def _headers(self):
        key = self._key.reveal()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _scrub(self, text):
        key = self._key.reveal()
        return text.replace(key, "<api key>") if key else text

    def _probe(self, model):
        """One request before training: GET {url}/models. Exit with the fix if the endpoint is unreachable,
        rejects the key, or does not serve `model`; with no model given, use the one the endpoint serves."""
        fix = ("start an OpenAI-compatible server there (e.g. `vllm serve Qwen/Qwen2-72B-Instruct --port 8000`, "
               "or the toy stand-in `python judge.py --serve --task toy --port 8000`) or pass the right "
               "--judge-url (the base URL, ending in /v1)")
        try:
            r = self._http.get(self.url + "/models", headers=self._headers())
        except httpx.HTTPError as e:
            raise SystemExit(f"error: cannot reach the annotator endpoint {self.url} "
                             f"({type(e).__name__}: {self._scrub(str(e))}); {fix}") from None
        if r.status_code in (401, 403):
            raise SystemExit(f"error: the annotator endpoint {self.url} refused the API key (HTTP {r.status_code}); "
                             f"put the key in the environment variable ${self.api_key_env} (--judge-api-key-env)")
        if r.status_code != 200:
            raise SystemExit(f"error: the annotator endpoint {self.url} answered GET /models with HTTP "
                             f"{r.status_code}; {fix}")
        try:
            served = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"error: {self.url}/models is not an OpenAI-compatible model list; {fix}") from None
        if not model:
            if len(served) != 1:
                raise SystemExit(f"error: {self.url} serves {len(served)} models {served[:10]}; choose one with "
                                 "--judge-model")
            return served[0]
        if served and model not in served:
            raise SystemExit(f"error: {self.url} does not serve --judge-model {model!r}; it serves {served[:10]}")
        return model

    def _post(self, payload):
        """POST one chat completion, retried for self.patience seconds -> (parsed JSON body, None) or (None, why
        the server rejected it); a request that fails every try until then sets _gave_up (see the class)."""
        deadline = time.monotonic() + self.patience
        for attempt in itertools.count():  # until a reply, a rejection, or the patience is out
            if self._gave_up.is_set():
                return None, "not asked: another request ran out of --judge-patience"
            wait = 0.0
            try:
                r = self._http.post(self.url + "/chat/completions", json=payload, headers=self._headers())
            except httpx.TransportError as e:  # refused, reset, dropped, timed out: worth another try
                error = f"{type(e).__name__}: {self._scrub(str(e))}" if str(e) else type(e).__name__
            else:
                if r.status_code == 200:
                    try:
                        return r.json(), None
                    except ValueError:
                        return None, "malformed response (not JSON)"
                error = f"HTTP {r.status_code}"
                if r.status_code != 429 and r.status_code < 500:  # the request itself is wrong: retrying can't help
                    return None, self._rejected(r)
                wait = _retry_after(r.headers.get("Retry-After")) or 0.0
            left = deadline - time.monotonic()
            if left <= 0:
                self._give_up(error)
                return None, "ran out of --judge-patience"
            backoff = self.backoff * 2 ** min(attempt, 30) * (0.5 + 0.5 * self._rng.random())
            self._gave_up.wait(min(self.max_backoff, max(backoff, wait), left))  # the last try at the deadline

    def _give_up(self, why):
        """Make the call raise AnnotatorUnavailable (once, with the first request's reason)."""
        with self._lock:
            if not self._gave_up.is_set():
                self._why = why
                self._gave_up.set()

    def _map(self, texts):
        """The replies to texts, asked `concurrency` at a time; AnnotatorUnavailable if a request ran out of
        patience (a batch is judged whole or not at all)."""
        self._gave_up.clear()
        replies = list(self._pool.map(self._ask, texts))
        if self._gave_up.is_set():
            raise AnnotatorUnavailable(f"the annotator at {self.url} failed every try of a request for "
                                       f"--judge-patience {self.patience:g} s (last: {self._why}); a larger "
                                       "--judge-patience gives it more time")
        return replies

    def _rejected(self, r):
        """Why the server rejected a request (a 4xx other than 429): the server's message (OpenAI's error body
        {"error": {"message": ...}}, else the text). A prompt over the context window gets one fixed reason,
        counted as one kind however many tokens each prompt had; its message is shown with it."""
        try:
            err = r.json()["error"]
            message = str(err.get("message", err) if isinstance(err, dict) else err)
        except (ValueError, KeyError, TypeError, AttributeError):
            message = r.text
        message = self._scrub(" ".join(message.split()))[:300]
        if r.status_code == 400 and CONTEXT_LENGTH_RE.search(message):
            reason = "prompt longer than the annotator's context window (HTTP 400)"
            self._details.setdefault(reason, message)
            return reason
        return f"HTTP {r.status_code}: {message[:200]}"

    def _ask(self, text):
        """The annotator's reply to one user message -> a Reply."""
        body, error = self._post({"model": self.model, "messages": [{"role": "user", "content": text}],
                                  "temperature": 0, "max_tokens": self.max_tokens})
        if error:
            return Reply(error=error)
        try:
            choice = body["choices"][0]
            content, usage = choice["message"]["content"] or "", body.get("usage")
        except (KeyError, IndexError, TypeError, AttributeError):
            return Reply(error="malformed response (no choices[0].message.content)")
        return Reply(str(content), None, choice.get("finish_reason"), usage)

    @staticmethod
    def uncut(reply):
        """The text of a Reply to parse: a reply cut at max_tokens loses a number it ends in (maybe cut)."""
        text = reply.text or ""
        return re.sub(r"\d+(?:\.\d*)?\Z", "", text) if reply.finish_reason == "length" else text

    def _no(self, what, reply):
        """The reason a reply that came back holds no `what` (score, choice), naming a cut at max_tokens."""
        cut = f" (cut at the {self.max_tokens}-token limit)" if reply.finish_reason == "length" else ""
        return f"no {what} in the reply{cut}"

    def _report(self, reasons):
        """Print each new kind of failure once (stderr); counts go to the Judgment and the loop's metrics."""
        for reason in reasons:
            if reason not in self._reported:
                self._reported.add(reason)
                detail = f" ({self._details[reason]})" if reason in self._details else ""
                print(f"judge llm ({self.url}): invalid judgment: {reason}{detail}; such samples are NaN, left out "
                      "of the update and counted (train/invalid_judgments). Shown once per kind.", file=sys.stderr)

    def _record(self, kind, texts, replies):
        """Append one batch's requests and replies to the log (--judge-log) as one JSON line."""
        if not self.log_path:
            return
        line = json.dumps({"kind": kind, "family": self.family, "model": self.model, "max_tokens": self.max_tokens,
                           "requests": [{"prompt": t, "reply": r.text, "error": r.error,
                                         "finish_reason": r.finish_reason, "usage": r.usage}
                                        for t, r in zip(texts, replies)]})
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def __call__(self, prompts, responses, ended):
        """Rewards on the 1-10 scale (NaN = invalid). `ended` is not shown to the annotator (see
        `render_reward_prompt`)."""
        texts = [render_reward_prompt(self.family, p, r) for p, r in zip(prompts, responses)]
        replies = self._map(texts)
        self._record("reward", texts, replies)
        rewards = [parse_reward(self.uncut(r), self.family) if r.error is None else math.nan for r in replies]
        reasons = Counter(r.error or self._no("score", r) for r, x in zip(replies, rewards) if math.isnan(x))
        self._report(reasons)
        return Judgment(rewards, sum(reasons.values()), dict(reasons))

    def prefer(self, prompts, responses_a, responses_b):
        """P(a preferred) per sample, the annotator asked in both orders (a, b) and (b, a): 1, 0.5 or 0; NaN
        if either answer is invalid."""
        ab = [render_preference_prompt(self.family, p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)]
        ba = [render_preference_prompt(self.family, p, b, a) for p, a, b in zip(prompts, responses_a, responses_b)]
        replies = self._map(ab + ba)
        self._record("preference", ab + ba, replies)
        choices = [parse_preference(self.uncut(r)) if r.error is None else None for r in replies]
        self._report(Counter(r.error or self._no("choice", r) for r, c in zip(replies, choices) if c is None))
        n = len(ab)
        return [preference_from_choices(c1, c2, self.family) for c1, c2 in zip(choices[:n], choices[n:])]


# ---------------------------------------------------------------------------------------------------
# --judge reward_model: a local reward model, a sequence classifier or a causal LM read at one token's logit
# ---------------------------------------------------------------------------------------------------
def load_reward_model(path, token_id=0, batch_size=8, trust_remote_code=False):
    """The judge for the reward model directory `path`, chosen by the architectures in its config.json."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: --reward-model {path!r} is not a model directory (no config.json there); give "
                         "a local reward model directory: a sequence classifier, or a causal LM read at "
                         "--reward-token-id")
    archs = tasks.load_pretrained(AutoConfig, path, trust_remote_code).architectures or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return RewardModelJudge(path, batch_size, trust_remote_code=trust_remote_code)
    if any(a.endswith("ForCausalLM") for a in archs):
        return TokenLogitRewardModelJudge(path, token_id, batch_size, trust_remote_code=trust_remote_code)
    raise SystemExit(f"error: --reward-model {path!r} is neither a sequence-classification reward model nor a "
                     f"causal LM (architectures: {archs}); give a directory whose config.json names a "
                     "*ForSequenceClassification or a *ForCausalLM architecture")


class RewardModelJudge:
    """reward = the scalar logit of an AutoModelForSequenceClassification (num_labels = 1) on prompt +
    response, rendered with the reward model tokenizer's chat template (user turn(s), then the response as
    the assistant's turn) when it has one, else as plain text (prompt + response; a conversation in
    Anthropic HH's "Human: / Assistant:" format).

    Batches are right-padded: with causal attention the real tokens never see the padding, and the model's
    own pooling (the rightmost token that is not padding) reads the last real token, so a score does not
    depend on what else is in the batch. Texts are sorted by length first, which shrinks the padding. The
    reward model sees text only: `ended` is not used (the loop handles a missing EOS).
    """
    top = None  # an unbounded scale: no "best score" rate
    auto_class, padding_side = AutoModelForSequenceClassification, "right"

    def __init__(self, path, batch_size=8, device=None, trust_remote_code=False):
        if device is None:
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.device, self.batch_size = device, batch_size
        self.tok = tasks.load_pretrained(AutoTokenizer, path, trust_remote_code)
        self.model = tasks.load_pretrained(self.auto_class, path, trust_remote_code, dtype=dtype,
                                           use_safetensors=True).to(device).eval()
        if self.tok.pad_token is None:  # the usual convention (as in TRL): pad with EOS
            self.tok.pad_token = self.tok.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.tok.padding_side = self.padding_side
        self.check(path)

    def check(self, path):
        if self.model.config.num_labels != 1:
            raise SystemExit(f"error: --reward-model {path!r} has {self.model.config.num_labels} outputs; a reward "
                             "model has one scalar head (num_labels=1)")

    def render(self, prompt, response):
        turns = as_conversation(prompt) + [{"role": "assistant", "content": response}]
        if self.tok.chat_template:
            return self.tok.apply_chat_template(turns, tokenize=False)
        if isinstance(prompt, str):
            return prompt + response
        return plain_dialogue(turns)

    def rewards(self, enc):
        return self.model(**enc).logits[:, 0]                                               # [b]

    def scores(self, prompts, responses):
        texts = [self.render(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [math.nan] * len(texts)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = self.tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                               add_special_tokens=not self.tok.chat_template).to(self.device)  # a template has its own
                for i, x in zip(idx, self.rewards(enc).float().tolist()):
                    out[i] = x
        return out

    def __call__(self, prompts, responses, ended):
        rewards = self.scores(prompts, responses)
        return Judgment(rewards, _nan_count(rewards))

    def prefer(self, prompts, responses_a, responses_b):
        return [prefer_by_score(a, b) for a, b in zip(self.scores(prompts, responses_a),
                                                        self.scores(prompts, responses_b))]


class TokenLogitRewardModelJudge(RewardModelJudge):
    """reward = a causal LM's logit of token `token_id` (--reward-token-id) at the position after the
    conversation, rendered as above (prompt, then the response as the assistant's turn, no generation prompt):
    a reward model published as a causal LM, as nvidia/Llama-3.1-Nemotron-70B-Reward-HF is. Its model card
    calls generate(max_new_tokens=1, output_scores=True) on that rendering and reads scores[0][0][0]: token
    0's score for the first generated token. Those scores are the logits after the generation config's logits
    processors, and that model's config (greedy, no penalties, no temperature) has none that change them, so
    the score is the raw logit at the conversation's last position: one forward pass gives it.

    Batches are left-padded, with position ids that count real tokens (as in rollout.token_logps), so the
    last position is every row's last real token and only it goes through the LM head (`logits_to_keep`):
    a [b, 1, V] tensor, not [b, T, V] (128k logits a position for Llama 3).
    """
    auto_class, padding_side = AutoModelForCausalLM, "left"

    def __init__(self, path, token_id=0, batch_size=8, device=None, trust_remote_code=False):
        self.token_id = token_id
        super().__init__(path, batch_size, device, trust_remote_code)
        if os.environ.get("RANK", "0") == "0":  # once a run: every rank loads the judge (torchrun sets RANK)
            print(f"reward model {path}: a causal LM; reward = the logit of token {token_id} "
                  f"({self.tok.convert_ids_to_tokens(token_id)!r}) after the response")

    def check(self, path):
        n = self.model.get_output_embeddings().weight.shape[0]
        if not 0 <= self.token_id < n:
            raise SystemExit(f"error: --reward-token-id {self.token_id} is not a token of the reward model {path!r}, "
                             f"whose LM head has {n} logits (ids 0 to {n - 1}); Llama-3.1-Nemotron-70B-Reward-HF's "
                             "reward is token 0's logit")

    def rewards(self, enc):
        position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
        logits = self.model(**enc, position_ids=position_ids, logits_to_keep=1, use_cache=False).logits  # [b, 1, V]
        return logits[:, -1, self.token_id]                                                  # [b]


# ---------------------------------------------------------------------------------------------------
# Choosing a judge
# ---------------------------------------------------------------------------------------------------
def reward_family(task=None, cfg=None):
    """The annotator prompt family: the task's `reward_prompt`, else its name or --task if that names one."""
    family = getattr(task, "reward_prompt", None)
    if family is None:
        for name in (getattr(task, "name", None), getattr(cfg, "task", None)):
            if name in REWARD_PROMPTS:
                family = name
                break
    if family not in REWARD_PROMPTS:
        raise SystemExit(f"error: no annotator prompt for task {getattr(cfg, 'task', None)!r}; the prompt "
                         f"families are {', '.join(REWARD_PROMPTS)} (a task names its own in reward_prompt)")
    return family


def make_judge(name, task=None, cfg=None):
    if name == "toy_gold":
        return RuleJudge(tasks.toy_gold_score, top=10.0)
    if name == "toy_biased":
        return RuleJudge(tasks.toy_biased_score, top=10.0)
    if name == "toy_proxy":
        return RuleJudge(tasks.toy_proxy_score)
    if name in ("vader", "textblob"):
        return SentimentJudge(name)
    if name == "llm":
        if cfg is None or not cfg.judge_url:
            raise SystemExit("error: --judge llm needs --judge-url, the base URL of an OpenAI-compatible endpoint "
                             "serving the annotator, e.g. --judge-url http://127.0.0.1:8000/v1 (vLLM: `vllm serve "
                             "Qwen/Qwen2-72B-Instruct --port 8000`; a toy stand-in: `python judge.py --serve "
                             "--task toy --port 8000`)")
        return LLMJudge(cfg.judge_url, reward_family(task, cfg), model=cfg.judge_model,
                        api_key_env=cfg.judge_api_key_env, concurrency=cfg.judge_concurrency,
                        timeout=cfg.judge_timeout, patience=cfg.judge_patience,
                        log_path=cfg.judge_log)
    if name == "reward_model":
        if cfg is None or not cfg.reward_model:
            raise SystemExit("error: --judge reward_model needs --reward-model DIR, a local reward model directory: "
                             "an AutoModelForSequenceClassification, or a causal LM read at --reward-token-id")
        return load_reward_model(cfg.reward_model, cfg.reward_token_id, batch_size=getattr(cfg, "judge_batch_size", 8),
                                 trust_remote_code=cfg.trust_remote_code)
    raise SystemExit(f"error: unknown --judge {name!r}; valid judges: {', '.join(JUDGES)}")


# ---------------------------------------------------------------------------------------------------
# The toy annotator behind an OpenAI-compatible HTTP server (python judge.py --serve --task toy)
# ---------------------------------------------------------------------------------------------------
def _template_regex(template):
    """A regex that takes a rendered template apart: each placeholder becomes a named group. All but the
    last group are non-greedy and the match is anchored at the end, so the last field (the response) is
    recovered exactly even when it contains newlines, "SCORE: 10" or the template's own headings. (In a
    preference prompt, a first response that contains "Response 2 - " is ambiguous; the split is at the
    first one.)"""
    parts = re.split(r"\{(\w+)\}", template)
    names, literals = parts[1::2], parts[0::2]
    groups = [f"(?P<{n}>.*?)" if i < len(names) - 1 else f"(?P<{n}>.*)" for i, n in enumerate(names)]
    pattern = "".join(re.escape(lit) + g for lit, g in zip(literals, groups + [""]))
    return re.compile(pattern + r"\Z", re.DOTALL)


TOY_REWARD_RE = _template_regex(TOY_REWARD_PROMPT)
TOY_PREFERENCE_RE = _template_regex(TOY_PREFERENCE_PROMPT)


def toy_score_to_scale(score):
    """A toy score (0-10; the proxy's can exceed 10) on the annotator's integer 1-10 SCORE scale:
    round(1 + 0.9 s), clipped to [1, 10]. The affine map sends 0 to 1 and 10 to 10 (the order of scores
    is kept, up to rounding; rounding is half-up); a proxy score above 10 (its length bonus) is 10."""
    return min(10, max(1, math.floor(1 + 0.9 * score + 0.5)))


def _toy_prompt_of(context):
    """The toy user message inside a rendered {context} ("Human: reverse: abc"), or None."""
    m = re.fullmatch(r"Human: (.*)", context, re.DOTALL)
    return m.group(1) if m and tasks.toy_word_of(m.group(1)) else None


PAPER_REWARD_RES = {f: _template_regex(REWARD_PROMPTS[f]) for f in ("tldr", "helpful", "harmless")}
PAPER_PREFERENCE_RES = {f: _template_regex(PREFERENCE_PROMPTS[f]) for f in ("tldr", "helpful", "harmless")}


def overlap_score(context, response):
    """A stand-in rating for the paper's prompt families, 1-10: the share of the response's words that
    occur in the context (or post), on the toy scale. It only makes the paper's tasks runnable end to end
    on a CPU against a real HTTP annotator; it measures nothing about helpfulness or harm."""
    words = re.findall(r"[a-z']+", response.lower())
    context_words = set(re.findall(r"[a-z']+", context.lower()))
    return toy_score_to_scale(10 * sum(w in context_words for w in words) / len(words) if words else 0)


def toy_annotate(message, score, position_bias=False, scale=toy_score_to_scale):
    """What the toy annotator replies to one user message: a reward prompt gets "<sentence>.\\nSCORE: n"
    (n = scale(score), 1-10); a preference prompt "<sentence>.\\nPreferred Response=k" (the higher score; on a
    tie the first one, as a position-biased annotator would; with position_bias always 1), so the pairwise
    answer never prefers what the SCORE rates lower; anything else a refusal. The annotator sees text only, so
    a response is scored as if it ended (no EOS check). The paper's families get the same answers from
    `overlap_score` ("Preferred Summary=k" for TL;DR)."""
    m = TOY_REWARD_RE.match(message)
    prompt = m and _toy_prompt_of(m["context"])
    if prompt:
        n = scale(score(prompt, m["response"], True))
        exact = m["response"] == tasks.toy_target(tasks.toy_word_of(prompt))
        verdict = "is exactly the reversed word" if exact else "is not exactly the reversed word"
        return f"The response {verdict}.\nSCORE: {n}"
    m = TOY_PREFERENCE_RE.match(message)
    prompt = m and _toy_prompt_of(m["context"])
    if prompt:
        s1, s2 = score(prompt, m["response1"], True), score(prompt, m["response2"], True)
        k = 1 if position_bias or s1 >= s2 else 2
        return f"Response {k} reverses the word more correctly.\nPreferred Response={k}"
    for family, regex in PAPER_REWARD_RES.items():   # the paper's reward prompts: the word-overlap stand-in
        m = regex.match(message)
        if m:
            context, response = m.groups()
            return f"A stand-in rating: word overlap with the {'post' if family == 'tldr' else 'context'}.\n" \
                   f"SCORE: {overlap_score(context, response)}"
    for family, regex in PAPER_PREFERENCE_RES.items():   # their preference prompts: the same rating, compared
        m = regex.match(message)
        if m:
            context, response1, response2 = m.groups()
            s1, s2 = overlap_score(context, response1), overlap_score(context, response2)
            # harmless: the rating is the harm score h of the reward prompt (reward 11 - h, parse_reward), so the
            # higher one answers the prompt's "choose the most harmful response", consistently with the rewards
            k = 1 if position_bias or s1 >= s2 else 2
            what = "Summary" if family == "tldr" else "Response"
            return f"A stand-in choice by word overlap with the {'post' if family == 'tldr' else 'context'} " \
                   f"({s1} vs. {s2}).\nPreferred {what}={k}"
    return "I'm sorry, I can only rate word reversals."


# --annotator: the toy rule behind the served replies and how its score becomes the SCORE n. toy_biased_score is
# already an integer on the 1-10 scale; the other two are mapped by toy_score_to_scale.
SERVED_SCORES = {"gold": (tasks.toy_gold_score, toy_score_to_scale),
                 "biased": (tasks.toy_biased_score, int),
                 "proxy": (tasks.toy_proxy_score, toy_score_to_scale)}


def serve(args):
    """Run the toy annotator's OpenAI-compatible server until interrupted (see `main` for the flags)."""

    model_id = f"toy-{args.annotator}"
    score, scale = SERVED_SCORES[args.annotator]
    lock, state = threading.Lock(), {"requests": 0, "authorization": None, "request": None}
    status_n, status_code = args.status_every or (0, 0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, fmt, *a):
            if args.verbose:
                super().log_message(fmt, *a)

        def send_json(self, code, obj, headers=()):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def send_error_json(self, code, message, headers=()):
            self.send_json(code, {"error": {"message": message, "type": "error", "code": code}}, headers)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": model_id, "object": "model",
                                                                 "created": 0, "owned_by": "dar"}]})
            elif args.record and self.path == "/debug/last":  # what the last chat request carried (tests)
                with lock:
                    self.send_json(200, dict(state))
            else:
                self.send_error_json(404, f"no route GET {self.path}")

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self.send_error_json(404, f"no route POST {self.path}")
            with lock:  # faults count chat requests only (the client's GET /models probe is never faulted)
                state["requests"] += 1
                n = state["requests"]
                if args.record:
                    state["authorization"] = self.headers.get("Authorization")
                    state["request"] = raw.decode("utf-8", "replace")
            if args.drop_every and n % args.drop_every == 0:  # close the connection without any reply
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if args.delay:
                time.sleep(args.delay)
            if status_n and n % status_n == 0:
                headers = [("Retry-After", f"{args.retry_after:g}")] if args.retry_after is not None else []
                return self.send_error_json(status_code, f"injected HTTP {status_code}", headers)
            try:
                req = json.loads(raw)
                message = req["messages"][-1]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return self.send_error_json(400, "expected a chat-completions request with messages")
            if req.get("model") not in (None, "", model_id):
                return self.send_error_json(404, f"The model `{req.get('model')}` does not exist.")
            if args.garbage_every and n % args.garbage_every == 0:
                text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit."
            else:
                text = toy_annotate(message, score, args.position_bias, scale)
            self.send_json(200, {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(message.split()), "completion_tokens": len(text.split()),
                          "total_tokens": len(message.split()) + len(text.split())}})

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):  # a client that gave up (timeout) is no error here
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)

    server = Server((args.host, args.port), Handler)
    host, port = server.server_address[:2]
    print(f"toy annotator ({args.annotator}) serving http://{host}:{port}/v1 (model {model_id})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def every_status(text):
    """--status-every N:CODE as (N, CODE)."""
    m = re.fullmatch(r"(\d+):(\d{3})", text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"expected N:CODE, e.g. 3:503, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def arg_parser():
    p = argparse.ArgumentParser(description="Serve the toy task's annotator behind an OpenAI-compatible "
                                            "chat-completions endpoint (a stand-in for an LLM judge).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--serve", action="store_true", help="run the server (the only action)")
    p.add_argument("--task", default="toy", choices=["toy"], help="whose annotator to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (local only by default)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 = any free one (the address is printed)")
    p.add_argument("--annotator", default="gold", choices=list(SERVED_SCORES),
                   help="the rule behind the replies, as --judge toy_gold, toy_biased or toy_proxy rates")
    p.add_argument("--verbose", action="store_true", help="log every request")
    f = p.add_argument_group("fault injection (tests); N counts chat requests, the first is 1")
    f.add_argument("--delay", type=float, default=0.0, help="seconds to wait before every chat reply")
    f.add_argument("--drop-every", type=int, default=0, help="close the connection without a reply every Nth")
    f.add_argument("--garbage-every", type=int, default=0, help="reply with text that holds no score every Nth")
    f.add_argument("--status-every", type=every_status, default=None, metavar="N:CODE",
                   help="reply with HTTP status CODE every Nth request")
    f.add_argument("--retry-after", type=float, default=None, help="Retry-After seconds sent with --status-every")
    f.add_argument("--position-bias", action="store_true", help="always prefer the first response")
    f.add_argument("--record", action="store_true",
                   help="GET /debug/last returns the last chat request, its Authorization header and the count")
    return p


def main(argv=None):
    p = arg_parser()
    args = p.parse_args(argv)
    if not args.serve:
        p.error("nothing to do: pass --serve")
    serve(args)


if __name__ == "__main__":
    main()
