"""Reward functions in Python (--reward, rewards.py): loaded from a file or a module, called as TRL's GRPOTrainer
calls them, combined with a judge by --reward-weights, None as an invalid judgment, async ones concurrently, and
a raising one stopping the run with a checkpoint that --resume continues from."""
import dataclasses
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import config
import eval as eval_py
import infra
import judge
import loop
import rewards
import rollout
import tasks
from conftest import ROOT, TINY, TORCHRUN, comparable, read_metrics, run_dar, train

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


# ---------------------------------------------------------------------------------------------------
# TRL 1.16's keywords: completion_ids, trainer_state, log_metric, log_extra, with functions written as its
# documentation shows them (tests/fixtures/rewards/trl_style.py), and a reward file's own folder on the import path
# ---------------------------------------------------------------------------------------------------
TRL = os.path.join(ROOT, "tests", "fixtures", "rewards", "trl_style.py")
HELPER_DIR = os.path.join(ROOT, "tests", "fixtures", "rewards", "helper_dir")


def trl_module():
    """The loaded trl_style.py, whose functions record what they were given."""
    rewards.load_function(f"{TRL}:reward_len")
    return sys.modules["dar_reward_trl_style"]


def test_completion_ids_are_the_sampled_tokens_up_to_eos(toy_cache):
    """completion_ids of a sampled batch: each response's token ids, EOS last when it ended, no padding; they
    decode to the response, and where the text round-trips through the tokenizer they are its ids."""
    sft = os.path.join(loop.toy_paths(config.parse_config(TINY + ["--cache-dir", toy_cache]))[1], "final")
    model, tok = infra.load_model(sft, config.Config(), torch.device("cpu")), infra.load_tokenizer(sft)
    torch.manual_seed(0)
    batch = rollout.generate(model, tok, tasks.toy_prompts(6, seed=1), 2, 6, 1.0)
    assert 0 < int(batch.ended.sum()) < len(batch)  # both kinds of response
    cfg = cfg_of("--judge", "none", "--reward", f"{TRL}:token_count")
    config.check_config(cfg, 1)
    r = loop.training_reward(cfg, None, tok)
    seen = trl_module().SEEN_IDS
    seen.clear()
    j = rewards.judge_rollout(r, batch)
    (ids,) = seen
    eos = set(rollout.eos_ids(model, tok))
    assert j.rewards == [-float(n) for n in batch.response_mask.sum(1).tolist()]
    round_trips = 0
    for row, text, ended in zip(ids, batch.responses, batch.ended.tolist()):
        assert (row[-1] in eos) == ended and not eos & set(row[:-1]) and tok.pad_token_id not in row[:-1]
        body = row[:-1] if ended else row
        assert tok.decode(body, skip_special_tokens=False) == text
        if tok(text, add_special_tokens=False).input_ids == body:
            round_trips += 1
    assert round_trips >= len(batch) // 2
    # texts that were not sampled (a reference, prefer's pairs) are tokenized, EOS appended when ended
    seen.clear()
    r(["p", "p"], ["ab", "abc"], [True, False])
    assert seen == [[tok("ab", add_special_tokens=False).input_ids + [tok.eos_token_id],
                     tok("abc", add_special_tokens=False).input_ids]]


