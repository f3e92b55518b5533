"""From dialogue files to tokenised training examples, with the filters of the source write-ups.

    from socratic_lora.prepare import read_source, tokenize_examples
    dialogues = read_source("train")                        # shipped split, a .jsonl, or a dataset
    examples, report = tokenize_examples(tok, dialogues, max_length=1024)   # lesson 05

Sources: the shipped splits by name; a .jsonl (our dialogues, chat rows with `messages`, or
instruction/input/response (or output) rows, the format of dolly-15k-ja that the source
training report used), .csv or .tsv (instruction rows), .json or .parquet; or a dataset
folder (one split of it: see read_source). Every filter returns what it kept and a count of
what it removed and why.
"""
from __future__ import annotations

import bisect
import csv
import io
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .chat import IGNORE, DialogueError, tokenize_dialogue
from .data import (MARKERS, SPLITS, DataError, check_dialogue, load_split,
                   read_json_lines)


@dataclass
class Removed:
    """What a step removed: a count per reason, and the ids of the first few examples."""
    step: str
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    truncated: int = 0          # examples shortened but kept

    def add(self, reason: str, ident: str):
        self.reasons[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(ident)

    @property
    def removed(self) -> int:
        return sum(self.reasons.values())

    def __str__(self):
        why = ", ".join(f"{n} {r}" for r, n in self.reasons.most_common()) or "nothing"
        cut = f", {self.truncated} truncated at a turn boundary" if self.truncated else ""
        return f"{self.step}: kept {self.kept}{cut}, removed {self.removed} ({why})"


def instruction_to_messages(row: dict, where: str, prompt_format: str = "gemma") -> list[dict]:
    """instruction/input/response rows (dolly-15k-ja style) as a user/assistant exchange.
    An empty instruction or response, a value that is not text, or a Gemma turn marker in
    the text is refused, naming `where` and the field."""
    def fail(field, problem, fix):
        raise DialogueError(f"{where}: field '{field}': {problem}; {fix}")

    key = "response" if row.get("response") is not None else "output"
    if row.get("instruction") is None or row.get(key) is None:
        raise DialogueError(f"{where}: needs 'instruction' and 'response' (or 'output') strings")
    texts = {"instruction": row["instruction"], key: row[key],
             "input": "" if row.get("input") is None else row["input"]}
    for name, text in texts.items():
        if not isinstance(text, str):
            fail(name, f"{text!r} is a {type(text).__name__}, not text", "write it as a string")
        if name != "input" and not text.strip():
            fail(name, "empty or only whitespace",
                 "write the text (an empty response would train the model to say nothing)")
        marker = next((m for m in MARKERS if m in text), None)
        if marker:
            fail(name, f"contains the special token {marker}, which the tokenizer would not read as text",
                 "remove it (特殊トークンは本文に書けません)")
    prompt = texts["instruction"].strip()
    if texts["input"].strip():
        header = "\n\n### 入力:\n" if prompt_format == "instruction" else "\n\n"
        prompt += header + texts["input"].strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": texts[key]}]


SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")   # the files read_source reads


def _strict_rows(reader, path):
    """The rows of a strict csv.reader; a quoting error is a DataError naming the line."""
    while True:
        start = reader.line_num + 1           # the line the row begins on
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{start}: {e}; check the quotes: a field holding a "
                            "comma, tab, quote or line break is written in double quotes, and a "
                            'quote inside it is doubled ("")') from None
        yield values


def _csv_rows(path: Path) -> list[tuple]:
    """(file, where, place, row) for every row of a CSV or TSV file, every field as text."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")            # a BOM (as Excel writes) is not data
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {e.start}); save the file as UTF-8") from None
    tab = path.suffix.lower() == ".tsv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tab else ",",
                        strict=True)          # an unclosed or stray quote is an error, not data
    values_of = _strict_rows(reader, path)
    header = next(values_of, None)
    if not header:
        raise DataError(f"{path}:1: no header line; start with the column names, e.g. "
                        "instruction,input,output")
    twice = next((c for c in header if header.count(c) > 1), None)
    if twice is not None:
        raise DataError(f"{path}:1: column {twice!r} appears twice in the header; keep one")
    if "instruction" not in header:
        raise DataError(f"{path}:1: no 'instruction' column (columns: {', '.join(header)}); a "
                        f"{'TSV' if tab else 'CSV'} file holds instruction rows: instruction, "
                        "input (may be empty) and response (or output)")
    rows, start = [], reader.line_num + 1
    for values in values_of:
        where = f"{path}:{start}"
        if not values:
            raise DataError(f"{where}: empty line; remove it")
        if len(values) != len(header):
            raise DataError(f"{where}: {len(values)} fields where the header has {len(header)}; "
                            "put a field that holds the delimiter in double quotes")
        rows.append((str(path), where, f"line {start}", dict(zip(header, values))))
        start = reader.line_num + 1
    return rows


def _file_rows(path: Path) -> list[tuple]:
    """(file, where, place, row) for every row of one data file; place: 'line N' or 'row N'."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; use "
                        f"one of {', '.join(SUFFIXES)}, or a dataset folder")
    if suffix == ".jsonl":        # our reader: file:line, no blank lines or duplicate keys
        return [(str(path), f"{path}:{n}", f"line {n}", d) for n, d in read_json_lines(path)]
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path)
    import datasets

    ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
    return [(str(path), f"{path} row {i}", f"row {i}", row) for i, row in enumerate(ds, 1)]


