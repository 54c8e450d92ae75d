"""--report-to: every row of metrics.jsonl reaches TensorBoard and wandb under the same names at the same steps,
read back with TensorBoard's own reader and from wandb's offline run files; the --sample-every table arrives as
one (and is in metrics.jsonl too); --resume continues the same tracker runs; a bad --report-to stops before any
model loads."""
import glob
import importlib.util
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
import wandb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

import config
import infra
from conftest import TINY, read_metrics, train

ARGS = TINY + ["--online-batch", "16", "--minibatch", "8", "--eval-prompts", "0", "--print-every", "1000",
               "--save-every", "2", "--sample-every", "2", "--report-to", "tensorboard,wandb"]


@pytest.fixture(scope="module", autouse=True)
def wandb_offline(tmp_path_factory):
    """wandb offline and silent, its config, cache and data directories in a temporary one: no network, nothing
    written under HOME."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=home, WANDB_CACHE_DIR=home / "cache",
                                WANDB_CONFIG_DIR=home / "config", WANDB_DATA_DIR=home / "data").items():
            mp.setenv(name, str(value))
        yield
    wandb.teardown()  # the wandb-core process this test process started


@pytest.fixture(scope="module")
def tracked(toy_cache, tmp_path_factory):
    """A run of 3 online batches reporting to both trackers (checkpoints after batches 2 and 3)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    train(config.parse_config(ARGS + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "3"]))
    return out


def tensorboard_scalars(out):
    """{tag: [(step, value)]} as TensorBoard reads the run's event files (all of them, purges applied)."""
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(path):
    """The records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB's log format (32 KiB
    blocks of chunks: crc32c, length, type 1 full / 2 first / 3 middle / 4 last) holding protobuf Records."""
    data, pos, chunk, records = open(path, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # a block's zero padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def wandb_history(run_dir):
    """{step: {key: value}} of an offline wandb run directory's history records (the values as logged)."""
    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    history = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items.pop("_step"), {}).update(items)
    return history


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))


def scalar_keys(row):
    """The keys of a metrics.jsonl row that the trackers plot (not the x-axis, not the sample table)."""
    return [k for k in row if k not in ("step", infra.SAMPLES)]


@pytest.mark.slow
def test_tensorboard_reads_back_every_metric_at_every_step(tracked):
    rows = read_metrics(tracked)
    acc, scalars = tensorboard_scalars(tracked)
    assert set(scalars) == set(scalar_keys(rows[0]))
    for k in scalars:  # float32 in the event files
        assert [s for s, _ in scalars[k]] == [r["step"] for r in rows], k
        assert all(close(v, r[k]) for (_, v), r in zip(scalars[k], rows)), (k, scalars[k], [r[k] for r in rows])
    (table,) = acc.Tensors("samples/text_summary")  # --sample-every 2: batch 2's table, as markdown text
    text = table.tensor_proto.string_val[0].decode()
    assert table.step == 2 and text.startswith("| prompt | response | reward |") and text.count("\n") == 5


@pytest.mark.slow
def test_offline_wandb_run_holds_every_metric_and_the_sample_table(tracked):
    rows = read_metrics(tracked)
    run_id = open(tracked / "wandb_id").read().strip()
    (run_dir,) = glob.glob(str(tracked / "wandb" / f"offline-run-*-{run_id}"))
    history = wandb_history(run_dir)
    assert sorted(history) == [1, 2, 3]
    for r in rows:
        logged = history[r["step"]]
        assert all(close(logged[k], r[k]) for k in scalar_keys(r)), r["step"]
    assert logged.keys() - set(r) == {"_runtime", "_timestamp"}  # nothing else (no table at batch 3)
    assert history[2]["samples/_type"] == "table-file"  # a wandb.Table (nested keys joined with /)
    saved = json.load(open(os.path.join(run_dir, "files", history[2]["samples/path"])))
    assert saved["columns"] == ["prompt", "response", "reward"] and len(saved["data"]) == 4
    assert saved["data"] == [list(s.values()) for s in rows[1]["samples"]]  # the table metrics.jsonl holds
    (text,) = tensorboard_scalars(tracked)[0].Tensors("samples/text_summary")  # the same rows went to both
    assert all(prompt in text.tensor_proto.string_val[0].decode() for prompt, _, _ in saved["data"])


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs(tracked, toy_cache, tmp_path):
    """Killed after batch 3 before its checkpoint (latest rewound to batch 2), resumed to batch 4: TensorBoard
    shows batches 1-4 once each, batch 3 as the resume logged it; wandb continues the run with the same id."""
    out = tmp_path / "run"
    shutil.copytree(tracked, out)
    run_id = open(out / "wandb_id").read().strip()
    infra.write_atomic(str(out / "latest"), "ckpt-000002")
    first_row_3 = read_metrics(out)[2]
    train(config.parse_config(ARGS + ["--cache-dir", toy_cache, "--out-dir", str(out), "--steps", "4", "--resume"]))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["perf/seconds_per_batch"] != first_row_3["perf/seconds_per_batch"]  # batch 3 ran again
    acc, scalars = tensorboard_scalars(out)
    assert [t.step for t in acc.Tensors("samples/text_summary")] == [2, 4]
    for k in scalar_keys(rows[0]):
        assert [s for s, _ in scalars[k]] == [1, 2, 3, 4], k  # the killed run's batch 3 purged
        assert all(close(v, r[k]) for (_, v), r in zip(scalars[k], rows)), k
    assert open(out / "wandb_id").read().strip() == run_id
    run_dirs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(run_dirs) == 2 and all(d.endswith("-" + run_id) for d in run_dirs)  # `wandb sync` joins them
    resumed = wandb_history(run_dirs[1])
    assert sorted(resumed) == [3, 4]
    assert all(close(resumed[4][k], rows[3][k]) for k in scalar_keys(rows[3]))
    run_record = next(r.run for r in wandb_records(glob.glob(os.path.join(run_dirs[1], "*.wandb"))[0])
                      if r.WhichOneof("record_type") == "run")
    assert run_record.run_id == run_id


def test_report_to_is_checked_before_any_model_loads(monkeypatch):
    def check(value):
        with pytest.raises(SystemExit) as e:
            config.check_config(config.parse_config(["--report-to", value]), 1)
        return str(e.value)
    assert "unknown --report-to 'tensorbord'" in check("tensorbord")
    assert "none means no tracker" in check("none,wandb")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert "pip install wandb" in check("tensorboard,wandb")
    config.check_config(config.parse_config(["--report-to", "tensorboard"]), 1)  # installed: accepted
    assert config.trackers("none") == [] and config.trackers("tensorboard, wandb") == ["tensorboard", "wandb"]


def test_trackers_leave_the_random_streams_alone(tmp_path):
    """Starting and feeding the trackers draws nothing from python's, numpy's or torch's generator: a run with
    --report-to trains exactly as one without."""
    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()
    infra.seed_everything(0)
    expected = draws()
    infra.seed_everything(0)
    log = infra.Logger(config.Config(out_dir=str(tmp_path), report_to="tensorboard,wandb"), infra.Dist(), 0)
    table = [{"prompt": "a prompt", "response": "a response", "reward": 1.0, "extra": "x"}]
    log.log({"step": 1, "train/loss": 0.5, infra.SAMPLES: table})
    log.close()
    assert draws() == expected
    assert json.loads(open(tmp_path / "metrics.jsonl").read()) == {"step": 1, "train/loss": 0.5, "samples": table}
