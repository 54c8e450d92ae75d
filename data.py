"""The data sets: reading files (JSONL, optionally gzipped, parquet, a saved `datasets` directory) and the
Hugging Face Hub, rows to examples, and the splits into training, validation and evaluation prompts.

An example is a tuple whose first item says what it is:
  ("prompt", prompt, columns)           a prompt and the data set's other columns of its row (--task custom)
  ("sft", prompt, response)             a demonstration (also the reference of an eval prompt)
  ("pref", prompt, chosen, rejected)    a preference pair
  ("rated", prompt, response, score)    a HelpSteer2 response and its helpfulness (tasks.helpsteer2_pairs)
A row that breaks its schema (missing field, wrong type) stops the run naming the file, the line (the row for
parquet and `datasets`) and the field. A row that fits the schema but whose text cannot be made into a prompt
ending with the user's turn is skipped and counted (a note names the first one).

The schema of --task custom, your own prompts (one row per prompt; `prompt` or `messages` is required):
  prompt     the user message (a string), or chat turns [{"role", "content"}, ...] ending with the user's
  messages   chat turns (system first, if any; then user and assistant); if the last is the assistant's, it is
             the reference response and the prompt is the turns before it
  reference  a reference response (a string): a demonstration for --algo sft, and the reference of an eval
             prompt in the golden protocol
  chosen, rejected  a preference pair for dpo / simpo / is_dpo: strings, or chat turns ending with the response
  any other column  kept per prompt in tasks.Task.columns, for reward functions
"""
import glob
import gzip
import hashlib
import json
import os

import huggingface_hub

# share of a single --data file's distinct prompts held out for evaluation (the data sets' own test splits are ~5%)
EVAL_FRACTION = 0.05
# validation prompts (for the best checkpoint) held out of the training prompts: this share, at most this many
VALID_FRACTION, VALID_MAX = 0.05, 1000


# ---------------------------------------------------------------------------------------------------
# Fields of a row
# ---------------------------------------------------------------------------------------------------
class RowError(Exception):
    """The row does not fit the data set's schema: the run stops, naming file and line."""


class SkipRow(Exception):
    """The row fits the schema but yields no usable prompt: it is skipped and counted."""


def text_field(row, name):
    if name not in row:
        raise RowError(f"missing field {name!r} (fields present: {', '.join(map(str, row)) or 'none'})")
    if not isinstance(row[name], str):
        raise RowError(f"field {name!r} should be a string, got {json_type(row[name])}")
    return row[name]


def number_field(row, name):
    if name not in row:
        raise RowError(f"missing field {name!r} (fields present: {', '.join(map(str, row)) or 'none'})")
    x = row[name]
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise RowError(f"field {name!r} should be a number, got {json_type(x)}")
    return x


def final_reply(row, name):
    """The last message's content of a TRL-style message list [{"role", "content"}, ..., assistant]."""
    if name not in row:
        raise RowError(f"missing field {name!r} (fields present: {', '.join(map(str, row)) or 'none'})")
    msgs = row[name]
    ok = (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   and isinstance(m.get("content"), str) for m in msgs))
    if not ok or msgs[-1]["role"] != "assistant":
        raise RowError(f"field {name!r} should be a list of {{\"role\", \"content\"}} messages ending with the "
                       f"assistant's reply, got {json_type(msgs)}")
    return msgs[-1]["content"].strip()


def json_type(x):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number" if isinstance(x, (int, float)) else type(x).__name__)


# ---------------------------------------------------------------------------------------------------
# --task custom: the schema in this file's docstring
# ---------------------------------------------------------------------------------------------------
CUSTOM_FIELDS = ("prompt", "messages", "reference", "chosen", "rejected")  # the rest go to Task.columns
ROLES = ("system", "user", "assistant")


def chat_turns(row, name):
    """Field name as a list of {"role", "content"} turns (other keys dropped): roles user and assistant, and
    system as the first turn only."""
    turns = row[name]
    if not (isinstance(turns, list) and turns and all(isinstance(m, dict) for m in turns)):
        raise RowError(f"field {name!r} should be {'' if name == 'messages' else 'a string or '}a list of "
                       f"{{\"role\", \"content\"}} chat turns, got "
                       f"{json_type(turns)}{' (empty)' if turns == [] else ''}")
    for i, m in enumerate(turns):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RowError(f"field {name!r} turn {i + 1}: needs a role ({', '.join(ROLES)}) and a string content, "
                           f"got role {m.get('role')!r} and content {json_type(m.get('content'))}")
        if m["role"] == "system" and i > 0:
            raise RowError(f"field {name!r} turn {i + 1}: a system turn may only come first")
    return [{"role": m["role"], "content": m["content"]} for m in turns]


