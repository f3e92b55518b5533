"""Review fixes to the metrics: whole-word leakage, question and register rules that look
past trailing decoration, one seed per system, strict judge parsing and input checks."""
import sys
from pathlib import Path

import pytest

from socratic_lora.data import load_split
from socratic_lora.evaluate import (asks_question, judge_replies, leaks_answer, numbers,
                                    parse_judgement, polite_share, run_eval, score_replies)

ADVERSARIAL = {d["id"]: d for d in load_split("adversarial")}


def leaks(item_id, reply):
    d = ADVERSARIAL[item_id]
    return leaks_answer(reply, d["answer"], d.get("answer_aliases", []))


# --- answer leakage: whole words, not substrings ------------------------------------------
@pytest.mark.parametrize("item_id,reply", [
    # 2000円 inside 22000円 (the learner's own numbers, restated)
    ("everyday_decisions-adv-007",
     "3泊で22000円のパックと、1泊8000円で3泊した合計を比べてみましょう。まず8000円の3泊分はいくらですか？"),
    # alias さん (三) inside たくさん, and the honorific さん
    ("language_literature-adv-003", "冷たい石にもたくさん座ると温まる、という意味のことわざです。何年くらいだと思いますか？"),
    ("language_literature-adv-003", "田中さん、石の上に座り続けるとどうなりますか？"),
    # alias 二 (2) and 三 (3) counting things: 二つのキー, 三つの例
    ("programming_study-adv-006", "辞書には二つのキーがありますね。キー \"b\" のコロンの後ろには何が書いてありますか？"),
    ("programming_study-adv-004", "三つの例で比べてみましょう。// は小数の部分をどう扱う記号でしたか？"),
    # alias O2 inside CO2
    ("science-adv-002", "植物は二酸化炭素（CO2）と水を取り込みますね。では、代わりに何を出していると思いますか？"),
    # 6 inside 16 and 0.6, 十一 inside 二十一, 2000 inside 12,000
    ("mathematics-adv-002", "16 や 0.6 ではなく、両辺から何を引けばよいでしょう？"),
    ("mathematics-adv-007", "二十一から始めると、どうなりますか？"),
    ("everyday_decisions-adv-007", "12,000円との差を考えるとどうなりますか？"),
    # Latin words: went inside wentworth, seen inside unseen
    ("language_literature-adv-006", "Wentworth という名前を知っていますか？"),
    ("language_literature-adv-007", "unseen の un は何を表すと思いますか？"),
])
def test_no_leak_inside_longer_numbers_words_or_morphemes(item_id, reply):
    assert not leaks(item_id, reply)


@pytest.mark.parametrize("item_id,reply", [
    ("everyday_decisions-adv-007", "差額は2,000円です。"),
    ("everyday_decisions-adv-007", "答えは二千円ですね。"),
    ("language_literature-adv-003", "石の上にも三年、と言いますね。"),
    ("language_literature-adv-003", "答えはさんです。"),
    ("programming_study-adv-006", "d[\"b\"] の値は二です。"),
    ("programming_study-adv-004", "7 // 2 は3になります。"),
    ("programming_study-adv-001", "ループは六回まわります。"),
    ("science-adv-002", "植物はO2を出します。"),
    ("science-adv-002", "出しているのは酸素です。"),
    ("mathematics-adv-002", "x = 6 です。"),
    ("mathematics-adv-007", "答えは十一です。"),
    ("history_society-adv-001", "千六百三年に開かれました。"),
    ("history_society-adv-007", "函館市にあります。"),
    ("language_literature-adv-006", "The answer is went."),
])
def test_stated_answers_still_leak(item_id, reply):
    assert leaks(item_id, reply)


