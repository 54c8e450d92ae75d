"""Log-probs from the last hidden states and the LM head, a block at a time (rollout.head_logps,
head_logps_and_entropy, and token_logps' fused path): the values, the entropy and the gradients to the hidden
states, the head's weight and bias and every parameter of a real Qwen2 model (tied and untied embeddings) equal
the straightforward full-vocabulary computation; no tensor of the micro-batch's [positions, vocabulary] size is
made; and under DDP and FSDP2 on 2 ranks the gradients are those of one unsharded process.

Run as a script under torchrun (`test_ddp_and_fsdp2_match_one_process` does), it is the 2-rank worker."""
import gc
import os
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rollout  # noqa: E402
from conftest import LargestTensor, record_scales  # noqa: E402

V = 300  # vocabulary of the tiny model


def tiny_qwen2(tied, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(cfg).float()


def tiny_batch(temperature=0.8, seed=1, R=6):
    """4 rows, left-padded prompts of 3 to 5 tokens, responses of R with padding after EOS in two rows."""
    g = torch.Generator().manual_seed(seed)
    N, P = 4, 5
    ids = torch.randint(1, V, (N, P + R), generator=g)
    mask = torch.ones(N, P + R, dtype=torch.long)
    mask[0, :2] = mask[1, :1] = 0  # left padding
    ids[mask == 0] = 0
    response_mask = torch.ones(N, R, dtype=torch.long)
    response_mask[1, 4:] = response_mask[3, 2:] = 0
    mask[:, P:] = response_mask
    return rollout.Rollout(["p"] * N, ["r"] * N, ids, mask, response_mask, response_mask[:, -1] == 0, P,
                           temperature=temperature)


def straightforward(model, batch, entropy=False):
    """The reference: the whole logits, their float32 log-softmax over the whole vocabulary at T."""
    ids, mask, R = batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                   use_cache=False).logits[:, -R - 1:-1]
    logp_all = (logits.float() / batch.temperature).log_softmax(-1)
    keep = batch.response_mask.bool()
    logp = torch.where(keep, logp_all.gather(-1, ids[:, -R:, None]).squeeze(-1), 0.0)
    return (logp, torch.where(keep, -(logp_all.exp() * logp_all).sum(-1), 0.0)) if entropy else logp


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7 * 13, 10 ** 6])  # one logit per block, uneven blocks, all at once
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_logps_match_the_straightforward_values_and_gradients(bias, chunk, temperature):
    torch.manual_seed(0)
    M, d, V_ = 37, 8, 50
    h = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    W = (2 * torch.randn(V_, d, dtype=torch.float64)).requires_grad_()
    b = torch.randn(V_, dtype=torch.float64, requires_grad=True) if bias else None
    t, g = torch.randint(0, V_, (M,)), torch.randn(M, dtype=torch.float64)
    inputs = [h, W] + ([b] if bias else [])
    ref = (torch.nn.functional.linear(h, W, b) / temperature).log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
    grads_ref = torch.autograd.grad((ref * g).sum(), inputs)
    got = rollout.head_logps(h, W, b, t, temperature, chunk=chunk)
    grads = torch.autograd.grad((got * g).sum(), inputs)
    assert got.dtype == torch.float32 and got.shape == (M,)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    for a, e in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)  # float32 inside
    logp, entropy = rollout.head_logps_and_entropy(h, W, b, t, temperature, chunk=chunk)
    logp_all = (torch.nn.functional.linear(h, W, b) / temperature).log_softmax(-1)
    torch.testing.assert_close(logp.double(), ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(logp_all.exp() * logp_all).sum(-1).detach(), rtol=0, atol=2e-5)
    assert not torch.allclose(got.double(), logp_all.exp().gather(-1, t[:, None]).squeeze(-1), atol=1e-2)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", [1, 5, 1000])  # positions per group: one, uneven groups, all at once
@pytest.mark.parametrize("scale", [1.0, -0.37])  # the factor a loss's reductions add to the hinted gradient
def test_a_gradient_known_in_forward_gives_the_same_values_and_gradients(bias, group, scale, monkeypatch):
    """grad_hint: the head's gradients formed in forward (_head_scan_with_grads) and scaled in backward equal the
    straightforward ones; a hint with zeros in it, and a loss whose gradient is not the hinted one (computed the
    usual way), too."""
    torch.manual_seed(0)
    M, d, V_, T = 37, 8, 50, 0.7
    monkeypatch.setattr(rollout, "HEAD_GROUP_BYTES", group * V_ * 8)  # float64: 8 bytes a logit
    h = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    W = (2 * torch.randn(V_, d, dtype=torch.float64)).requires_grad_()
    b = torch.randn(V_, dtype=torch.float64, requires_grad=True) if bias else None
    t, w = torch.randint(0, V_, (M,)), torch.randn(M, dtype=torch.float64)
    w[3] = 0.0
    inputs = [h, W] + ([b] if bias else [])
    ref = (torch.nn.functional.linear(h, W, b) / T).log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
    seen = record_scales(monkeypatch)
    for loss_weights, expect in ((w * scale, scale), (torch.randn(M, dtype=torch.float64), None)):
        grads_ref = torch.autograd.grad((ref * loss_weights).sum(), inputs, retain_graph=True)
        got = rollout.head_logps(h, W, b, t, T, chunk=7 * 13, grad_hint=w.float())
        grads = torch.autograd.grad((got * loss_weights).sum(), inputs)
        torch.testing.assert_close(got.double(), ref.detach(), rtol=0, atol=1e-5)
        for a, e in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        assert seen.pop() == pytest.approx(expect, rel=1e-6) if expect else seen.pop() is None
    with torch.no_grad():  # no backward to come: nothing formed, nothing asked
        torch.testing.assert_close(rollout.head_logps(h, W, b, t, T, grad_hint=w.float()).double(), ref.detach(),
                                   rtol=0, atol=1e-5)
    assert seen == []


