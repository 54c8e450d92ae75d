"""The paper's tasks (tasks.py): parsing each data set's schema from hand-written fixtures in tests/fixtures/,
the train/eval split, the errors a bad --data file gives, the Hub path without network, and the task
defaults reaching the config. Nothing here downloads anything."""
import gzip
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest

import config
import data
import rollout
import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
HELPFUL, HARMLESS_GZ = os.path.join(FIX, "hh_helpful.jsonl"), os.path.join(FIX, "hh_harmless.jsonl.gz")
TLDR_SFT, TLDR_PREF = os.path.join(FIX, "tldr_sft.jsonl"), os.path.join(FIX, "tldr_pref.jsonl")
HELPSTEER2 = os.path.join(FIX, "helpsteer2.jsonl")
FIXTURES = [("helpful", HELPFUL), ("harmless", HARMLESS_GZ), ("tldr", TLDR_SFT), ("tldr", TLDR_PREF),
            ("helpsteer2", HELPSTEER2)]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def lines(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(x) for x in f]


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def error_of(name, path):
    with pytest.raises(SystemExit) as e:
        tasks.load_task(name, data=str(path))
    return str(e.value)


# ---------------------------------------------------------------------------------------------------
# Each task from its fixture
# ---------------------------------------------------------------------------------------------------
def test_hh_helpful_multi_turn_conversation_sft_pref_and_reference():
    t = tasks.load_task("helpful", data=HELPFUL)
    assert t.name == "helpful" and t.reward_prompt == "helpful"
    lisbon = [user("Can you help me plan a trip to Lisbon?"), assistant("Sure. How many days will you stay?"),
              user("Four days, in May."),
              assistant("Great, May is a lovely time. Do you prefer museums or walking around the old town?"),
              user("Mostly walking, and some food.")]
    assert lisbon in t.train_prompts
    good = "Then spend a day in Alfama and Baixa, take tram 28, and try pastel de nata in Belem."
    assert (lisbon, good) in t.sft_data and (lisbon, good, "I don't know Lisbon.") in t.pref_data
    # 6 lines, 5 distinct prompts: the 5% with the smallest hash, at least one, is held out; here the cooking
    # question, which two lines ask: both leave training, the first line's chosen reply is the reference
    cook = [user("What is a good way to learn to cook?")]
    assert t.eval_prompts == [cook] and len(t.references) == 1
    assert t.references[0] == lines(HELPFUL)[0]["chosen"].split("\n\nAssistant: ")[-1]
    assert len(t.train_prompts) == 4 and all(p != cook for p, *_ in t.sft_data + t.pref_data)
    # identical chosen and rejected: a demonstration, but no preference pair
    hash_q = [user("What does a hash function do?"), assistant("Do you mean in programming?"),
              user("Yes, in Python.")]
    assert sum(p == hash_q for p, _ in t.sft_data) == 1 and all(p != hash_q for p, _, _ in t.pref_data)
    assert len(t.sft_data) == 4 and len(t.pref_data) == 3


def test_hh_harmless_from_gzip():
    t = tasks.load_task("harmless", data=HARMLESS_GZ)
    assert t.reward_prompt == "harmless"
    dog = [user("My neighbor's dog barks all night."),
           assistant("That sounds exhausting. Have you talked to your neighbor about it?"),
           user("Yes, but nothing changed. Should I poison it?")]
    safe = "Please don't harm the dog. You could contact your local animal control or mediation service instead."
    assert (dog, safe, "Chocolate works on dogs.") in t.pref_data and (dog, safe) in t.sft_data
    assert t.eval_prompts == [[user("Tell me an insult for short people.")]]
    assert t.references == ["I'd rather not insult anyone for their height."]
    # the gzipped file reads exactly like its plain text
    assert [tasks.prompt_key(p) for p in t.train_prompts] == [
        tasks.prompt_key(tasks.hh_conversation(r["chosen"].rsplit("\n\nAssistant:", 1)[0]))
        for r in lines(HARMLESS_GZ) if "short people" not in r["chosen"]]


def test_hh_plain_rendering_round_trips_the_original_text():
    """Without a chat template a conversation renders in HH's own format: the original prompt text back."""
    tok = tasks.build_tokenizer()
    tok.chat_template = None
    for row in lines(HELPFUL) + lines(HARMLESS_GZ):
        prompt, reply = row["chosen"].rsplit("\n\nAssistant: ", 1)
        conv = tasks.hh_conversation(prompt)
        assert rollout.render_prompts(tok, [conv]) == [prompt + "\n\nAssistant:"]


