"""train/entropy: the entropy of pi_t at the batch's temperature over the sampled response tokens, from the
logits the pi_t pass (or transformers' generate) has anyway, one float32 chunk at a time (rollout.logps_and_entropy,
loop.mean_entropy); each checked against the closed form or the straightforward full-vocabulary computation."""
import json
import math

import pytest
import torch

import config
import infra
import loop
import rollout
from conftest import TINY, LargestTensor, train
from test_perf import policy_and_batch  # noqa: F401  (a fixture: the toy pi_0 and a sampled batch)


def full_entropy(logits, temperature):
    """The reference: float32 softmax over the whole vocabulary at once."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_of_hand_made_distributions_is_the_closed_form(temperature):
    V = 50
    uniform = torch.full((2, 3, V), 4.0)                       # any constant: softmax is uniform at every T
    peaked = torch.zeros(2, 3, V)
    peaked[..., 7] = 60.0                                      # one token takes (almost) all the mass
    two = torch.full((1, 1, V), -math.inf)
    two[..., :2] = torch.tensor([0.0, math.log(3.0)]) * temperature  # softmax(z / T) = (1/4, 3/4), the rest 0
    targets = torch.zeros(2, 3, dtype=torch.long)
    _, h_uniform = rollout.logps_and_entropy(uniform, targets, chunk_tokens=2, temperature=temperature)
    _, h_peaked = rollout.logps_and_entropy(peaked, targets, chunk_tokens=2, temperature=temperature)
    _, h_two = rollout.logps_and_entropy(two, targets[:1, :1], temperature=temperature)
    torch.testing.assert_close(h_uniform, torch.full((2, 3), math.log(V)), rtol=0, atol=1e-5)
    assert (h_peaked.abs() < 1e-6).all()
    # probability-0 tokens (logits of -inf) add 0, not NaN
    torch.testing.assert_close(h_two, torch.tensor([[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])  # one position per chunk, uneven chunks, everything at once
def test_chunked_entropy_and_logps_match_the_full_vocabulary_computation(dtype, chunk):
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 4, 50)).to(dtype)
    targets = torch.randint(0, 50, (5, 4))
    for T in (1.0, 0.7):
        logp, h = rollout.logps_and_entropy(logits, targets, chunk_tokens=chunk, temperature=T)
        ref = (logits.float() / T).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        torch.testing.assert_close(logp, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(h, full_entropy(logits, T), rtol=0, atol=1e-5)
        assert h.dtype == torch.float32 and (h > 0).all() and (h < math.log(50)).all()
    # the temperature matters: the entropy at 0.7 is not the one at 1
    at_07 = rollout.logps_and_entropy(logits, targets, temperature=0.7)[1]
    assert (at_07 - full_entropy(logits, 1.0)).abs().max() > 0.1


def test_the_chunk_loop_makes_no_float32_tensor_of_the_whole_logits():
    """Every float32 tensor made is one chunk's (chunk_tokens positions x V) or [N, R]: never [N, R, V]."""
    N, R, V, chunk = 4, 32, 100, 16
    logits = torch.randn(N, R, V, dtype=torch.bfloat16)
    targets = torch.randint(0, V, (N, R))
    with LargestTensor(torch.float32) as chunked:
        rollout.logps_and_entropy(logits, targets, chunk_tokens=chunk, temperature=0.9)
    with LargestTensor(torch.float32) as full:
        full_entropy(logits, 0.9)
    assert chunked.largest == chunk * V
    assert full.largest == N * R * V  # the measure sees the straightforward computation's copy


def fake_batch(entropy, response_mask):
    N, R = response_mask.shape
    ids = torch.zeros(N, 2 + R, dtype=torch.long)
    return rollout.Rollout(["p"] * N, ["r"] * N, ids, torch.cat([torch.ones(N, 2, dtype=torch.long), response_mask], 1),
                           response_mask, torch.ones(N, dtype=torch.bool), 2, entropy=entropy)


def test_mean_entropy_is_the_mean_over_sampled_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    h = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [math.nan, math.nan, 77.0, 77.0]])
    got = loop.mean_entropy(infra.Dist(), fake_batch(h, mask))
    assert got == {"train/entropy": pytest.approx((1 + 2 + 3 + 4) / 4)}  # padding and NaN rows (not scored) left out
    assert loop.mean_entropy(infra.Dist(), fake_batch(None, mask)) == {}
    # select() keeps the entropy of the rows it takes
    assert torch.equal(fake_batch(h, mask).select(torch.tensor([1, 0])).entropy, h[[1, 0], :3])


@pytest.mark.parametrize("temperature", [0.9, 1.0])
def test_generate_records_the_entropy_the_policy_pass_computes(policy_and_batch, temperature):  # noqa: F811
    """--rollout hf --logp-source sampler: the entropy generate() recorded at each step equals the pi_t pass's
    (token_logps with entropy) and the full-vocabulary computation on a teacher-forced pass."""
    model, batch = policy_and_batch
    tok = infra.load_tokenizer(model.name_or_path)
    torch.manual_seed(1)
    rec = rollout.generate(model, tok, batch.prompts[::2], 2, 12, temperature, record_logp=True)
    assert rec.entropy.shape == rec.response_mask.shape
    with torch.no_grad():
        logp, scored = rollout.token_logps(model, rec, entropy=True)
        ids, mask, R = rec.input_ids, rec.attention_mask, rec.response_mask.shape[1]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        ref = torch.where(rec.response_mask.bool(), full_entropy(logits[:, -R - 1:-1], temperature), 0.0)
    torch.testing.assert_close(rec.entropy, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(scored, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(logp, rec.sampler_logp, rtol=0, atol=1e-4)
    assert (rec.entropy[rec.response_mask == 0] == 0).all() and (ref[rec.response_mask.bool()] > 0.1).all()


def first_row(toy_cache, out, *flags):
    cfg = config.parse_config(["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "1", "--print-every",
                               "1000", "--seed", "3"] + TINY + list(flags))
    run = train(cfg)
    with open(out / "metrics.jsonl") as f:
        return json.loads(f.readline()), run.policy.config.vocab_size


@pytest.mark.parametrize("algo", ["dar", "grpo"])
def test_online_runs_log_the_entropy(algo, toy_cache, tmp_path):
    """An online batch logs train/entropy, a real entropy (0 < H < log V), the same whether the pi_t pass or
    transformers' generate (--logp-source sampler) computed it: the first batch's samples are the same."""
    row, V = first_row(toy_cache, tmp_path / "policy", "--algo", algo)
    assert 0 < row["train/entropy"] < math.log(V)
    sampled, _ = first_row(toy_cache, tmp_path / "sampler", "--algo", algo, "--logp-source", "sampler")
    assert sampled["train/response_len"] == row["train/response_len"]  # the same samples
    assert sampled["train/entropy"] == pytest.approx(row["train/entropy"], abs=1e-4)
