"""eval.py: seed aggregation against hand-computed t intervals, the golden win rate on hand-made rewards, the
Pareto fit recovering a known quadratic, curve alignment and bands on synthetic logs, the exports' exact
formats and the benchmark loaders, sweep detection around a base run, checkpoint curves, the timing table, greedy
decoding, and dar.py (2 seeds) -> eval.py end to end with checkpoints and exports."""
import csv
import json
import math
import os
import re
import select
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch

import config
import data
import eval as ev
import infra
import judge
import loop
import rollout
import tasks
from conftest import ROOT, TINY, run_dar


# ---------------------------------------------------------------------------------------------------
# Aggregation over seeds
# ---------------------------------------------------------------------------------------------------
def test_aggregate_seeds_uses_t_with_n_minus_1_degrees_of_freedom():
    reports = [{"win_rate": 0.5, "kl": 1.0, "judge": "toy_gold", "flag": True},
               {"win_rate": 0.6, "kl": 2.0, "judge": "toy_gold", "flag": False},
               {"win_rate": 0.7, "kl": 6.0, "judge": "toy_gold", "flag": True}]
    agg = ev.aggregate_seeds(reports)
    assert set(agg) == {"win_rate", "kl"}  # strings and booleans are not aggregated
    # n = 3: t_{0.975, 2} = 4.303; sd of (0.5, 0.6, 0.7) = 0.1; of (1, 2, 6) = sqrt(7)
    assert agg["win_rate"]["mean"] == pytest.approx(0.6)
    assert agg["win_rate"]["ci"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert agg["kl"]["mean"] == pytest.approx(3.0)
    assert agg["kl"]["ci"] == pytest.approx(4.303 * math.sqrt(7) / math.sqrt(3))
    assert agg["kl"]["n"] == 3


def test_aggregate_seeds_leaves_nan_out_and_t_table():
    agg = ev.aggregate_seeds([{"x": 1.0}, {"x": math.nan}, {"x": 3.0}])
    assert agg["x"]["n"] == 2 and agg["x"]["mean"] == pytest.approx(2.0)
    assert agg["x"]["ci"] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))  # df = 1
    assert math.isnan(ev.aggregate_seeds([{"x": 1.0}])["x"]["ci"])
    assert ev.t975(2) == 4.303 and ev.t975(30) == 2.042
    assert ev.t975(40) == pytest.approx(2.021, abs=1e-3) and ev.t975(120) == pytest.approx(1.980, abs=1e-3)


# ---------------------------------------------------------------------------------------------------
# Golden-reward win rate (IS-DPO appendix): every sample against the prompt's reference
# ---------------------------------------------------------------------------------------------------
def test_golden_win_rate_on_hand_made_rewards():
    samples = [[10.0, 5.0], [10.0, 10.0], [math.nan, 2.0]]
    refs = [5.0, 10.0, 3.0]
    # valid pairs: win, tie | tie, tie | (invalid), loss -> (1 + .5 + .5 + .5 + 0) / 5
    mean, ci = ev.golden_win_rate(samples, refs)
    assert mean == pytest.approx(0.5)
    per_prompt = np.array([0.75, 0.5, 0.0])
    assert ci == pytest.approx(1.96 * per_prompt.std(ddof=1) / math.sqrt(3))
    assert ev.golden_win_rate([[1.0], [0.0]], [0.0, 1.0])[0] == pytest.approx(0.5)
    assert math.isnan(ev.golden_win_rate([[math.nan]], [1.0])[0])


def test_alpha_kl_mixes_the_two_k3_estimates():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    logp_0 = torch.tensor([[-1.5, -1.0], [-0.7, -3.0]])
    logp_prev = torch.tensor([[-1.1, -2.2], [-0.4, -0.1]])
    mask = torch.tensor([[1, 1], [1, 0]])
    kl0, klp = loop.k3(logp, logp_0, mask), loop.k3(logp, logp_prev, mask)
    assert torch.allclose(ev.alpha_kl(logp, logp_0, logp_prev, mask, 0.1), 0.1 * kl0 + 0.9 * klp)
    assert torch.allclose(ev.alpha_kl(logp, logp_0, logp_prev, mask, 1.0), kl0)
    d = -0.5  # row 0 token 0 vs pi_0: exp(d) - 1 - d
    assert kl0[1].item() == pytest.approx(math.expm1(-0.2) + 0.2)  # masked token left out
    assert kl0[0].item() == pytest.approx(math.expm1(d) - d + math.expm1(1.0) - 1.0)