def _pick_split(path: Path, names: list, split, files: dict | None = None) -> str:
    """The split of a dataset folder that `split` asks for (see read_source)."""
    names = sorted(names)
    if files:
        shown = "; ".join(f"{n}: {', '.join(f.name for f in files[n])}" for n in names)
        fix = ("name the file instead of the folder (train_data: the training file, eval_data: "
               "the held-out file)")
    else:
        shown = ", ".join(names)
        fix = ("write the split you mean to a file of its own (e.g. ds['test'].to_json("
               "'test.jsonl')) and name that file")
    def refuse(problem):
        raise DataError(f"{path}: {problem} (splits: {shown}); {fix} "
                        "(ファイル名で指定してください)")
    # One split: the folder is what the user named, for either role; but not training rows
    # (a train* file, or a saved DatasetDict's train split) to evaluate on.
    named_train = names == ["train"] and (files is None or any(
        f.name.lower().startswith("train") for f in files["train"]))
    if len(names) == 1 and not (split == "eval" and named_train):
        return names[0]
    if split is None:
        refuse("a dataset folder with several splits, which one to read is ambiguous")
    if split == "eval":
        held_out = [n for n in names if n in ("test", "validation")]
        if len(held_out) != 1:
            refuse("both a test and a validation split" if held_out
                   else "no test or validation split to evaluate on (the training rows would "
                   "say nothing about new dialogues)")
        return held_out[0]
    if split not in names:
        refuse(f"no {split!r} split")
    return split


def _folder_rows(path: Path, split) -> list[tuple]:
    """(file, where, place, row) for the rows of one split of a dataset folder."""
    import datasets

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(path))       # written by save_to_disk
        label = str(path)
        if isinstance(ds, datasets.DatasetDict):
            name = _pick_split(path, list(ds), split)
            ds, label = ds[name], f"{path} split {name}"
        return [(label, f"{label} row {i}", f"row {i}", row) for i, row in enumerate(ds, 1)]
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        patterns = get_data_patterns(str(path))
    except datasets.exceptions.EmptyDatasetError:
        raise DataError(f"{path}: no data files in the folder; use one of "
                        f"{', '.join(SUFFIXES)}") from None
    files = {str(k): [Path(f) for f in v]
             for k, v in DataFilesDict.from_patterns(patterns, base_path=str(path)).items()}
    name = _pick_split(path, list(files), split, files)
    return [r for f in files[name] for r in _file_rows(f)]


def _row_kind(file: str, where: str, row: dict) -> str:
    """The format of a file, from its first row: our dialogues, chat rows or instruction rows."""
    if Path(file).suffix.lower() in (".csv", ".tsv"):
        return "instruction"
    if "topic" in row or "subject" in row:
        return "ours"
    if "messages" in row:
        return "chat"
    if "instruction" in row:
        return "instruction"
    raise DataError(f"{where}: no 'messages' and no 'instruction' key (keys: "
                    f"{', '.join(map(str, row)) or 'none'}); write our dialogues "
                    '({"id", "topic", "subject", "messages"}), chat rows ({"messages": [...]}) '
                    'or instruction rows ({"instruction", "input", "output"})')


