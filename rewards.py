"""Reward functions in Python (--reward FILE.py:NAME or module:NAME, repeatable; --reward-weights W1,W2,...).

The reward of a response is the weighted sum of its components: the --judge (unless --judge none) and each
reward function, in that order, each weight 1 unless --reward-weights says otherwise. A function is called
as TRL's GRPOTrainer (1.16) calls one, with the same keywords, so a user's TRL reward function runs here unchanged:

    def my_reward(prompts, completions, **kwargs) -> list[float | None]   # or `async def`

Each keyword is a list parallel to `completions` unless said otherwise:
    prompts          as the task gives them (a str, or a list of chat turns), one per response
    completions      the response texts (for a chat prompt, [{"role": "assistant", "content": text}], as TRL's)
    completion_ids   each response's sampled token ids, EOS included when it ended, no padding
                     (completion_ids(); a text that was not sampled, such as a reference, is tokenized)
    trainer_state    one TrainerState: global_step, max_steps and epoch as this loop counts them (its docstring)
    log_metric       log_metric(name, value): a scalar, averaged over the online batch's calls and all ranks,
                     logged under `name` in metrics.jsonl and the trackers (names of this project's metrics refused)
    log_extra        log_extra(column, values): one value per completion, an extra column of the --sample-every
                     table (console, trackers, and the "samples" key of that batch's metrics.jsonl row)
    ended            (not TRL's) the response finished with EOS
    and every other column of the data set for that response's prompt (tasks.Task.columns).
TRL's `environments` (its tool environments) has no counterpart here and is not passed. In evaluation
(--eval-judge reward) the functions get the same keywords; what they log there is dropped (the evaluation
reports its own eval/* figures). None (or NaN) for a response is an invalid judgment: that response's reward is
NaN, counted and left out like a judge's invalid one. Unlike TRL, which sums the other functions over a None,
one missing component makes the whole reward unknown.

FILE.py is imported with its folder first on sys.path, so it can import a module beside it (as `python FILE.py`
could); afterwards the folder stays at the end of sys.path, where a module imported lazily inside the function is
still found but none of the user's files shadows one of this project's.

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
from dataclasses import dataclass

import tasks
from judge import Judgment, prefer_by_score

NO_JUDGE = "none"  # --judge none: the reward comes from the --reward functions alone
TRAINING_REWARD = "reward"  # --eval-judge reward: evaluate with the training reward itself (judge and functions)
_LOADED = {}       # spec -> function: a file or module is imported once per process
_FILES = {}        # FILE.py's absolute path -> its module
# log_metric names that are this project's own metrics (docs/reference.md lists them), refused to a function
OWN_METRICS = ("step", "samples")
OWN_PREFIXES = ("train/", "reward/", "eval/", "perf/", "rollout/", "weights/", "pairs/")
TABLE_COLUMNS = ("prompt", "response", "reward")  # the --sample-every table's own columns, refused to log_extra


class RewardFunctionError(Exception):
    """A reward function raised, or returned something that is not one number (or None) per response, or
    misused log_metric / log_extra."""


@dataclass
class TrainerState:
    """The `trainer_state` a reward function gets: the fields of transformers' TrainerState that have a meaning
    in this loop (TRL passes the Trainer's own; the others, such as log_history or best_metric, are absent).

    global_step  optimizer steps taken before the judged responses were sampled (the LR schedule's count: a step
                 skipped for a non-finite gradient is not one); in evaluation, those that made the evaluated
                 policy (eval.py, evaluating a saved model, counts every batch's steps: config.trainer_state)
    max_steps    optimizer steps the whole run plans: --steps online batches x the steps each takes
                 (config.updates_per_batch)
    epoch        passes over the training prompts before those responses: online batches done x prompts per
                 batch / training prompts, a float as transformers' is
    """
    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


def completion_ids(batch):
    """TRL's completion_ids of a rollout.Rollout: each response's sampled token ids, up to and including EOS when
    it ended, without padding."""
    ids, mask = batch.input_ids[:, batch.prompt_len:].cpu(), batch.response_mask.cpu().bool()
    return [row[m].tolist() for row, m in zip(ids, mask)]


def judge_rollout(judge, batch, trainer_state=None):
    """judge(prompts, responses, ended) on a rollout.Rollout; --reward functions (a CombinedReward) also get its
    sampled token ids and `trainer_state` (None: the one the CombinedReward was built with)."""
    args = list(batch.prompts), list(batch.responses), batch.ended.tolist()
    if isinstance(judge, CombinedReward):
        return judge(*args, completion_ids=completion_ids(batch), trainer_state=trainer_state)
    return judge(*args)


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
            module = import_file(os.path.abspath(where))
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


def import_file(path):
    """FILE.py as a module, imported once however many of its functions are named. Its folder is first on sys.path
    while it runs, as for `python FILE.py`, so it imports a module beside it; then the folder moves to the end,
    where a module imported lazily inside a function is still found and no file of the user's shadows one of this
    project's (a folder already on sys.path stays where it is)."""
    if path in _FILES:
        return _FILES[path]
    module_name = "dar_reward_" + os.path.splitext(os.path.basename(path))[0]
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module  # what dataclasses and pickle look a module's classes up in
    folder = os.path.dirname(path)
    moved = folder not in sys.path
    if moved:
        sys.path.insert(0, folder)
    try:
        loader.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    finally:
        if moved:
            sys.path.remove(folder)
            sys.path.append(folder)
    _FILES[path] = module
    return module


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


def with_functions(cfg, task, judge, tok=None, trainer_state=None):
    """`judge` (None for --judge none) combined with the --reward functions; the judge itself when there are none.
    tok: the policy's tokenizer, for the completion_ids of texts that were not sampled; trainer_state: the one
    the functions get when a call gives none (evaluation's)."""
    if not specs(cfg):
        return judge
    return CombinedReward(judge, [(s, load_function(s)) for s in specs(cfg)], component_names(cfg), weights(cfg),
                          getattr(task, "columns", {}), tok, trainer_state)


def describe_reward(cfg, judge_name):
    """The reward as fault messages name it: the judge's name, and the functions'."""
    if not specs(cfg):
        return judge_name
    functions = "reward functions " + ", ".join(specs(cfg))
    return functions if cfg.judge == NO_JUDGE else f"{judge_name} and {functions}"


class CombinedReward:
    """A judge (judge.py's interface) whose reward is the weighted sum of a judge's and reward functions' values.
    After each call, `components` holds every component's values ({name: [N] floats, NaN = invalid}), `logged`
    what the functions gave log_metric ({name: [sum, count]}) and `extra` what they gave log_extra ({column: [N]
    values}): the loop reads them for that online batch's metrics (loop.reward_components, loop.online_metrics)."""

    def __init__(self, judge, functions, names, weights, columns=None, tok=None, trainer_state=None):
        self.judge, self.functions, self.names, self.weights = judge, functions, names, weights
        self.columns, self.tok = columns or {}, tok
        self.trainer_state = trainer_state or TrainerState()
        self.components, self.logged, self.extra = {}, {}, {}

    def __call__(self, prompts, responses, ended, completion_ids=None, trainer_state=None):
        """completion_ids: the responses' sampled token ids (judge_rollout); None tokenizes the texts.
        trainer_state: None = the one this reward was built with."""
        values, reasons = [], {}
        self.logged, self.extra = {}, {}
        if self.judge is not None:
            judged = self.judge(prompts, responses, ended)
            values.append([float(x) for x in judged.rewards])
            reasons.update(judged.reasons)
        outs = self.call_functions(prompts, responses, ended, completion_ids, trainer_state)
        for (spec, _), out in zip(self.functions, outs):
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

    def token_ids(self, responses, ended):
        """completion_ids of texts that were not sampled (a data set's reference, prefer's pairs): the tokenizer's
        ids, then EOS when the text ended; None without a tokenizer (a CombinedReward built without one)."""
        if self.tok is None:
            return [None] * len(responses)
        return [self.tok(r, add_special_tokens=False).input_ids + ([self.tok.eos_token_id] if e else [])
                for r, e in zip(responses, ended)]

    def kwargs(self, prompts, responses, ended, completion_ids=None, trainer_state=None):
        """TRL's keyword arguments for a batch, but log_metric and log_extra (per function: call_functions):
        prompts, completions, completion_ids (None: token_ids), trainer_state (None: this reward's), ended and the
        data set's other columns."""
        rows = [self.columns.get(tasks.prompt_key(p), {}) for p in prompts]
        names = dict.fromkeys(k for row in rows for k in row)
        chat = [not isinstance(p, str) for p in prompts]
        completions = [[{"role": "assistant", "content": r}] if c else r for r, c in zip(responses, chat)]
        return {**{k: [row.get(k) for row in rows] for k in names},
                "prompts": list(prompts), "completions": completions,
                "completion_ids": list(completion_ids or self.token_ids(responses, ended)),
                "trainer_state": trainer_state or self.trainer_state, "ended": list(ended)}

    def call_functions(self, prompts, responses, ended, completion_ids=None, trainer_state=None):
        """Every function's values [N] (NaN for None), async ones concurrently; RewardFunctionError if one raises."""
        kw = self.kwargs(prompts, responses, ended, completion_ids, trainer_state)
        kws = [{**kw, "log_metric": self.metric_logger(spec), "log_extra": self.extra_logger(spec, len(responses))}
               for spec, _ in self.functions]
        results = [None] * len(self.functions)
        coros = [i for i, (_, fn) in enumerate(self.functions) if inspect.iscoroutinefunction(fn)]
        if coros:
            async def together():
                return await asyncio.gather(*(self.functions[i][1](**kws[i]) for i in coros), return_exceptions=True)
            for i, out in zip(coros, asyncio.run(together())):
                results[i] = out
        for i, (_, fn) in enumerate(self.functions):
            if i not in coros:
                try:
                    results[i] = fn(**kws[i])
                except Exception as e:  # the user's code: any exception stops the run, named (failure below)
                    results[i] = e
        return [self.checked(s, fn, out, prompts, responses, ended, kw)
                for (s, fn), out in zip(self.functions, results)]

    def metric_logger(self, spec):
        """TRL's log_metric(name, value) for function `spec`: the value joins this call's {name: [sum, count]}."""
        def log_metric(name, value):
            if not isinstance(name, str) or name in OWN_METRICS or name.startswith(OWN_PREFIXES):
                raise RewardFunctionError(
                    f"reward function {spec} called log_metric({name!r}, ...): {name!r} is not free for it: "
                    f"{', '.join(OWN_METRICS)} and names under {', '.join(OWN_PREFIXES)} are this project's metrics "
                    f"(docs/reference.md); give log_metric another name")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RewardFunctionError(f"reward function {spec} called log_metric({name!r}, {value!r}): the "
                                          f"value must be one number") from None
            total = self.logged.setdefault(name, [0.0, 0])
            total[0] += value
            total[1] += 1
        return log_metric

    def extra_logger(self, spec, n):
        """TRL's log_extra(column, values) for function `spec`: one value per completion of the call, an extra
        column of the --sample-every table (a number, string, bool or None; anything else as its str)."""
        def log_extra(column, values):
            if not isinstance(column, str) or column in TABLE_COLUMNS:
                raise RewardFunctionError(f"reward function {spec} called log_extra({column!r}, ...): the sample "
                                          f"table has columns {', '.join(TABLE_COLUMNS)} of its own; give a column "
                                          f"name (a str) that is none of them")
            values = values.tolist() if hasattr(values, "tolist") else list(values)
            if len(values) != n:
                raise RewardFunctionError(f"reward function {spec} called log_extra({column!r}, ...) with "
                                          f"{len(values)} values for {n} completions; give one per completion")
            self.extra[column] = [table_cell(v) for v in values]
        return log_extra

    def checked(self, spec, fn, out, prompts, responses, ended, kw):
        """A function's result as [N] floats, NaN for None; RewardFunctionError naming it if it raised, misused
        log_metric / log_extra, or returned something else. kw: the keywords it was called with."""
        if isinstance(out, RewardFunctionError):  # log_metric / log_extra refused what it was given
            raise out
        if isinstance(out, Exception):
            raise RewardFunctionError(self.failure(spec, fn, out, prompts, responses, kw))
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

    def failure(self, spec, fn, error, prompts, responses, kw):
        """The message for a function that raised on the batch: its exception and the first sample that raises
        when the function is called on it alone (index in this rank's share of the online batch), with the
        batch's keywords cut to that sample (what it logs then is dropped)."""
        for i in range(len(responses)):
            alone = {k: v[i:i + 1] if isinstance(v, list) else v for k, v in kw.items()}
            try:
                out = fn(**alone, log_metric=lambda name, value: None, log_extra=lambda column, values: None)
                if inspect.isawaitable(out):
                    asyncio.run(out)
            except Exception as e:  # the user's code, called again on one sample to find which one fails
                prompt = prompts[i] if isinstance(prompts[i], str) else prompts[i][-1]["content"]
                return (f"reward function {spec} raised {type(e).__name__}: {e} on sample {i} of this rank's online "
                        f"batch (prompt {prompt[-80:]!r}, response {responses[i][:80]!r})")
        return (f"reward function {spec} raised {type(error).__name__}: {error} on the batch, though on no sample "
                f"alone")


def table_cell(v):
    """A log_extra value as a JSON line and the trackers' tables hold it: a number, str, bool or None as it is
    (a numpy or torch scalar as its Python number), anything else as its str."""
    v = v.tolist() if hasattr(v, "tolist") else v
    return v if v is None or isinstance(v, (str, bool, int, float)) else str(v)
