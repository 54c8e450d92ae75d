"""Tasks: where prompts, demonstrations and the initial model come from.

The built-in task `toy` lets the whole of DAR run on a CPU in minutes, with nothing downloaded:

  * the prompt asks the assistant to reverse a short lowercase word: "reverse: kbdha" -> "ahdbk";
  * the reward is computed exactly by a rule (judge.py: `toy_gold_score`), and a second, length-biased
    scorer stands in for an imperfect LLM annotator (judge.py: `toy_proxy_score`);
  * the model is a tiny Qwen2 (same architecture class as Qwen2-7B) with a byte-level tokenizer and a
    chat template, built here and saved as an ordinary Hugging Face directory;
  * pi_0 is that model after SFT on *imperfect* demonstrations (a sloppy demonstrator is right only
    about half the time), so pi_0 is decent but clearly improvable, which is what RLHF starts from.

The paper's tasks (TL;DR, Anthropic HH, HelpSteer2) read prompts from files and arrive with the HTTP
annotator (a later issue); they plug in through `load_task`.
"""
import os
import random
from dataclasses import dataclass

TASKS = ("toy",)

# Settings per task over Config's defaults (generation length, judge, ...), and per (task, algorithm) where
# the paper's setting depends on both (Appendix B.1-B.3); dar.parse_config layers them under the flags.
TASK_DEFAULTS = {"toy": {}}
TASK_ALGO_DEFAULTS = {}

# ---------------------------------------------------------------------------------------------------
# The toy task's definition (part of the task, not tunable: changing it changes the task)
# ---------------------------------------------------------------------------------------------------
TOY_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TOY_MIN_LEN, TOY_MAX_LEN = 3, 8
TOY_INSTRUCTION = "reverse: "
TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS, TOY_SFT_EXAMPLES, TOY_PREF_PAIRS = 20000, 256, 30000, 10000

# How the sloppy demonstrator answers (probabilities sum to 1): right about half the time, otherwise
# one of four typical mistakes. Each mistake scores below 10 under the gold rule.
TOY_DEMO_MIX = (("correct", 0.45), ("substitute", 0.2), ("copy", 0.15), ("drop", 0.1), ("extra", 0.1))

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Qwen2 small enough to train in minutes on 2 CPU cores. head_dim = 128 / 4 = 32, which vLLM's CPU
# attention accepts (../shared/NOTES.md), so the same model serves the vLLM backend later.
TOY_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, max_position_embeddings=512, tie_word_embeddings=True)


def toy_target(word):
    """The correct response to the toy prompt for `word`."""
    return word[::-1]


def toy_word_of(prompt):
    """Inverse of the prompt format: the word a toy prompt asks to reverse, or None if malformed."""
    if not prompt.startswith(TOY_INSTRUCTION):
        return None
    word = prompt[len(TOY_INSTRUCTION):]
    return word if word and all(c in TOY_ALPHABET for c in word) else None


def _random_word(rng):
    return "".join(rng.choice(TOY_ALPHABET) for _ in range(rng.randint(TOY_MIN_LEN, TOY_MAX_LEN)))


def toy_prompts(n, seed, exclude=()):
    """n distinct prompts, deterministic in seed, none of whose words are in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        w = _random_word(rng)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return [TOY_INSTRUCTION + w for w in out]


def sloppy_demonstration(word, rng):
    """What an imperfect human demonstrator writes for `word` (see TOY_DEMO_MIX)."""
    target = toy_target(word)
    kind = rng.choices([k for k, _ in TOY_DEMO_MIX], weights=[p for _, p in TOY_DEMO_MIX])[0]
    i = rng.randrange(len(target))
    if kind == "substitute":
        return target[:i] + rng.choice(TOY_ALPHABET.replace(target[i], "")) + target[i + 1:]
    if kind == "copy" and word != target:  # a palindrome's copy would be correct: substitute instead
        return word
    if kind in ("copy", "drop"):
        return target[:i] + target[i + 1:]
    if kind == "extra":
        return target + rng.choice(TOY_ALPHABET)
    return target


# ---------------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------------
def build_tokenizer():
    """A byte-level BPE with no merges: one token per byte, plus the chat specials.

    This is the tokenizer that survives transformers' AutoTokenizer round trip for a qwen2 model
    directory exactly (spaces and newlines kept); see ../shared/NOTES.md.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_toy_model(path, seed):
    """Build the tiny Qwen2 with random weights and save it (config, safetensors, tokenizer) at path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    vocab_size = -(-len(tok) // 8) * 8  # round up to a multiple of 8, as real checkpoints do
    config = Qwen2Config(vocab_size=vocab_size, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **TOY_MODEL)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# What the training loop sees
# ---------------------------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    train_prompts: list   # user messages (raw text, no chat template) to sample online batches from
    eval_prompts: list    # held out: never in train_prompts
    sft_data: list        # [(prompt, response)] demonstrations for --algo sft
    pref_data: list       # [(prompt, chosen, rejected)] for the offline preference methods (dpo, simpo, is_dpo)


def load_task(name, data=""):
    if name != "toy":
        raise SystemExit(f"error: unknown --task {name!r}; valid tasks: {', '.join(TASKS)}")
    # Data depend on the task only (fixed seeds), not on the run's --seed: every algorithm and seed
    # sees the same prompts and starts from the same pi_0.
    train = toy_prompts(TOY_TRAIN_PROMPTS, seed=1)
    evals = toy_prompts(TOY_EVAL_PROMPTS, seed=2, exclude={toy_word_of(p) for p in train})
    rng = random.Random(3)
    sft = [(p, sloppy_demonstration(toy_word_of(p), rng)) for p in rng.choices(train, k=TOY_SFT_EXAMPLES)]
    return Task(name, train, evals, sft, toy_preferences(train, TOY_PREF_PAIRS, seed=4))


def toy_preferences(prompts, n, seed):
    """n preference pairs: two demonstrations of the same prompt by the sloppy demonstrator (the data pi_0
    was fine-tuned on, so roughly pi_0's own samples, as IS-DPO assumes), ranked by the gold rule; pairs
    that tie are drawn again."""
    from judge import toy_gold_score
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = rng.choice(prompts)
        a, b = (sloppy_demonstration(toy_word_of(p), rng) for _ in range(2))
        ra, rb = toy_gold_score(p, a, True), toy_gold_score(p, b, True)
        if ra != rb:
            out.append((p, a, b) if ra > rb else (p, b, a))
    return out

