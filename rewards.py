"""Reward functions in Python (--reward FILE.py:NAME or module:NAME, repeatable; --reward-weights W1,W2,...).

The reward of a response is the weighted sum of its components: the --judge (unless --judge none) and each
reward function, in that order, each weight 1 unless --reward-weights says otherwise. A function is called
as TRL's GRPOTrainer calls one, so a user's TRL reward function runs here unchanged:

    def my_reward(prompts, completions, **kwargs) -> list[float | None]   # or `async def`

`prompts` as the task gives them (a str, or a list of chat turns), one per response; `completions` the
response texts (for a chat prompt, [{"role": "assistant", "content": text}], as TRL gives them); the keyword
arguments: `ended` (the response finished with EOS) and every other column of the data set for that
response's prompt (tasks.Task.columns), each a list parallel to `completions`. None (or NaN) for a response is
an invalid judgment: that response's reward is NaN, counted and left out like a judge's invalid one. Unlike
TRL, which sums the other functions over a None, one missing component makes the whole reward unknown.

async functions run concurrently with each other (one event loop per batch), the sync ones in order. A function
that raises stops the run (RewardFunctionError -> loop.JudgeFailure: a checkpoint of the batches before) with
its name, the exception and the first sample that raises when called alone.
"""
import asyncio
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys

import tasks
from judge import Judgment, prefer_by_score

NO_JUDGE = "none"  # --judge none: the reward comes from the --reward functions alone
TRAINING_REWARD = "reward"  # --eval-judge reward: evaluate with the training reward itself (judge and functions)
_LOADED = {}       # spec -> function: a file or module is imported once per process
_FILES = {}        # FILE.py's absolute path -> its module


class RewardFunctionError(Exception):
    """A reward function raised, or returned something that is not one number (or None) per response."""


def specs(cfg):
    """The --reward specs of a config (stored comma-joined: config.Config.reward)."""
    return [s for s in cfg.reward.split(",") if s]


def load_function(spec):
    """The callable named by FILE.py:NAME (imported from that file) or module:NAME (imported with the working
    directory on sys.path, as `python -m` does). A bad spec stops with a message naming it."""
    if spec in _LOADED:
        return _LOADED[spec]
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise SystemExit(f"error: --reward {spec!r}: give FILE.py:NAME or module:NAME (a function's name after the "
                         f"colon)")
    try:
        if where.endswith(".py") or os.sep in where:
            if not os.path.isfile(where):
                raise SystemExit(f"error: --reward {spec!r}: no such file {where!r}")
            path = os.path.abspath(where)
            if path not in _FILES:  # one module per file, however many of its functions are named
                module_name = "dar_reward_" + os.path.splitext(os.path.basename(where))[0]
                loader = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[module_name] = module  # what dataclasses and pickle look a module's classes up in
                try:
                    loader.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
                _FILES[path] = module
            module = _FILES[path]
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except SystemExit:
        raise
    except Exception as e:  # whatever the user's module raises on import: name it, stop before any model loads
        raise SystemExit(f"error: --reward {spec!r}: importing {where} raised {type(e).__name__}: {e}")
    fn = getattr(module, name, None)
    if fn is None:
        defined = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise SystemExit(f"error: --reward {spec!r}: {where} defines no {name!r} (its callables: "
                         f"{', '.join(defined) or 'none'})")
    if not callable(fn):
        raise SystemExit(f"error: --reward {spec!r}: {where}.{name} is a {type(fn).__name__}, not a function")
    _LOADED[spec] = fn
    return fn


def component_names(cfg):
    """Names of the reward's components in --reward-weights order: "judge" (unless --judge none), then each
    function's NAME (NAME_2, NAME_3, ... when names repeat). Each is logged as reward/<name>."""
    names = ([] if cfg.judge == NO_JUDGE else ["judge"]) + [s.rpartition(":")[2] for s in specs(cfg)]
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def weights(cfg):
    """The components' weights from --reward-weights (default 1 each); a bad list stops naming both flags."""
    n = len(component_names(cfg))
    if not cfg.reward_weights:
        return [1.0] * n
    try:
        w = [float(x) for x in cfg.reward_weights.split(",")]
    except ValueError:
        raise SystemExit(f"error: --reward-weights {cfg.reward_weights!r}: give numbers separated by commas")
    if len(w) != n or not all(map(math.isfinite, w)):
        what = ("" if cfg.judge == NO_JUDGE else f"--judge {cfg.judge} and ") + f"{len(specs(cfg))} --reward"
        raise SystemExit(f"error: --reward-weights gives {len(w)} weights; {what} make {n} components (the judge's "
                         f"weight first, then one per --reward in order), each a finite number")
    return w


def check(cfg):
    """config.check_config's part: load every function now, so a bad --reward fails before any model loads."""
    if cfg.judge == NO_JUDGE and not specs(cfg):
        raise SystemExit("error: --judge none leaves only --reward functions to score responses; give at least one "
                         "--reward FILE.py:NAME, or a judge")
    for s in specs(cfg):
        load_function(s)
    weights(cfg)


def with_functions(cfg, task, judge):
    """`judge` (None for --judge none) combined with the --reward functions; the judge itself when there are none."""
    if not specs(cfg):
        return judge
    return CombinedReward(judge, [(s, load_function(s)) for s in specs(cfg)], component_names(cfg), weights(cfg),
                          getattr(task, "columns", {}))


