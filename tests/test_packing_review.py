"""An independent review of packing (prepare.pack_examples, PackedCollator, train's
`packing: true`): the edge cases tests/test_packing.py does not cover. Five of them found
bugs, since fixed: an empty example shifted every later label of its row; a model config with
use_cache=True let packed examples see each other; models whose masks ignore position ids
(OPT, ...) were accepted; padding positions ran past a learned position table; tokens/s
counted evaluation tokens."""
import copy
import json
import math
import random

import pytest
import torch

from conftest import VOCAB, random_examples, tiny_gemma2_config, tiny_neox_config
from socratic_lora.prepare import Collator, PackedCollator, pack_examples

IGNORE = -100


def _examples(lengths, seed=0, prompt=2):
    return random_examples(lengths, seed, prompt)


def _segments(position_ids):
    """[start, end) of each stretch whose position ids count up from 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    return list(zip(starts, starts[1:] + [len(position_ids)]))


def _hf_segments(batch):
    """The segment ids transformers derives from the position ids (None: not packed)."""
    from transformers.masking_utils import find_packed_sequence_indices
    return find_packed_sequence_indices(batch["position_ids"])


# --- pack_examples: structure --------------------------------------------------------------
def test_an_example_of_exactly_the_pack_length_gets_a_row_without_a_boundary():
    ex = _examples([10, 3, 10, 7])
    rows, rep = pack_examples(ex, 10)
    assert [r["length"] for r in rows] == [10, 10, 10] and rep.fill == 1.0
    assert [r["n_examples"] for r in rows] == [1, 1, 2]
    assert rows[0]["input_ids"] == ex[0]["input_ids"]
    assert rows[0]["position_ids"] == list(range(10))
    assert rows[2]["position_ids"] == list(range(3)) + list(range(7))   # 3 before 7: input order
    # Rows that end exactly at the collator's length: no padding segment at all, and
    # transformers sees one segment in each full single-example row, two in the last.
    b = PackedCollator(pad_id=0, length=10)(rows)
    assert b["input_ids"].shape == (3, 10) and not b["labels"].eq(IGNORE).all(-1).any()
    seg = _hf_segments(b)
    assert seg[0].tolist() == [0] * 10 and seg[1].tolist() == [0] * 10
    assert seg[2].tolist() == [0] * 3 + [1] * 7


def test_a_single_example_and_no_examples():
    ex = _examples([5])
    rows, rep = pack_examples(ex, 8)
    assert len(rows) == 1 and rep.rows == 1 and rep.tokens == 5 and rep.fill == 5 / 8
    assert rows[0]["input_ids"] == ex[0]["input_ids"]
    assert rows[0]["labels"] == [IGNORE] + ex[0]["labels"][1:]
    b = PackedCollator(pad_id=0, length=8)(rows)
    # the example, then 3 padding tokens at position 0: one segment each for transformers
    assert _hf_segments(b)[0].tolist() == [0] * 5 + [1, 2, 3]   # each pad token its own
    rows, rep = pack_examples([], 8)
    assert rows == [] and (rep.examples, rep.rows, rep.tokens, rep.fill) == (0, 0, 0, 0.0)
    assert "0 examples into 0 rows" in str(rep)


def test_examples_of_one_and_two_tokens_are_segments_of_their_own():
    ex = _examples([1, 2, 1, 2, 1, 1], prompt=0)
    rows, rep = pack_examples(ex, 4)
    assert rep.tokens == 8 and rep.rows == 2 and rep.fill == 1.0
    b = PackedCollator(pad_id=0, length=4)(rows)
    seg = _hf_segments(b)
    for r, row in enumerate(rows):
        # transformers must see exactly one segment per example (a one-token example next
        # to another one-token example has the position ids 0, 0: two segments)
        assert int(seg[r, -1]) + 1 == row["n_examples"]
        for a, e in _segments(row["position_ids"]):
            assert row["labels"][a] == IGNORE
    # a one-token example has no label left to train: nothing of it is predicted
    assert sum(t != IGNORE for r in rows for t in r["labels"]) == \
        sum(t != IGNORE for e in ex for t in e["labels"][1:])


def test_examples_of_equal_length_fill_rows_in_input_order():
    ex = [{"input_ids": [100 + i] * 4, "labels": [100 + i] * 4} for i in range(9)]
    rows, rep = pack_examples(ex, 12)
    assert rep.rows == 3 and rep.fill == 1.0 and all(r["n_examples"] == 3 for r in rows)
    firsts = [[row["input_ids"][a] - 100 for a, _ in _segments(row["position_ids"])]
              for row in rows]
    assert sorted(i for f in firsts for i in f) == list(range(9))
    assert all(f == sorted(f) for f in firsts)
    rows, rep = pack_examples(ex, 10)                  # two a row, the ninth alone
    assert [r["n_examples"] for r in rows] == [2, 2, 2, 2, 1] and rep.tokens == 36


def test_pack_examples_leaves_its_input_unchanged():
    ex = _examples([6, 3, 9, 1], prompt=0)
    before = copy.deepcopy(ex)
    rows, _ = pack_examples(ex, 12)
    assert ex == before
    rows[0]["labels"][1] = 12345                       # rows do not alias the examples
    assert ex == before


@pytest.mark.parametrize("seed", range(4))
def test_random_packing_keeps_every_token_once_in_place(seed):
    """Property check over random lengths (1 .. length): each example lies whole, once, in
    one row, in input order inside the row; labels are kept but the first; and the rows are
    an any-fit packing (a new row is opened only when no open row had room), so any two rows
    together hold more than one row's worth of tokens."""
    rnd = random.Random(seed)
    length = rnd.choice([7, 16, 33])
    lengths = [rnd.randint(1, length) for _ in range(rnd.randint(1, 120))]
    ex = [{"input_ids": [i * 1000 + j for j in range(n)],
           "labels": [IGNORE if rnd.random() < 0.3 else i * 1000 + j for j in range(n)]}
          for i, n in enumerate(lengths)]
    rows, rep = pack_examples(ex, length)
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) \
            == row["length"] <= length
        segs = _segments(row["position_ids"])
        assert len(segs) == row["n_examples"]
        order = []
        for a, b in segs:
            i = row["input_ids"][a] // 1000
            assert row["input_ids"][a:b] == ex[i]["input_ids"]
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a:b] == [IGNORE] + ex[i]["labels"][1:]
            order.append(i)
        assert order == sorted(order)
        seen += order
    assert sorted(seen) == list(range(len(ex)))
    assert rep.tokens == sum(lengths) and rep.rows >= math.ceil(sum(lengths) / length)
    sizes = sorted(r["length"] for r in rows)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > length


