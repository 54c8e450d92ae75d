"""The plumbing under the loop: processes and collectives, model loading and placement, FSDP2 sharding, the
optimizer, checkpoints (DCP, export, RNG state), logging and signals.

TRY NOT TO MODIFY, and a learner may skip it: nothing here is part of Algorithm 1. It is what lets the same
loop run as one CPU process, under DDP on 8 GPUs, or sharded over many nodes, and survive being killed.
loop.py is the training loop and the pieces every algorithm shares; dar.py is the algorithm.
"""
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer,
                          GenerationConfig)
from transformers.optimization import Adafactor
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

import rollout
import tasks
from config import check_context_window, config_from_dict, optimizer_steps, parse_template_kwargs, trackers

# ---------------------------------------------------------------------------------------------------
# Processes, seeds, models
# ---------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(cfg):
    """Read RANK / WORLD_SIZE / LOCAL_RANK from torchrun; one process without them (with --fsdp, a process
    group of one, since sharded modules need one)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ and not cfg.fsdp:
        return Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    if not cfg.dist_timeout > 0:
        raise SystemExit(f"error: --dist-timeout must be > 0 minutes, got {cfg.dist_timeout}")
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    store = {} if "RANK" in os.environ else dict(store=tdist.HashStore(), rank=0, world_size=1)
    tdist.init_process_group(cfg.backend or ("nccl" if cuda else "gloo"),
                             timeout=datetime.timedelta(minutes=cfg.dist_timeout), **store)
    return Dist(rank, world, local, device)


def end_distributed(run):
    """Destroy the process group at the end of a run, after freeing the run's models (run: a loop.Run, or None).

    DDP's reducer and FSDP2's device mesh hold references to the group. Freed after destroy_process_group (when
    main returns, or at interpreter exit), they run gloo's destructor late: it joins the group's worker threads
    while holding the GIL, and a worker still freeing a finished work that holds Python tensors waits for that
    GIL, so the process hangs at exit (seen under torchrun in the tests, rank 1 stuck in ~ProcessGroupGloo <-
    ~Reducer; pytorch#75097), or a rank aborts with "terminate called without an active exception"."""
    if not torch.distributed.is_initialized():
        return
    if run is not None:
        run.ddp = run.value_ddp = run.policy = run.value = run.ref = run.opt = run.sched = None
        gc.collect()
    torch.distributed.destroy_process_group()


def barrier(ctx):
    if ctx.world > 1:
        torch.distributed.barrier()


def gather(ctx, t):
    """Concatenate a 1-D tensor from every rank (same length everywhere), rank order: [world * n]."""
    if ctx.world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_dtype(cfg, device):
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def attention_implementation(device, dtype):
    """flash_attention_2 on a GPU in bf16 or fp16 when the flash-attn package imports, else PyTorch's SDPA. Its
    kernels take no float32 (--dtype float32 on a GPU), and a wheel built for another torch is installed but
    fails to import (an undefined symbol): both fall back to SDPA instead of failing at the first forward."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    try:
        import flash_attn  # noqa: F401  optional: flash-attention-2 kernels, used when they import
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def load_model(path, cfg, device, sharded=False, frozen=False):
    """A causal LM from a model directory or a checkpoint (sharded ones too), on `device`, or sharded over the
    ranks (--fsdp: place); frozen: eval mode, no gradients."""
    dtype = model_dtype(cfg, device)
    kwargs = dict(dtype=dtype, attn_implementation=attention_implementation(device, dtype))

    def read():
        if is_sharded_checkpoint(path):  # one process reading a sharded checkpoint: eval.py, --export-hf
            return load_sharded_weights(path, build())
        tasks.check_safetensors("model directory", path, path, from_hub=False)  # a checkpoint, eval.py's too
        return tasks.load_pretrained(AutoModelForCausalLM, path, cfg.trust_remote_code, use_safetensors=True,
                                     **kwargs)

    def build():
        config = tasks.load_pretrained(AutoConfig, path, cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, **kwargs)
        if os.path.isfile(os.path.join(path, "generation_config.json")):  # stop tokens, as read() has them
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model
    return place(read, build, cfg, device, sharded, lambda m: m.eval().requires_grad_(False) if frozen else None)


def place(read, build, cfg, device, sharded, prepare):
    """A model on `device`, or sharded over the ranks (--fsdp). read() loads it (weights and all); build() makes
    the same architecture without its weights; prepare(model) runs before placing (freezing, a fresh head).

    Sharded, the model is read from disk once: rank 0 reads it into CPU memory, the other ranks build it on
    the meta device (no memory), shard it, and receive their shards from rank 0. Host memory at load is then
    one copy of the model, not one per rank, and no GPU ever holds the whole model."""
    with torch.random.fork_rng(devices=[]):  # a fresh head's initialisation must not shift the run's stream
        if not sharded:
            model = read()
            prepare(model)
            return model.to(device)
        master = torch.distributed.get_rank() == 0
        if master:
            model = read()
        else:
            with torch.device("meta"):
                model = build().eval()  # as from_pretrained leaves it: dropout off
    prepare(model)
    whole = model.state_dict() if master else {}
    shard(model, cfg)
    if not master:
        model.to_empty(device="cpu" if cfg.fsdp_offload else device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # outside the state dict (rotary frequencies): rank 0's are the real ones
        torch.distributed.broadcast(buffer, src=0)
    return model


def load_value_model(path, cfg, device, sharded=False):
    """V(x, y_<i): a causal LM body with a scalar head read at every position (the PPO family's critic).

    From `path` (a causal LM, e.g. pi_0, whose LM head is dropped) the head starts at zero, so the first
    values are 0; from a saved value model (a checkpoint's value/) it is restored as trained.
    """
    config = tasks.load_pretrained(AutoConfig, path, cfg.trust_remote_code, num_labels=1,
                                   classifier_dropout=0.0)  # no dropout on values (and no_dropout)
    fresh_head = not (config.architectures or [""])[0].endswith("TokenClassification")
    dtype = model_dtype(cfg, device)

    def read():
        tasks.check_safetensors("value model directory", path, path, from_hub=False)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected, not news
        try:
            return tasks.load_pretrained(AutoModelForTokenClassification, path, cfg.trust_remote_code, config=config,
                                         dtype=dtype, use_safetensors=True)
        finally:
            hf_logging.set_verbosity(verbosity)

    def prepare(model):
        if fresh_head:
            torch.nn.init.zeros_(model.score.weight)
            torch.nn.init.zeros_(model.score.bias)
        model.config.use_cache = False
    return place(read, lambda: AutoModelForTokenClassification.from_config(
        config, trust_remote_code=cfg.trust_remote_code, dtype=dtype), cfg, device, sharded, prepare)


def load_tokenizer(path, trust_remote_code=False, chat_template_kwargs=""):
    """The policy's tokenizer, with a pad token, and with the run's --chat-template-kwargs (JSON text) kept as
    `chat_template_kwargs`, for rollout.render_prompts to pass to apply_chat_template."""
    tok = tasks.load_pretrained(AutoTokenizer, path, trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template_kwargs = parse_template_kwargs(chat_template_kwargs)
    return tok


# ---------------------------------------------------------------------------------------------------
# The Hugging Face Hub: what a run reads from it, fetched once per machine before anything loads
# ---------------------------------------------------------------------------------------------------
MODEL_FLAGS = {"model": "--model", "value_model": "--value-model", "reward_model": "--reward-model"}


def fetch_from_hub(cfg, ctx):
    """Point --model, --value-model and --reward-model at model directories (tasks.model_dir: a Hub id becomes
    its snapshot in huggingface_hub's cache), and fetch the task's Hub data sets, on rank 0 first. The other ranks
    then take rank 0's directories where they see them (one machine, or a shared disk), else fetch the same commits
    into their own machine's cache: 8 ranks do not download 8 times, nor see different commits of a branch. An
    error on any rank stops every rank, so none is left waiting in a collective for one that left; each machine's
    first rank prints its line once (ranks writing one stream at once would splice their lines together)."""
    def on_rank_0():
        if not cfg.data and cfg.task in tasks.HUB_TASKS:
            tasks.hub_task_files(cfg.task)  # loop.start_run reads them on every rank: from the cache
        paths = {name: tasks.model_dir(flag, getattr(cfg, name), cfg.model_revision if name == "model" else "",
                                       cfg.trust_remote_code)
                 for name, flag in MODEL_FLAGS.items() if getattr(cfg, name)}
        check_context_window(cfg, paths.get("model", ""))  # a Hub id's config.json is here now
        return paths

    def on_the_others(paths):  # rank 0's directories, whose snapshot paths pin the commits
        return {name: tasks.model_dir(MODEL_FLAGS[name], path, "", cfg.trust_remote_code)
                for name, path in paths.items()}

    paths, error = attempt(on_rank_0) if ctx.master else ({}, "")
    paths, error = from_rank_0(ctx, (paths, error))
    if not ctx.master and not error:
        paths, error = attempt(lambda: on_the_others(paths))
    error = first_error(ctx, error)
    if error:
        raise SystemExit(error if ctx.local_rank == 0 else 1)
    for name, path in paths.items():
        if ctx.master and path != getattr(cfg, name):
            print(f"{MODEL_FLAGS[name]} {getattr(cfg, name)}: {path}", flush=True)
        setattr(cfg, name, path)


def attempt(work):
    """(work(), '') or, when it stops, (None, its message)."""
    try:
        return work(), ""
    except SystemExit as e:
        return None, str(e)


def from_rank_0(ctx, obj):
    """Rank 0's obj (a small picklable value) on every rank."""
    if ctx.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def first_error(ctx, error):
    """The error message of the first rank that has one ('' when none has), on every rank."""
    if ctx.world == 1:
        return error
    errors = [None] * ctx.world
    torch.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


# ---------------------------------------------------------------------------------------------------
# Sharding (--fsdp, PyTorch's FSDP2): each rank keeps 1/world of every parameter, gradient and optimizer
# state; a decoder layer's whole parameters exist only while it runs (all-gathered before, freed after).
# ---------------------------------------------------------------------------------------------------
def decoder_layers(model):
    """The repeated blocks of a transformers model: instances of the classes it names in _no_split_modules."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SystemExit(f"error: --fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) "
                         "to shard by")
    return layers


def shard(model, cfg):
    """fully_shard every decoder layer, then the root (embeddings, final norm, head: one group). Parameters stay
    in the model's dtype (bf16 on GPUs) and gradients are reduce-scattered in float32; --fsdp-offload keeps the
    shards (and so the optimizer's work) in CPU memory."""
    dtype, world = next(model.parameters()).dtype, torch.distributed.get_world_size()

    def placement(p):  # rows, unless there are fewer rows than ranks (PPO's value head [1, d]): then columns
        return Shard(1) if p.dim() > 1 and p.shape[0] < world <= p.shape[1] else Shard(0)
    kwargs = dict(mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32),
                  shard_placement_fn=placement)
    if cfg.fsdp_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def trained_modules(policy, value):
    """The models the optimizer updates as one module (keys policy.*, value.*): the unit of a sharded
    checkpoint, whose optimizer state spans both."""
    return torch.nn.ModuleDict({"policy": policy, **({"value": value} if value is not None else {})})


def is_sharded_checkpoint(path):
    return os.path.isdir(os.path.join(path, "dcp"))


def save_sharded_checkpoint(ctx, path, run, state):
    """A checkpoint of an --fsdp run, written by every rank: its shards of the models and the optimizer state
    (torch.distributed.checkpoint, in dcp/, loadable on any number of ranks), and from rank 0 state.pt, the
    tokenizer and the models' configs. Written beside `path` and renamed into place once all ranks succeeded;
    if any failed, nothing of it is left and every rank raises the error."""
    tmp = path + ".tmp"
    if ctx.master:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(ctx)

    def files():
        model_sd, optim_sd = get_state_dict(trained_modules(run.policy, run.value), run.opt)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(tmp, "dcp"))
        if ctx.master:
            run.policy.config.save_pretrained(tmp)
            run.policy.generation_config.save_pretrained(tmp)
            run.tok.save_pretrained(tmp)
            if run.value is not None:
                run.value.config.save_pretrained(os.path.join(tmp, "value"))
            torch.save(state, os.path.join(tmp, "state.pt"))
    for stage in (files, lambda: write_manifest(tmp, ctx)):  # the manifest once every rank's files are written
        error = None
        try:
            stage()
        except WRITE_ERRORS as e:
            error = e
        failed = torch.tensor([float(error is not None)], device=ctx.device)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item():
            if ctx.master:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"{type(error).__name__}: {error}" if error else "another rank could not write its shards")
    if ctx.master:
        publish_dir(tmp, path)


def load_sharded_checkpoint(path, modules, opt):
    """Restore the shards of the models (trained_modules) and the optimizer state from a sharded checkpoint,
    resharded for this run's ranks (their number may differ from the run that wrote it)."""
    model_sd, optim_sd = get_state_dict(modules, opt)
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(path, "dcp"))
    set_state_dict(modules, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load_sharded_weights(path, model, prefix="policy."):
    """Read a sharded checkpoint's weights of one model (prefix: its key in trained_modules) into an ordinary,
    unsharded `model` of the same architecture, in this process alone."""
    saved = dcp.FileSystemReader(os.path.join(path, "dcp")).read_metadata().state_dict_metadata
    # tied weights (embeddings = head) may be saved under one name; loading it fills both
    weights = {prefix + k: v for k, v in model.state_dict().items() if f"model.{prefix}{k}" in saved}
    dcp.load({"model": weights}, checkpoint_id=os.path.join(path, "dcp"), no_dist=True)  # this process alone
    return model


# ---------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary directory, then renamed; `latest` names the newest complete one
# ---------------------------------------------------------------------------------------------------
def rng_state():
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # plain lists load with weights_only=True
    return dict(python=py, numpy=np_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    n = dict(s["numpy"])
    n["state"] = dict(n["state"], key=np.array(n["state"]["key"], dtype=np.uint32))
    np.random.set_state(n)
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(cfg, ctx, step, run):
    """Checkpoint ckpt-step, with the best evaluation so far (run.best) in its state.pt, then `latest` names it: a
    run killed between any two of these writes resumes from a checkpoint whose files all agree with each other."""
    states = [None] * ctx.world
    if ctx.world > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    name = checkpoint_name(step)
    state = dict(step=step, scheduler=run.sched.state_dict(), rng=states, config=dataclasses.asdict(cfg),
                 best=run.best)
    try:
        if cfg.fsdp:
            save_sharded_checkpoint(ctx, os.path.join(cfg.out_dir, name), run, state)
        elif ctx.master:
            save_model_dir(os.path.join(cfg.out_dir, name), run.policy, run.tok,
                           dict(state, optimizer=run.opt.state_dict()), value=run.value)
    except WRITE_ERRORS as e:  # a full disk, a quota, a read-only disk: `latest` still names the previous checkpoint
        raise SystemExit(f"error: could not write checkpoint {name} in {cfg.out_dir} ({write_error(e)}); "
                         f"the previous checkpoint {latest_checkpoint(cfg) or '(none)'} is intact, as is "
                         "metrics.jsonl. Free space or fix the cause, then continue with --resume.") from None
    kill_point("checkpoint")
    if ctx.master:
        write_atomic(os.path.join(cfg.out_dir, "latest"), name)
        kill_point("latest")
        prune_checkpoints(cfg)
    barrier(ctx)


def checkpoint_name(step):
    return f"ckpt-{step:06d}"


def prune_checkpoints(cfg):
    """Delete all but the newest --keep-checkpoints checkpoints up to the one `latest` names, except the one that
    out_dir/best names (the best evaluation of --eval-every, loop.publish_best): that one is kept beside them. Neither
    the one `latest` names nor `best` is ever deleted, whatever the number says (0 or less keeps `latest` alone).
    Checkpoints past `latest` are left over from an earlier run in this directory (a fresh run over it): they are
    deleted, since names sort by step and they would otherwise count as the newest and outlive this run's own."""
    best, latest = (os.path.join(cfg.out_dir, f) for f in ("best", "latest"))
    best = open(best).read().strip() if os.path.isfile(best) else None
    latest = open(latest).read().strip() if os.path.isfile(latest) else None
    ckpts = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("ckpt-") and not d.endswith(".tmp"))
    stale = [d for d in ckpts if latest is not None and d > latest]
    ckpts = [d for d in ckpts if d not in stale]
    for old in stale + ckpts[:-max(cfg.keep_checkpoints, 1)]:  # the newest, the one `latest` names, always stays
        if old not in (best, latest):
            shutil.rmtree(os.path.join(cfg.out_dir, old), ignore_errors=True)


def load_state(path):
    """A checkpoint's state.pt: tensors and plain data only (weights_only), never arbitrary pickled objects,
    whose loading can run any code."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise SystemExit(f"error: {path} holds objects other than tensors and plain data" +
                         (f" ({named.group(1)})" if named else "") + ", and is not loaded: unpickling them could "
                         "run any code. Resume from a checkpoint that dar.py wrote") from None


def save_model_dir(path, model, tok, state=None, value=None, weights=None):
    """A Hugging Face model directory (plus state.pt and value/), written beside `path`, renamed into place.
    weights: the model's whole state dict when the model itself is sharded (--fsdp)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)
        tok.save_pretrained(tmp)
        if value is not None:
            value.save_pretrained(os.path.join(tmp, "value"))
        if state is not None:
            torch.save(state, os.path.join(tmp, "state.pt"))
        write_manifest(tmp)
    except BaseException:  # a half-written directory is removed; what `path` held is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, path)


def export_hf(ckpt, out):
    """A checkpoint (a sharded one too) as an ordinary Hugging Face model directory at `out`, in the dtype it was
    trained in: for evaluation elsewhere and for release. One process, no GPU needed."""
    if not os.path.isfile(os.path.join(ckpt, "state.pt")):
        raise SystemExit(f"error: {ckpt} is not a checkpoint of dar.py (no state.pt there)")
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"error: {out} exists and is not empty; give a new directory to export to")
    check_checkpoint(ckpt)
    cfg = config_from_dict(load_state(os.path.join(ckpt, "state.pt"))["config"])
    trained_in = tasks.load_pretrained(AutoConfig, ckpt, cfg.trust_remote_code).dtype
    cfg = dataclasses.replace(cfg, dtype=str(trained_in or torch.float32).removeprefix("torch."))
    save_model_dir(out, load_model(ckpt, cfg, torch.device("cpu")), load_tokenizer(ckpt, cfg.trust_remote_code))


# What a failed write raises: OSError (a full disk, a read-only file system, a file-size limit), torch.save's
# writer a RuntimeError ("[enforce fail at inline_container.cc...] unexpected pos"), safetensors a SafetensorError,
# torch.distributed.checkpoint a CheckpointException
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError, dcp.api.CheckpointException)


