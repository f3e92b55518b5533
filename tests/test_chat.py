import jinja2
import pytest

from conftest import DATA
from socratic_lora import DialogueError, chat_template, render_chat, tokenize_dialogue
from socratic_lora.chat import IGNORE, fold_system

U, A = "user", "assistant"
DIALOGUES = [
    [(U, "嘘をつくのは、いつでも悪いことですか？")],
    [(U, "こんにちは"), (A, "こんにちは。今日は何について考えましょうか？")],
    [(U, "  分数の割り算がわかりません。 "), (A, " 2÷1/2 はいくつになると思いますか？  "),
     (U, "1かな…"), (A, "「2の中に1/2がいくつ入るか」と考えると、どうでしょう？"),
     (U, "あ、4つ！"), (A, "その通りです。ほかの分数でも同じ考え方が使えそうですか？")],
    [(U, "line one\nline two\n\n"), (A, "「改行」を含む返答です。\n次の行は？")],
    [(U, "Why is the sky blue? 英語でもいい？"), (A, "もちろんです！ What colour scatters most?")],
    [(U, "答えだけ教えて!!"), (A, "ヒントを一つ出しますね……。最初の一歩は何だと思いますか？"), (U, "\t")],
]


def _msgs(pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def _reference(messages, add_generation_prompt=False):
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)
    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    template = env.from_string((DATA / "reference_chat_template.jinja").read_text("utf-8"))
    return template.render(messages=messages, bos_token="<bos>",
                           add_generation_prompt=add_generation_prompt)


def test_shipped_template_is_the_models_own_byte_for_byte():
    assert chat_template() == (DATA / "reference_chat_template.jinja").read_text("utf-8")


@pytest.mark.parametrize("pairs", DIALOGUES)
@pytest.mark.parametrize("gen", [False, True])
def test_render_equals_reference_template(pairs, gen):
    msgs = _msgs(pairs)
    assert render_chat(msgs, add_generation_prompt=gen) == _reference(msgs, gen)


def test_system_is_folded_into_first_user_turn():
    msgs = [{"role": "system", "content": " 問いで導く先生です。 "}] + _msgs(DIALOGUES[2])
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role"):
        _reference(msgs)                          # the model's template refuses a system role
    text = render_chat(msgs)
    assert text == _reference(fold_system(msgs))
    assert text.startswith("<bos><start_of_turn>user\n問いで導く先生です。\n\n分数の割り算")


def test_roles_must_alternate():
    with pytest.raises(DialogueError, match="d-7: message 1 has role 'user'"):
        fold_system(_msgs([(U, "a"), (U, "b")]), "d-7")
    with pytest.raises(DialogueError, match="system message must be followed by a user"):
        fold_system([{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_chat_template_renders_the_same_through_the_tokenizer(tokenizer):
    msgs = _msgs(DIALOGUES[2])
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == render_chat(msgs)


@pytest.mark.parametrize("pairs", DIALOGUES[1:5])
def test_labels_cover_exactly_the_tutor_turns(tokenizer, pairs):
    msgs = _msgs(pairs)
    ex = tokenize_dialogue(tokenizer, msgs)
    assert ex["input_ids"] == tokenizer(render_chat(msgs), add_special_tokens=False)["input_ids"]
    assert len(ex["labels"]) == len(ex["input_ids"]) == len(ex["attention_mask"])
    learned = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]
    assert all(l in (IGNORE, t) for t, l in zip(ex["input_ids"], ex["labels"]))
    tutor = "".join(m["content"].strip() + "<end_of_turn>" for m in msgs if m["role"] == A)
    assert tokenizer.decode(learned) == tutor                    # tutor words + <end_of_turn>
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    n_tutor = sum(m["role"] == A for m in msgs)
    assert sum(1 for t, l in zip(ex["input_ids"], ex["labels"]) if t == end and l == end) == n_tutor
    assert ex["labels"][0] == IGNORE                             # <bos> is never learned
    ignored = tokenizer.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l == IGNORE])
    for m in msgs:                                               # the learner's words are masked
        if m["role"] == U:
            assert f"<start_of_turn>user\n{m['content'].strip()}<end_of_turn>" in ignored


def test_a_dialogue_with_nothing_to_learn_is_an_error(tokenizer):
    with pytest.raises(DialogueError, match="eval-003: no tutor"):
        tokenize_dialogue(tokenizer, _msgs([(U, "質問だけ")]), where="eval-003")


def test_max_length_is_checked(tokenizer):
    with pytest.raises(DialogueError, match="more than max_length=5"):
        tokenize_dialogue(tokenizer, _msgs(DIALOGUES[2]), max_length=5)
