"""Where the seconds of an online batch go, what the same work costs at the least, and how this project compares
with its own baselines and with TRL (the paper's Table 8, and issue 7).

    python bench.py                                   # every section this machine can run (~25 min on 2 CPU cores)
    python bench.py --sections breakdown,floor        # some of them
    python bench.py --batches 3 --warmup 1            # a quick look (figures are then noisier)
    python bench.py --json bench.json                 # the figures as JSON too, to compare over time

Sections, each one table in a fixed format:
  breakdown  one DAR online batch on the toy model and on a small one (8 x 512 Qwen2, about 25M parameters,
             128-token responses, where compute dominates): sampling, judging, the pi_t and pi_0 log-prob
             passes, the updates, the weight sync (vLLM only)
  floor      the work DAR cannot avoid, done by a minimal loop in a process of its own: sampling the same prompts
             x K to the same length, one pi_0 forward on them (what every method regularised toward pi_0
             needs), then one forward/backward and optimizer step per update on those tokens;
             efficiency = floor / DAR, for --logp-source policy and sampler
  algos      DAR, GRPO, RLOO and PPO on identical settings (prompts, K, tokens, updates, one epoch): seconds
             per online batch and peak memory, as ratios to DAR
  table8     the same four, each at its own paper settings (PPO's 4 epochs and value model), as the paper's
             Table 8 compares them
  trl        TRL's GRPOTrainer on the identical model, prompts, K, tokens, updates and precision, when `trl`
             can be imported (it is not a dependency; nothing is installed): ours/TRL per online batch,
             with the tokens each side generated
  rollout    sampling throughput of transformers' generate and of vLLM (when importable), tokens per second
  overlap    DAR on the small model against the served stand-in annotator (judge.py --serve), its --delay per request
             chosen so that judging takes about as long as the two log-prob passes: --judge-overlap off and on,
             the judge's seconds, the step's wait for it, the seconds saved per batch
  logps      peak memory and time of the chosen tokens' log-probs (with gradients) at Qwen2's vocabulary, for one
             micro-batch of two 1,024-token responses, from the last hidden states and the LM head: the float32
             log-softmax of the logits, rollout.selected_logps of the logits, and rollout.head_logps (no logits),
             with the loss's gradient unknown in forward (GRPO, PPO) and known (DAR's weights: grad_hint)

Every figure is a median over --batches online batches after --warmup ones. Each measurement runs in its own
process (peak memory is a per-process figure: max RSS on a CPU, torch's peak allocation on a GPU) with
--threads threads; ratios are taken between measurements of the same invocation.
"""
import argparse
import json
import os
import platform
import resource
import runpy
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

import rollout
import tasks
from config import Config, parse_config
from infra import Dist, load_model, load_tokenizer, model_dtype, optimizer_and_schedule, setup_distributed
from loop import ensure_toy_models, prompt_indices, score

ROOT = os.path.dirname(os.path.abspath(__file__))
SMALL_MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                   intermediate_size=1536, max_position_embeddings=1024, tie_word_embeddings=True)
SMALL_TOKENS = 128
# the online batch of each model: responses = prompts x K, updates = online_batch / minibatch
SETTINGS = {
    "toy": dict(k=4, online_batch=256, minibatch=64, micro_batch=64, max_new_tokens=16),
    "small": dict(k=4, online_batch=32, minibatch=8, micro_batch=8, max_new_tokens=SMALL_TOKENS),
}
PHASES = ("sample", "judge", "logp_t", "logp_0", "values", "update", "weight_sync")
RESULT = "BENCH-RESULT "