def describe_reward(cfg, judge_name):
    """The reward as fault messages name it: the judge's name, and the functions'."""
    if not specs(cfg):
        return judge_name
    functions = "reward functions " + ", ".join(specs(cfg))
    return functions if cfg.judge == NO_JUDGE else f"{judge_name} and {functions}"


class CombinedReward:
    """A judge (judge.py's interface) whose reward is the weighted sum of a judge's and reward functions' values.
    After each call, `components` holds every component's values ({name: [N] floats, NaN = invalid})."""

    def __init__(self, judge, functions, names, weights, columns=None):
        self.judge, self.functions, self.names, self.weights = judge, functions, names, weights
        self.columns = columns or {}
        self.components = {}

    def __call__(self, prompts, responses, ended):
        values, reasons = [], {}
        if self.judge is not None:
            judged = self.judge(prompts, responses, ended)
            values.append([float(x) for x in judged.rewards])
            reasons.update(judged.reasons)
        for (spec, _), out in zip(self.functions, self.call_functions(prompts, responses, ended)):
            values.append(out)
            if any(math.isnan(x) for x in out):
                reasons[f"{spec} returned None"] = sum(math.isnan(x) for x in out)
        self.components = dict(zip(self.names, values))
        rewards = [sum(w * v for w, v in zip(self.weights, col)) for col in zip(*values)]  # NaN if any is
        return Judgment(rewards, sum(math.isnan(r) for r in rewards), reasons)

    def prefer(self, prompts, responses_a, responses_b):
        """Compare the two responses' combined rewards (both taken as ended, as RuleJudge.prefer does)."""
        ra = self(prompts, responses_a, [True] * len(prompts)).rewards
        rb = self(prompts, responses_b, [True] * len(prompts)).rewards
        return [prefer_by_score(a, b) for a, b in zip(ra, rb)]

    def kwargs(self, prompts, responses, ended):
        """TRL's keyword arguments for a batch: prompts, completions, ended and the data set's other columns."""
        rows = [self.columns.get(tasks.prompt_key(p), {}) for p in prompts]
        names = dict.fromkeys(k for row in rows for k in row)
        chat = [not isinstance(p, str) for p in prompts]
        completions = [[{"role": "assistant", "content": r}] if c else r for r, c in zip(responses, chat)]
        return {**{k: [row.get(k) for row in rows] for k in names},
                "prompts": list(prompts), "completions": completions, "ended": list(ended)}

    def call_functions(self, prompts, responses, ended):
        """Every function's values [N] (NaN for None), async ones concurrently; RewardFunctionError if one raises."""
        kw = self.kwargs(prompts, responses, ended)
        results = [None] * len(self.functions)
        coros = [i for i, (_, fn) in enumerate(self.functions) if inspect.iscoroutinefunction(fn)]
        if coros:
            async def together():
                return await asyncio.gather(*(self.functions[i][1](**kw) for i in coros), return_exceptions=True)
            for i, out in zip(coros, asyncio.run(together())):
                results[i] = out
        for i, (_, fn) in enumerate(self.functions):
            if i not in coros:
                try:
                    results[i] = fn(**kw)
                except Exception as e:  # the user's code: any exception stops the run, named (failure below)
                    results[i] = e
        return [self.checked(s, fn, out, prompts, responses, ended) for (s, fn), out in zip(self.functions, results)]

    def checked(self, spec, fn, out, prompts, responses, ended):
        """A function's result as [N] floats, NaN for None; RewardFunctionError naming it if it raised or
        returned something else."""
        if isinstance(out, Exception):
            raise RewardFunctionError(self.failure(spec, fn, out, prompts, responses, ended))
        out = out.tolist() if hasattr(out, "tolist") else out  # a numpy array or a tensor
        if not isinstance(out, (list, tuple)) or len(out) != len(responses):
            got = f"{len(out)} values" if isinstance(out, (list, tuple)) else f"a {type(out).__name__}"
            raise RewardFunctionError(f"reward function {spec} returned {got} for {len(responses)} responses; it must "
                                      f"return a list with one float (or None) per completion")
        bad = [i for i, x in enumerate(out) if x is not None and not isinstance(x, numbers.Real)]
        if bad:
            x = out[bad[0]]
            raise RewardFunctionError(f"reward function {spec} returned {x!r} (a {type(x).__name__})"
                                      f" for sample {bad[0]}; it must return a float or None per completion")
        return [math.nan if x is None else float(x) for x in out]

    def failure(self, spec, fn, error, prompts, responses, ended):
        """The message for a function that raised on the batch: its exception and the first sample that raises
        when the function is called on it alone (index in this rank's share of the online batch)."""
        for i in range(len(responses)):
            kw = self.kwargs(prompts[i:i + 1], responses[i:i + 1], ended[i:i + 1])
            try:
                out = fn(**kw)
                if inspect.isawaitable(out):
                    asyncio.run(out)
            except Exception as e:  # the user's code, called again on one sample to find which one fails
                prompt = prompts[i] if isinstance(prompts[i], str) else prompts[i][-1]["content"]
                return (f"reward function {spec} raised {type(e).__name__}: {e} on sample {i} of this rank's online "
                        f"batch (prompt {prompt[-80:]!r}, response {responses[i][:80]!r})")
        return (f"reward function {spec} raised {type(error).__name__}: {error} on the batch, though on no sample "
                f"alone")
