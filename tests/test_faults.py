"""Faults injected into real runs: signals, a failing disk, a judge that goes away, NaN losses, a dead
or hung rank under torchrun, prompts too long for the context window, and untrusted artefacts (a model's own
code, a checkpoint holding pickled code). Each shows that the run keeps working or stops cleanly, naming what
to do, and that --resume ends where an uninterrupted run ends."""
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import dar
import infra
import judge
import loop
from conftest import ROOT, TINY, TORCHRUN, comparable, dar_env, read_metrics, run_dar, start_dar, train


def final_metrics(out):
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # every batch once, none lost or doubled
    return comparable(rows)[-1]


def wait_for_batches(out, n, timeout=300):
    """Block until the run in `out` has logged n online batches (n = 0: until its metrics file exists)."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n) and time.time() < deadline:
        time.sleep(0.01)
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_after_the_batch_and_resume_matches(toy_cache, tmp_path, sig, code):
    """SIGTERM (pre-emption) and a first Ctrl-C (SIGINT) alike: the batch finishes, is checkpointed, the run
    names the signal and exits with the shell's code for it; --resume ends with the uninterrupted run's metrics."""
    flags = TINY + ["--cache-dir", toy_cache, "--steps", "25", "--save-every", "1000", "--print-every", "1000"]
    whole = tmp_path / "whole"
    assert run_dar(flags + ["--out-dir", str(whole)], cwd=tmp_path).returncode == 0
    out = tmp_path / "killed"
    proc = start_dar(flags + ["--out-dir", str(out)], tmp_path)
    metrics = wait_for_batches(out, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 25 and f"{sig.name} after online batch {done}" in err and "Traceback" not in err
    assert ("Ctrl-C again stops at once" in err) == (sig == signal.SIGINT)  # the first Ctrl-C says what comes
    assert open(out / "latest").read().strip() == f"ckpt-{done:06d}"  # the batch's work was kept
    p = run_dar(flags + ["--out-dir", str(out), "--resume"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_metrics(out) == final_metrics(whole)


def read_until(stream, text, timeout=300):
    """Read lines of `stream` until one holds `text`; returns what was read."""
    seen, deadline = "", time.time() + timeout
    while text not in seen and time.time() < deadline:
        line = stream.readline()
        if not line:
            break
        seen += line
    return seen


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_naming_the_last_checkpoint(toy_cache, tmp_path):
    out = tmp_path / "run"
    proc = start_dar(TINY + ["--cache-dir", toy_cache, "--steps", "40", "--save-every", "2", "--print-every", "1000",
                             "--max-new-tokens", "48", "--out-dir", str(out)], tmp_path)
    wait_for_batches(out, 3)
    proc.send_signal(signal.SIGINT)
    first = read_until(proc.stderr, "Ctrl-C again stops at once")  # printed at once, from the handler
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = first + err
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    last = out / (out / "latest").read_text().strip()
    assert f"second Ctrl-C: stopped now, without a checkpoint of this batch; the last checkpoint is {last}" in err
    assert "after online batch" not in err  # no checkpoint of the interrupted batch was announced
    assert all(int(d[len("ckpt-"):]) % 2 == 0 for d in os.listdir(out) if d.startswith("ckpt-"))  # none extra


@pytest.mark.slow
def test_ctrl_c_while_the_models_load_stops_with_one_line(toy_cache, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dar.py"), *TINY, "--cache-dir", toy_cache,
                             "--out-dir", str(out), "--steps", "2"], cwd=tmp_path, env=dar_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    read_until(proc.stdout, "settings:")  # the settings line: the flags are checked, the models not yet loaded
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "Ctrl-C: stopped before the first checkpoint; nothing to resume", err
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_while_torch_imports_ends_without_a_traceback(tmp_path):
    """In the first seconds (torch and transformers importing) SIGINT takes its default action, as in a C program:
    the process ends by the signal (the shell's code 130) with nothing printed."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "dar.py"), "--out-dir", str(tmp_path / "run")],
                            cwd=tmp_path, env=dar_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # importing torch alone takes longer
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT and err == "", err[-2000:]


@pytest.mark.slow
def test_ctrl_c_under_torchrun_checkpoints_on_both_ranks_and_resume_matches(toy_cache, tmp_path):
    """Ctrl-C in a terminal signals its whole foreground process group: here torchrun, which starts each rank in
    a session of its own and passes the SIGINT on to them. Both ranks finish the batch they agree on, one
    checkpoint is written, and --resume on 2 ranks ends with an uninterrupted 2-rank run's final metrics."""
    flags = TINY + ["--cache-dir", toy_cache, "--steps", "8", "--save-every", "1000", "--print-every", "1000"]
    whole = tmp_path / "whole"
    p = run_dar(flags + ["--out-dir", str(whole)], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(TORCHRUN + [os.path.join(ROOT, "dar.py"), *flags, "--out-dir", str(out)], cwd=tmp_path,
                            env=dar_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a process group of its own, as a terminal's job has
    metrics = wait_for_batches(out, 3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 8 and f"SIGINT after online batch {done}" in err, err[-3000:]
    assert err.count("Ctrl-C again stops at once") == 1 and "KeyboardInterrupt" not in err  # rank 0 speaks
    assert open(out / "latest").read().strip() == f"ckpt-{done:06d}"
    p = run_dar(flags + ["--out-dir", str(out), "--resume"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_metrics(out) == final_metrics(whole)


class FailingAfter:
    """The toy gold judge for `good` calls, then a judge whose every answer is invalid (a server gone away)."""

    def __init__(self, good):
        self.inner, self.calls, self.good = judge.make_judge("toy_gold"), 0, good

    def __call__(self, prompts, responses, ended):
        self.calls += 1
        if self.calls <= self.good:
            return self.inner(prompts, responses, ended)
        return judge.Judgment([math.nan] * len(prompts), len(prompts), {"unreachable": len(prompts)})


def params(run):
    return torch.cat([p.detach().flatten() for p in run.policy.parameters()])


@pytest.mark.slow
def test_a_failing_judge_stops_before_training_on_it_and_resume_matches(toy_cache, tmp_path, monkeypatch):
    base = TINY + ["--cache-dir", toy_cache, "--steps", "6", "--save-every", "1000", "--print-every", "1000",
                   "--judge", "toy_gold"]
    whole = train(config.parse_config(base + ["--out-dir", str(tmp_path / "whole")]))
    out = str(tmp_path / "cut")
    failing = FailingAfter(4)
    monkeypatch.setattr(loop, "make_judge", lambda *a, **k: failing)
    with pytest.raises(SystemExit) as e:
        train(config.parse_config(base + ["--out-dir", out]))
    msg = str(e.value)
    assert "online batch 5" in msg and "100% of its judgments are invalid" in msg and "4 unreachable" not in msg
    assert "unreachable" in msg and "--resume" in msg and "ckpt-000004" in msg
    assert len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 4  # batch 5 was not trained on
    monkeypatch.undo()
    resumed = train(config.parse_config(base + ["--out-dir", out, "--resume"]))
    assert final_metrics(out) == final_metrics(str(tmp_path / "whole"))
    assert torch.equal(params(resumed), params(whole))


def serve_annotator():
    """A `judge.py --serve --task toy` on a free port: (process, base URL)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "judge.py"), "--serve", "--task", "toy", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "http://" in line, line
    return proc, line[line.index("http://"):].split()[0]


@pytest.mark.slow
def test_the_annotator_going_away_mid_run_stops_with_a_checkpoint_and_resume_continues(toy_cache, tmp_path):
    """The issue's scenario over real HTTP: the server dies after some batches; the run names the endpoint,
    keeps the batches done, and --resume against the restarted server (another port) finishes the run."""
    out = tmp_path / "run"
    flags = TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "40", "--save-every", "1000",
                    "--print-every", "1000", "--judge", "llm", "--judge-patience", "2", "--judge-timeout", "5",
                    "--eval-judge", "toy_gold"]
    server, url = serve_annotator()
    proc = start_dar(flags + ["--judge-url", url], tmp_path)
    metrics = wait_for_batches(out, 2)
    server.kill()
    server.wait(10)
    _, err = proc.communicate(timeout=300)
    done = len(metrics.read_text().splitlines())
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert f"online batch {done + 1}" in err and f"the annotator at {url}" in err and "--resume" in err
    assert "--judge-patience 2 s" in err  # its requests were retried for the patience, then the run stopped
    assert open(out / "latest").read().strip() == f"ckpt-{done:06d}"  # the batches done before are kept
    server, url = serve_annotator()
    try:
        p = run_dar(flags + ["--judge-url", url, "--resume"], cwd=tmp_path)
    finally:
        server.terminate()
        server.wait(10)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_metrics(str(out))["step"] == 40


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_leaves_the_previous_one_loadable(toy_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config.parse_config(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "4",
                                      "--save-every", "2", "--print-every", "1000"])
    real_save, calls = torch.save, []

    def disk_full_on_second(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", disk_full_on_second)
    with pytest.raises(SystemExit) as e:
        train(cfg)
    assert "could not write checkpoint ckpt-000004" in str(e.value) and "No space left" in str(e.value)
    assert "ckpt-000002" in str(e.value) and "--resume" in str(e.value)
    monkeypatch.undo()
    assert open(out / "latest").read().strip() == "ckpt-000002"
    assert sorted(os.listdir(out)) == ["ckpt-000002", "config.json", "data.json", "latest", "metrics.jsonl"]  # no .tmp
    state = torch.load(out / "ckpt-000002" / "state.pt", weights_only=True)
    assert state["step"] == 2
    infra.load_model(str(out / "ckpt-000002"), cfg, torch.device("cpu"))  # loads
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "4", "--save-every", "2",
                        "--print-every", "1000", "--resume"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_metrics(str(out))["step"] == 4


def run_with_file_size_limit(args, cwd, limit):
    """dar.py in a subprocess whose files cannot grow past `limit` bytes (RLIMIT_FSIZE): a write past it fails with
    EFBIG, as on a full disk, for root too (chmod stops no write of root's). Python ignores the SIGXFSZ that comes
    with it, so the writer sees the error: OSError in Python, a RuntimeError in torch.save's writer, a
    SafetensorError in safetensors. Returns the CompletedProcess."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, os.path.join(ROOT, "dar.py"), *args], cwd=cwd, env=dar_env(),
                          capture_output=True, text=True, timeout=600, preexec_fn=limit_files)


def one_error_line(p):
    """The run's one line of error (its last on stderr), after checking it stopped with no traceback."""
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and p.stderr.strip().splitlines()[-1] == lines[0], p.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_a_write_that_fails_stops_in_one_line_and_keeps_the_previous_files(toy_cache, tmp_path):
    """Real write failures (a file-size limit: EFBIG) in each of a run's writers: final/ (safetensors), a checkpoint's
    state.pt (torch.save's own writer: "[enforce fail at inline_container.cc...]"), a metrics.jsonl row. Each stops
    the run in one line naming the path and the cause; the previous checkpoint, final/ and the metrics rows stay
    intact, and --resume finishes the run."""
    out = tmp_path / "run"
    flags = TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--optimizer", "adamw", "--save-every", "1",
                    "--eval-prompts", "0", "--print-every", "1000"]
    assert run_dar(flags + ["--steps", "2"], cwd=tmp_path).returncode == 0
    weights = (out / "final" / "model.safetensors").read_bytes()
    state_size = (out / "ckpt-000002" / "state.pt").stat().st_size  # AdamW's moments: twice the weights
    assert 1_000_000 < len(weights) < 2_000_000 < state_size

    # final/ again (a resume of a finished run writes it), its weights past the limit: the old final/ stays
    line = one_error_line(run_with_file_size_limit(flags + ["--steps", "2", "--resume"], tmp_path, 1_000_000))
    assert line.startswith(f"error: could not write {out / 'final'} (SafetensorError: ") and "File too large" in line
    assert (out / "final" / "model.safetensors").read_bytes() == weights and not (out / "final.tmp").exists()

    # checkpoint 3: its weights fit, its state.pt does not
    line = one_error_line(run_with_file_size_limit(flags + ["--steps", "3", "--resume"], tmp_path, 2_000_000))
    assert line.startswith(f"error: could not write checkpoint ckpt-000003 in {out} (RuntimeError: [enforce fail "
                           "at inline_container.cc"), line
    assert "ckpt-000002" in line and "--resume" in line
    assert (out / "latest").read_text() == "ckpt-000002" and not list(out.glob("ckpt-000003*"))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # batch 3's row, logged before its checkpoint

    # a metrics row: the file may not grow past what this run starts with, plus half a row
    rows = (out / "metrics.jsonl").read_text().splitlines()[:2]  # what --resume from ckpt-000002 keeps
    limit = max(len("\n".join(rows)) + 1, (out / "config.json").stat().st_size) + len(rows[-1]) // 2
    line = one_error_line(run_with_file_size_limit(flags + ["--steps", "3", "--resume"], tmp_path, limit))
    assert line.startswith(f"error: could not append online batch 3's row to {out / 'metrics.jsonl'} (File too large")
    assert (out / "metrics.jsonl").read_text().splitlines() == rows  # no half row
    assert (out / "latest").read_text() == "ckpt-000002"

    p = run_dar(flags + ["--steps", "3", "--resume"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_metrics(str(out))["step"] == 3 and (out / "latest").read_text() == "ckpt-000003"


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "best.json"
    infra.write_atomic(str(path), "old")
    os.mkdir(tmp_path / "best.json.tmp")  # where the new file would be written: a failure for root too
    with pytest.raises(SystemExit, match=f"error: could not write {path} \\(Is a directory"):
        infra.write_atomic(str(path), b"new")
    assert path.read_text() == "old"
    os.rmdir(tmp_path / "best.json.tmp")
    infra.write_atomic(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["best.json"]


def test_a_resumed_run_keeps_the_rows_up_to_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in (1, 2, 3)) + '{"step": 4, "train/lo')
    assert infra.rows_up_to(str(path), 2) == ['{"step": 1}\n', '{"step": 2}\n']
    assert infra.rows_up_to(str(path), 9) == ['{"step": 1}\n', '{"step": 2}\n', '{"step": 3}\n']  # a cut row: gone
    assert infra.rows_up_to(str(path), 0) == []


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_moment_then_resume_matches(toy_cache, tmp_path, trial):
    """SIGKILL, no warning, at a random time (checkpoints every batch, so kills land in writes too): the newest
    complete checkpoint resumes to the same final metrics as an uninterrupted run."""
    import random
    flags = TINY + ["--cache-dir", toy_cache, "--steps", "12", "--save-every", "1", "--print-every", "1000"]
    whole = tmp_path / "whole"
    assert run_dar(flags + ["--out-dir", str(whole)], cwd=tmp_path).returncode == 0
    out = tmp_path / "killed"
    proc = start_dar(flags + ["--out-dir", str(out)], tmp_path)
    wait_for_batches(out, 0)
    time.sleep(random.Random(trial).uniform(0.2, 2.0))
    proc.kill()
    proc.communicate(timeout=30)  # drains the stderr pipe too
    latest = out / "latest"
    if latest.exists():  # whatever `latest` names is complete
        ckpt = out / latest.read_text().strip()
        assert (ckpt / "state.pt").is_file() and (ckpt / "config.json").is_file()
    p = run_dar(flags + ["--out-dir", str(out), "--resume"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_metrics(str(out)) == final_metrics(str(whole))


@pytest.mark.slow
def test_the_api_key_appears_in_no_file_and_no_output(toy_cache, tmp_path):
    """The annotator's key comes from the environment and is sent as a header, never written: a grep of the
    whole run directory (configs, metrics, checkpoints, optimizer state) and of both output streams."""
    secret = "sk-test-4c1d9e7f0a2b"
    server, url = serve_annotator()
    out = tmp_path / "run"
    try:
        p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--save-every", "1",
                            "--judge", "llm", "--judge-url", url, "--eval-judge", "toy_gold"], cwd=tmp_path,
                    env_extra={"DAR_JUDGE_API_KEY": secret})
    finally:
        server.terminate()
        server.wait(10)
    assert p.returncode == 0, p.stderr[-2000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert any(f.endswith("state.pt") for f in files) and any(f.endswith("config.json") for f in files)
    for f in files:
        assert secret.encode() not in open(f, "rb").read(), f
    assert secret not in p.stdout and secret not in p.stderr
    assert json.load(open(out / "config.json"))["judge_api_key_env"] == "DAR_JUDGE_API_KEY"  # the name only


def poison(monkeypatch, bad_batches):
    """Make the loss NaN in the given online batches (1-based), as an overflow would."""
    batch_no, real_sample, real_loss = [0], dar.sample, dar.weighted_sft_loss

    def sample(*a, **k):
        batch_no[0] += 1
        return real_sample(*a, **k)

    def loss(*a, **k):
        out = real_loss(*a, **k)
        return out * math.nan if batch_no[0] in bad_batches else out
    monkeypatch.setattr(dar, "sample", sample)
    monkeypatch.setattr(dar, "weighted_sft_loss", loss)


@pytest.mark.slow
def test_a_nan_batch_is_skipped_and_reported(toy_cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = config.parse_config(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "4",
                                      "--save-every", "2", "--print-every", "1000"])
    poison(monkeypatch, {2})
    run = train(cfg)
    rows = read_metrics(out)
    assert [r["train/nonfinite_batches_in_a_row"] for r in rows] == [0, 1, 0, 0]
    assert math.isnan(rows[1]["train/loss"]) and all(math.isfinite(r["train/loss"]) for r in rows[2:])
    assert torch.isfinite(params(run)).all()  # the NaN updates never reached the weights
    printed = capsys.readouterr()
    assert "online batch 2: non-finite loss" in printed.out + printed.err
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt-")) == ["ckpt-000004"]  # none after batch 2


@pytest.mark.slow
def test_repeated_nan_batches_stop_at_the_last_good_checkpoint(toy_cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = config.parse_config(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "8",
                                      "--save-every", "1", "--print-every", "1000"])
    poison(monkeypatch, {3, 4, 5, 6, 7, 8})
    with pytest.raises(SystemExit) as e:
        train(cfg)
    assert f"non-finite loss in {loop.MAX_NONFINITE_BATCHES} online batches in a row" in str(e.value)
    assert "ckpt-000002" in str(e.value) and open(out / "latest").read().strip() == "ckpt-000002"


def worker(launcher_pid, rank):
    """The pid of the torchrun worker (a child of launcher_pid) whose environment has RANK=rank (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


@pytest.mark.slow
def test_a_dead_rank_brings_the_job_down_and_resume_matches(toy_cache, tmp_path):
    """SIGKILL one of two ranks: the other fails in its next collective, torchrun ends the job within seconds
    (no hang), and --resume on two ranks ends where an uninterrupted two-rank run ends."""
    flags = TINY + ["--cache-dir", toy_cache, "--steps", "10", "--save-every", "2", "--print-every", "1000"]
    whole = tmp_path / "whole"
    p = run_dar(flags + ["--out-dir", str(whole)], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "killed"
    proc = start_dar(flags + ["--out-dir", str(out)], tmp_path, launcher=TORCHRUN)
    wait_for_batches(out, 3)
    os.kill(worker(proc.pid, 1), signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 60, err[-2000:]
    assert "error: rank 0 failed in online batch" in err and "--resume" in err, err[-2000:]
    ckpt = out / (out / "latest").read_text().strip()
    assert (ckpt / "state.pt").is_file() and (ckpt / "config.json").is_file()
    p = run_dar(flags + ["--out-dir", str(out), "--resume"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_metrics(str(out)) == final_metrics(str(whole))


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_after_the_dist_timeout(toy_cache, tmp_path):
    """SIGSTOP one of two ranks (a hang, not a death): the other gives up after --dist-timeout (15 s here), names
    the rank that stopped answering, and torchrun ends the job; without the timeout it would wait 30 minutes."""
    out = tmp_path / "run"
    proc = start_dar(TINY + ["--cache-dir", toy_cache, "--steps", "40", "--save-every", "2", "--print-every",
                             "1000", "--dist-timeout", "0.25", "--out-dir", str(out)], tmp_path, launcher=TORCHRUN)
    wait_for_batches(out, 3)
    hung = worker(proc.pid, 1)
    os.kill(hung, signal.SIGSTOP)
    t0 = time.time()
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        try:
            os.kill(hung, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0 and 15 <= time.time() - t0 < 150, err[-2000:]
    assert "error: rank 0 failed in online batch" in err and "Timed out" in err, err[-2000:]
    assert "rank 1 stopped answering (hung)" in err, err[-2000:]  # named through torchrun's store


# ---------------------------------------------------------------------------------------------------
# Untrusted artefacts and over-long prompts
# ---------------------------------------------------------------------------------------------------
def model_with_its_own_code(path, marker):
    """The toy model re-declared as a custom architecture (an auto_map to a modeling file shipped beside the
    weights), whose code touches `marker` when it runs."""
    import tasks
    tasks.build_toy_model(str(path), seed=0)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="dar_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "class CustomConfig(Qwen2Config):\n    model_type = 'dar_custom'\n"
        "class CustomForCausalLM(Qwen2ForCausalLM):\n    config_class = CustomConfig\n")


def test_a_model_s_own_code_runs_only_with_trust_remote_code(tmp_path):
    path, marker = tmp_path / "custom", tmp_path / "code-ran"
    model_with_its_own_code(path, marker)
    with pytest.raises(SystemExit, match="ships its own Python code.*--trust-remote-code"):
        infra.load_model(str(path), config.Config(), torch.device("cpu"))
    assert not marker.exists()  # refused without running a line of it
    model = infra.load_model(str(path), config.Config(trust_remote_code=True), torch.device("cpu"))
    assert type(model).__name__ == "CustomForCausalLM" and marker.exists()


@pytest.mark.slow
def test_a_checkpoint_holding_pickled_code_is_refused(toy_cache, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    flags = TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--save-every", "1", "--print-every", "1000"]
    train(config.parse_config(flags + ["--steps", "1"]))
    state = out / "ckpt-000001" / "state.pt"

    class Payload:  # what a tampered checkpoint could hold: a call made while unpickling
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({**torch.load(state, weights_only=True), "extra": Payload()}, state)
    infra.write_manifest(str(state.parent))  # its manifest made to match: a checksum, not a signature
    with pytest.raises(SystemExit, match=r"state.pt holds objects other than tensors.*posix.system.*not loaded"):
        train(config.parse_config(flags + ["--steps", "2", "--resume"]))
    assert not marker.exists()


@pytest.mark.slow
def test_the_served_annotator_listens_on_localhost_only():
    server, url = serve_annotator()
    server.terminate()
    server.wait(10)
    assert url.startswith("http://127.0.0.1:"), url


@pytest.mark.slow
def test_prompts_longer_than_the_limit_are_skipped_and_counted(toy_cache, tmp_path):
    import rollout
    import tasks
    out = tmp_path / "run"
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "2", "--print-every", "1000",
                        "--max-prompt-tokens", "33"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    task, tok = tasks.toy_task(), tasks.build_tokenizer()
    longer = lambda prompts: sum(len(ids) > 33 for ids in tok(rollout.render_prompts(tok, prompts),
                                                                add_special_tokens=False)["input_ids"])
    skipped = json.load(open(out / "data.json"))["long_prompts_skipped"]
    assert skipped["train_prompts"] == longer(task.train_prompts) > 0
    assert skipped["eval_prompts"] == longer(task.eval_prompts) > 0
    assert f"{skipped['train_prompts']} training prompts, {skipped['eval_prompts']} evaluation prompts" in p.stdout
    # the window (512 positions) minus the response must hold the limit
    p = run_dar(TINY + ["--cache-dir", toy_cache, "--out-dir", str(tmp_path / "too-long"), "--steps", "1",
                        "--max-prompt-tokens", "510"], cwd=tmp_path)
    assert p.returncode == 1 and "--max-prompt-tokens 510 plus --max-new-tokens 12 leave no room in the model's " \
                                 "context window of 512 tokens" in p.stderr, p.stderr[-2000:]


def test_every_loader_refuses_a_directory_with_pickled_weights_only(tmp_path):
    """--model, --value-model and --reward-model are refused by fetch_from_hub before anything loads; a model
    directory loaded later (a checkpoint on --resume, eval.py's, --export-hf's) by infra.load_model and
    load_value_model, with the same message. The pickle never runs."""
    import pickle
    import tasks
    marker = tmp_path / "unpickled"

    class Boom:  # what a malicious pytorch_model.bin can do when unpickled
        def __reduce__(self):
            return open, (str(marker), "w")
    path = str(tmp_path / "pickled")
    tasks.build_toy_model(path, seed=0)
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Boom(), f)
    only_pickles = f"{path}: this project loads safetensors weights only"
    for argv in (["--model", path], ["--algo", "ppo", "--value-model", path],
                 ["--judge", "reward_model", "--reward-model", path]):
        cfg = config.parse_config(argv + TINY)
        config.check_config(cfg, 1)
        with pytest.raises(SystemExit, match=f"error: {argv[-2]} {only_pickles}"):
            infra.fetch_from_hub(cfg, infra.Dist())
    with pytest.raises(SystemExit, match=f"error: model directory {only_pickles}.*convert"):
        infra.load_model(path, config.Config(), torch.device("cpu"))
    with pytest.raises(SystemExit, match=f"error: value model directory {only_pickles}"):
        infra.load_value_model(path, config.Config(), torch.device("cpu"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# The run directory: a new run never writes over a previous one; a resume on another number of ranks
# ---------------------------------------------------------------------------------------------------
def previous_run_dir(out, rows=7, first=4, last=8):
    """A run directory as a killed run leaves it: `rows` metrics rows, checkpoints first..last, final/, latest."""
    os.makedirs(out / "final")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1}) + "\n" for i in range(rows)))
    for step in range(first, last + 1):
        os.makedirs(out / infra.checkpoint_name(step))
    (out / "latest").write_text(infra.checkpoint_name(last))
    (out / "config.json").write_text("{}")
    return out


def test_what_counts_as_a_previous_run(tmp_path):
    out = previous_run_dir(tmp_path / "run")
    assert infra.previous_run(str(out)) == ("metrics.jsonl with 7 rows, checkpoints ckpt-000004..ckpt-000008, "
                                            "final/, latest, config.json")
    assert infra.previous_run(str(tmp_path / "absent")) == ""
    os.makedirs(tmp_path / "empty")
    assert infra.previous_run(str(tmp_path / "empty")) == ""
    started = tmp_path / "started"  # data.json (a start's prompt counts, rewritten by every start) and other files
    os.makedirs(started / "ckpt-000001.tmp")  # a first checkpoint cut short: no run's work yet
    (started / "data.json").write_text("{}")
    (started / "notes.txt").write_text("mine")
    assert infra.previous_run(str(started)) == ""
    (started / "eval.json").write_text("{}")
    assert infra.previous_run(str(started)) == "eval.json"


def test_a_new_run_into_a_previous_run_is_refused_before_anything_loads(tmp_path, capsys):
    """One line naming the directory, what it holds and the ways on; nothing in it changes, and nothing loads:
    the toy model is not even built in the (empty) cache."""
    out, cache = previous_run_dir(tmp_path / "run"), tmp_path / "cache"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        dar.main(TINY + ["--cache-dir", str(cache), "--out-dir", str(out)])
    assert str(e.value) == (f"error: --out-dir {out} holds a previous run (metrics.jsonl with 7 rows, checkpoints "
                            "ckpt-000004..ckpt-000008, final/, latest, config.json); continue it with --resume, or "
                            f"start a new one there with --overwrite, which first moves it to {out}.old-1")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not cache.exists() and capsys.readouterr().out == ""


def test_overwrite_moves_the_previous_run_aside_to_a_free_name(tmp_path, capsys):
    """--overwrite moves the whole directory to OUT_DIR.old-N, the first free N, and says so; the new run then
    starts in an absent directory. An absent or empty one starts as it is, with or without --overwrite."""
    out = str(previous_run_dir(tmp_path / "run"))
    os.makedirs(out + ".old-1")
    cfg = config.parse_config(["--out-dir", out, "--overwrite"])
    infra.claim_run_dir(cfg, infra.Dist())
    assert not os.path.exists(out) and not os.listdir(out + ".old-1")
    assert infra.previous_run(out + ".old-2").startswith("metrics.jsonl with 7 rows")
    assert capsys.readouterr().out == (f"--overwrite: moved the previous run in {out} (metrics.jsonl with 7 rows, "
                                       f"checkpoints ckpt-000004..ckpt-000008, final/, latest, config.json) to "
                                       f"{out}.old-2\n")
    infra.claim_run_dir(cfg, infra.Dist())  # absent now: nothing to move
    os.makedirs(out)
    infra.claim_run_dir(config.parse_config(["--out-dir", out]), infra.Dist())  # empty: starts as it is
    assert os.path.isdir(out) and not os.path.exists(out + ".old-3")


@pytest.mark.slow
def test_a_second_run_into_a_run_directory_keeps_the_first(toy_cache, tmp_path):
    """The mistake after a Ctrl-C: the same command again. Refused in one line; --overwrite then keeps the first
    run whole in OUT_DIR.old-1 (its metrics, checkpoint and final/), and the new run writes a fresh directory."""
    out = tmp_path / "run"
    flags = TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "1", "--save-every", "1",
                    "--print-every", "1000", "--eval-prompts", "0"]
    assert run_dar(flags, cwd=tmp_path).returncode == 0
    first = (out / "metrics.jsonl").read_text()
    p = run_dar(flags, cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.strip() == (
        f"error: --out-dir {out} holds a previous run (metrics.jsonl with 1 row, checkpoint ckpt-000001, final/, "
        f"latest, config.json); continue it with --resume, or start a new one there with --overwrite, which first "
        f"moves it to {out}.old-1"), p.stderr[-2000:]
    assert (out / "metrics.jsonl").read_text() == first
    p = run_dar(flags + ["--steps", "2", "--overwrite"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"--overwrite: moved the previous run in {out} (" in p.stdout
    old = tmp_path / "run.old-1"
    assert (old / "metrics.jsonl").read_text() == first and (old / "ckpt-000001" / "state.pt").is_file()
    assert (old / "final" / "config.json").is_file()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # the new run's alone
    assert json.loads((out / "config.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_refuses_or_moves_the_previous_run(toy_cache, tmp_path):
    """Two ranks: the refusal is printed once; --overwrite moves the directory once (rank 1 waits for rank 0's
    word, and neither moves it a second time to .old-2), and the two ranks train in the fresh directory."""
    out = previous_run_dir(tmp_path / "run")
    flags = TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "1", "--print-every", "1000",
                    "--eval-prompts", "0"]
    p = run_dar(flags, cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode != 0 and p.stderr.count(f"error: --out-dir {out} holds a previous run") == 1, p.stderr[-2000:]
    p = run_dar(flags + ["--overwrite"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("--overwrite: moved the previous run") == 1
    assert infra.previous_run(str(out) + ".old-1").startswith("metrics.jsonl with 7 rows")
    assert not os.path.exists(str(out) + ".old-2") and [r["step"] for r in read_metrics(out)] == [1]


@pytest.mark.slow
def test_a_resume_on_another_number_of_ranks_says_what_changes_and_goes_on(toy_cache, tmp_path):
    """DDP, 1 -> 2 -> 1 ranks: each resume prints the line (not bit-exact: the prompts are split over other
    ranks, sampled from other random streams) and the run goes on, every batch logged once."""
    out = tmp_path / "run"
    flags = TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--save-every", "1", "--print-every", "1000",
                    "--eval-prompts", "0"]
    assert run_dar(flags + ["--steps", "1"], cwd=tmp_path).returncode == 0
    p = run_dar(flags + ["--steps", "2", "--resume"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("--resume: ckpt-000001 was written by 1 rank and this run has 2: it goes on, but not bit "
                          "for bit as 1 rank would have: each online batch has the same prompts, split over 2 ranks, "
                          "and their responses are sampled from other random streams (rank 0 continues its random "
                          "stream, rank 1 starts from --seed + 1000 r)") == 1, p.stdout[-2000:]
    p = run_dar(flags + ["--steps", "3", "--resume"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--resume: ckpt-000002 was written by 2 ranks and this run has 1: it goes on" in p.stdout
    p = run_dar(flags + ["--steps", "4", "--resume"], cwd=tmp_path)  # the same number again: nothing to say
    assert p.returncode == 0 and "was written by" not in p.stdout, p.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