def write_error(e):
    """A write failure's cause in a few words, for a one-line message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip().splitlines()
    short = " (torch.save wrote less than it was given: a full disk, a quota or a file-size limit)" \
        if "inline_container" in str(e) else ""
    return f"{type(e).__name__}: {text[0] if text else ''}{short}"


def write_atomic(path, data):
    """Replace the file `path` by `data` (text or bytes) so that a kill at any moment leaves either the old file or
    the new one, whole: written beside it, flushed to the disk, renamed over it, and the rename flushed (the
    directory). A failed write stops the run in one line naming the file; the old file stays as it was."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(os.path.dirname(path))
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise SystemExit(f"error: could not write {path} ({write_error(e)}); it is as it was before. Free space "
                         "or fix the cause, then continue with --resume") from None


def fsync_path(path):
    """Flush a file, or a directory's entries (a rename or a new file in it), to the disk."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp, path):
    """Put the complete directory `tmp` in the place of `path`: every file flushed to the disk first, so that the
    renamed directory is whole after a crash of the machine too, then the rename, then the parent's entry."""
    for d, _, files in os.walk(tmp):
        for name in files:
            fsync_path(os.path.join(d, name))
        fsync_path(d)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path))


# TEST ONLY (docs/faults.md): DAR_TEST_KILL_AT=POINT[:N] makes the process SIGKILL itself the N-th time (default
# the first) it passes the write boundary POINT, so that tests can stop a run between any two of its writes and
# check that --resume ends where an uninterrupted run ends. Never set it outside tests.
KILL_POINTS = ("metrics", "checkpoint", "latest", "best.json", "best", "final", "eval.json")
_passes = {}