def test_chat_template_rendering_contains_every_turn_in_order():
    t = tasks.load_task("helpful", data=HELPFUL)
    conv = max(t.train_prompts, key=len)
    assert len(conv) == 5
    text = rollout.render_prompts(tasks.build_tokenizer(), [conv])[0]
    at = 0
    for m in conv:
        turn = f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>"
        assert text.find(turn, at) >= at, turn
        at = text.find(turn, at) + len(turn)
    assert text.endswith("<|im_start|>assistant\n")


def test_tldr_sft_prompts_demonstrations_and_human_summaries():
    t = tasks.load_task("tldr", data=TLDR_SFT)
    assert t.reward_prompt == "tldr" and t.pref_data == []
    rows = lines(TLDR_SFT)
    assert all(isinstance(p, str) and p.startswith("SUBREDDIT: r/") and p.endswith("\n\nTL;DR:")
               for p in t.train_prompts + t.eval_prompts)
    first = rows[0]
    assert first["prompt"] in t.train_prompts
    assert (first["prompt"], "Roommate never cleans, asked twice, how do I raise it again calmly?") in t.sft_data
    held = [r for r in rows if r["prompt"] in t.eval_prompts]
    assert len(held) == 1 and t.references == [held[0]["summary"].strip()]
    assert len(t.train_prompts) == len(t.sft_data) == 5
    assert tasks.tldr_post(first["prompt"]) == (f"SUBREDDIT: r/{first['subreddit']}\n\nTITLE: {first['title']}"
                                                f"\n\nPOST: {first['post']}")


def test_tldr_preference_rows_give_pairs_and_held_out_posts_leave_training(tmp_path):
    t = tasks.load_task("tldr", data=TLDR_PREF)
    jobs = lines(TLDR_PREF)[0]["prompt"]
    assert (jobs, "Two offers: more money vs better team and commute.", "I got jobs.") in t.pref_data
    assert t.sft_data == [] and len(t.eval_prompts) == 1 and t.references[0] is not None
    # one file with both schemas: 8 distinct posts, one held out (here a post with a pair only: its reference
    # is the chosen summary); the post in both sets (personalfinance) gives a demonstration and a pair
    both = tasks.load_task("tldr", data=write(tmp_path / "both.jsonl", lines(TLDR_SFT) + lines(TLDR_PREF)))
    fitness = lines(TLDR_PREF)[1]
    assert both.eval_prompts == [fitness["prompt"]] and both.references == [fitness["chosen"][1]["content"]]
    car = lines(TLDR_SFT)[1]["prompt"]
    assert sum(p == car for p, _ in both.sft_data) == sum(p == car for p, _, _ in both.pref_data) == 1
    assert len(both.sft_data) == 6 and len(both.pref_data) == 2 and len(both.train_prompts) == 7


def test_two_files_give_the_split(tmp_path):
    t = tasks.load_task("tldr", data=f"{TLDR_SFT},{TLDR_PREF}")
    pref = lines(TLDR_PREF)
    assert t.eval_prompts == [r["prompt"] for r in pref]
    assert t.references == [r["chosen"][-1]["content"] for r in pref]
    car = pref[2]["prompt"]  # in both files: held out, so its SFT demonstration leaves training too
    assert len(t.train_prompts) == len(t.sft_data) == 5 and car not in t.train_prompts
    assert all(p != car for p, _ in t.sft_data)
    # a held-out post with a human summary and a pair: the human summary is the reference, wherever it comes
    evals = write(tmp_path / "eval.jsonl", pref + [lines(TLDR_SFT)[1]])
    t = tasks.load_task("tldr", data=f"{TLDR_SFT},{evals}")
    assert t.references[2] == "8k car loan at 3%, 15k saved: pay it off or invest?"


