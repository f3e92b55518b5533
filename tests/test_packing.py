"""Packing (prepare.pack_examples, PackedCollator): several examples per row, each attending
only to itself. The model-level tests compare a packed batch with the same examples run one
by one: same loss, same LoRA gradients, for the plain model and the fast path."""
import random

import pytest
import torch

from conftest import VOCAB, random_examples as _examples, tiny_gemma2_config
from socratic_lora.prepare import PackedCollator, pack_examples

IGNORE = -100


def test_every_example_lies_whole_in_one_row_in_its_order():
    lengths = [random.Random(1).randrange(2, 40) for _ in range(150)]
    ex = _examples(lengths)
    rows, rep = pack_examples(ex, 48)
    assert rep.examples == 150 and rep.rows == len(rows)
    assert rep.tokens == sum(lengths) and rep.fill == sum(lengths) / (48 * len(rows))
    assert "150 examples into" in str(rep) and "rows of 48 tokens" in str(rep)
    seen = []
    for row in rows:
        assert row["length"] == len(row["input_ids"]) == len(row["labels"]) == \
            len(row["position_ids"]) <= 48
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["n_examples"] and starts[0] == 0
        bounds = starts + [row["length"]]
        for a, b in zip(bounds, bounds[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            match = [i for i, e in enumerate(ex) if e["input_ids"] == row["input_ids"][a:b]]
            assert match, "a segment that is no example"
            i = next(i for i in match if i not in seen)
            seen.append(i)
            assert row["labels"][a] == IGNORE                    # never predicts across
            assert row["labels"][a + 1:b] == ex[i]["labels"][1:]
        ids_in_row = seen[-len(starts):]
        assert ids_in_row == sorted(ids_in_row)                 # original order inside a row
    assert sorted(seen) == list(range(150))                     # each example exactly once


def test_best_fit_fills_rows_and_is_deterministic():
    ex = _examples([6, 5, 4, 3, 2])
    rows, rep = pack_examples(ex, 10)
    assert [r["length"] for r in rows] == [10, 10] and rep.fill == 1.0
    assert [r["n_examples"] for r in rows] == [2, 3]           # 6+4, 5+3+2
    assert pack_examples(ex, 10)[0] == rows
    rows, _ = pack_examples(_examples([10, 10, 1]), 10)
    assert [r["length"] for r in rows] == [10, 10, 1]


def test_packing_refuses_examples_it_cannot_place():
    with pytest.raises(ValueError, match=r"example 1 has 12 tokens, more than the packing "
                                         r"length 10.*max_length <= 10"):
        pack_examples(_examples([4, 12]), 10)
    bad = _examples([4])
    bad[0]["labels"] = bad[0]["labels"][:-1]
    with pytest.raises(ValueError, match="example 0: 3 labels for 4 input ids"):
        pack_examples(bad, 10)
    with pytest.raises(ValueError, match="packing length=0"):
        pack_examples(_examples([4]), 0)


def test_packed_collator_pads_with_a_segment_of_its_own():
    rows, _ = pack_examples(_examples([5, 4, 7]), 12)
    c = PackedCollator(pad_id=0, length=16)
    b = c(rows)
    # no attention mask, and no KV cache (with one, transformers ignores packed rows)
    assert set(b) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert b["use_cache"] is False
    assert b["input_ids"].shape == (2, 16) and c.tokens == 16
    # row 0: examples 0 (5 tokens) and 2 (7), then 4 padding tokens at position 0 (each a
    # segment of its own, never past a learned position table)
    assert b["position_ids"][0].tolist() == list(range(5)) + list(range(7)) + [0] * 4
    assert b["labels"][0, 12:].eq(IGNORE).all() and b["input_ids"][0, 12:].eq(0).all()
    assert b["position_ids"][1].tolist() == list(range(4)) + [0] * 12
    c.counting = False                   # evaluation batches are not counted
    c(rows)
    assert c.tokens == 16
    # plain (evaluation) examples: position ids per example, padded to the longest, not 16
    plain = PackedCollator(pad_id=0, length=16)(_examples([5, 3]))
    assert plain["input_ids"].shape == (2, 8)
    assert plain["position_ids"][1].tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="does not fit the collator's length 4"):
        PackedCollator(pad_id=0, length=4)(rows)


def _tiny(kind, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    if kind == "gemma2":
        cfg = tiny_gemma2_config(layers=2)
        cfg.sliding_window = 8                # shorter than the examples: the window matters
    else:
        cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, max_position_embeddings=256, sliding_window=8,
                               pad_token_id=0, eos_token_id=1, bos_token_id=2)
    cfg._attn_implementation = "eager"
    cfg.use_cache = False    # as models.load_model sets for training: with a cache,
    #                          transformers does not look for packed rows
    model = AutoModelForCausalLM.from_config(cfg).double()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    return model


def _loss_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
@pytest.mark.parametrize("fast", [False, True])
def test_packed_batch_gives_the_loss_and_gradients_of_the_examples_one_per_row(kind, fast):
    from socratic_lora.fast import FastSettings, apply_fast_path
    ex = _examples([11, 7, 5, 13, 9, 4], seed=3)
    rows, rep = pack_examples(ex, 24)
    assert rep.rows == 3
    packed = PackedCollator(pad_id=0, length=24)(rows)

    def model():
        m = _tiny(kind)
        if fast:
            apply_fast_path(m, FastSettings(attention="eager", ce_chunk=7, checkpoint="none"))
        return m
    # The reference: each example alone (no padding), its mean token loss weighted by its
    # number of predicted tokens, as the batch mean over all predicted tokens is.
    ref_model = model()
    counts = [sum(t != IGNORE for t in e["labels"][1:]) for e in ex]
    ref_loss, ref = 0.0, {}
    for e, n in zip(ex, counts):
        one = {k: torch.tensor([e[k]]) for k in ("input_ids", "labels")}
        l_i, g_i = _loss_grads(ref_model, one)
        ref_loss += l_i * n / sum(counts)
        for k, g in g_i.items():
            ref[k] = ref.get(k, 0) + g * n / sum(counts)
    loss, got = _loss_grads(model(), packed)
    # transformers' loss casts the logits to float32: float32-exact, not float64-exact.
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    assert ref.keys() == got.keys() and len(ref) == 2 * 2 * 2
    for n in ref:
        err = (got[n] - ref[n]).norm() / ref[n].norm()
        assert err < 1e-5, (n, err.item())
    # Without the restart of the position ids, the examples would see each other: the loss
    # changes, so the comparison above is not vacuous.
    flat = dict(packed, position_ids=torch.arange(24).expand(3, 24))
    assert abs(_loss_grads(model(), flat)[0] - ref_loss) > 1e-4


def test_train_with_packing_reports_rows_and_real_tokens(tmp_path, tiny_chat_dir):
    from socratic_lora.train import load_settings, train
    s = load_settings("demo", model=tiny_chat_dir, placement="cpu", train_data="train",
                      eval_data="eval", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      gradient_checkpointing=False, batch_size=4, learning_rate=5e-3, warmup=0,
                      logging_steps=1, save_steps=100, max_steps=3, max_length=512,
                      packing=True, pack_length=1024, output_dir=str(tmp_path / "run"))
    report = train(s)
    assert report["steps"] == 3 and report["eval_loss"] > 0
    rows = report["examples"]["packed_rows"]
    assert report["examples"]["train"] == 224 and rows < 224
    line = next(x for x in report["data_steps"] if x.startswith("packing:"))
    assert f"224 examples into {rows} rows of 1024 tokens" in line
    # 3 steps of 4 packed rows (not the batch the loader read ahead); the 49 evaluation
    # dialogues (about 14,000 tokens) are not counted
    counted = report["tokens_per_s"] * report["wall_time_s"]
    assert 3 * 4 * 600 < counted <= 3 * 4 * 1024, counted
    # samples/s counts examples: each packed row holds 224 / rows of them on average
    assert report["samples_per_s"] == pytest.approx(report["packed_rows_per_s"] * 224 / rows)
    assert report["samples_per_s"] > report["packed_rows_per_s"] > 0


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gpt_neox", "llama", "qwen2"])
def test_the_families_that_skip_the_packing_probe_pass_it(monkeypatch, family):
    """train.check_packing skips its probe for PACKING_CHECKED (the probe would compile extra
    graphs on a GPU): each of them must pass the probe, so the list cannot be wrong."""
    import socratic_lora.train as train_mod
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING
    assert family in train_mod.PACKING_CHECKED
    torch.manual_seed(0)
    cfg = CONFIG_MAPPING[family](vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                 use_cache=False, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg).train()
    monkeypatch.setattr(train_mod, "PACKING_CHECKED", set())
    train_mod.check_packing(model)                    # no error: examples kept apart
    assert model.training                             # the probe restores the mode
    # the probe is not vacuous: without restarting positions being honoured it refuses
    monkeypatch.setattr("transformers.masking_utils.find_packed_sequence_indices",
                        lambda position_ids: None)
    with pytest.raises(ValueError, match="lets packed examples see each other"):
        train_mod.check_packing(model)


def test_neftune_with_packing_is_refused_naming_the_key():
    """NEFTune's noise is alpha / sqrt(L d) with L the sequence length; a packed row would
    count as one long sequence, so the combination is refused rather than silently weakened."""
    from socratic_lora.train import load_settings
    with pytest.raises(ValueError, match="key 'neftune_alpha'.*packing: false"):
        load_settings("demo", packing=True, neftune_alpha=5.0)
    assert load_settings("demo", neftune_alpha=5.0).neftune_alpha == 5.0
    assert load_settings("demo", packing=True).packing is True