def test_head_logps_in_bfloat16_match_the_logits_path():
    """bf16 hidden states and weight: the same products as the model's head, so the same figures as
    selected_logps on lm_head(h) (to bf16 rounding of the gradients)."""
    torch.manual_seed(0)
    h = torch.randn(2, 24, 16).bfloat16().requires_grad_()
    W = torch.randn(500, 16).bfloat16().requires_grad_()
    t, g = torch.randint(0, 500, (2, 24)), torch.randn(2, 24)
    ref = rollout.selected_logps(torch.nn.functional.linear(h, W), t, chunk_tokens=5, temperature=0.9)
    ref_h, ref_w = torch.autograd.grad((ref * g).sum(), [h, W])
    for hint in (None, g.view(48)):  # with the gradient known in forward: 5 groups of 10 positions (and 8)
        rollout.HEAD_GROUP_BYTES, before = 10 * 500 * 2, rollout.HEAD_GROUP_BYTES
        try:
            got = rollout.head_logps(h.view(48, 16), W, None, t.view(48), 0.9, chunk=4000, grad_hint=hint)
        finally:
            rollout.HEAD_GROUP_BYTES = before
        got = got.view(2, 24)
        got_h, got_w = torch.autograd.grad((got * g).sum(), [h, W])
        assert got_h.dtype == got_w.dtype == torch.bfloat16
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_h.float(), ref_h.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got_w.float(), ref_w.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tied", [True, False])
def test_token_logps_through_a_qwen2_model_equal_the_straightforward_computation(tied):
    """Values and the gradient of every parameter (with tied embeddings, the one matrix gets the head's
    gradient and the embedding's), at T = 0.8, with left padding and masked response tokens."""
    model, batch = tiny_qwen2(tied), tiny_batch()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert rollout.fusable_head(model) is model.lm_head
    weights = torch.randn(batch.response_mask.shape)
    params = [p for _, p in model.named_parameters()]
    ref = straightforward(model, batch)
    grads_ref = torch.autograd.grad((ref * weights).sum(), params)
    got = rollout.token_logps(model, batch)
    grads = torch.autograd.grad((got * weights).sum(), params)
    assert "forward" not in vars(model.lm_head)  # the head is itself again
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (got[batch.response_mask == 0] == 0).all()
    for (name, _), a, e in zip(model.named_parameters(), grads, grads_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=name)
    assert grads[0].abs().max() > 0  # the embedding (the head too, when tied) has a gradient
    unfused = rollout.token_logps(model, batch, fused=False)  # the logits path stays as it was
    torch.testing.assert_close(unfused, ref, rtol=0, atol=1e-5)
    with torch.inference_mode():  # loop.score's pi_t pass
        logp, entropy = rollout.token_logps(model, batch, entropy=True)
        logp_ref, entropy_ref = straightforward(model, batch, entropy=True)
    torch.testing.assert_close(logp, logp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, entropy_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_dars_loss_told_its_weights_forms_the_heads_gradients_in_forward(tied, monkeypatch):
    """token_logps(seq_grad=w) under Eq. 4's weighted SFT (dar.weighted_sft_loss, a minibatch mean): the
    gradient of every parameter of a real Qwen2 equals the straightforward one, and backward took the formed
    gradients (a scale was found), through padding and masked tokens."""
    import dar
    model, batch = tiny_qwen2(tied), tiny_batch()
    w = torch.tensor([0.3, 2.0, 0.0, 1.1])
    params = [p for _, p in model.named_parameters()]

    def loss(logp):
        return dar.weighted_sft_loss(logp.sum(1), w, length_norm=6).sum() / 4
    grads_ref = torch.autograd.grad(loss(straightforward(model, batch)), params)
    seen = record_scales(monkeypatch)
    got = rollout.token_logps(model, batch, seq_grad=w)
    grads = torch.autograd.grad(loss(got), params)
    assert len(seen) == 1 and seen[0] == pytest.approx(-1 / 24)
    torch.testing.assert_close(got, straightforward(model, batch), rtol=0, atol=1e-5)
    for (name, _), a, e in zip(model.named_parameters(), grads, grads_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=name)


def test_no_tensor_of_the_micro_batch_logits_size_is_made(monkeypatch):
    """Forward and backward through the model: the largest tensor is a block of HEAD_CHUNK_ELEMENTS logits or a
    weight, never [N, R+1, V] (which the logits path makes, as the same measure sees)."""
    model, batch = tiny_qwen2(tied=True), tiny_batch(R=40)
    N, R = batch.response_mask.shape
    full = N * (R + 1) * V  # 49,200: more than the weight's 300 x 32
    monkeypatch.setattr(rollout, "HEAD_CHUNK_ELEMENTS", 2 * V)  # blocks far smaller than [N, R+1, V] = 8,400
    monkeypatch.setattr(rollout, "HEAD_MIN_ROWS", 64)
    with LargestTensor() as fused:
        rollout.token_logps(model, batch).sum().backward()
        with torch.no_grad():
            rollout.token_logps(model, batch, entropy=True)
    with LargestTensor() as logits_path:
        rollout.token_logps(model, batch, fused=False).sum().backward()
    # the largest are the MLP's activations [N, P+R, 64] and the embedding's gradient [V, 32]
    assert fused.largest < full and fused.largest <= max(V * 32, N * (5 + R) * 64)
    assert logits_path.largest >= full


def test_a_head_that_is_not_a_bare_linear_takes_the_logits_path():
    model, batch = tiny_qwen2(tied=False), tiny_batch()
    model.config.model_type = "gemma2"  # soft-capped logits: the head cannot give log-probs by itself
    assert rollout.fusable_head(model) is None
    torch.testing.assert_close(rollout.token_logps(model, batch), straightforward(model, batch), rtol=0, atol=1e-5)


def loss_weights(batch, hinted):
    """Per-token weights [4, R] for the 2-rank test; hinted: one weight per row (a loss like Eq. 4's, whose
    gradient token_logps is told in forward with seq_grad)."""
    weights = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(2))
    return weights[:, :1].expand_as(weights) if hinted else weights


