"""Training end to end: one step moves the policy, SFT fits its data, dar.py runs (also under torchrun),
a killed run resumes to the same metrics, and bad input stops with a clear message."""
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
from transformers.optimization import Adafactor

import config
import dar
import infra
import loop
import rollout
import tasks
from conftest import ROOT, TINY, TORCHRUN, comparable, read_metrics, record_scales, run_dar, train


def tiny_cfg(toy_cache, out, *extra):
    return config.parse_config(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--print-every", "1000",
                                       *extra])


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_dar_step_changes_the_parameters(toy_cache, tmp_path):
    cfg = tiny_cfg(toy_cache, tmp_path / "run", "--steps", "1")
    _, sft = loop.toy_paths(cfg)
    before = params(infra.load_model(os.path.join(sft, "final"), cfg, torch.device("cpu")))
    run = train(cfg)
    policy, ref = run.policy, run.ref
    after = params(policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], v) for k, v in params(ref).items())  # pi_0 stays frozen


@pytest.mark.parametrize("algo", ["dar", "sft", "iter_sft"])
def test_losses_linear_in_log_pi_have_the_head_form_its_gradient_in_forward(algo, toy_cache, tmp_path, monkeypatch):
    """DAR's weighted SFT (Eq. 4), SFT and best-of-K SFT tell token_logps their per-sequence weights (seq_grad):
    every backward through the LM head finds the gradient it was told, up to the loss's one factor (the toy
    model's head is fusable, so none recomputes its logits)."""
    seen = record_scales(monkeypatch)
    train(tiny_cfg(toy_cache, tmp_path / algo, "--algo", algo, "--steps", "1"))
    assert seen and all(s is not None and s < 0 for s in seen), seen


@pytest.mark.slow
def test_sft_reduces_nll_on_its_data(toy_cache, tmp_path):
    cfg = tiny_cfg(toy_cache, tmp_path / "sft", "--algo", "sft", "--steps", "15", "--minibatch", "32")
    base, _ = loop.toy_paths(cfg)
    task = tasks.load_task("toy")
    pairs = task.sft_data[:64]
    tok = infra.load_tokenizer(base)
    batch = rollout.from_texts(tok, [p for p, _ in pairs], [r for _, r in pairs])

    def nll(model):
        with torch.no_grad():
            return -rollout.token_logps(model.eval(), batch).sum().item() / batch.response_mask.sum().item()

    before = nll(infra.load_model(base, cfg, torch.device("cpu")))
    policy = train(cfg).policy
    assert nll(policy) < before - 0.5, "15 SFT steps at lr 1e-3 should cut the per-token NLL of random init"


REQUIRED_KEYS = {"step", "train/reward_mean", "train/reward_std", "train/adv_mean", "train/adv_std",
                 "weights/w_reg_mean", "weights/w_adv_median", "weights/w_mean", "weights/clip_frac",
                 "train/loss", "train/grad_norm", "train/kl_pi0", "train/kl_pi_t", "train/response_len",
                 "train/missing_eos", "perf/tokens_per_s", "perf/seconds_per_batch", "train/invalid_judgments"}


@pytest.mark.slow
def test_dar_runs_end_to_end_in_a_subprocess(toy_cache, tmp_path):
    out = tmp_path / "run"
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "3"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert REQUIRED_KEYS <= set(rows[0]), REQUIRED_KEYS - set(rows[0])
    assert all(0 <= r["weights/clip_frac"] <= 1 and r["weights/w_mean"] > 0 for r in rows)
    report = json.load(open(out / "eval.json"))
    assert 0 <= report["win_rate"] <= 1 and report["n_prompts"] == 16
    assert "win rate of the policy over pi_0" in p.stdout
    assert os.path.isfile(out / "final" / "model.safetensors")


