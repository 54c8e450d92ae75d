"""eval.py: seed aggregation against hand-computed t intervals, the golden win rate on hand-made rewards, the
Pareto fit recovering a known quadratic, curve alignment and bands on synthetic logs, the exports' exact
formats, greedy decoding, and dar.py (2 seeds) -> eval.py end to end."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dar
import eval as ev
import rollout
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
    kl0, klp = dar.k3(logp, logp_0, mask), dar.k3(logp, logp_prev, mask)
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


def fake_report(algo, seed, win, **config):
    cfg = dict(dar.Config().__dict__, algo=algo, seed=seed, **config)
    return {"win_rate": win, "kl_pi0": 0.1, "policy/reward": win, "run": {"config": cfg, "seed": seed}}


def test_ablation_plot_and_sweep_detection(tmp_path):
    runs = [fake_report("dar", s, w, alpha=a) for a, ws in ((0.0, (0.5, 0.7)), (0.1, (0.8, 0.9))) for s, w in
            enumerate(ws)]
    res = ev.ablation_plot(runs, "alpha", str(tmp_path))
    (v0, m0, c0, n0), (v1, m1, c1, n1) = res["dar"]
    assert (v0, v1, n0, n1) == (0.0, 0.1, 2, 2)
    assert m0 == pytest.approx(0.6) and c0 == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert os.path.isfile(tmp_path / "ablation_alpha.png") and os.path.isfile(tmp_path / "ablation_alpha.csv")
    found = ev.sweeps(runs + [fake_report("ppo", s, 0.5, beta=b) for b in (0.01, 0.03) for s in (0, 1)])
    assert set(found["ablation"]) == {"alpha", "beta"} and set(found["pareto"]) == {"ppo"}
    two = ev.sweeps([fake_report("dar", 0, 0.5, alpha=0.1, beta=0.05), fake_report("dar", 0, 0.5, alpha=0.3, beta=0.1)])
    assert two == {"pareto": {}, "ablation": {}}  # two parameters change at once: no ablation


def write_run(root, name, config, rows):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(dar.Config().__dict__, **config)))
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


# ---------------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------------
def test_export_alpacaeval_format(tmp_path):
    path = tmp_path / "outputs.json"
    ev.export_alpacaeval(["Say hi", "Ünïcode?"], ["hi", "yes"], "dar-toy", str(path))
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"instruction": "Say hi", "output": "hi", "generator": "dar-toy"},
        {"instruction": "Ünïcode?", "output": "yes", "generator": "dar-toy"}]
    with pytest.raises(ValueError):
        ev.export_alpacaeval(["a"], [], "g", str(path))


def test_export_mtbench_format(tmp_path):
    path = tmp_path / "dar.jsonl"
    ev.export_mtbench([81, 82], [["t1", "t2"], ["u1", "u2"]], "dar-7b", str(path))
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
    import tasks
    cfg = dar.parse_config(["--cache-dir", toy_cache] + TINY)
    _, sft = dar.toy_paths(cfg)
    path = os.path.join(sft, "final")
    model, tok = dar.load_model(path, cfg, torch.device("cpu")), dar.load_tokenizer(path)
    prompts = tasks.toy_task().eval_prompts[:6]
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outs.append(rollout.generate(model, tok, prompts, 1, 12, 0.9, greedy=True).responses)
    assert outs[0] == outs[1] and len(outs[0]) == 6


def test_dar_then_eval_end_to_end(toy_cache, tmp_path):
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"toy-dar-s{seed}"
        p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--save-every", "1",
                            "--seed", str(seed), "--print-every", "1000"], cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(str(out))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *runs, "--out", str(tmp_path / "ev"),
                          "--n-prompts", "8"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "win rate" in res.stdout and "seeds" in res.stdout
    table = [l for l in res.stdout.splitlines() if l.startswith("dar ")]
    assert len(table) == 1 and table[0].split()[-1] == "2"  # one experiment, two seeds
    ev_dir = tmp_path / "ev"
    for f in ("toy-dar-s0.json", "toy-dar-s1.json", "summary.json", "curves.csv", "curves.png"):
        assert os.path.isfile(ev_dir / f), f
    r = json.load(open(ev_dir / "toy-dar-s0.json"))
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