# ---------------------------------------------------------------------------------------------------
# Pareto frontier, ablation, curves
# ---------------------------------------------------------------------------------------------------
def test_pareto_fit_recovers_a_known_quadratic(tmp_path):
    kl = np.linspace(0.0, 2.0, 6)
    points = [dict(algo="dar", beta=b, kl=x, reward=-2 * x**2 + 3 * x + 1) for b, x in zip(range(6), kl)]
    points += [dict(algo="ppo", beta=b, kl=x, reward=0.5 * x + 2) for b, x in zip(range(4), kl)]
    points += [dict(algo="rloo", beta=0.1, kl=1.0, reward=1.0)]  # too few points for a fit
    fits = ev.pareto(points, str(tmp_path))
    assert np.allclose(fits["dar"], [-2, 3, 1])
    assert np.allclose(fits["ppo"], [0, 0.5, 2], atol=1e-9)
    assert "rloo" not in fits
    assert os.path.getsize(tmp_path / "pareto.png") > 1000
    rows = list(csv.DictReader(open(tmp_path / "pareto.csv")))
    assert sum(r["row"] == "point" for r in rows) == 11 and sum(r["row"] == "fit" for r in rows) == 2


def fake_report(algo, seed, win, **settings):
    cfg = dict(config.Config().__dict__, algo=algo, seed=seed, **settings)
    return {"win_rate": win, "kl_pi0": 0.1, "policy/reward": win, "run": {"config": cfg, "seed": seed}}


def test_ablation_plot_and_sweep_detection(tmp_path):
    runs = [fake_report("dar", s, w, alpha=a) for a, ws in ((0.0, (0.5, 0.7)), (0.1, (0.8, 0.9))) for s, w in
            enumerate(ws)]
    res = ev.ablation_plot(runs, "alpha", str(tmp_path))
    assert set(res) == {"win_rate", "policy/reward", "kl_pi0"}  # the metrics the reports have
    (v0, m0, c0, n0), (v1, m1, c1, n1) = res["win_rate"]["dar"]
    assert (v0, v1, n0, n1) == (0.0, 0.1, 2, 2)
    assert m0 == pytest.approx(0.6) and c0 == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert os.path.isfile(tmp_path / "ablation_alpha.png") and os.path.isfile(tmp_path / "ablation_alpha.csv")
    found = ev.sweeps(runs + [fake_report("ppo", s, 0.5, beta=b) for b in (0.01, 0.03) for s in (0, 1)])
    assert set(found["ablation"]) == {"alpha", "beta"} and set(found["pareto"]) == {"ppo"}
    two = ev.sweeps([fake_report("dar", 0, 0.5, alpha=0.1, beta=0.05), fake_report("dar", 0, 0.5, alpha=0.3, beta=0.1)])
    assert two == {"pareto": {}, "ablation": {}}  # two parameters change at once: no ablation


def test_sweeps_around_one_base_run():
    """The ablation grids: one base run and one-parameter sweeps around it; K brings online_batch along."""
    base = dict(alpha=0.5, beta=0.5, k=4, online_batch=256, w_clip=20.0)
    grid = [dict(base)] + [dict(base, alpha=a) for a in (0.0, 0.9)] + [dict(base, beta=2.0)] \
        + [dict(base, k=k, online_batch=64 * k) for k in (2, 8)] + [dict(base, w_clip=c) for c in (2.0, 5.0)] \
        + [dict(base, alpha=0.0, beta=2.0)]  # off every sweep: two changes
    reports = [fake_report("dar", s, 0.5, **c) for c in grid for s in (0, 1)]
    found = ev.sweeps(reports)
    values = {p: sorted({r["run"]["config"][p] for r in rs}) for p, rs in found["ablation"].items()}
    assert values == {"alpha": [0.0, 0.5, 0.9], "beta": [0.5, 2.0], "k": [2, 4, 8], "w_clip": [2.0, 5.0, 20.0]}
    assert all(len(rs) == 2 * len(values[p]) for p, rs in found["ablation"].items())  # base counted, 2 seeds each
    assert {r["run"]["config"]["alpha"] for r in found["pareto"]["dar"]} == {0.5}
    # the base run saved before newer fields existed (its config lacks them) still counts in every sweep
    older = [dict(r, run=dict(r["run"], config={k: v for k, v in r["run"]["config"].items()
                                                if k not in ("judge_log", "pair_labels")})) for r in reports[:2]]
    found = ev.sweeps(older + reports[2:])
    assert {p: sorted({r["run"]["config"][p] for r in rs}) for p, rs in found["ablation"].items()} == values


def test_labels_name_what_differs_from_the_base_run():
    base = dict(alpha=0.5, beta=0.5, k=4, online_batch=256)
    configs = [dict(config.Config().__dict__, **c) for c in
                  (base, dict(base, alpha=0.0), dict(base, alpha=0.9), dict(base, k=8, online_batch=512))]
    assert [ev.experiment_label(c, configs) for c in configs] == [
        "dar", "dar alpha=0", "dar alpha=0.9", "dar k=8 online_batch=512"]
    two = configs[:2]  # no usual value: both show theirs
    assert [ev.experiment_label(c, two) for c in two] == ["dar alpha=0.5", "dar alpha=0"]