@pytest.mark.slow
def test_torchrun_two_ranks_keep_identical_parameters(toy_cache, tmp_path):
    out = tmp_path / "ddp"
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2"], cwd=tmp_path,
                launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in p.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 alone writes the log


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(toy_cache, tmp_path):
    steps = ["--steps", "6", "--save-every", "1"]
    base = TINY + ["--cache-dir", toy_cache] + steps
    ref = run_dar(base + ["--out-dir", str(tmp_path / "a")], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dar.py")] + base + ["--out-dir", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(out / "latest") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = open(out / "latest").read().strip()
    assert killed_at != "ckpt-000006", "the run finished before it could be killed: nothing was tested"

    resumed = run_dar(base + ["--out-dir", str(out), "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = comparable(read_metrics(tmp_path / "a")), comparable(read_metrics(out))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    fa = torch.load(tmp_path / "a" / "ckpt-000006" / "state.pt", weights_only=True)
    fb = torch.load(out / "ckpt-000006" / "state.pt", weights_only=True)
    assert fa["step"] == fb["step"] == 6


OLD_RUN = os.path.join(ROOT, "tests", "fixtures", "run-before-layout")
OLD_PI0 = os.path.join(OLD_RUN, "pi0")  # a toy pi_0 as a model directory
OLD_RUN_FLAGS = ["--model", "tests/fixtures/run-before-layout/pi0", "--online-batch", "32", "--minibatch", "16",
                 "--micro-batch", "8", "--max-new-tokens", "12", "--lr", "1e-3", "--eval-prompts", "0",
                 "--save-every", "2", "--keep-checkpoints", "2", "--print-every", "1000", "--sample-every", "1000",
                 "--logp-temperature", "1"]  # the code of that commit took log-probs at temperature 1


ADDED_METRICS = {"train/invalid_frac", "train/skipped",   # logged since the fixture was written (issue 17)
                 "train/entropy"}                         # (issue 18)


@pytest.mark.slow
def test_a_checkpoint_written_before_the_file_split_resumes_to_its_numbers(tmp_path):
    """run/ is what dar.py wrote at commit dff6d8b, before dar.py was split into config, infra and loop:
    `OMP_NUM_THREADS=1 python dar.py OLD_RUN_FLAGS --steps 2` in the repository root (pi0/ is the toy pi_0 of
    that commit's `python dar.py`; the run's final/ is left out). expected-steps-3-4.jsonl holds online batches
    3 and 4 of the same command with --steps 4, uninterrupted, at that commit. Today's code resumes the
    checkpoint and continues to those numbers."""
    out = tmp_path / "run"
    shutil.copytree(os.path.join(OLD_RUN, "run"), out)
    p = run_dar(OLD_RUN_FLAGS + ["--steps", "4", "--out-dir", str(out), "--resume"], cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = comparable(read_metrics(out))
    with open(os.path.join(OLD_RUN, "expected-steps-3-4.jsonl")) as f:
        expected = comparable([json.loads(line) for line in f])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # without --logp-temperature 1 the resume would change the objective mid-run: refused, naming the flag
    flags = [f for f in OLD_RUN_FLAGS if f not in ("--logp-temperature", "1")]
    p = run_dar(flags + ["--steps", "5", "--out-dir", str(out), "--resume"], cwd=ROOT)
    assert p.returncode != 0 and "--logp-temperature 0.0 (was 1.0)" in p.stderr, p.stderr[-2000:]
    for got, want in zip(rows[2:], expected):
        assert got.keys() - want.keys() == ADDED_METRICS and got.keys() >= want.keys()
        assert got["train/skipped"] == 0
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (want["step"], k)


@pytest.mark.slow
def test_resume_refuses_changed_settings(toy_cache, tmp_path):
    out = tmp_path / "r"
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "1"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--resume",
                        "--alpha", "0.5"], cwd=tmp_path)
    assert p.returncode != 0 and "--alpha 0.5 (was 0.1)" in p.stderr and "Traceback" not in p.stderr


def test_resume_ignores_an_older_is_clip_default_in_runs_that_do_not_use_it():
    """--is-clip's default went from 1 to inf: a DAR checkpoint saved is_clip 1 and still resumes; an IS-DPO
    checkpoint with another clip is another experiment."""
    for algo, refused in (("dar", False), ("rloo", False), ("is_dpo", True)):
        cfg = config.parse_config(["--algo", algo])
        saved = dict(dataclasses.asdict(cfg), is_clip=1.0)
        if refused:
            with pytest.raises(SystemExit, match=r"--is-clip inf \(was 1.0\)"):
                config.check_resumable(cfg, saved)
        else:
            config.check_resumable(cfg, saved)


def test_a_checkpoint_without_a_newer_field_resumes_only_with_the_behaviour_it_had():
    """A checkpoint saved before --logp-temperature and --pair-labels existed trained with log-probs at 1 and, for
    online DPO/IPO/SLiC, reward-ranked pairs: its resume must say so, never switch silently to the new defaults.
    A field the algorithm never reads (--pair-labels for DAR) does not stop it."""
    for algo, flags, refused in (("dar", [], "--logp-temperature 0.0 (was 1.0)"),
                                 ("dar", ["--logp-temperature", "1"], None),
                                 ("online_dpo", ["--logp-temperature", "1"], "--pair-labels 'preference' (was 'reward')"),
                                 ("online_dpo", ["--logp-temperature", "1", "--pair-labels", "reward"], None)):
        cfg = config.parse_config(["--algo", algo] + flags)
        old = {k: v for k, v in dataclasses.asdict(config.parse_config(["--algo", algo])).items()
               if k not in ("logp_temperature", "pair_labels")}
        if refused:
            with pytest.raises(SystemExit, match=re.escape(refused)):
                config.check_resumable(cfg, old)
        else:
            config.check_resumable(cfg, old)


def test_a_checkpoint_from_before_the_optimizer_flags_resumes_with_adafactor_and_a_constant_rate_only():
    """A checkpoint without --optimizer, --lr-schedule, AdamW's and the sampler's fields trained with Adafactor,
    warm-up then constant: it resumes with those, and another optimizer or schedule is another experiment."""
    new = ("optimizer", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_schedule", "top_p", "top_k")
    old = {k: v for k, v in dataclasses.asdict(config.parse_config([])).items() if k not in new}
    config.check_resumable(config.parse_config([]), old)
    for flags, refused in ((["--optimizer", "adamw"], "--optimizer 'adamw' (was 'adafactor')"),
                           (["--lr-schedule", "cosine"], "--lr-schedule 'cosine' (was 'constant')")):
        with pytest.raises(SystemExit, match=re.escape(refused)):
            config.check_resumable(config.parse_config(flags), old)


def test_a_longer_resume_is_refused_under_a_decaying_schedule_only():
    """--steps may grow on --resume while the rate is constant (the paper's); a linear or cosine decay ends at the
    run's last step, so a new length would bend it mid-run."""
    config.check_resumable(config.parse_config(["--steps", "80"]), dataclasses.asdict(config.parse_config([])))
    for schedule in ("linear", "cosine"):
        saved = dataclasses.asdict(config.parse_config(["--lr-schedule", schedule]))
        config.check_resumable(config.parse_config(["--lr-schedule", schedule]), saved)
        with pytest.raises(SystemExit, match=re.escape(f"--resume with --steps 80 (was 60) under --lr-schedule "
                                                       f"{schedule}: the decay ends at the run's last optimizer "
                                                       "step") + ".*resume with --steps 60"):
            config.check_resumable(config.parse_config(["--lr-schedule", schedule, "--steps", "80"]), saved)


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown --task 'nope'; valid tasks: toy"),
    (["--algo", "nope"], "unknown --algo 'nope'; valid algorithms: dar, sft, ppo, dual_ppo, dual_ppo_clip, "
                         "dual_mix_ppo, dao, dao_ppo, rloo, grpo, iter_sft, online_dpo, ipo, slic, dpo, simpo, is_dpo"),
    (["--algo", "ipo", "--k", "4", "--online-batch", "48", "--minibatch", "6", "--pair-labels", "reward"],
     "--minibatch 6 must split evenly into 1 ranks in whole groups of 4"),
    (["--clip-eps", "0"], "--clip-eps must be > 0"),
    (["--value-model", "/no/such/dir"], "--value-model '/no/such/dir' is not a model directory"),
    (["--judge", "llm"], "--judge llm needs --judge-url URL"),
    (["--task", "custom", "--data", os.path.join(ROOT, "tests/fixtures/hh_helpful.jsonl"), "--model", OLD_PI0],
     "--judge llm (the default of task custom) needs --judge-url URL"),
    (["--eval-judge", "llm"], "--eval-judge llm evaluates with an annotator and needs --eval-judge-url URL (or "
                              "--judge-url); or evaluate with --eval-judge reward"),
    (["--eval-judge", "none", "--eval-every", "2"], "--eval-every evaluates with the eval judge, and --eval-judge "
                                                    "none evaluates nothing"),
    (["--clip-eps", "0.3"], "--clip-eps 0.3 is read by --algo ppo, dual_ppo, dual_ppo_clip, dual_mix_ppo, grpo, "
                            "rloo, dao only; --algo dar does not use it"),
    (["--algo", "grpo", "--w-clip", "5"], "--w-clip 5.0 is read by --algo dar only; --algo grpo does not use it"),
    (["--algo", "grop"], "unknown --algo 'grop' (did you mean grpo?)"),
    (["--eval-fraction", "0.2"], "--eval-fraction splits a single --data file; --task toy has a fixed split"),
    (["--valid-fraction", "0"], "--valid-fraction is a share of the prompts, in (0, 1), got 0.0"),
    (["--eval-judge", "reward_model"], "--judge reward_model needs --reward-model"),
    (["--rollout", "sglang"], "--rollout must be hf or vllm"),
    (["--judge", "nope"], "unknown --judge 'nope'; valid judges: toy_gold, toy_biased, toy_proxy"),
    (["--alpha", "1.5"], "--alpha must lie in [0, 1]"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--k", "1"], "--k must be >= 2"),
    (["--online-batch", "30"], "--online-batch 30 must be a multiple of K x ranks = 4 x 1, e.g. --online-batch 32"),
    (["--model", "/no/such/dir"], "--model '/no/such/dir' is not a model directory"),
    (["--fsdp-offload"], "--fsdp-offload offloads the shards of --fsdp; add --fsdp"),
    (["--optimizer", "sgd"], "--optimizer must be adafactor (the paper's) or adamw (TRL's), got 'sgd'"),
    (["--adam-beta1", "0.95"], "--adam-beta1 0.95 is a setting of AdamW, and --optimizer is adafactor: add "
                               "--optimizer adamw, or leave --adam-beta1 at 0.9"),
    (["--adam-epsilon", "1e-6"], "add --optimizer adamw, or leave --adam-epsilon at 1e-08"),
    (["--optimizer", "adamw", "--adam-beta2", "1"], "--adam-beta2 must lie in [0, 1), got 1.0"),
    (["--lr-schedule", "step"], "--lr-schedule must be constant, linear or cosine, got 'step'"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    (["--top-p", "0.9"], "--top-p 0.9 is not supported: DAR's weights and every loss need log pi_t of the "
                         "distribution that drew the samples, and the log-probs here are those of the whole softmax; "
                         "leave --top-p at 1.0"),
    (["--top-k", "50"], "--top-k 50 is not supported: DAR's weights and every loss need log pi_t"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        dar.main(args + ["--out-dir", "/nonexistent/never-written"])
    assert message in str(e.value)


@pytest.mark.slow
def test_bad_flag_prints_a_message_not_a_traceback(tmp_path):
    p = run_dar(["--alpha", "2"], cwd=tmp_path)
    assert p.returncode != 0
    assert "--alpha must lie in [0, 1]" in p.stderr and "Traceback" not in p.stderr


def test_pi_t_logps_are_computed_once_before_the_updates_and_reused(toy_cache, tmp_path, monkeypatch):
    """Every update of an online batch uses log pi_t of the policy that sampled the batch."""
    cfg = tiny_cfg(toy_cache, tmp_path / "once", "--steps", "1")  # 32 responses, 2 updates of 16
    calls, weighed, seen = [], [], []
    real_score, real_weights, real_loss = loop.score, dar.dar_weights, dar.weighted_sft_loss

    def score(model, batch, *a, **kw):
        out = real_score(model, batch, *a, **kw)
        logp = out[0] if kw.get("entropy") else out  # the pi_t pass also returns the entropy (train/entropy)
        calls.append((model, batch, logp.sum(1).cpu()))
        return out

    def weights(adv, logp_t, *a, **kw):
        w, parts = real_weights(adv, logp_t, *a, **kw)
        weighed.append((logp_t.clone(), w.clone()))
        return w, parts

    def loss(logp, w, *a, **kw):
        seen.append(w.detach().cpu().clone())
        return real_loss(logp, w, *a, **kw)

    for module in (loop, dar):  # pi_t is scored in loop.pi_t_logps, pi_0 in dar.dar_step
        monkeypatch.setattr(module, "score", score)
    monkeypatch.setattr(dar, "dar_weights", weights)
    monkeypatch.setattr(dar, "weighted_sft_loss", loss)
    run = train(cfg)
    policy, ref = run.policy, run.ref
    assert len(calls) == 2 and calls[0][0] is policy and calls[1][0] is ref  # pi_t and pi_0, once each
    logp_t_before_updates = calls[0][2]
    # the weights are made once, from the pi_t log-probs computed before the first update
    assert len(weighed) == 1 and torch.equal(weighed[0][0], logp_t_before_updates)
    assert len(seen) == 4  # 2 optimizer steps x 2 micro-batches of 8
    used = torch.cat(seen)
    # each of the 32 rows' weight used exactly once per epoch
    assert torch.equal(used.sort().values, weighed[0][1].sort().values)
    # the policy has moved on since: log-probs recomputed now would be other numbers
    assert not torch.allclose(real_score(policy, calls[0][1], cfg.micro_batch).sum(1), logp_t_before_updates)


def test_warmup_then_constant_learning_rate():
    cfg = config.parse_config(["--lr", "1e-3", "--warmup-steps", "15"])
    model = torch.nn.Linear(2, 1)
    opt, sched = infra.optimizer_and_schedule(cfg, [model])
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 15) and lrs[14] == pytest.approx(1e-3)
    assert lrs[15:] == pytest.approx([1e-3] * 5)
    assert all(a < b for a, b in zip(lrs[:14], lrs[1:15]))


def test_adamw_makes_the_updates_of_torch_adamw_with_trls_defaults():
    """--optimizer adamw is torch.optim.AdamW with TrainingArguments' defaults (betas 0.9 and 0.999, eps 1e-8, weight
    decay 0, where torch's own AdamW defaults to 0.01); its flags set them; Adafactor stays the default."""
    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ref.load_state_dict(ours.state_dict())
    opt, sched = infra.optimizer_and_schedule(config.parse_config(["--optimizer", "adamw", "--lr", "0.01",
                                                                   "--warmup-steps", "0"]), [ours])
    want = torch.optim.AdamW(ref.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(4):
        x = torch.randn(5, 3)
        for m in (ours, ref):
            (m(x) ** 2).sum().backward()
        opt.step()
        sched.step()
        want.step()
        opt.zero_grad()
        want.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters()))
    assert not torch.equal(ours.weight, torch.nn.Linear(3, 2).weight)
    cfg = config.parse_config(["--optimizer", "adamw", "--adam-beta1", "0.8", "--adam-beta2", "0.95",
                               "--adam-epsilon", "1e-6", "--weight-decay", "0.1", "--lr", "2e-5"])
    config.check_config(cfg, 1)
    group = infra.optimizer_and_schedule(cfg, [torch.nn.Linear(2, 1)])[0].param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"], group["initial_lr"]) == ((0.8, 0.95), 1e-6, 0.1, 2e-5)
    default = infra.optimizer_and_schedule(config.parse_config([]), [torch.nn.Linear(2, 1)])[0]
    assert isinstance(default, Adafactor) and default.param_groups[0]["relative_step"] is False


def lrs_of_updates(cfg):
    """The learning rate that each of the run's optimizer updates takes, then the one after the last."""
    model = torch.nn.Linear(2, 1)
    opt, sched = infra.optimizer_and_schedule(cfg, [model])
    lrs = []
    for _ in range(config.optimizer_steps(cfg)):
        lrs.append(sched.get_last_lr()[0])
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        sched.step()
    return lrs + [sched.get_last_lr()[0]]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_the_learning_rate_of_every_update_follows_the_schedule(schedule, warmup):
    """2 online batches of DAR, 2 epochs of 32 / 16 updates each: 8 updates. The i-th update takes i/W of --lr in
    the warm-up, then the rest decays to 0 after the last update (linear, half a cosine) as transformers' schedules
    do, or stays (constant, the paper's)."""
    cfg = config.parse_config(TINY + ["--steps", "2", "--epochs", "2", "--lr-schedule", schedule,
                                      "--warmup-steps", str(warmup)])
    config.check_config(cfg, 1)
    assert config.optimizer_steps(cfg) == 8
    n, lr = 8, 1e-3

    def by_hand(i):  # the i-th update, 1..n; n + 1: after the last
        if i <= warmup:
            return i / warmup
        done = (i - 1 - warmup) / (n - warmup)
        return {"constant": 1.0, "linear": 1 - done, "cosine": (1 + math.cos(math.pi * done)) / 2}[schedule]
    lrs = lrs_of_updates(cfg)
    assert lrs == pytest.approx([lr * by_hand(i) for i in range(1, n + 2)], rel=1e-12)
    if schedule == "linear":
        by_eye = [1 / 3, 2 / 3, 1, 1, 4 / 5, 3 / 5, 2 / 5, 1 / 5, 0] if warmup else [1, 7 / 8, 6 / 8, 5 / 8, 4 / 8,
                                                                                    3 / 8, 2 / 8, 1 / 8, 0]
        assert lrs == pytest.approx([lr * f for f in by_eye])
    if schedule != "constant":  # transformers' own schedule, from the end of the warm-up on
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        make = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[schedule]
        theirs = make(opt, warmup, n)
        want = []
        for _ in range(n):
            want.append(theirs.get_last_lr()[0])
            opt.step()
            theirs.step()
        want.append(theirs.get_last_lr()[0])
        assert lrs[warmup:] == pytest.approx(want[warmup:], rel=1e-12, abs=1e-18)
        assert lrs[-1] == 0


@pytest.mark.slow
@pytest.mark.parametrize("algo, extra", [("dar", []), ("ppo", []), ("grpo", ["--epochs", "2"]), ("iter_sft", []),
                                         ("online_dpo", []), ("sft", []), ("dpo", [])])
def test_optimizer_steps_counts_the_updates_a_run_takes(algo, extra, toy_cache, tmp_path, monkeypatch):
    """config.optimizer_steps, the length of a decaying schedule, is the number of updates the algorithm's step
    function makes (counted where loop.minibatch_updates is called): the learning rate is 0 after the run's last.
    An update with nothing to learn from (online DPO: no pair with a preference in a minibatch) is not taken and
    does not advance the schedule."""
    planned, real = [], loop.minibatch_updates

    def counted(cfg, ctx, run, n_units, n_updates, micro_units, loss_fn, epochs, **kw):
        planned.append(n_updates * epochs)
        return real(cfg, ctx, run, n_units, n_updates, micro_units, loss_fn, epochs, **kw)
    for module in (loop, dar):  # dar.py imports it by name
        monkeypatch.setattr(module, "minibatch_updates", counted)
    cfg = tiny_cfg(toy_cache, tmp_path, "--algo", algo, "--steps", "2", "--lr-schedule", "linear",
                   "--warmup-steps", "0", *extra)
    run = train(cfg)
    assert sum(planned) == config.optimizer_steps(cfg) > 0
    rows = read_metrics(tmp_path)
    if algo == "online_dpo":  # these seeds leave a minibatch without a preference
        assert 0 < run.sched.last_epoch < sum(planned) and rows[-1]["train/lr"] > 0
    else:
        assert run.sched.last_epoch == sum(planned) and rows[0]["train/lr"] > 0 and rows[-1]["train/lr"] == 0


@pytest.mark.slow
def test_a_killed_adamw_run_with_a_decaying_schedule_resumes_to_the_same_metrics_and_weights(toy_cache, tmp_path):
    """AdamW's moments and the linear schedule's position come back from the checkpoint: every metrics row and the
    final weights equal an uninterrupted run's. A longer --steps on --resume would bend the decay: refused."""
    base = TINY + ["--cache-dir", toy_cache, "--steps", "6", "--save-every", "1", "--optimizer", "adamw",
                   "--lr-schedule", "linear", "--warmup-steps", "2", "--print-every", "1000"]
    ref = run_dar(base + ["--out-dir", str(tmp_path / "a")], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dar.py")] + base + ["--out-dir", str(out)],
                            cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(out / "latest") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert open(out / "latest").read().strip() != "ckpt-000006", "the run finished before it was killed"
    longer = run_dar(base + ["--out-dir", str(out), "--resume", "--steps", "8"], cwd=tmp_path)
    assert longer.returncode != 0 and "--resume with --steps 8 (was 6) under --lr-schedule linear" in longer.stderr
    assert "Traceback" not in longer.stderr
    resumed = run_dar(base + ["--out-dir", str(out), "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = comparable(read_metrics(tmp_path / "a")), comparable(read_metrics(out))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and a[-1]["train/lr"] == 0
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    wa, wb = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (tmp_path / "a", out))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def test_prompt_order_is_a_fresh_permutation_each_epoch_and_stateless():
    n, per = 10, 4
    stream = sum((loop.prompt_indices(t, per, n, seed=3) for t in range(5)), [])  # 20 draws = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    assert loop.prompt_indices(3, per, n, seed=3) == stream[12:16]
