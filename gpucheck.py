"""The GPU-only paths of this project, checked on one CUDA GPU in under 8 minutes: for the first machine that has one.

    python gpucheck.py --json gpu.json          # the same as: python bench.py --gpu-check --json gpu.json

Each check runs in its own process under a time limit (the whole run within --budget seconds), so a failure or a
hang leaves the others to run. Each prints PASS or FAIL with what it measured; a summary table and bench.py's
breakdown of one DAR online batch in bf16 follow. --json writes the results after every check (a run killed on the
way keeps what it had), and each check's output beside it (gpu-logs/NAME.log for gpu.json). Without CUDA it refuses.

  bf16          load_model on the GPU: --dtype auto gives bf16 weights there; the log-probs of the toy pi_0's own
                samples against a float32 copy of it (mean |diff| per token), and the cosine of their gradients
  attention     the attention load_model picks (flash_attention_2 when flash_attn imports, else sdpa) against the
                other one (sdpa, or eager), on left-padded rows: mean |diff| of log-probs; --dtype float32 loads too
  vllm          rollout.VllmSampler on CUDA: it samples; sleep() frees its memory (torch.cuda.mem_get_info); after the
                policy's weights change, push_weights wakes it and its log-probs and greedy tokens are the new policy's
  nccl          a one-rank NCCL group (all_reduce, all_gather, broadcast, barrier, infra.rank_means), then
                `torchrun --nproc_per_node 1 dar.py --backend nccl`: two online batches, ending with its checkpoint
  fsdp          `torchrun --nproc_per_node 1 dar.py --fsdp`: two online batches, final metrics finite
  fsdp-offload  the same with --fsdp-offload (FSDP2's CPUOffloadPolicy)
  logp-hf       dar.py --logp-source sampler in bf16: rollout/logp_abs_diff, generate's recorded log-probs against
                the policy's forward
  logp-vllm     the same with --rollout vllm: vLLM's log-probs against the policy's
  breakdown-hf, breakdown-vllm   bench.py's breakdown of one DAR online batch of its small model, in bf16

Models are built locally as everywhere in this project (no hub): the toy pi_0 (with a 40-step SFT, seconds) and
bench.py's small model, in --cache-dir.
"""
import argparse
import importlib.metadata
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import transformers
from transformers import AutoModelForCausalLM

import bench
import infra
import rollout
import tasks
from config import parse_config