def test_an_older_run_is_the_same_experiment_when_what_changed_is_unused_or_was_its_behaviour():
    """A DAR run saved with is_clip 1 (the older default, never read by DAR) and without fields added since
    (reward_token_id; pair_labels, read by online DAP only) groups with today's DAR runs; an IS-DPO run with
    is_clip 1 is another experiment, and so is a DAR run saved before --logp-temperature (log-probs at 1)."""
    now = dict(config.Config().__dict__)
    old = {k: v for k, v in dict(now, is_clip=1.0).items() if k not in ("reward_token_id", "pair_labels")}
    assert ev.experiment_key(old) == ev.experiment_key(now)
    assert ev.experiment_label(old, [now, now, old]) == "dar"
    assert ev.experiment_key(dict(now, algo="is_dpo", is_clip=1.0)) != ev.experiment_key(dict(now, algo="is_dpo"))
    older = {k: v for k, v in old.items() if k != "logp_temperature"}
    assert ev.experiment_label(older, [now, now, older]) == "dar logp_temperature=1"


def test_group_runs_counts_a_seed_once(capsys):
    reports = [fake_report("dar", 0, 0.5), fake_report("dar", 0, 0.7), fake_report("dar", 1, 0.9)]
    groups = ev.group_runs(reports, lambda r: r["run"]["config"])
    assert [r["win_rate"] for r in groups["dar"]] == [0.5, 0.9]
    assert "seed 0" in capsys.readouterr().out


def write_run(root, name, settings, rows):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(config.Config().__dict__, **settings)))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


# a --sample-every table in a metrics.jsonl row: no number, which the curves and the timing table pass over
SAMPLES = {"samples": [{"prompt": "p", "response": "r", "reward": 1.0, "my_column": "x"}]}


def test_curves_align_steps_and_band_over_seeds(tmp_path):
    runs = [write_run(tmp_path, "dar-s0", dict(seed=0), [{"step": s, "train/reward_mean": s, "train/kl_pi0": 0.0,
                                                          **SAMPLES} for s in (1, 2, 3)]),
            write_run(tmp_path, "dar-s1", dict(seed=1), [{"step": s, "train/reward_mean": s + 2, "train/kl_pi0": 0.0}
                                                          for s in (1, 2)]),  # seed 1 stopped early
            write_run(tmp_path, "grpo-s0", dict(algo="grpo", seed=0),
                      [{"step": s, "train/reward_mean": 1.0, "train/kl_pi0": 0.5} for s in (1, 2, 3)])]
    out = tmp_path / "out"
    res = ev.curves(runs, str(out))
    assert set(res) == {"dar", "grpo"}
    steps, mean, ci = res["dar"]["train/reward_mean"]
    assert steps.tolist() == [1, 2]  # only the steps both seeds logged
    assert mean.tolist() == [2.0, 3.0]
    assert ci == pytest.approx([12.706 * math.sqrt(2) / math.sqrt(2)] * 2)  # sd of (s, s + 2) = sqrt(2)
    assert res["grpo"]["train/kl_pi0"][0].tolist() == [1, 2, 3] and math.isnan(res["grpo"]["train/kl_pi0"][2][0])
    rows = list(csv.DictReader(open(out / "curves.csv")))
    assert len(rows) == 2 * 2 + 2 * 3 and rows[0]["experiment"] == "dar"
    assert os.path.getsize(out / "curves.png") > 1000


def ckpt_report(run_dir, seed, step, win, reward, pi0_reward):
    r = fake_report("dar", seed, win)
    r["policy/reward"], r["pi_0/reward"] = reward, pi0_reward
    r["run"].update(run_dir=run_dir, step=step)
    return r


def test_checkpoint_curves_start_at_pi0_and_band_over_seeds(tmp_path):
    reports = [ckpt_report("s0", 0, 10, 0.6, 9.0, 8.0), ckpt_report("s0", 0, 20, 0.7, 9.5, 8.0),
               ckpt_report("s1", 1, 10, 0.8, 9.2, 8.2), ckpt_report("s1", 1, 20, 0.9, 9.9, 8.2)]
    res = ev.checkpoint_curves(reports, str(tmp_path))
    steps, mean, ci = res["dar"]["win_rate"]
    assert steps.tolist() == [0, 10, 20]
    assert mean == pytest.approx([0.5, 0.7, 0.8]) and ci[0] == 0  # pi_0 against itself: 1/2 on every seed
    assert ci[1] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    steps, mean, _ = res["dar"]["policy/reward"]
    assert mean == pytest.approx([8.1, 9.1, 9.7])  # step 0: pi_0's own reward
    assert os.path.isfile(tmp_path / "eval_curves.csv") and os.path.getsize(tmp_path / "eval_curves.png") > 1000