def averaged_reference(tied, hinted):
    """One process, no sharding: the log-probs of the 4 rows and the gradient each rank's loss (its 2 rows)
    gives, averaged over the 2 ranks as DDP and FSDP2 average them."""
    model, batch = tiny_qwen2(tied), tiny_batch()
    weights = loss_weights(batch, hinted)
    logp = straightforward(model, batch)
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for rank in range(2):
        rows = slice(2 * rank, 2 * rank + 2)
        model.zero_grad()
        (straightforward(model, batch.select(torch.arange(4)[rows])) * weights[rows]).sum().backward()
        for n, p in model.named_parameters():
            grads[n] += p.grad / 2
    return logp.detach(), grads


MODES = ("ddp", "fsdp", "ddp_hint", "fsdp_hint")


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_ddp_and_fsdp2_match_one_process(tied, tmp_path):
    """torchrun, 2 ranks, gloo: each rank scores its 2 rows through token_logps' fused path, under DDP and under
    FSDP2 (infra.shard: the head's weight sharded outside the root's forward), with the gradient unknown and
    known in forward (seq_grad); log-probs and averaged gradients equal one unsharded process's straightforward
    computation."""
    import subprocess
    from conftest import TORCHRUN, dar_env
    p = subprocess.run(TORCHRUN + [os.path.abspath(__file__), str(tmp_path), str(int(tied))], env=dar_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for mode in MODES:
        logp, grads = averaged_reference(tied, mode.endswith("hint"))
        got = torch.load(tmp_path / f"{mode}.pt")
        torch.testing.assert_close(got["logp"], logp, rtol=0, atol=1e-5, msg=mode)
        assert got["grads"].keys() == grads.keys()
        for n in grads:
            torch.testing.assert_close(got["grads"][n], grads[n], rtol=1e-4, atol=1e-6, msg=f"{mode} {n}")


def worker(out, tied):
    """One rank of test_ddp_and_fsdp2_match_one_process."""
    import config
    import infra
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    batch = tiny_batch()
    rows = torch.arange(2 * rank, 2 * rank + 2)
    scales = record_scales(pytest.MonkeyPatch())  # undone by nothing: the worker's process ends here
    for mode in MODES:
        weights = loss_weights(batch, mode.endswith("hint"))
        model = tiny_qwen2(tied)
        wrapped = (torch.nn.parallel.DistributedDataParallel(model) if mode.startswith("ddp")
                   else infra.shard(model, config.Config()))
        assert rollout.fusable_head(wrapped) is not None
        hint = weights[rows, 0] if mode.endswith("hint") else None
        logp = rollout.token_logps(wrapped, batch.select(rows), seq_grad=hint)
        (logp * weights[rows]).sum().backward()
        assert scales == ([1.0] if mode.endswith("hint") else []), (mode, scales)  # the formed gradients, used
        scales.clear()
        every = [torch.empty_like(logp) for _ in range(2)]
        torch.distributed.all_gather(every, logp.detach())
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"logp": torch.cat(every), "grads": grads}, os.path.join(out, f"{mode}.pt"))
        # DDP's reducer and FSDP2's mesh hold the group: freed before it goes, as infra.end_distributed does (freed
        # at interpreter exit instead, a rank aborted with "terminate called without an active exception", 1 in 30)
        wrapped = model = None
        gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1], bool(int(sys.argv[2])))
