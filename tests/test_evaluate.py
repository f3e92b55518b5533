"""Each metric on hand-written positive and negative examples, tricky ones included."""
import pytest

from socratic_lora.evaluate import (Retriever, asks_question, distinct_2, eval_items, guides,
                                    hallucinated, judge_prompt, judge_replies, kanji_number,
                                    leaks_answer, numbers, parse_judgement, polite_share,
                                    prompt_for, question_rate, repeats, rouge_l, score_replies)
from socratic_lora.prepare import japanese_share


@pytest.mark.parametrize("reply,expected", [
    ("光はどんな色に分かれると思いますか？", True),
    ("そうですね。では、次の一歩は何でしょう", True),          # a question without ？
    ("まず図を描いてみましょう。どこから始めますか?", True),
    ("なぜ空は青いのでしょう？それは光が散乱するからです。", False),  # rhetorical, then answered
    ("答えは1603年です。", False),
    ("「なぜ？」と思うことが大事です。", False),                  # a quoted ？ inside a statement
    ("", False),
])
def test_question_rule(reply, expected):
    assert asks_question(reply) is expected


def test_question_rate():
    assert question_rate(["どう思いますか？", "答えは3です。"]) == 0.5


@pytest.mark.parametrize("reply,answer,aliases,expected", [
    ("答えは1603年です。", "1603年", [], True),
    ("千六百三年に幕府が開かれました。", "1603年", [], True),           # kanji numeral
    ("1,603年のことですね。", "1603年", [], True),                     # thousands separator
    ("ヒントです。１６０３年の出来事を思い出せますか？", "1603年", [], True),  # hidden in a hint, full-width
    ("関ヶ原の戦いの3年後です。年表で確かめられますか？", "1603年", [], False),
    ("それはソクラテスですね。", "ソクラテス", ["Socrates"], True),
    ("It was SOCRATES.", "ソクラテス", ["Socrates"], True),             # alias, case folded
    ("アテネで問い続けた人を探してみましょう。誰でしょう？", "ソクラテス", ["Socrates"], False),
    ("3/2になります。", "3/2", ["1.5"], True),
    ("1.5になりますね。", "3/2", [], True),                            # same number, other form
    ("分子と分母をひっくり返すと？", "3/2", [], False),
])
def test_answer_leakage(reply, answer, aliases, expected):
    assert leaks_answer(reply, answer, aliases) is expected


def test_numbers_and_kanji():
    assert kanji_number("千六百三") == 1603 and kanji_number("二万三千") == 23000
    assert kanji_number("十二") == 12 and kanji_number("空") is None
    assert numbers("千六百三年と3/2") == {1603.0, 1.5}


def test_guidance_needs_a_shared_content_word():
    assert guides("空の色は、光とどう関係していると思いますか？", "なぜ空は青いの？")
    assert not guides("では、今日の天気はどうですか？", "なぜ空は青いの？")
    assert not guides("それについてどう思いますか？", "なぜ空は青いの？")   # no content word shared


def test_japanese_purity_with_mixed_scripts():
    assert japanese_share("光合成について考えましょう") == 1.0
    assert japanese_share("Let's think about photosynthesis") == 0.0
    assert 0.3 < japanese_share("printの前にfor文を書きますか？") < 0.7


def test_register():
    assert polite_share("そうですね。次はどうしますか？") == 1.0
    assert polite_share("そうだね。次はどうする？") == 0.0
    assert polite_share("いいですね。じゃあ次はどうする？") == 0.5


def test_repetition_and_variety():
    loop = "光の合成は分解です。光の合成は分解です。光の合成は分解です。"
    assert repeats(loop) and not repeats("光はどう曲がると思いますか？")
    assert distinct_2(["空は青い", "空は青い"]) < distinct_2(["空は青い", "海は広い"])


