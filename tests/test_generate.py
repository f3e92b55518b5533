import pytest
import torch

from socratic_lora.generate import PRESETS, fit_history, load_chat_model, reply, reply_batch, stop_ids
from socratic_lora.train import load_settings, train


def test_presets_from_the_sources():
    assert PRESETS["report"] == dict(do_sample=True, temperature=0.7, top_p=0.75, top_k=40,
                                     no_repeat_ngram_size=2, max_new_tokens=256)
    assert PRESETS["competition"]["repetition_penalty"] == 1.1
    assert PRESETS["greedy"]["do_sample"] is False


def test_stops_on_end_of_turn_and_eos(tokenizer):
    ids = stop_ids(tokenizer)
    assert tokenizer.eos_token_id in ids
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in ids


def test_history_is_trimmed_from_the_oldest_exchange(tokenizer):
    msgs = [{"role": "system", "content": "先生です"}]
    for i in range(20):
        msgs += [{"role": "user", "content": f"質問{i}" * 10}, {"role": "assistant", "content": f"答え{i}"}]
    msgs.append({"role": "user", "content": "最後の質問"})
    kept = fit_history(tokenizer, msgs, max_prompt_tokens=120)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "最後の質問"
    assert kept[1]["role"] == "user" and len(kept) < len(msgs)
    from socratic_lora.chat import render_chat
    assert len(tokenizer(render_chat(kept, True), add_special_tokens=False)["input_ids"]) <= 120


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_chat_dir):
    out = tmp_path_factory.mktemp("adapter_run")
    train(load_settings("demo", model=tiny_chat_dir, eval_data=None, max_steps=2, batch_size=2,
                        lora_r=4, lora_alpha=8, output_dir=str(out)))
    return out / "adapter"


def test_batch_generation_with_left_padding_equals_one_by_one(tiny_chat_dir):
    model, tok = load_chat_model(tiny_chat_dir)
    side = tok.padding_side
    convs = [[{"role": "user", "content": "短い"}],
             [{"role": "user", "content": "これはずっと長い質問で、左に詰め物が必要になります"}]]
    batch = reply_batch(model, tok, convs, preset="greedy", max_new_tokens=8)
    single = [reply(model, tok, c, preset="greedy", max_new_tokens=8) for c in convs]
    assert batch == single
    assert tok.padding_side == side             # restored afterwards


def test_fast_decoder_batch_equals_generate_and_refuses_what_it_lacks(tiny_chat_dir):
    """fast=True runs FastDecoder (eagerly on the CPU: the step a GPU records as a graph)."""
    model, tok = load_chat_model(tiny_chat_dir)
    convs = [[{"role": "user", "content": "短い"}],
             [{"role": "user", "content": "これはずっと長い質問で、左に詰め物が必要になります"}],
             [{"role": "user", "content": "三つ目"}]]
    plain = reply_batch(model, tok, convs, preset="greedy", max_new_tokens=12, fast=False)
    fast = reply_batch(model, tok, convs, preset="greedy", max_new_tokens=12, fast=True)
    assert fast == plain and any(plain)
    assert hasattr(model, "_socratic_fast_decoder")
    # default on the CPU: plain generate (no decoder made for a fresh model)
    fresh, _ = load_chat_model(tiny_chat_dir)
    assert reply_batch(fresh, tok, convs, max_new_tokens=12) == plain
    assert not hasattr(fresh, "_socratic_fast_decoder")
    with pytest.raises(ValueError, match="repetition_penalty"):
        reply_batch(model, tok, convs, preset="competition", fast=True)


