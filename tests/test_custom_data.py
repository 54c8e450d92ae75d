"""--task custom, your own prompts (data.py): every file format with a `prompt` or a `messages` column, the other
columns per prompt, references and preference pairs where they belong, the errors a bad record gives, and
--chat-template-kwargs reaching the chat template; then a short DAR run on a custom JSONL file."""
import gzip
import json
import math
import os
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import config
import data
import infra
import loop
import rollout
import tasks
from conftest import SFT_STEPS, TINY, read_metrics, train

N = 40  # distinct prompts: 2 held out for evaluation (5%), 2 of the rest for validation (5%)
SYSTEM = {"role": "system", "content": "Answer briefly."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def rows(style, n=N):
    """n records of one schema: `prompt` text with a `reference`, or `messages` ending with the assistant's
    reply; both with two extra columns."""
    out = []
    for i in range(n):
        extra = {"answer": f"{i}", "level": i % 3}
        if style == "prompt":
            out.append({"prompt": f"question {i}?", "reference": f"answer {i}.", **extra})
        else:
            out.append({"messages": [SYSTEM, user(f"question {i}?"), assistant(f"answer {i}.")], **extra})
    return out


def prompt_of(style, i):
    return f"question {i}?" if style == "prompt" else [SYSTEM, user(f"question {i}?")]


def write_jsonl(path, records, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    with (gzip.open(path, "wt", encoding="utf-8") if gz else open(path, "w", encoding="utf-8")) as f:
        f.write(text)
    return str(path)


def write(fmt, path, records):
    """records in the format fmt at path (a saved `datasets` directory for "datasets"); returns the path."""
    if fmt == "jsonl":
        return write_jsonl(f"{path}.jsonl", records)
    if fmt == "jsonl.gz":
        return write_jsonl(f"{path}.jsonl.gz", records, gz=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), f"{path}.parquet")
        return f"{path}.parquet"
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return str(path)


def error_of(path, task="custom"):
    with pytest.raises(SystemExit) as e:
        tasks.load_task(task, data=str(path))
    return str(e.value)


@pytest.mark.parametrize("style", ["prompt", "messages"])
@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "datasets"])
def test_every_format_loads_prompts_columns_and_references(tmp_path, fmt, style):
    t = tasks.load_task("custom", data=write(fmt, tmp_path / "mine", rows(style)))
    assert t.name == "custom" and t.reward_prompt == "helpful"
    every = [prompt_of(style, i) for i in range(N)]
    held = t.train_prompts + t.eval_prompts + t.valid_prompts
    assert sorted(map(data.prompt_key, held)) == sorted(map(data.prompt_key, every))  # each prompt in one list
    assert (len(t.eval_prompts), len(t.valid_prompts), len(t.train_prompts)) == (2, 2, N - 4)
    number = {data.prompt_key(p): i for i, p in enumerate(every)}
    for p in held:  # the other columns, per prompt, as the file had them (values keep their types)
        i = number[data.prompt_key(p)]
        assert t.columns[data.prompt_key(p)] == {"answer": f"{i}", "level": i % 3}
    # the reference (a column, or the assistant's last turn): a demonstration of a training prompt, the reference
    # of an eval prompt; never of a held-out prompt in the training lists
    assert sorted(t.sft_data, key=str) == sorted(((p, f"answer {number[data.prompt_key(p)]}.")
                                                  for p in t.train_prompts), key=str)
    assert t.references == [f"answer {number[data.prompt_key(p)]}." for p in t.eval_prompts]
    assert t.pref_data == []


def test_chosen_and_rejected_as_text_or_chat_turns_are_preference_pairs(tmp_path):
    records = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    records += [{"prompt": [user(f"c{i}")], "chosen": [user(f"c{i}"), assistant(f"fine {i}")],  # TRL's style
                 "rejected": [assistant(f"poor {i}")]} for i in range(20)]
    records.append({"prompt": "same", "chosen": "x", "rejected": "x"})  # a tie: a prompt, no pair
    t = tasks.load_task("custom", data=write_jsonl(tmp_path / "p.jsonl", records))
    pairs = {data.prompt_key(p): (c, r) for p, c, r in t.pref_data}
    for p in t.train_prompts:
        if p == "same":
            assert data.prompt_key(p) not in pairs
        elif isinstance(p, str):
            assert pairs[data.prompt_key(p)] == (f"good {p[1:]}", f"bad {p[1:]}")
        else:
            i = p[0]["content"][1:]
            assert pairs[data.prompt_key(p)] == (f"fine {i}", f"poor {i}")
    assert t.sft_data == []  # no reference column: the chosen reply is an eval prompt's reference only
    assert all(r is not None for p, r in zip(t.eval_prompts, t.references) if p != "same")