def test_timing_table_medians_after_warmup(tmp_path):
    def rows(times):
        return [{"step": i + 1, "perf/seconds_per_batch": t, "perf/sample_s": t / 2, "perf/update_s": t / 4,
                 **SAMPLES} for i, t in enumerate(times)]
    runs = [write_run(tmp_path, "dar-s0", dict(seed=0), rows([100.0, 1.0, 2.0, 9.0])),  # 100: warm-up
            write_run(tmp_path, "dar-s1", dict(seed=1), rows([50.0, 4.0, 4.0, 4.0])),
            write_run(tmp_path, "ppo-s0", dict(algo="ppo", seed=0), rows([9.0, 6.0, 6.0]))]
    t = ev.timing_table(runs, str(tmp_path / "out"))
    assert t["dar"]["total"] == pytest.approx((2.0 + 4.0) / 2) and t["dar"]["n_runs"] == 2
    assert t["dar"]["sample"] == pytest.approx(1.5) and "judge" not in t["dar"]
    assert t["ppo"]["total"] == pytest.approx(6.0)
    assert len(list(csv.DictReader(open(tmp_path / "out" / "timing.csv")))) == 2


# ---------------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------------
def test_benchmark_loaders_read_the_files_and_name_bad_lines(tmp_path):
    alpaca = tmp_path / "alpaca_eval.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "output": "x", "generator": "gpt4", "dataset": "d"},
                                  {"instruction": "Count", "output": "y", "generator": "gpt4", "dataset": "d"}]))
    assert tasks.load_alpacaeval(str(alpaca)) == ["Say hi", "Count"]
    alpaca.write_text(json.dumps([{"instruction": "ok"}, {"output": "no instruction"}]))
    with pytest.raises(SystemExit, match="record 2 has no 'instruction'"):
        tasks.load_alpacaeval(str(alpaca))
    mt = tmp_path / "question.jsonl"
    mt.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["a", "b"]}) + "\n\n"
                  + json.dumps({"question_id": 82, "category": "math", "turns": ["c"]}) + "\n")
    assert [q["question_id"] for q in tasks.load_mtbench(str(mt))] == [81, 82]
    mt.write_text(json.dumps({"question_id": 81, "turns": ["a"]}) + "\n{broken\n")
    with pytest.raises(SystemExit, match=r"question.jsonl:2: not valid JSON"):
        tasks.load_mtbench(str(mt))
    with pytest.raises(SystemExit, match="not found"):
        tasks.load_mtbench(str(tmp_path / "missing.jsonl"))


def test_mtbench_answers_follow_the_conversation_and_category_temperatures(monkeypatch):
    calls = []

    def fake_answer(model, tok, convs, max_new_tokens, temperature, seed=0, batch_size=32):
        calls.append((temperature, convs))
        return [f"A{len(c)}@{temperature}:{c[-1]['content']}" for c in convs]
    monkeypatch.setattr(tasks, "answer", fake_answer)
    qs = [{"question_id": 1, "category": "writing", "turns": ["w1", "w2"]},
          {"question_id": 2, "category": "math", "turns": ["m1", "m2"]},
          {"question_id": 3, "category": "unknown", "turns": ["u1"]}]
    answers = tasks.mtbench_answers(None, None, qs, 16)
    assert answers == [["A1@0.7:w1", "A3@0.7:w2"], ["A1@0.0:m1", "A3@0.0:m2"], ["A1@0.7:u1"]]
    turn2_math = [c for t, cs in calls for c in cs if t == 0.0 and len(c) == 3][0]
    assert turn2_math[1] == {"role": "assistant", "content": "A1@0.0:m1"}  # turn 2 sees its own turn-1 answer
    assert sorted(t for t, _ in calls) == [0.0, 0.0, 0.7, 0.7]  # one call per (turn, temperature)


def test_export_alpacaeval_format(tmp_path):
    path = tmp_path / "outputs.json"
    tasks.export_alpacaeval(["Say hi", "Ünïcode?"], ["hi", "yes"], "dar-toy", str(path))
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"instruction": "Say hi", "output": "hi", "generator": "dar-toy"},
        {"instruction": "Ünïcode?", "output": "yes", "generator": "dar-toy"}]
    with pytest.raises(ValueError):
        tasks.export_alpacaeval(["a"], [], "g", str(path))


def test_export_mtbench_format(tmp_path):
    path = tmp_path / "dar.jsonl"
    tasks.export_mtbench([81, 82], [["t1", "t2"], ["u1", "u2"]], "dar-7b", str(path))
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(lines) == 2
    for line, qid, turns in zip(lines, (81, 82), (["t1", "t2"], ["u1", "u2"])):
        assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert line["question_id"] == qid and line["model_id"] == "dar-7b"
        assert line["choices"] == [{"index": 0, "turns": turns}]
        assert isinstance(line["answer_id"], str) and isinstance(line["tstamp"], float)
    assert lines[0]["answer_id"] != lines[1]["answer_id"]