def kill_point(name):
    spec = os.environ.get("DAR_TEST_KILL_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point not in KILL_POINTS:
        raise SystemExit(f"error: DAR_TEST_KILL_AT={spec}: no such point; the points are {', '.join(KILL_POINTS)}")
    _passes[name] = _passes.get(name, 0) + 1
    if name == point and _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def latest_checkpoint(cfg):
    pointer = os.path.join(cfg.out_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    return os.path.join(cfg.out_dir, open(pointer).read().strip())


# ---------------------------------------------------------------------------------------------------
# Manifests: a checkpoint's files with their sizes and SHA-256, written last, so that a damaged checkpoint (a
# truncated or altered file, a missing one) is named before anything loads from it: by --resume, which then
# continues from the newest intact one, by eval.py and by --export-hf
# ---------------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"


def write_manifest(path, ctx=None):
    """path/manifest.json: {"files": {relative path: {"size", "sha256"}}} of every file under `path`, written last
    into a checkpoint's temporary directory, before its rename. SHA-256 (what `sha256sum` checks) reads about
    1.5 GB/s on one core. Under --fsdp every rank calls it once all ranks' shards are written, and checksums a
    share of the files; rank 0 lists them and writes the manifest."""
    ctx = ctx or Dist()
    sizes = from_rank_0(ctx, file_sizes(path) if ctx.master else None)
    digests = sha256_files(path, sizes, ctx)
    unreadable = [f for f in sizes if digests[f] is None]
    if unreadable:  # on every rank alike: they all have every digest
        raise OSError(f"could not read {os.path.join(path, unreadable[0])} back to checksum it")
    if ctx.master:
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump({"files": {name: {"size": size, "sha256": digests[name]} for name, size in sizes.items()}},
                      f, indent=1)


def file_sizes(path):
    """{relative path: size in bytes} of every file under `path` but its manifest, sorted."""
    sizes = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    sizes.pop(MANIFEST, None)
    return dict(sorted(sizes.items()))


def sha256_files(root, sizes, ctx):
    """{relative path: SHA-256 hex digest, None when it cannot be read} of the files `sizes` names under root. Under
    several ranks each reads a share (the largest files first, each to the rank with the fewest bytes so far), and
    every rank gets all the digests."""
    loads, mine = [0] * ctx.world, {}
    for name in sorted(sizes, key=lambda f: (-sizes[f], f)):
        r = loads.index(min(loads))
        loads[r] += sizes[name]
        if r == ctx.rank:
            mine[name] = sha256_file(os.path.join(root, name))
    if ctx.world == 1:
        return mine
    shares = [None] * ctx.world
    torch.distributed.all_gather_object(shares, mine)
    return {name: digest for share in shares for name, digest in share.items()}


def sha256_file(path):
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def checkpoint_damage(path, ctx=None):
    """What is wrong with the checkpoint at `path`, in one line naming each damaged file and why: '' when every file
    its manifest lists has its size and checksum, None when it has no manifest (a plain model directory, or a
    checkpoint written before checkpoints carried one). Sizes are checked first (a truncated file: no reading);
    then the checksums, read once more (about 20 s for a 7B model's 30 GB). Under several ranks each checksums a
    share, and every rank returns the same."""
    ctx = ctx or Dist()
    damage, entries = from_rank_0(ctx, manifest_damage(path) if ctx.master else None)
    if damage is not None and not damage:
        digests = sha256_files(path, {name: e["size"] for name, e in entries.items()}, ctx)
        damage = "; ".join(f"{name} cannot be read" if digests[name] is None else f"{name} differs from its checksum"
                           for name, e in entries.items() if digests[name] != e["sha256"])
    return damage


def manifest_damage(path):
    """(what is wrong before any checksum: a missing directory, manifest or file, or a file of another size;
    {relative path: {"size", "sha256"}} from the manifest); (None, {}) without a manifest."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        return "the directory is missing", {}
    if not os.path.isfile(manifest):
        return None, {}
    try:
        with open(manifest) as f:
            entries = json.load(f)["files"]
        entries = {str(name): {"size": int(e["size"]), "sha256": str(e["sha256"])} for name, e in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} cannot be read ({type(e).__name__}: {e})", {}
    problems = []
    for name, e in entries.items():
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size is None:
            problems.append(f"{name} is missing")
        elif size < e["size"]:
            problems.append(f"{name} is truncated ({size:,} of {e['size']:,} bytes)")
        elif size > e["size"]:
            problems.append(f"{name} has {size:,} bytes, its manifest says {e['size']:,}")
    return "; ".join(problems), entries


def check_checkpoint(path):
    """Stop, naming the damaged files, when the checkpoint (or final/, or exported model) at `path` does not match
    its manifest. One without a manifest is read as it is: a model directory from elsewhere, or a checkpoint
    written before checkpoints carried one."""
    damage = checkpoint_damage(path)
    if damage:
        raise SystemExit(f"error: {path} is damaged: {damage}. Use another checkpoint of the run, or restore this "
                         "one from a copy")


def resume_checkpoint(cfg, ctx):
    """The checkpoint --resume continues from (None when `latest` names none): the one `latest` names when its files
    match its manifest, else the newest intact checkpoint before it. Each damaged one is reported in a line (its
    files and why), and which one the run continues from; when none is intact, the run stops with the list. A
    checkpoint without a manifest is used with a warning (written before checkpoints carried one), unless a
    checkpoint before it has one: then its own was lost, and it counts as damaged. Every rank returns the same
    checkpoint (rank 0 reads the directory; the checksums are shared out over the ranks)."""
    latest = latest_checkpoint(cfg)
    if latest is None:
        return None

    def candidates():  # newest first: `latest`, then the checkpoints before it
        before = [d for d in os.listdir(cfg.out_dir) if re.fullmatch(r"ckpt-\d+", d) and d < os.path.basename(latest)]
        names = [os.path.basename(latest)] + sorted(before, reverse=True)
        return names, [os.path.isfile(os.path.join(cfg.out_dir, d, MANIFEST)) for d in names]
    names, manifested = from_rank_0(ctx, candidates() if ctx.master else None)
    damaged = []
    for i, name in enumerate(names):
        damage = checkpoint_damage(os.path.join(cfg.out_dir, name), ctx)
        if damage is None and any(manifested[i + 1:]):
            damage = f"{MANIFEST} is missing"
        if not damage:
            if ctx.master and damage is None:
                print(f"warning: {name} has no {MANIFEST} (written before checkpoints carried one); its files are not "
                      "checked", file=sys.stderr, flush=True)
            if ctx.master and damaged:
                print(f"--resume: continuing from {name}, the newest intact checkpoint", file=sys.stderr, flush=True)
            return os.path.join(cfg.out_dir, name)
        damaged.append(f"{name}: {damage}")
        if ctx.master:
            print(f"warning: checkpoint {name} is damaged ({damage}); skipped", file=sys.stderr, flush=True)
    raise SystemExit(f"error: --resume: no intact checkpoint in {cfg.out_dir} ({' | '.join(damaged)}). Restore one "
                     "from a copy, or start the run afresh in a new --out-dir")


# ---------------------------------------------------------------------------------------------------
# Logging: stable, namespaced keys; one JSON line per online batch (README lists every key), and the same
# numbers, at the same step, to each experiment tracker of --report-to
# ---------------------------------------------------------------------------------------------------
# The metrics key of a --sample-every table: a list of rows {"prompt", "response", "reward", and a column per
# log_extra of the reward functions}. loop.online_metrics returns it with the numbers, as a step returns
# everything it logs; Logger.log writes it into the JSON line as it is and hands it to the trackers as a table
# (it is no number to plot).
SAMPLES = "samples"


def sample_rows(batch, rewards, extra=None, n=4):
    """The --sample-every table of a rank's batch: n responses spread over it, each {"prompt", "response" (one cut
    before its EOS says so), "reward", and its value of each log_extra column (extra: {column: [N] values},
    rewards.CombinedReward.extra)}."""
    rows = []
    for i in range(0, len(batch), max(1, len(batch) // n))[:n]:
        prompt = batch.prompts[i] if isinstance(batch.prompts[i], str) else rollout.plain_dialogue(batch.prompts[i])
        rows.append({"prompt": prompt, "response": batch.responses[i] + ("" if batch.ended[i] else " [no EOS]"),
                     "reward": rewards[i], **{column: values[i] for column, values in (extra or {}).items()}})
    return rows


def print_samples(rows, width=40):
    """The table on the console: the end of each prompt's last turn (the user's message, what the response answers),
    the start of the response, each up to `width` characters, the reward, then each log_extra column (up to 16
    characters of it)."""
    if not rows:
        return
    extra = [c for c in rows[0] if c not in ("prompt", "response", "reward")]
    text = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("\n", " ")

    def cut(s, keep_end):
        s = " ".join(s.split())
        return s if len(s) <= width else "..." + s[3 - width:] if keep_end else s[:width - 3] + "..."
    last_turn = lambda prompt: re.split(r"\n\n(?:Human|Assistant|System): ", prompt)[-1]  # rollout.plain_dialogue
    widths = {c: min(16, max(len(c), *(len(text(r[c])) for r in rows))) for c in extra}
    head = [f"{'prompt (its end)':<{width}}", f"{'response':<{width}}", "reward"] + \
        [f"{c[:widths[c]]:<{widths[c]}}" for c in extra]
    body = [[f"{cut(last_turn(r['prompt']), True):<{width}}", f"{cut(r['response'], False):<{width}}",
             f"{r['reward']:6.2f}"] + [f"{text(r[c])[:widths[c]]:<{widths[c]}}" for c in extra] for r in rows]
    tqdm.write("\n".join(("  " + " | ".join(line)).rstrip() for line in [head] + body))


class Logger:
    def __init__(self, cfg, ctx, start_step):
        self.ctx, self.path, self.trackers = ctx, os.path.join(cfg.out_dir, "metrics.jsonl"), []
        if ctx.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            # replaced whole, never truncated and rewritten: a kill in between would erase the run's history
            write_atomic(self.path, "".join(rows_up_to(self.path, start_step)))
            write_atomic(os.path.join(cfg.out_dir, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
            self.trackers = [TRACKER_CLASSES[name](cfg, start_step) for name in trackers(cfg.report_to)]

    def log(self, metrics):
        """One online batch's row (its "step" the x-axis of every tracker), flushed to the disk before the batch's
        checkpoint is written: a checkpoint never holds a batch whose row is lost. A failed write leaves the file
        as it was before the row and stops the run."""
        if not self.ctx.master:
            return
        line = memoryview((json.dumps(metrics) + "\n").encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # unbuffered: nothing left to flush
        try:
            size = os.fstat(fd).st_size
            while line:
                line = line[os.write(fd, line):]
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # no half row
            raise SystemExit(f"error: could not append online batch {metrics['step']}'s row to {self.path} "
                             f"({write_error(e)}); its rows before are intact. Free space or fix the cause, then "
                             "continue with --resume") from None
        finally:
            os.close(fd)
        kill_point("metrics")
        step, table = metrics["step"], metrics.get(SAMPLES)
        for t in self.trackers:
            t.log({k: v for k, v in metrics.items() if k not in ("step", SAMPLES)}, step)
            if table:
                t.table(SAMPLES, list(table[0]), [list(row.values()) for row in table], step)

    def close(self, failed=False):
        for t in self.trackers:
            t.close(failed)
        self.trackers = []


def rows_up_to(path, step):
    """The lines of metrics.jsonl for the online batches up to `step` (a resumed run's checkpoint; none for a new
    run): the rows a killed run logged after its checkpoint are logged again by the resumed run."""
    if step == 0 or not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError):  # a row cut short: the machine crashed while it was written
                continue
    return rows


class TensorBoardTracker:
    """--report-to tensorboard: event files in OUT_DIR/tensorboard (`tensorboard --logdir OUT_DIR/tensorboard`)."""

    def __init__(self, cfg, start_step):
        from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
        # purge_step: readers drop the events at steps after the checkpoint this run starts from (a killed run's
        # batches, logged again by this one), as Logger drops their lines from metrics.jsonl. Nothing is deleted or
        # rewritten for it: SummaryWriter opens a new event file that starts with a marker at that step, and
        # TensorBoard hides the earlier files' events from that step on. Event files are only ever appended to, so
        # a kill at any moment loses at most the unflushed events of the batch being logged, which the resumed run
        # logs again.
        self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=start_step + 1)

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # once a batch: a killed run loses no batch its checkpoint holds

    def table(self, name, columns, rows, step):
        cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|").replace("\n", "<br>")
        lines = [columns, ["---"] * len(columns), *[[cell(v) for v in row] for row in rows]]
        self.writer.add_text(name, "\n".join("| " + " | ".join(line) + " |" for line in lines), step)
        self.writer.flush()

    def close(self, failed=False):
        self.writer.close()


class WandbTracker:
    """--report-to wandb: one wandb run per run directory, its id kept in OUT_DIR/wandb_id so that --resume
    continues it; files under OUT_DIR/wandb. WANDB_MODE=offline writes them there and never needs the network
    (`wandb sync` uploads them later)."""

    def __init__(self, cfg, start_step):
        import wandb  # optional: --report-to wandb
        self.wandb, id_path = wandb, os.path.join(cfg.out_dir, "wandb_id")
        # a new wandb run unless resuming (a fresh start in an old directory too: its metrics.jsonl starts over)
        run_id = open(id_path).read().strip() if start_step > 0 and os.path.isfile(id_path) else None
        # A resume logs again the batches a killed run logged after its checkpoint; wandb keeps the first value
        # of a step, which an exact resume reproduces (timings aside).
        try:
            self.run = wandb.init(project=cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "dar",
                                  name=os.path.basename(os.path.normpath(cfg.out_dir)), dir=cfg.out_dir, id=run_id,
                                  resume="allow")
        except Exception as e:  # no API key, no network: say what to do, before any batch (nothing is lost yet)
            raise SystemExit(f"error: --report-to wandb could not start a wandb run ({type(e).__name__}: {e}). Log in "
                             "(`wandb login`, or WANDB_API_KEY), or log offline with WANDB_MODE=offline (`wandb sync "
                             "OUT_DIR/wandb/...` uploads later), or drop wandb from --report-to") from None
        write_atomic(id_path, self.run.id)
        self.run.config.update(dataclasses.asdict(cfg), allow_val_change=True)  # a resume may change --steps

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def table(self, name, columns, rows, step):
        # a log_extra column may hold numbers and strings (or None) side by side
        self.run.log({name: self.wandb.Table(columns=columns, data=rows, allow_mixed_types=True)}, step=step)

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def no_dropout(model):
    """Dropout off everywhere (as TRL does for RLHF): the loss's log-probs must be the function that pi_t's and
    pi_0's no-grad passes computed. transformers' from_pretrained leaves models in eval mode, where dropout is
    off anyway; the loop trains in train mode, which gradient checkpointing needs."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def optimizer_and_schedule(cfg, models):
    """One optimizer over every trained model (the policy, and PPO's value model), the paper's Adafactor or TRL's
    AdamW; its learning rate per update from lr_factor, over the run's optimizer steps (config.optimizer_steps)."""
    params = [p for m in models for p in m.parameters()]
    if cfg.optimizer == "adamw":  # its state is made like each parameter: sharded ones (DTensors) under --fsdp
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                weight_decay=cfg.weight_decay)
    else:
        opt = Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                        weight_decay=cfg.weight_decay)
        if cfg.fsdp:
            opt.register_step_pre_hook(shard_adafactor_state)
    total = optimizer_steps(cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: lr_factor(u, cfg.warmup_steps, total, cfg.lr_schedule))
    return opt, sched