def read_source(source, split: str | None = None, prompt_format: str = "gemma") -> list[dict]:
    """Dialogues as dicts with 'id' and 'messages' from a shipped split name, a file
    (.jsonl, .json, .csv, .tsv, .parquet) or a dataset folder.

    A .jsonl is read line by line (errors name file:line); its first line says the format:
    our dialogues ("topic", "subject"), chat rows ({"messages": [...]}) or instruction rows
    (instruction, input, response or output). CSV and TSV hold instruction rows, every field
    read as text. Ids must be unique; a row without one is named by its file and line.
    `split` picks the split of a folder: "train", "eval" (its test or validation split) or
    a split's name; None reads a folder's only split and refuses one with several."""
    if source in SPLITS:
        return load_split(source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data {source!r}: not a shipped split ({', '.join(SPLITS)}) "
                                "and no such file or folder")
    rows = _folder_rows(path, split) if path.is_dir() else _file_rows(path)
    if not rows:
        raise DataError(f"{source}: no examples in it; check the file")
    kinds, out, seen = {}, [], {}
    for file, where, place, row in rows:
        if file not in kinds:                      # the first row of each file says its format
            kinds[file] = _row_kind(file, where, row)
        kind = kinds[file]
        if kind == "ours":
            check_dialogue(row, where)
            d = row
        else:
            ident = row.get("id")
            d = {"id": f"{Path(file).name} {place}" if ident in (None, "") else str(ident)}
            if kind == "chat":
                d.update(topic="-", subject="-", messages=row.get("messages"))
                check_dialogue(d, where)
            else:
                d["messages"] = instruction_to_messages(row, where, prompt_format)
        if d["id"] in seen:
            first_file, first_place = seen[d["id"]]
            first = first_place if first_file == file else f"{first_file} {first_place}"
            raise DataError(f"{where}: field 'id': {d['id']!r} already used on {first}; ids "
                            "must be unique")
        seen[d["id"]] = (file, place)
        out.append(d)
    return out


def text_of(d: dict) -> str:
    return "\n".join(m["content"] for m in d["messages"])


# --- filters (the competition write-up's data cleaning) -----------------------------------
_JA = re.compile(r"[\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f\u3005]")


def japanese_share(text: str) -> float:
    """Share of letters (after NFKC; digits, punctuation, symbols and spaces not counted) that
    are kana or kanji. The competition write-up kept examples at >= 60 %."""
    letters = [c for c in unicodedata.normalize("NFKC", text)
               if unicodedata.category(c)[0] == "L"]
    return sum(bool(_JA.match(c)) for c in letters) / len(letters) if letters else 0.0


def filter_japanese(dialogues, min_share: float = 0.6):
    """Keep examples whose text is at least `min_share` Japanese (the write-up kept >= 60 %)."""
    rep, kept = Removed("japanese share"), []
    for d in dialogues:
        if japanese_share(text_of(d)) >= min_share:
            kept.append(d)
        else:
            rep.add(f"less than {min_share:.0%} Japanese", d["id"])
    rep.kept = len(kept)
    return kept, rep


def char_counts(dialogues) -> Counter:
    """How often each character (whitespace not counted) occurs in `dialogues`."""
    return Counter(c for d in dialogues for c in text_of(d) if not c.isspace())


def filter_rare_chars(dialogues, min_count: int = 20, counts: Counter | None = None):
    """Drop examples containing a character seen fewer than `min_count` times in the whole set
    (the write-up dropped characters of frequency <= 19: mojibake, rare symbols).
    `counts`: the counts to judge by instead, `char_counts` of the training data: an
    evaluation set is judged by the characters the training data has (a small one would
    otherwise lose every example to its own small counts)."""
    own = counts is None
    counts = char_counts(dialogues) if own else counts
    rep = Removed("rare characters" if own else "rare characters (counted on the training data)")
    kept = []
    for d in dialogues:
        rare = sorted({c for c in text_of(d) if not c.isspace() and counts[c] < min_count})
        if rare:
            rep.add(f"characters seen < {min_count} times", d["id"])
        else:
            kept.append(d)
    rep.kept = len(kept)
    return kept, rep


def filter_banned(dialogues, banned=("###", "```")):
    """Drop examples containing a banned substring; code fences (```) are banned by default."""
    rep, kept = Removed("banned strings"), []
    for d in dialogues:
        hit = next((b for b in banned if b in text_of(d)), None)
        if hit is None:
            kept.append(d)
        else:
            rep.add("code fence" if hit == "```" else f"contains {hit!r}", d["id"])
    rep.kept = len(kept)
    return kept, rep


# --- tokenisation with a length policy --------------------------------------------------
def _tokenize(tokenizer, messages, where, prompt_format):
    ex = tokenize_dialogue(tokenizer, messages, where=where, prompt_format=prompt_format)
    return ex["input_ids"], ex["labels"]


