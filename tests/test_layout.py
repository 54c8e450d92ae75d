"""The layout a reader relies on: files in layers with no import cycles, scripts as leaves, dar.py short and in
the order of the paper, and a `--help` that works and lists every flag with its default."""
import argparse
import ast
import dataclasses
import os
import re
import subprocess
import sys

import pytest

import config
from conftest import ROOT

MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
SCRIPTS = ("dar", "eval", "bench", "judge", "gpucheck")  # run as programs; dar.py is the one nothing may import
# Third-party packages that a run may do without, imported where they are needed (with a comment that says so)
# (torch.utils.tensorboard: torch's writer of TensorBoard files, importable only with the tensorboard package)
OPTIONAL = {"vllm", "matplotlib", "trl", "datasets", "pyarrow", "flash_attn", "gguf", "accelerate", "vaderSentiment",
            "textblob", "wandb", "tensorboard", "torch.utils.tensorboard"}


def imports(module):
    """(names of the top-level modules it imports, [(line, imported module, comment)] of imports inside functions:
    the module's whole dotted name)."""
    path = os.path.join(ROOT, module + ".py")
    source = open(path).read()
    lines = source.split("\n")
    tree = ast.parse(source)
    in_functions = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(f)}
    local, inner = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            dotted = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            dotted = [node.module]
        else:
            continue
        local.update(n.split(".")[0] for n in dotted if n.split(".")[0] in MODULES and n.split(".")[0] != module)
        if id(node) in in_functions:
            comment = lines[node.lineno - 1].partition("#")[2]
            inner += [(node.lineno, n, comment) for n in dotted]
    return local, inner


IMPORTS = {m: imports(m) for m in MODULES}  # each file parsed once
GRAPH = {m: local for m, (local, _) in IMPORTS.items()}


def cycles(graph):
    """Every import cycle, as a list of modules, found by depth-first search."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_nothing_imports_the_script():
    assert [m for m in MODULES if "dar" in GRAPH[m]] == []


def test_the_layers_are_the_documented_order():
    """rollout < data < tasks < prompts < judge < rewards < config < infra < loop < baselines < dar; eval and bench sit
    beside dar and import only lower files (dar.py imports eval for its end-of-run report); gpucheck.py (the GPU check,
    `bench.py --gpu-check` runs it as a program) sits above bench and imports it."""
    layers = ["rollout", "data", "tasks", "prompts", "judge", "rewards", "config", "infra", "loop", "baselines", "dar"]
    for i, m in enumerate(layers):
        assert GRAPH[m] <= set(layers[:i]) | ({"eval"} if m == "dar" else set()), m
    for script in ("eval", "bench"):
        assert GRAPH[script] <= set(layers[:-2]), script
    assert GRAPH["gpucheck"] <= set(layers[:-2]) | {"bench"}


def test_imports_inside_functions_are_only_optional_packages_that_say_so():
    for m in MODULES:
        for line, module, comment in IMPORTS[m][1]:
            package = module if module in OPTIONAL else module.split(".")[0]  # a whole dotted name, or its package
            assert package in OPTIONAL, f"{m}.py:{line} imports {module} inside a function"
            assert "optional" in comment, f"{m}.py:{line}: the import of {package} needs a comment saying it is optional"


def test_dar_py_reads_as_algorithm_1():
    """At most about 350 lines; the loss's pieces, then the step, then main. (Other files are shaped by purpose,
    not by a line count: a cap squeezes code instead of splitting it where its purposes part.)"""
    assert len(open(os.path.join(ROOT, "dar.py")).read().splitlines()) <= 350
    tree = ast.parse(open(os.path.join(ROOT, "dar.py")).read())
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert functions == ["dar_weights", "weighted_sft_loss", "dar_loss", "dar_step", "main"]
    # DAR's own flags are the first a reader meets in `--help` and in the config
    assert [f.name for f in dataclasses.fields(config.Config)][:4] == ["alpha", "beta", "w_clip", "normalize_adv"]


def help_text(script):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script + ".py"), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return re.sub(r"\s+", "", p.stdout)  # argparse wraps lines anywhere a space (or a hyphen) is


def test_dar_help_lists_every_flag_with_its_default():
    """Every Config field as --name-with-dashes with "(default: VALUE)"; a literal % in a help string (the
    "about 5%" of --eval-fraction) would crash argparse's formatting if it were not doubled."""
    text = help_text("dar")
    for f in dataclasses.fields(config.Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert re.sub(r"\s+", "", f"(default: {f.default})") in text, (flag, f.default)
    assert "about5%)" in text


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "dar"])
def test_every_script_help_lists_every_flag_with_its_default(script):
    module = __import__(script)
    text = help_text(script)
    actions = [a for a in module.arg_parser()._actions if a.option_strings and a.help != argparse.SUPPRESS
               and not isinstance(a, argparse._HelpAction)]
    assert actions
    for a in actions:
        assert a.option_strings[-1] in text, (script, a.option_strings)
        assert re.sub(r"\s+", "", f"(default: {a.default})") in text, (script, a.option_strings, a.default)