# ---------------------------------------------------------------------------------------------------
# The paper's evaluation protocol (Tables 2-3, Fig. 3): a separate evaluator, the pairwise-preference headline,
# a seeded random 1,000 test prompts, the best checkpoint chosen on validation prompts
# ---------------------------------------------------------------------------------------------------
def test_the_evaluator_has_its_own_endpoint_model_and_key_and_falls_back_with_a_note():
    cfg = config.Config(eval_judge="llm", judge_url="http://annotator/v1", judge_model="qwen2-72b",
                        eval_judge_url="http://evaluator/v1", eval_judge_model="gpt-4-turbo")
    e = ev.evaluator_config(cfg)
    assert (e.judge_url, e.judge_model, e.judge_api_key_env) == ("http://evaluator/v1", "gpt-4-turbo",
                                                                 "DAR_EVAL_JUDGE_API_KEY")
    assert cfg.judge_url == "http://annotator/v1" and ev.evaluator_note(cfg) is None  # the run's config untouched
    same = config.Config(eval_judge="llm", judge_url="http://annotator/v1")
    assert ev.evaluator_config(same) is same and "separate, stronger" in ev.evaluator_note(same)
    assert ev.evaluator_note(config.Config()) is None  # the toy rule evaluates: nothing to say
    # an evaluator endpoint alone is enough for --eval-judge llm; with neither, the error names both flags
    config.check_config(config.parse_config(["--eval-judge", "llm", "--eval-judge-url", "http://evaluator/v1"]), 1)
    with pytest.raises(SystemExit, match=re.escape("needs --eval-judge-url URL (or --judge-url)")):
        config.check_config(config.parse_config(["--eval-judge", "llm"]), 1)


def test_the_defaults_are_the_papers_1000_random_test_prompts_in_both_scripts():
    assert config.Config.eval_prompts == 1000 == ev.arg_parser().get_default("n_prompts")
    assert ev.arg_parser().get_default("seed") == config.Config.eval_seed
    assert all(d.get("eval_prompts", 1000) == 1000 for d in tasks.TASK_DEFAULTS.values())


def test_the_test_prompts_are_a_seeded_random_subset():
    task = tasks.toy_task()
    prompts, refs = data.random_subset(task.eval_prompts, 50, 1234, task.references)
    assert (prompts, refs) == data.random_subset(task.eval_prompts, 50, 1234, task.references)  # same seed, same
    assert prompts != task.eval_prompts[:50] and len(set(prompts)) == 50                  # not the first N
    assert prompts != data.random_subset(task.eval_prompts, 50, 7)[0]                          # another seed, another
    order = {p: i for i, p in enumerate(task.eval_prompts)}
    assert [order[p] for p in prompts] == sorted(order[p] for p in prompts)  # kept in the task's order
    assert all(r == tasks.toy_target(tasks.toy_word_of(p)) for p, r in zip(prompts, refs))  # references follow
    assert set(data.random_subset(task.eval_prompts, 20, 1234)[0]) <= set(prompts)            # nested in n
    assert data.random_subset(task.eval_prompts, 1000, 1234)[0] == task.eval_prompts           # capped: all 256


def test_validation_prompts_are_disjoint_from_test_and_training_data(tmp_path):
    task = tasks.toy_task()
    words = lambda ps: {tasks.toy_word_of(p) for p in ps}
    assert len(set(task.valid_prompts)) == tasks.TOY_VALID_PROMPTS
    assert not words(task.valid_prompts) & words(task.train_prompts + task.eval_prompts
                                                 + [p for p, *_ in task.sft_data + task.pref_data])
    # the paper's tasks: a hash-based 5% of the training prompts, held out with their demonstrations and pairs
    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: good {i}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: bad {i}"} for i in range(100)]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hh-reversed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    t = tasks.load_task("helpful", str(tmp_path / "hh.jsonl"))
    keys = lambda ps: {tasks.prompt_key(p) for p in ps}
    assert len(t.valid_prompts) == round(0.05 * 95)  # 5 test prompts held out first, then 5% of the other 95
    assert not keys(t.valid_prompts) & keys(t.train_prompts + t.eval_prompts
                                            + [p for p, *_ in t.sft_data + t.pref_data])
    assert len(t.train_prompts) + len(t.valid_prompts) + len(t.eval_prompts) == 100
    again = tasks.load_task("helpful", str(tmp_path / "hh-reversed.jsonl"))
    assert keys(again.valid_prompts) == keys(t.valid_prompts)  # chosen by the data, not by the file's order


def test_best_checkpoint_is_chosen_on_validation_not_on_test():
    def model(step, valid, test):
        return {"step": step, "valid/win_rate": valid, "win_rate": test, "run": {"step": step}}
    runs = [model(10, 0.6, 0.9), model(20, 0.7, 0.5), model(30, 0.7, 0.8), model(40, math.nan, 1.0)]
    assert ev.best_checkpoint(runs)["step"] == 20  # highest validation win rate, the earlier of a tie; NaN never
    assert ev.best_checkpoint([model(5, math.nan, 0.9)]) is None and ev.best_checkpoint([]) is None


