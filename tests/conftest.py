"""Shared fixtures: a toy pi_0 made once per test session (a short SFT, seconds), and the tiny flags that
make a run of dar.py take seconds."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SFT_STEPS = 40
TINY = ["--online-batch", "32", "--minibatch", "16", "--micro-batch", "8", "--eval-prompts", "16",
        "--sft-steps", str(SFT_STEPS), "--max-new-tokens", "12", "--lr", "1e-3"]


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """A cache directory holding the built toy model and a (briefly) supervised pi_0."""
    cache = str(tmp_path_factory.mktemp("cache"))
    import dar
    cfg = dar.parse_config(["--cache-dir", cache, "--sft-steps", str(SFT_STEPS), "--print-every", "1000"])
    base, sft = dar.ensure_toy_models(cfg, dar.Dist())
    assert os.path.isfile(os.path.join(sft, "config.json"))
    return cache


def run_dar(args, cwd, env_extra=None, launcher=None, timeout=600):
    """Run dar.py in a subprocess (optionally under torchrun); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "dar.py")] + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