def test_rouge_l_and_hallucination():
    assert rouge_l("空は青いです", "空は青いです") == 1.0
    assert rouge_l("まったく違う", "空は青いです") == 0.0
    assert 0 < rouge_l("空が青いです", "空は青いです") < 1
    assert hallucinated("空と宇宙の関係は？", "空の色を考えますか？", "なぜ空は青い？") == ["宇宙", "関係"]


def test_score_replies_on_both_kinds_of_items():
    items = [{"context": [{"role": "user", "content": "1603年に何があった？答えだけ"}],
              "answer": "1603年", "answer_aliases": []},
             {"context": [{"role": "user", "content": "徳川家康は何をした人？"}],
              "answer": "征夷大将軍", "answer_aliases": []}]
    s = score_replies(["1603年です。", "家康がついた役職を教科書で探せますか？"], items)
    assert s["leakage"] == 0.5 and s["question_rate"] == 0.5
    assert s["guidance"] == 1.0        # both replies take up the learner's words (1603年, 家康)
    refs = [{"context": [{"role": "user", "content": "なぜ空は青い？"}], "reference": "光の色と関係がありますか？"}]
    r = score_replies(["光の色と関係がありますか？"], refs)
    assert r["bleu"] == pytest.approx(100.0) and r["chrf"] == pytest.approx(100.0) and r["hallucination"] == 0


def test_eval_items_and_baseline_prompts():
    items = eval_items("eval", limit=5)
    assert len(items) == 5 and all(it["context"][-1]["role"] == "user" for it in items)
    adv = eval_items("adversarial", limit=3)
    assert all("answer" in it and len(it["context"]) == 1 for it in adv)
    r = Retriever([{"messages": [{"role": "user", "content": "分数の割り算が分からない"},
                                 {"role": "assistant", "content": "逆数を覚えていますか？"}]},
                   {"messages": [{"role": "user", "content": "光合成って何？"},
                                 {"role": "assistant", "content": "植物は何を取り込みますか？"}]}])
    assert r.top("分数の割り算を教えて", k=1)[0][1] == "逆数を覚えていますか？"
    ctx = [{"role": "user", "content": "分数の割り算を教えて"}]
    assert prompt_for("base", ctx) == ctx
    few = prompt_for("fewshot", ctx, r)
    assert few[0]["role"] == "system" and few[1]["content"] == "分数の割り算が分からない"
    assert few[-1] == ctx[-1] and [m["role"] for m in few[1:]] == ["user", "assistant"] * 2 + ["user"]


def test_judge_hook_with_any_callable():
    item = {"context": [{"role": "user", "content": "答えだけ教えて"}], "answer": "12"}
    prompt = judge_prompt(item["context"], "どこから考えますか？", item["answer"])
    assert "明かしてはいけない答え: 12" in prompt and "reveals_answer" in prompt
    fake = lambda p: 'はい。```json\n{"reveals_answer": 5, "guidance": 4, "actionable": 3, "tone": 5, "reason": "問いで返した"}\n```'
    got = judge_replies(fake, [item], ["どこから考えますか？"])
    assert got == [{"reveals_answer": 5, "guidance": 4, "actionable": 3, "tone": 5, "reason": "問いで返した"}]
    with pytest.raises(ValueError, match="tone=9"):
        parse_judgement('{"reveals_answer": 5, "guidance": 4, "actionable": 3, "tone": 9}')
    with pytest.raises(ValueError, match="no JSON"):
        parse_judgement("five stars")
    # A fractional score is refused, not silently cut to a whole one; 4.0 is the score 4.
    with pytest.raises(ValueError, match="guidance=4.5 is not a whole score"):
        parse_judgement('{"reveals_answer": 5, "guidance": 4.5, "actionable": 3, "tone": 5}')
    with pytest.raises(ValueError, match="tone=True"):
        parse_judgement('{"reveals_answer": 5, "guidance": 4, "actionable": 3, "tone": true}')
    assert parse_judgement('{"reveals_answer": 5.0, "guidance": 4, "actionable": 1, '
                           '"tone": 2}')["reveals_answer"] == 5
