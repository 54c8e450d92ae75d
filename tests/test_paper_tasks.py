"""The paper's tasks through dar.py end to end on a CPU, with real components: the data parsers on
fixture files in each data set's schema, the HTTP annotator client against a real OpenAI-compatible
server (`judge.py --serve`), and a reward model for HelpSteer2. The policy is the toy pi_0 (any Hugging
Face causal LM works; this one is small)."""
import json
import os

import pytest

import config
import loop
from conftest import ROOT, build_causal_reward_model, build_reward_model, read_metrics, run_dar

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SMALL = ["--online-batch", "8", "--minibatch", "8", "--micro-batch", "8", "--max-new-tokens", "8",
         "--eval-prompts", "2", "--steps", "2", "--lr", "1e-3", "--print-every", "1000"]


@pytest.fixture(scope="module")
def pi_0(toy_cache):
    return os.path.join(loop.toy_paths(config.parse_config(["--cache-dir", toy_cache, "--sft-steps", "40"]))[1], "final")


@pytest.mark.slow
@pytest.mark.parametrize("task, data", [("tldr", "tldr_sft.jsonl"), ("helpful", "hh_helpful.jsonl"),
                                        ("harmless", "hh_harmless.jsonl.gz")])
def test_direct_ai_alignment_task_trains_against_the_http_annotator(task, data, annotator, pi_0, tmp_path):
    out = tmp_path / task
    p = run_dar(SMALL + ["--task", task, "--data", os.path.join(FIXTURES, data), "--model", pi_0,
                         "--judge-url", annotator, "--out-dir", str(out)], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.load(open(out / "config.json"))
    assert cfg["judge"] == "llm" and cfg["eval_judge"] == "llm"                  # the task's defaults
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/invalid_judgments"] == 0 for r in rows)                  # every reply was parsed
    assert all(1 <= r["train/reward_mean"] <= 10 for r in rows)                  # the 1-10 annotator scale
    assert json.load(open(out / "eval.json"))["judge"] == "llm"


@pytest.mark.slow
def test_offline_dpo_trains_on_the_hh_preference_pairs(annotator, pi_0, tmp_path):
    out = tmp_path / "dpo"
    p = run_dar(SMALL + ["--task", "helpful", "--algo", "dpo", "--data", os.path.join(FIXTURES, "hh_helpful.jsonl"),
                         "--model", pi_0, "--judge-url", annotator, "--out-dir", str(out)], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


@pytest.fixture(scope="module", params=["classifier", "causal_lm"])
def reward_model(request, tmp_path_factory):
    """A sequence-classification reward model, and a causal LM read at a token's logit (the way the paper's
    Llama-3.1-Nemotron-70B-Reward-HF is published)."""
    build = build_reward_model if request.param == "classifier" else build_causal_reward_model
    return build(str(tmp_path_factory.mktemp("rm")))


@pytest.mark.slow
def test_helpsteer2_trains_with_a_reward_model_and_its_paper_defaults(reward_model, pi_0, tmp_path):
    out = tmp_path / "hs2"
    p = run_dar(SMALL + ["--task", "helpsteer2", "--data", os.path.join(FIXTURES, "helpsteer2.jsonl"),
                         "--model", pi_0, "--reward-model", reward_model, "--out-dir", str(out)], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.load(open(out / "config.json"))
    assert (cfg["judge"], cfg["alpha"], cfg["beta"], cfg["weight_decay"]) == ("reward_model", 0.5, 0.5, 0.01)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/invalid_judgments"] == 0 for r in rows)
    causal = json.load(open(os.path.join(reward_model, "config.json")))["architectures"] == ["Qwen2ForCausalLM"]
    assert ("a causal LM; reward = the logit of token 0" in p.stdout) == causal


@pytest.mark.slow
@pytest.mark.parametrize("task", ["toy", "helpful"])
def test_online_dpo_learns_from_the_annotators_preference_prompts(task, annotator, pi_0, tmp_path):
    """--algo online_dpo --judge llm against the served annotator: its pairs are labelled by the task's preference
    prompt in both orders (--pair-labels preference, the default), and the evaluation's pairwise win rate over
    pi_0 is a number (the HH preference prompt used to get a refusal, NaN)."""
    out = tmp_path / task
    data = ["--data", os.path.join(FIXTURES, "hh_helpful.jsonl")] if task == "helpful" else []
    # the toy pi_0 of 40 SFT steps answers most prompts equally badly, and such pairs tie: 16 pairs a batch, so
    # that some have a preference (4 pairs a batch were all ties in both batches of a run)
    n_pairs = 16 if task == "toy" else 4
    p = run_dar(SMALL + ["--task", task, "--algo", "online_dpo", "--model", pi_0, "--judge", "llm",
                         "--online-batch", str(2 * n_pairs), "--minibatch", str(2 * n_pairs),
                         "--eval-judge", "llm", "--judge-url", annotator, "--out-dir", str(out), *data], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(out / "config.json"))["pair_labels"] == "preference"
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    # K 2: n_pairs pairs a batch, each with a valid preference (used, or a tie of both orders); a batch of ties
    # only has nothing to learn from: skipped without an update, its counts logged all the same
    assert all(r["pairs/invalid"] == 0 and r["pairs/used"] + r["pairs/ties"] == n_pairs for r in rows)
    assert all(r.get("train/skipped", 0) == (r["pairs/used"] == 0) for r in rows)
    assert all(r["train/invalid_judgments"] == 0 for r in rows)
    if task == "toy":  # the toy pi_0's answers to HH prompts share no words with them: the stand-in ties them all
        assert sum(r["pairs/used"] for r in rows) > 0
    report = json.load(open(out / "eval.json"))
    assert 0 <= report["pref_win_rate"] <= 1                                  # not NaN
