"""--fsdp (FSDP2) on CPU with gloo: the sharded run makes the updates the DDP run makes, its sharded
checkpoints resume on 2 ranks and on 1, and its models come out as ordinary Hugging Face directories."""
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

import config
import infra
import loop
from conftest import TINY, TORCHRUN, comparable, read_metrics, run_dar

pytestmark = pytest.mark.slow  # every test here starts torchrun (FSDP2 across 2 ranks)

# micro-batches of 4 on a rank's minibatch of 8: gradients accumulate without a sync on the first
FLAGS = TINY + ["--micro-batch", "4", "--print-every", "1000", "--sample-every", "1000", "--eval-prompts", "8"]


def weights(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


def train(tmp_path, name, args, launcher=TORCHRUN):
    out = tmp_path / name
    p = run_dar(FLAGS + args + ["--out-dir", str(out)], cwd=tmp_path, launcher=launcher)
    assert p.returncode == 0, p.stderr[-3000:]
    return str(out)


@pytest.mark.parametrize("algo, extra", [("dar", []), ("dar", ["--gradient-checkpointing"]), ("ppo", []),
                                         ("grpo", []), ("iter_sft", []), ("online_dpo", []), ("dpo", []),
                                         ("sft", [])])  # every step function
def test_fsdp_makes_the_updates_ddp_makes(algo, extra, toy_cache, tmp_path):
    """Same training metrics (losses, gradient norms, rewards, KL, ...) and final parameters as DDP on 2 ranks,
    to float32 rounding (the sharded Adafactor reduces in another order). PPO adds the value model, whose
    head [1, d] is sharded by columns."""
    args = ["--cache-dir", toy_cache, "--algo", algo, "--steps", "3", "--save-every", "1000"] + extra
    ddp, fsdp = train(tmp_path, "ddp", args), train(tmp_path, "fsdp", args + ["--fsdp"])
    for a, b in zip(read_metrics(ddp), read_metrics(fsdp), strict=True):
        assert "train/loss" in a and a.keys() == b.keys()
        for key in (k for k in a if k.startswith("train/")):
            # float32 rounding, grown over 3 updates (log-probs at T = 0.9 scale logit gradients by 1/T); a missed
            # or doubled gradient sync is off by orders of magnitude more
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    w_ddp, w_fsdp = weights(os.path.join(ddp, "final")), weights(os.path.join(fsdp, "final"))
    assert w_ddp.keys() == w_fsdp.keys()  # tied embeddings saved once, as save_pretrained does
    pi_0 = weights(os.path.join(loop.toy_paths(config.parse_config(["--cache-dir", toy_cache, "--sft-steps", "40"]))[1],
                                    "final"))
    moved = max((w_ddp[k] - pi_0[k]).abs().max().item() for k in w_ddp)
    assert moved > 1e-3  # the runs trained
    assert max((w_ddp[k] - w_fsdp[k]).abs().max().item() for k in w_ddp) < 1e-4


def test_adamw_under_ddp_and_fsdp2_makes_the_updates_of_one_process(toy_cache, tmp_path):
    """--optimizer adamw: torch's AdamW keeps its moments as the parameters are, FSDP2's DTensor shards included
    (Adafactor's pre-hook, infra.shard_adafactor_state, is not installed for it). SFT's minibatch, split over 2
    ranks under DDP and sharded, makes one process's updates; the sharded run, stopped after batch 2 and resumed,
    continues from AdamW's restored moments."""
    args = ["--cache-dir", toy_cache, "--algo", "sft", "--optimizer", "adamw", "--warmup-steps", "0",
            "--save-every", "2"]
    one = train(tmp_path, "one", args + ["--steps", "3"], launcher=[sys.executable])
    ddp = train(tmp_path, "ddp", args + ["--steps", "3"])
    fsdp = train(tmp_path, "fsdp", args + ["--fsdp", "--steps", "2"])
    train(tmp_path, "fsdp", args + ["--fsdp", "--steps", "3", "--resume"])
    w_one = weights(os.path.join(one, "final"))
    for run in (ddp, fsdp):
        for a, b in zip(read_metrics(one), read_metrics(run), strict=True):
            assert a.keys() == b.keys()
            for key in (k for k in a if k.startswith("train/")):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (run, a["step"], key)
        w = weights(os.path.join(run, "final"))
        assert w.keys() == w_one.keys() and max((w[k] - w_one[k]).abs().max().item() for k in w) < 1e-5, run


def test_a_sharded_checkpoint_resumes_on_two_ranks_and_on_one(toy_cache, tmp_path):
    args = ["--cache-dir", toy_cache, "--fsdp", "--save-every", "2"]
    whole = train(tmp_path, "whole", args + ["--steps", "3"])
    cut = train(tmp_path, "cut", args + ["--steps", "2"])
    ckpt = os.path.join(cut, "ckpt-000002")
    assert os.path.isdir(os.path.join(ckpt, "dcp")) and not os.path.exists(os.path.join(ckpt, "model.safetensors"))
    at_2 = weights(os.path.join(cut, "final"))  # gathered from the 2 ranks' shards after batch 2
    exported = str(tmp_path / "exported")
    p = run_dar(["--export-hf", ckpt, "--out-dir", exported], cwd=tmp_path, launcher=[sys.executable])
    assert p.returncode == 0, p.stderr[-3000:]
    assert weights(exported).keys() == at_2.keys() and all(torch.equal(weights(exported)[k], at_2[k]) for k in at_2)
    one = str(tmp_path / "one")
    shutil.copytree(cut, one)  # a moved run directory resumes too
    # two ranks: the same run as one that never stopped
    train(tmp_path, "cut", args + ["--steps", "3", "--resume"])
    assert comparable(read_metrics(cut)) == comparable(read_metrics(whole))
    # one process (a process group of one, no torchrun) reads the 2 ranks' shards; --steps 2 leaves nothing to
    # train, so its final/ is what it read
    train(tmp_path, "one", args + ["--steps", "2", "--resume"], launcher=[sys.executable])
    w_one = weights(os.path.join(one, "final"))
    assert w_one.keys() == at_2.keys() and all(torch.equal(w_one[k], at_2[k]) for k in at_2)
    # and on to the end on one rank, from the optimizer state the 2 ranks left
    train(tmp_path, "one", args + ["--steps", "3", "--resume"], launcher=[sys.executable])
    assert [m["step"] for m in read_metrics(one)] == [1, 2, 3]


def test_the_final_model_is_an_ordinary_hugging_face_directory(toy_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = train(tmp_path, "run", ["--cache-dir", toy_cache, "--fsdp", "--steps", "1"])
    final = os.path.join(out, "final")
    assert json.load(open(os.path.join(final, "config.json")))["architectures"] == ["Qwen2ForCausalLM"]
    model, tok = AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse: abc"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out_ids = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out_ids.shape[1] > ids["input_ids"].shape[1]  # it generates
    # eval.py reads the sharded checkpoints in place: the same weights as the export
    ckpt = os.path.join(out, "ckpt-000001")
    read = infra.load_model(ckpt, config.Config(), torch.device("cpu")).state_dict()
    assert all(torch.equal(read[k], v) for k, v in model.state_dict().items())


def test_a_sharded_checkpoint_that_cannot_be_written_leaves_the_previous_one(toy_cache, tmp_path):
    """A file where checkpoint 4's temporary directory must go makes every rank's write fail (as a full disk
    or a lost mount would): all ranks stop, naming the intact checkpoint 2, and --resume finishes the run."""
    out = tmp_path / "run"
    args = ["--cache-dir", toy_cache, "--fsdp", "--save-every", "2", "--steps", "4", "--out-dir", str(out)]
    out.mkdir()
    (out / "ckpt-000004.tmp").write_text("in the way")
    p = run_dar(FLAGS + args, cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode != 0 and "could not write checkpoint ckpt-000004" in p.stderr, p.stderr[-3000:]
    assert "the previous checkpoint" in p.stderr and "ckpt-000002 is intact" in p.stderr
    assert (out / "latest").read_text().strip() == "ckpt-000002"
    (out / "ckpt-000004.tmp").unlink()
    p = run_dar(FLAGS + args + ["--resume"], cwd=tmp_path, launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