# ---------------------------------------------------------------------------------------------------
# Models: the toy pi_0 of dar.py, and a small random Qwen2 whose responses always run SMALL_TOKENS tokens
# ---------------------------------------------------------------------------------------------------
def model_dirs(cache, toy_flags=()):
    """{"toy": the toy pi_0, "small": the small model}, built in the cache on first use (toy_flags: the toy
    pi_0's flags, e.g. a shorter --sft-steps)."""
    cfg = parse_config(["--cache-dir", cache, *toy_flags])
    _, toy = ensure_toy_models(cfg, Dist())
    key = "x".join(str(SMALL_MODEL[k]) for k in ("num_hidden_layers", "hidden_size", "intermediate_size"))
    small = os.path.join(os.path.expanduser(cache), f"bench-small-{key}-{SMALL_TOKENS}")
    if not os.path.isfile(os.path.join(small, "config.json")):
        tok = tasks.build_tokenizer()
        config = Qwen2Config(vocab_size=-(-len(tok) // 8) * 8, bos_token_id=None, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **SMALL_MODEL)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        # random weights would stop after ~V tokens at random; the benchmark wants full-length responses
        model.generation_config.min_new_tokens = SMALL_TOKENS
        model.save_pretrained(small + ".tmp")
        tok.save_pretrained(small + ".tmp")
        os.replace(small + ".tmp", small)
    return {"toy": toy, "small": small}


def loop_flags(model, model_dir, algo, steps, out_dir, logp_source="policy", paper=False):
    """dar.py's flags for a measured run; paper: the algorithm's own paper settings (config.ALGO_DEFAULTS: PPO's 4
    epochs), else one epoch for every algorithm (identical work)."""
    s = SETTINGS[model]
    return ["--algo", algo, "--logp-source", logp_source, "--model", model_dir, "--judge", "toy_proxy", "--steps",
            str(steps), *([] if paper else ["--epochs", "1"]),
            "--k", str(s["k"]), "--online-batch", str(s["online_batch"]), "--minibatch", str(s["minibatch"]),
            "--micro-batch", str(s["micro_batch"]), "--max-new-tokens", str(s["max_new_tokens"]),
            "--lr", "1e-5", "--out-dir", out_dir, "--save-every", str(10 ** 6), "--print-every", str(10 ** 6),
            "--sample-every", str(10 ** 6), "--eval-prompts", "0", "--seed", "0"]


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one RESULT line
# ---------------------------------------------------------------------------------------------------
def work_loop(job):
    """An algorithm of this project, run as the program `python dar.py FLAGS` inside this worker process (runpy:
    the script is run as __main__, never imported), so the process's peak memory is the run's."""
    out = tempfile.mkdtemp(prefix="bench-")
    steps = job["warmup"] + job["batches"]
    flags = loop_flags(job["model"], job["model_dir"], job["algo"], steps, out, job["logp_source"], job.get("paper"))
    flags += job.get("flags", [])  # e.g. --rollout vllm (gpucheck.py)
    sys.argv = [os.path.join(ROOT, "dar.py"), *flags]
    runpy.run_path(sys.argv[0], run_name="__main__")
    cfg = parse_config(flags)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f][job["warmup"]:]
    res = {"seconds": float(np.median([r["perf/seconds_per_batch"] for r in rows])),
           "tokens": float(np.mean([r["train/response_len"] for r in rows])) * cfg.online_batch,
           "memory_mb": peak_memory_mb()}
    for p in PHASES + ("judge_wait",):
        if f"perf/{p}_s" in rows[0]:
            res[p] = float(np.median([r[f"perf/{p}_s"] for r in rows]))
    if "rollout/logp_abs_diff" in rows[0]:  # the sampler's log-probs against the policy's (vLLM)
        res["logp_abs_diff"] = float(np.mean([r["rollout/logp_abs_diff"] for r in rows]))
    return res


def work_floor(job):
    """floor_loop at DAR's settings, in a process of its own like DAR's: run after DAR in DAR's process, it sampled
    about 10% slower than DAR had (6.5 s against 5.9 s, on a quiet machine), which no change of its code explained."""
    cfg = parse_config(loop_flags(job["model"], job["model_dir"], "dar", 1, tempfile.mkdtemp(prefix="bench-")))
    return floor_loop(cfg, setup_distributed(cfg), job["model_dir"], job["warmup"], job["batches"])


def floor_loop(cfg, ctx, model_dir, warmup, batches):
    """The least work an online batch of these settings needs: sample the same prompts x K, one forward of pi_0
    on them (loop.score: every method regularised toward pi_0 needs its log-probs), then per update one
    forward/backward on its responses (rollout.token_logps, the pass DAR's updates make) and one optimizer step.
    No judge, no pi_t pass, no metrics. Returns {"seconds", "sample", "logp_0", "update", "tokens"}."""
    task = tasks.load_task(cfg.task)
    policy, tok = load_model(model_dir, cfg, ctx.device), load_tokenizer(model_dir)
    ref = load_model(model_dir, cfg, ctx.device, frozen=True)
    policy.config.use_cache = False
    opt, _ = optimizer_and_schedule(cfg, [policy])
    n_prompts = cfg.online_batch // cfg.k
    times, tokens = [], []
    for step in range(warmup + batches):
        t0 = time.time()
        idx = prompt_indices(step, n_prompts, len(task.train_prompts), cfg.seed)
        batch = rollout.generate(policy, tok, [task.train_prompts[i] for i in idx], cfg.k, cfg.max_new_tokens,
                                 cfg.temperature)
        t_ref = time.time()
        score(ref, batch, cfg.micro_batch)
        t1 = time.time()
        order = torch.randperm(len(batch))
        for u in range(cfg.online_batch // cfg.minibatch):
            rows = order[u * cfg.minibatch:(u + 1) * cfg.minibatch]
            for i in range(0, len(rows), cfg.micro_batch):
                part = batch.select(rows[i:i + cfg.micro_batch]).to(ctx.device)
                ones = torch.ones(len(part))  # a loss linear in log pi, as DAR's: the head's gradient in forward
                (-rollout.token_logps(policy, part, seq_grad=ones).sum() / len(rows)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append((t_ref - t0, t1 - t_ref, time.time() - t1))
            tokens.append(batch.response_mask.sum().item())
    sample, logp_0, update = (float(np.median(x)) for x in zip(*times))
    return {"seconds": float(np.median([sum(t) for t in times])), "sample": sample, "logp_0": logp_0,
            "update": update, "tokens": float(np.mean(tokens))}


# TRL's settings the table prints beside ours (`--algo grpo`'s, from loop_flags and config.ALGO_DEFAULTS)
TRL_SETTINGS = ("gradient_checkpointing", "loss_type", "scale_rewards", "beta", "epsilon", "bf16", "temperature",
                "num_iterations", "disable_dropout")
OURS_FOR_TRL = dict(gradient_checkpointing=False, loss_type="sequence (TRL: grpo)", scale_rewards="group", beta=0.04,
                    epsilon=0.2, temperature=0.9, num_iterations=1, disable_dropout=True)


def work_trl(job):
    """TRL's GRPOTrainer on the same model, prompts, K, response length, updates per online batch and dtype:
    one generation of online_batch completions every online_batch / minibatch optimizer steps."""
    import datasets  # optional: only the TRL section needs it, as trl does
    import trl  # optional: TRL is not a dependency of this project; the section reports when it is missing
    s = SETTINGS[job["model"]]
    n_updates = s["online_batch"] // s["minibatch"]
    steps = (job["warmup"] + job["batches"]) * n_updates
    prompts = tasks.toy_task().train_prompts[:steps * s["online_batch"] // s["k"]]
    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})

    def toy_proxy(prompts, completions, **_):
        return [tasks.toy_proxy_score(p[-1]["content"], c[-1]["content"], True) for p, c in zip(prompts, completions)]

    stamps = []

    class Stamp(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.time())

    fields = trl.GRPOConfig.__dataclass_fields__
    extra = {"generation_kwargs": {"min_new_tokens": s["max_new_tokens"]}} if "generation_kwargs" in fields else {}
    # Every setting where TRL's default differs from ours, set explicitly: GRPOConfig defaults to gradient
    # checkpointing, bf16 and the "dapo" token mean; ours (`--algo grpo`) to none of them
    extra.update({k: v for k, v in dict(loss_type="grpo", scale_rewards="group", epsilon=0.2,
                                         disable_dropout=True).items() if k in fields})
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=s["minibatch"],
        gradient_accumulation_steps=1, num_generations=s["k"], steps_per_generation=n_updates, num_iterations=1,
        max_completion_length=s["max_new_tokens"], temperature=0.9, top_p=1.0, top_k=0, beta=0.04,
        learning_rate=1e-5, max_steps=steps, optim="adafactor", lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, report_to="none", save_strategy="no", seed=0, bf16=job["dtype"] == "bfloat16",
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        shuffle_dataset=False, **extra)
    trainer = trl.GRPOTrainer(model=job["model_dir"], reward_funcs=toy_proxy, args=config, train_dataset=data,
                              callbacks=[Stamp()])
    t0 = time.time()
    trainer.train()
    ends = [t0] + stamps[n_updates - 1::n_updates]  # the end of each online batch
    per_batch = np.diff(ends)[job["warmup"]:]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    effective = {k: getattr(config, k, None) for k in TRL_SETTINGS}
    return {"seconds": float(np.median(per_batch)), "tokens": float(np.mean(lengths)) * s["online_batch"],
            "memory_mb": peak_memory_mb(), "trl_version": trl.__version__, "settings": effective}


def work_rollout(job):
    """Tokens per second of one backend generating the small model's online batch."""
    s = SETTINGS[job["model"]]
    cfg = parse_config(["--model", job["model_dir"]])
    device = setup_distributed(cfg).device
    tok = load_tokenizer(job["model_dir"])
    prompts = tasks.toy_task().train_prompts[:s["online_batch"] // s["k"]]
    if job["backend"] == "vllm":
        sampler = rollout.VllmSampler(job["model_dir"], model_dtype(cfg, device), 0, 1024)
        stop = rollout.eos_ids(load_model(job["model_dir"], cfg, torch.device("cpu")), tok)
        gen = lambda: sampler.generate(tok, prompts, s["k"], s["max_new_tokens"], 0.9, stop)  # noqa: E731
    else:
        model = load_model(job["model_dir"], cfg, device)
        gen = lambda: rollout.generate(model, tok, prompts, s["k"], s["max_new_tokens"], 0.9)  # noqa: E731
    rates = []
    for i in range(job["warmup"] + job["batches"]):
        torch.manual_seed(i)
        t0 = time.time()
        batch = gen()
        if i >= job["warmup"]:
            rates.append(batch.response_mask.sum().item() / (time.time() - t0))
    return {"tokens_per_s": float(np.median(rates)), "tokens": float(batch.response_mask.sum().item())}


def work_logps(job):
    """Peak memory and time of the log-probs of the chosen tokens, with gradients, at Qwen2's vocabulary: one
    micro-batch of bf16 last hidden states [rows, tokens, hidden] and a bf16 LM head [151,936, hidden], through
    the head's product and the straightforward float32 log-softmax, through the product and
    rollout.selected_logps (the logits path), or by rollout.head_logps (fused: no logits; fused_hint: told the
    gradient, all ones here, as DAR tells it its weights). The hidden states and the head are made before the
    peak is read, so the extra is what the method adds; it includes the head's gradient [151,936, hidden]
    (weight_grad_mb), which every method makes."""
    torch.manual_seed(0)
    (rows, tokens), V, d = (job["rows"], job["tokens"]), 151936, job["hidden"]
    h = torch.empty(rows, tokens, d, dtype=torch.bfloat16).normal_().requires_grad_()  # in place: no float32 copy
    w = torch.empty(V, d, dtype=torch.bfloat16).normal_(std=d ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (rows, tokens))
    base = peak_memory_mb()
    t0 = time.time()
    if job["method"] == "straightforward":
        logits = torch.nn.functional.linear(h, w)
        logp = logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    elif job["method"] == "chunked":
        logp = rollout.selected_logps(torch.nn.functional.linear(h, w), targets)
    else:
        hint = torch.ones(rows * tokens) if job["method"] == "fused_hint" else None
        logp = rollout.head_logps(h.view(-1, d), w, None, targets.view(-1), grad_hint=hint)
    logp.sum().backward()
    return {"seconds": time.time() - t0, "extra_mb": peak_memory_mb() - base,
            "logits_mb": rows * tokens * V * 2 / 2 ** 20, "weight_grad_mb": w.numel() * 2 / 2 ** 20}


WORKERS = {"loop": work_loop, "floor": work_floor, "trl": work_trl, "rollout": work_rollout, "logps": work_logps}


def run_worker(job, threads, timeout=None):
    """Run one job in a fresh process (for at most `timeout` seconds); its RESULT line as a dict, or {"error": ...}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1")
    try:
        p = subprocess.run([job.pop("python", sys.executable), os.path.join(ROOT, "bench.py"), "--worker",
                            json.dumps(job)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def overlap_section(base, model, model_dir, threads):
    """[overlap]: DAR with --judge llm against `judge.py --serve --delay D` (D: judging, 16 requests in flight,
    about as long as scoring, from a first run without delay), --judge-overlap off and on. Returns the figures.
    On the small model: its scoring takes seconds, as a 72B annotator's judging does at the paper's scale; the
    toy's (0.15 s) is shorter than the stand-in's own HTTP round trips for 256 requests, so no delay evens them."""
    def served_run(delay, overlap):
        server = subprocess.Popen([sys.executable, os.path.join(ROOT, "judge.py"), "--serve", "--task", "toy",
                                   "--port", "0", "--delay", str(delay)], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            url = server.stdout.readline().split("http://")[1].split()[0]
            return run_worker(dict(base, kind="loop", model=model, model_dir=model_dir, algo="dar",
                                   logp_source="policy", flags=["--judge", "llm", "--judge-url", "http://" + url,
                                                                "--judge-overlap", overlap]), threads)
        finally:
            server.terminate()
            server.wait(10)

    first = served_run(0.0, "off")
    if "error" in first:
        print(f"\n[overlap] error: {first['error']}")
        return first
    rounds = -(-SETTINGS[model]["online_batch"] // Config().judge_concurrency)  # requests one after another
    delay = max(0.0, first["logp_t"] + first["logp_0"] - first["judge"]) / rounds
    out = {"delay": delay, **{mode: served_run(delay, mode) for mode in ("off", "on")}}
    print(f"\n[overlap] DAR on the {model} model, --judge llm against judge.py --serve --delay {delay:.4f} "
          f"({rounds} rounds of {Config().judge_concurrency} requests), seconds per online batch")
    print(f"{'--judge-overlap':16} {'batch':>7} {'judging':>8} {'scoring':>8} {'waited':>7} {'hidden':>6} "
          f"{'target':>7} {'batch/target':>12}")
    off = out["off"]
    for mode in ("off", "on"):
        r = out[mode]
        if "error" in r:
            print(f"{mode:16} error: {r['error']}")
            continue
        scoring = r["logp_t"] + r["logp_0"]
        rest = off["seconds"] - off["judge_wait"] - off["logp_t"] - off["logp_0"]  # what overlap cannot touch
        r["target"] = rest + max(r["judge"], scoring)
        print(f"{mode:16} {r['seconds']:7.3f} {r['judge']:8.3f} {scoring:8.3f} {r['judge_wait']:7.3f} "
              f"{r['judge'] - r['judge_wait']:6.3f} {r['target']:7.3f} {r['seconds'] / r['target']:12.2f}")
    if "error" not in off and "error" not in out["on"]:  # hidden: the judge's seconds the step did not wait for
        out["saved"] = off["seconds"] - out["on"]["seconds"]
        print(f"seconds saved per online batch: {out['saved']:.3f} ({out['saved'] / off['seconds']:.0%})")
    return out


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------
def fmt(x, spec=".3f"):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def arg_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", default="breakdown,floor,algos,table8,trl,rollout,logps",
                   help="the sections to run, comma-separated (the module docstring says what each measures)")
    p.add_argument("--batches", type=int, default=10, help="measured online batches (median over them)")
    p.add_argument("--warmup", type=int, default=3, help="online batches run first and not measured")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every worker")
    p.add_argument("--cache-dir", default="~/.cache/dar", help="where the toy pi_0 and the small model are kept")
    p.add_argument("--trl-python", default=sys.executable,
                   help="interpreter for the TRL section: one that can import trl (this one by default)")
    p.add_argument("--logps-hidden", type=int, default=3584,
                   help="hidden size of the logps section's LM head (3,584: Qwen2-7B's; 1 GB of bf16 weight)")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--gpu-check", action="store_true",
                   help="check the GPU-only paths instead, on one CUDA GPU (gpucheck.py, with --json and --cache-dir)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = arg_parser().parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
        print(RESULT + json.dumps(WORKERS[job["kind"]](job)), flush=True)
        return
    if args.gpu_check:  # gpucheck.py as its own program (it imports this file, this file never imports it)
        sys.exit(subprocess.call([sys.executable, os.path.join(ROOT, "gpucheck.py"), "--cache-dir", args.cache_dir,
                                  *(["--json", args.json] if args.json else [])]))
    sections = set(args.sections.split(","))
    dirs = model_dirs(args.cache_dir)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dtype = str(model_dtype(Config(), torch.device("cuda" if gpu else "cpu"))).replace("torch.", "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit, "device": gpu or platform.processor()
              or "cpu", "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "dtype": dtype,
              "batches": args.batches, "warmup": args.warmup, "settings": SETTINGS}
    print(f"bench.py  {report['date']}  commit {commit}  {report['device']}  {os.cpu_count()} CPUs, "
          f"{args.threads} threads  torch {torch.__version__}  {dtype}  median of {args.batches} online batches "
          f"after {args.warmup}")
    for m, s in SETTINGS.items():
        print(f"  {m}: {s['online_batch'] // s['k']} prompts x K {s['k']} = {s['online_batch']} responses of <= "
              f"{s['max_new_tokens']} tokens, {s['online_batch'] // s['minibatch']} updates of {s['minibatch']}")
    base = dict(warmup=args.warmup, batches=args.batches)
    loops = {}

    def loop(model, algo, logp_source="policy", paper=False):
        key = (model, algo, logp_source) + (("paper",) if paper else ())
        if key not in loops:
            loops[key] = run_worker(dict(base, kind="loop", model=model, model_dir=dirs[model], algo=algo,
                                         logp_source=logp_source, paper=paper), args.threads)
        return loops[key]

    if sections & {"breakdown", "floor"}:
        print("\n[breakdown] seconds per DAR online batch, by phase")
        print(f"{'model':8} {'total':>8}" + "".join(f" {ph:>11}" for ph in PHASES) + f" {'tokens':>8}")
        for model in SETTINGS:
            r = loop(model, "dar")
            report.setdefault("breakdown", {})[model] = r
            if "error" in r:
                print(f"{model:8} error: {r['error']}")
                continue
            print(f"{model:8} {r['seconds']:8.3f}" + "".join(f" {fmt(r.get(ph)):>11}" for ph in PHASES)
                  + f" {r['tokens']:8.0f}")
    if "floor" in sections:
        print("\n[floor] the same sampling + one pi_0 forward + one forward/backward per update; efficiency = "
              "floor / DAR")
        print(f"{'model':8} {'DAR s':>8} {'floor s':>8} {'sample':>8} {'pi_0':>8} {'update':>8} {'efficiency':>10} "
              f"{'tokens':>8}")
        floors = {}
        for model in SETTINGS:
            r = loops[(model, "dar", "policy")]
            f = floors[model] = run_worker(dict(base, kind="floor", model=model, model_dir=dirs[model]), args.threads)
            if "error" in r or "error" in f:
                print(f"{model:8} error: {r.get('error') or f.get('error')}")
                continue
            report.setdefault("floor", {})[model] = dict(f, efficiency=f["seconds"] / r["seconds"])
            print(f"{model:8} {r['seconds']:8.3f} {f['seconds']:8.3f} {f['sample']:8.3f} {f['logp_0']:8.3f} "
                  f"{f['update']:8.3f} {f['seconds'] / r['seconds']:10.2f} {f['tokens']:8.0f}")
        r = loop("small", "dar", logp_source="sampler")  # DAR without the pi_t pass
        if "error" not in r and "error" not in floors["small"]:
            f = floors["small"]
            report.setdefault("floor", {})["small, --logp-source sampler"] = dict(dar_seconds=r["seconds"],
                                                                   efficiency=f["seconds"] / r["seconds"])
            print(f"{'small*':8} {r['seconds']:8.3f} {f['seconds']:8.3f} {'':8} {'':8} {'':8} "
                  f"{f['seconds'] / r['seconds']:10.2f}   * DAR with --logp-source sampler: no pi_t pass")
    if "algos" in sections:
        print("\n[algos] small model, identical settings (one epoch): seconds per online batch, peak memory")
        print(f"{'algo':8} {'s/batch':>8} {'vs DAR':>7} {'memory MB':>10} {'vs DAR':>7} {'tokens':>8}")
        for algo in ("dar", "grpo", "rloo", "ppo"):
            r = loop("small", algo)
            report.setdefault("algos", {})[algo] = r
            if "error" in r:
                print(f"{algo:8} error: {r['error']}")
                continue
            d = loops[("small", "dar", "policy")]
            print(f"{algo:8} {r['seconds']:8.3f} {r['seconds'] / d['seconds']:7.2f} {r['memory_mb']:10.0f} "
                  f"{r['memory_mb'] / d['memory_mb']:7.2f} {r['tokens']:8.0f}")
    if "table8" in sections:
        print("\n[table8] small model, each algorithm at its paper settings (config.ALGO_DEFAULTS; PPO: 4 epochs and "
              "a value model), as the paper's Table 8 compares them")
        print(f"{'algo':8} {'s/batch':>8} {'vs DAR':>7} {'memory MB':>10} {'vs DAR':>7} {'tokens':>8}")
        for algo in ("dar", "grpo", "rloo", "ppo"):
            r = loop("small", algo, paper=True)
            report.setdefault("table8", {})[algo] = r
            d = loops[("small", "dar", "policy", "paper")]
            if "error" in r or "error" in d:
                print(f"{algo:8} error: {r.get('error') or d.get('error')}")
                continue
            print(f"{algo:8} {r['seconds']:8.3f} {r['seconds'] / d['seconds']:7.2f} {r['memory_mb']:10.0f} "
                  f"{r['memory_mb'] / d['memory_mb']:7.2f} {r['tokens']:8.0f}")
    if "trl" in sections:
        print("\n[trl] GRPO per online batch, small model: this project vs TRL's GRPOTrainer")
        r = run_worker(dict(base, kind="trl", model="small", model_dir=dirs["small"], dtype=dtype,
                            python=args.trl_python), args.threads)
        report["trl"] = r
        if "error" in r:
            print(f"TRL not measured: {r['error']}")
        else:
            print(f"{'':24} {'s/batch':>8} {'tokens':>8} {'memory MB':>10} {'ours/TRL':>8}")
            print(f"{'TRL GRPOTrainer':24} {r['seconds']:8.3f} {r['tokens']:8.0f} {r['memory_mb']:10.0f} {'':8}   "
                  f"(trl {r['trl_version']})")
            ours_settings = dict(OURS_FOR_TRL, bf16=dtype == "bfloat16")
            print("  settings, TRL | ours: " + ", ".join(f"{k} {r['settings'].get(k)} | {ours_settings[k]}"
                                                        for k in TRL_SETTINGS))
            for source in ("policy", "sampler"):
                ours = loop("small", "grpo", logp_source=source)
                if "error" in ours:
                    print(f"ours, --logp-source {source}: error: {ours['error']}")
                    continue
                report["trl"][f"ratio_{source}"] = ours["seconds"] / r["seconds"]
                print(f"{'ours, pi_t from ' + source:24} {ours['seconds']:8.3f} {ours['tokens']:8.0f} "
                      f"{ours['memory_mb']:10.0f} {ours['seconds'] / r['seconds']:8.2f}")
    if "rollout" in sections:
        print("\n[rollout] sampling the small model's online batch: tokens per second")
        for backend in ("hf", "vllm"):
            r = run_worker(dict(base, kind="rollout", model="small", model_dir=dirs["small"], backend=backend),
                           args.threads)
            report.setdefault("rollout", {})[backend] = r
            print(f"{backend:8} " + (f"error: {r['error']}" if "error" in r else
                                     f"{r['tokens_per_s']:10.0f} tokens/s  ({r['tokens']:.0f} tokens a batch)"))
    if "logps" in sections:
        print(f"\n[logps] log-probs of the chosen tokens with gradients, bf16, from hidden states [2, 1024, "
              f"{args.logps_hidden}] and an LM head at Qwen2's 151,936-word vocabulary (extra: peak beyond them)")
        print(f"{'method':16} {'tokens':>7} {'logits MB':>10} {'extra peak MB':>14} {'less head grad':>15} "
              f"{'seconds':>8}")
        for method in ("straightforward", "chunked", "fused", "fused_hint"):
            r = run_worker(dict(kind="logps", method=method, rows=2, tokens=1024, hidden=args.logps_hidden),
                           args.threads)
            report.setdefault("logps", {})[method] = r
            print(f"{method:16} " + (f"error: {r['error']}" if "error" in r else
                                     f"{2 * 1024:7d} {0 if method.startswith('fused') else r['logits_mb']:10.0f} "
                                     f"{r['extra_mb']:14.0f} {r['extra_mb'] - r['weight_grad_mb']:15.0f} "
                                     f"{r['seconds']:8.2f}"))
    if "overlap" in sections:
        report["overlap"] = overlap_section(base, "small", dirs["small"], args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