# --- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("length", [True, 2.5, "8", -3, None])
def test_a_packing_length_that_is_not_a_positive_whole_number_is_refused(length):
    with pytest.raises(ValueError, match="packing length="):
        pack_examples(_examples([2]), length)


def test_an_example_without_tokens_is_refused():
    ex = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [], "labels": []},
          {"input_ids": [8, 9], "labels": [8, 9]}]
    # An empty example would add a label but no input id, shifting every later label.
    with pytest.raises(ValueError, match="example 1 has no tokens"):
        pack_examples(ex, 10)


# --- PackedCollator -------------------------------------------------------------------------
def test_the_pad_id_inside_examples_is_an_ordinary_token():
    """No attention mask is derived from the pad id: an example that contains it keeps its
    tokens, labels and positions; only the positions after the row's end are padding."""
    pad = 7
    ex = [{"input_ids": [pad, 5, pad, 6], "labels": [pad, 5, pad, 6]},
          {"input_ids": [8, pad, pad], "labels": [IGNORE, pad, pad]}]
    rows, _ = pack_examples(ex, 8)
    b = PackedCollator(pad_id=pad, length=10)(rows)
    assert b["input_ids"][0].tolist() == [pad, 5, pad, 6, 8, pad, pad, pad, pad, pad]
    assert b["labels"][0].tolist() == [IGNORE, 5, pad, 6, IGNORE, pad, pad, IGNORE, IGNORE,
                                       IGNORE]
    assert _hf_segments(b)[0].tolist() == [0] * 4 + [1] * 3 + [2, 3, 4]