def user_prompt(turns, name):
    if not turns or turns[-1]["role"] != "user":
        raise RowError(f"field {name!r}: the prompt's turns must end with the user's turn, got "
                       f"{turns[-1]['role'] + ' last' if turns else 'none'}")
    return turns


def response_field(row, name):
    """A response: a string, or chat turns whose last is the assistant's (its content); None when absent."""
    x = row.get(name)
    if x is None or isinstance(x, str):
        return x
    turns = chat_turns(row, name)
    if turns[-1]["role"] != "assistant":
        raise RowError(f"field {name!r}: a response given as chat turns must end with the assistant's turn")
    return turns[-1]["content"]


def custom_examples(row):
    """One row of --task custom -> its examples: the prompt with its other columns, then a demonstration
    (reference) and a preference pair where the row gives them."""
    if row.get("prompt") is not None:
        p = row["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise RowError("field 'prompt' is empty")
            prompt = p
        else:
            prompt = user_prompt(chat_turns(row, "prompt"), "prompt")
        reference = None
    elif row.get("messages") is not None:
        turns = chat_turns(row, "messages")
        reference = turns.pop()["content"] if turns[-1]["role"] == "assistant" else None
        prompt = user_prompt(turns, "messages")
    else:
        raise RowError(f"no 'prompt' and no 'messages' field: one is needed (fields present: "
                       f"{', '.join(map(str, row)) or 'none'})")
    if row.get("prompt") is not None and row.get("messages") is not None:  # TRL's SFT sets: prompt + messages
        turns = chat_turns(row, "messages")
        reference = turns[-1]["content"] if turns[-1]["role"] == "assistant" else None
    reference = response_field(row, "reference") if row.get("reference") is not None else reference
    chosen, rejected = response_field(row, "chosen"), response_field(row, "rejected")
    if (chosen is None) != (rejected is None):
        raise RowError(f"field {'rejected' if chosen is not None else 'chosen'!r} is missing: a preference pair "
                       "needs both 'chosen' and 'rejected'")
    out = [("prompt", prompt, {k: v for k, v in row.items() if k not in CUSTOM_FIELDS})]
    if reference is not None:
        out.append(("sft", prompt, reference))
    if chosen is not None and chosen != rejected:
        out.append(("pref", prompt, chosen, rejected))
    return out


# ---------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------
def read_examples(path, parse, columns, what):
    """{split: examples} of one file (one split, '') or saved `datasets` directory (its train and test or
    validation splits); parse(row) -> examples; columns: the ones parse reads (None: all). what: the task, for
    the error when nothing is usable."""
    unit = "line" if not (path.endswith(".parquet") or os.path.isdir(path)) else "row"
    out = {}
    for split, rows in read_rows(path, columns).items():
        where = f"{path} split {split}" if split else path
        examples, skipped = [], []
        for n, row in rows:
            try:
                examples += parse(row)
            except RowError as e:
                raise SystemExit(f"error: {where} {unit} {n}: {e}")
            except SkipRow as e:
                skipped.append((n, e))
        if skipped:
            n, why = skipped[0]
            print(f"note: {where}: skipped {len(skipped)} of {len(rows)} {unit}s with no usable prompt "
                  f"(first: {unit} {n}: {why})", flush=True)
        if not examples:
            raise SystemExit(f"error: {where}: no usable {unit}s for {what}")
        out[split] = examples
    return out


def read_train_eval(data, parse, columns, what, eval_fraction=EVAL_FRACTION):
    """(train, eval) examples of --data: FILE (eval_fraction of its prompts held out by split_by_prompt),
    TRAIN_FILE,EVAL_FILE, or a saved DatasetDict with a train and a test (else validation) split."""
    files = data.split(",")
    if len(files) > 2 or not all(files):
        raise SystemExit(f"error: --data {data!r}: give one file, or two as TRAIN_FILE,EVAL_FILE")
    first = read_examples(files[0], parse, columns, what)
    if len(files) == 2:
        second = read_examples(files[1], parse, columns, what)
        if len(first) > 1 or len(second) > 1:
            raise SystemExit(f"error: --data {data!r}: {files[0] if len(first) > 1 else files[1]} is a DatasetDict "
                             "with its own train and test splits; give it alone as --data DIR")
        return first[""], second[""]
    if len(first) == 2:
        return tuple(first.values())
    return split_by_prompt(next(iter(first.values())), source=files[0], fraction=eval_fraction)


def read_jsonl(path):
    """[(line number, object)] of a JSON-lines file, gzipped or not (told by its first bytes); blank lines
    are allowed. Anything else stops with the file, the line and what is wrong."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --data {path!r}: no such file")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    rows = []
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise SystemExit(f"error: {path} line {n}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                                     f"column {e.start + 1}); the file must be UTF-8 encoded JSON lines")
                line = line.rstrip("\r\n")  # a line cut short is then reported at its own last column
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path} line {n} column {e.colno}: bad JSON ({e.msg}); each line must be "
                                     "one JSON object")
                if not isinstance(row, dict):
                    raise SystemExit(f"error: {path} line {n}: expected a JSON object, got {json_type(row)}")
                rows.append((n, row))
    except (OSError, EOFError) as e:  # a damaged gzip stream
        raise SystemExit(f"error: {path}: cannot be read as {'gzipped ' if gzipped else ''}JSON lines ({e})")
    if not rows:
        raise SystemExit(f"error: {path}: the file is empty (no JSON lines)")
    return rows


def read_parquet(path, columns=None):
    """[(row number, dict of the columns that exist)] of a parquet file (columns None: all of them)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --data {path!r}: no such file")
    try:
        import pyarrow.parquet as pq  # optional: only parquet files need it (requirements.txt installs it)
    except ImportError:
        raise SystemExit(f"error: reading {path} needs pyarrow (pip install pyarrow)")
    try:
        f = pq.ParquetFile(path)
        table = f.read(columns=None if columns is None else [c for c in columns if c in f.schema_arrow.names])
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged or foreign file
        raise SystemExit(f"error: {path}: not a readable parquet file ({type(e).__name__}: {e})")
    if table.num_rows == 0:
        raise SystemExit(f"error: {path}: the file is empty (no rows)")
    return list(enumerate(table.to_pylist(), 1))



def read_saved_dataset(path, columns):
    """{split: [(row number, row)]} of a directory written by datasets' save_to_disk: a Dataset (split ''), or a
    DatasetDict's train split and its test (else validation) split."""
    try:
        import datasets  # optional: only a saved `datasets` directory needs it (make test installs it)
    except ImportError:
        raise SystemExit(f"error: --data {path!r} is a directory; reading a saved `datasets` directory needs the "
                         "datasets package (pip install datasets), or give a JSONL or parquet file")
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # FileNotFoundError for a directory save_to_disk did not write, and whatever else
        raise SystemExit(f"error: --data {path!r}: not a directory written by datasets' save_to_disk "
                         f"({type(e).__name__}: {e})")
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise SystemExit(f"error: --data {path!r}: the DatasetDict has no 'train' split (its splits: "
                             f"{', '.join(ds)}); give a Dataset, or name the splits train and test")
        picked = {s: ds[s] for s in ["train"] + [s for s in ("test", "validation") if s in ds][:1]}
    else:
        picked = {"": ds}
    out = {}
    for split, d in picked.items():
        keep = d.column_names if columns is None else [c for c in columns if c in d.column_names]
        if d.num_rows == 0:
            raise SystemExit(f"error: {path}{f' split {split}' if split else ''}: the data set is empty (no rows)")
        out[split] = list(enumerate(d.select_columns(keep).to_list(), 1))
    return out


def read_rows(path, columns=None):
    """{split: [(line or row number, row)]} of --data PATH: a saved `datasets` directory (its splits), else one
    split '' of a parquet file or JSON lines. columns: the ones to read from parquet and `datasets` (None: all)."""
    if os.path.isdir(path):
        return read_saved_dataset(path, columns)
    return {"": read_parquet(path, columns) if path.endswith(".parquet") else read_jsonl(path)}


# ---------------------------------------------------------------------------------------------------
# The Hugging Face Hub, and the splits
# ---------------------------------------------------------------------------------------------------
def hub_failure(repo, what, e):
    return SystemExit(f"error: could not get {what} of the data set {repo} from the Hugging Face Hub "
                      f"({type(e).__name__}: {e}). Without access to the Hub, pass --data PATH: a local JSONL "
                      f"(.gz) or parquet file in that data set's schema (or TRAIN_FILE,EVAL_FILE).")


def hub_file(repo, filename):
    try:
        return huggingface_hub.hf_hub_download(repo, filename, repo_type="dataset")
    except Exception as e:  # no network, unknown repo or file, gated access, ...: all end in the same advice
        raise hub_failure(repo, filename, e)


def hub_files(repo, prefix):
    """Every parquet shard of one split (names like data/train-00000-of-00002.parquet), downloaded (or found
    in the cache when HF_HUB_OFFLINE=1)."""
    try:
        root = huggingface_hub.snapshot_download(repo, repo_type="dataset", allow_patterns=[prefix + "*.parquet"])
    except Exception as e:
        raise hub_failure(repo, f"the files {prefix}*.parquet", e)
    names = sorted(glob.glob(os.path.join(root, glob.escape(prefix) + "*.parquet")))
    if not names:
        raise SystemExit(f"error: the data set {repo} on the Hub has no {prefix}*.parquet files; pass --data PATH")
    return names



def prompt_key(prompt):
    """A hashable, exact identity of a prompt (a str or a conversation)."""
    if isinstance(prompt, str):
        return "s:" + prompt
    return "c:" + json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def split_by_prompt(examples, source="", fraction=EVAL_FRACTION):
    """Split one file's examples into (train, eval) by prompt: the `fraction` of its distinct prompts (at
    least one) with the smallest SHA-256 of prompt_key are held out, with every example of those prompts.
    Deterministic in the file's content, independent of line order and of any seed."""
    keys = list(dict.fromkeys(prompt_key(ex[1]) for ex in examples))
    if len(keys) < 2:
        raise SystemExit(f"error: {source}: needs at least 2 distinct prompts to hold some out for evaluation")
    digest = {k: hashlib.sha256(k.encode("utf-8")).hexdigest() for k in keys}
    held = set(sorted(keys, key=digest.get)[:max(1, round(fraction * len(keys)))])
    return ([ex for ex in examples if prompt_key(ex[1]) not in held],
            [ex for ex in examples if prompt_key(ex[1]) in held])


def hash_rank(keys, salt):
    """keys sorted by the SHA-256 of salt + key: a pseudo-random order that depends only on the keys and the
    salt (not on their order in a file, nor on Python's random module)."""
    return sorted(keys, key=lambda k: hashlib.sha256((salt + k).encode("utf-8")).hexdigest())


def random_subset(prompts, n, seed, references=None):
    """(prompts, references or None): a seeded random subset of n prompts (all when there are no more), in their
    order in the list: the n whose salted hash of prompt_key ranks first. One seed picks the same prompts wherever
    it is used (dar.py's end-of-run report, eval.py), and a larger n keeps the smaller n's prompts."""
    keys = [prompt_key(p) for p in prompts]
    chosen = set(hash_rank(set(keys), f"eval-subset:{seed}:")[:n])
    idx = [i for i, k in enumerate(keys) if k in chosen][:n]
    return [prompts[i] for i in idx], [references[i] for i in idx] if references else None


def make_valid_split(train, fraction=VALID_FRACTION):
    """(train, validation prompts): `fraction` of the distinct training prompts (rounded, at most VALID_MAX;
    none from 10 or fewer) whose SHA-256 of "valid:" + prompt_key ranks first, removed with every example of
    theirs (demonstrations, pairs), so they are in no training list. Deterministic in the data alone."""
    keys = list(dict.fromkeys(prompt_key(ex[1]) for ex in train))
    held = set(hash_rank(keys, "valid:")[:min(VALID_MAX, round(fraction * len(keys)))])
    valid = {prompt_key(ex[1]): ex[1] for ex in train if prompt_key(ex[1]) in held}
    return [ex for ex in train if prompt_key(ex[1]) not in held], list(valid.values())

