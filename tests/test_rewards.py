"""Reward functions in Python (--reward, rewards.py): loaded from a file or a module, called as TRL's GRPOTrainer
calls them, combined with a judge by --reward-weights, None as an invalid judgment, async ones concurrently, and
a raising one stopping the run with a checkpoint that --resume continues from."""
import dataclasses
import json
import math
import os
import time
from types import SimpleNamespace

import pytest

import config
import eval as eval_py
import judge
import loop
import rewards
import tasks
from conftest import ROOT, TINY, comparable, read_metrics, train

FNS = os.path.join(ROOT, "tests", "fixtures", "rewards", "fns.py")


def cfg_of(*flags):
    return config.parse_config(list(flags))


def reward_of(*flags, task=None):
    cfg = cfg_of(*flags)
    config.check_config(cfg, 1)
    return loop.training_reward(cfg, task)


def test_a_file_function_gets_trl_keywords_with_the_data_sets_columns():
    prompts = ["abc", "abc", [{"role": "user", "content": "hi"}]]
    task = SimpleNamespace(columns={tasks.prompt_key("abc"): {"target": "cba"}})
    r = reward_of("--judge", "none", "--reward", f"{FNS}:uses_columns", "--reward", f"{FNS}:length_reward", task=task)
    kw = r.kwargs(prompts, ["cba", "xy", "hello"], [True, False, True])
    assert kw["target"] == ["cba", "cba", None] and kw["ended"] == [True, False, True]
    assert kw["completions"][:2] == ["cba", "xy"]
    assert kw["completions"][2] == [{"role": "assistant", "content": "hello"}]  # a chat prompt's, as TRL gives it
    j = r(prompts, ["cba", "xy", "hello"], [True, False, True])
    assert r.components["uses_columns"][:2] == [1.0, 0.0] and math.isnan(r.components["uses_columns"][2])
    assert r.components["length_reward"] == pytest.approx([0.3, 0.2, 0.5])
    assert j.rewards[:2] == pytest.approx([1.3, 0.2]) and math.isnan(j.rewards[2]) and j.invalid == 1


def test_a_module_function_is_imported_from_the_working_directory(tmp_path, monkeypatch):
    pkg = tmp_path / "myrewards_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text("def shout(prompts, completions, **kw):\n    return [c.count('!') for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    r = reward_of("--judge", "none", "--reward", "myrewards_pkg.scores:shout")
    assert r(["p", "p"], ["a!!", "b"], [True, True]).rewards == [2.0, 0.0]
    assert list(r.components) == ["shout"]


def test_weights_combine_a_rule_judge_with_functions():
    prompt = tasks.toy_prompts(1, seed=0)[0]
    target = tasks.toy_target(tasks.toy_word_of(prompt))
    prompts, responses = [prompt, prompt], [target, target[:-1] + "xyz"]
    gold = [tasks.toy_gold_score(p, x, True) for p, x in zip(prompts, responses)]
    assert gold[0] == 10 and 0 < gold[1] < 10
    r = reward_of("--judge", "toy_gold", "--reward", f"{FNS}:length_reward", "--reward", f"{FNS}:length_reward",
                  "--reward-weights", "0.5,2,-1")
    j = r(prompts, responses, [True, True])
    assert list(r.components) == ["judge", "length_reward", "length_reward_2"]
    assert j.rewards == pytest.approx([0.5 * g + 2 * 0.1 * len(x) - 0.1 * len(x) for g, x in zip(gold, responses)])
    assert r.prefer(prompts[:1], responses[:1], responses[1:]) == [judge.prefer_by_score(j.rewards[0], j.rewards[1])]


def test_eval_judge_reward_evaluates_with_the_training_reward():
    """--eval-judge reward: the evaluation judge is the training reward, functions and weights included; any other
    --eval-judge is that judge alone."""
    prompt = tasks.toy_prompts(1, seed=0)[0]
    prompts, responses = [prompt, prompt], [tasks.toy_target(tasks.toy_word_of(prompt)), "xyz"]
    flags = ["--judge", "toy_gold", "--reward", f"{FNS}:length_reward", "--reward-weights", "0.5,2"]
    trained = reward_of(*flags)(prompts, responses, [True, True]).rewards
    cfg = cfg_of(*flags, "--eval-judge", "reward")
    config.check_config(cfg, 1)
    assert loop.eval_judge(cfg, None)(prompts, responses, [True, True]).rewards == pytest.approx(trained)
    gold = [tasks.toy_gold_score(p, x, True) for p, x in zip(prompts, responses)]
    assert loop.eval_judge(cfg_of(*flags), None)(prompts, responses, [True, True]).rewards == pytest.approx(gold)
    assert trained != pytest.approx(gold)


def test_none_is_an_invalid_judgment_counted_with_its_reason():
    r = reward_of("--judge", "toy_gold", "--reward", f"{FNS}:none_for_short")
    j = r(tasks.toy_prompts(3, seed=0), ["cba", "c", "cbb"], [True] * 3)
    assert math.isnan(j.rewards[1]) and not math.isnan(j.rewards[0]) and j.invalid == 1
    assert j.reasons == {f"{FNS}:none_for_short returned None": 1}


def test_async_functions_run_concurrently():
    """Each of the pair returns only once it has seen the other in flight (else it times out and raises)."""
    import importlib
    r = reward_of("--judge", "none", "--reward", f"{FNS}:first_async", "--reward", f"{FNS}:second_async")
    importlib.import_module("dar_reward_fns").IN_FLIGHT.clear()
    t0 = time.time()
    assert r(["p"] * 2, ["a", "b"], [True, True]).rewards == [2.0, 2.0]
    assert time.time() - t0 < 1.5


def test_a_raising_function_names_itself_and_the_failing_sample():
    r = reward_of("--judge", "none", "--reward", f"{FNS}:raises_on_x")
    with pytest.raises(rewards.RewardFunctionError) as e:
        r(["p0", "p1", "p2"], ["ab", "axb", "x"], [True] * 3)
    msg = str(e.value)
    assert f"{FNS}:raises_on_x" in msg and "ZeroDivisionError" in msg and "sample 1 " in msg and "'p1'" in msg
    r = reward_of("--judge", "none", "--reward", f"{FNS}:wrong_length")
    with pytest.raises(rewards.RewardFunctionError, match="wrong_length returned 1 values for 2 responses"):
        r(["p"] * 2, ["a", "b"], [True, True])


@pytest.mark.parametrize("flags, message", [
    (["--judge", "none"], "--judge none leaves only --reward"),
    (["--reward", "nofile.py:f"], "no such file 'nofile.py'"),
    (["--reward", f"{FNS}:nothing"], "defines no 'nothing'"),
    (["--reward", "no_such_module_xyz:f"], "importing no_such_module_xyz raised ModuleNotFoundError"),
    (["--reward", f"{FNS}:IN_FLIGHT"], "not a function"),
    (["--reward", "length_reward"], "give FILE.py:NAME or module:NAME"),
    (["--reward", f"{FNS}:length_reward", "--reward-weights", "1"], "--reward-weights gives 1 weights; --judge"),
    (["--reward", f"{FNS}:length_reward", "--algo", "online_dpo"], "--pair-labels reward"),
    (["--reward", f"{FNS}:length_reward", "--algo", "dpo"], "--algo dpo trains on a fixed data set"),
    (["--eval-judge", "nope"], "reward (the training reward: --judge and the --reward functions), or none"),
    (["--algo", "dpo", "--judge", "none", "--eval-judge", "reward"], "--judge none without --reward has none"),
])
def test_bad_reward_flags_stop_before_any_model_loads(flags, message):
    with pytest.raises(SystemExit) as e:
        config.check_config(cfg_of(*flags), 1)
    assert message in str(e.value)


def test_the_specs_round_trip_through_the_saved_config():
    cfg = cfg_of("--reward", "a.py:f", "--reward", "pkg.mod:g", "--reward-weights", "1,2")
    assert cfg.reward == "a.py:f,pkg.mod:g" and rewards.specs(cfg) == ["a.py:f", "pkg.mod:g"]
    assert config.config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def tiny(toy_cache, out, *extra):
    cfg = config.parse_config(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--print-every", "1000",
                                      "--save-every", "1000", *extra])
    config.check_config(cfg, 1)
    return cfg