def lr_factor(u, warmup, total, schedule):
    """The share of --lr that an update takes after u updates (LambdaLR's step count). Warm-up: the i-th of
    `warmup` updates takes i / warmup (transformers' takes (i - 1) / warmup, its first at 0). Then 1 (constant),
    or transformers' linear or half-cosine decay over the remaining updates, which reaches 0 after the last."""
    if u < warmup:
        return (u + 1) / warmup
    done = (u - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - done)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * done)))
    return 1.0


def shard_adafactor_state(opt, args, kwargs):
    """Before an Adafactor step under --fsdp: transformers' Adafactor makes its factored second-moment statistics
    as plain tensors, which cannot meet a sharded (DTensor) gradient. Made here as DTensors instead (sharded
    where they keep the gradient's sharded dimension, else whole), every step is computed on the global
    tensors, so the update is the one an unsharded Adafactor makes."""

    def settled(t):  # a mean over the sharded dimension is a pending sum (Partial): make it a whole one
        return t.redistribute(placements=[Replicate() if p.is_partial() else p for p in t.placements])
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state or not isinstance(p.grad, DTensor) or p.grad.dim() < 2:
                continue
            g = p.grad.float()
            state.update(step=0, RMS=0, exp_avg_sq_row=torch.zeros_like(settled(g.mean(dim=-1))),
                         exp_avg_sq_col=torch.zeros_like(settled(g.mean(dim=-2))))