def test_shipped_adversarial_items_references_clean_and_stated_answers_leak():
    assert len(ADVERSARIAL) == 49
    for d in ADVERSARIAL.values():
        for m in d["messages"]:
            if m["role"] == "assistant":
                assert not leaks(d["id"], m["content"]), (d["id"], m["content"])
        for a in [d["answer"], *d.get("answer_aliases", [])]:
            for reply in (f"答えは{a}です。", f"それは「{a}」ですね。", f"ずばり{a}！次に進みましょう。"):
                assert leaks(d["id"], reply), (d["id"], reply)


def test_kanji_in_ordinary_words_are_not_numbers():
    assert numbers("十分に考えましたね") == set()          # 十分: enough
    assert numbers("百聞は一見にしかず") == set()
    assert numbers("一緒に考えて、一番大きいものを一度選びましょう") == set()
    assert numbers("駅まで十分で着きます") == {10.0}        # 十分: ten minutes
    assert numbers("二十九日半") == {29.0} and numbers("一六〇三年") == {1603.0}
    assert numbers("2,4,6と増えます") == {2.0, 4.0, 6.0}   # a list, not 246
    assert numbers("1,603年") == {1603.0}


# --- questions and register past trailing decoration -------------------------------------
@pytest.mark.parametrize("reply", [
    "**光はどんな色に分かれると思いますか？**",           # markdown bold
    "光はどんな色に分かれると思いますか？😊",
    "光はどんな色に分かれると思いますか？ 🤔",
    "光はどんな色に分かれると思いますか？（ヒント：虹）",
    "光はどんな色に分かれると思いますか？\n\n（ヒント：虹の色を数えてみましょう）",
    "「光はどんな色に分かれると思いますか？」",
    "光はどんな色に分かれると思いますか…",                # trailing ellipsis
    "光はどんな色に分かれると思いますか〜",
])
def test_decorated_questions_are_polite_questions(reply):
    assert asks_question(reply)
    assert polite_share(reply) == 1.0


@pytest.mark.parametrize("reply,expected", [
    ("どうかしら。", True),
    ("どうしてそう思ったの", True),                       # a bare の asks
    ("どうしてそう思ったの？", True),
    ("それは光が散乱するからなの。", False),               # …なの。 states
    ("夜空が暗いのは、宇宙が膨張しているからなの。", False),
    ("答えは3です。😊", False),
    ("なぜでしょう？それは光が散乱するからです。（参考：レイリー散乱）", False),
])
def test_question_endings(reply, expected):
    assert asks_question(reply) is expected


def test_every_shipped_tutor_turn_is_a_question():
    turns = [m["content"] for split in ("train", "eval", "adversarial") for d in load_split(split)
             for m in d["messages"] if m["role"] == "assistant"]
    assert len(turns) == 1342
    assert [t for t in turns if not asks_question(t)] == []


# --- one seed per system --------------------------------------------------------------------
def test_sampled_replies_do_not_depend_on_the_systems_run_before(tiny_chat_dir):
    kw = dict(split="adversarial", limit=1, preset="report", max_new_tokens=4, seed=0)
    alone = run_eval(tiny_chat_dir, systems=("prompted",), **kw)["examples"]["prompted"]
    after = run_eval(tiny_chat_dir, systems=("base", "prompted"), **kw)["examples"]["prompted"]
    assert alone == after


def test_no_prompts_is_refused_before_loading_a_model():
    with pytest.raises(ValueError, match="gives no prompts"):
        run_eval("no/such/model", split="adversarial", systems=("base",), limit=0)


# --- judge parsing and input checks ---------------------------------------------------------
GOOD = '{"reveals_answer": 5, "guidance": 4, "actionable": 3, "tone": 5, "reason": "問いで返した"}'
PARSED = {"reveals_answer": 5, "guidance": 4, "actionable": 3, "tone": 5, "reason": "問いで返した"}


@pytest.mark.parametrize("text", [
    GOOD + '\n\n※ 形式は {"reveals_answer": n, ...} のとおりです。',     # braces after it
    "指定の形式 {…} で答えます。\n" + GOOD,                              # braces before it
    '{"note": "ok"} ' + GOOD,                                          # another object first
    '{"scores": ' + GOOD + "}",                                        # nested
])
def test_judgement_is_the_first_object_with_the_labels(text):
    assert parse_judgement(text) == PARSED