def tokenize_examples(tokenizer, dialogues, max_length: int = 1024, policy: str = "truncate",
                      prompt_format: str = "gemma"):
    """Tokenise with tutor-only labels. Longer than `max_length`: "truncate" drops whole
    exchanges from the end (a cut never falls inside a turn), "drop" drops the example.
    Returns (examples, Removed report with the counts)."""
    if policy not in ("truncate", "drop"):
        raise ValueError(f"length_policy={policy!r}: use truncate or drop")
    rep, out = Removed(f"max_length {max_length} ({policy})"), []
    for d in dialogues:
        msgs = list(d["messages"])
        ids, labels = _tokenize(tokenizer, msgs, d["id"], prompt_format)
        if len(ids) > max_length and policy == "truncate":
            while len(ids) > max_length and sum(m["role"] == "assistant" for m in msgs) > 1:
                msgs = msgs[:-2]       # the last learner turn and the tutor's answer to it
                ids, labels = _tokenize(tokenizer, msgs, d["id"], prompt_format)
            rep.truncated += len(ids) <= max_length
        if len(ids) > max_length:
            rep.add("longer than max_length even after truncation" if policy == "truncate"
                    else "longer than max_length", d["id"])
            continue
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                    "length": len(ids)})
    rep.kept = len(out)
    return out, rep


