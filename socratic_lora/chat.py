"""The Gemma turn format, and tokenisation that trains only on the tutor's words.

    from socratic_lora import render_chat, tokenize_dialogue
    text = render_chat(messages, add_generation_prompt=True)   # lesson 05 (data and labels)
    ex = tokenize_dialogue(tokenizer, messages)                 # input_ids, labels (-100 = ignored)

`render_chat` produces the same string as gemma-2-2b-jpn-it's own chat template
(data/gemma_chat_template.jinja), except that a system message, which that template refuses,
is folded into the first user turn.
"""
from __future__ import annotations

from importlib.resources import files

IGNORE = -100  # label value the loss skips
BOS, START, END = "<bos>", "<start_of_turn>", "<end_of_turn>"


def chat_template() -> str:
    """gemma-2-2b-jpn-it's chat template, byte for byte (attached to the offline default model)."""
    return files("socratic_lora").joinpath("data/gemma_chat_template.jinja").read_text("utf-8")


class DialogueError(ValueError):
    """A dialogue that cannot be rendered or trained on; the message names the dialogue."""


def fold_system(messages: list[dict], where: str = "dialogue") -> list[dict]:
    """Fold a leading system message into the first user turn; check roles alternate."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") == "system":
        system = msgs.pop(0)["content"].strip()
        if not msgs or msgs[0].get("role") != "user":
            raise DialogueError(f"{where}: a system message must be followed by a user message")
        msgs[0]["content"] = f"{system}\n\n{msgs[0]['content'].strip()}"
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want:
            raise DialogueError(f"{where}: message {i} has role {m.get('role')!r}, expected "
                                f"{want!r} (user and assistant must alternate, user first)")
    return msgs


def segments(messages: list[dict], add_generation_prompt: bool = False, where: str = "dialogue"):
    """The rendered text as (piece, trainable) pairs: the tutor's words and its <end_of_turn>
    are trainable; <bos>, the turn headers, the learner's words and newlines are not."""
    out = [(BOS, False)]
    for m in fold_system(messages, where):
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append((f"{START}{role}\n", False))
        # Jinja's `trim` strips the same characters as Python's str.strip().
        out.append((m["content"].strip() + END, m["role"] == "assistant"))
        out.append(("\n", False))
    if add_generation_prompt:
        out.append((f"{START}model\n", False))
    return out


def instruction_segments(messages: list[dict], eos: str, add_generation_prompt: bool = False,
                         where: str = "dialogue"):
    """The source training report's prompt format (### 指示: / ### 応答:), for models without
    Gemma's turn tokens (rinna/japanese-gpt-neox-3.6b); the response and <eos> are trainable."""
    out = []
    for i, m in enumerate(fold_system(messages, where)):
        if m["role"] == "user":
            sep = "\n\n" if i else ""
            out.append((f"{sep}### 指示:\n{m['content'].strip()}\n\n### 応答:\n", False))
        else:
            out.append((m["content"].strip() + eos, True))
    if not add_generation_prompt and out and not out[-1][1]:
        out.pop()  # a trailing prompt with no answer
    return out


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The dialogue as the model sees it (Gemma turn format)."""
    return "".join(p for p, _ in segments(messages, add_generation_prompt))


def pieces(messages, tokenizer, prompt_format: str = "gemma", where: str = "dialogue",
           add_generation_prompt: bool = False):
    """(text, trainable) pieces of a dialogue in `prompt_format` (gemma | instruction)."""
    if prompt_format == "gemma":
        return segments(messages, add_generation_prompt, where)
    if prompt_format == "instruction":
        return instruction_segments(messages, tokenizer.eos_token, add_generation_prompt, where)
    raise ValueError(f"prompt_format={prompt_format!r}: use gemma or instruction")


def tokenize_dialogue(tokenizer, messages: list[dict], max_length: int | None = None,
                      where: str = "dialogue", prompt_format: str = "gemma") -> dict:
    """Token ids and labels: labels copy the ids on the tutor's turns, -100 elsewhere.

    Each piece is tokenised on its own and the pieces are joined, so a label boundary never
    falls inside a token (turn markers are single special tokens, so the ids equal those of
    tokenising the whole string; the tests check this). Truncation, if any, happens at turn
    boundaries in the training pipeline; here `max_length` is only checked.
    """
    ids, labels = [], []
    for piece, trainable in pieces(messages, tokenizer, prompt_format, where):
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if trainable else [IGNORE] * len(piece_ids)
    if all(x == IGNORE for x in labels):
        raise DialogueError(f"{where}: no tutor (assistant) turn, so no token to train on")
    if max_length is not None and len(ids) > max_length:
        raise DialogueError(f"{where}: {len(ids)} tokens, more than max_length={max_length}")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


# --- the label mask, token by token (lesson 05) -------------------------------------------
def label_mask_rows(tokenizer, messages: list[dict], where: str = "dialogue") -> list[tuple]:
    """(position, token id, token text, trained) for every token of `messages` as
    `tokenize_dialogue` makes them; trained means the label is the token (not -100)."""
    ex = tokenize_dialogue(tokenizer, messages, where=where)
    return [(i, t, tokenizer.convert_ids_to_tokens(t), lab != IGNORE)
            for i, (t, lab) in enumerate(zip(ex["input_ids"], ex["labels"]))]


def plot_label_mask(tokenizer, messages: list[dict], per_row: int = 20, where: str = "dialogue"):
    """A matplotlib Figure: one box per token of the dialogue, in reading order, `per_row`
    boxes a row; trained tokens (tutor words and its <end_of_turn>) filled, masked ones
    (label -100: <bos>, turn headers, learner and system words, newlines) grey. Boxes show
    the token position, not its text: Japanese text needs a CJK font that a build machine
    may lack; pair the figure with `label_mask_rows` to read the tokens."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if per_row <= 0:
        raise ValueError(f"per_row={per_row!r}: must be a positive number of boxes per row")
    rows = label_mask_rows(tokenizer, messages, where)
    n_rows = -(-len(rows) // per_row)
    fig, ax = plt.subplots(figsize=(0.42 * per_row + 0.4, 0.42 * n_rows + 1.0), dpi=110)
    colors = {True: "#f28e2b", False: "#d9d9d9"}
    special = {BOS, START, END}
    for pos, _, token, trained in rows:
        x, y = pos % per_row, -(pos // per_row)
        ax.add_patch(Rectangle((x, y), 0.92, 0.92, facecolor=colors[trained],
                               edgecolor="black" if token in special else "white",
                               linewidth=1.2 if token in special else 0.5))
        ax.text(x + 0.46, y + 0.46, str(pos), ha="center", va="center", fontsize=6)
    ax.set_xlim(-0.1, per_row + 0.1)
    ax.set_ylim(-(n_rows - 1) - 0.1, 1.02)
    ax.set_aspect("equal")
    ax.axis("off")
    trained = sum(r[3] for r in rows)
    ax.legend(handles=[Patch(facecolor=colors[True], label=f"trained: label = token ({trained})"),
                       Patch(facecolor=colors[False], label=f"masked: label = -100 ({len(rows) - trained})"),
                       Patch(facecolor="white", edgecolor="black", label="special token")],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7, frameon=False)
    ax.set_title(f"label mask of {where}: {len(rows)} tokens, number = position", fontsize=9)
    fig.tight_layout()
    return fig
