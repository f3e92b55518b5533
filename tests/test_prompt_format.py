"""An adapter trained in one prompt format is chatted with and evaluated in that format."""
import json

import pytest

from socratic_lora import generate
from socratic_lora.generate import load_chat_model, model_prompt_format, reply, reply_batch
from socratic_lora.train import load_settings, train


@pytest.fixture(scope="module")
def instruction_adapter(tmp_path_factory, tiny_chat_dir):
    out = tmp_path_factory.mktemp("instr_run")
    train(load_settings("demo", model=tiny_chat_dir, eval_data=None, max_steps=1, batch_size=2,
                        lora_r=2, lora_alpha=4, prompt_format="instruction", output_dir=str(out)))
    return out / "adapter"


@pytest.fixture
def formats(monkeypatch):
    """The prompt_format each prompt was written in."""
    seen = []
    real = generate.pieces

    def spy(messages, tok, prompt_format="gemma", *a, **k):
        seen.append(prompt_format)
        return real(messages, tok, prompt_format, *a, **k)
    monkeypatch.setattr(generate, "pieces", spy)
    return seen


def test_training_records_the_format_and_chat_uses_it(instruction_adapter, formats, tmp_path):
    record = json.loads((instruction_adapter / "socratic_lora.json").read_text())
    assert record["prompt_format"] == "instruction"
    model, tok = load_chat_model("default", adapter=str(instruction_adapter))
    assert model_prompt_format(model) == "instruction"
    msgs = [{"role": "user", "content": "なぜ空は青いの？"}]
    reply(model, tok, msgs, max_new_tokens=2)
    reply_batch(model, tok, [msgs], max_new_tokens=2)
    assert formats and set(formats) == {"instruction"}
    formats.clear()
    reply(model, tok, msgs, max_new_tokens=2, prompt_format="gemma")    # an explicit choice wins
    assert set(formats) == {"gemma"}
    forced, _ = load_chat_model("default", adapter=str(instruction_adapter), prompt_format="gemma")
    assert model_prompt_format(forced) == "gemma"
    with pytest.raises(ValueError, match="use gemma or instruction"):
        load_chat_model("default", adapter=str(instruction_adapter), prompt_format="chatml")


def test_a_merged_folder_keeps_the_format(instruction_adapter, tmp_path):
    from socratic_lora.export import merge_adapter
    merged = merge_adapter(instruction_adapter, tmp_path / "merged")
    model, _ = load_chat_model(str(merged))
    assert model_prompt_format(model) == "instruction"
    import os
    os.environ["HOME"], home = str(tmp_path), os.environ.get("HOME")
    try:
        model, _ = load_chat_model("~/merged")                 # the record is found there too
    finally:
        os.environ["HOME"] = home
    assert model_prompt_format(model) == "instruction"


def test_without_a_record_the_format_is_gemma(tiny_chat_dir, tmp_path, instruction_adapter):
    import shutil
    old = tmp_path / "old_adapter"
    shutil.copytree(instruction_adapter, old)
    (old / "socratic_lora.json").write_text(json.dumps({"base": tiny_chat_dir}))
    model, _ = load_chat_model("default", adapter=str(old))
    assert model_prompt_format(model) == "gemma"
    plain, _ = load_chat_model(tiny_chat_dir)
    assert model_prompt_format(plain) == "gemma"
    (old / "socratic_lora.json").write_text(json.dumps({"base": tiny_chat_dir,
                                                        "prompt_format": "alpaca"}))
    with pytest.raises(ValueError, match="prompt_format 'alpaca' is not one of"):
        load_chat_model("default", adapter=str(old))


def test_cli_chat_follows_the_adapter_and_the_flag(capsys, instruction_adapter, formats):
    from socratic_lora.cli import main
    assert main(["chat", "--adapter", str(instruction_adapter), "--prompt", "こんにちは",
                 "--preset", "greedy"]) == 0
    assert set(formats) == {"instruction"}
    formats.clear()
    assert main(["chat", "--adapter", str(instruction_adapter), "--prompt", "こんにちは",
                 "--preset", "greedy", "--prompt-format", "gemma"]) == 0
    assert set(formats) == {"gemma"}


def test_reply_refuses_a_prompt_past_the_context_window(tiny_chat_dir):
    """Generating past max_position_embeddings gives garbage, silently."""
    model, tok = load_chat_model(tiny_chat_dir)
    window = generate.context_window(model)
    words = " ".join(str(i) for i in range(window))          # digits: one token each
    long_turn = [{"role": "user", "content": words}]
    with pytest.raises(ValueError, match="even with older turns dropped"):
        reply(model, tok, long_turn, max_new_tokens=8)
    with pytest.raises(ValueError, match="leaves no room for the prompt"):
        reply(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=window)
    half = " ".join(str(i) for i in range(window // 4))
    history = [{"role": "user", "content": half}, {"role": "assistant", "content": half},
               {"role": "user", "content": "短い質問？"}]
    assert isinstance(reply(model, tok, history, max_new_tokens=4), str)   # old turns dropped


def test_a_relative_local_base_is_recorded_as_an_absolute_path(monkeypatch, tmp_path,
                                                                tiny_chat_dir):
    from pathlib import Path
    monkeypatch.chdir(Path(tiny_chat_dir).parent)
    out = tmp_path / "rel_run"
    train(load_settings("demo", model=Path(tiny_chat_dir).name, eval_data=None, max_steps=1,
                        batch_size=2, lora_r=2, lora_alpha=4, output_dir=str(out)))
    record = json.loads((out / "adapter" / "socratic_lora.json").read_text())
    assert record == {"base": str(Path(tiny_chat_dir).resolve()), "prompt_format": "gemma"}
    monkeypatch.chdir(tmp_path)                       # from elsewhere, the base is still found
    model, _ = load_chat_model("default", adapter=str(out / "adapter"))
    assert model_prompt_format(model) == "gemma"


def test_eval_writes_every_system_in_the_adapter_format(instruction_adapter, formats, tmp_path):
    from socratic_lora.evaluate import run_eval
    res = run_eval("default", str(instruction_adapter), "eval", ["base", "prompted", "tuned"],
                   limit=2, max_new_tokens=2)
    assert res["prompt_format"] == "instruction" and set(formats) == {"instruction"}
    formats.clear()
    res = run_eval("default", str(instruction_adapter), "eval", ["base", "tuned"], limit=1,
                   max_new_tokens=2, prompt_format="gemma")
    assert res["prompt_format"] == "gemma" and set(formats) == {"gemma"}


def test_interactive_chat_goes_on_after_a_message_that_does_not_fit(capsys, monkeypatch):
    from socratic_lora.cli import main
    lines = iter(["短い", "とても長い", "まだ話したい"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    asked = []

    def fake_reply(model, tok, history, **kw):
        asked.append(history[-1]["content"])
        if history[-1]["content"] == "とても長い":
            raise ValueError("the prompt is 9999 tokens even with older turns dropped")
        assert all(m["content"] != "とても長い" for m in history)     # not kept in history
        return "どう思いますか？"
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(generate, "load_chat_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(generate, "reply", fake_reply)
    assert main(["chat"]) == 0
    out = capsys.readouterr().out
    assert "(not sent: the prompt is 9999 tokens" in out
    assert asked == ["短い", "とても長い", "まだ話したい"]          # the chat went on
