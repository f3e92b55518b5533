"""Figures and counts for lessons 04 (LoRA size against rank) and 05 (lengths, label mask)."""
import matplotlib
import pytest

matplotlib.use("Agg")

from conftest import save_tiny, tiny_gemma2_config  # noqa: E402
from socratic_lora import LoraSettings, apply_lora, trainable_report  # noqa: E402
from socratic_lora.chat import IGNORE, label_mask_rows, plot_label_mask, tokenize_dialogue  # noqa: E402
from socratic_lora.data import plot_lengths, token_lengths  # noqa: E402
from socratic_lora.lora import lora_parameter_count, lora_targeted_linears, plot_rank  # noqa: E402
from socratic_lora.placement import known_config  # noqa: E402


# --- lesson 04: LoRA parameters from a config ---------------------------------------------
@pytest.mark.parametrize("targets", ["attention", "mlp", "all-linear", ["q_proj", "v_proj"]])
@pytest.mark.parametrize("r", [4, 8])
def test_count_equals_what_peft_reports(tmp_path, targets, r):
    from transformers import AutoModelForCausalLM
    config = tiny_gemma2_config()
    model = AutoModelForCausalLM.from_pretrained(save_tiny(config, tmp_path))
    peft_model = apply_lora(model, LoraSettings(r=r, alpha=2 * r, targets=targets,
                                                gradient_checkpointing=False))
    assert lora_parameter_count(config, r, targets) == trainable_report(peft_model)["trainable"]


def test_all_linear_leaves_out_lm_head_and_covers_attention_and_mlp():
    config = tiny_gemma2_config()
    names = [n for n, _, _ in lora_targeted_linears(config, "all-linear")]
    assert not any("lm_head" in n for n in names)
    assert len(names) == config.num_hidden_layers * 7          # q k v o gate up down
    assert (lora_parameter_count(config, 4, "all-linear")
            == lora_parameter_count(config, 4, "attention") + lora_parameter_count(config, 4, "mlp"))


def test_gemma2_2b_counts_from_its_shapes():
    c = known_config("google/gemma-2-2b-jpn-it")
    h, q, kv, m = c.hidden_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim, c.intermediate_size
    attention = (h + q) + 2 * (h + kv) + (q + h)
    mlp = 2 * (h + m) + (m + h)
    for r in (8, 16):
        assert lora_parameter_count(c, r, "attention") == c.num_hidden_layers * r * attention
        assert lora_parameter_count(c, r, "all-linear") == c.num_hidden_layers * r * (attention + mlp)


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_count_refuses_a_bad_rank(r):
    with pytest.raises(ValueError, match="rank must be a positive"):
        lora_parameter_count(tiny_gemma2_config(), r)


def test_count_refuses_an_unknown_target():
    with pytest.raises(ValueError, match=r"\['qkv'\] not found"):
        lora_parameter_count(tiny_gemma2_config(), 4, ["qkv"])


def test_plot_rank_draws_one_line_per_target_with_the_counts():
    config = tiny_gemma2_config()
    ranks = (2, 4, 8)
    fig = plot_rank(config, ranks=ranks, targets=("attention", "all-linear"))
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["attention", "all-linear"]
    for ln, t in zip(lines, ("attention", "all-linear")):
        assert list(ln.get_xdata()) == list(ranks)
        assert list(ln.get_ydata()) == pytest.approx([lora_parameter_count(config, r, t) / 1e6
                                                      for r in ranks])


# --- lesson 05: lengths and the label mask --------------------------------------------------
SHORT = [{"role": "system", "content": "問いで導く先生です。"},
         {"role": "user", "content": "2³×2⁴ は？"},
         {"role": "assistant", "content": "2³ は 2 をいくつかけた数ですか？"}]


def test_label_mask_rows_follow_tokenize_dialogue(tokenizer):
    rows = label_mask_rows(tokenizer, SHORT)
    ex = tokenize_dialogue(tokenizer, SHORT)
    assert [r[1] for r in rows] == ex["input_ids"]
    assert [r[3] for r in rows] == [lab != IGNORE for lab in ex["labels"]]
    tokens = [r[2] for r in rows]
    trained = [t for _, _, t, keep in rows if keep]
    assert tokens[0] == "<bos>" and not rows[0][3]
    assert trained[-1] == "<end_of_turn>"                       # the tutor's end is learned
    assert tokens.count("<end_of_turn>") == 2 and sum(
        keep for _, _, t, keep in rows if t == "<end_of_turn>") == 1   # the learner's is not
    text = tokenizer.convert_tokens_to_string([t for t in trained[:-1]])
    assert text == SHORT[2]["content"]                          # only the tutor's words


def test_plot_label_mask_boxes_match_the_mask(tokenizer):
    rows = label_mask_rows(tokenizer, SHORT)
    fig = plot_label_mask(tokenizer, SHORT, per_row=10)
    boxes = fig.axes[0].patches
    assert len(boxes) == len(rows)
    colours = {tuple(b.get_facecolor()) for b, r in zip(boxes, rows) if r[3]}
    masked = {tuple(b.get_facecolor()) for b, r in zip(boxes, rows) if not r[3]}
    assert len(colours) == 1 and len(masked) == 1 and colours != masked
    assert [t.get_text() for t in fig.axes[0].texts] == [str(i) for i in range(len(rows))]
    with pytest.raises(ValueError, match="per_row"):
        plot_label_mask(tokenizer, SHORT, per_row=0)


def test_plot_label_mask_names_a_dialogue_without_tutor_turn(tokenizer):
    from socratic_lora import DialogueError
    with pytest.raises(DialogueError, match="d-9: no tutor"):
        plot_label_mask(tokenizer, SHORT[:2], where="d-9")


def test_plot_lengths_histograms_every_split(tokenizer):
    a = [{"id": "a", "messages": SHORT}]
    b = [{"id": "b", "messages": SHORT[1:]}, {"id": "c", "messages": SHORT * 1}]
    fig = plot_lengths({"train": a, "eval": b}, tokenizer, bins=5, max_length=200)
    ax = fig.axes[0]
    heights = [sum(p.get_height() for p in c) for c in ax.containers]
    assert heights == [1, 2]                                    # every dialogue is counted once
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("train: 1 dialogues") and "max_length = 200" in labels
    assert token_lengths(a, tokenizer) == [len(tokenize_dialogue(tokenizer, SHORT)["input_ids"])]
    with pytest.raises(ValueError, match="splits is empty"):
        plot_lengths({}, tokenizer)
