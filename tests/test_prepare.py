import json

import pytest

from socratic_lora.chat import IGNORE, render_chat
from socratic_lora.data import load_split
from socratic_lora.prepare import (Collator, filter_banned, filter_japanese, filter_rare_chars,
                                   japanese_share, read_source, tokenize_examples)


def dlg(i, *texts):
    roles = ["user", "assistant"] * 8
    return {"id": f"d{i}", "messages": [{"role": r, "content": t} for r, t in zip(roles, texts)]}


def test_japanese_share():
    assert japanese_share("なぜ空は青いのですか？") == 1.0
    assert japanese_share("Why is the sky blue?") == 0.0
    assert japanese_share("Pythonのforループ") == pytest.approx(4 / 13)
    assert japanese_share("２０２４年") == 1.0          # NFKC digits are not counted


def test_filter_japanese_reports_what_it_removed():
    kept, rep = filter_japanese([dlg(1, "こんにちは", "どう思いますか？"), dlg(2, "hello there", "what do you think?")], 0.6)
    assert [d["id"] for d in kept] == ["d1"]
    assert rep.removed == 1 and rep.examples == {"less than 60% Japanese": ["d2"]}
    assert "kept 1" in str(rep) and "removed 1" in str(rep)


def test_filter_rare_chars_and_banned():
    common = [dlg(i, "あいうえお" * 5, "かきくけこ？") for i in range(25)]
    odd = dlg(99, "あいうえお゛", "かきくけこ？")
    kept, rep = filter_rare_chars(common + [odd], min_count=20)
    assert len(kept) == 25 and rep.examples["characters seen < 20 times"] == ["d99"]
    kept, rep = filter_banned([dlg(1, "```python\nx=1```", "何？"), dlg(2, "### 指示", "何？"),
                               dlg(3, "ふつう", "何？")], banned=["```", "###"])
    assert [d["id"] for d in kept] == ["d3"]
    assert rep.reasons == {"code fence": 1, "contains '###'": 1}


def test_truncate_at_turn_boundary_or_drop(tokenizer):
    long = dlg(1, "質問です", "どう思う？", "わからない" * 30, "小さく考えると？", "うーん" * 40, "次は？")
    full = len(tokenizer(render_chat(long["messages"]), add_special_tokens=False)["input_ids"])
    ex, rep = tokenize_examples(tokenizer, [long], max_length=full - 1, policy="truncate")
    assert rep.truncated == 1 and rep.removed == 0
    decoded = tokenizer.decode(ex[0]["input_ids"])
    assert decoded.endswith("<end_of_turn>\n") and "<start_of_turn>model\n" in decoded
    assert "うーん" not in decoded                        # the last exchange went whole
    ex, rep = tokenize_examples(tokenizer, [long], max_length=full - 1, policy="drop")
    assert ex == [] and rep.removed == 1
    ex, rep = tokenize_examples(tokenizer, [long], max_length=5, policy="truncate")
    assert ex == [] and rep.reasons == {"longer than max_length even after truncation": 1}


def test_collator_pads_to_longest_not_max_length():
    c = Collator(pad_id=0, multiple_of=8)
    batch = c([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORE, 6, 7]},
               {"input_ids": [5] * 10, "attention_mask": [1] * 10, "labels": [5] * 10}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["labels"][0, 3:].eq(IGNORE).all() and batch["attention_mask"][0, 3:].eq(0).all()
    assert c.tokens == 13


def test_instruction_rows_and_chat_rows_from_files(tmp_path, tokenizer):
    rows = [{"instruction": "日本の首都は？", "input": "", "output": "東京です。"},
            {"instruction": "要約して", "input": "長い文章", "output": "短い文章"}]
    p = tmp_path / "dolly.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    got = read_source(str(p), prompt_format="instruction")
    assert got[1]["messages"][0]["content"] == "要約して\n\n### 入力:\n長い文章"
    ex, _ = tokenize_examples(tokenizer, got, prompt_format="instruction")
    text = tokenizer.decode(ex[0]["input_ids"])
    assert text == "### 指示:\n日本の首都は？\n\n### 応答:\n東京です。<eos>"
    learned = tokenizer.decode([t for t, l in zip(ex[0]["input_ids"], ex[0]["labels"]) if l != IGNORE])
    assert learned == "東京です。<eos>"
    chat = tmp_path / "chat.parquet"
    import datasets
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": "b"}]}]).to_parquet(chat)
    assert read_source(str(chat))[0]["messages"][1]["content"] == "b"


def test_shipped_train_split_fits_the_demo_length(tokenizer):
    ex, rep = tokenize_examples(tokenizer, load_split("train"), max_length=512)
    assert len(ex) == 224 and rep.removed == 0 and rep.truncated == 0
    share = sum(l != IGNORE for e in ex for l in e["labels"]) / sum(len(e["labels"]) for e in ex)
    assert 0.3 < share < 0.8          # the tutor's words are a part, not all, of every dialogue


def test_missing_source_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a shipped split"):
        read_source("trian")
