"""rare_characters and replace_substrings: the helpers appendix A uses to explain the filters."""
import pytest

from socratic_lora.prepare import filter_rare_chars, rare_characters, replace_substrings


def _d(ident, user, tutor):
    return {"id": ident, "messages": [{"role": "user", "content": user},
                                      {"role": "assistant", "content": tutor}]}


SET = [_d("a", "あいう", "あいう"), _d("b", "あいう", "あい☃"), _d("c", "あい", "うう")]


def test_rare_characters_are_exactly_what_the_filter_drops_on():
    rare = rare_characters(SET, min_count=3)
    assert rare == {"☃": 1}                     # あ 5, い 5, う 5 times: not rare
    kept, rep = filter_rare_chars(SET, min_count=3)
    dropped = {d["id"] for d in SET} - {d["id"] for d in kept}
    assert dropped == {d["id"] for d in SET if set(rare) & set("".join(m["content"] for m in d["messages"]))}
    # a higher threshold makes ordinary characters rare too, rarest first
    assert list(rare_characters(SET, min_count=6)) == ["☃", "あ", "い", "う"]


def test_rare_characters_of_one_dialogue_and_bad_threshold():
    assert rare_characters(SET, min_count=3, only=SET[0]) == {}
    assert rare_characters(SET, min_count=3, only=SET[1]) == {"☃": 1}
    with pytest.raises(ValueError, match="min_count"):
        rare_characters(SET, min_count=0)


def test_replace_substrings_fixes_every_message_and_counts():
    data = [_d("x", "ですです", "はいですです。ですです"), _d("y", "ok", "ok")]
    fixed, rep = replace_substrings(data, {"ですです": "です"})
    assert fixed[0]["messages"][0]["content"] == "です"
    assert fixed[0]["messages"][1]["content"] == "はいです。です"
    assert fixed[1] == data[1] and data[0]["messages"][0]["content"] == "ですです"  # input untouched
    assert rep.kept == 2 and rep.removed == 0 and rep.fixes["ですです"] == 3
    assert rep.examples == {"ですです": ["x"]}
    assert "fixed 3" in str(rep)


def test_replace_substrings_refuses_empty_patterns():
    with pytest.raises(ValueError, match="non-empty"):
        replace_substrings(SET, {"": "x"})
    with pytest.raises(ValueError, match="non-empty"):
        replace_substrings(SET, ["a"])