def test_two_files_and_a_datasetdicts_splits_give_the_eval_prompts(tmp_path):
    train_rows, test_rows = rows("prompt", 30), [{"prompt": f"held {i}?", "reference": f"r{i}"} for i in range(5)]
    both = f"{write('jsonl', tmp_path / 'a', train_rows)},{write('parquet', tmp_path / 'b', test_rows)}"
    t = tasks.load_task("custom", data=both)
    assert t.eval_prompts == [f"held {i}?" for i in range(5)] and t.references == [f"r{i}" for i in range(5)]
    ds = datasets.DatasetDict(train=datasets.Dataset.from_list(train_rows), test=datasets.Dataset.from_list(
        [dict(r, answer="", level=0) for r in test_rows]))
    ds.save_to_disk(str(tmp_path / "dd"))
    t2 = tasks.load_task("custom", data=str(tmp_path / "dd"))
    assert t2.eval_prompts == t.eval_prompts and sorted(t2.train_prompts) == sorted(t.train_prompts)
    msg = error_of(f"{tmp_path / 'dd'},{tmp_path / 'a.jsonl'}")
    assert "DatasetDict" in msg and "give it alone" in msg


def test_a_bad_record_names_the_file_the_line_and_the_field(tmp_path):
    good = rows("prompt", 5)
    cases = [({"prompt": 7}, "line 3", "'prompt'"),
             ({"messages": [user("hi"), {"role": "robot", "content": "x"}]}, "line 3", "'messages' turn 2"),
             ({"messages": [user("hi"), SYSTEM]}, "line 3", "system turn may only come first"),
             ({"messages": [assistant("only a reply")]}, "line 3", "must end with the user's turn"),
             ({"prompt": "q", "chosen": "a"}, "line 3", "'rejected' is missing"),
             ({"prompt": "q", "chosen": [user("q")], "rejected": "b"}, "line 3", "'chosen'"),
             ({"text": "q"}, "line 3", "no 'prompt' and no 'messages'")]
    for record, where, field in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", good[:2] + [record] + good[2:])
        msg = error_of(path)
        assert path in msg and where in msg and field in msg, (record, msg)
    # parquet and a saved data set name the row; a file without either column names both columns and the file
    records = [{"question": f"q{i}"} for i in range(4)]
    for fmt in ("parquet", "datasets"):
        path = write(fmt, tmp_path / f"noprompt-{fmt}", records)
        msg = error_of(path)
        assert path in msg and "row 1" in msg and "'prompt'" in msg and "'messages'" in msg
    path = write("datasets", tmp_path / "typed", [{"prompt": "a"}, {"prompt": ""}])
    assert "row 2" in error_of(path) and "'prompt' is empty" in error_of(path)


