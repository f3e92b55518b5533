"""The quick evaluation that lesson 08 runs: a subsample that covers every subject."""
import pytest

from socratic_lora.evaluate import eval_items, run_eval_sample, spread_items, subject_of


def test_subject_of_item_ids():
    assert subject_of({"id": "mathematics-eval-004"}) == "mathematics"
    assert subject_of({"id": "ethics_philosophy-adv-001"}) == "ethics_philosophy"


def test_spread_takes_every_subject_in_the_split_order():
    items = eval_items("eval")
    subjects = {subject_of(it) for it in items}
    two = spread_items(items, 2)
    assert len(two) == 2 * len(subjects)
    assert {subject_of(it) for it in two} == subjects
    # the first N would not: the split is sorted by subject
    assert len({subject_of(it) for it in items[:len(two)]}) < len(subjects)
    # the same prompts as the full run (same tutor turn), in the split's order
    full = {it["id"]: it for it in items}
    assert all(full[it["id"]] == it for it in two)
    order = [it["id"] for it in items]
    assert [order.index(it["id"]) for it in two] == sorted(order.index(it["id"]) for it in two)
    with pytest.raises(ValueError, match="per_subject=0"):
        spread_items(items, 0)


def test_sample_run_scores_every_system_on_the_same_prompts(tiny_chat_dir):
    res = run_eval_sample(tiny_chat_dir, split="adversarial", per_subject=1,
                          systems=("base", "prompted"), max_new_tokens=3)
    assert res["items"] == 7 and res["per_subject"] == 1
    assert set(res["systems"]) == {"base", "prompted"}
    assert res["systems"]["base"]["n"] == 7 and "leakage" in res["systems"]["base"]
    ids = [e["id"] for e in res["examples"]["base"]]
    assert ids == [e["id"] for e in res["examples"]["prompted"]]
    assert len({i.rsplit("-", 2)[0] for i in ids}) == 7


def test_sample_run_refuses_tuned_without_adapter_and_unknown_systems():
    with pytest.raises(ValueError, match="needs an adapter"):
        run_eval_sample(systems=("base", "tuned"))
    with pytest.raises(ValueError, match="unknown system"):
        run_eval_sample(systems=("base", "oracle"))