def test_the_table_shows_final_and_best_side_by_side(tmp_path, capsys):
    pairs = []
    for seed, (final, best) in enumerate(((0.60, 0.70), (0.64, 0.76))):
        f = dict(fake_report("dar", seed, final), step=40, win_rate_from="reward_win_rate", **{
            "policy/missing_eos": 0.0})
        pairs.append((f, dict(f, win_rate=best, step=20)))
    pairs.append((dict(fake_report("dar", 0, 0.5, alpha=0.0), step=40, win_rate_from="reward_win_rate",
                       **{"policy/missing_eos": 0.0}), None))  # evaluated without --checkpoints: no best
    summary = ev.summarize(pairs)
    assert summary["dar alpha=0.1"]["win_rate"]["mean"] == pytest.approx(0.62)
    assert summary["dar alpha=0.1"]["best"]["win_rate"]["mean"] == pytest.approx(0.73)
    assert summary["dar alpha=0.1"]["best"]["win_rate"]["ci"] == pytest.approx(
        12.706 * math.sqrt(0.0018) / math.sqrt(2))
    assert summary["dar alpha=0"]["best"] == {}
    ev.print_table(summary)
    out = capsys.readouterr().out
    row = [l for l in out.splitlines() if l.startswith("dar alpha=0.1")][0]
    assert "62.0%" in row and "73.0%" in row and row.split()[-1] == "2"
    assert "win rate: final" in out and "validation prompts" in out
    ev.write_table(summary, str(tmp_path / "table.csv"))
    rows = {r["experiment"]: r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    assert float(rows["dar alpha=0.1"]["final win_rate"]) == pytest.approx(0.62)
    assert float(rows["dar alpha=0.1"]["best win_rate"]) == pytest.approx(0.73)
    assert float(rows["dar alpha=0.1"]["best step"]) == 20 and rows["dar alpha=0"]["best win_rate"] == ""


class SplitJudge:
    """An evaluator whose rewards favour the policy (its second call) and whose preference favours pi_0: the
    two win-rate definitions disagree completely, so the report shows which one is the headline."""
    top = None

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, responses, ended):
        self.calls += 1
        return judge.Judgment([float(self.calls == 2)] * len(prompts), 0)

    def prefer(self, prompts, a, b):
        return [0.0] * len(prompts)


@pytest.fixture(scope="module")
def random_toy_model(tmp_path_factory):
    """The toy Qwen2 with random weights (no SFT): (model, tokenizer), for evaluations whose judge is faked."""
    path = str(tmp_path_factory.mktemp("toy") / "m")
    tasks.build_toy_model(path, seed=0)
    return infra.load_model(path, config.Config(), torch.device("cpu")), infra.load_tokenizer(path)


@pytest.mark.slow
@pytest.mark.parametrize("eval_judge, headline", [("llm", 0.0), ("toy_gold", 1.0)])
def test_headline_win_rate_is_the_pairwise_preference_for_llm_evaluators(eval_judge, headline, random_toy_model,
                                                                         monkeypatch):
    model, tok = random_toy_model
    cfg = config.Config(judge="llm", eval_judge=eval_judge, max_new_tokens=4, micro_batch=4,
                        judge_url="http://annotator/v1", eval_judge_url="http://evaluator/v1")
    built = []
    fake = lambda name, task, cfg: built.append((name, cfg.judge_url)) or SplitJudge()
    monkeypatch.setattr(loop, "make_judge", fake)  # both judges: loop.eval_judge and loop.training_reward
    r = ev.compare_with_reference(model, model, tok, tasks.toy_prompts(4, seed=2), cfg, pairwise=False)
    assert (r["reward_win_rate"], r["pref_win_rate" if eval_judge == "llm" else "reward_win_rate"]) == (1.0, headline)
    assert r["win_rate"] == headline and r["win_rate_from"] == ev.headline_key(eval_judge)
    assert ("pref_win_rate" in r) == (eval_judge == "llm")  # an LLM evaluator is always asked for preferences
    # the evaluator is built from --eval-judge-url; the annotator (--judge-url) is another judge, reported beside
    assert built == [(eval_judge, "http://evaluator/v1"), ("llm", "http://annotator/v1")]
    assert r["train_judge"] == ("llm annotator" if eval_judge == "llm" else "llm")


@pytest.mark.parametrize("greedy, temperature, expected", [(False, 0.9, 0.9), (False, 0.7, 0.7), (True, 0.9, 1.0)])
def test_evaluation_kl_is_of_the_models_at_the_sampling_temperature(greedy, temperature, expected, random_toy_model,
                                                                    monkeypatch):
    """The KL is estimated on the policy's samples at the evaluation's temperature, with the log-probs of pi_theta
    and pi_0 at that temperature too (1 for greedy decoding), and the report says which."""
    model, tok = random_toy_model
    cfg = config.Config(eval_judge="toy_gold", max_new_tokens=4, micro_batch=4)
    scored, real = [], ev.score
    monkeypatch.setattr(ev, "score", lambda m, batch, *a, **k: scored.append(batch.temperature) or real(m, batch, *a, **k))
    r = ev.compare_with_reference(model, model, tok, tasks.toy_prompts(4, seed=2), cfg, greedy=greedy,
                                  temperature=temperature, pairwise=False)
    assert r["kl_temperature"] == expected and scored[-2:] == [expected, expected]
    assert r["kl_pi0"] == pytest.approx(0.0, abs=1e-6)  # the policy is pi_0 here


