"""eval.py: seed aggregation against hand-computed t intervals, the golden win rate on hand-made rewards, the
Pareto fit recovering a known quadratic, curve alignment and bands on synthetic logs, the exports' exact
formats and the benchmark loaders, sweep detection around a base run, checkpoint curves, the timing table, greedy
decoding, and dar.py (2 seeds) -> eval.py end to end with checkpoints and exports."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import config
import eval as ev
import infra
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


def test_labels_name_what_differs_from_the_base_run():
    base = dict(alpha=0.5, beta=0.5, k=4, online_batch=256)
    configs = [dict(config.Config().__dict__, **c) for c in
                  (base, dict(base, alpha=0.0), dict(base, alpha=0.9), dict(base, k=8, online_batch=512))]
    assert [ev.experiment_label(c, configs) for c in configs] == [
        "dar", "dar alpha=0", "dar alpha=0.9", "dar k=8 online_batch=512"]
    two = configs[:2]  # no usual value: both show theirs
    assert [ev.experiment_label(c, two) for c in two] == ["dar alpha=0.5", "dar alpha=0"]


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


def test_curves_align_steps_and_band_over_seeds(tmp_path):
    runs = [write_run(tmp_path, "dar-s0", dict(seed=0), [{"step": s, "train/reward_mean": s, "train/kl_pi0": 0.0}
                                                          for s in (1, 2, 3)]),
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
        return [{"step": i + 1, "perf/seconds_per_batch": t, "perf/sample_s": t / 2, "perf/update_s": t / 4}
                for i, t in enumerate(times)]
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
                          "--n-prompts", "8", "--checkpoints", "--alpacaeval", "alpaca_eval.json",
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
    assert r["n_prompts"] == 8 and r["run"]["step"] == 2 and r["run"]["seed"] == 0
    for k in ("win_rate", "pref_win_rate", "golden/win_rate", "pi_0/missing_eos", "policy/missing_eos"):
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
    ev.main([*runs, "--out", str(ev_dir), "--n-prompts", "8", "--checkpoints", "--reuse"])
    assert json.load(open(ev_dir / "summary.json")) == summary
    with pytest.raises(pytest.fail.Exception, match="evaluated again"):  # other settings: evaluated again
        ev.main([*runs, "--out", str(ev_dir), "--n-prompts", "4", "--checkpoints", "--reuse"])
