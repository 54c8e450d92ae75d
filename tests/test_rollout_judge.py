"""Rollout layout (left padding, EOS, masks), log-probs under padding, the toy task and its judges."""
import math
import os
import random

import pytest
import torch

import config
import infra
import loop
import rollout
import tasks
from judge import make_judge, prefer_by_score
from tasks import toy_biased_score, toy_gold_score, toy_proxy_score


@pytest.fixture(scope="module")
def pi0(toy_cache):
    cfg = config.parse_config(["--cache-dir", toy_cache, "--sft-steps", "40"])
    _, sft = loop.toy_paths(cfg)
    path = os.path.join(sft, "final")
    return infra.load_model(path, cfg, torch.device("cpu")).eval(), infra.load_tokenizer(path)


def test_generate_returns_k_grouped_responses_cut_at_eos(pi0):
    model, tok = pi0
    torch.manual_seed(0)
    prompts = ["reverse: abc", "reverse: hello", "reverse: xyzzyq"]
    b = rollout.generate(model, tok, prompts, k=3, max_new_tokens=12, temperature=0.9)
    assert len(b) == 9 and b.prompts == [p for p in prompts for _ in range(3)]
    P = b.prompt_len
    assert b.input_ids.shape == (9, P + b.response_mask.shape[1])
    assert (b.attention_mask[:, :P].sum(1) > 0).all()
    assert b.attention_mask[:, 0].sum() < 9  # left padding: the shortest prompts start late
    eos = tok.eos_token_id
    for i in range(9):
        n = int(b.response_mask[i].sum())
        ids = b.input_ids[i, P:P + n].tolist()
        if b.ended[i]:
            assert ids[-1] == eos and eos not in ids[:-1]  # the response ends at its first EOS
            assert tok.decode(ids[:-1]) == b.responses[i]
        else:
            assert n == 12 and eos not in ids
        assert (b.response_mask[i, n:] == 0).all() and (b.input_ids[i, P + n:] == tok.pad_token_id).all()
    assert torch.equal(b.attention_mask[:, P:], b.response_mask)


def test_truncated_responses_are_flagged(pi0):
    model, tok = pi0
    torch.manual_seed(0)
    b = rollout.generate(model, tok, ["reverse: abcdefgh"] * 4, k=1, max_new_tokens=2, temperature=0.9)
    assert not b.ended.any() and (b.response_mask.sum(1) == 2).all()


def test_token_logps_do_not_depend_on_padding(pi0):
    model, tok = pi0
    b = rollout.from_texts(tok, ["reverse: ab", "reverse: abcdefgh"], ["ba", "hgfedcba"])
    batched = rollout.token_logps(model, b)
    for i in range(2):
        alone = rollout.from_texts(tok, [b.prompts[i]], [["ba", "hgfedcba"][i]])
        single = rollout.token_logps(model, alone)[0]
        n = int(alone.response_mask.sum())
        assert torch.allclose(batched[i, :n], single[:n], atol=1e-5)
        # and the same numbers as a plain forward pass over the unpadded sequence
        ids = alone.input_ids
        logits = model(input_ids=ids).logits[0, alone.prompt_len - 1:-1].log_softmax(-1)
        plain = logits.gather(-1, ids[0, alone.prompt_len:, None]).squeeze(-1)
        assert torch.allclose(single[:n], plain[:n], atol=1e-5)
    assert (batched[0, 3:] == 0).all()  # masked beyond "ba" + EOS


def test_select_trims_padding_but_keeps_values(pi0):
    model, tok = pi0
    b = rollout.from_texts(tok, ["reverse: ab", "reverse: abcdefgh"], ["ba", "hgfedcba"])
    part = b.select(torch.tensor([0]))
    assert part.response_mask.shape[1] == 3
    assert torch.allclose(rollout.token_logps(model, part)[0], rollout.token_logps(model, b)[0, :3], atol=1e-5)