def test_base_adapter_and_merged_agree(tmp_path, tiny_chat_dir, trained_adapter):
    from socratic_lora.export import merge_adapter
    base, tok = load_chat_model(tiny_chat_dir)
    tuned, _ = load_chat_model("default", adapter=str(trained_adapter))   # base from the record
    merged_dir = merge_adapter(trained_adapter, tmp_path / "merged", dtype=torch.float32)
    merged, _ = load_chat_model(str(merged_dir))
    x = torch.tensor([tok("<start_of_turn>user\nこんにちは", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b, c = (m(input_ids=x).logits for m in (base, tuned, merged))
    assert not torch.allclose(a, b, atol=1e-4)                   # the adapter changes the model
    torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4)       # merging keeps the change
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "chat_template.jinja").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_adapter(trained_adapter, merged_dir)


def test_merge_overwrite_never_replaces_the_folder_holding_the_adapter_or_base(
        tmp_path, tiny_chat_dir, trained_adapter):
    import shutil

    from socratic_lora.export import merge_adapter
    run = tmp_path / "run"
    shutil.copytree(trained_adapter, run / "adapter")
    (run / "checkpoint-2").mkdir()
    for out in (run, run / "adapter"):
        with pytest.raises(FileExistsError, match="it holds the adapter being merged"):
            merge_adapter(run / "adapter", out, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoint-2"]
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_chat_dir, base)
    with pytest.raises(FileExistsError, match="it holds the base model being merged"):
        merge_adapter(run / "adapter", base.parent, model=str(base), overwrite=True)
    assert (base / "model.safetensors").exists()
    merged = merge_adapter(run / "adapter", run / "merged", model=str(base), overwrite=True)
    assert (merged / "model.safetensors").exists() and (run / "adapter").exists()


def test_chat_command_one_shot(capsys, trained_adapter):
    from socratic_lora.cli import main
    assert main(["chat", "--adapter", str(trained_adapter), "--prompt", "なぜ空は青いの？"]) == 0
    out = capsys.readouterr().out
    assert "you> なぜ空は青いの？" in out and "tutor> " in out


def test_cli_errors_are_one_line(capsys):
    from socratic_lora.cli import main
    assert main(["train", "--config", "no_such_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("socratic-lora train: error:")


def test_eval_command_writes_table_and_chart(tmp_path, trained_adapter):
    import json
    from socratic_lora.cli import main
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(trained_adapter), "--split", "adversarial", "--limit", "2",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    assert list(res["systems"]) == ["base", "prompted", "fewshot", "tuned"]
    assert all("leakage" in m and "question_rate" in m for m in res["systems"].values())
    assert "| tuned |" in (out / "eval.md").read_text() and (out / "eval.png").stat().st_size > 1000


def test_reply_ngram_ban_ignores_the_prompt_and_never_bans_the_stop_tokens():
    from transformers import NoRepeatNGramLogitsProcessor

    from socratic_lora.generate import ReplyNoRepeatNGram
    # prompt [.., 5, 9(= "？"), 1(= <end_of_turn>)], reply so far [7, 8, 7, 5, 9]
    ids = torch.tensor([[3, 5, 9, 1, 7, 8, 7, 5, 9]])
    scores = torch.zeros(1, 12)
    out = ReplyNoRepeatNGram(2, start=4, keep=[1])(ids, scores.clone())
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == []   # 9 -> 1 only in the prompt
    hf = NoRepeatNGramLogitsProcessor(2)(ids, scores.clone())
    assert torch.isinf(hf[0, 1])          # transformers' own setting bans ending the turn here
    out = ReplyNoRepeatNGram(2, start=4, keep=[1])(torch.tensor([[3, 5, 7, 8, 7]]), scores.clone())
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == []   # reply = [7]: nothing yet
    out = ReplyNoRepeatNGram(2, start=2, keep=[1])(torch.tensor([[3, 5, 7, 8, 1, 7]]),
                                                   scores.clone())
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [8]  # 7 -> 8 seen in the reply
    out = ReplyNoRepeatNGram(2, start=2, keep=[1])(torch.tensor([[3, 5, 7, 1, 4, 7]]),
                                                   scores.clone())
    assert not torch.isinf(out[0, 1])                               # a stop token: never banned
    # Otherwise it is transformers' rule applied to the reply alone (random rows, n = 1..4).
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        for _ in range(30):
            seq = torch.randint(0, 6, (3, 14), generator=g)
            s = torch.randn(3, 6, generator=g)
            ours = ReplyNoRepeatNGram(n, start=5)(seq, s.clone())
            ref = NoRepeatNGramLogitsProcessor(n)(seq[:, 5:], s.clone())
            assert torch.equal(ours, ref)
    for bad in (0.5, 0, True):
        with pytest.raises(ValueError, match=f"no_repeat_ngram_size={bad!r}"):
            ReplyNoRepeatNGram(bad, start=0)


def test_report_preset_bans_ngrams_through_the_reply_only_processor(tiny_chat_dir, monkeypatch):
    """reply and reply_batch hand generate a ReplyNoRepeatNGram (starting after the prompt),
    not transformers' no_repeat_ngram_size."""
    from socratic_lora.generate import ReplyNoRepeatNGram
    model, tok = load_chat_model(tiny_chat_dir)
    seen = []
    real = model.generate

    def spy(**kw):
        seen.append(kw)
        return real(**kw)
    monkeypatch.setattr(model, "generate", spy)
    conv = [{"role": "user", "content": "なぜ？"}]
    longer = [{"role": "user", "content": "これはずっと長い質問で、左に詰め物が必要になります"}]
    reply(model, tok, conv, preset="report", max_new_tokens=4)
    reply_batch(model, tok, [conv, longer], preset="report", max_new_tokens=4)
    reply(model, tok, conv, preset="greedy", max_new_tokens=4)
    reply(model, tok, conv, preset="report", max_new_tokens=4, logits_processor=None)
    for kw in seen[:2] + seen[3:]:
        assert "no_repeat_ngram_size" not in kw
        (proc,) = kw["logits_processor"]
        assert isinstance(proc, ReplyNoRepeatNGram) and proc.size == 2
        assert proc.start == kw["input_ids"].shape[1] and set(stop_ids(tok)) <= proc.keep
    # the batch's rows differ in length: the ban starts after the padded prompt of both
    assert (seen[1]["attention_mask"] == 0).any() and seen[1]["input_ids"].shape[0] == 2
    assert "logits_processor" not in seen[2]
