"""A SIGKILL between any two writes of a run, at each write boundary in turn (infra.kill_point, set by the test-only
DAR_TEST_KILL_AT): the killed run, resumed, ends with the uninterrupted run's files: every metrics.jsonl row, `best`
and best.json, `latest`, final/ and eval.json. Each kill lands at the batch whose evaluation is the run's best, the
place where a best checkpoint could be lost."""
import json
import os
import signal

import pytest

import infra
import loop
from conftest import TINY, comparable, read_metrics, run_dar

STEPS = 4
# --lr 3e-3: on the toy task the evaluations after batches 1 and 3 are each the best so far, 2 and 4 are worse
FLAGS = TINY + ["--lr", "3e-3", "--steps", str(STEPS), "--eval-every", "1", "--eval-every-prompts", "16",
                "--save-every", "1", "--print-every", "1000"]


def read(path):
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    return json.loads(data) if path.endswith(".json") else data


def run_files(out):
    """What a run leaves behind (timings aside): its metrics rows, `latest`, `best`, best.json, the trained policy's
    weights and eval.json."""
    at = lambda *name: read(os.path.join(out, *name))
    return {"metrics": comparable(read_metrics(out)), "latest": at("latest"), "best": at("best"),
            "best.json": at("best.json"), "final": at("final", "model.safetensors"), "eval.json": at("eval.json")}


@pytest.fixture(scope="module")
def uninterrupted(toy_cache, tmp_path_factory):
    """The uninterrupted run's files, and the batches whose evaluation was the best so far (in order)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    p = run_dar(FLAGS + ["--cache-dir", toy_cache, "--out-dir", str(out)], cwd=out.parent)
    assert p.returncode == 0, p.stderr[-2000:]
    files, bests, best = run_files(str(out)), [], None
    for row in files["metrics"]:
        if loop.better_eval(row, best):
            bests.append(row["step"])
            best = row
    # the test's power: a best before the last batch, and a batch after it whose evaluation is worse
    assert files["best.json"]["step"] == bests[-1] and 1 < bests[-1] < STEPS and len(bests) >= 2, bests
    return files, bests


def kill_at(point, bests):
    """DAR_TEST_KILL_AT for `point` at the last new best (batch k), and what the run directory holds when it
    is killed there: (metrics rows, `latest`, checkpoint k exists, best.json's step, `best`, final/, eval.json)."""
    k, n, before = bests[-1], len(bests), f"ckpt-{bests[-2]:06d}"
    ckpt, prev = f"ckpt-{k:06d}", f"ckpt-{k - 1:06d}"
    last = f"ckpt-{STEPS:06d}"
    return {"metrics": (f"metrics:{k}", (k, prev, False, bests[-2], before, False, False)),
            "checkpoint": (f"checkpoint:{k}", (k, prev, True, bests[-2], before, False, False)),
            "latest": (f"latest:{k}", (k, ckpt, True, bests[-2], before, False, False)),
            "best.json": (f"best.json:{n}", (k, ckpt, True, k, before, False, False)),
            "best": (f"best:{n}", (k, ckpt, True, k, ckpt, False, False)),
            "final": ("final:1", (STEPS, last, True, k, ckpt, True, False)),
            "eval.json": ("eval.json:1", (STEPS, last, True, k, ckpt, True, False))}[point]


def killed_state(out, k):
    at = lambda name: os.path.join(out, name)
    return (len(read_metrics(out)), read(at("latest")).decode(), os.path.isdir(at(f"ckpt-{k:06d}")),
            read(at("best.json"))["step"], read(at("best")).decode(), os.path.isdir(at("final")),
            os.path.exists(at("eval.json")))


@pytest.mark.slow
@pytest.mark.parametrize("point", infra.KILL_POINTS)
def test_a_kill_at_each_write_boundary_resumes_to_the_uninterrupted_run_s_files(point, uninterrupted, toy_cache,
                                                                                  tmp_path):
    files, bests = uninterrupted
    out, (spec, expected) = tmp_path / "run", kill_at(point, bests)
    flags = FLAGS + ["--cache-dir", toy_cache, "--out-dir", str(out)]
    p = run_dar(flags, cwd=tmp_path, env_extra={"DAR_TEST_KILL_AT": spec})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert killed_state(str(out), bests[-1]) == expected  # killed just after that write, before the next
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # no write was under way
    p = run_dar(flags + ["--resume"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert run_files(str(out)) == files