def test_a_batch_mixing_a_full_single_example_row_with_many_example_rows():
    ex = _examples([12, 3, 4, 5], prompt=0)
    rows, _ = pack_examples(ex, 12)
    assert [r["n_examples"] for r in rows] == [1, 3]
    c = PackedCollator(pad_id=0, length=12)
    b = c(rows)
    assert b["position_ids"][0].tolist() == list(range(12))
    assert b["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    seg = _hf_segments(b)
    assert seg[0].tolist() == [0] * 12 and seg[1].tolist() == [0] * 3 + [1] * 4 + [2] * 5
    assert c.tokens == 24


def test_collator_without_a_length_pads_packed_rows_to_a_multiple_of_8():
    rows, _ = pack_examples(_examples([5, 4, 9]), 10)
    b = PackedCollator(pad_id=0)(rows)
    assert b["input_ids"].shape == (2, 16)
    assert b["position_ids"][0].tolist() == list(range(9)) + [0] * 7


def test_collator_reads_rows_as_the_trainer_gives_them():
    """Rows go through datasets.Dataset (train() builds one) and back as plain lists."""
    import datasets
    rows, _ = pack_examples(_examples([5, 4, 9, 2]), 10)
    ds = datasets.Dataset.from_list(rows)
    b = PackedCollator(pad_id=0, length=10)([ds[i] for i in range(len(ds))])
    direct = PackedCollator(pad_id=0, length=10)(rows)
    assert b.keys() == direct.keys()
    assert all(torch.equal(b[k], direct[k]) if torch.is_tensor(b[k]) else b[k] == direct[k]
               for k in direct)


# --- the model: a packed batch computes what the examples one by one compute -----------------
def _config(family, attn):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gemma2":
        cfg = tiny_gemma2_config(layers=2)
        cfg.sliding_window = 4           # shorter than the examples: the window matters
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**small, head_dim=8, sliding_window=4)
    elif family == "llama":
        cfg = LlamaConfig(**small)
    elif family == "qwen2":              # sliding window on every layer
        cfg = Qwen2Config(**small, use_sliding_window=True, sliding_window=4, max_window_layers=0,
                          layer_types=["sliding_attention"] * 2)
    elif family == "neox":
        cfg = tiny_neox_config()
    cfg._attn_implementation = attn
    cfg.use_cache = False                # as models.load_model sets for training
    return cfg


