"""Evaluation during training (--eval-every): eval/* in the step's row, training untouched by it, the best
checkpoint named in out_dir/best and kept through rotation and resume."""
import json
import os

import pytest

import config
import infra
import judge
import loop
from conftest import TINY, TORCHRUN, comparable, read_metrics, run_dar, train

EVAL_KEYS = {"eval/reward", "eval/win_rate", "eval/pi0_reward", "eval/length", "eval/no_eos", "eval/invalid_judgments"}


def tiny_cfg(toy_cache, out, *extra):
    return config.parse_config(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--print-every", "1000",
                                       "--eval-every-prompts", "16", *extra])


def training_rows(out):
    """metrics.jsonl without timings and eval/*: what training alone logged."""
    return [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in comparable(read_metrics(out))]


def test_eval_every_logs_eval_metrics_and_leaves_training_unchanged(toy_cache, tmp_path):
    train(tiny_cfg(toy_cache, tmp_path / "plain", "--steps", "3"))
    train(tiny_cfg(toy_cache, tmp_path / "eval", "--steps", "3", "--eval-every", "2"))
    rows = read_metrics(tmp_path / "eval")
    assert [bool(EVAL_KEYS & set(r)) for r in rows] == [False, True, True]  # every 2nd batch, and the last
    for r in rows[1:]:
        assert EVAL_KEYS <= set(r)
        assert 0 <= r["eval/win_rate"] <= 1 and 0 <= r["eval/no_eos"] <= 1
        assert 0 < r["eval/length"] <= 12 and 0 <= r["eval/reward"] <= 10  # --max-new-tokens 12; the gold scale
    assert rows[1]["eval/pi0_reward"] == rows[2]["eval/pi0_reward"]  # pi_0 is sampled once, at the first
    # the evaluation draws from its own seed and restores training's random stream: the batch after it (3) samples
    # what it would have without it
    assert training_rows(tmp_path / "eval") == training_rows(tmp_path / "plain")
    best = json.load(open(tmp_path / "eval" / "best.json"))
    assert open(tmp_path / "eval" / "best").read() == best["checkpoint"]
    assert os.path.isdir(tmp_path / "eval" / best["checkpoint"])


class ScriptedJudge:
    """The eval judge, with rewards fixed per call: pi_0's responses (a judge's first call) score 5, the policy's
    at the test's first evaluation 10, at every later one (in this run or a resumed one) 0: the first is the best."""

    def __init__(self, policy_calls):
        self.calls, self.policy_calls = 0, policy_calls  # policy_calls: [count], shared by the test's runs

    def __call__(self, prompts, responses, ended):
        if self.calls == 0:
            score = 5.0
        else:
            score = 10.0 if self.policy_calls[0] == 0 else 0.0
            self.policy_calls[0] += 1
        self.calls += 1
        return judge.Judgment([score] * len(responses), 0)


def test_best_checkpoint_survives_rotation_and_resume(toy_cache, tmp_path, monkeypatch):
    real, policy_calls = loop.make_judge, [0]
    monkeypatch.setattr(loop, "make_judge", lambda name, task=None, cfg=None:
                        ScriptedJudge(policy_calls) if name == "toy_gold" else real(name, task, cfg))
    out = tmp_path / "run"
    flags = ["--judge", "toy_proxy", "--eval-every", "1", "--save-every", "3", "--keep-checkpoints", "1"]
    train(tiny_cfg(toy_cache, out, "--steps", "3", *flags))
    # batch 1 is no save step: the best evaluation wrote its checkpoint, and rotation to 1 checkpoint kept it
    assert open(out / "best").read() == "ckpt-000001" and open(out / "latest").read() == "ckpt-000003"
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt-")) == ["ckpt-000001", "ckpt-000003"]
    assert infra.load_state(out / "ckpt-000001" / "state.pt")["step"] == 1
    best = json.load(open(out / "best.json"))
    assert (best["step"], best["eval/win_rate"], best["eval/reward"]) == (1, 1.0, 10.0)
    assert [r["eval/win_rate"] for r in read_metrics(out)] == [1.0, 0.0, 0.0]

    # resumed, its first evaluation (batch 4) is worse than the best so far, which it read from best.json
    train(tiny_cfg(toy_cache, out, "--steps", "5", "--resume", *flags))
    assert open(out / "best").read() == "ckpt-000001" and json.load(open(out / "best.json")) == best
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt-")) == ["ckpt-000001", "ckpt-000005"]

    assert [r["eval/win_rate"] for r in read_metrics(out)] == [1.0, 0.0, 0.0, 0.0, 0.0]

    # a new run in the same directory, without evaluations, leaves no best of the old run behind
    train(tiny_cfg(toy_cache, out, "--steps", "1"))
    assert not os.path.exists(out / "best") and not os.path.exists(out / "best.json")


def test_prune_checkpoints_keeps_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        os.makedirs(tmp_path / infra.checkpoint_name(step))
    infra.write_atomic(str(tmp_path / "best"), "ckpt-000002")
    infra.prune_checkpoints(config.Config(out_dir=str(tmp_path), keep_checkpoints=1))
    assert sorted(os.listdir(tmp_path)) == ["best", "ckpt-000002", "ckpt-000004"]
    infra.write_atomic(str(tmp_path / "best"), "ckpt-000004")  # the newest is the best: nothing more is kept
    infra.prune_checkpoints(config.Config(out_dir=str(tmp_path), keep_checkpoints=1))
    assert sorted(os.listdir(tmp_path)) == ["best", "ckpt-000004"]


def test_prune_checkpoints_deletes_an_earlier_runs_later_checkpoints(tmp_path):
    """A fresh run over a directory that holds ckpt-000005 of an earlier run: at its own ckpt-000002 (`latest`),
    the leftover is deleted, not this run's checkpoints (names sort by step, so it once counted as the newest)."""
    for step in (1, 2, 5):
        os.makedirs(tmp_path / infra.checkpoint_name(step))
    infra.write_atomic(str(tmp_path / "latest"), "ckpt-000002")
    infra.prune_checkpoints(config.Config(out_dir=str(tmp_path), keep_checkpoints=1))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000002", "latest"]


def test_bad_eval_every_flags_are_rejected():
    for argv, msg in ((["--eval-every", "-1"], "--eval-every must be >= 0"),
                      (["--eval-every", "2", "--algo", "sft"], "--algo sft has none"),
                      (["--eval-every", "2", "--eval-every-prompts", "0"], "--eval-every-prompts must be >= 1")):
        with pytest.raises(SystemExit, match=msg):
            config.check_config(config.parse_config(argv), 1)


@pytest.mark.slow
def test_eval_every_under_torchrun(toy_cache, tmp_path):
    out = tmp_path / "ddp"
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--eval-every", "1",
                        "--eval-every-prompts", "15", "--eval-prompts", "0"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out)
    assert all(EVAL_KEYS <= set(r) and 0 <= r["eval/win_rate"] <= 1 for r in rows)
    assert "eval after batch 2 on 15 validation prompts" in p.stdout
    assert os.path.isdir(out / open(out / "best").read())
