"""config.py: where each setting comes from (the paper's learning rates for a pretrained model, the settings line),
the evaluation judge a run takes, the options an algorithm does not read, and the messages of bad flags."""
import json
import os

import pytest

import config
import dar
import eval as eval_py
import infra
import loop
import rollout
import tasks
from conftest import ROOT, TINY, read_metrics

PI0 = os.path.join(ROOT, "tests", "fixtures", "run-before-layout", "pi0")  # a (toy) model directory
REWARD_FILE = os.path.join(ROOT, "tests", "fixtures", "rewards", "fns.py")


def checked(*argv):
    cfg = config.parse_config(list(argv))
    config.check_config(cfg, 1)
    return cfg


def refusal(*argv):
    with pytest.raises(SystemExit) as e:
        checked(*argv)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------
# Learning rates: the toy model's, else the paper's for the algorithm (Appendix B.1, B.3); a flag wins
# ---------------------------------------------------------------------------------------------------
PAPER = {"dar": 1e-6, "grpo": 1e-6, "rloo": 1e-6, "ppo": 1e-6, "dao": 1e-6, "iter_sft": 1e-6,
         "dual_ppo": 3e-6, "dual_ppo_clip": 3e-6, "dual_mix_ppo": 3e-6,
         "online_dpo": 5e-7, "ipo": 5e-7, "slic": 5e-7, "dpo": 5e-7, "simpo": 5e-7, "is_dpo": 5e-7, "sft": 5e-6}


@pytest.mark.parametrize("algo", sorted(PAPER))
def test_a_pretrained_model_takes_the_papers_learning_rate_for_its_algorithm(algo):
    assert config.parse_config(["--algo", algo]).lr == 3e-4  # the toy model's own
    assert config.parse_config(["--algo", algo, "--model", PI0]).lr == PAPER[algo]
    assert config.parse_config(["--algo", algo, "--task", "helpful"]).lr == PAPER[algo]  # needs a --model anyway
    assert config.parse_config(["--algo", algo, "--model", PI0, "--lr", "2e-5"]).lr == 2e-5


def test_the_settings_line_says_where_each_setting_came_from():
    line = config.settings_line(config.parse_config(["--task", "custom", "--model", PI0, "--algo", "grpo", "--k", "8",
                                                     "--data", "x.jsonl"]))
    assert line == ("settings: --lr 1e-06 (the paper's for grpo with a pretrained --model), --online-batch 256 "
                    "(default, toy-sized), --minibatch 64 (default, toy-sized), --micro-batch 64 (default, toy-sized), "
                    "--k 8 (flag), --max-new-tokens 256 (task custom)")
    line = config.settings_line(config.parse_config(["--task", "helpful", "--algo", "online_dpo", "--lr", "1e-7"]))
    assert "--lr 1e-07 (flag)" in line and "--online-batch 512 (task helpful)" in line
    assert "--k 2 (algorithm online_dpo)" in line and "--micro-batch 4 (task helpful)" in line
    assert "--k 4 (default, the paper's)" in config.settings_line(config.parse_config([]))
    offline = config.settings_line(config.parse_config(["--algo", "dpo"]))
    assert "--online-batch" not in offline and "--k" not in offline  # an offline algorithm samples nothing


@pytest.mark.slow
def test_dar_py_prints_the_settings_line_before_the_run(toy_cache, tmp_path, capsys):
    dar.main(TINY + ["--cache-dir", toy_cache, "--out-dir", str(tmp_path / "run"), "--steps", "1", "--print-every",
                     "1000", "--eval-judge", "none"])
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first == ("settings: --lr 0.001 (flag), --online-batch 32 (flag), --minibatch 16 (flag), --micro-batch 8 "
                     "(flag), --k 4 (default, the paper's), --max-new-tokens 12 (flag)")
    # --eval-judge none: the run trains and writes no evaluation; eval.py asks for a judge, and takes one
    assert len(read_metrics(tmp_path / "run")) == 1
    assert not os.path.exists(tmp_path / "run" / "eval.json") and "win rate" not in out
    run, out_dir = str(tmp_path / "run"), str(tmp_path / "eval")
    with pytest.raises(SystemExit, match="was trained with --eval-judge none \\(no evaluation\\); give eval.py "
                                         "--eval-judge JUDGE"):
        eval_py.main([run, "--out", out_dir, "--n-prompts", "4"])
    eval_py.main([run, "--out", out_dir, "--n-prompts", "4", "--eval-judge", "toy_gold"])
    with open(os.path.join(out_dir, "run.json")) as f:
        assert json.load(f)["judge"] == "toy_gold"


