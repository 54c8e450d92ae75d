"""The training step's optimisations leave the numbers unchanged: chunked log-probs without a float32 copy of the
logits, padding trimmed per micro-batch, length-ordered scoring in inference mode, length-ordered micro-batches,
gradient checkpointing, and the sampler's own log-probs in place of a pi_t pass; each compared with the
straightforward computation."""
import json
import os

import pytest
import torch

import config
import dar
import infra
import loop
import rollout
import tasks
from conftest import TINY, train


def straightforward_logps(model, batch, temperature=1.0):
    """The reference: one forward pass over the full padded batch, the float32 log-softmax of all logits / T."""
    ids, mask, R = batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                   use_cache=False).logits[:, -R - 1:-1]
    logp = (logits.float() / temperature).log_softmax(-1).gather(-1, ids[:, -R:, None]).squeeze(-1)
    return torch.where(batch.response_mask.bool(), logp, 0.0)


@pytest.fixture(scope="module")
def policy_and_batch(toy_cache):
    cfg = config.parse_config(["--cache-dir", toy_cache] + TINY)
    _, sft = loop.toy_paths(cfg)
    path = os.path.join(sft, "final")
    model, tok = infra.load_model(path, cfg, torch.device("cpu")), infra.load_tokenizer(path)
    prompts = tasks.toy_task().train_prompts[:10]  # words of 3 to 8 letters: prompts of several lengths
    torch.manual_seed(0)
    batch = rollout.generate(model, tok, prompts, 2, 12, 1.0)
    assert len(set(batch.attention_mask[:, :batch.prompt_len].sum(1).tolist())) > 1  # real left padding
    return model.eval(), batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])  # one row per chunk, uneven chunks, everything at once
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selected_logps_match_log_softmax_values_and_gradients(dtype, chunk, temperature):
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 4, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (5, 4))
    weights = torch.randn(5, 4)
    ref = (logits.float() / temperature).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    got = rollout.selected_logps(logits, targets, chunk_tokens=chunk, temperature=temperature)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    assert got.dtype == torch.float32 and got.shape == (5, 4)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    wrong = logits.float().softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # probabilities, not logs
    assert not torch.allclose(got, wrong, atol=1e-2)


def test_token_logps_and_trimmed_micro_batches_match_the_full_batch(policy_and_batch):
    model, batch = policy_and_batch
    with torch.no_grad():
        ref = straightforward_logps(model, batch)
        assert torch.allclose(rollout.token_logps(model, batch), ref, atol=1e-5)
        rows = torch.tensor([3, 0, 7])
        part = batch.select(rows)
        assert part.input_ids.shape[1] < batch.input_ids.shape[1]  # the rows' shared padding is gone
        assert part.prompt_len < batch.prompt_len or part.response_mask.shape[1] < batch.response_mask.shape[1]
        got = rollout.token_logps(model, part)
    torch.testing.assert_close(got, ref[rows, :got.shape[1]], rtol=0, atol=1e-5)
    assert (ref[rows, got.shape[1]:] == 0).all()  # what was trimmed was padding


def test_score_orders_by_length_and_returns_an_ordinary_tensor(policy_and_batch):
    model, batch = policy_and_batch
    with torch.no_grad():
        ref = straightforward_logps(model, batch)
    for micro in (1, 3, 64):
        out = loop.score(model, batch, micro)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert not out.is_inference()
    x = torch.ones(out.shape, requires_grad=True)
    (x * out).sum().backward()  # usable as a constant in a loss (an inference tensor would refuse)
    assert torch.equal(x.grad, out)


def one_dar_run(toy_cache, out, *flags):
    cfg = config.parse_config(["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--print-every", "1000",
                               "--seed", "3"] + TINY + list(flags))
    run = train(cfg)
    return torch.cat([p.detach().flatten() for p in run.policy.parameters()]), run


@pytest.mark.slow
def test_length_ordered_micro_batches_and_gradient_checkpointing_give_the_same_update(toy_cache, tmp_path,
                                                                                      monkeypatch):
    """TINY: minibatches of 16 in micro-batches of 8, ordered by length; one micro-batch of 16 is the
    straightforward computation; gradient checkpointing recomputes the same activations: each decoder layer
    runs twice per micro-batch with gradients (forward, and again in backward), not once."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
    calls, forward = [], Qwen2DecoderLayer.forward

    def counted(self, *a, **k):
        calls.append(torch.is_grad_enabled())
        return forward(self, *a, **k)
    monkeypatch.setattr(Qwen2DecoderLayer, "forward", counted)
    plain, _ = one_dar_run(toy_cache, tmp_path / "plain", "--micro-batch", "16")
    before = sum(calls)
    ordered, _ = one_dar_run(toy_cache, tmp_path / "ordered")
    once = sum(calls) - before
    ckpt, run = one_dar_run(toy_cache, tmp_path / "ckpt", "--gradient-checkpointing")
    assert once > 0 and sum(calls) - before - once == 2 * once
    pi0 = torch.cat([p.detach().flatten() for p in run.ref.parameters()])
    assert (ordered - pi0).abs().max() > 1e-3  # two updates moved the policy: the comparison has teeth
    torch.testing.assert_close(ordered, plain, rtol=0, atol=2e-5)
    torch.testing.assert_close(ckpt, ordered, rtol=0, atol=2e-5)


@pytest.mark.parametrize("logp_temperature", [None, 1.0])
def test_generate_records_the_sampled_tokens_log_probs(policy_and_batch, logp_temperature):
    """--logp-source sampler with transformers: the log-probs generate() computed while sampling at T = 0.9
    equal the trainer's (token_logps) and a teacher-forced forward pass of the same sequences at the batch's
    temperature: 0.9, the distribution sampled, or 1 with --logp-temperature 1 (float32: to rounding)."""
    model, batch = policy_and_batch
    tok = infra.load_tokenizer(model.name_or_path)
    torch.manual_seed(1)
    rec = rollout.generate(model, tok, batch.prompts[::2], 2, 12, 0.9, record_logp=True,
                           logp_temperature=logp_temperature)
    assert rec.sampler_logp.shape == rec.response_mask.shape
    assert rec.temperature == (logp_temperature or 0.9)
    with torch.no_grad():
        ref = straightforward_logps(model, rec, rec.temperature)
        other = straightforward_logps(model, rec, 1.9 - rec.temperature)  # the other of 0.9 and 1
        trainer = rollout.token_logps(model, rec)
    torch.testing.assert_close(rec.sampler_logp, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(trainer, ref, rtol=0, atol=1e-4)
    assert (rec.sampler_logp - other).abs().max() > 1e-2  # the temperature makes a difference here
    assert (rec.sampler_logp[rec.response_mask == 0] == 0).all()


def test_sampler_log_probs_skip_the_pi_t_pass(toy_cache, tmp_path, monkeypatch):
    """With --logp-source sampler the policy scores one micro-batch (the logged check), not the batch."""
    scored, real = [], loop.score

    def score(model, batch, *a, **kw):
        scored.append(len(batch))
        return real(model, batch, *a, **kw)
    for module in (loop, dar):  # pi_t is scored in loop.pi_t_logps, pi_0 in dar.dar_step
        monkeypatch.setattr(module, "score", score)
    _, run = one_dar_run(toy_cache, tmp_path / "sampler", "--logp-source", "sampler", "--steps", "1")
    assert scored == [8, 32]  # the policy on micro_batch rows, then pi_0 on the whole batch
    first = json.loads(open(tmp_path / "sampler" / "metrics.jsonl").readline())
    assert first["rollout/logp_abs_diff"] < 1e-4