class Collator:
    """Pads a batch to its longest example (not to max_length): labels with -100, inputs with
    the pad id, on the right for training. With length-grouped batches, little is padding.

    causal_only: no `attention_mask` in the batch. The padding is on the right, and a causal
    model never lets a position see a later one, so no real token sees the padding; the
    padded positions' own outputs are discarded (their labels are -100). The model then
    builds only the causal (and sliding-window) mask, which the fast path builds once per
    shape (fast.py, cache_masks) instead of once per batch."""

    def __init__(self, pad_id: int, multiple_of: int = 8, causal_only: bool = False):
        self.pad_id, self.multiple_of, self.causal_only = pad_id, multiple_of, causal_only
        self.tokens = 0       # real (non-pad) tokens of the training batches collated
        self.counting = True  # off while evaluating (train.ReliableTrainer)
        # Each counted batch's real tokens, in order, until a training step takes it: the
        # loader collates one batch ahead, so `tokens` can include a batch never trained on
        # (train.ReliableTrainer counts the batches it trains on from here).
        from collections import deque
        self.pending = deque()

    def _width(self, batch) -> int:
        """The padded length of `batch`: its longest row, rounded up to multiple_of."""
        n = max(len(b["input_ids"]) for b in batch)
        return -(-n // self.multiple_of) * self.multiple_of

    def _count(self, batch) -> None:
        if self.counting:
            n = sum(len(b["input_ids"]) for b in batch)
            self.tokens += n
            self.pending.append(n)

    def __call__(self, batch):
        import torch

        n = self._width(batch)
        def pad(key, value):
            return torch.tensor([b[key] + [value] * (n - len(b[key])) for b in batch])
        self._count(batch)
        out = {"input_ids": pad("input_ids", self.pad_id), "labels": pad("labels", IGNORE)}
        if not self.causal_only:
            out["attention_mask"] = pad("attention_mask", 0)
        return out


# --- packing: several examples in one row, each attending only to itself -----------------
@dataclass
class Packed:
    """What `pack_examples` did: examples in, rows out, and how full the rows are."""
    examples: int
    rows: int
    length: int
    tokens: int

    @property
    def fill(self) -> float:
        return self.tokens / (self.rows * self.length) if self.rows else 0.0

    def __str__(self):
        return (f"packing: {self.examples} examples into {self.rows} rows of {self.length} "
                f"tokens ({self.fill:.0%} real tokens, the rest padding)")


def pack_examples(examples, length: int):
    """Pack tokenised examples into rows of at most `length` tokens (best fit, longest first).

    No example is cut or dropped: each one lies whole in one row. A row carries
    `position_ids` that restart at 0 for every example; given position ids and no attention
    mask, transformers (>= 4.5x) builds a mask in which each example attends only to itself
    (eager, sdpa, flex) when the model runs without a KV cache (PackedCollator's batches
    say use_cache=False; with a cache, examples would silently see each other). The first
    label of every example is set to -100, so the last token of one example is never trained
    to predict the first token of the next.
    Returns (rows, Packed report)."""
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"packing length={length!r}: give a positive number of tokens")
    for i, ex in enumerate(examples):
        if not ex["input_ids"]:
            raise ValueError(f"example {i} has no tokens: remove empty examples before packing")
        if len(ex["input_ids"]) > length:
            raise ValueError(
                f"example {i} has {len(ex['input_ids'])} tokens, more than the packing length "
                f"{length}: tokenise with max_length <= {length} (tokenize_examples) first")
        if len(ex["labels"]) != len(ex["input_ids"]):
            raise ValueError(f"example {i}: {len(ex['labels'])} labels for "
                             f"{len(ex['input_ids'])} input ids")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    by_free: list[tuple[int, int]] = []   # (free tokens, row), sorted
    for i in order:                       # best fit: the fullest row the example still fits in
        n = len(examples[i]["input_ids"])
        k = bisect.bisect_left(by_free, (n, -1))
        if k == len(by_free):
            bins.append([])
            free, row = length, len(bins) - 1
        else:
            free, row = by_free.pop(k)
        bins[row].append(i)
        bisect.insort(by_free, (free - n, row))
    rows = []
    for members in bins:
        members.sort()                    # the examples' original order inside a row
        ids, labels, pos = [], [], []
        for i in members:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE] + list(ex["labels"][1:])
            pos += list(range(len(ex["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos,
                     "length": len(ids), "n_examples": len(members)})
    rep = Packed(len(examples), len(rows), length, sum(r["length"] for r in rows))
    return rows, rep


class PackedCollator(Collator):
    """Collates packed rows (or plain examples) without an attention mask: `position_ids`
    restart at 0 for each example, and every padding token has position 0 (a one-token
    segment of its own, which also never runs past a learned position table), so
    transformers masks every example off from the others and from the padding. Each batch
    carries `use_cache=False`: with a cache, transformers does not look for packed rows.
    `length`: pad every packed row to this many tokens (one shape for every step: compiled
    layers never see a new shape); None, and batches of plain examples (evaluation), pad to
    the longest row of the batch."""

    def __init__(self, pad_id: int, length: int | None = None, multiple_of: int = 8):
        super().__init__(pad_id, multiple_of)
        self.length = length

    def __call__(self, batch):
        import torch

        longest = max(len(b["input_ids"]) for b in batch)
        packed = all("position_ids" in b for b in batch)   # else: plain (evaluation) examples
        n = self.length if self.length is not None and packed else self._width(batch)
        if longest > n:
            raise ValueError(f"a row of {longest} tokens does not fit the collator's length {n}")
        ids, labels, pos = [], [], []
        for b in batch:
            k, pad = len(b["input_ids"]), n - len(b["input_ids"])
            ids.append(list(b["input_ids"]) + [self.pad_id] * pad)
            labels.append(list(b["labels"]) + [IGNORE] * pad)
            pos.append(list(b.get("position_ids") or range(k)) + [0] * pad)
        self._count(batch)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(pos), "use_cache": False}


# --- helpers for reading the filters' decisions (appendix A) -----------------------------
def rare_characters(dialogues, min_count: int = 20, only: dict | None = None) -> dict:
    """The characters `filter_rare_chars(dialogues, min_count)` counts as rare, with how often
    each occurs in the whole set, rarest first. `only`: one dialogue, to see why it was dropped."""
    if not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
        raise ValueError(f"min_count={min_count!r}: give a positive whole number (20 in the write-up)")
    counts = Counter(c for d in dialogues for c in text_of(d) if not c.isspace())
    pool = counts if only is None else Counter(c for c in text_of(only) if not c.isspace())
    rare = {c: counts[c] for c in pool if counts[c] < min_count}
    return dict(sorted(rare.items(), key=lambda kv: (kv[1], kv[0])))


@dataclass
class Fixed(Removed):
    """A Removed report for a step that changes text instead of dropping examples."""
    fixes: Counter = field(default_factory=Counter)

    def __str__(self):
        what = ", ".join(f"{n} x {b!r}" for b, n in self.fixes.most_common()) or "nothing"
        return f"{self.step}: kept {self.kept}, fixed {sum(self.fixes.values())} ({what})"


def replace_substrings(dialogues, fixes: dict):
    """Fix known bad substrings in every message (the write-up's last cleaning step), e.g.
    {"ですです": "です"}. Returns (fixed copies, a Fixed report counting the fixes; removes none)."""
    if not isinstance(fixes, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                              for k, v in fixes.items()):
        raise ValueError(f"fixes={fixes!r}: give a dict of non-empty strings to their "
                         "replacements, e.g. {'ですです': 'です'}")
    rep, out = Fixed("substring fixes"), []
    for d in dialogues:
        msgs = []
        for m in d["messages"]:
            text = m["content"]
            for bad, good in fixes.items():
                n = text.count(bad)
                if n:
                    rep.fixes[bad] += n
                    rep.examples.setdefault(bad, [])
                    if d["id"] not in rep.examples[bad] and len(rep.examples[bad]) < 3:
                        rep.examples[bad].append(d["id"])
                    text = text.replace(bad, good)
            msgs.append({**m, "content": text})
        out.append({**d, "messages": msgs})
    rep.kept = len(out)
    return out, rep