ROOT = os.path.dirname(os.path.abspath(__file__))
RESULT = "GPUCHECK-RESULT "
TOY = ["--sft-steps", "40"]  # the toy pi_0 of the tests: a short SFT, built in seconds on the CPU
# two online batches of the toy task, as the tests run them
TOY_RUN = TOY + ["--online-batch", "32", "--minibatch", "16", "--micro-batch", "8", "--max-new-tokens", "12",
                 "--lr", "1e-3", "--eval-prompts", "16", "--steps", "2", "--print-every", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")

# Thresholds. bf16 keeps 8 significant bits (about 2.4 decimal digits: a rounding error of 2^-9 relative), so a
# logit of 10 is off by about 0.02 at every rounding, and log-probs of a bf16 forward differ from float32's, or
# from another bf16 kernel's, by a few hundredths of a nat per token. On a CPU in float32 the same comparisons
# agree to 1e-4 (tests/test_vllm.py asserts rollout/logp_abs_diff < 1e-4); a missed weight sync shows as tenths.
BF16_TOL = 0.05       # mean |log p_bf16 - log p_float32| per response token, nats
GRAD_COS = 0.95       # cosine between the bf16 and the float32 gradient of the same loss
ATTN_TOL = 0.05       # mean |diff| per token between two attention implementations, both in bf16
SYNC_TOL = 0.1        # vLLM's log-probs against the updated policy's after push_weights, nats per token...
SYNC_RATIO = 5        # ...and at most a fifth of the stale engine's difference (before the push)
GREEDY_MIN = 0.5      # share of greedy rows identical to the policy's (bf16 near-ties may flip a token)
SLEEP_FREED_MIN = 0.5  # sleep() must free at least this share of the GPU memory the engine took
PARITY_TOL = 0.05     # rollout/logp_abs_diff in bf16 (--logp-source sampler), nats per token
# per check: (name, seconds at most); the run also stops starting checks when --budget runs out
CHECKS = [("bf16", 60), ("attention", 60), ("vllm", 150), ("nccl", 100), ("fsdp", 90), ("fsdp-offload", 90),
          ("logp-hf", 60), ("logp-vllm", 120), ("breakdown-hf", 90), ("breakdown-vllm", 150)]


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def run_proc(cmd, timeout, log_path, env=None):
    """Run cmd (cwd: the project) with stdout and stderr into log_path, for at most `timeout` seconds; its return
    code, or None when it was stopped (SIGTERM to its process group, which torchrun passes on to its ranks, then
    SIGKILL)."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.write(f"\n[gpucheck: stopped after {timeout:.0f} s]\n")
            return None


def tail(path, lines=3):
    """The last lines of a log, on one line: what a FAIL shows."""
    try:
        text = [l.strip() for l in open(path, errors="replace").read().splitlines()
                if l.strip() and not l.startswith("$ ")]  # not the command lines run_proc writes
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-400:]


def mean_abs(a, b, mask):
    """Mean |a - b| over the positions where mask is 1 (response tokens)."""
    mask = mask.to(a.device).float()
    return float(((a.float() - b.to(a.device).float()).abs() * mask).sum() / mask.sum().clamp(min=1))


def toy_prompts(n=8):
    return tasks.toy_task().train_prompts[:n]


def finite_numbers(row):
    return all(math.isfinite(v) for v in row.values() if isinstance(v, float))


def read_rows(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(l) for l in open(path)] if os.path.isfile(path) else []


def dar_run(env, name, flags, launcher=()):
    """dar.py (under `launcher`, e.g. torchrun) on the toy task for two online batches: (return code, out_dir, rows,
    log)."""
    out, log = os.path.join(env["work"], name), os.path.join(env["log_dir"], f"{name}.dar.log")
    child_env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}  # torchrun sets its own
    child_env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    cmd = [*launcher, *([] if launcher else [sys.executable]), os.path.join(ROOT, "dar.py"), *TOY_RUN,
           "--cache-dir", env["cache"], "--out-dir", out, *flags]
    rc = run_proc(cmd, env["deadline"] - time.time(), log, child_env)
    return rc, out, read_rows(out), log


def outcome(rc, log):
    return "finished" if rc == 0 else "stopped at the time limit" if rc is None else f"exit {rc}: {tail(log)}"


# ---------------------------------------------------------------------------------------------------
# The checks: each env -> {"ok": bool, "figure": what it measured, ...numbers}; env has device, dirs, cache, work,
# log_dir, deadline (and flags: extra Config flags, for the tests on a CPU)
# ---------------------------------------------------------------------------------------------------
def sample_batch(model, tok, device):
    """The model's own samples (8 prompts x 2, temperature 1), left-padded, on device."""
    torch.manual_seed(0)
    return rollout.generate(model, tok, toy_prompts(), 2, 16, 1.0).to(device)


def check_bf16(env):
    device, path = env["device"], env["dirs"]["toy"]
    cfg = parse_config(["--model", path, *env.get("flags", [])])
    model, tok = infra.load_model(path, cfg, device), infra.load_tokenizer(path)
    ref = tasks.load_pretrained(AutoModelForCausalLM, path, dtype=torch.float32, attn_implementation="sdpa").to(device)
    batch = sample_batch(ref, tok, device)
    grads, logps = [], []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        logp = rollout.token_logps(m, batch)
        (logp.sum() / batch.response_mask.sum()).backward()
        logps.append(logp.detach())
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
    # the same loss told its gradient in forward (seq_grad, as DAR's updates tell theirs): the bf16 head's
    # gradients formed there, against the bf16 ones formed in backward
    model.zero_grad(set_to_none=True)
    ones = torch.ones(len(batch), device=device)
    (rollout.token_logps(model, batch, seq_grad=ones).sum() / batch.response_mask.sum()).backward()
    hinted = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    diff = mean_abs(*logps, batch.response_mask)
    cos = float(torch.nn.functional.cosine_similarity(*grads, dim=0))
    cos_hint = float(torch.nn.functional.cosine_similarity(hinted, grads[0], dim=0))
    param = next(model.parameters())
    ok = (param.dtype == torch.bfloat16 and param.device.type == device.type and diff < BF16_TOL and cos > GRAD_COS
          and cos_hint > GRAD_COS)
    return dict(ok=ok, dtype=str(param.dtype), device=str(param.device), logp_abs_diff=diff, grad_cosine=cos,
                hinted_grad_cosine=cos_hint,
                figure=f"weights {str(param.dtype)[6:]} on {param.device}; mean |dlog p| vs float32 {diff:.4f} "
                       f"(< {BF16_TOL}), gradient cosine {cos:.4f} (> {GRAD_COS}); gradient formed in forward vs "
                       f"in backward, cosine {cos_hint:.4f}")


def check_attention(env):
    device, path = env["device"], env["dirs"]["toy"]
    cfg = parse_config(["--model", path, *env.get("flags", [])])
    model, tok = infra.load_model(path, cfg, device), infra.load_tokenizer(path)
    dtype = next(model.parameters()).dtype
    chosen, expected = model.config._attn_implementation, infra.attention_implementation(device, dtype)
    other = "sdpa" if chosen == "flash_attention_2" else "eager"
    alt = tasks.load_pretrained(AutoModelForCausalLM, path, dtype=dtype, attn_implementation=other).to(device)
    batch = sample_batch(model, tok, device)
    with torch.no_grad():
        diff = mean_abs(rollout.token_logps(model, batch), rollout.token_logps(alt, batch), batch.response_mask)
        # --dtype float32 on the same device: flash-attention takes no float32, so load_model must pick sdpa
        cfg32 = parse_config(["--model", path, "--dtype", "float32"])
        m32 = infra.load_model(path, cfg32, device)
        finite32 = bool(torch.isfinite(rollout.token_logps(m32, batch)).all())
    impl32 = m32.config._attn_implementation
    ok = chosen == expected and diff < ATTN_TOL and finite32 and impl32 == "sdpa"
    return dict(ok=ok, implementation=chosen, other=other, logp_abs_diff=diff, float32_implementation=impl32,
                figure=f"{chosen} vs {other}: mean |dlog p| {diff:.4f} (< {ATTN_TOL}); --dtype float32 loads {impl32}"
                       + ("" if chosen == expected else f"; expected {expected}"))


def check_vllm(env):
    device, path = env["device"], env["dirs"]["toy"]
    cfg = parse_config(["--model", path, *env.get("flags", [])])
    cuda = device.type == "cuda"
    dtype = infra.model_dtype(cfg, device)
    policy, tok = infra.load_model(path, cfg, device), infra.load_tokenizer(path)
    stop, prompts = rollout.eos_ids(policy, tok), toy_prompts()

    def free():
        if not cuda:
            return 0
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info()[0]
    f0, t0 = free(), time.time()
    sampler = rollout.VllmSampler(path, dtype, 0, 512)
    start_s, engine = time.time() - t0, f0 - free()
    try:
        torch.manual_seed(0)
        before = sampler.generate(tok, prompts, 4, 16, 1.0, stop)
        greedy_before = sampler.generate(tok, prompts, 1, 16, 0.0, stop)
        sampled = len(before) == 4 * len(prompts) and int(before.response_mask.sum()) > 0
        f1 = free()
        sampler.sleep()
        freed = free() - f1
        with torch.no_grad():  # the updates' stand-in: every weight moves
            g = torch.Generator(device=device).manual_seed(0)
            for p in policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, device=device, dtype=p.dtype))
            stale = mean_abs(before.sampler_logp.to(device), rollout.token_logps(policy, before.to(device)),
                             before.response_mask)
        t1 = time.time()
        sampler.push_weights(policy)
        sync_s = time.time() - t1
        torch.manual_seed(1)
        after = sampler.generate(tok, prompts, 4, 16, 1.0, stop)
        greedy_after = sampler.generate(tok, prompts, 1, 16, 0.0, stop)
        with torch.no_grad():
            fresh = mean_abs(after.sampler_logp.to(device), rollout.token_logps(policy, after.to(device)),
                             after.response_mask)
        hf = rollout.generate(policy, tok, prompts, 1, 16, 1.0, greedy=True)
    finally:
        sampler.close()
    same = lambda a: sum(x == y for x, y in zip(a.responses, hf.responses)) / len(prompts)  # noqa: E731
    agree_after, agree_before = same(greedy_after), same(greedy_before)
    memory_ok = not cuda or (engine > 0 and freed >= SLEEP_FREED_MIN * engine)
    ok = sampled and memory_ok and fresh < SYNC_TOL and fresh * SYNC_RATIO < stale and agree_after >= GREEDY_MIN
    gib = 2 ** 30
    return dict(ok=ok, start_s=start_s, engine_gib=engine / gib, sleep_freed_gib=freed / gib, push_s=sync_s,
                logp_abs_diff_after_push=fresh, logp_abs_diff_stale=stale, greedy_agree_after=agree_after,
                greedy_agree_before=agree_before,
                figure=f"engine {engine / gib:.1f} GiB, sleep freed {freed / gib:.1f} GiB (>= {SLEEP_FREED_MIN:.0%}); "
                       f"after push ({sync_s:.2f} s) |dlog p| {fresh:.4f} vs stale {stale:.4f} (< {SYNC_TOL}, "
                       f"< stale/{SYNC_RATIO}); greedy rows = policy's {agree_after:.2f} (>= {GREEDY_MIN}), "
                       f"before push {agree_before:.2f}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_nccl(env, backend="nccl"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    ctx = infra.setup_distributed(parse_config(["--backend", backend]))
    dist = torch.distributed
    try:
        x = torch.ones(16 * 2 ** 20, device=ctx.device)  # 64 MiB of float32
        t0 = time.time()
        dist.all_reduce(x)
        parts = [torch.empty_like(x)]
        dist.all_gather(parts, x)
        y = torch.full((4,), 3.0, device=ctx.device)
        dist.broadcast(y, src=0)
        objects = [None]
        dist.all_gather_object(objects, {"rank": ctx.rank})
        dist.barrier()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        collective_s = time.time() - t0
        means = infra.rank_means(ctx, {"a": 2.0})
        group_ok = (bool(x.eq(1).all()) and bool(parts[0].eq(1).all()) and bool(y.eq(3).all())
                    and objects == [{"rank": 0}] and means == {"a": 2.0})
        used = dist.get_backend()
    finally:
        dist.destroy_process_group()
        for k in DIST_VARS:
            os.environ.pop(k, None)
    rc, out, rows, log = dar_run(env, "nccl", ["--backend", backend], TORCHRUN)
    ckpt = os.path.isfile(os.path.join(out, "latest")) and os.path.isfile(os.path.join(out, "final", "config.json"))
    ok = group_ok and used == backend and rc == 0 and ckpt and len(rows) == 2
    return dict(ok=ok, backend=used, collectives_s=collective_s, dar=outcome(rc, log), batches=len(rows),
                checkpoint=ckpt, figure=f"{used} group of 1: collectives {'right' if group_ok else 'WRONG'} "
                                        f"({collective_s:.2f} s); torchrun dar.py: {outcome(rc, log)}, {len(rows)} "
                                        f"batches, checkpoint {'written' if ckpt else 'MISSING'}")


def check_fsdp(env, offload=False):
    flags = ["--fsdp"] + (["--fsdp-offload"] if offload else [])
    rc, out, rows, log = dar_run(env, "fsdp-offload" if offload else "fsdp", flags, TORCHRUN)
    last = rows[-1] if rows else {}
    finite = bool(rows) and finite_numbers(last)
    ok = rc == 0 and len(rows) == 2 and finite
    return dict(ok=ok, dar=outcome(rc, log), batches=len(rows), final_loss=last.get("train/loss"),
                seconds_per_batch=last.get("perf/seconds_per_batch"),
                figure=f"torchrun dar.py {' '.join(flags)}: {outcome(rc, log)}, {len(rows)} batches, final metrics "
                       f"{'finite' if finite else 'NOT finite'} (train/loss {last.get('train/loss', float('nan')):.4f})")


def check_logp(env, backend):
    rc, out, rows, log = dar_run(env, f"logp-{backend}", ["--logp-source", "sampler", "--rollout", backend])
    diffs = [r["rollout/logp_abs_diff"] for r in rows if "rollout/logp_abs_diff" in r]
    worst = max(diffs) if diffs else float("nan")
    ok = rc == 0 and len(diffs) == 2 and worst < PARITY_TOL
    return dict(ok=ok, dar=outcome(rc, log), logp_abs_diff=diffs,
                figure=f"rollout/logp_abs_diff {', '.join(f'{d:.4f}' for d in diffs) or '-'} (< {PARITY_TOL}); "
                       f"dar.py {outcome(rc, log)}")


def check_breakdown(env, backend):
    job = dict(kind="loop", model="small", model_dir=env["dirs"]["small"], algo="dar", warmup=1, batches=1,
               logp_source="policy", flags=["--rollout", backend])
    r = bench.run_worker(job, os.cpu_count(), timeout=env["deadline"] - time.time())
    ok = "error" not in r and math.isfinite(r["seconds"])
    return dict(r, ok=ok, figure=f"error: {r['error']}" if not ok else
                f"{r['seconds']:.3f} s per online batch, {r['tokens']:.0f} tokens, peak {r['memory_mb']:.0f} MB")


RUN = {"bf16": check_bf16, "attention": check_attention, "vllm": check_vllm, "nccl": check_nccl,
       "fsdp": check_fsdp, "fsdp-offload": lambda env: check_fsdp(env, offload=True),
       "logp-hf": lambda env: check_logp(env, "hf"), "logp-vllm": lambda env: check_logp(env, "vllm"),
       "breakdown-hf": lambda env: check_breakdown(env, "hf"),
       "breakdown-vllm": lambda env: check_breakdown(env, "vllm")}


def work(name, cache, log_dir, limit):
    """One check in this process (gpucheck.py --check NAME): its result dict, or ok=False with the error."""
    env = dict(device=torch.device("cuda", 0), dirs=bench.model_dirs(cache, TOY), cache=cache, log_dir=log_dir,
               work=tempfile.mkdtemp(prefix=f"gpucheck-{name}-"), deadline=time.time() + limit - 10)
    try:
        return RUN[name](env)
    except Exception as e:  # noqa: BLE001  (any failure is this check's FAIL, with its reason)
        traceback.print_exc()
        return dict(ok=False, figure=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


# ---------------------------------------------------------------------------------------------------
# The run: each check in its own process, within the budget; the table; the JSON
# ---------------------------------------------------------------------------------------------------
def run_checks(checks, command, deadline, log_dir, report, json_path=None, min_start=20):
    """Run each (name, seconds) of checks as the process command(name, limit), for at most min(seconds, what is left
    until deadline); print its line and keep its result in report["checks"] (written to json_path after each)."""
    results = report.setdefault("checks", {})
    for name, seconds in checks:
        left = deadline - time.time()
        if left < min_start:
            res = dict(verdict="SKIP", figure="not run: --budget used up", seconds=0.0)
        else:
            limit, log, t0 = min(seconds, left), os.path.join(log_dir, f"{name}.log"), time.time()
            rc = run_proc(command(name, limit), limit, log, dict(os.environ, PYTHONUNBUFFERED="1"))
            lines = [l for l in open(log, errors="replace").read().splitlines() if l.startswith(RESULT)]
            if lines:
                res = json.loads(lines[-1][len(RESULT):])
            elif rc is None:
                res = dict(ok=False, figure=f"stopped at its time limit of {limit:.0f} s")
            else:
                res = dict(ok=False, figure=f"exit {rc} without a result: {tail(log)}")
            res.update(verdict="PASS" if res.pop("ok", False) else "FAIL", seconds=time.time() - t0)
        results[name] = res
        print(f"{name:15} {res['verdict']:5} {res['figure']}  ({res['seconds']:.0f} s)", flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=1)
    return results


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def arg_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", help="write the results to this JSON file (after every check), and each check's log "
                                  "to a directory beside it")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole run; checks not started by then "
                                                              "are skipped")
    p.add_argument("--checks", default=",".join(n for n, _ in CHECKS), help="the checks to run, comma-separated")
    p.add_argument("--cache-dir", default="~/.cache/dar", help="where the toy pi_0 and the small model are built")
    p.add_argument("--check", help=argparse.SUPPRESS)
    p.add_argument("--log-dir", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = arg_parser().parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"error: the GPU check runs the GPU-only paths and needs a CUDA GPU, and torch "
                 f"{torch.__version__} sees none here. Run it on a machine with a CUDA GPU (an H100 or H200) and the "
                 f"CUDA builds of torch and vllm: python bench.py --gpu-check --json gpu.json")
    if args.check:  # one check, in its own process
        print(RESULT + json.dumps(work(args.check, args.cache_dir, args.log_dir, args.limit)), flush=True)
        return
    t0 = time.time()
    names = args.checks.split(",")
    unknown = [n for n in names if n not in RUN]
    if unknown:
        sys.exit(f"error: --checks: unknown {', '.join(unknown)}; the checks are {', '.join(RUN)}")
    log_dir = (os.path.splitext(args.json)[0] + "-logs") if args.json else tempfile.mkdtemp(prefix="gpucheck-logs-")
    os.makedirs(log_dir, exist_ok=True)
    bench.model_dirs(args.cache_dir, TOY)  # built once here, before the checks share them
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = dict(date=time.strftime("%Y-%m-%d %H:%M"), commit=commit, device=torch.cuda.get_device_name(0),
                  torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
                  vllm=version("vllm"), flash_attn=version("flash-attn") or version("flash_attn"), budget_s=args.budget,
                  log_dir=log_dir)
    print(f"gpucheck.py  {report['date']}  commit {commit}  {report['device']}  torch {torch.__version__} (CUDA "
          f"{torch.version.cuda})  transformers {transformers.__version__}  vllm {report['vllm']}  flash_attn "
          f"{report['flash_attn']}  budget {args.budget:.0f} s  logs {log_dir}", flush=True)

    def command(name, limit):
        return [sys.executable, os.path.join(ROOT, "gpucheck.py"), "--check", name, "--cache-dir", args.cache_dir,
                "--log-dir", log_dir, "--limit", str(limit)]
    results = run_checks([(n, s) for n, s in CHECKS if n in names], command, t0 + args.budget, log_dir, report,
                         args.json)
    print("\nsummary")
    for name, r in results.items():
        print(f"  {name:15} {r['verdict']}")
    rows = {b: results.get(f"breakdown-{b}", {}) for b in ("hf", "vllm")}
    if any("seconds" in r and "tokens" in r for r in rows.values()):
        print("\n[breakdown] seconds per DAR online batch of the small model in bf16, by phase (one batch after one)")
        print(f"{'rollout':8} {'total':>8}" + "".join(f" {ph:>11}" for ph in bench.PHASES) + f" {'tokens':>8}")
        for b, r in rows.items():
            if "tokens" in r:
                print(f"{b:8} {r['seconds']:8.3f}" + "".join(f" {bench.fmt(r.get(ph)):>11}" for ph in bench.PHASES)
                      + f" {r['tokens']:8.0f}")
    report["total_s"] = time.time() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = [n for n, r in results.items() if r["verdict"] != "PASS"]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed in {report['total_s']:.0f} s"
          + (f"; not passed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