# ---------------------------------------------------------------------------------------------------
# The evaluation judge
# ---------------------------------------------------------------------------------------------------
def test_judge_none_with_reward_functions_evaluates_with_the_training_reward_unless_told_otherwise():
    fn = f"{REWARD_FILE}:length_reward"
    data = os.path.join(ROOT, "tests", "fixtures", "hh_helpful.jsonl")
    custom = ["--task", "custom", "--data", data, "--model", PI0, "--judge", "none", "--reward", fn]
    cfg = checked(*custom)  # custom's eval judge is llm; without an endpoint this stopped before
    assert cfg.eval_judge == "reward" and cfg.origin["eval_judge"] == "--judge none with --reward"
    assert checked(*custom, "--eval-judge", "vader").eval_judge == "vader"
    assert checked(*custom, "--eval-judge", "none").eval_judge == "none"
    assert "--eval-judge-url URL" in refusal(*custom, "--eval-judge", "llm")
    assert checked("--judge", "toy_biased", "--reward", fn).eval_judge == "toy_gold"  # a judge: the task's


def test_eval_judge_none_means_no_evaluation_and_refuses_eval_every():
    assert checked("--eval-judge", "none").eval_judge == config.NO_EVALUATION
    assert "--eval-judge none evaluates nothing; drop --eval-every" in refusal("--eval-judge", "none",
                                                                               "--eval-every", "5")


# ---------------------------------------------------------------------------------------------------
# Options an algorithm does not read
# ---------------------------------------------------------------------------------------------------
NON_DEFAULT = {"alpha": "0.3", "w_clip": "5", "normalize_adv": None, "beta": "0.2", "clip_eps": "0.3",
               "clip_eps_high": "0.28", "vf_coef": "2", "value_clip": "0.3", "gae_lambda": "0.9", "gamma": "0.99",
               "missing_eos_penalty": "2", "value_model": PI0, "pair_labels": "reward", "simpo_gamma": "1.0",
               "is_clip": "5", "loss_agg": "token", "scale_rewards": "batch", "tis_cap": "2", "k": "8", "epochs": "2",
               "logp_source": "sampler"}


def flag_of(name):
    value = NON_DEFAULT[name]
    flag = "--" + name.replace("_", "-")
    return [flag.replace("--", "--no-")] if value is None else [flag, value]


def test_every_option_that_only_some_algorithms_read_is_listed_with_a_non_default_value_here():
    assert set(NON_DEFAULT) == set(config.USED_BY)


@pytest.mark.parametrize("name", sorted(config.USED_BY))
def test_an_option_the_algorithm_does_not_read_is_refused_naming_those_that_do(name):
    readers = config.USED_BY[name]
    for algo in config.ALGOS:
        argv = ["--algo", algo, "--online-batch", "64", "--minibatch", "32"] + flag_of(name)
        if name == "pair_labels" or algo in config.ONLINE_PAIRS:  # reward labels: pairs of whole groups
            argv += ["--pair-labels", "reward"] if name != "pair_labels" else []
        if algo in readers:
            checked(*argv)
        else:
            assert refusal(*argv).startswith(f"error: --{name.replace('_', '-')} ") and \
                f"is read by --algo {', '.join(readers)} only; --algo {algo} does not use it" in refusal(*argv)
    # the algorithm's own default value is no flag to refuse: dual_ppo's clip_eps inf, online DPO's k 2
    checked("--algo", "online_dpo", "--k", "2")


def test_a_resume_ignores_a_field_its_algorithm_never_reads():
    saved = {**json.loads(json.dumps(config.dataclasses.asdict(config.parse_config(["--algo", "grpo"])))),
             "w_clip": 3.0}
    config.check_resumable(config.parse_config(["--algo", "grpo"]), saved)  # grpo reads no w_clip
    with pytest.raises(SystemExit, match="--w-clip 20.0 \\(was 3.0\\)"):
        config.check_resumable(config.parse_config(["--algo", "dar"]), {**saved, "algo": "dar"})