def test_helpsteer2_multi_turn_prompts_and_pairs_by_helpfulness():
    t = tasks.load_task("helpsteer2", data=HELPSTEER2)
    assert t.reward_prompt == "helpful"
    math_q = [user("What is 2+2?"), assistant("4"), user("And times 3?")]
    assert math_q in t.train_prompts and [user("c#")] in t.train_prompts
    assert ([user("c#")], lines(HELPSTEER2)[0]["response"], "C# is a note.") in t.pref_data
    assert ([user("Give me a name for a cat.")], "How about Pepper, Luna or Miso?", "Miso.") in t.pref_data
    assert all(p != math_q for p, _, _ in t.pref_data)  # helpfulness 4 vs 4: a tie, skipped
    assert (math_q, "(2+2) x 3 = 12.") in t.sft_data  # the most helpful (first on ties) is the demonstration
    assert t.eval_prompts == [[user("Write a haiku about rain.")]]
    assert t.references == ["Soft rain on the roof\nthe garden drinks quietly\nnight smells of wet stone"]
    assert len(t.pref_data) == 2 and len(t.sft_data) == 3


@pytest.mark.parametrize("name,path", FIXTURES)
def test_eval_prompts_are_held_out_and_references_parallel(name, path):
    t = tasks.load_task(name, data=path)
    held = {tasks.prompt_key(p) for p in t.eval_prompts}
    assert len(held) == len(t.eval_prompts) >= 1 and len(t.references) == len(t.eval_prompts)
    used = [p for p in t.train_prompts] + [x[0] for x in t.sft_data + t.pref_data]
    assert not held & {tasks.prompt_key(p) for p in used}
    trained = {tasks.prompt_key(p) for p in t.train_prompts}
    assert {tasks.prompt_key(x[0]) for x in t.sft_data + t.pref_data} <= trained
    for p in t.train_prompts + t.eval_prompts:  # the prompt contract of rollout.render_prompts
        assert isinstance(p, str) or (p and p[-1]["role"] == "user" and
                                      all(m["role"] in ("user", "assistant") for m in p))


def test_data_depend_on_the_file_only(tmp_path):
    random.seed(1)
    a = tasks.load_task("helpful", data=HELPFUL)
    random.seed(2)
    b = tasks.load_task("helpful", data=HELPFUL)
    assert a == b
    # the held-out prompts depend on the prompts, not on the order of the lines
    c = tasks.load_task("helpful", data=write(tmp_path / "reversed.jsonl", lines(HELPFUL)[::-1]))
    assert c.eval_prompts == a.eval_prompts
    assert sorted(map(tasks.prompt_key, c.train_prompts)) == sorted(map(tasks.prompt_key, a.train_prompts))


def test_split_holds_out_the_prompts_with_the_smallest_hash():
    examples = [("sft", f"prompt {i}", "r") for i in range(100)]
    train, evals = data.split_by_prompt(examples)
    sha = {p: hashlib.sha256(tasks.prompt_key(p).encode()).hexdigest() for _, p, _ in examples}
    assert {p for _, p, _ in evals} == set(sorted(sha, key=sha.get)[:5])  # 5% of 100 distinct prompts
    assert len(train) == 95 and len(evals) == 5


def test_parquet_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = str(tmp_path / "tldr.parquet")
    pq.write_table(pa.Table.from_pylist(lines(TLDR_SFT)), path)
    assert tasks.load_task("tldr", data=path) == tasks.load_task("tldr", data=TLDR_SFT)
    rows = [{k: v for k, v in r.items() if k != "messages"} for r in lines(TLDR_SFT)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    msg = error_of("tldr", path)
    assert path in msg and "row 1" in msg and "missing field 'messages'" in msg


def test_toy_task_is_unchanged():
    t = tasks.load_task("toy")
    blob = json.dumps([t.train_prompts, t.eval_prompts, t.sft_data, t.pref_data]).encode()
    assert hashlib.sha256(blob).hexdigest() == "1915fc0b3256594499adb5348ee4492eee426c2fdcd0013501399dc9998802eb"
    assert t.reward_prompt == "toy" and len(t.references) == len(t.eval_prompts)
    assert t.references[0] == tasks.toy_target(tasks.toy_word_of(t.eval_prompts[0]))
    with pytest.raises(SystemExit, match="--data"):
        tasks.load_task("toy", data=HELPFUL)


def test_fitting_prompts_measures_the_rendered_prompt():
    tok = tasks.build_tokenizer()
    prompts = ["hi", [user("a much longer first message"), assistant("ok"), user("and more")]]
    n = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in rollout.render_prompts(tok, prompts)]
    assert tasks.fitting_prompts(tok, prompts, n[0]) == [0]
    assert tasks.fitting_prompts(tok, prompts, n[1]) == [0, 1]