def test_custom_needs_data(tmp_path):
    assert "--data" in error_of("")
    (tmp_path / "config.json").write_text("{}")
    cfg = config.parse_config(["--task", "custom", "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="--task custom trains on your own prompts: give --data"):
        config.check_config(cfg, 1)
    assert (cfg.judge, cfg.eval_judge, cfg.max_new_tokens) == ("llm", "llm", 256)  # tasks.TASK_DEFAULTS


# ---------------------------------------------------------------------------------------------------
# --chat-template-kwargs
# ---------------------------------------------------------------------------------------------------
# the toy chat template, plus Qwen3's switch: without enable_thinking=false the assistant's turn opens with an
# empty think block; a template that raises when the kwarg is missing proves every rendering got it
THINKING = tasks.CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                       "<|im_start|>assistant\n{% if enable_thinking is defined and not "
                                       "enable_thinking %}<think></think>{% endif %}{% endif %}")
STRICT = "{% if enable_thinking is not defined %}{{ raise_exception('no enable_thinking') }}{% endif %}" + THINKING


def test_chat_template_kwargs_reach_apply_chat_template(tmp_path):
    tok = tasks.build_tokenizer()
    tok.chat_template = THINKING
    tok.save_pretrained(tmp_path)
    plain = rollout.render_prompts(infra.load_tokenizer(str(tmp_path)), ["hi", [SYSTEM, user("hi")]])
    off = rollout.render_prompts(infra.load_tokenizer(str(tmp_path), False, '{"enable_thinking": false}'),
                                 ["hi", [SYSTEM, user("hi")]])
    assert plain[0] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off == [x + "<think></think>" for x in plain]
    assert off[1].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")


@pytest.mark.slow
def test_the_vllm_sampler_renders_with_the_kwargs_too(tmp_path):
    """VllmSampler.generate hands the engine token ids it rendered itself: they carry the kwargs' effect. The
    engine is a stand-in that records its input and answers one EOS (an engine would take minutes here)."""
    tok = tasks.build_tokenizer()
    tok.chat_template = THINKING
    tok.save_pretrained(tmp_path)
    tok = infra.load_tokenizer(str(tmp_path), False, '{"enable_thinking": false}')
    seen = []

    class Engine:
        def generate(self, inputs, params, use_tqdm):
            seen.extend(x["prompt_token_ids"] for x in inputs)
            sample = type("Sample", (), {"token_ids": [tok.eos_token_id], "logprobs": [{tok.eos_token_id:
                                         type("Logprob", (), {"logprob": -0.5})()}]})()
            return [type("Out", (), {"outputs": [sample] * params.n})() for _ in inputs]

    sampler = object.__new__(rollout.VllmSampler)
    sampler.llm, sampler.tempered_logprobs = Engine(), True
    batch = sampler.generate(tok, ["hi"], 2, 4, 1.0, [tok.eos_token_id])
    assert tok.decode(seen[0]).endswith("<|im_start|>assistant\n<think></think>") and len(batch) == 2


@pytest.mark.parametrize("text, says", [("{enable_thinking: false}", "not valid JSON"),
                                        ("[1, 2]", "must be a JSON object"),
                                        ('{"tokenize": true}', "tokenize")])
def test_bad_chat_template_kwargs_name_the_flag(text, says):
    with pytest.raises(SystemExit) as e:
        config.check_config(config.parse_config(["--chat-template-kwargs", text]), 1)
    assert "--chat-template-kwargs" in str(e.value) and says in str(e.value)


@pytest.mark.slow
def test_dar_trains_on_a_custom_jsonl_with_chat_template_kwargs(toy_cache, tmp_path):
    """Two online batches of DAR from a copy of the toy pi_0 whose template raises without enable_thinking, on
    conversations with a system turn, judged by VADER (any text)."""
    pi_0 = str(tmp_path / "pi_0")
    _, toy_pi_0 = loop.toy_paths(config.parse_config(["--cache-dir", toy_cache, "--sft-steps", str(SFT_STEPS)]))
    shutil.copytree(os.path.join(toy_pi_0, "final"), pi_0)
    tok = infra.load_tokenizer(pi_0)
    tok.chat_template = STRICT
    tok.save_pretrained(pi_0)
    with pytest.raises(Exception, match="no enable_thinking"):  # the check in the template is live
        rollout.render_prompts(infra.load_tokenizer(pi_0), ["hi"])
    words = ["good", "fine", "sad", "calm", "bright", "dull", "warm", "cold"]
    records = [{"messages": [SYSTEM, user(f"say something {w} {i}")], "mood": w} for i in range(10) for w in words]
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    out = tmp_path / "run"
    cfg = config.parse_config(TINY + ["--cache-dir", toy_cache, "--out-dir", str(out), "--print-every", "1000",
                                      "--task", "custom", "--data", path, "--model", pi_0, "--judge", "vader",
                                      "--eval-judge", "vader", "--max-new-tokens", "8", "--steps", "2",
                                      "--chat-template-kwargs", '{"enable_thinking": false}'])
    config.check_config(cfg, 1)
    run = train(cfg)
    metrics = read_metrics(str(out))
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["train/invalid_frac"] == 0 and math.isfinite(m["train/loss"]) for m in metrics)
    assert run.tok.chat_template_kwargs == {"enable_thinking": False}
    assert run.task.columns[data.prompt_key(run.task.train_prompts[0])]["mood"] in words
    assert os.path.isfile(os.path.join(out, "final", "config.json"))


def test_a_papers_task_reads_a_saved_dataset_like_its_jsonl(tmp_path):
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "hh_helpful.jsonl")
    with open(fixture) as f:
        datasets.Dataset.from_list([json.loads(line) for line in f]).save_to_disk(str(tmp_path / "hh"))
    a, b = tasks.load_task("helpful", data=fixture), tasks.load_task("helpful", data=str(tmp_path / "hh"))
    assert (a.train_prompts, a.eval_prompts, a.sft_data, a.pref_data) == (b.train_prompts, b.eval_prompts,
                                                                          b.sft_data, b.pref_data)
