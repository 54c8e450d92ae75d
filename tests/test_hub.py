"""Models and data sets from the Hugging Face Hub, without a network: Hub caches built by hand in a temporary
HF_HOME, laid out as huggingface_hub lays one out (hub/models--ORG--NAME/snapshots/COMMIT/ holding the files, and
refs/main naming COMMIT), read with HF_HUB_OFFLINE=1 through the real huggingface_hub (nothing patched). dar.py runs
in subprocesses, since huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported.

What a user on a GPU machine types first: `dar.py --model ORG/NAME` (and a paper task with no --data), the id
resolved to its snapshot directory by rank 0 first (infra.fetch_from_hub, tasks.model_dir); an id that cannot be
had stops every rank at once with one line; pickled weights are never loaded.
"""
import gzip
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

import config
import infra
import loop
import tasks
from conftest import ROOT, TINY, TORCHRUN, read_metrics, run_dar

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOY_ID = "toy-org/toy-pi0"            # the tests' toy pi_0, published under an id of its own
PICKLED_ID = "pickle-org/pickled"     # a repository that ships pickled weights only
UNCACHED_ID = "Qwen/Qwen2-7B-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
HH = os.path.join(ROOT, "tests", "fixtures", "hh_helpful.jsonl")
OFFLINE = {"HF_HUB_OFFLINE": "1"}
# one online batch of 2 prompts x 2 responses of 8 tokens on SmolLM2 (tests/test_smollm2.py's SMALL)
ONE_BATCH = ["--online-batch", "4", "--k", "2", "--minibatch", "4", "--micro-batch", "2", "--max-new-tokens", "8",
             "--eval-prompts", "0", "--lr", "1e-4", "--warmup-steps", "1", "--steps", "1", "--save-every", "1000",
             "--sample-every", "1000"]


def hub_repo(home, repo_id, files, repo_type="model", commit=COMMIT):
    """A repository in the Hugging Face cache at HF_HOME=home, made by hand: {path in the repository: local file}
    linked into snapshots/COMMIT/, and refs/main naming COMMIT. Returns the snapshot directory."""
    root = os.path.join(home, "hub", f"{repo_type}s--{repo_id.replace('/', '--')}")
    snapshot = os.path.join(root, "snapshots", commit)
    for name, source in files.items():
        os.makedirs(os.path.dirname(os.path.join(snapshot, name)), exist_ok=True)
        os.symlink(os.path.abspath(source), os.path.join(snapshot, name))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def directory_files(path):
    return {name: os.path.join(path, name) for name in os.listdir(path)}


