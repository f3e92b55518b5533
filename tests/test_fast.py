"""The fast path computes what the model computes (CPU, tiny Gemma 2, float32 / float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, tiny_gemma2_config
from socratic_lora.fast import (FastSettings, apply_fast_path, chunked_causal_lm_loss, gelu_mul,
                                rms_norm)


def _reference_loss(hidden, weight, labels, cap, num_items=None):
    logits = hidden @ weight.t()
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1),
                           ignore_index=-100, reduction="sum" if num_items else "mean")
    return loss / num_items if num_items else loss


@pytest.mark.parametrize("cap,chunk", [(30.0, 7), (30.0, 1000), (None, 5), (100.0, 16)])
def test_chunked_loss_and_gradients_equal_full_logits(cap, chunk):
    g = torch.Generator().manual_seed(1)
    B, S, H, V = 3, 11, 16, 97
    hidden = (torch.randn(B, S, H, generator=g, dtype=torch.float64) * 3).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :4] = -100                       # prompt positions carry no loss
    labels[2, -3:] = -100
    ref = _reference_loss(hidden, weight, labels, cap)
    ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_causal_lm_loss(hidden, weight, labels, softcap=cap, chunk=chunk)
    gh, gw = torch.autograd.grad(got * 1.0, (hidden, weight))
    assert abs(got.item() - ref.item()) < 1e-10
    assert torch.allclose(gh, ref_gh, atol=1e-12, rtol=1e-9)
    assert torch.allclose(gw, ref_gw, atol=1e-12, rtol=1e-9)
    # The softcap matters: without it the loss differs (so the test can fail).
    if cap is not None and cap < 50:
        assert abs(_reference_loss(hidden, weight, labels, None).item() - ref.item()) > 1e-3


def test_chunked_loss_sum_over_num_items_and_upstream_scale():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    ref = _reference_loss(hidden, weight, labels, 30.0, num_items=40)
    got = chunked_causal_lm_loss(hidden, weight, labels, 30.0, chunk=4, num_items_in_batch=40)
    assert abs(got.item() - ref.item()) < 1e-12
    (ref_g,) = torch.autograd.grad(ref * 3.5, hidden)
    (got_g,) = torch.autograd.grad(got * 3.5, hidden)     # backward scales by the upstream grad
    assert torch.allclose(got_g, ref_g, atol=1e-12)


def test_rms_norm_and_gelu_mul_match_eager_in_float64():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    g = torch.Generator().manual_seed(3)
    norm = Gemma2RMSNorm(12).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=g, dtype=torch.float64))
    x = torch.randn(4, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(4, 5, 12, generator=g, dtype=torch.float64)
    ref = norm(x)
    got = rms_norm(x, norm.weight, norm.eps)
    assert torch.allclose(got, ref, atol=1e-12)
    r = torch.autograd.grad(ref, (x, norm.weight), gy)
    o = torch.autograd.grad(got, (x, norm.weight), gy)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(r, o))
    ref = F.gelu(x, approximate="tanh") * up
    got = gelu_mul(x, up)
    assert torch.allclose(got, ref, atol=1e-12)
    r = torch.autograd.grad(ref, (x, up), gy)
    o = torch.autograd.grad(got, (x, up), gy)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(r, o))


def _tiny_lora(seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2ForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_gemma2_config(layers=3)
    cfg.final_logit_softcapping = 3.0        # small, so the cap is active on tiny logits
    model = Gemma2ForCausalLM(cfg).double()
    model.config._attn_implementation = "eager"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj",
                                                             "o_proj"]))
    for n, p in model.named_parameters():    # LoRA B starts at zero: give it values
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    model.train()
    return model


def _loss_and_lora_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.requires_grad}


@pytest.mark.parametrize("settings", [
    FastSettings(attention="eager", ce_chunk=5, checkpoint=2),
    FastSettings(attention="eager", ce_chunk=64, checkpoint="all", offload=True),
    FastSettings(attention="eager", chunked_ce=False, fused_ops=True, checkpoint="none"),
])
def test_fast_path_gives_the_models_loss_and_lora_gradients(settings):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ref_loss, ref_grads = _loss_and_lora_grads(_tiny_lora(), batch)
    fast = apply_fast_path(_tiny_lora(), settings)
    loss, grads = _loss_and_lora_grads(fast, batch)
    # transformers' loss casts the logits to float32, so the reference is float32-exact.
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * 4 * 2
    for n in grads:
        err = (grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()
        assert err < 1e-5, (n, err.item())
    assert fast.fast_report["checkpointed_layers"] == (
        [] if settings.checkpoint == "none" else [0, 1, 2] if settings.checkpoint == "all"
        else [0, 1])
    # Evaluation with labels: the same loss, without materialising the logits; without labels
    # (generation) the full logits as usual.
    fast.eval()
    with torch.no_grad():
        out = fast(**batch)
        assert (out.logits is None) == settings.chunked_ce
        assert abs(out.loss.item() - ref_loss) < 1e-5
        no_labels = {k: v for k, v in batch.items() if k != "labels"}
        assert fast(**no_labels).logits.shape == (2, 24, VOCAB)


def test_offloaded_checkpoints_let_go_of_their_layers_after_backward():
    """A notebook keeps the last loss (the graph's nodes live on after backward) and loads a
    new model: the offloaded checkpoints' nodes must not keep the old layers, and with them
    their weights (about 1 GiB on the GPU for Gemma 2 2B each time), alive."""
    model = apply_fast_path(_tiny_lora(), FastSettings(attention="eager", checkpoint="all",
                                                       offload=True))
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    loss = model(input_ids=ids, labels=ids).loss
    nodes, todo, seen = [], [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "_OffloadedCheckpointBackward":
            nodes.append(node)
        todo.extend(n for n, _ in node.next_functions)
    assert len(nodes) == 3 and all(n.run is not None for n in nodes)
    loss.backward()
    assert all(n.run is None and n.saved is None for n in nodes)


def test_bad_settings_are_refused_with_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="reference, speed or memory"):
        FastSettings.preset("fastest")
    model = _tiny_lora()
    before = model.get_base_model().config._attn_implementation
    for bad, match in ((dict(checkpoint=99), "checkpoint=99: use 'all', 'none', 'keep', a "
                                             "number of layers from 0 to 3"),
                       (dict(compile="everything"), "compile='everything': use False, True, "
                                                    "'layers' or 'model'"),
                       (dict(compile="layers", compile_mode="fast"), "compile_mode='fast'"),
                       (dict(compile="model", checkpoint="all", offload=True),
                        "offloaded checkpoints need compile='layers'"),
                       (dict(fuse_projections="mlp"), "fuse_projections='mlp': use True, "
                                                      "False or 'qkv'"),
                       (dict(keep_outputs=1.5), "keep_outputs=1.5: use True, False, a number "
                                                "of layers from 0 to 3")):
        with pytest.raises(ValueError, match=match):
            apply_fast_path(model, FastSettings(**bad))
        # refused before anything was changed: attention, loss and layers as they were
        assert model.get_base_model().config._attn_implementation == before
        assert not hasattr(model.get_base_model(), "_socratic_original_forward")
        assert not hasattr(model, "fast_settings")
    from socratic_lora.train import load_settings
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: turbo\n")
    from socratic_lora.train import load_for_training
    with pytest.raises(ValueError, match="'mode': 'turbo'"):
        load_for_training(load_settings(cfg))


def test_train_settings_mode_speed_loads_the_fast_path(tiny_gemma2_dir):
    from socratic_lora.train import TrainSettings, load_for_training
    s = TrainSettings(model=tiny_gemma2_dir, bits=16, placement="cpu", mode="speed",
                      lora_dropout=0.0)
    model, _ = load_for_training(s)
    assert model.fast_settings.chunked_ce and model.fast_report["checkpointed_layers"] == []
    assert model.fast_settings.attention == "eager" and not model.fast_settings.compile
    assert model.fast_settings.dequant == "bnb"          # no compiled graph on the CPU
    s.mode = "memory"
    memory, _ = load_for_training(s)
    assert memory.fast_report["checkpointed_layers"] == [0, 1]   # every layer
    ids = torch.randint(3, VOCAB, (2, 16))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --- dequant="torch": bitsandbytes' 4-bit format unpacked with torch ops --------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (33, 70)])     # 33 x 70: a last partial block
def test_torch_dequantization_equals_bitsandbytes(quant_type, nested, shape):
    bf = pytest.importorskip("bitsandbytes.functional")
    from socratic_lora.fast import _quant_parts, _unpack
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    packed, qs = bf.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                  compress_statistics=nested)
    tensors, meta = _quant_parts(qs)
    got = _unpack(packed, *tensors, meta, torch.bfloat16)
    assert torch.equal(got, bf.dequantize_4bit(packed, qs))
    assert (got.float() - w.float()).abs().max() > 0       # it really was quantized


def _tiny_4bit_lora(path, dtype=torch.bfloat16, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from socratic_lora.fast import lean_kbit_preparation
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype,
                                                 device_map={"": "cpu"},
                                                 attn_implementation="eager")
    torch.manual_seed(0)                     # the same random LoRA weights every time
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "init_lora_weights": False, **lora}
    model = get_peft_model(lean_kbit_preparation(model), LoraConfig(**lora))
    model.train()
    return model


def _compile_layers_recording_saved(model, run):
    """Compile each decoder layer with inductor's partitioner (eager kernels), clear dynamo's
    counters, and call run(model) recording the shape of every tensor autograd saves.
    Returns (compile counter, saved shapes, run's result)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    count = CompileCounterWithBackend("aot_eager_decomp_partition")
    for layer in model.get_base_model().model.layers:
        layer.compile(backend=count, dynamic=False)
    saved = []

    def keep_shape(t):
        saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep_shape, lambda t: t):
        result = run(model)
    return count, saved, result


def test_torch_dequant_path_equals_bitsandbytes_and_compiles_without_graph_breaks(tmp_path):
    """Same loss and LoRA gradients as bitsandbytes' own 4-bit matmul, and each decoder
    layer traces into one graph (no break) that the layers share (sliding and global alike;
    the first layer, whose input needs no gradient, has its own): what makes the compiled
    layer cheap on the host (docs/performance.md)."""
    pytest.importorskip("bitsandbytes")
    import torch._dynamo
    from torch._dynamo.utils import counters

    from conftest import save_tiny
    path = save_tiny(tiny_gemma2_config(layers=6), tmp_path / "m")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(model):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                             if p.requires_grad}

    ref_loss, ref = loss_and_grads(_tiny_4bit_lora(path))
    model = _tiny_4bit_lora(path)
    settings = FastSettings(chunked_ce=False, attention="eager", fused_ops=False,
                            checkpoint="none", dequant="torch", fuse_projections=False)
    apply_fast_path(model, settings)
    assert model.fast_report["linear4bit_torch"] == 6 * 7
    loss, got = loss_and_grads(model)
    assert loss == ref_loss and len(got) == 6 * 4 * 2
    for n in ref:
        assert torch.equal(got[n], ref[n]), n

    count, saved, (loss, got) = _compile_layers_recording_saved(model, loss_and_grads)
    # The dequantised 16-bit weights are recomputed in backward, not saved
    # (hidden 64, q/o 64 x 64, k/v 32 x 64, MLP 128 x 64 and 64 x 128; 24 tokens).
    weights = {(64, 64), (32, 64), (128, 64), (64, 128)}
    assert saved and not weights & set(saved), weights & set(saved)
    assert count.frame_count == 2        # one graph for the first layer, one for the others
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert abs(loss - ref_loss) < 1e-6
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-2, atol=1e-6), n
    torch._dynamo.reset()