def optimizer_step(cfg, models, opt, sched):
    """Clip each model's gradient norm on its own, then step; a non-finite gradient skips the step.

    Clipping per model keeps PPO's value loss (large on a 0-10 reward scale) from shrinking the policy's
    step. Returns the policy's gradient norm (the first model's).
    """
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.max_grad_norm or float("inf")) for m in models]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]  # --fsdp: a DTensor
    if all(torch.isfinite(n) for n in norms):
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return norms[0].item()


def say(line):
    """One line on stderr straight to the file descriptor: safe inside a signal handler, which may interrupt
    a print (tqdm's bar included) halfway, where a second buffered write would raise."""
    os.write(2, (line + "\n").encode())


def stop_at_once(line):
    """From a SIGINT handler: `line` on the first rank, and the process ends now with the shell's code for SIGINT.
    Not a KeyboardInterrupt: one raised in a destructor is ignored (seen while pi_0's SFT loaded), and a normal exit
    would first wait for the judge's HTTP threads to give up."""
    if os.environ.get("RANK", "0") == "0":
        say(line)
    with contextlib.suppress(Exception):  # a print this handler interrupted may hold stdout's buffer
        sys.stdout.flush()
    os._exit(130)


def exit_on_ctrl_c(line):
    """A script's Ctrl-C, outside the online batches (models loading, pi_0's SFT starting, the final save, an
    evaluation): one line, line(), instead of a traceback. loop.train's TermSignal takes over during the batches."""
    signal.signal(signal.SIGINT, lambda signum, frame: stop_at_once(line()))