def _lora_model(family="gemma2", attn="eager", seed=0, dtype=torch.float64, use_cache=False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = _config(family, attn)
    cfg.use_cache = use_cache
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    targets = ["query_key_value", "dense_4h_to_h"] if family == "neox" else ["q_proj", "v_proj",
                                                                             "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=targets))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    return model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def _device(model):
    return next(model.parameters()).device


def _one_by_one(model, examples, n_items=None):
    """Each example alone in a batch of one (no padding, no position ids): the summed token
    loss over `n_items` (all predicted tokens of the examples), and its LoRA gradients."""
    n_items = n_items or sum(t != IGNORE for e in examples for t in e["labels"][1:])
    model.zero_grad()
    total = 0.0
    for e in examples:
        one = {k: torch.tensor([e[k]], device=_device(model)) for k in ("input_ids", "labels")}
        loss = model(**one, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.item()
    return total, _grads(model)


def _run(model, batch, **kw):
    model.zero_grad()
    batch = {k: v.to(_device(model)) if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = model(**batch, **kw).loss
    loss.backward()
    return loss.item(), _grads(model)


def _assert_close(got, ref, loss_tol=1e-5, grad_tol=1e-5):
    (loss, g), (ref_loss, rg) = got, ref
    assert abs(loss - ref_loss) < loss_tol * max(1.0, abs(ref_loss)), (loss, ref_loss)
    assert g.keys() == rg.keys() and len(rg) > 0
    for n in rg:
        err = ((g[n] - rg[n]).norm() / rg[n].norm()).item()
        assert err < grad_tol, (n, err)


def _edge_examples():
    """Lengths 1 and 2, two examples exactly the pack length 12 (rows ending exactly at the
    row's end), one whose labels are all -100, the pad id (0) inside examples."""
    ex = _examples([12, 1, 7, 2, 5, 12, 3, 9, 4, 6], seed=5)
    ex[4]["labels"] = [IGNORE] * 5
    ex[2]["input_ids"][3] = ex[7]["input_ids"][0] = 0
    ex[2]["labels"][3] = 0
    return ex


FAMILIES = [("gemma2", "eager"), ("gemma3", "eager"), ("gemma3", "sdpa"), ("llama", "eager"),
            ("llama", "sdpa"), ("qwen2", "eager"), ("qwen2", "sdpa"), ("neox", "eager"),
            ("neox", "sdpa")]


@pytest.mark.parametrize("family,attn", FAMILIES, ids=[f"{f}-{a}" for f, a in FAMILIES])
def test_packed_edge_batch_matches_the_examples_one_by_one(family, attn):
    ex = _edge_examples()
    rows, _ = pack_examples(ex, 12)
    assert {r["n_examples"] for r in rows} >= {1, 3} and any(r["length"] == 12 for r in rows)
    model = _lora_model(family, attn)
    ref = _one_by_one(model, ex)
    for length in (12, 16):          # rows ending exactly at the end; a padding segment
        batch = PackedCollator(pad_id=0, length=length)(rows)
        _assert_close(_run(model, batch), ref)
    # not vacuous: with position ids counting on through the row the examples see each
    # other (and the rotary positions change), and the loss moves
    flat = dict(batch, position_ids=torch.arange(16).expand(len(rows), 16))
    assert abs(_run(model, flat)[0] - ref[0]) > 1e-3


@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_batch_with_gradient_checkpointing(reentrant):
    """train()'s reference path: socratic_lora.lora.apply_lora with checkpointing on."""
    from transformers import AutoModelForCausalLM

    from socratic_lora.lora import LoraSettings, apply_lora
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config("gemma2", "eager")).double()
    model = apply_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0, targets="attention",
                                          gradient_checkpointing=True, use_reentrant=reentrant))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    model.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ex = _edge_examples()
    rows, _ = pack_examples(ex, 12)
    _assert_close(_run(model, PackedCollator(pad_id=0, length=16)(rows)), _one_by_one(model, ex))


def test_packed_batch_in_evaluation_mode_and_the_plain_evaluation_batches():
    """model.eval() under no_grad (Trainer.evaluate): the packed loss is the examples' loss;
    and PackedCollator's plain-example batches (evaluation in a packing run: no attention
    mask, padding as its own segment) give the loss Collator's attention-mask batches give.
    In float32, as training runs (in float64 transformers' eager padding mask overflows to
    -inf, and Collator's batch gives NaN where a window sees only padding)."""
    model = _lora_model("gemma3", "eager", dtype=torch.float32).eval()
    ex = _edge_examples()
    rows, _ = pack_examples(ex, 12)
    n_items = sum(t != IGNORE for e in ex for t in e["labels"][1:])
    with torch.no_grad():
        ref = sum(model(input_ids=torch.tensor([e["input_ids"]]),
                        labels=torch.tensor([e["labels"]]), num_items_in_batch=n_items).loss.item()
                  for e in ex)
        got = model(**PackedCollator(pad_id=0, length=16)(rows)).loss.item()
        assert abs(got - ref) < 1e-5
        plain = [e for e in ex if any(t != IGNORE for t in e["labels"][1:])]
        a = model(**PackedCollator(pad_id=0, length=16)(plain)).loss.item()
        b = model(**Collator(pad_id=0)(plain)).loss.item()
        assert abs(a - b) < 1e-5 and abs(a - ref) < 1e-5


@pytest.mark.parametrize("mode", ["autocast", "weights"])
def test_packed_batch_in_bfloat16(mode):
    """bfloat16 autocast over float32 weights (train() on the CPU), or bfloat16 weights: the
    packed loss and gradients agree with the examples one by one within bfloat16 rounding,
    far closer than a batch whose examples see each other."""
    dtype = torch.float32 if mode == "autocast" else torch.bfloat16
    model = _lora_model("gemma2", "eager", dtype=dtype)
    ex = _edge_examples()
    rows, _ = pack_examples(ex, 12)
    batch = PackedCollator(pad_id=0, length=16)(rows)
    flat = dict(batch, position_ids=torch.arange(16).expand(len(rows), 16))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        ref = _one_by_one(model, ex)
        got = _run(model, batch)
        leak = _run(model, flat)
    assert abs(got[0] - ref[0]) < 0.02 * abs(leak[0] - ref[0])
    for n in ref[1]:
        err = ((got[1][n].float() - ref[1][n].float()).norm() / ref[1][n].float().norm()).item()
        assert err < 0.05, (n, err)


@pytest.mark.parametrize("fast", [False, True])
def test_gradient_accumulation_with_num_items_in_batch_as_trainer_counts_it(fast):
    """Two micro-batches of packed rows, each loss divided by the token count Trainer
    computes over both (labels[..., 1:] != -100), gradients summed: the mean token loss
    of all the examples, as one by one. The fast path's chunked loss too (chunks of 5
    tokens, checkpointing every layer, fused norms and GELU)."""
    from socratic_lora.fast import FastSettings, apply_fast_path
    ex = _examples([11, 7, 5, 13, 9, 4, 2, 16, 1, 8], seed=7)
    rows, _ = pack_examples(ex, 16)
    col = PackedCollator(pad_id=0, length=16)
    micro = [col(rows[:2]), col(rows[2:])]
    n_items = sum(b["labels"][..., 1:].ne(IGNORE).sum() for b in micro)   # Trainer's count
    assert int(n_items) == sum(t != IGNORE for e in ex for t in e["labels"][1:])
    # the first label of every row is an example's first: -100, so the count does not depend
    # on whether the labels are counted shifted or not
    assert all(b["labels"][:, 0].eq(IGNORE).all() for b in micro)
    model = _lora_model("gemma2", "eager")
    if fast:
        model.train()
        apply_fast_path(model, FastSettings(attention="eager", ce_chunk=5, checkpoint="all",
                                            fused_ops=True))
    ref = _one_by_one(model, ex)
    model.zero_grad()
    total = 0.0
    for b in micro:
        loss = model(**b, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.item()
    _assert_close((total, _grads(model)), ref)


def test_flex_attention_forward_on_the_cpu_keeps_packed_examples_apart():
    """flex_attention runs forward on the CPU (compiled, ~15 s; no backward there): on a
    packed batch of Gemma 2 (softcap, sliding window 4) it gives eager's logits and the
    examples' one-by-one loss. Gradients under flex: the gpu test below."""
    model = _lora_model("gemma2", "eager", dtype=torch.float32).eval()
    ex = _edge_examples()
    rows, _ = pack_examples(ex, 12)
    batch = PackedCollator(pad_id=0, length=16)(rows)
    n_items = sum(t != IGNORE for e in ex for t in e["labels"][1:])
    with torch.no_grad():
        ref = sum(model(input_ids=torch.tensor([e["input_ids"]]),
                        labels=torch.tensor([e["labels"]]), num_items_in_batch=n_items).loss.item()
                  for e in ex)
        eager = model(**batch).logits
        model.base_model.model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        out = model(**batch)
    assert (out.logits - eager).abs().max() < 1e-4
    assert abs(out.loss.item() - ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, "layers"])
def test_flex_attention_on_the_gpu_keeps_packed_examples_apart(compile):
    """The fast path's GPU default, flex attention (no backward on the CPU, so only here),
    with Gemma 2's attention softcap and a sliding window shorter than the examples, eager
    or each layer compiled: the packed batch gives the loss and LoRA gradients of the
    examples one by one under eager attention. (Written in session 5 without device time
    left to run it: its first GPU run checks the tolerances.)"""
    from socratic_lora.fast import FastSettings, apply_fast_path
    ex = _edge_examples()
    rows, _ = pack_examples(ex, 12)
    ref = _one_by_one(_lora_model("gemma2", "eager", dtype=torch.float32).cuda(), ex)
    model = _lora_model("gemma2", "eager", dtype=torch.float32).cuda().train()
    apply_fast_path(model, FastSettings(attention="flex", ce_chunk=5, checkpoint="none",
                                        compile=compile))
    assert model.config._attn_implementation == "flex_attention"
    batch = PackedCollator(pad_id=0, length=16)(rows)
    _assert_close(_run(model, batch), ref, loss_tol=1e-4, grad_tol=1e-3)
    flat = dict(batch, position_ids=torch.arange(16).expand(len(rows), 16))
    assert abs(_run(model, flat)[0] - ref[0]) > 1e-3


def test_models_loaded_for_training_run_without_a_cache(tiny_chat_dir):
    """Packing relies on it: with a KV cache, transformers does not look for packed rows.
    Both training paths (reference, and speed on the CPU) switch it off, and a packed
    forward of the loaded model (also in evaluation mode) creates no cache."""
    from socratic_lora.train import load_for_training, load_settings
    for mode in ("reference", "speed"):
        s = load_settings("demo", model=tiny_chat_dir, placement="cpu", mode=mode, lora_r=4,
                          lora_alpha=8, gradient_checkpointing=True)
        model, tok = load_for_training(s)
        assert model.config.use_cache is False, mode
        rows, _ = pack_examples(_examples([5, 3, 6]), 16)
        batch = PackedCollator(pad_id=tok.pad_token_id, length=16)(rows)
        for training in (True, False):
            model.train(training)
            with torch.no_grad():
                out = model(**batch)
            assert getattr(out, "past_key_values", None) is None, (mode, training)


def test_packed_batch_is_right_for_a_model_whose_config_keeps_the_cache_on():
    model = _lora_model("gemma2", "eager", use_cache=True)
    ex = _edge_examples()
    rows, _ = pack_examples(ex, 12)
    _assert_close(_run(model, PackedCollator(pad_id=0, length=16)(rows)), _one_by_one(model, ex))


def test_padding_positions_stay_inside_the_models_position_table():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     pad_token_id=0, bos_token_id=1, eos_token_id=1)
    cfg.use_cache = False
    cfg._attn_implementation = "eager"
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg).double(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                      fan_in_fan_out=True))   # GPT-2 Conv1D
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    ex = _examples([16, 3, 9, 14], seed=2)       # max_length 16 = n_positions; pack_length 32
    rows, _ = pack_examples(ex, 32)
    _assert_close(_run(model, PackedCollator(pad_id=0, length=32)(rows)), _one_by_one(model, ex))