def serve_annotator(*flags):
    """A `judge.py --serve --task toy` on a free port: (process, base URL)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "judge.py"), "--serve", "--task", "toy", "--port", "0",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    m = re.search(r"http://\S+/v1", proc.stdout.readline() if ready else "")
    assert m, "the annotator server did not start"
    return proc, m.group(0)


@pytest.mark.slow
def test_llm_evaluation_asks_the_evaluator_endpoint_in_dar_and_eval(toy_cache, tmp_path):
    """dar.py with --eval-judge llm on the toy task: the served evaluator (not the annotator's --judge-url, which
    is unreachable here and unused by toy_gold training) judges by pairwise preference, with its own key; eval.py
    --eval-judge-url sends the same run's evaluation to another endpoint."""
    servers = [serve_annotator("--record") for _ in range(2)]
    try:
        (_, first), (_, second) = servers
        out = tmp_path / "run"
        env = {"DAR_EVAL_JUDGE_API_KEY": "sk-eval", "DAR_JUDGE_API_KEY": "sk-annotator"}
        p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "1", "--print-every", "1000",
                            "--eval-prompts", "8", "--eval-judge", "llm", "--eval-judge-url", first,
                            "--judge-url", "http://127.0.0.1:9/v1"], cwd=tmp_path, env_extra=env)
        assert p.returncode == 0, p.stderr[-3000:]
        r = json.load(open(out / "eval.json"))
        assert r["win_rate_from"] == "pref_win_rate" and r["win_rate"] == r["pref_win_rate"]
        assert r["evaluator"] == "toy-gold" and r["pref_invalid"] == 0
        assert "pairwise preference" in p.stdout
        last = json.load(urllib.request.urlopen(first.replace("/v1", "/debug/last"), timeout=5))
        assert last["authorization"] == "Bearer sk-eval" and "Preferred Response" in last["request"]
        res = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), str(out), "--out", str(tmp_path / "ev"),
                              "--n-prompts", "8", "--eval-judge-url", second],
                             cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        again = json.load(open(tmp_path / "ev" / "run.json"))
        asked = json.load(urllib.request.urlopen(second.replace("/v1", "/debug/last"), timeout=5))["requests"]
        assert asked >= 2 * 8 and again["win_rate"] == r["win_rate"]  # the same prompts, samples and judgments
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(10)


# ---------------------------------------------------------------------------------------------------
# Models: greedy decoding, and the whole pipeline
# ---------------------------------------------------------------------------------------------------
def test_greedy_decoding_ignores_the_seed(toy_cache):
    cfg = config.parse_config(["--cache-dir", toy_cache] + TINY)
    _, sft = loop.toy_paths(cfg)
    path = os.path.join(sft, "final")
    model, tok = infra.load_model(path, cfg, torch.device("cpu")), infra.load_tokenizer(path)
    prompts = tasks.toy_task().eval_prompts[:6]
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outs.append(rollout.generate(model, tok, prompts, 1, 12, 0.9, greedy=True).responses)
    assert outs[0] == outs[1] and len(outs[0]) == 6


