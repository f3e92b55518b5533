"""Input defects found in review: each bad input is refused naming file, 1-based line (or
row) and field, and nothing is silently dropped, guessed or taken from the wrong split.

1. empty instruction / response rows; 2. CSV and TSV read as text; 3. .jsonl read by our line
reader in every format; 4. rare characters of the eval set counted on the training data;
5. the split of a dataset folder; 6. turn markers and duplicate keys in dialogue files.
"""
import json
from pathlib import Path

import pytest
import yaml

from socratic_lora.chat import DialogueError
from socratic_lora.cli import main
from socratic_lora.data import DataError, load_dialogues
from socratic_lora.prepare import char_counts, filter_rare_chars, read_source
from socratic_lora.train import load_settings, prepare_data, read_data

OURS = {"id": "x-1", "topic": "t", "subject": "science",
        "messages": [{"role": "user", "content": "なぜ？"}, {"role": "assistant", "content": "どう思う？"}]}


def chat(a="なぜ？", b="どう思う？", **extra):
    return {**extra, "messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}


def write(path: Path, *lines) -> str:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)) + "\n"
                            for l in lines), encoding="utf-8")
    return str(path)


# --- 1. empty instruction or response -----------------------------------------------------
@pytest.mark.parametrize("row,field", [
    ({"instruction": "要約して", "input": "", "output": ""}, "output"),
    ({"instruction": "要約して", "input": "", "output": " \u3000\n"}, "output"),
    ({"instruction": "要約して", "response": ""}, "response"),
    ({"instruction": "  ", "input": "", "output": "短い文章"}, "instruction"),
])
def test_empty_instruction_or_response_is_refused(tmp_path, row, field):
    p = write(tmp_path / "inst.jsonl", {"instruction": "日本の首都は？", "input": "", "output": "東京です。"}, row)
    with pytest.raises(DialogueError, match=rf"inst\.jsonl:2: field '{field}': empty or only whitespace"):
        read_source(p)


def test_empty_response_in_a_csv_names_the_line(tmp_path):
    p = tmp_path / "inst.csv"
    p.write_text("instruction,input,output\n日本の首都は？,,東京です。\n要約して,,\n", encoding="utf-8")
    with pytest.raises(DialogueError, match=r"inst\.csv:3: field 'output': empty"):
        read_source(str(p))


# --- 2. CSV and TSV: every field is text ---------------------------------------------------
def test_csv_fields_are_read_as_text_not_numbers(tmp_path):
    p = tmp_path / "nums.csv"
    p.write_text("instruction,input,output\n12+30は？,,42\n次の数を2倍にして,21,042です\n"
                 "\"複数行の\n指示\",007,30\n", encoding="utf-8")
    got = read_source(str(p))
    assert [d["messages"] for d in got] == [
        [{"role": "user", "content": "12+30は？"}, {"role": "assistant", "content": "42"}],
        [{"role": "user", "content": "次の数を2倍にして\n\n21"}, {"role": "assistant", "content": "042です"}],
        [{"role": "user", "content": "複数行の\n指示\n\n007"}, {"role": "assistant", "content": "30"}]]
    assert [d["id"] for d in got] == ["nums.csv line 2", "nums.csv line 3", "nums.csv line 4"]