class Boom:
    """A pickle that, when loaded, creates the file `marker`: what a malicious pytorch_model.bin can do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def pickled_model_dir(path, marker):
    """A model directory with a config.json and pickled weights only (pytorch_model.bin, which creates marker when
    it is unpickled)."""
    os.makedirs(path)
    tasks.build_tokenizer().save_pretrained(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
                   "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 128, "vocab_size": 264}, f)
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump(Boom(marker), f)
    return path


@pytest.fixture(scope="module")
def toy_pi0(toy_cache):
    _, sft = loop.ensure_toy_models(config.parse_config(["--cache-dir", toy_cache, "--sft-steps", "40"]),
                                    infra.Dist())
    return sft


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, toy_pi0):
    """HF_HOME with the toy pi_0 as TOY_ID, a pickled-only PICKLED_ID, and Anthropic/hh-rlhf's helpful-base made
    from the HH fixture (4 conversations to train on, 2 to test on)."""
    home = str(tmp_path_factory.mktemp("hf_home"))
    hub_repo(home, TOY_ID, directory_files(toy_pi0))
    bare = pickled_model_dir(os.path.join(home, "pickled-source"), os.path.join(home, "unpickled"))
    hub_repo(home, PICKLED_ID, directory_files(bare))
    with open(HH) as f:
        lines = f.readlines()
    files = {}
    for split, part in (("train", lines[:4]), ("test", lines[4:])):
        files[f"helpful-base/{split}.jsonl.gz"] = os.path.join(home, f"hh-{split}.jsonl.gz")
        with gzip.open(files[f"helpful-base/{split}.jsonl.gz"], "wt") as f:
            f.writelines(part)
    hub_repo(home, "Anthropic/hh-rlhf", files, repo_type="dataset")
    return home


@pytest.fixture(scope="module")
def smollm2_home(hub_home, toy_cache):
    """hub_home with SmolLM2-135M-Instruct as SMOLLM2_ID: the directory this project builds (538 MB), linked."""
    smollm2 = tasks.pretrained_dir("smollm2-135m-instruct", toy_cache)
    hub_repo(hub_home, SMOLLM2_ID, directory_files(smollm2))
    return hub_home


def snapshot(home, repo_id):
    return os.path.join(home, "hub", f"models--{repo_id.replace('/', '--')}", "snapshots", COMMIT)


def one_error_line(p):
    """The stopped run's message: it must be the only line on stderr, with nothing on stdout but the settings line
    dar.py prints first (nothing loaded, nothing else printed)."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    printed = p.stdout.splitlines()
    assert p.returncode != 0 and len(printed) <= 1 and len(lines) == 1, (p.stdout[-2000:], p.stderr[-3000:])
    assert all(line.startswith("settings: --lr ") for line in printed)
    assert lines[0].startswith("error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# dar.py --model ORG/NAME, trained from the hand-built cache
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_by_its_hub_id_trains_one_batch_from_the_cache(smollm2_home, tmp_path):
    """`dar.py --model HuggingFaceTB/SmolLM2-135M-Instruct` with HF_HUB_OFFLINE=1: the id becomes its snapshot
    directory, which the run's config records (repository and commit), and one online batch trains on it."""
    out = tmp_path / "run"
    p = run_dar(["--task", "sentiment", "--model", SMOLLM2_ID, "--out-dir", str(out)] + ONE_BATCH, cwd=tmp_path,
                env_extra=dict(OFFLINE, HF_HOME=smollm2_home))
    assert p.returncode == 0, p.stderr[-3000:]
    print(p.stdout[-1500:])
    where = snapshot(smollm2_home, SMOLLM2_ID)
    assert f"--model {SMOLLM2_ID}: {where}" in p.stdout
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["model"] == where and "models--HuggingFaceTB--SmolLM2-135M-Instruct" in where and COMMIT in where
    assert [r["step"] for r in read_metrics(out)] == [1]


def docs_commands():
    """Every dar.py command of the docstring, README.md and docs/*.md whose --model is a Hub id: (file, argv after
    dar.py, ranks)."""
    texts = {name: open(os.path.join(ROOT, name)).read() for name in ("dar.py", "README.md")}
    for name in os.listdir(os.path.join(ROOT, "docs")):
        texts["docs/" + name] = open(os.path.join(ROOT, "docs", name)).read()
    found = []
    for name, text in texts.items():
        for command in text.replace("\\\n", " ").splitlines():
            if not re.match(r"\s*(\w+=\S*\s+)*(python|torchrun|\.venv/bin/python)\s.*dar\.py", command):
                continue  # prose, or another program
            words = shlex.split(command, comments=True)
            argv = words[words.index("dar.py") + 1:]
            if "--model" in argv and tasks.HUB_ID.fullmatch(argv[argv.index("--model") + 1]):
                ranks = int(words[words.index("--nproc_per_node") + 1]) if "--nproc_per_node" in words else 1
                found.append((name, argv, ranks))
    return found


def test_the_docs_commands_with_hub_ids_pass_every_check():
    """The commands the docstring and docs show with a Hub --model name flags that exist, in an order that works:
    they pass config.check_config as typed (the Hub itself is the next step)."""
    commands = docs_commands()
    assert {name for name, _, _ in commands} >= {"dar.py", "docs/paper-tasks.md", "README.md"}
    for name, argv, ranks in commands:
        cfg = config.parse_config(argv)
        config.check_config(cfg, ranks)
        assert tasks.hub_model(cfg.model) == (cfg.model, None), (name, argv)


@pytest.mark.slow
def test_an_uncached_id_stops_at_once_with_one_line(hub_home, tmp_path):
    """The docstring's paper-task command, offline, with the task's data set in the cache but not the model:
    one line naming the id, the cache that was looked in, why the Hub was not, and the way out; before any model
    is loaded (nothing printed, no run directory)."""
    (_, argv, _), = [c for c in docs_commands() if c[0] == "dar.py"]
    out = tmp_path / "run"
    start = time.perf_counter()
    p = run_dar(argv + ["--out-dir", str(out)], cwd=tmp_path, env_extra=dict(OFFLINE, HF_HOME=hub_home))
    seconds = time.perf_counter() - start
    line = one_error_line(p)
    print(f"{seconds:.1f} s: {line}")
    assert line.startswith(f"error: --model {UNCACHED_ID} is not a local directory")
    assert os.path.join(hub_home, "hub") in line and "HF_HUB_OFFLINE=1" in line
    assert f"hf download {UNCACHED_ID}" in line
    assert not out.exists() and seconds < 60


@pytest.mark.slow
def test_a_revision_that_is_not_cached_stops_with_one_line(hub_home, tmp_path):
    """The id is cached at main, not at v2: --model-revision v2 is looked for, not replaced by main."""
    p = run_dar(["--model", TOY_ID, "--model-revision", "v2", "--out-dir", str(tmp_path / "run")] + TINY,
                cwd=tmp_path, env_extra=dict(OFFLINE, HF_HOME=hub_home))
    line = one_error_line(p)
    assert line.startswith(f"error: --model {TOY_ID} is not a local directory")
    assert "at revision v2" in line and f"hf download {TOY_ID} --revision v2" in line


@pytest.mark.slow
def test_max_new_tokens_is_checked_against_a_hub_models_config_json_before_it_loads(hub_home, tmp_path):
    """A Hub id's config.json is read once its snapshot is here (fetch_from_hub), before the model loads."""
    p = run_dar(["--model", TOY_ID, "--out-dir", str(tmp_path / "run")] + TINY + ["--max-new-tokens", "600"],
                cwd=tmp_path, env_extra=dict(OFFLINE, HF_HOME=hub_home))
    assert one_error_line(p) == ("error: --max-new-tokens 600 leaves no room in the model's context window of 512 "
                                 "tokens; lower it (at most 511)")


@pytest.mark.slow
def test_a_hub_repository_with_pickled_weights_only_is_refused(hub_home, tmp_path):
    """Its snapshot has a config and a pytorch_model.bin: refused with one line before anything loads, and the
    pickle never runs."""
    p = run_dar(["--model", PICKLED_ID, "--out-dir", str(tmp_path / "run")] + TINY, cwd=tmp_path,
                env_extra=dict(OFFLINE, HF_HOME=hub_home))
    line = one_error_line(p)
    assert line.startswith(f"error: --model {PICKLED_ID}: this project loads safetensors weights only")
    assert "convert" in line and not os.path.exists(os.path.join(hub_home, "unpickled"))


# ---------------------------------------------------------------------------------------------------
# The paper's usage line: a paper task's data set and the model both from the Hub's cache, the annotator served
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_paper_task_reads_its_data_set_and_model_from_the_hub_cache(smollm2_home, annotator, tmp_path):
    """`dar.py --task helpful --model HuggingFaceTB/SmolLM2-135M-Instruct --judge-url URL` with no --data, offline:
    Anthropic/hh-rlhf's helpful-base and the model from the hand-built caches, one online batch judged by the
    stand-in annotator. Its prompts are the cached file's: 4 conversations, less the validation prompt."""
    out = tmp_path / "run"
    p = run_dar(["--task", "helpful", "--model", SMOLLM2_ID, "--judge-url", annotator, "--out-dir", str(out)] +
                ONE_BATCH, cwd=tmp_path, env_extra=dict(OFFLINE, HF_HOME=smollm2_home))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1] and rows[0]["train/invalid_judgments"] == 0
    with open(out / "config.json") as f:
        assert json.load(f)["data"] == ""
    task = tasks.load_task("helpful", ",".join(os.path.join(smollm2_home, f"hh-{s}.jsonl.gz")
                                               for s in ("train", "test")))
    assert len(task.train_prompts) == 3 and len(task.eval_prompts) == 2