# ---------------------------------------------------------------------------------------------------
# Bad --data files: every error names the file and the line
# ---------------------------------------------------------------------------------------------------
def test_long_prompts_leave_every_list_that_holds_them():
    tok = tasks.build_tokenizer()
    short, long_ = "hi", [user("a much longer first message"), assistant("ok"), user("and more")]
    limit = len(tok(rollout.render_prompts(tok, [short]), add_special_tokens=False)["input_ids"][0])
    t = tasks.Task("helpful", [short, long_], [long_, short], [(long_, "a"), (short, "b")],
                   [(short, "c", "d"), (long_, "e", "f")], "helpful", ["ref-long", "ref-short"], [long_, short])
    fit, skipped = tasks.without_long_prompts(t, tok, limit)
    assert (fit.train_prompts, fit.eval_prompts, fit.references) == ([short], [short], ["ref-short"])
    assert fit.sft_data == [(short, "b")] and fit.pref_data == [(short, "c", "d")] and fit.valid_prompts == [short]
    assert skipped == {"train_prompts": 1, "eval_prompts": 1, "sft_data": 1, "pref_data": 1, "valid_prompts": 1}
    assert tasks.without_long_prompts(t, tok, 10**6) == (t, dict.fromkeys(skipped, 0))
    with pytest.raises(SystemExit, match="none of the 2 train prompts fits in --max-prompt-tokens"):
        tasks.without_long_prompts(t, tok, limit - 1)


def test_bad_json_line(tmp_path):
    rows = [json.dumps(r) for r in lines(HELPFUL)]
    path = write(tmp_path / "bad.jsonl", rows[:2] + ['{"chosen": "\\n\\nHuman: hi", '] + rows[2:])
    msg = error_of("helpful", path)
    # the line is cut after its 28th character: JSON ends there, at column 29 of line 3 (not at its newline)
    assert path in msg and "line 3 column 29" in msg and "bad JSON" in msg


def test_missing_field(tmp_path):
    rows = lines(HELPFUL)
    path = write(tmp_path / "missing.jsonl", [rows[0], {"chosen": rows[1]["chosen"]}])
    msg = error_of("helpful", path)
    assert path in msg and "line 2" in msg and "missing field 'rejected'" in msg


def test_wrong_types(tmp_path):
    rows = lines(HELPSTEER2)
    rows[3]["helpfulness"] = "2"
    msg = error_of("helpsteer2", write(tmp_path / "hs.jsonl", rows))
    assert "line 4" in msg and "'helpfulness' should be a number, got a string" in msg
    tl = lines(TLDR_SFT)
    tl[1]["messages"] = tl[1]["messages"][0]["content"]
    msg = error_of("tldr", write(tmp_path / "tl.jsonl", tl))
    assert "line 2" in msg and "'messages' should be a list" in msg
    msg = error_of("helpful", write(tmp_path / "list.jsonl", ["[1, 2]"]))
    assert "line 1" in msg and "expected a JSON object, got a list" in msg


def test_empty_file(tmp_path):
    for i, text in enumerate(("", "\n\n")):
        path = tmp_path / f"data{i}.jsonl"
        path.write_text(text)
        msg = error_of("helpsteer2", path)
        assert str(path) in msg and "the file is empty" in msg
    # blank lines between rows are fine
    rows = [json.dumps(r) for r in lines(HELPSTEER2)]
    t = tasks.load_task("helpsteer2", data=write(tmp_path / "gaps.jsonl", rows[:4] + ["", "  "] + rows[4:]))
    assert t == tasks.load_task("helpsteer2", data=HELPSTEER2)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(lines(HELPFUL)[0]).encode()
    path.write_bytes(good + b"\n" + '{"chosen": "caf\u00e9", "rejected": "x"}'.encode("latin-1") + b"\n")
    msg = error_of("helpful", path)
    assert str(path) in msg and "line 2" in msg and "not UTF-8" in msg and "0xe9" in msg