@pytest.mark.slow
def test_dar_then_eval_end_to_end(toy_cache, tmp_path, monkeypatch, capsys):
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"toy-dar-s{seed}"
        p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--save-every", "1",
                            "--seed", str(seed), "--print-every", "1000", "--judge", "toy_proxy"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(str(out))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (tmp_path / "alpaca_eval.json").write_text(json.dumps([{"instruction": "reverse: abc"}, {"instruction": "hi"}]))
    (tmp_path / "question.jsonl").write_text(
        json.dumps({"question_id": 81, "category": "writing", "turns": ["reverse: abc", "and: xyz"]}) + "\n")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *runs, "--out", str(tmp_path / "ev"),
                          "--n-prompts", "16", "--checkpoints", "--alpacaeval", "alpaca_eval.json",
                          "--mtbench", "question.jsonl"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "win rate" in res.stdout and "seeds" in res.stdout and "s/batch" in res.stdout
    table = [l for l in res.stdout.splitlines() if l.startswith("dar ")]
    assert len(table) == 2 and table[0].split()[-1] == "2"  # one experiment, two seeds (and its timing row)
    ev_dir = tmp_path / "ev"
    for f in ("toy-dar-s0.json", "toy-dar-s1.json", "summary.json", "curves.csv", "curves.png", "eval_curves.csv",
              "eval_curves.png", "timing.csv"):
        assert os.path.isfile(ev_dir / f), f
    alpaca = json.load(open(ev_dir / "toy-dar-s0-alpacaeval.json"))
    assert [a["instruction"] for a in alpaca] == ["reverse: abc", "hi"] and alpaca[0]["generator"] == "toy-dar-s0"
    (mt,) = [json.loads(l) for l in open(ev_dir / "toy-dar-s1-mtbench.jsonl")]
    assert mt["question_id"] == 81 and len(mt["choices"][0]["turns"]) == 2
    steps = {int(r["step"]) for r in csv.DictReader(open(ev_dir / "eval_curves.csv"))}
    assert steps == {0, 1, 2}  # pi_0, ckpt-000001, final/ (= ckpt-000002, evaluated once)
    r = json.load(open(ev_dir / "toy-dar-s0.json"))
    assert [c["run"]["step"] for c in r["checkpoints"]] == [1]
    assert r["train_judge"] == "toy_proxy" and r["policy/train_judge_reward"] >= 0  # trained on the proxy
    assert r["n_prompts"] == 16 and r["run"]["step"] == 2 and r["run"]["seed"] == 0
    # dar.py's end-of-run report drew the same random test prompts (TINY: --eval-prompts 16) and got the same numbers
    at_end = json.load(open(os.path.join(runs[0], "eval.json")))
    for k in ("prompts_sha256", "win_rate", "reward_win_rate", "pref_win_rate", "pi_0/reward", "policy/reward"):
        assert at_end[k] == r[k], k
    # the best checkpoint: chosen on the validation prompts among ckpt-000001 and final/, reported beside final
    assert r["best_step"] in (1, 2) and 0 <= r["valid/win_rate"] <= 1 and r["valid/n_prompts"] == 16
    assert "best" in res.stdout and "validation prompts" in res.stdout
    table_csv = list(csv.DictReader(open(ev_dir / "table.csv")))
    assert len(table_csv) == 1 and float(table_csv[0]["best step"]) in (1.0, 1.5, 2.0)
    for k in ("win_rate", "reward_win_rate", "pref_win_rate", "golden/win_rate", "pi_0/missing_eos",
              "policy/missing_eos"):
        assert 0 <= r[k] <= 1, k
    assert 0 <= r["policy/reward"] <= 10 and r["kl_pi0"] >= 0 and r["kl_prev"] >= 0
    assert r["kl_alpha/prev_step"] == 1  # the previous kept checkpoint of final/ (step 2) is ckpt-000001
    assert r["kl_alpha"] == pytest.approx(0.1 * r["kl_pi0"] + 0.9 * r["kl_prev"], rel=1e-6)
    assert r["golden/samples_per_prompt"] == 2 and r["golden/reference_reward"] == 10.0
    summary = json.load(open(ev_dir / "summary.json"))
    assert summary["dar"]["seeds"] == [0, 1] and summary["dar"]["win_rate"]["n"] == 2
    assert 0 <= summary["dar"]["win_rate"]["mean"] <= 1 and summary["dar"]["win_rate"]["ci"] >= 0
    # --reuse redraws from the saved evaluations (same settings) without evaluating a model again
    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a, **k: pytest.fail("evaluated again"))
    os.remove(ev_dir / "summary.json")
    ev.main([*runs, "--out", str(ev_dir), "--n-prompts", "16", "--checkpoints", "--reuse"])
    assert json.load(open(ev_dir / "summary.json")) == summary
    with pytest.raises(pytest.fail.Exception, match="evaluated again"):  # other settings: evaluated again
        ev.main([*runs, "--out", str(ev_dir), "--n-prompts", "4", "--checkpoints", "--reuse"])


def test_distinct_n_counts_repeated_ngrams():
    from loop import distinct_n
    assert distinct_n(["the cat sat", "a dog ran"], 1) == 1.0
    assert distinct_n(["great great great!!!"], 1) == pytest.approx(2 / 4)    # great x3, !!!
    assert distinct_n(["great great great!!!"], 2) == pytest.approx(2 / 3)    # (great great) x2, (great !!!)
    assert distinct_n(["Great GREAT", "great"], 1) == pytest.approx(1 / 3)    # lowercased, across responses
    assert math.isnan(distinct_n(["one", ""], 2))                             # no bigram at all


def test_evaluation_reports_distinct_n_of_each_models_responses(random_toy_model, monkeypatch):
    """With the TextBlob judge (--task sentiment's evaluator): distinct-1/2 of exactly the responses it scored."""
    model, tok = random_toy_model
    cfg = config.Config(judge="vader", eval_judge="textblob", max_new_tokens=6, micro_batch=4)
    seen, real = [], loop.make_judge

    def recording(name, task, c):
        j = real(name, task, c)
        if name != "textblob":
            return j
        return RecordingJudge(j, seen)
    monkeypatch.setattr(loop, "make_judge", recording)  # both judges: loop.eval_judge and loop.training_reward
    r = ev.compare_with_reference(model, model, tok, tasks.toy_prompts(6, seed=2), cfg, pairwise=False)
    assert len(seen) == 2 and r["train_judge"] == "vader"
    for name, responses in zip(("pi_0", "policy"), seen):
        for n in (1, 2):
            assert r[f"{name}/distinct{n}"] == ev.distinct_n(responses, n)


class RecordingJudge:
    """A judge that keeps the responses it was asked to score."""

    def __init__(self, judge, seen):
        self.judge, self.seen, self.top = judge, seen, judge.top

    def __call__(self, prompts, responses, ended):
        self.seen.append(list(responses))
        return self.judge(prompts, responses, ended)
