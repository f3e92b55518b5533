"""The fast path computes what the model computes (CPU, tiny Gemma 2, float32 / float64)."""
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
    # Evaluation still returns the full logits (generation and eval loops need them).
    fast.eval()
    with torch.no_grad():
        assert fast(**batch).logits.shape == (2, 24, VOCAB)


def test_bad_settings_are_refused_with_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="reference, speed or memory"):
        FastSettings.preset("fastest")
    with pytest.raises(ValueError, match="checkpoint=99"):
        apply_fast_path(_tiny_lora(), FastSettings(attention="eager", checkpoint=99))
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
    assert model.fast_settings.chunked_ce and model.fast_report["checkpointed_layers"]
    assert model.fast_settings.attention == "eager" and not model.fast_settings.compile
    ids = torch.randint(3, VOCAB, (2, 16))
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