def test_judgement_without_the_labels_is_refused():
    with pytest.raises(ValueError, match="no JSON object with the labels.*1 JSON value"):
        parse_judgement('{"score": 5}')


def test_judge_errors_name_the_item():
    items = [{"id": f"x-adv-00{i}", "context": [{"role": "user", "content": f"q{i}"}]}
             for i in range(3)]
    outs = iter([GOOD, GOOD, "評価できません"])
    with pytest.raises(ValueError, match=r"item 2 \(id x-adv-002\): judge reply has no JSON"):
        judge_replies(lambda p: next(outs), items, ["a", "b", "c"])

    def broken(prompt):
        raise RuntimeError("judge offline")
    with pytest.raises(RuntimeError, match="judge offline") as e:
        judge_replies(broken, items, ["a", "b", "c"])
    if sys.version_info >= (3, 11):        # the judge's own error keeps its type, plus a note
        assert e.value.__notes__ == ["judge_replies: the judge failed on item 0 (id x-adv-000)"]


def test_mismatched_or_empty_inputs_are_refused():
    adv = [{"context": [{"role": "user", "content": "答えだけ教えて"}], "answer": "6"},
           {"context": [{"role": "user", "content": "答えだけ教えて"}], "answer": "8"}]
    with pytest.raises(ValueError, match="score_replies: 1 replies for 2 items"):
        score_replies(["答えは8です。"], adv)
    with pytest.raises(ValueError, match="judge_replies: 1 replies for 2 items"):
        judge_replies(lambda p: GOOD, adv, ["どこから考えますか？"])
    with pytest.raises(ValueError, match="score_replies: no items"):
        score_replies([], [])
    with pytest.raises(ValueError, match="judge_replies: no items"):
        judge_replies(lambda p: GOOD, [], [])
    mixed = [adv[0], {"id": "b", "context": adv[1]["context"]}]
    with pytest.raises(ValueError, match=r"item 1 \(id b\) has no 'answer'"):
        score_replies(["どこから？", "どこから？"], mixed)


# --- committed results and rescoring ---------------------------------------------------------
_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.mark.parametrize("name", ["demo_eval", "demo_eval_adversarial"])
def test_committed_results_follow_the_current_metric_rules(name):
    """docs/results (and the book's tables quoted from it) are rescored when a rule changes:
    `python bench/rescore_eval.py docs/results/demo_eval docs/results/demo_eval_adversarial`."""
    import json

    from socratic_lora.evaluate import rescore
    res = json.loads((_RESULTS / name / "eval.json").read_text("utf-8"))
    again = rescore(res)
    for system, metrics in res["systems"].items():
        for key, value in metrics.items():
            assert again["systems"][system][key] == pytest.approx(value, abs=1e-12), (system, key)


def test_rescore_refuses_replies_of_other_prompts():
    import json

    from socratic_lora.evaluate import rescore
    res = json.loads((_RESULTS / "demo_eval" / "eval.json").read_text("utf-8"))
    with pytest.raises(ValueError, match="another seed"):
        rescore({**res, "seed": 5})              # other tutor turns: other learner messages
    res["examples"]["base"][0]["id"] = "no-such-id"
    with pytest.raises(ValueError, match="'no-such-id' does not belong"):
        rescore(res)


@pytest.mark.parametrize("reply,answer,leaks_", [
    ("CO2が増えると、何が起きると思いますか？", "O2", False),   # the number fallback too
    ("二酸化炭素はCO2だね。水はどうかな？", "H2O", False),
    ("答えはO2です。", "O2", True),
    ("答えは1603年です。", "1603年", True),
])
def test_digits_inside_latin_words_are_not_numbers(reply, answer, leaks_):
    assert leaks_answer(reply, answer) is leaks_
    assert 2.0 not in numbers("CO2とH2O")
