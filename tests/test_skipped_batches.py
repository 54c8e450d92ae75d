"""An online batch with nothing to learn from (issue 17): with --max-invalid-frac 1.0 a batch whose judgments are
all invalid, or that leaves an algorithm no usable unit (a prompt with 2 valid judgments for RLOO and GRPO, a
pair with a preference for the online DAP methods), is reported and skipped without an update, for every online
algorithm, on every rank together; a partly invalid batch still trains, and --resume across a skipped batch
ends where an uninterrupted run ends."""
import math
import subprocess

import pytest
import torch

import config
import infra
import judge
import loop
import tasks
from conftest import ROOT, TINY, TORCHRUN, comparable, dar_env, read_metrics, train

ONLINE = [a for a in config.ALGOS if a not in config.OFFLINE]


def params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


class InvalidJudge:
    """The toy gold judge, whose judgments are invalid where invalid(index in the batch, prompts) says so (a
    reward as NaN; a preference when either response of the pair is)."""

    def __init__(self, invalid):
        self.gold, self.invalid = judge.make_judge("toy_gold"), invalid

    def __call__(self, prompts, responses, ended):
        r = self.gold(prompts, responses, ended).rewards
        r = [math.nan if self.invalid(i, prompts) else x for i, x in enumerate(r)]
        return judge.Judgment(r, sum(map(math.isnan, r)), {"no score in the reply": sum(map(math.isnan, r))})

    def prefer(self, prompts, responses_a, responses_b):
        p = self.gold.prefer(prompts, responses_a, responses_b)
        return [math.nan if self.invalid(2 * i, prompts) or self.invalid(2 * i + 1, prompts) else x
                for i, x in enumerate(p)]


def run_with(judge_, monkeypatch, toy_cache, out, algo, steps, *flags):
    cfg = config.parse_config(TINY + ["--algo", algo, "--steps", str(steps), "--cache-dir", toy_cache,
                                      "--out-dir", str(out), "--print-every", "1000", "--save-every", "1",
                                      "--judge", "toy_gold", "--max-invalid-frac", "1.0", *flags])
    config.check_config(cfg, 1)
    monkeypatch.setattr(loop, "make_judge", lambda *a, **k: judge_)
    return train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ONLINE)