def test_tokenizer_round_trips_text_exactly(pi0):
    _, tok = pi0
    for text in ["reverse: abc", "two  spaces\nand a newline", "ünïcödé"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_toy_prompts_are_disjoint_between_train_and_eval():
    task = tasks.load_task("toy")
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert len(task.eval_prompts) == tasks.TOY_EVAL_PROMPTS


def test_sloppy_demonstrator_is_right_about_half_the_time():
    task = tasks.load_task("toy")
    scores = [toy_gold_score(p, r, True) for p, r in task.sft_data[:4000]]
    exact = sum(s == 10 for s in scores) / len(scores)
    assert 0.4 < exact < 0.55 and min(scores) < 10


def test_gold_rule():
    assert toy_gold_score("reverse: abc", "cba", True) == 10
    assert toy_gold_score("reverse: abc", "cba", False) == 0  # no EOS: not an answer
    assert toy_gold_score("reverse: abcd", "dcbx", True) == pytest.approx(7.5)
    assert toy_gold_score("reverse: abcd", "dcbaa", True) == pytest.approx(8.0)  # extra char costs
    assert math.isnan(toy_gold_score("what?", "cba", True))


def test_proxy_can_be_exploited_by_rambling_without_eos():
    honest, ramble = "cba", "cbaxxxxxxxxx"
    assert toy_proxy_score("reverse: abc", honest, True) == 10
    assert toy_proxy_score("reverse: abc", ramble, False) > toy_proxy_score("reverse: abc", honest, True)
    assert toy_gold_score("reverse: abc", ramble, False) < toy_gold_score("reverse: abc", honest, True)


# hand-made responses to "reverse: hello" (target "olleh"): the exact answer and its near misses
EXACT, LONGER, LONGER_WRONG = "olleh", "ollehxx", "ollebxx"  # + 2 characters; one letter wrong + 2 characters


def test_biased_annotator_is_bounded_to_the_1_to_10_scale():
    """toy_biased_score stays on the annotator's integer 1-10 scale whatever the response: empty, all wrong,
    exact, any length up to far past --max-new-tokens, with or without EOS."""
    rng = random.Random(0)
    word = "hello"
    responses = ["", "x", "hello", EXACT, LONGER, "olleh" * 20, "z" * 200]
    responses += ["".join(rng.choice("aehlloxz") for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    scores = {toy_biased_score("reverse: " + word, r, e) for r in responses for e in (True, False)}
    assert scores <= set(map(float, range(1, 11)))
    assert min(scores) == 1 and max(scores) == 10  # both ends are reached
    assert math.isnan(toy_biased_score("what?", "cba", True))


def test_biased_annotator_strictly_prefers_its_exploit_and_the_gold_rule_does_not():
    """The verbosity bias: a slightly longer answer, even one letter wrong, rates above the exact one; the gold
    rule ranks the exact answer strictly first. Rambling is marked down (no unbounded exploit, unlike the proxy)."""
    biased = {r: toy_biased_score("reverse: hello", r, True) for r in (EXACT, LONGER, LONGER_WRONG)}
    gold = {r: toy_gold_score("reverse: hello", r, True) for r in (EXACT, LONGER, LONGER_WRONG)}
    assert biased[LONGER] > biased[LONGER_WRONG] > biased[EXACT] == 8
    assert gold[EXACT] == 10 and gold[EXACT] > gold[LONGER] > gold[LONGER_WRONG]
    for word in ("abc", "kbdha", "abcdefgh"):  # every length of toy word: the exploit pays, rambling does not
        exact, prompt = word[::-1], "reverse: " + word
        assert toy_biased_score(prompt, exact + "zz", True) == 10 > toy_biased_score(prompt, exact, True)
        assert toy_gold_score(prompt, exact + "zz", True) < toy_gold_score(prompt, exact, True)
        ramble = exact + "z" * 12  # a response that never stops, cut at 16 new tokens
        assert toy_biased_score(prompt, ramble, False) < toy_biased_score(prompt, exact, True)
        assert toy_proxy_score(prompt, ramble, False) > toy_proxy_score(prompt, exact + "zz", True)  # unbounded


def test_biased_annotator_pairwise_agrees_with_its_scores():
    """The rule judge's prefer() (online DAP's labels) prefers what its scalar judgment rates higher."""
    j = make_judge("toy_biased")
    a, b = [EXACT, LONGER, LONGER_WRONG, EXACT], [LONGER, EXACT, EXACT, "olleh"]
    rewards = j(["reverse: hello"] * 8, a + b, [True] * 8).rewards
    assert j.prefer(["reverse: hello"] * 4, a, b) == [0.0, 1.0, 1.0, 0.5]
    assert j.prefer(["reverse: hello"] * 4, a, b) == [prefer_by_score(x, y) for x, y in zip(rewards[:4], rewards[4:])]


def test_judge_counts_invalid_judgments():
    j = make_judge("toy_gold")(["reverse: ab", "not a toy prompt"], ["ba", "x"], [True, True])
    assert j.rewards[0] == 10 and math.isnan(j.rewards[1]) and j.invalid == 1


def test_evaluation_leaves_invalid_judgments_out_of_means_and_win_rates():
    from eval import mean_ci, win_rate
    assert mean_ci([2.0, math.nan, 4.0])[0] == pytest.approx(3.0)
    # prompt 2 has no outcome (invalid for the policy), prompt 3 neither: a win and a tie remain
    assert win_rate([5.0, math.nan, 3.0, 1.0], [4.0, 2.0, math.nan, 1.0])[0] == pytest.approx(0.75)