# ---------------------------------------------------------------------------------------------------
# Two ranks: rank 0 resolves, the other takes its directory; a failure on rank 0 stops both, with one line
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_train_from_a_hub_id_and_stop_together_on_an_uncached_one(hub_home, tmp_path):
    out = tmp_path / "run"
    p = run_dar(["--model", TOY_ID, "--steps", "1", "--out-dir", str(out)] + TINY, cwd=tmp_path,
                env_extra=dict(OFFLINE, HF_HOME=hub_home), launcher=TORCHRUN)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "parameters identical on all 2 ranks" in p.stdout
    with open(out / "config.json") as f:
        assert json.load(f)["model"] == snapshot(hub_home, TOY_ID)
    start = time.perf_counter()
    p = run_dar(["--model", UNCACHED_ID, "--out-dir", str(tmp_path / "stopped")] + TINY, cwd=tmp_path,
                env_extra=dict(OFFLINE, HF_HOME=hub_home), launcher=TORCHRUN, timeout=300)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode != 0 and len(errors) == 1, p.stderr[-3000:]  # once, from the machine's first rank
    assert errors[0].startswith(f"error: --model {UNCACHED_ID} is not a local directory")
    assert time.perf_counter() - start < 120  # rank 1 did not wait for rank 0 in a collective (--dist-timeout 30 min)