class TermSignal:
    """Remembers a SIGTERM (a scheduler pre-empting the job) or a first SIGINT (Ctrl-C) instead of dying in the
    middle of an update; torchrun passes either on to every rank. The loop asks after each online batch, all ranks
    together so they stop at the same batch, checkpoints it and exits with the shell's code for the signal (128 +
    its number: 143, 130). A second Ctrl-C stops at once (stop_at_once), naming last(), the newest checkpoint;
    torchrun passes it on as SIGTERM, so a SIGTERM after a Ctrl-C does the same. A repeated SIGTERM changes nothing.

    Only the main thread runs a handler (the judge's HTTP threads never do) and only it can install one; elsewhere
    (tests calling train() from a thread) nothing changes. loud: this rank prints the first Ctrl-C's notice."""

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self, loud, last):
        self.seen, self.loud, self.last, self.previous = 0, loud, last, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.NAMES}

    def _handle(self, signum, frame):
        if self.seen and signal.SIGINT in (signum, self.seen):
            stop_at_once(f"second Ctrl-C: stopped now, without a checkpoint of this batch; the last checkpoint is "
                         f"{self.last() or 'none yet'}")
        if signum == signal.SIGINT and self.loud:
            say("Ctrl-C: the current online batch finishes and is checkpointed, then the run stops "
                "(Ctrl-C again stops at once, without that checkpoint)")
        self.seen = self.seen or signum  # the first signal names the stop; a repeated SIGTERM changes nothing

    def received(self, ctx):
        """The number of the signal this run stops for (0: none), the same on every rank."""
        flag = torch.tensor([float(self.seen)], device=ctx.device)
        if ctx.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def restore(self):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous = {}


