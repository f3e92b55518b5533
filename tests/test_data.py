import json
import re
from collections import Counter, defaultdict

import pytest

from socratic_lora import DataError, load_dialogues, load_split

SUBJECTS = {"ethics_philosophy", "mathematics", "science", "history_society",
            "language_literature", "everyday_decisions", "programming_study"}


@pytest.fixture(scope="module")
def splits():
    return {s: load_split(s) for s in ("train", "eval", "adversarial")}


def tutor_turns(dialogues):
    return [m["content"] for d in dialogues for m in d["messages"] if m["role"] == "assistant"]


def grams(text, n=5):
    text = re.sub(r"\s+", "", text)
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def test_sizes(splits):
    train = splits["train"]
    assert len(train) >= 200
    assert len(tutor_turns(train)) >= 900
    assert all(3 <= sum(m["role"] == "assistant" for m in d["messages"]) <= 8 for d in train)
    assert len(splits["eval"]) >= 40
    assert len(splits["adversarial"]) >= 40


def test_every_subject_has_at_least_8_percent(splits):
    every = [d for s in splits.values() for d in s]
    counts = Counter(d["subject"] for d in every)
    assert set(counts) == SUBJECTS
    assert min(counts.values()) / len(every) >= 0.08, counts


def test_eval_topics_do_not_occur_in_train(splits):
    train_topics = {d["topic"] for d in splits["train"]}
    assert not train_topics & {d["topic"] for d in splits["eval"]}


def test_ids_unique_across_splits(splits):
    ids = [d["id"] for s in splits.values() for d in s]
    assert len(ids) == len(set(ids))


def test_no_near_duplicate_tutor_turns(splits):
    turns = tutor_turns([d for s in splits.values() for d in s])
    sets = [grams(t) for t in turns]
    index = defaultdict(list)
    for i, g in enumerate(sets):
        for x in g:
            index[x].append(i)
    shared = Counter()
    for ids in index.values():
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                shared[ids[a], ids[b]] += 1
    worst = max((n / min(len(sets[a]), len(sets[b])), turns[a], turns[b])
                for (a, b), n in shared.items())
    assert worst[0] <= 0.5, worst


def test_tutor_turns_end_with_a_question_and_stay_short(splits):
    turns = tutor_turns([d for s in splits.values() for d in s])
    assert sum(t.rstrip().endswith(("？", "?")) for t in turns) / len(turns) >= 0.90
    assert max(len(t) for t in turns) < 120


def test_adversarial_reference_replies_do_not_leak(splits):
    for d in splits["adversarial"]:
        assert len(d["messages"]) == 2 and d["messages"][0]["role"] == "user"
        reply = d["messages"][1]["content"]
        for answer in [d["answer"], *d.get("answer_aliases", [])]:
            assert answer not in reply, (d["id"], answer)


# --- the validator on bad files: file, line, field and what to fix ----------------------------
GOOD = {"id": "x-1", "topic": "t", "subject": "science",
        "messages": [{"role": "user", "content": "なぜ？"}, {"role": "assistant", "content": "どう思いますか？"}]}


def write(tmp_path, *lines, raw=None):
    p = tmp_path / "d.jsonl"
    if raw is not None:
        p.write_bytes(raw)
    else:
        p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)
                               for l in lines) + "\n", encoding="utf-8")
    return p


def with_messages(*pairs, **extra):
    return {**GOOD, **extra, "messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize("line,match", [
    ("{not json", r":1: invalid JSON"),
    ([GOOD], r":1: a JSON array"),
    ({**GOOD, "id": ""}, r"field 'id': missing or empty"),
    ({k: v for k, v in GOOD.items() if k != "messages"}, r"field 'messages': missing"),
    (with_messages(("user", "a"), ("user", "b")), r"messages\[1\]\.role.*'user' where 'assistant'"),
    (with_messages(("teacher", "a"), ("assistant", "b")), r"'teacher' is not a role"),
    (with_messages(("user", "   "), ("assistant", "b")), r"messages\[0\]\.content.*whitespace"),
    (with_messages(("user", "a"), ("system", "s"), ("assistant", "b")), r"system message can only come first"),
    (with_messages(("user", "a"), ("assistant", "b"), ("user", "c")), r"does not end with the tutor"),
])
def test_bad_lines_name_line_and_field(tmp_path, line, match):
    with pytest.raises(DataError, match=match):
        load_dialogues(write(tmp_path, line))


def test_error_names_the_right_line(tmp_path):
    p = write(tmp_path, GOOD, {**GOOD, "id": "x-2"}, {**GOOD, "id": "x-1"})
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'id': 'x-1' already used on line 1"):
        load_dialogues(p)


@pytest.mark.parametrize("raw,match", [
    (b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n", "BOM"),
    (json.dumps(GOOD).encode()[:-1] + b"\xff}\n", "not UTF-8"),
    (b"", "no dialogues"),
    (b"[]\n", "JSON array"),
    (json.dumps(GOOD).encode() + b"\n\n" + json.dumps(GOOD).encode() + b"\n", ":2: empty line"),
])
def test_bad_files(tmp_path, raw, match):
    with pytest.raises(DataError, match=match):
        load_dialogues(write(tmp_path, raw=raw))


def test_adversarial_needs_the_answer(tmp_path):
    with pytest.raises(DataError, match="field 'answer'"):
        load_dialogues(write(tmp_path, GOOD), adversarial=True)
    assert load_dialogues(write(tmp_path, {**GOOD, "answer": "12", "answer_aliases": ["十二"]}),
                          adversarial=True)[0]["answer"] == "12"


def test_datasheet_counts_match_the_files(splits):
    from pathlib import Path
    import socratic_lora
    sheet = (Path(socratic_lora.__file__).parent / "data" / "DATASHEET.md").read_text("utf-8")
    for name, dialogues in splits.items():
        turns = len(tutor_turns(dialogues))
        assert f"| {name} | {len(dialogues)} | {turns:,} |" in sheet, name
