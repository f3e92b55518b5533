"""Load and validate dialogue files (JSON Lines), including the shipped Socratic set.

    from socratic_lora import load_dialogues, load_split
    train = load_split("train")             # the shipped set; see data/DATASHEET.md (lesson 05)
    mine = load_dialogues("my_dialogues.jsonl")

One dialogue per line: {"id", "topic", "subject", "messages": [{"role", "content"}, ...]}; an
optional system message first, then user and assistant alternate, and the tutor (assistant)
speaks last. The adversarial split adds "answer" (what must not be revealed) and
"answer_aliases". The loader stops at the first problem and names file, line and field.
"""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

SPLITS = ("train", "eval", "adversarial")
ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 1_000_000   # a longer line is almost surely not one dialogue
# Gemma's turn markers and special tokens: in a message's text the tokenizer makes them
# special tokens, and a dialogue would end or start a turn (or the text) in the middle of a
# message, and train on it (an <eos> in a tutor turn teaches the model to stop mid-reply).
MARKERS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>",
           "<start_of_image>", "<end_of_image>")


class DataError(ValueError):
    """A dialogue file that breaks the format; the message says where and what to fix."""


def split_path(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
    return Path(str(files("socratic_lora").joinpath(f"data/dialogues/{split}.jsonl")))


def load_split(split: str) -> list[dict]:
    """The shipped train, eval or adversarial split, validated."""
    return load_dialogues(split_path(split), adversarial=split == "adversarial")


def check_dialogue(d, where: str, adversarial: bool = False) -> None:
    """Raise DataError naming `where` and the field if `d` breaks a rule."""
    def fail(field, problem, fix):
        raise DataError(f"{where}: field '{field}': {problem}; {fix}")

    if not isinstance(d, dict):
        fail("(line)", f"expected a JSON object, got {type(d).__name__}",
             'write one dialogue object per line (JSON Lines): {"id": ..., "messages": [...]}')
    for key in ("id", "topic", "subject"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            fail(key, "missing or empty", f'add "{key}": "..." (a non-empty string)')
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        fail("messages", "missing or empty", 'add "messages": [{"role": "user", ...}, ...]')
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            fail(f, "not an object", 'write {"role": ..., "content": ...}')
        if m.get("role") not in ROLES:
            fail(f"{f}.role", f"{m.get('role')!r} is not a role", "use system, user or assistant")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            fail(f"{f}.content", "missing, empty or only whitespace", "write the message text")
        marker = next((x for x in MARKERS if x in m["content"]), None)
        if marker:
            fail(f"{f}.content", f"contains the special token {marker}, which the tokenizer "
                 "would not read as text (a turn or the text would end mid-message)",
                 "remove it (one message per turn; 特殊トークンは本文に書けません)")
        if m["role"] == "system" and i != 0:
            fail(f"{f}.role", "a system message can only come first", "move it to the start")
    start = 1 if msgs[0]["role"] == "system" else 0
    for i in range(start, len(msgs)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if msgs[i]["role"] != want:
            fail(f"messages[{i}].role", f"{msgs[i]['role']!r} where {want!r} was expected",
                 "user and assistant must alternate, starting with user")
    if msgs[-1]["role"] != "assistant":
        fail(f"messages[{len(msgs) - 1}].role", "the dialogue does not end with the tutor",
             "end with an assistant message (the turn the model learns)")
    if adversarial:
        if not isinstance(d.get("answer"), str) or not d["answer"].strip():
            fail("answer", "missing or empty", "record the answer that must not be revealed")
        aliases = d.get("answer_aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            fail("answer_aliases", "must be a list of strings", 'write e.g. ["十二", "12個"]')


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def read_json_lines(path) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every line of a JSON Lines file; stop at the first
    line that is not one JSON object (empty, not UTF-8, invalid JSON, a key given twice)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError(f"{path}:1: the file starts with a byte order mark (BOM); save it as "
                        "UTF-8 without BOM")
    rows = []
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()   # the newline that ends the last line
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"{where}: line of {len(line):,} bytes (limit {MAX_LINE_BYTES:,}); "
                            "one dialogue per line, is a newline missing?")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 (byte {e.start}); save the file as UTF-8") from None
        if not text.strip():
            raise DataError(f"{where}: empty line; remove it")
        try:
            d = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}; one JSON "
                            "object per line") from None
        except _DuplicateKey as e:
            raise DataError(f"{where}: key {e.args[0]!r} appears twice in one object (JSON would "
                            "silently keep the last value); keep one") from None
        if isinstance(d, list):
            raise DataError(f"{where}: a JSON array, not a dialogue object; write JSON Lines "
                            "(one object per line)")
        if not isinstance(d, dict):
            raise DataError(f"{where}: field '(line)': expected a JSON object, got "
                            f"{type(d).__name__}; write one dialogue object per line (JSON "
                            'Lines): {"id": ..., "messages": [...]}')
        rows.append((n, d))
    if not rows:
        raise DataError(f"{path}: no dialogues in the file; write one dialogue object per line")
    return rows


def load_dialogues(path, adversarial: bool = False) -> list[dict]:
    """Read and validate a JSON Lines dialogue file; stop at the first bad line."""
    path = Path(path)
    dialogues, seen = [], {}
    for n, d in read_json_lines(path):
        where = f"{path}:{n}"
        check_dialogue(d, where, adversarial)
        if d["id"] in seen:
            raise DataError(f"{where}: field 'id': {d['id']!r} already used on line "
                            f"{seen[d['id']]}; ids must be unique")
        seen[d["id"]] = n
        dialogues.append(d)
    return dialogues


def statistics(dialogues: list[dict], tokenizer=None) -> dict:
    """Counts and lengths for a datasheet or a histogram: dialogues, tutor turns, subjects,
    characters per tutor turn and (with a tokenizer) Gemma tokens per rendered dialogue."""
    from collections import Counter

    from .chat import render_chat

    tutor = [m["content"] for d in dialogues for m in d["messages"] if m["role"] == "assistant"]
    chars = sorted(len(t) for t in tutor)
    out = {
        "dialogues": len(dialogues),
        "tutor_turns": len(tutor),
        "subjects": dict(sorted(Counter(d["subject"] for d in dialogues).items())),
        "system_prompts": sum(d["messages"][0]["role"] == "system" for d in dialogues),
        "tutor_chars_mean": sum(chars) / len(chars),
        "tutor_chars_median": chars[len(chars) // 2],
        "tutor_chars_max": chars[-1],
        "ends_with_question": sum(t.rstrip().endswith(("？", "?")) for t in tutor) / len(tutor),
    }
    if tokenizer is not None:
        toks = sorted(len(tokenizer(render_chat(d["messages"]), add_special_tokens=False)["input_ids"])
                      for d in dialogues)
        out.update(tokens_mean=sum(toks) / len(toks), tokens_median=toks[len(toks) // 2],
                   tokens_max=toks[-1], tokens_total=sum(toks))
    return out


# --- lengths in tokens, as a histogram (lesson 05) ----------------------------------------
def token_lengths(dialogues: list[dict], tokenizer) -> list[int]:
    """Tokens per dialogue as training sees them (`tokenize_dialogue`, system folded in)."""
    from .chat import tokenize_dialogue

    return [len(tokenize_dialogue(tokenizer, d["messages"], where=d["id"])["input_ids"])
            for d in dialogues]


def plot_lengths(splits: dict, tokenizer, bins: int = 20, max_length: int | None = None):
    """A matplotlib Figure: histogram of tokens per dialogue, one colour per split
    (`splits` = {"train": dialogues, "eval": dialogues, ...}), with a dashed line at
    `max_length` (the training cut-off) when given. Bin edges are shared by all splits."""
    import matplotlib.pyplot as plt
    import numpy as np

    if not splits:
        raise ValueError("plot_lengths: splits is empty; pass e.g. {'train': load_split('train')}")
    lengths = {name: token_lengths(ds, tokenizer) for name, ds in splits.items()}
    every = [n for ls in lengths.values() for n in ls]
    hi = max(every + ([max_length] if max_length else []))
    edges = np.linspace(0, hi * 1.02, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for name, ls in lengths.items():
        ax.hist(ls, bins=edges, alpha=0.6,
                label=f"{name}: {len(ls)} dialogues, median {int(np.median(ls))}, max {max(ls)}")
    if max_length:
        ax.axvline(max_length, color="black", linestyle="--", linewidth=1,
                   label=f"max_length = {max_length}")
    ax.set_xlabel("tokens per dialogue (Gemma turn format)")
    ax.set_ylabel("dialogues")
    ax.grid(alpha=0.3)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)   # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