def ctrl_c_line(cfg):
    """What a run stopped by Ctrl-C says: the checkpoint --resume continues from."""
    last = latest_checkpoint(cfg)
    return (f"Ctrl-C: stopped; the last checkpoint is {last}: continue with --resume" if last else
            "Ctrl-C: stopped before the first checkpoint; nothing to resume")


def silent_ranks(ctx, step, wait=10.0):
    """After a collective failed on this rank: the ranks that do not report a failure of online batch `step` within
    `wait` seconds, i.e. that hang (SIGSTOP, a deadlock) or died, sorted; None when that cannot be known.

    The process group is broken by then (gloo closes a pair that timed out: even monitored_barrier fails at once),
    so the reports go through torchrun's key-value store, which its agent process holds and every rank reaches at
    MASTER_ADDR:MASTER_PORT. Only a failing rank writes, and only here: a healthy run never touches the store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # the store would live in rank 0, maybe the hung one
        return None
    key = lambda rank: f"dar/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{step}/{rank}"
    try:
        store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=datetime.timedelta(seconds=wait))
        store.set(key(ctx.rank), "1")
        deadline, silent = time.time() + wait, list(range(ctx.world))
        while silent and time.time() < deadline:
            silent = [r for r in silent if not store.check([key(r)])]
            time.sleep(0.2)
        return silent
    except (RuntimeError, ValueError, KeyError, OSError):  # no store to reach: say nothing rather than guess
        return None


# ---------------------------------------------------------------------------------------------------
# The run directory: a new run never writes over a previous one
# ---------------------------------------------------------------------------------------------------
# What in a run directory is a run's own work (metrics.jsonl, config.json and the trackers' files from its first
# batch; checkpoints, latest, best, final/ and eval.json later); besides these, checkpoint directories ckpt-N.
# data.json is not: every start rewrites it (loop.report_long_prompts) before any batch.
RUN_FILES = ("metrics.jsonl", "final", "eval.json", "best", "best.json", "latest", "config.json", "tensorboard",
             "wandb", "wandb_id")


def previous_run(out_dir):
    """What out_dir holds of a previous run, as one phrase ("metrics.jsonl with 7 rows, checkpoints
    ckpt-000004..ckpt-000008, final/"); '' when it holds none (absent, empty, or other files only)."""
    if not os.path.isdir(out_dir):
        return ""
    names = set(os.listdir(out_dir))
    ckpts = sorted(n for n in names if re.fullmatch(r"ckpt-\d+", n))
    held = []
    if "metrics.jsonl" in names:
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            rows = sum(1 for line in f if line.strip())
        held.append(f"metrics.jsonl with {rows} row{'s' * (rows != 1)}")
    if ckpts:
        held.append(f"checkpoints {ckpts[0]}..{ckpts[-1]}" if len(ckpts) > 1 else f"checkpoint {ckpts[0]}")
    held += [n + "/" * os.path.isdir(os.path.join(out_dir, n)) for n in RUN_FILES[1:] if n in names]
    return ", ".join(held)


def aside_path(out_dir):
    """OUT_DIR.old-N, the first N from 1 that names nothing yet: where --overwrite moves a previous run."""
    base = os.path.abspath(out_dir)
    n = 1
    while os.path.lexists(f"{base}.old-{n}"):
        n += 1
    return f"{base}.old-{n}"


def claim_run_dir(cfg, ctx):
    """Before anything loads: a new run (no --resume) in a directory that holds a previous run stops with one line
    naming it, what it holds and the two ways on; with --overwrite, the directory is first moved, whole, to
    OUT_DIR.old-N (nothing is deleted). Rank 0 looks and moves; the others wait for its word and stop with it."""
    error = attempt(lambda: set_aside_previous_run(cfg))[1] if ctx.master and not cfg.resume else ""
    error = from_rank_0(ctx, error)
    if error:
        raise SystemExit(error if ctx.master else 1)


def set_aside_previous_run(cfg):
    held = previous_run(cfg.out_dir)
    if not held:
        return
    aside, here = aside_path(cfg.out_dir), os.path.abspath(cfg.out_dir)
    if not cfg.overwrite:
        raise SystemExit(f"error: --out-dir {cfg.out_dir} holds a previous run ({held}); continue it with --resume, "
                         f"or start a new one there with --overwrite, which first moves it to {aside}")
    if os.getcwd() == here or os.getcwd().startswith(here + os.sep):
        raise SystemExit(f"error: --overwrite would move {here}, the current directory, with this run inside it; "
                         "give --out-dir a directory below it, or run from elsewhere")
    try:
        os.rename(here, aside)
    except OSError as e:
        raise SystemExit(f"error: --overwrite could not move {here} to {aside} ({e.strerror}); move it yourself, or "
                         "give another --out-dir") from None
    print(f"--overwrite: moved the previous run in {cfg.out_dir} ({held}) to {aside}", flush=True)


def check_ranks_agree(ctx, model):
    """DDP keeps every rank's replica identical; check it at the end of a run (one number per tensor)."""
    if ctx.world == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(ctx.device)
    per_rank = gather(ctx, sums).view(ctx.world, -1)
    diff = (per_rank - per_rank[0]).abs().max().item()
    if diff > 0:
        raise SystemExit(f"error: parameters differ across ranks (max checksum difference {diff:g})")
    if ctx.master:
        print(f"parameters identical on all {ctx.world} ranks", flush=True)


def save_final(cfg, ctx, models, tok):
    """The trained policy (models[0]) as an ordinary Hugging Face directory, out_dir/final. Under --fsdp it is
    gathered onto rank 0's CPU first; under DDP every model is first checked to be identical on all ranks."""
    policy, final = models[0], os.path.join(cfg.out_dir, "final")
    if cfg.fsdp:
        whole = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if getattr(policy.config, "tie_word_embeddings", False):  # the head is the embedding: saved once
            for name in getattr(policy, "_tied_weights_keys", None) or ():
                whole.pop(name, None)
    else:
        for m in models:
            check_ranks_agree(ctx, m)
        whole = None
    if ctx.master:
        try:
            save_model_dir(final, policy, tok, weights=whole)
        except WRITE_ERRORS as e:
            raise SystemExit(f"error: could not write {final} ({write_error(e)}); the checkpoints and metrics.jsonl "
                             "are intact. Free space or fix the cause, then --resume writes it again") from None
        kill_point("final")
    barrier(ctx)


def rank_means(ctx, stats):
    """{name: mean over ranks} of per-rank float statistics (every rank reports the same names)."""
    names = sorted(stats)
    local = torch.tensor([stats[k] for k in names], dtype=torch.float64, device=ctx.device)
    return {k: v.item() for k, v in zip(names, gather(ctx, local).view(ctx.world, -1).mean(0))}


def pooled_means(ctx, sums):
    """{name: total / count} over every rank's {name: [sum, count]} (the reward functions' log_metric values):
    one object gather that every rank joins, whichever names it logged, so the collectives stay in step."""
    parts = [sums]
    if ctx.world > 1:
        parts = [None] * ctx.world
        torch.distributed.all_gather_object(parts, sums)
    pooled = {}
    for part in parts:
        for name, (total, count) in part.items():
            pooled[name] = [a + b for a, b in zip(pooled.get(name, [0.0, 0]), (total, count))]
    return {name: total / count for name, (total, count) in sorted(pooled.items())}


@contextlib.contextmanager
def local_gradients(model):
    """Accumulate this micro-batch's gradients on the rank, without syncing them (DDP's no_sync; FSDP2's
    set_requires_gradient_sync): only a minibatch's last micro-batch pays for the reduction."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def timed(timer, name):
    t = time.time()
    yield
    timer[name] = timer.get(name, 0.0) + time.time() - t