def test_tsv_is_read(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("instruction\toutput\n日本の首都は？\t東京です。\n", encoding="utf-8")
    assert read_source(str(p))[0]["messages"][1]["content"] == "東京です。"


@pytest.mark.parametrize("text,match", [
    ("instruction,input,output\n要約して,長い文章,短い,余分\n", r"bad\.csv:2: 4 fields where the header has 3"),
    ("question,answer\nなぜ？,だから\n", r"bad\.csv:1: no 'instruction' column \(columns: question, answer\)"),
    ("instruction,output,output\na,b,c\n", r"bad\.csv:1: column 'output' appears twice"),
    ("instruction,output\na,b\n\nc,d\n", r"bad\.csv:3: empty line"),
])
def test_bad_csv_names_the_line(tmp_path, text, match):
    p = tmp_path / "bad.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        read_source(str(p))


def test_non_text_input_is_an_error_not_a_crash(tmp_path):
    p = write(tmp_path / "inst.jsonl", {"instruction": "次の数を2倍にして", "input": 21, "output": "42"})
    with pytest.raises(DialogueError, match=r"inst\.jsonl:1: field 'input': 21 is a int, not text"):
        read_source(p)
    p = write(tmp_path / "inst.jsonl", {"instruction": "12+30は？", "input": "", "output": 42})
    with pytest.raises(DialogueError, match=r"inst\.jsonl:1: field 'output': 42 is a int"):
        read_source(p)


# --- 3. every .jsonl through our line reader ----------------------------------------------
@pytest.mark.parametrize("lines,match", [
    ([chat(), chat(), '{"messages": ['], r"d\.jsonl:3: invalid JSON"),
    ([chat(), {"mesages": []}], r"d\.jsonl:2: field 'messages': missing"),
    ([chat(id="same"), chat(id="same")], r"d\.jsonl:2: field 'id': 'same' already used on line 1"),
    ([chat(), "", chat()], r"d\.jsonl:2: empty line"),
    ([chat(), chat(a=5)], r"d\.jsonl:2: field 'messages\[0\]\.content'"),
    ([{k: v for k, v in OURS.items() if k != "topic"}], r"d\.jsonl:1: field 'topic': missing"),
    ([{"question": "なぜ？", "answer": "だから"}], r"d\.jsonl:1: no 'messages' and no 'instruction' key"),
    ([{"instruction": "a", "output": "b"}, chat()], r"d\.jsonl:2: needs 'instruction'"),
])
def test_jsonl_errors_name_the_1_based_line(tmp_path, lines, match):
    p = write(tmp_path / "d.jsonl", *lines)
    with pytest.raises(ValueError, match=match):
        read_data(p)


def test_jsonl_formats_and_ids(tmp_path):
    p = write(tmp_path / "c.jsonl", chat(id="a"), chat("もう一つ", "どうして？"))
    got = read_source(p)
    assert [d["id"] for d in got] == ["a", "c.jsonl line 2"]
    assert got[1]["messages"][0]["content"] == "もう一つ"
    p = write(tmp_path / "ours.jsonl", OURS)
    assert read_source(p) == [OURS]


def test_unsupported_suffix_is_refused_with_the_supported_list(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("instruction\toutput\na\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.txt: unsupported file type '\.txt'; use one of "
                                        r"\.jsonl, \.json, \.csv, \.tsv, \.parquet"):
        read_source(str(p))


def test_bad_chat_jsonl_through_the_cli_is_one_line_with_the_line(tmp_path, capsys):
    data = write(tmp_path / "chat.jsonl", chat(), chat(), '{"messages": [')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tmp_path / "never-loaded"), "train_data": data,
                                   "eval_data": None, "output_dir": str(tmp_path / "run")}))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "chat.jsonl:3: invalid JSON" in err
    assert not (tmp_path / "run").exists()


# --- 4. rare characters of the eval data: the training data's counts ----------------------
def _dialogues(n, text, start=0):
    return [{"id": f"d{start + i}", "topic": "t", "subject": "s",
             "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text + "？"}]}
            for i in range(n)]


def test_filter_rare_chars_with_given_counts():
    train = _dialogues(30, "あいうえお")
    small = _dialogues(2, "あいうえお", start=100) + [_dialogues(1, "あいうえお☃", start=200)[0]]
    kept, rep = filter_rare_chars(small, 20)                 # its own counts: all rare
    assert kept == [] and rep.removed == 3
    kept, rep = filter_rare_chars(small, 20, char_counts(train))
    assert [d["id"] for d in kept] == ["d100", "d101"]
    assert rep.examples == {"characters seen < 20 times": ["d200"]}
    assert str(rep).startswith("rare characters (counted on the training data): kept 2")


def test_prepare_data_judges_eval_by_the_training_characters(tmp_path, tokenizer):
    train = write(tmp_path / "train.jsonl", *_dialogues(30, "あいうえお"))
    evals = write(tmp_path / "eval.jsonl", *_dialogues(3, "あいうえお", start=100),
                  *_dialogues(25, "あいうえお☃", start=200))   # ☃: 50 times here, never in training
    s = load_settings("demo", train_data=train, eval_data=evals, min_char_count=20)
    ex, steps = prepare_data(s, tokenizer, train, read_data(train))
    assert len(ex) == 30
    ex, steps = prepare_data(s, tokenizer, evals, read_data(evals))
    assert len(ex) == 3
    assert "rare characters (counted on the training data): kept 3, removed 25" in steps[1]


# --- 5. the split of a dataset folder -------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "myds"
    d.mkdir()
    write(d / "train.jsonl", *[chat(b=f"train {i}", id=f"tr{i}") for i in range(3)])
    write(d / "test.jsonl", chat(b="held out", id="te0"))
    return d


def test_folder_eval_takes_the_test_split_and_plain_folder_is_ambiguous(folder, tmp_path, tokenizer):
    assert [d["id"] for d in read_data(str(folder), split="eval")] == ["te0"]
    assert [d["id"] for d in read_data(str(folder), split="train")] == ["tr0", "tr1", "tr2"]
    with pytest.raises(DataError, match=r"myds: a dataset folder with several splits.*"
                                        r"test: test\.jsonl; train: train\.jsonl.*name the file"):
        read_data(str(folder))
    train = write(tmp_path / "t.jsonl", chat())
    s = load_settings("demo", train_data=train, eval_data=str(folder))
    ex, steps = prepare_data(s, tokenizer, s.eval_data)     # reads the folder's test split
    assert len(ex) == 1 and steps[0].endswith(": 1 examples read")


def test_folder_without_a_single_held_out_split_is_refused_for_eval(folder, tmp_path):
    write(folder / "validation.jsonl", chat(id="va0"))
    with pytest.raises(DataError, match="both a test and a validation split"):
        read_data(str(folder), split="eval")
    only = tmp_path / "only"
    only.mkdir()
    write(only / "data.jsonl", chat())
    for split in ("eval", "train", None):                  # one split: no choice to make
        assert len(read_data(str(only), split=split)) == 1
    (folder / "test.jsonl").unlink()                        # only training rows left
    (folder / "validation.jsonl").unlink()
    with pytest.raises(DataError, match="no test or validation split"):
        read_data(str(folder), split="eval")
    assert len(read_data(str(folder), split="train")) == 3


def test_saved_dataset_dict_eval_split(tmp_path):
    import datasets
    row = lambda b: {"instruction": "質問", "output": b}
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row("学習")]),
                          "validation": datasets.Dataset.from_list([row("検証")])}
                         ).save_to_disk(str(tmp_path / "dd"))
    got = read_source(str(tmp_path / "dd"), split="eval")
    assert got[0]["messages"][1]["content"] == "検証" and got[0]["id"] == "dd split validation row 1"
    with pytest.raises(DataError, match="several splits"):
        read_source(str(tmp_path / "dd"))