# ---------------------------------------------------------------------------------------------------
# Flags dar.py does not know, and values with a near miss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--learning-rate", "1e-6"], "unrecognized argument --learning-rate: TRL's learning_rate is --lr here"),
    (["--num_generations", "8"], "TRL's num_generations is --k here"),
    (["--alhpa", "0.2"], "unrecognized arguments: --alhpa 0.2 (did you mean --alpha?)"),
    (["--no-such-flag"], "unrecognized argument: --no-such-flag (python dar.py --help lists every flag)"),
])
def test_an_unknown_flag_is_one_line_that_names_the_right_one(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_config(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    assert len(err.strip().splitlines()) == 2  # argparse's short usage line, then the error: no 60-line usage


@pytest.mark.parametrize("argv, message", [
    (["--task", "toyy"], "unknown --task 'toyy' (did you mean toy?)"),
    (["--judge", "toy-gold"], "unknown --judge 'toy-gold' (did you mean toy_gold?)"),
    (["--minibatch", "48"], "--online-batch 256 must be a multiple of --minibatch 48, e.g. --minibatch 16"),
])
def test_a_bad_value_names_the_fix(argv, message):
    assert message in refusal(*argv)


# ---------------------------------------------------------------------------------------------------
# Small data sets: the split flags, and the note at the start
# ---------------------------------------------------------------------------------------------------
def forty_prompts(tmp_path):
    path = tmp_path / "forty.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question number {i}"}) + "\n" for i in range(40)))
    return str(path)


def test_the_split_fractions_set_how_many_prompts_are_held_out(tmp_path):
    path = forty_prompts(tmp_path)
    t = tasks.load_task("custom", path)
    assert (len(t.eval_prompts), len(t.valid_prompts), len(t.train_prompts)) == (2, 2, 36)  # 5% each, rounded
    t = tasks.load_task("custom", path, eval_fraction=0.25, valid_fraction=0.2)
    assert (len(t.eval_prompts), len(t.valid_prompts), len(t.train_prompts)) == (10, 6, 24)
    assert not set(t.eval_prompts) & set(t.train_prompts) and not set(t.valid_prompts) & set(t.train_prompts)


def test_a_small_evaluation_or_validation_set_is_named_at_the_start(tmp_path, capsys):
    path = forty_prompts(tmp_path)
    args = ["--task", "custom", "--data", path, "--model", PI0, "--judge", "vader", "--eval-every", "5"]
    loop.report_small_splits(config.parse_config(args), tasks.load_task("custom", path))
    out = capsys.readouterr().out
    assert ("note: the evaluation against pi_0 will use 2 prompts (beside 38 training prompts), too few for its win "
            "rate to say much; held out by --eval-fraction 0.05: raise it") in out
    assert "--eval-every and the best checkpoint will use 2 validation prompts (--valid-fraction 0.05 of 38" in out
    loop.report_small_splits(config.parse_config(args + ["--eval-every", "0", "--eval-prompts", "2"]),
                             tasks.load_task("custom", path))
    assert capsys.readouterr().out == ""  # two prompts asked for, two there: nothing to say
    loop.report_small_splits(config.parse_config([]), tasks.load_task("toy"))
    assert capsys.readouterr().out == ""


def test_the_sample_table_shows_the_end_of_the_users_last_turn(capsys):
    talk = [{"role": "user", "content": "An old question nobody reads."}, {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "A long last message, whose end is what the response answers: 'ab cd'?"}]
    long_reply = "word " * 40
    infra.print_samples([dict(prompt=rollout.plain_dialogue(talk), response=long_reply, reward=1.5),
                         dict(prompt="reverse: kbdha", response="ahdbk", reward=10.0)])
    lines = capsys.readouterr().out.splitlines()
    prompt, response, reward = lines[1].split(" | ")
    assert prompt.strip() == "...s what the response answers: 'ab cd'?" and len(prompt.strip()) == 40
    assert response.strip() == "word word word word word word word wo..." and reward.strip() == "1.50"
    assert "reverse: kbdha" in lines[2] and "| ahdbk " in lines[2]


def test_beta_0_drops_the_kl_penalty_of_grpo_rloo_and_ppo_and_is_refused_where_beta_is_no_penalty():
    for algo in config.KL_PENALTY_ALGOS:
        assert checked("--algo", algo, "--beta", "0").beta == 0  # TRL's GRPO default
    for algo in ("dar", "dao", "dual_ppo", "online_dpo", "dpo"):
        assert refusal("--algo", algo, "--beta", "0") == ("error: --beta must be > 0, got 0.0 (0, no KL term, is "
                                                          "allowed for ppo, rloo, grpo)")


def test_the_paper_grids_flags_pass_for_every_algorithm_they_run():
    """train.sh gives every algorithm of a grid the same infrastructure flags (--rollout vllm, offline ones too)."""
    for algo in ("dpo", "simpo", "online_dpo", "ipo", "slic", "ppo", "rloo", "grpo", "dar", "iter_sft"):
        checked("--task", "helpful", "--model", PI0, "--judge-url", "http://annotator/v1", "--algo", algo,
                "--seed", "1", "--rollout", "vllm", "--out-dir", "runs/table2/x", "--resume")


