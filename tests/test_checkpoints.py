"""A checkpoint's manifest (every file's size and SHA-256, written last): --resume names a damaged checkpoint's files
and continues from the newest intact one, to the uninterrupted run's final metrics, or refuses with the list when
none is intact; eval.py and --export-hf name the files too. And pruning never deletes what `latest` or `best`
names, whatever --keep-checkpoints says."""
import json
import os
import shutil

import pytest

import config
import eval as evaluation
import infra
from conftest import TINY, TORCHRUN, comparable, read_metrics, run_dar, train


def flags(cache, out, steps):
    return TINY + ["--cache-dir", cache, "--out-dir", str(out), "--steps", str(steps), "--save-every", "1",
                   "--print-every", "1000"]


def truncate(file):
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)


def alter(file):  # one byte changed, the size kept: only the checksum can tell
    with open(file, "r+b") as f:
        f.seek(os.path.getsize(file) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_checkpoint_s_manifest_lists_every_file_with_its_size_and_checksum(tmp_path):
    ckpt = tmp_path / "ckpt-000001"
    (ckpt / "value").mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"state")
    (ckpt / "value" / "model.safetensors").write_bytes(b"weights")
    infra.write_manifest(str(ckpt))
    files = json.loads((ckpt / infra.MANIFEST).read_text())["files"]
    assert files == {"state.pt": {"size": 5, "sha256": infra.hashlib.sha256(b"state").hexdigest()},
                     "value/model.safetensors": {"size": 7, "sha256": infra.hashlib.sha256(b"weights").hexdigest()}}
    assert infra.checkpoint_damage(str(ckpt)) == ""
    (ckpt / "state.pt").write_bytes(b"stat")
    (ckpt / "value" / "model.safetensors").write_bytes(b"Weights")
    assert infra.checkpoint_damage(str(ckpt)) == "state.pt is truncated (4 of 5 bytes)"  # sizes first, no reading
    (ckpt / "state.pt").write_bytes(b"state")
    assert infra.checkpoint_damage(str(ckpt)) == "value/model.safetensors differs from its checksum"
    (ckpt / "state.pt").unlink()
    assert infra.checkpoint_damage(str(ckpt)) == "state.pt is missing"
    assert infra.checkpoint_damage(str(tmp_path)) is None  # no manifest: a plain directory, not checked


@pytest.mark.slow
@pytest.mark.parametrize("file, damage, why", [("model.safetensors", truncate, "is truncated"),
                                               ("state.pt", truncate, "is truncated"),
                                               ("state.pt", alter, "differs from its checksum")])
def test_a_damaged_newest_checkpoint_is_named_and_resume_continues_from_the_one_before(
        toy_cache, tmp_path, capsys, file, damage, why):
    out = tmp_path / "run"
    train(config.parse_config(flags(toy_cache, out, 3)))  # keeps ckpt-000002 and ckpt-000003
    whole = comparable(read_metrics(str(out)))
    damage(out / "ckpt-000003" / file)
    capsys.readouterr()
    for read in (lambda: infra.export_hf(str(out / "ckpt-000003"), str(tmp_path / "export")),
                 lambda: evaluation.evaluate_checkpoint(str(out), str(out / "ckpt-000003"), 4)):
        with pytest.raises(SystemExit, match=f"ckpt-000003 is damaged: {file} {why}"):
            read()
    assert not (tmp_path / "export").exists()
    train(config.parse_config(flags(toy_cache, out, 3) + ["--resume"]))
    err = capsys.readouterr().err
    assert f"checkpoint ckpt-000003 is damaged ({file} {why}" in err, err
    assert "--resume: continuing from ckpt-000002, the newest intact checkpoint" in err
    assert comparable(read_metrics(str(out))) == whole  # batch 3 again, to the uninterrupted run's metrics
    assert infra.checkpoint_damage(str(out / "ckpt-000003")) == ""  # written anew


@pytest.mark.slow
def test_resume_refuses_when_no_checkpoint_is_intact_and_reads_one_older_than_manifests(toy_cache, tmp_path, capsys):
    out = tmp_path / "run"
    train(config.parse_config(flags(toy_cache, out, 3)))  # keeps ckpt-000002 and ckpt-000003
    whole = comparable(read_metrics(str(out)))
    (out / "ckpt-000003" / infra.MANIFEST).unlink()  # ckpt-000002 has one: this one's was lost
    state = out / "ckpt-000002" / "state.pt"
    state.rename(tmp_path / "state.pt")
    with pytest.raises(SystemExit) as e:
        train(config.parse_config(flags(toy_cache, out, 3) + ["--resume"]))
    assert str(e.value) == (f"error: --resume: no intact checkpoint in {out} (ckpt-000003: manifest.json is missing | "
                            "ckpt-000002: state.pt is missing). Restore one from a copy, or start the run afresh in a "
                            "new --out-dir")
    (tmp_path / "state.pt").rename(state)
    (out / "ckpt-000002" / infra.MANIFEST).unlink()  # no checkpoint has a manifest: written before they existed
    shutil.rmtree(out / "ckpt-000003")
    capsys.readouterr()
    train(config.parse_config(flags(toy_cache, out, 3) + ["--resume"]))
    err = capsys.readouterr().err
    assert "checkpoint ckpt-000003 is damaged (the directory is missing); skipped" in err, err
    assert "warning: ckpt-000002 has no manifest.json" in err and "continuing from ckpt-000002" in err
    assert comparable(read_metrics(str(out))) == whole


@pytest.mark.slow
def test_a_sharded_checkpoint_s_manifest_covers_every_rank_s_shards(toy_cache, tmp_path):
    """--fsdp on 2 ranks: the manifest lists both ranks' shard files; one of them truncated in the newest checkpoint
    is named, and --resume on 2 ranks continues from the one before, to the uninterrupted run's final metrics."""
    out = tmp_path / "run"
    args = flags(toy_cache, out, 3) + ["--fsdp", "--micro-batch", "4", "--eval-prompts", "8"]
    p = run_dar(args, cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    whole = comparable(read_metrics(str(out)))
    files = json.loads((out / "ckpt-000003" / infra.MANIFEST).read_text())["files"]
    shards = sorted(f for f in files if f.startswith("dcp/") and f.endswith(".distcp"))
    assert len(shards) == 2 and "dcp/.metadata" in files and "state.pt" in files, files
    truncate(out / "ckpt-000003" / shards[1])
    p = run_dar(args + ["--resume"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"checkpoint ckpt-000003 is damaged ({shards[1]} is truncated" in p.stderr, p.stderr[-3000:]
    assert "--resume: continuing from ckpt-000002, the newest intact checkpoint" in p.stderr
    assert comparable(read_metrics(str(out))) == whole


@pytest.mark.parametrize("keep", [0, -100, 1])
def test_pruning_never_deletes_the_checkpoints_latest_and_best_name(tmp_path, keep):
    for step in (1, 2, 3, 4):
        os.makedirs(tmp_path / infra.checkpoint_name(step))
    infra.write_atomic(str(tmp_path / "latest"), "ckpt-000004")
    infra.write_atomic(str(tmp_path / "best"), "ckpt-000002")
    infra.prune_checkpoints(config.Config(out_dir=str(tmp_path), keep_checkpoints=keep))
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("ckpt-")) == ["ckpt-000002", "ckpt-000004"]