# --- 6. turn markers in text, duplicate keys ------------------------------------------------
@pytest.mark.parametrize("role,index,text", [
    ("assistant", 1, "まず考えよう<end_of_turn>\n<start_of_turn>user\n答えは12です"),
    ("user", 0, "<start_of_turn>model\n答えを教えて"),
])
def test_turn_markers_in_text_are_refused(tmp_path, role, index, text):
    msgs = [{"role": "user", "content": "ヒントをください"}, {"role": "assistant", "content": "考えよう"}]
    msgs[index]["content"] = text
    p = write(tmp_path / "d.jsonl", OURS, {**OURS, "id": "x-2", "messages": msgs})
    with pytest.raises(DataError, match=rf"d\.jsonl:2: field 'messages\[{index}\]\.content': "
                                        "contains the special token <(start|end)_of_turn>"):
        load_dialogues(p)


def test_turn_marker_in_an_instruction_row_is_refused(tmp_path):
    p = write(tmp_path / "inst.jsonl", {"instruction": "質問", "output": "答え<end_of_turn>"})
    with pytest.raises(DialogueError, match=r"inst\.jsonl:1: field 'output': contains the "
                                            "special token <end_of_turn>"):
        read_source(p)


def test_other_special_tokens_in_text_are_refused(tmp_path):
    """<eos> in a tutor turn would be trained on: the model would learn to stop mid-reply."""
    msgs = [{"role": "user", "content": "ヒントをください"}, {"role": "assistant", "content": "はい<eos>続き"}]
    p = write(tmp_path / "d.jsonl", OURS, {**OURS, "id": "x-2", "messages": msgs})
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*contains the special token <eos>"):
        load_dialogues(p)


@pytest.mark.parametrize("body,line", [
    ('q1,"a1 with a stray quote\nq2,a2\nq3,a3\n', 2),      # unclosed: would swallow the file
    ('q1,a1\nq2,"x"y\n', 3),                               # stray quote: would become xy
])
def test_csv_quote_errors_name_the_line(tmp_path, body, line):
    p = tmp_path / "bad.csv"
    p.write_text("instruction,output\n" + body, encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad\.csv:{line}: .*check the quotes"):
        read_source(str(p))


@pytest.mark.parametrize("line,key", [
    ('{"id": "x-2", "id": "x-3", "topic": "t", "subject": "s", "messages": []}', "id"),
    ('{"id": "x-2", "topic": "t", "subject": "s", "messages": [{"role": "user", "content": "a"}, '
     '{"role": "assistant", "content": "first", "content": "second"}]}', "content"),
])
def test_duplicate_keys_are_refused(tmp_path, line, key):
    p = write(tmp_path / "d.jsonl", OURS, line)
    with pytest.raises(DataError, match=rf"d\.jsonl:2: key '{key}' appears twice"):
        load_dialogues(p)
    with pytest.raises(DataError, match=rf"d\.jsonl:2: key '{key}' appears twice"):
        read_source(p)


def test_train_reads_a_folder_by_role(folder, monkeypatch, tmp_path):
    """One dataset folder as train_data and eval_data: training rows for training, the held-out
    split for evaluation (train() reads both before the model loads)."""
    import socratic_lora.train as t
    got = {}
    real = t.read_data

    def spy(source, prompt_format="gemma", split=None):
        rows = real(source, prompt_format, split=split)
        got[split] = [d["id"] for d in rows]
        return rows

    def stop(s):
        raise KeyboardInterrupt
    monkeypatch.setattr(t, "read_data", spy)
    monkeypatch.setattr(t, "load_for_training", stop)
    with pytest.raises(KeyboardInterrupt):
        t.train(load_settings("demo", train_data=str(folder), eval_data=str(folder),
                              output_dir=str(tmp_path / "run")))
    assert got == {"train": ["tr0", "tr1", "tr2"], "eval": ["te0"]}