@pytest.mark.slow
def test_resume_and_eval_find_the_run_s_snapshot(hub_home, tmp_path):
    """--resume with the same id resolves to the same snapshot directory, which the checkpoint's config names (no
    "settings that differ"). eval.py where that directory is gone (another machine, a cleaned cache) finds the
    same repository and commit in this machine's cache."""
    out = tmp_path / "run"
    for steps in ("1", "2"):
        p = run_dar(["--model", TOY_ID, "--steps", steps, "--save-every", "1", "--eval-prompts", "0", "--out-dir",
                     str(out)] + TINY + (["--resume"] if steps == "2" else []), cwd=tmp_path,
                    env_extra=dict(OFFLINE, HF_HOME=hub_home))
        assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    elsewhere = str(tmp_path / "hf_home_elsewhere")
    hub_repo(elsewhere, TOY_ID, directory_files(snapshot(hub_home, TOY_ID)))
    with open(out / "config.json") as f:
        saved = json.load(f)
    saved["model"] = saved["model"].replace(hub_home, str(tmp_path / "hf_home_gone"))
    with open(out / "config.json", "w") as f:
        json.dump(saved, f)
    e = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), str(out), "--n-prompts", "4", "--out",
                        str(tmp_path / "eval")], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=elsewhere, **OFFLINE))
    assert e.returncode == 0, e.stderr[-3000:]
    assert f"--model {saved['model']}: {snapshot(elsewhere, TOY_ID)}" in e.stdout


# ---------------------------------------------------------------------------------------------------
# Local directories: as today, pickled weights refused
# ---------------------------------------------------------------------------------------------------
def test_a_local_directory_named_like_an_id_is_a_directory(toy_pi0, tmp_path, monkeypatch):
    """ORG/NAME that exists here is the directory: fetch_from_hub leaves it as typed, with no Hub look-up."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("toy-org")
    os.symlink(toy_pi0, "toy-org/toy-pi0")
    cfg = config.parse_config(["--model", TOY_ID] + TINY)
    config.check_config(cfg, 1)
    assert tasks.hub_model(TOY_ID) is None
    infra.fetch_from_hub(cfg, infra.Dist())
    assert cfg.model == TOY_ID
    assert infra.load_model(cfg.model, cfg, torch.device("cpu")).config.vocab_size > 0


def test_a_local_directory_with_pickled_weights_only_is_refused(tmp_path):
    """config.json and pytorch_model.bin, no safetensors: fetch_from_hub stops with the message, and so does
    infra.load_model (which also passes use_safetensors=True). The pickle never runs."""
    marker = tmp_path / "unpickled"
    path = pickled_model_dir(str(tmp_path / "pickled"), str(marker))
    cfg = config.parse_config(["--model", path] + TINY)
    config.check_config(cfg, 1)
    with pytest.raises(SystemExit, match=re.escape(f"--model {path}: this project loads safetensors weights only")):
        infra.fetch_from_hub(cfg, infra.Dist())
    with pytest.raises(SystemExit, match=re.escape(f"model directory {path}: this project loads safetensors")):
        infra.load_model(path, cfg, torch.device("cpu"))
    assert not marker.exists()


def test_a_revision_with_a_local_directory_is_refused(toy_pi0):
    cfg = config.parse_config(["--model", toy_pi0, "--model-revision", "v1"] + TINY)
    with pytest.raises(SystemExit, match=r"--model-revision .* is a local directory \(drop --model-revision\)"):
        config.check_config(cfg, 1)


def test_the_fixtures_models_still_load(toy_pi0):
    """The checked-in pi_0 of an older run and a toy pi_0 load with use_safetensors=True, as they are."""
    cfg = config.parse_config(["--dtype", "float32"])
    for path in (os.path.join(ROOT, "tests", "fixtures", "run-before-layout", "pi0"), toy_pi0):
        run_cfg = config.parse_config(["--model", path])
        infra.fetch_from_hub(run_cfg, infra.Dist())
        assert run_cfg.model == path
        assert infra.load_model(path, cfg, torch.device("cpu")).config.model_type == "qwen2"


def test_hub_model_tells_ids_and_snapshot_paths_from_paths(tmp_path):
    gone = f"/elsewhere/hub/models--meta-llama--Llama-3.1-8B/snapshots/{COMMIT}"
    assert tasks.hub_model(gone) == ("meta-llama/Llama-3.1-8B", COMMIT)
    assert tasks.hub_model("Qwen/Qwen2-7B-Instruct") == ("Qwen/Qwen2-7B-Instruct", None)
    for path in ("runs/helpful-sft/final", "./x", "/abs/path", "smollm2", str(tmp_path)):
        assert tasks.hub_model(path) is None, path