def test_a_reward_file_imports_modules_beside_it_and_its_folder_ends_sys_path(monkeypatch):
    """At load (a top-level import) and lazily (inside the function, at call time); afterwards the folder is the
    last entry of sys.path, behind this project's modules."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != HELPER_DIR])
    for name in ("dar_test_helper_at_load", "dar_test_helper_lazy"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    r = reward_of("--judge", "none", "--reward", f"{os.path.join(HELPER_DIR, 'uses_helper.py')}:shaped")
    assert "dar_test_helper_at_load" in sys.modules and "dar_test_helper_lazy" not in sys.modules
    assert sys.path[-1] == HELPER_DIR and sys.path.count(HELPER_DIR) == 1
    assert sys.path.index(ROOT) < sys.path.index(HELPER_DIR)
    assert r(["p", "p"], ["ab", "abcd"], [True, True]).rewards == [6.0, 12.0]  # 3 x len, the lazy import found
    assert "dar_test_helper_lazy" in sys.modules


@pytest.mark.parametrize("name, message", [
    ("logs_train_loss", "called log_metric('train/loss', ...): 'train/loss' is not free for it"),
    ("logs_short_column", "called log_extra('col', ...) with 1 values for 2 completions"),
    ("logs_reward_column", "the sample table has columns prompt, response, reward of its own"),
])
def test_a_function_misusing_log_metric_or_log_extra_is_named(name, message):
    r = reward_of("--judge", "none", "--reward", f"{TRL}:{name}")
    with pytest.raises(rewards.RewardFunctionError) as e:
        r(["p", "p"], ["a", "b"], [True, True])
    assert str(e.value).startswith(f"reward function {TRL}:{name} ") and message in str(e.value)


RUN_FUNCTIONS = ["reward_len", "token_count", "by_progress", "logs_metrics", "logs_extra"]


@pytest.fixture(scope="module")
def trl_run(toy_cache, tmp_path_factory):
    """3 online batches of DAR on TRL-style functions (each batch's table sampled and sent to TensorBoard; an
    evaluation with the training reward after batches 2 and 3): (out_dir, Run, what by_progress saw, config)."""
    out = tmp_path_factory.mktemp("trl") / "run"
    flags = ["--steps", "3", "--judge", "none", "--sample-every", "1", "--report-to", "tensorboard",
             "--eval-every", "2", "--eval-judge", "reward", "--eval-every-prompts", "8"]
    for name in RUN_FUNCTIONS:
        flags += ["--reward", f"{TRL}:{name}"]
    module = trl_module()
    module.STATES.clear()
    cfg = tiny(toy_cache, out, *flags)
    run = train(cfg)
    return out, run, list(module.STATES), cfg


@pytest.mark.slow
def test_trainer_state_counts_the_optimizer_steps_taken(trl_run):
    """global_step at online batch b is the optimizer steps of the batches before (2 a batch: online batch 32,
    minibatch 16), the LR schedule's count; max_steps the run's 3 x 2; epoch the training prompts' passes so far.
    The evaluations after batches 2 and 3 (8 prompts, one response each) see the state after that batch."""
    out, run, states, _ = trl_run
    n = len(run.task.train_prompts)
    assert run.sched.last_epoch == 6
    assert states == [(0, 6, 0.0, 32), (2, 6, 8 / n, 32), (4, 6, 16 / n, 8), (4, 6, 16 / n, 8),  # pi_0, policy
                      (4, 6, 16 / n, 32), (6, 6, 24 / n, 8)]


@pytest.mark.slow
def test_completion_ids_and_log_metric_reach_metrics_jsonl(trl_run):
    """token_count's component is minus the response length in tokens; my_metric the mean of its two values of
    the batch's call (global_step + 5 on rank 0), the evaluation's calls dropped; built-in keys untouched."""
    out, run, _, _ = trl_run
    rows = read_metrics(out)
    assert [r["my_metric"] for r in rows] == [5.0, 7.0, 9.0]
    assert "rank1_only" not in rows[0] and not any(k.startswith("eval/my") for r in rows for k in r)
    for r in rows:
        assert r["reward/token_count"] == pytest.approx(-r["train/response_len"])
        assert r["reward/by_progress"] == float(r["step"] > 2)  # global_step >= max_steps / 2 from batch 3 on


@pytest.mark.slow
def test_log_extra_columns_reach_the_sample_table_in_metrics_jsonl_and_tensorboard(trl_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # optional: tensorboard
    out, run, _, _ = trl_run
    rows = read_metrics(out)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")}
    assert sorted(texts) == [1, 2, 3]
    for r in rows:
        table = r["samples"]
        assert len(table) == 4 and all(list(s) == ["prompt", "response", "reward", "n_chars", "upper"] for s in table)
        for s in table:
            text = s["response"].removesuffix(" [no EOS]")
            assert s["n_chars"] == len(text) and s["upper"] == text.upper()
        assert texts[r["step"]].startswith("| prompt | response | reward | n_chars | upper |")
        assert all(f"| {s['n_chars']} |" in texts[r["step"]] for s in table)
    scalars = acc.Tags()["scalars"]
    assert "my_metric" in scalars and "samples" not in scalars


@pytest.mark.slow
def test_the_end_of_run_report_calls_the_functions_with_the_same_keywords(trl_run):
    """eval.compare_with_reference with --eval-judge reward: the sampled responses' token ids, the state given,
    and for the pairwise preference (texts compared again) the tokenizer's ids with EOS."""
    out, run, _, cfg = trl_run
    module = trl_module()
    module.STATES.clear()
    module.SEEN_IDS.clear()
    state = rewards.TrainerState(global_step=6, max_steps=6, epoch=0.5)
    prompts = run.task.eval_prompts[:4]
    report = eval_py.compare_with_reference(run.policy, run.ref, run.tok, prompts, cfg, task=run.task, state=state,
                                            win_rate_only=True)
    assert 0 <= report["pref_win_rate"] <= 1
    assert module.STATES == [(6, 6, 0.5, 4)] * 4  # pi_0's responses, the policy's, then prefer's two calls
    (pi_0, policy), pairs = module.SEEN_IDS[:2], module.SEEN_IDS[2:]
    stops, tok = set(rollout.eos_ids(run.policy, run.tok)), run.tok
    assert all(ids[-1] in stops or len(ids) == cfg.max_new_tokens for ids in pi_0 + policy)  # as sampled
    texts = [tok.decode(ids[:-1] if ids[-1] in stops else ids) for ids in pi_0]
    # prefer(policy's, pi_0's): the texts again, tokenized, EOS appended (prefer takes both as ended)
    assert pairs[1] == [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]


@pytest.mark.slow
def test_log_metric_is_averaged_over_the_ranks_under_torchrun(toy_cache, tmp_path):
    """2 ranks: my_metric is the mean of both ranks' values (rank 0: global_step + 5, rank 1: 100 more); a name
    that only rank 1 logs is its mean there, and every rank still joined the same collectives (no hang)."""
    out = tmp_path / "ddp"
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--eval-prompts", "0",
                        "--print-every", "1000", "--judge", "toy_gold", "--reward", f"{TRL}:logs_metrics"],
                cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["my_metric"] for r in rows] == [55.0, 57.0] and [r["rank1_only"] for r in rows] == [7.0, 7.0]