def _stackable_config(layers):
    """A tiny Gemma 2 whose 4-bit layers can be stacked: with double quantization each
    layer must hold whole nested blocks (256 blocks of 64 values): hidden 256, q/k/v
    256/128/128 x 256, gate/up 512 x 256."""
    cfg = tiny_gemma2_config(layers=layers)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 512, 64
    return cfg


def _fused_and_unfused(path, ids, fused_settings=None, fuse=True, **lora):
    """Loss and LoRA gradients (float32, 4-bit, torch unpacking) with and without stacked
    projections; the fused model for further checks."""
    def run(on):
        model = _tiny_4bit_lora(path, torch.float32, **lora)
        settings = fused_settings or FastSettings(attention="eager", checkpoint="none",
                                                  dequant="torch")
        apply_fast_path(model, settings.replace(fuse_projections=on and fuse))
        torch.manual_seed(5)                 # the same dropout masks, where there are any
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return model, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.requires_grad}
    _, ref_loss, ref = run(False)
    model, loss, got = run(True)
    return model, (ref_loss, ref), (loss, got)


def _assert_close_grads(got, ref, rtol):
    assert got.keys() == ref.keys() and ref
    for n in ref:
        err = ((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item()
        assert err < rtol, (n, err)


@pytest.mark.parametrize("lora", [
    {},                                                       # q/k/v/o: one scaling
    {"rank_pattern": {"k_proj": 2}},                          # k's scaling differs
    {"target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]},
    {"fuse": "qkv"},                                          # the memory preset's choice
])
def test_stacked_projections_give_pefts_loss_and_gradients(tmp_path, lora):
    """q/k/v (and gate/up) as one unpacked 4-bit matmul and the LoRA products stacked: in
    float32 the same loss and LoRA gradients as peft's per-projection computation."""
    pytest.importorskip("bitsandbytes")
    from conftest import save_tiny
    path = save_tiny(_stackable_config(2), tmp_path / "m")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    fuse = lora.pop("fuse", True)
    model, (ref_loss, ref), (loss, got) = _fused_and_unfused(path, ids, fuse=fuse, **lora)
    assert model.fast_report["fused_qkv"] == 2
    assert model.fast_report["fused_gate_up"] == (2 if fuse is True else 0)
    assert abs(loss - ref_loss) < 1e-5
    _assert_close_grads(got, ref, 1e-4)
    # The layers' own 4-bit data are views into the stacked buffers (no copy kept), still
    # valid for bitsandbytes, and the stacked unpacking equals bitsandbytes' for each part.
    import bitsandbytes.functional as bf

    from socratic_lora.fast import _unpack
    attn = model.get_base_model().model.layers[1].self_attn
    bases = [getattr(attn, n).base_layer for n in ("q_proj", "k_proj", "v_proj")]
    stacked = attn._socratic_stack
    for b in bases:
        assert b.weight.untyped_storage().data_ptr() == stacked[0].untyped_storage().data_ptr()
        assert (b.weight.quant_state.absmax.untyped_storage().data_ptr()
                == stacked[1].untyped_storage().data_ptr())
    want = torch.cat([bf.dequantize_4bit(b.weight, b.weight.quant_state) for b in bases])
    got_w = _unpack(*stacked, attn._socratic_meta, torch.float32)
    assert torch.equal(got_w, want)


def test_stacked_projections_step_aside_when_peft_must_compute_per_projection(tmp_path):
    """With LoRA dropout (a mask per projection) the base product stays stacked and the
    adapters run one by one in peft's order, drawing the same masks: equal up to float32
    rounding (stacking the adapters would drop the dropout and differ by far more). With
    only some projections adapted, and with the adapters disabled, peft's own path runs."""
    pytest.importorskip("bitsandbytes")
    from conftest import save_tiny
    path = save_tiny(_stackable_config(2), tmp_path / "m")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model, (ref_loss, ref), (loss, got) = _fused_and_unfused(path, ids, lora_dropout=0.1)
    assert model.fast_report["fused_qkv"] == 2 and model.fast_report["fused_gate_up"] == 2
    assert abs(loss - ref_loss) < 1e-6
    _assert_close_grads(got, ref, 1e-5)
    # gate has an adapter, up has none: the MLP is not stacked; q/k/v still are.
    model, (ref_loss, ref), (loss, got) = _fused_and_unfused(
        path, ids, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"])
    assert model.fast_report["fused_gate_up"] == 0 and model.fast_report["fused_qkv"] == 2
    with torch.no_grad(), model.disable_adapter():
        off = model(input_ids=ids, labels=ids).loss.item()
    plain = _tiny_4bit_lora(path, torch.float32)
    apply_fast_path(plain, FastSettings(attention="eager", checkpoint="none", dequant="torch",
                                        fuse_projections=False))
    with torch.no_grad(), plain.disable_adapter():
        assert plain(input_ids=ids, labels=ids).loss.item() == off


def test_stacked_projections_compile_into_one_graph_and_save_no_16bit_weight(tmp_path):
    """Compiled, the stacked 4-bit weights are unpacked again in backward like single ones
    (no [q+k+v, H] or [2 x intermediate, H] 16-bit matrix saved), with no graph break and two
    graphs (the first layer, whose input needs no gradient, and the others)."""
    pytest.importorskip("bitsandbytes")
    import torch._dynamo
    from torch._dynamo.utils import counters

    from conftest import save_tiny
    path = save_tiny(_stackable_config(4), tmp_path / "m")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    _, (ref_loss, ref), _ = _fused_and_unfused(path, ids)
    model = _tiny_4bit_lora(path, torch.float32)
    apply_fast_path(model, FastSettings(attention="eager", checkpoint="none", dequant="torch"))
    count, saved, loss = _compile_layers_recording_saved(
        model, lambda m: m(input_ids=ids, labels=ids).loss)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # q/k/v stacked 512 x 256, gate/up stacked 1024 x 256, o 256 x 256, down 256 x 512, and
    # their transposes
    weights = {(512, 256), (1024, 256), (256, 256), (256, 512)}
    weights |= {w[::-1] for w in weights}
    assert saved and not weights & set(saved), weights & set(saved)
    assert count.frame_count == 2, count.frame_count
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert abs(loss.item() - ref_loss) < 1e-5
    _assert_close_grads(got, ref, 1e-4)
    torch._dynamo.reset()


# the tiny stackable model's 4-bit weights as 16-bit matrices (q/k/v stacked or single,
# gate/up stacked or single, o, down) and their transposes
_STACKABLE_WEIGHTS = {(512, 256), (1024, 256), (256, 256), (128, 256), (256, 512)}
_STACKABLE_WEIGHTS |= {w[::-1] for w in _STACKABLE_WEIGHTS}


@pytest.mark.parametrize("fuse", [True, "qkv"])
def test_compiled_layers_keep_mlp_outputs_only_in_the_chosen_layers(tmp_path, fuse):
    """Compiled, a layer whose MLP keeps its outputs (keep_outputs) saves gate and up for
    backward; the others save nothing of that size and multiply them out again there. No
    16-bit weight is saved either way; loss and LoRA gradients are the same; checkpointed
    layers always keep them."""
    pytest.importorskip("bitsandbytes")
    import torch._dynamo
    from conftest import save_tiny
    path = save_tiny(_stackable_config(4), tmp_path / "m")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    _, (ref_loss, ref), _ = _fused_and_unfused(path, ids)
    for keep, layers in ((True, [0, 1, 2, 3]), (False, []), (0.5, [0, 2]), (1, [0])):
        model = _tiny_4bit_lora(path, torch.float32)
        apply_fast_path(model, FastSettings(attention="eager", checkpoint="none",
                                            dequant="torch", fuse_projections=fuse,
                                            keep_outputs=keep))
        mlps = [layer.mlp for layer in model.get_base_model().model.layers]
        assert [i for i, m in enumerate(mlps) if m._socratic_keep] == layers
        assert all(m.gate_proj._socratic_keep == m.up_proj._socratic_keep == m._socratic_keep
                   for m in mlps)
        _, saved, loss = _compile_layers_recording_saved(
            model, lambda m: m(input_ids=ids, labels=ids).loss)
        loss.backward()
        # gate and up: 24 tokens x intermediate 512 each, stacked or not
        mlp_outputs = [s for s in saved if s and s[-1] == 512 and math.prod(s) == 24 * 512]
        assert len(mlp_outputs) == 2 * len(layers), (keep, saved)
        assert not _STACKABLE_WEIGHTS & set(saved), (keep, _STACKABLE_WEIGHTS & set(saved))
        assert abs(loss.item() - ref_loss) < 1e-5
        _assert_close_grads({n: p.grad for n, p in model.named_parameters()
                             if p.requires_grad}, ref, 1e-4)
    torch._dynamo.reset()
    model = _tiny_4bit_lora(path, torch.float32)
    apply_fast_path(model, FastSettings(attention="eager", checkpoint=3, dequant="torch",
                                        keep_outputs=0.25, compile="layers"))
    assert model.fast_report["checkpointed_layers"] == [0, 1, 2]
    assert model.fast_report["layers_keeping_mlp_outputs"] == [0, 1, 2]
    torch._dynamo.reset()


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("fuse", [True, False])
def test_no_16bit_weight_saved_under_autocast_with_another_compute_dtype(tmp_path, keep, fuse):
    """bitsandbytes' default compute dtype is float32; under bfloat16 autocast (Trainer's
    bf16=True) the product runs in bfloat16. The weight is unpacked straight to bfloat16
    inside the must-recompute region, so autocast's cast of it is not saved for backward."""
    pytest.importorskip("bitsandbytes")
    import torch._dynamo
    from conftest import save_tiny
    path = save_tiny(_stackable_config(2), tmp_path / "m")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    model = _tiny_4bit_lora(path, torch.float32)          # compute dtype float32
    apply_fast_path(model, FastSettings(attention="eager", checkpoint="none", dequant="torch",
                                        fuse_projections=fuse, keep_outputs=keep))

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(input_ids=ids, labels=ids).loss
    _, saved, loss = _compile_layers_recording_saved(model, run)
    loss.backward()
    torch._dynamo.reset()
    assert saved and not _STACKABLE_WEIGHTS & set(saved), _STACKABLE_WEIGHTS & set(saved)


def test_mlps_with_adapters_on_gate_and_up_always_keep_their_outputs(tmp_path):
    """With LoRA on gate/up, GELU * up needs base + adapter output, which is saved either
    way: recomputing the base product would only add work, so those MLPs keep (and are
    reported as keeping) their outputs whatever keep_outputs says."""
    pytest.importorskip("bitsandbytes")
    import torch._dynamo
    from conftest import save_tiny
    path = save_tiny(_stackable_config(2), tmp_path / "m")
    model = _tiny_4bit_lora(path, torch.float32,
                            target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"])
    apply_fast_path(model, FastSettings(attention="eager", checkpoint="none", dequant="torch",
                                        keep_outputs=False, compile="layers"))
    assert model.fast_report["layers_keeping_mlp_outputs"] == [0, 1]
    for layer in model.get_base_model().model.layers:
        assert getattr(layer.mlp, "_socratic_keep", True)
        assert getattr(layer.mlp.gate_proj.base_layer, "_socratic_keep", True)
    torch._dynamo.reset()


def test_compiled_layers_do_not_recompile_for_every_sequence_length(monkeypatch):
    """Real batches are padded to their longest example, so the length changes from step to
    step: the layers are compiled static once, then once with the length symbolic, and no
    more (with dynamic=False every new length was a new compilation)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    count = CompileCounterWithBackend("aot_eager")
    original = torch.nn.Module.compile

    def counted(self, *args, **kwargs):
        kwargs.pop("mode", None)
        return original(self, *args, backend=count, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "compile", counted)
    torch._dynamo.reset()
    model = apply_fast_path(_tiny_lora(), FastSettings(attention="eager", checkpoint="none",
                                                       compile="layers", ce_chunk=16))
    g = torch.Generator().manual_seed(0)
    losses = []
    for n in (24, 32, 40, 16, 48, 56):
        ids = torch.randint(3, VOCAB, (2, n), generator=g)
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    # Two graphs (the first layer, whose input needs no gradient, and the others, sliding
    # and global alike), each compiled static for the first length and dynamic for the
    # second; the other four lengths reuse them.
    assert count.frame_count <= 4, count.frame_count
    assert all(l == l for l in losses)
    torch._dynamo.reset()


def _uncompiled_reference():
    """A batch, eager fast-path settings, and that path's loss and LoRA gradients: what the
    compiled variants must reproduce. fused_ops is off: the compiler fuses the norms itself,
    and the model's own RMSNorm works in float32 where ours keeps float64."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 24), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain = FastSettings(attention="eager", ce_chunk=5, checkpoint="none", fused_ops=False)
    ref_loss, ref = _loss_and_lora_grads(apply_fast_path(_tiny_lora(), plain), batch)
    return batch, plain, ref_loss, ref


def test_compile_model_traces_the_whole_stack_with_the_same_loss_and_gradients(monkeypatch):
    """compile='model': the decoder stack is one compiled frame without graph breaks, and
    loss and LoRA gradients equal the uncompiled fast path."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    batch, plain, ref_loss, ref = _uncompiled_reference()
    count = CompileCounterWithBackend("aot_eager")
    original = torch.nn.Module.compile
    compiled = []

    def counted(self, *args, **kwargs):
        kwargs.pop("mode", None)
        compiled.append(type(self).__name__)
        return original(self, *args, backend=count, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "compile", counted)
    torch._dynamo.reset()
    counters.clear()
    model = apply_fast_path(_tiny_lora(), plain.replace(compile="model"))
    assert compiled == ["Gemma2Model"] and model.fast_report["compiled_model"] == "Gemma2Model"
    for _ in range(2):
        loss, got = _loss_and_lora_grads(model, batch)
    # One graph holds the whole stack (transformers' forward wrapper adds an empty frame).
    graphs = [len(gm.graph.nodes) for gm in count.graphs]
    assert len([n for n in graphs if n]) == 1 and max(graphs) > 100, graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    # (the loss chunks are then compiled with inductor: equal to ~1e-9, not bit-equal)
    assert abs(loss - ref_loss) < 1e-7
    for n in ref:
        err = (got[n] - ref[n]).norm() / ref[n].norm()
        assert err < 1e-8, (n, err.item())
    torch._dynamo.reset()


def test_compiled_layers_under_accelerate_device_hooks_have_no_graph_breaks(monkeypatch):
    """Balanced placement puts an accelerate hook on every layer (it moves the inputs to the
    layer's GPU) and marks the hook not to be compiled: compiling the hooked module broke
    every layer's graph in pieces (0.69x one GPU). The layers' own forwards are compiled
    instead: no graph breaks, the same loss and LoRA gradients as the eager fast path."""
    import torch._dynamo
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    batch, plain, ref_loss, ref = _uncompiled_reference()

    count = CompileCounterWithBackend("aot_eager")
    original = torch.compile

    def counted(fn, *args, **kwargs):
        kwargs.pop("mode", None)
        return original(fn, *args, backend=count, **kwargs)
    monkeypatch.setattr(torch, "compile", counted)
    torch._dynamo.reset()
    counters.clear()
    model = _tiny_lora()
    layers = model.base_model.model.model.layers
    for layer in layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    model = apply_fast_path(model, plain.replace(compile="layers"))
    assert all(hasattr(layer, "_hf_hook") for layer in layers)     # the hooks still run
    for _ in range(2):
        loss, got = _loss_and_lora_grads(model, batch)
    assert not counters["graph_break"], list(counters["graph_break"])
    assert count.frame_count <= 2, count.frame_count     # the first layer and the others
    assert abs(loss - ref_loss) < 1e-9
    for n in ref:
        err = (got[n] - ref[n]).norm() / ref[n].norm()
        assert err < 1e-9, (n, err.item())
    torch._dynamo.reset()


def test_flex_attention_falls_back_to_eager_below_compute_capability_8(monkeypatch):
    """A T4 (7.5) cannot train with flex attention (torch's eager fallback fails in float16):
    the fast path uses eager attention there, warns, and says so in its report and settings;
    on 8.0 and newer flex stays."""
    import types

    import socratic_lora.fast as fast
    caps = {0: (8, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: caps[d.index])
    fake = types.SimpleNamespace(parameters=lambda: iter(
        [types.SimpleNamespace(device=torch.device("cuda", i)) for i in (0, 1, 1)] +
        [types.SimpleNamespace(device=torch.device("cpu"))]))
    assert fast._gpus_without_flex(fake) == [(1, (7, 5))]
    caps[1] = (9, 0)
    assert fast._gpus_without_flex(fake) == []

    for gpus, expected in (([(0, (7, 5))], "eager"), ([], "flex_attention")):
        monkeypatch.setattr(fast, "_gpus_without_flex", lambda lm, g=gpus: g)
        settings = FastSettings(attention="flex", checkpoint="none", compile=False)
        if gpus:
            with pytest.warns(UserWarning, match="compute capability 7.5"):
                model = apply_fast_path(_tiny_lora(), settings)
            assert "GPU 0 (compute capability 7.5)" in model.fast_report["attention_fallback"]
            assert model.fast_settings.attention == "eager"
        else:
            model = apply_fast_path(_tiny_lora(), settings)
            assert "attention_fallback" not in model.fast_report
        assert model.base_model.model.config._attn_implementation == expected


@pytest.mark.parametrize("cap", [3.0, None])
def test_compiled_loss_chunk_equals_the_eager_one(cap):
    """The compiled loss uses its own formulation (no in-place buffers, one-hot by
    comparison); on float64 logits it must give the eager chunk's loss and gradient."""
    import socratic_lora.fast as fast
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(13, 301, generator=g, dtype=torch.float64) * 8
    target = torch.randint(0, 301, (13,), generator=g)
    safe = fast._sum_of_exp_is_safe(cap, logits.shape[-1])
    assert safe == (cap is not None)
    loss, grad = fast._chunk_loss_and_grad(logits.clone(), target, cap)
    got_loss, got_grad = fast._chunk_fn(True)(logits.clone(), target, cap, safe)
    assert abs(got_loss.item() - loss.item()) < 1e-9
    assert torch.allclose(got_grad, grad, atol=1e-14, rtol=1e-10)
    # and both are the autograd gradient of the capped cross entropy
    x = logits.clone().requires_grad_()
    z = cap * torch.tanh(x / cap) if cap else x
    ref = F.cross_entropy(z, target, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert abs(ref.item() - loss.item()) < 1e-9 and torch.allclose(grad, ref_grad, atol=1e-12)


def test_loss_subtracts_the_max_when_the_capped_sum_could_overflow_float32():
    """Without subtracting the max, exp(z) summed over the vocabulary must stay below
    float32's maximum: cap 80 over 256k entries would not (80 + ln 256000 = 92.5 > 88.7)."""
    import socratic_lora.fast as fast
    assert fast._sum_of_exp_is_safe(30.0, 256000) and fast._sum_of_exp_is_safe(50.0, 256000)
    assert not fast._sum_of_exp_is_safe(80.0, 256000) and not fast._sum_of_exp_is_safe(None, 10)
    logits = torch.full((2, 256000), 1e4, dtype=torch.float32)    # every z near the cap
    target = torch.tensor([0, 5])
    for fn, args in ((fast._chunk_loss_and_grad, ()), (fast._chunk_fn(True), (False,))):
        loss, grad = fn(logits.clone(), target, 80.0, *args)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert abs(loss.item() - 2 * torch.log(torch.tensor(256000.0)).item()) < 1e-2


def test_tuned_flex_options_are_chosen_by_gpu_kind_head_size_and_dtype(monkeypatch):
    """The measured block sizes only for what they were measured on: every GPU of compute
    capability 9.0, head_dim 256, 16-bit compute (float32 tiles would not fit)."""
    import types

    import socratic_lora.fast as fast
    caps = {0: (9, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: caps[d.index])
    cfg = types.SimpleNamespace(head_dim=256, hidden_size=2304, num_attention_heads=8)

    def fake(devices, dtype=torch.bfloat16, config=cfg):
        return types.SimpleNamespace(config=config, dtype=dtype, parameters=lambda: iter(
            [types.SimpleNamespace(device=torch.device(d)) for d in devices]))
    tuned = fast.TUNED_FLEX_OPTIONS[(9, 0, 256)]
    assert fast._flex_kernel_options(fake(["cuda:0", "cuda:1"])) == tuned
    assert fast._flex_kernel_options(fake(["cuda:0"], torch.float16)) == tuned
    assert fast._flex_kernel_options(fake(["cuda:0"], torch.float32)) is None
    assert fast._flex_kernel_options(fake(["cuda:0", "cpu"])) is None         # offloaded part
    no_head_dim = types.SimpleNamespace(hidden_size=1024, num_attention_heads=8)   # 128
    assert fast._flex_kernel_options(fake(["cuda:0"], config=no_head_dim)) is None
    caps[1] = (8, 0)                                                          # an A100 beside
    assert fast._flex_kernel_options(fake(["cuda:0", "cuda:1"])) is None
    assert fast._flex_kernel_options(fake(["cuda:1"])) is None


def test_tuned_flex_options_reach_the_attention_function_only_where_measured(monkeypatch):
    """flex_tuned: the measured block sizes go with the training forward to the attention
    function, and only for GPUs of the kind they were measured on (none here: the CPU)."""
    import socratic_lora.fast as fast
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    seen = []

    def recorder(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get("kernel_options"))
        return query.transpose(1, 2).contiguous(), None
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", recorder)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    settings = FastSettings(attention="flex", ce_chunk=8, checkpoint="none")
    assert fast._flex_kernel_options(fast._causal_lm(_tiny_lora())) is None   # CPU
    model = apply_fast_path(_tiny_lora(), settings)
    model(**batch)
    assert seen and all(o is None for o in seen)
    assert "flex_kernel_options" not in model.fast_report
    # On an H100/H200 (compute capability 9.0) the measured set is passed to every layer.
    opts = {"bwd_num_warps": 8}
    monkeypatch.setattr(fast, "_flex_kernel_options", lambda lm: dict(opts))
    seen.clear()
    model = apply_fast_path(_tiny_lora(), settings)
    model(**batch)
    assert len(seen) == 3 and all(o == opts for o in seen)
    assert model.fast_report["flex_kernel_options"] == opts
    seen.clear()
    model = apply_fast_path(_tiny_lora(), settings.replace(flex_tuned=False))
    model(**batch)
    assert len(seen) == 3 and all(o is None for o in seen)


def test_causal_masks_are_built_once_per_shape_for_batches_without_a_mask(monkeypatch):
    """Flex attention on batches with neither attention mask nor position ids (right-padded
    batches from Collator(causal_only=True)): transformers' own mask functions run once per
    (batch, length), the masks are reused, and the loss equals the model's with an all-ones
    mask. Batches with a mask still get transformers' per-batch masks."""
    import sys
    model = _tiny_lora().float()
    ns = sys.modules[type(model.get_base_model().model).__module__]
    calls = []
    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        real = getattr(ns, name)

        def counted(*a, _real=real, _name=name, **k):
            calls.append((_name, (a[1] if len(a) > 1 else k["inputs_embeds"]).shape[:2]))
            return _real(*a, **k)
        monkeypatch.setattr(ns, name, counted)
    apply_fast_path(model, FastSettings(attention="flex", checkpoint="none"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 24), generator=g)
    with torch.no_grad():                # flex attention has no backward on the CPU
        first = model(input_ids=ids, labels=ids).loss
        assert len(calls) == 2
        other = torch.randint(3, VOCAB, (2, 24), generator=g)
        # as Trainer calls it through peft's causal-LM wrapper
        model(input_ids=other, labels=other, output_attentions=None,
              output_hidden_states=None, return_dict=True)
        assert len(calls) == 2                                   # same shape: reused
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        assert len(calls) == 4                                   # a mask: built per batch
        longer = torch.randint(3, VOCAB, (2, 40), generator=g)
        model(input_ids=longer, labels=longer)
    assert len(calls) == 6 and calls[-1][1] == (2, 40)
    assert torch.equal(first, masked)


def test_right_padded_batches_train_the_same_without_an_attention_mask():
    """Collator(causal_only=True): no real token can see right padding through a causal
    mask, so the loss and LoRA gradients equal those with the padding mask (float64). With
    padding longer than Gemma 2's sliding window, the padding mask leaves padded positions
    nothing to attend to and eager attention gives NaN; without the mask they stay finite."""
    from socratic_lora.prepare import Collator
    g = torch.Generator().manual_seed(2)
    rows = []
    for n in (100, 37, 9):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n,
                     "labels": [-100] * (n // 3) + ids[n // 3:]})
    masked, plain = Collator(0)(rows), Collator(0, causal_only=True)(rows)
    assert "attention_mask" not in plain and masked["attention_mask"].eq(0).any()
    assert torch.equal(masked["input_ids"], plain["input_ids"])

    def run(batch, settings, window):
        model = _tiny_lora()
        model.config.sliding_window = window
        if settings is not None:
            apply_fast_path(model, settings)
        return _loss_and_lora_grads(model, batch)
    for settings in (None, FastSettings(attention="eager", checkpoint="none")):
        (ref_loss, ref), (loss, got) = run(masked, settings, 128), run(plain, settings, 128)
        assert abs(loss - ref_loss) < 1e-10, settings
        for n in ref:
            assert torch.allclose(got[n], ref[n], rtol=1e-9, atol=1e-12), (settings, n)
    # 91 padded positions in the last row, a window of 16:
    assert run(masked, None, 16)[0] != run(masked, None, 16)[0]          # NaN
    loss, got = run(plain, None, 16)
    assert loss == loss and all(t.isfinite().all() for t in got.values())