# ---------------------------------------------------------------------------------------------------
# Numbers out of range: refused before anything loads, naming the flag and the valid range
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--keep-checkpoints", "-100"], "--keep-checkpoints must be >= 1 (the newest checkpoint is the one --resume "
                                     "continues from), got -100"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (["--seed", "-5"], "--seed must lie in [0, 4294967295] (rank r seeds with it + 1000 r, and numpy takes seeds "
                       "below 2**32; 1 rank here), got -5"),
    (["--seed", str(2**32)], "--seed must lie in [0, 4294967295]"),
    (["--eval-seed", "-1"], "--eval-seed must lie in [0, 4294967295]"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr=-1e-5"], "--lr must be > 0, got -1e-05"),
    (["--sft-lr", "0"], "--sft-lr must be > 0, got 0.0"),
    (["--sft-steps", "0"], "--sft-steps must be >= 1, got 0"),
    (["--print-every", "0"], "--print-every must be >= 1, got 0"),
    (["--sample-every", "-1"], "--sample-every must be >= 1, got -1"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0 (0 = no clipping), got -1.0"),
    (["--algo", "ppo", "--vf-coef", "0"], "--vf-coef must be > 0, got 0.0"),
    (["--algo", "ppo", "--value-clip", "-0.2"], "--value-clip must be > 0, got -0.2"),
    (["--algo", "ppo", "--gae-lambda", "1.5"], "--gae-lambda must lie in [0, 1], got 1.5"),
    (["--algo", "ppo", "--gamma", "-0.1"], "--gamma must lie in [0, 1], got -0.1"),
    (["--algo", "ppo", "--missing-eos-penalty", "-1"], "--missing-eos-penalty must be >= 0 (0 = none), got -1.0"),
    (["--algo", "simpo", "--simpo-gamma", "-1"], "--simpo-gamma must be >= 0 (SimPO's target reward margin)"),
    (["--resume", "--overwrite"], "--resume continues the run in --out-dir, --overwrite moves it aside to start a new "
                                  "one: give one of them"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000 leaves no room in the model's context window of 512 "
                                     "tokens; lower it (at most 511)"),
    (["--max-new-tokens", "400", "--max-prompt-tokens", "200"], "--max-prompt-tokens 200 plus --max-new-tokens 400 "
                                                                "leave no room in the model's context window of 512 "
                                                                "tokens; lower one of them (together at most 512)"),
])
def test_a_number_out_of_range_is_refused_naming_the_flag_and_its_range(argv, message):
    assert message in refusal(*argv)


def test_the_ranges_edges_pass_and_the_seeds_range_shrinks_with_the_ranks():
    cfg = checked("--keep-checkpoints", "1", "--seed", str(2**32 - 1), "--max-new-tokens", "511", "--lr", "1e-9",
                  "--max-grad-norm", "0")
    assert cfg.seed == 2**32 - 1 and cfg.keep_checkpoints == 1
    cfg = config.parse_config(["--seed", str(2**32 - 1000)])  # rank 1 would seed numpy with 2**32
    with pytest.raises(SystemExit, match=r"--seed must lie in \[0, 4294966295\] .*2 ranks here"):
        config.check_config(cfg, 2)
    config.check_config(config.parse_config(["--seed", str(2**32 - 1001)]), 2)


def model_config_only(path, **fields):
    """A model directory holding a config.json and nothing else: no weights, no tokenizer, nothing to load."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2", **fields}, f)
    return str(path)


def test_max_new_tokens_is_checked_against_the_window_of_the_models_config_json_alone(tmp_path):
    """The window comes from config.json (the directory has nothing else to load): max_position_embeddings, a
    multimodal model's in text_config, capped at vLLM's 8192 with --rollout vllm."""
    small = model_config_only(tmp_path / "small", max_position_embeddings=64)
    assert refusal("--model", small, "--max-new-tokens", "64") == (
        "error: --max-new-tokens 64 leaves no room in the model's context window of 64 tokens; lower it (at most 63)")
    assert checked("--model", small, "--max-new-tokens", "63").max_new_tokens == 63
    nested = model_config_only(tmp_path / "nested", text_config={"max_position_embeddings": 128})
    assert "context window of 128 tokens" in refusal("--model", nested, "--max-new-tokens", "200")
    long = model_config_only(tmp_path / "long", max_position_embeddings=32768)
    checked("--model", long, "--max-new-tokens", "9000")
    assert "context window of 8192 tokens" in refusal("--model", long, "--max-new-tokens", "9000", "--rollout", "vllm")