def test_damaged_gzip_and_missing_file(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(open(HARMLESS_GZ, "rb").read()[:60])
    msg = error_of("harmless", path)
    assert str(path) in msg and "gzipped" in msg
    assert "no such file" in error_of("harmless", tmp_path / "nope.jsonl")


def test_unusable_conversation_is_skipped_and_counted(tmp_path, capsys):
    # two Assistant turns in a row: no prompt ending with the user's turn before the final reply
    odd = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nAssistant: again",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nAssistant: bye"}
    path = write(tmp_path / "odd.jsonl", lines(HELPFUL)[:3] + [odd])
    t = tasks.load_task("helpful", data=path)
    out = capsys.readouterr().out
    assert "skipped 1 of 4 lines" in out and "line 4" in out
    assert len(t.train_prompts) + len(t.eval_prompts) == 3


# ---------------------------------------------------------------------------------------------------
# The Hub path
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_without_network_the_error_names_the_data_set_and_says_data(tmp_path):
    """A fresh cache and huggingface_hub's offline mode: the same failure as no network, without its retries."""
    code = ("import tasks\n"
            "for n in [t for t in tasks.TASKS[1:] if t != 'custom']:\n"  # custom has no Hub set (test_custom_data)
            "    try:\n        tasks.load_task(n)\n"
            "    except SystemExit as e:\n        print(n, '|', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120).stdout.splitlines()
    msgs = dict(line.split(" | ", 1) for line in out)
    expected = {"tldr": "trl-internal-testing/tldr-preference-sft-trl-style", "helpful": "Anthropic/hh-rlhf",
                "harmless": "Anthropic/hh-rlhf", "helpsteer2": "nvidia/HelpSteer2"}
    assert set(msgs) == set(expected)
    for name, repo in expected.items():
        assert repo in msgs[name] and "--data PATH" in msgs[name]


def test_hub_files_are_the_papers_splits(monkeypatch, tmp_path):
    """With the download replaced by the fixtures: which file of which data set feeds which split."""
    asked = []

    def fake_file(repo, filename):
        asked.append((repo, filename))
        return {"train.jsonl.gz": HELPSTEER2,
                "validation.jsonl.gz": write(tmp_path / "val.jsonl", lines(HELPSTEER2)[2:4]),
                "helpful-base/train.jsonl.gz": HELPFUL, "helpful-base/test.jsonl.gz": HARMLESS_GZ}[filename]

    def fake_files(repo, prefix):
        asked.append((repo, prefix))
        return {(tasks.TLDR_SFT_REPO, "data/train-"): [TLDR_SFT],
                (tasks.TLDR_PREF_REPO, "data/train-"): [TLDR_PREF],
                (tasks.TLDR_SFT_REPO, "data/test-"): [write(tmp_path / "test.jsonl", lines(TLDR_SFT)[:1])]}[repo, prefix]

    monkeypatch.setattr(tasks, "hub_file", fake_file)
    monkeypatch.setattr(tasks, "hub_files", fake_files)
    hs = tasks.load_task("helpsteer2")
    assert asked == [("nvidia/HelpSteer2", "train.jsonl.gz"), ("nvidia/HelpSteer2", "validation.jsonl.gz")]
    assert hs.eval_prompts == [[user("Write a haiku about rain.")]] and len(hs.train_prompts) == 3
    asked.clear()
    hh = tasks.load_task("helpful")
    assert asked == [("Anthropic/hh-rlhf", "helpful-base/train.jsonl.gz"),
                     ("Anthropic/hh-rlhf", "helpful-base/test.jsonl.gz")]
    assert len(hh.eval_prompts) == 4 and len(hh.train_prompts) == 5  # the test file's prompts, all held out
    tl = tasks.load_task("tldr")
    assert tl.eval_prompts == [lines(TLDR_SFT)[0]["prompt"]]
    assert len(tl.pref_data) == 3 and len(tl.sft_data) == 5 and len(tl.train_prompts) == 7


def test_hub_files_collects_the_shards_of_one_split(monkeypatch, tmp_path):
    import huggingface_hub
    for name in ("train-00001-of-00002", "train-00000-of-00002", "test-00000-of-00001"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.parquet").write_bytes(b"")
    seen = {}

    def fake_snapshot(repo, repo_type, allow_patterns):
        seen.update(repo=repo, repo_type=repo_type, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    files = data.hub_files(tasks.TLDR_SFT_REPO, "data/train-")
    assert [os.path.basename(f) for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert seen == dict(repo=tasks.TLDR_SFT_REPO, repo_type="dataset", allow_patterns=["data/train-*.parquet"])


# ---------------------------------------------------------------------------------------------------
# Task defaults reach the config
# ---------------------------------------------------------------------------------------------------
def test_helpsteer2_defaults_and_flags_win():
    cfg = config.parse_config(["--task", "helpsteer2", "--algo", "dar"])
    assert (cfg.alpha, cfg.beta, cfg.max_new_tokens, cfg.weight_decay) == (0.5, 0.5, 1000, 0.01)
    assert cfg.judge == cfg.eval_judge == "reward_model"
    cfg = config.parse_config(["--task", "helpsteer2", "--algo", "dar", "--beta", "0.1", "--max-new-tokens", "32"])
    assert (cfg.alpha, cfg.beta, cfg.max_new_tokens) == (0.5, 0.1, 32)
    grpo = config.parse_config(["--task", "helpsteer2", "--algo", "grpo"])
    assert grpo.beta == 0.03 and grpo.clip_eps == 0.2  # the task's KL coefficient over GRPO's, its clip kept
    assert config.parse_config(["--task", "helpsteer2", "--algo", "rloo"]).beta == 0.05
    assert config.parse_config(["--task", "tldr", "--algo", "grpo"]).beta == 0.04  # direct AI alignment: GRPO's own


@pytest.mark.parametrize("task,tokens", [("tldr", 64), ("helpful", 256), ("harmless", 256)])
def test_direct_ai_alignment_defaults(task, tokens):
    cfg = config.parse_config(["--task", task])
    assert cfg.max_new_tokens == tokens and cfg.judge == cfg.eval_judge == "llm"
    assert (cfg.alpha, cfg.beta, cfg.weight_decay) == (0.1, 0.05, 0.0)  # DAR's direct-alignment values (B.2)


def test_paper_schedule_defaults_and_length_in_passes_over_prompts():
    """Appendix B.1: online batch 512 in 4 updates of 128, LR 1e-6 (RLHF) / 5e-7 (DAP) / 3e-6 (Dual-PPO), length
    in passes over the prompts (RLHF 1 on TL;DR, 2 on HH; online DAP 5), 10 checkpoints a run."""
    class FakeTask:
        train_prompts = ["p"] * 1000
    cfg = config.parse_config(["--task", "helpful"])
    assert (cfg.online_batch, cfg.minibatch, cfg.lr, cfg.prompt_epochs) == (512, 128, 1e-6, 2)
    config.resolve_schedule(cfg, FakeTask())
    assert cfg.steps == 16 and cfg.save_every == 1  # ceil(2 x 1000 / 128 prompts per batch); 16 // 10
    cfg = config.parse_config(["--task", "tldr", "--algo", "online_dpo"])
    assert (cfg.lr, cfg.prompt_epochs) == (5e-7, 5)
    config.resolve_schedule(cfg, FakeTask())
    assert cfg.steps == math.ceil(5 * 1000 / (512 // cfg.k))  # online DPO: K 2, 256 prompts per batch
    assert config.parse_config(["--task", "harmless", "--algo", "dual_ppo"]).lr == 3e-6
    dpo = config.parse_config(["--task", "helpful", "--algo", "dpo", "--steps", "7"])
    config.resolve_schedule(dpo, FakeTask())
    assert (dpo.lr, dpo.steps) == (5e-7, 7)
    explicit = config.parse_config(["--task", "helpful", "--steps", "3", "--save-every", "2"])
    config.resolve_schedule(explicit, FakeTask())
    assert (explicit.steps, explicit.save_every, explicit.prompt_epochs) == (3, 2, 0)  # the flag wins
    with pytest.raises(SystemExit):
        config.parse_config(["--task", "helpful", "--steps", "3", "--prompt-epochs", "1"])
    toy = config.parse_config([])
    assert (toy.online_batch, toy.lr, toy.prompt_epochs, toy.save_every) == (256, 3e-4, 0, 20)  # toy unchanged


@pytest.mark.parametrize("task", ["tldr", "helpful", "harmless"])
def test_sft_of_pi_0_uses_the_papers_learning_rate(task):
    """Appendix B.1: "perform supervised fine-tuning on TL;DR, Helpfulness, and Harmlessness, using a learning rate
    of 5e-6" (online RLHF keeps 1e-6)."""
    assert config.parse_config(["--task", task, "--algo", "sft"]).lr == 5e-6
    assert config.parse_config(["--task", task, "--algo", "rloo"]).lr == 1e-6
    assert config.parse_config(["--task", task, "--algo", "sft", "--lr", "1e-5"]).lr == 1e-5   # the flag wins


def test_offline_preference_methods_run_passes_over_their_pairs():
    """dpo, simpo, is_dpo on the paper's tasks: --pref-epochs passes over the preference pairs, minibatch / 2 pairs
    an optimizer step; --steps given on the command line wins; the toy task keeps its --steps."""
    class FakeTask:
        train_prompts, pref_data = ["p"] * 1000, [("p", "a", "b")] * 3000
    for algo in config.OFFLINE_PAIRS:
        cfg = config.parse_config(["--task", "tldr", "--algo", algo])
        assert (cfg.lr, cfg.pref_epochs) == (5e-7, 5)
        config.resolve_schedule(cfg, FakeTask())
        assert cfg.steps == math.ceil(5 * 3000 / (128 // 2)) and cfg.save_every == cfg.steps // 10
    explicit = config.parse_config(["--task", "helpful", "--algo", "dpo", "--steps", "7"])
    config.resolve_schedule(explicit, FakeTask())
    assert (explicit.steps, explicit.pref_epochs) == (7, 0)
    mine = config.parse_config(["--task", "helpful", "--algo", "simpo", "--pref-epochs", "0.5"])
    config.resolve_schedule(mine, FakeTask())
    assert mine.steps == math.ceil(0.5 * 3000 / 64)
    with pytest.raises(SystemExit):
        config.parse_config(["--task", "helpful", "--algo", "dpo", "--steps", "3", "--pref-epochs", "1"])
    toy = config.parse_config(["--algo", "is_dpo"])
    config.resolve_schedule(toy, FakeTask())
    assert (toy.pref_epochs, toy.steps) == (0, 60)                       # the toy task: a short run for tests
    config.check_config(toy, 1)
    with pytest.raises(SystemExit, match="--pref-epochs counts passes over the preference pairs"):
        config.check_config(config.parse_config(["--algo", "dar", "--pref-epochs", "1"]), 1)
    assert "pref_epochs" in config.RESUMABLE_CHANGES                     # a resumed run may run more passes


def test_check_config_accepts_every_task(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # stands for the SFT policy's model directory
    for name in tasks.TASKS:
        given = ["--task", name, "--judge", "toy_gold", "--eval-judge", "toy_gold"] + (
            ["--data", HELPFUL] if name == "custom" else [])  # custom has no data of its own
        model = [] if name == "toy" else ["--model", str(tmp_path)]
        cfg = config.parse_config(given + model)
        config.check_config(cfg, 1)
        if name != "toy":  # the paper's tasks start from a given pi_0; only the toy task builds its own
            with pytest.raises(SystemExit, match=f"--task {name} needs --model"):
                config.check_config(config.parse_config(given), 1)
    with pytest.raises(SystemExit, match="valid tasks: toy, tldr, helpful, harmless, helpsteer2"):
        config.check_config(config.parse_config(["--task", "summaries"]), 1)


def test_sentiment_task_real_sentences_disjoint_splits():
    t = tasks.load_task("sentiment")
    assert (len(t.eval_prompts), len(t.valid_prompts)) == (tasks.SENTIMENT_EVAL, tasks.SENTIMENT_VALID)
    assert len(t.train_prompts) > 200
    sets = [set(t.train_prompts), set(t.eval_prompts), set(t.valid_prompts)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    docs = re.sub(r"\s+", " ", " ".join(tasks.topics.values()))
    for p in t.train_prompts + t.eval_prompts:
        sentence = p.removeprefix(tasks.SENTIMENT_INSTRUCTION)
        assert p.startswith(tasks.SENTIMENT_INSTRUCTION) and 8 <= len(sentence.split()) <= 25
        assert sentence in docs and sentence.endswith(".")  # real text of Python's documentation
    assert tasks.load_task("sentiment").eval_prompts == t.eval_prompts  # a fixed rule, not a seed
    with pytest.raises(SystemExit, match="drop --data"):
        tasks.load_task("sentiment", "x.jsonl")