def test_a_run_logs_each_functions_mean(toy_cache, tmp_path):
    out = tmp_path / "run"
    cfg = tiny(toy_cache, out, "--steps", "2", "--judge", "none", "--reward", f"{FNS}:length_reward",
               "--reward", f"{FNS}:ended_bonus", "--reward-weights", "2,3", "--eval-judge", "toy_gold")
    run = train(cfg)
    rows = read_metrics(out)
    assert len(rows) == 2
    for m in rows:  # no invalid judgment: the combined mean is the weighted sum of the components' means
        assert m["reward/length_reward"] > 0 and 0 <= m["reward/ended_bonus"] <= 1
        assert m["train/reward_mean"] == pytest.approx(2 * m["reward/length_reward"] + 3 * m["reward/ended_bonus"])
    # the end-of-run evaluation reports the training reward (the functions) beside the eval judge's
    report = eval_py.compare_with_reference(run.policy, run.ref, run.tok, run.task.eval_prompts[:8], cfg,
                                            task=run.task, pairwise=False)
    assert report["train_judge"] == f"reward functions {FNS}:length_reward, {FNS}:ended_bonus"
    assert report["policy/train_judge_reward"] > 0


@pytest.mark.slow
def test_a_raising_function_stops_with_a_checkpoint_and_resume_continues(toy_cache, tmp_path, monkeypatch):
    flags = ["--steps", "3", "--judge", "toy_gold", "--reward", f"{FNS}:raises_at_batch_2"]
    whole = tmp_path / "whole"
    train(tiny(toy_cache, whole, *flags))
    marker = tmp_path / "fail"
    marker.write_text("0")
    monkeypatch.setenv("DAR_TEST_FAIL_FILE", str(marker))
    out = tmp_path / "cut"
    with pytest.raises(SystemExit) as e:
        train(tiny(toy_cache, out, *flags))
    msg = str(e.value)
    assert "online batch 2" in msg and "raises_at_batch_2 raised RuntimeError: the scorer's service is down" in msg
    assert "on sample 0 of this rank's online batch" in msg and "ckpt-000001" in msg and "--resume" in msg
    assert len(read_metrics(out)) == 1 and open(out / "latest").read().strip() == "ckpt-000001"
    marker.unlink()  # the function fixed
    train(tiny(toy_cache, out, *flags, "--resume"))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert comparable(read_metrics(out))[-1] == comparable(read_metrics(whole))[-1]
