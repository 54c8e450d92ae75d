"""Shared fixtures: a toy pi_0 made once per test session (a short SFT, seconds), and the tiny flags that
make a run of dar.py take seconds."""
import os
import re
import select
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode  # the memory tests' counter (a private API)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402  (the project's modules, from ROOT)
import dar  # noqa: E402
import infra  # noqa: E402
import loop  # noqa: E402
import rollout  # noqa: E402

SFT_STEPS = 40


def pytest_configure(config):  # pytest's name for its own config object (not config.py)
    config.addinivalue_line("markers", "slow: trains a model, starts processes or servers, or runs vLLM; "
                                       "`pytest -m 'not slow'` leaves these out, `make test` runs everything")
    config.addinivalue_line("markers", "vllm_engine: starts an in-process vLLM engine; runs after the other tests")


def pytest_collection_modifyitems(items):
    """An in-process vLLM engine pins the process's CPU threads (torch.set_num_threads stops working for the rest
    of the session): the tests that start one run after all others, test_vllm.py's last (its final test closes
    an engine, which tears down vLLM's process-wide state). The sort is stable: file order otherwise."""
    items.sort(key=lambda item: 2 if item.path.name == "test_vllm.py" else
               1 if item.get_closest_marker("vllm_engine") else 0)


TINY = ["--online-batch", "32", "--minibatch", "16", "--micro-batch", "8", "--eval-prompts", "16",
        "--sft-steps", str(SFT_STEPS), "--max-new-tokens", "12", "--lr", "1e-3"]


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """A cache directory holding the built toy model and a (briefly) supervised pi_0."""
    cache = str(tmp_path_factory.mktemp("cache"))
    cfg = config.parse_config(["--cache-dir", cache, "--sft-steps", str(SFT_STEPS), "--print-every", "1000"])
    base, sft = loop.ensure_toy_models(cfg, infra.Dist())
    assert os.path.isfile(os.path.join(sft, "config.json"))
    return cache



@pytest.fixture(scope="module")
def annotator():
    """The stand-in annotator (`judge.py --serve`) on a free port: a real OpenAI-compatible HTTP endpoint that
    needs no model, rating the paper's prompts by word overlap (the toy rule on toy prompts). Yields its base URL."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "judge.py"), "--serve", "--task", "toy", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    m = re.search(r"http://\S+/v1", proc.stdout.readline() if ready else "")
    assert m, "the annotator server did not start"
    yield m.group(0)
    proc.terminate()
    proc.wait(10)

def train(cfg):
    """A run in this process, as `python dar.py` makes it (minus the final evaluation): loop.train with the
    algorithm's step function from dar.STEPS. Returns the Run."""
    return loop.train(cfg, infra.Dist(), dar.STEPS[cfg.algo])


# two ranks on this machine (gloo on CPU): the launcher for run_dar / start_dar
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def read_metrics(out):
    """A run's metrics.jsonl: one dict per logged online batch."""
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(rows):
    """Metrics rows without their timings (perf/*), which differ between otherwise identical runs."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def dar_env(env_extra=None):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))


def run_dar(args, cwd, env_extra=None, launcher=None, timeout=600):
    """Run dar.py in a subprocess (optionally under torchrun); returns the CompletedProcess. Past `timeout` the
    whole process group goes (torchrun's ranks too, which would otherwise live on as orphans) and the test fails
    with the output's tail, so a hang shows where it stopped."""
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "dar.py")] + args
    p = subprocess.Popen(cmd, cwd=cwd, env=dar_env(env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"dar.py ran past {timeout} s: {' '.join(cmd)}\nstdout tail:\n{out[-2000:]}\n"
                             f"stderr tail:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def start_dar(args, cwd, launcher=None):
    """dar.py in a background subprocess (optionally under torchrun), stdout discarded, stderr a pipe: the Popen
    (for faults to inject)."""
    return subprocess.Popen((launcher or [sys.executable]) + [os.path.join(ROOT, "dar.py"), *args], cwd=cwd,
                            env=dar_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def build_reward_model(path, padding_side="right"):
    """A tiny random Qwen2 sequence classifier (num_labels 1) with the toy tokenizer, saved at `path`: a real
    reward model for --judge reward_model, small enough for a CPU."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification
    import tasks
    tok = tasks.build_tokenizer()
    tok.padding_side = padding_side
    config = Qwen2Config(vocab_size=-(-len(tok) // 8) * 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, num_labels=1, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_causal_reward_model(path, padding_side="right"):
    """A tiny random Qwen2 causal LM with the toy tokenizer, saved at `path`: a reward model published the way
    Llama-3.1-Nemotron-70B-Reward-HF is (--judge reward_model reads one token's logit after the response).
    Untied embeddings: tied ones would make token 0's logit (the padding token's zero embedding) always 0."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import tasks
    tok = tasks.build_tokenizer()
    tok.padding_side = padding_side
    config = Qwen2Config(vocab_size=-(-len(tok) // 8) * 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def record_scales(monkeypatch):
    """The list of s that every backward through the fused head with a grad_hint found (rollout._scale_of; None:
    the gradient was not the hinted one, and the head recomputed its logits)."""
    seen, real = [], rollout._scale_of

    def scale_of(grad_out, coef):
        seen.append(real(grad_out, coef))
        return seen[-1]
    monkeypatch.setattr(rollout, "_scale_of", scale_of)
    return seen


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor (of `dtype`, when given) an operation makes while it is active:
    the memory tests' evidence that no [tokens, vocabulary] tensor is made."""

    def __init__(self, dtype=None):
        super().__init__()
        self.dtype, self.largest = dtype, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and self.dtype in (None, t.dtype):
                self.largest = max(self.largest, t.numel())
        return out