def test_a_batch_of_only_invalid_judgments_is_skipped_without_an_update(algo, toy_cache, tmp_path, monkeypatch,
                                                                        capsys):
    out = tmp_path / algo
    run = run_with(InvalidJudge(lambda i, prompts: True), monkeypatch, toy_cache, out, algo, 2)
    assert torch.equal(params(run.policy), params(run.ref))             # bit for bit pi_0
    assert not run.opt.state and run.sched.last_epoch == 0              # no optimizer step, no schedule step
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/skipped"] == 1 for r in rows)
    assert all(r["train/invalid_frac"] == 1.0 for r in rows) and "train/loss" not in rows[0]
    printed = capsys.readouterr()
    prefs = algo in ("online_dpo", "ipo", "slic")                       # --pair-labels preference: the pairs decide
    what = "all 16 preference judgments are invalid" if prefs else "all 32 judgments are invalid"
    for step in (1, 2):
        assert f"online batch {step}: {what} (judge toy_gold); skipped without an update" in printed.out + printed.err
    assert rows[0]["pairs/invalid" if prefs else "train/invalid_judgments"] == (16 if prefs else 32)
    assert "Traceback" not in printed.err
    assert (out / "ckpt-000002").is_dir() and (out / "final" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("algo, flags, skipped", [
    ("dar", [], False),                     # one valid response per prompt is still a weighted SFT example
    ("iter_sft", [], False),                # ... and a best of K
    ("grpo", [], True),                     # a group baseline needs 2 valid judgments of the prompt
    ("rloo", [], True),
    ("online_dpo", ["--pair-labels", "reward"], True),   # best and worst of K need 2 valid judgments
])
def test_a_batch_without_a_usable_group_or_pair_is_skipped(algo, flags, skipped, toy_cache, tmp_path, monkeypatch,
                                                           capsys):
    """One valid judgment per prompt (K = 4): 24 of 32 invalid."""
    run = run_with(InvalidJudge(lambda i, prompts: i % 4 != 0), monkeypatch, toy_cache, tmp_path, algo, 1, *flags)
    row = read_metrics(tmp_path)[0]
    assert row["train/skipped"] == int(skipped) and row["train/invalid_judgments"] == 24
    assert torch.equal(params(run.policy), params(run.ref)) == skipped
    printed = capsys.readouterr().out
    assert ("online batch 1: no prompt has 2 valid judgments" in printed) == skipped
    if skipped:
        assert "(24 of its 32 judgments invalid) (judge toy_gold); skipped without an update" in printed
    else:
        assert math.isfinite(row["train/loss"]) and row["train/invalid_frac"] == 0.75


@pytest.mark.slow
def test_a_skipped_batch_between_partly_invalid_ones_and_resume_across_it(toy_cache, tmp_path, monkeypatch):
    """Batches 1 and 3: every other judgment invalid (the run trains on the rest); batch 2: all invalid (skipped,
    its checkpoint holds the weights of batch 1). A run cut after the skipped batch and resumed ends as the
    uninterrupted one."""
    cfg = config.parse_config(TINY)
    n = len(tasks.load_task("toy").train_prompts)
    second = {tasks.load_task("toy").train_prompts[i]
              for i in loop.prompt_indices(1, cfg.online_batch // cfg.k, n, cfg.seed)}
    judge_ = InvalidJudge(lambda i, prompts: i % 2 == 1 or set(prompts) <= second)

    whole = run_with(judge_, monkeypatch, toy_cache, tmp_path / "whole", "dar", 3, "--keep-checkpoints", "3")
    rows = read_metrics(tmp_path / "whole")
    assert [r["train/skipped"] for r in rows] == [0, 1, 0]
    assert [r["train/invalid_judgments"] for r in rows] == [16, 32, 16]
    assert rows[1]["train/lr"] == rows[0]["train/lr"] < rows[2]["train/lr"]   # the warm-up waited for batch 3
    load = lambda step: params(infra.load_model(str(tmp_path / "whole" / f"ckpt-{step:06d}"), cfg, torch.device("cpu")))
    assert torch.equal(load(1), load(2)) and not torch.equal(load(2), load(3))
    assert not torch.equal(load(1), params(whole.ref))                      # batch 1 trained (partly invalid)

    run_with(judge_, monkeypatch, toy_cache, tmp_path / "cut", "dar", 2)
    resumed = run_with(judge_, monkeypatch, toy_cache, tmp_path / "cut", "dar", 3, "--resume")
    assert comparable(read_metrics(tmp_path / "cut")) == comparable(rows)
    assert torch.equal(params(resumed.policy), params(whole.policy))


# dar.py under torchrun with a judge patched in: rank 0's judgments of batch 1 all invalid, rank 1's valid (the
# batch is used: the counts are batch-wide); batch 2 all invalid on both ranks (both skip it together)
RANKED_JUDGE = """
import math, os, sys
sys.path.insert(0, {root!r})
import dar, judge, loop

class Judge:
    def __init__(self):
        self.gold, self.calls = judge.make_judge("toy_gold"), 0
    def __call__(self, prompts, responses, ended):
        self.calls += 1
        if self.calls == 1 and os.environ["RANK"] == "1":
            return self.gold(prompts, responses, ended)
        return judge.Judgment([math.nan] * len(prompts), len(prompts), {{"no score in the reply": len(prompts)}})

loop.make_judge = lambda *a, **k: Judge()
sys.argv = ["dar.py", *sys.argv[1:]]
dar.main()
"""


@pytest.mark.slow
def test_ranks_decide_on_the_batch_wide_counts_under_torchrun(toy_cache, tmp_path):
    script = tmp_path / "ranked_judge.py"
    script.write_text(RANKED_JUDGE.format(root=ROOT))
    out = tmp_path / "run"
    p = subprocess.run(TORCHRUN + [str(script), *TINY, "--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2",
                                   "--print-every", "1000", "--eval-prompts", "0", "--max-invalid-frac", "1.0",
                                   "--dist-timeout", "2"],
                       cwd=tmp_path, env=dar_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["train/skipped"] for r in rows] == [0, 1]
    assert [r["train/invalid_judgments"] for r in rows] == [16, 32]
    assert math.isfinite(rows[0]["train/loss"])
    assert "online batch 1:" not in p.stdout and p.stdout.count("online batch 2: all 32 judgments are invalid") == 1
    assert "parameters identical on all 2 ranks" in p.stdout