# --- train(): settings, sampler, a run with evaluation, resume --------------------------------
def test_pack_length_settings_are_checked():
    from socratic_lora.train import load_settings
    s = load_settings("demo", packing=True, max_length=256)
    assert s.pack_length is None
    assert load_settings("demo", packing=True, max_length=256, pack_length=256).pack_length == 256
    for bad in (128, True, 512.0, "512"):
        with pytest.raises(ValueError, match="key 'pack_length'"):
            load_settings("demo", packing=True, max_length=256, pack_length=bad)
    with pytest.raises(ValueError, match="packing is false"):
        load_settings("demo", max_length=256, pack_length=512)


def test_packing_samples_rows_at_random_not_grouped_by_length(tmp_path):
    from socratic_lora.train import load_settings, training_arguments
    kw = dict(placement="cpu", output_dir=str(tmp_path / "o"))
    packed = training_arguments(load_settings("demo", packing=True, **kw), None, False)
    plain = training_arguments(load_settings("demo", **kw), None, False)
    if hasattr(packed, "train_sampling_strategy"):
        assert packed.train_sampling_strategy == "random"
        assert plain.train_sampling_strategy == "group_by_length"
    else:
        assert packed.group_by_length is False and plain.group_by_length is True


def _write_jsonl(path, dialogues):
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogues),
                    encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The shipped splits, cut down: 24 training and 2 evaluation dialogues."""
    from socratic_lora.data import load_split
    d = tmp_path_factory.mktemp("data")
    return (_write_jsonl(d / "train.jsonl", load_split("train")[:24]),
            _write_jsonl(d / "eval.jsonl", load_split("eval")[:2]))


def _settings(tiny_chat_dir, small_data, out, **kw):
    """demo (mode: speed, the fast path's chunked loss) on the tiny model: examples of at most
    128 tokens (about 100 each) packed into rows of 256, 1 row a batch, 2 batches a step."""
    from socratic_lora.train import load_settings
    base = dict(model=tiny_chat_dir, placement="cpu", train_data=small_data[0],
                eval_data=small_data[1], lora_r=4, lora_alpha=8, lora_dropout=0.0,
                gradient_checkpointing=True, batch_size=1, grad_accum=2, learning_rate=5e-3,
                warmup=0, logging_steps=1, max_length=128, packing=True, pack_length=256,
                output_dir=str(out))
    base.update(kw)
    return load_settings("demo", **base)


def test_train_with_packing_resumes_where_an_uninterrupted_run_would_be(
        tmp_path, tiny_chat_dir, small_data):
    """3 steps in one go versus 1 step, stop, --resume for 2 more: packing is deterministic
    and the checkpoint resumes on the same rows, so steps 2 and 3 log the same losses, the
    final evaluation (plain examples through PackedCollator) gives the same loss and the
    adapters end the same. With gradient accumulation (num_items_in_batch over 2 rows)."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from socratic_lora.train import train

    class StopAt1(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                control.should_training_stop = True

    common = dict(max_steps=3, save_steps=1)
    full = train(_settings(tiny_chat_dir, small_data, tmp_path / "full", **common))
    part = train(_settings(tiny_chat_dir, small_data, tmp_path / "part", **common),
                 callbacks=[StopAt1()])
    assert part["steps"] == 1 and (tmp_path / "part" / "checkpoint-1").is_dir()
    resumed = train(_settings(tiny_chat_dir, small_data, tmp_path / "part", **common),
                    resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-1") and resumed["steps"] == 3
    assert full["examples"]["train"] == 24 and 0 < full["examples"]["packed_rows"] < 24

    def losses(out):
        hist = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        return {h["step"]: h["loss"] for h in hist["log_history"] if "loss" in h}
    lf, lr = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert set(lf) == set(lr) == {1, 2, 3} and all(math.isfinite(v) for v in lf.values())
    for step in (1, 2, 3):
        assert lr[step] == pytest.approx(lf[step], rel=1e-3), step
    assert math.isfinite(full["eval_loss"]) and full["eval_loss"] > 0
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-3)
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
    # not vacuous: training moved lora_B away from its zero start (and the two runs agree)
    assert all(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_tokens_per_second_counts_training_tokens_only(tmp_path, tiny_chat_dir, small_data,
                                                       monkeypatch):
    """mode: reference (full logits) with gradient checkpointing: the other training path
    end to end with packing and evaluation. The clock is faked (10 s) to make the check exact."""
    import types

    import socratic_lora.prepare as prepare
    import socratic_lora.train as train_mod
    seen = []

    class Recording(prepare.PackedCollator):
        def __call__(self, batch):
            if all("position_ids" in b for b in batch):        # a training batch
                seen.append(sum(len(b["input_ids"]) for b in batch))
            return super().__call__(batch)
    monkeypatch.setattr(prepare, "PackedCollator", Recording)
    ticks = iter([0.0, 10.0])
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    rep = train_mod.train(_settings(tiny_chat_dir, small_data, tmp_path / "run", max_steps=1,
                                    save_steps=100, grad_accum=1, mode="reference"))
    assert rep["steps"] == 1 and math.isfinite(rep["eval_loss"]) and rep["eval_loss"] > 0
    assert rep["wall_time_s"] == 10.0 and seen
    # exactly the one trained batch (Trainer's loader also collates the next one, not counted)
    assert rep["tokens_per_s"] * 10.0 == pytest.approx(seen[0])


def test_packing_is_refused_for_a_model_that_ignores_packed_position_ids(tmp_path, tokenizer,
                                                                          small_data):
    from transformers import OPTConfig

    from conftest import save_tiny
    from socratic_lora.train import train
    path = tmp_path / "opt"
    cfg = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=512, word_embed_proj_dim=32,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.bos_token_id)
    save_tiny(cfg, path)
    tokenizer.save_pretrained(path)
    s = _settings(str(path), small_data, tmp_path / "run", eval_data=None, max_steps=1,
                  save_steps=100, grad_accum=1, gradient_checkpointing=False, pack_length=128,
                  lora_targets=["q_proj", "v_proj"], mode="reference")
    with pytest.raises(ValueError, match="packing"):
        train(s)


def test_opt_really_mixes_packed_examples():
    """The model-level fact behind the refusal above (so that test is not vacuous)."""
    from transformers import AutoModelForCausalLM, OPTConfig
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32)
    cfg._attn_implementation, cfg.use_cache = "eager", False
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    a, b = [5, 6, 7, 8, 9], [10, 11, 12, 13]
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([a + b]),
                       position_ids=torch.tensor([list(range(5)) + list(range(4))])).logits[0, 5:]
        alone = model(input_ids=torch.tensor([b])).logits[0]
    assert (packed - alone).abs().max() > 1e-3
