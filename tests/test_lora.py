import pytest
import torch

from conftest import SEQ_LEN, VOCAB, save_tiny, tiny_gemma2_config, tiny_neox_config
from socratic_lora import LoraSettings, apply_lora, load_model, lora_config, trainable_report
from socratic_lora.lora import resolve_targets

RANK = 4


def _tiny(path, config=None):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(save_tiny(config or tiny_gemma2_config(), path))


def test_named_targets_resolve_against_the_model(tmp_path):
    model = _tiny(tmp_path)
    assert resolve_targets(model, "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_targets(model, "mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert resolve_targets(model, "all-linear") == "all-linear"
    with pytest.raises(ValueError, match=r"\['qkv'\] not found.*q_proj"):
        resolve_targets(model, ["q_proj", "qkv"])
    with pytest.raises(ValueError, match="targets='ffn'"):
        resolve_targets(model, "ffn")


def test_gpt_neox_query_key_value(tmp_path):
    model = _tiny(tmp_path, tiny_neox_config())
    assert resolve_targets(model, ["query_key_value"]) == ["query_key_value"]
    assert "query_key_value" in resolve_targets(model, "attention")
    peft_model = apply_lora(model, LoraSettings(r=8, alpha=16, targets=["query_key_value"],
                                                gradient_checkpointing=False))
    r = trainable_report(peft_model)
    assert r["trainable"] == 2 * 8 * (64 + 3 * 64)   # 2 layers x r x (in + out)


def test_lora_config_fields():
    cfg = lora_config(LoraSettings())
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.1)
    assert set(cfg.target_modules) >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert cfg.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("bad,match", [(dict(r=0), "rank must be a positive"),
                                       (dict(r=-4), "rank must be a positive"),
                                       (dict(r=2.5), "rank must be a positive"),
                                       (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout")])
def test_bad_lora_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        lora_config(LoraSettings(**bad))


def test_trainable_report_counts_by_hand(tmp_path):
    model = apply_lora(_tiny(tmp_path), LoraSettings(r=RANK, alpha=8, gradient_checkpointing=False))
    r = trainable_report(model)
    # per layer: q 64->64, k 64->32, v 64->32, o 64->64; LoRA adds r*(in+out) per matrix
    per_layer = RANK * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert r["trainable"] == 2 * per_layer
    assert r["adapter_mb"] == pytest.approx(2 * per_layer * 4 / 1e6)
    assert 0 < r["percent"] < 100
    assert not model.base_model.model.model.embed_tokens.weight.requires_grad


def test_gradient_checkpointing_is_a_setting(tmp_path):
    on = apply_lora(_tiny(tmp_path / "a"), LoraSettings(r=RANK, gradient_checkpointing=True))
    off = apply_lora(_tiny(tmp_path / "b"), LoraSettings(r=RANK, gradient_checkpointing=False))
    def active(m):
        return any(getattr(x, "gradient_checkpointing", False) for x in m.modules())
    assert active(on) and not active(off)


def test_adapter_save_and_reload_gives_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir = save_tiny(tiny_gemma2_config(), tmp_path / "base")
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir),
                       LoraSettings(r=RANK, alpha=8, dropout=0.0, gradient_checkpointing=False))
    torch.manual_seed(1)
    for n, p in model.named_parameters():        # move lora_B off zero so the adapter matters
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    model.eval()
    x = torch.randint(0, VOCAB, (2, SEQ_LEN))
    before = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=x).logits
    assert not torch.allclose(before, plain, atol=1e-4)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                         tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=x).logits, before)


def test_qlora_steps_on_cpu_lower_the_loss(tiny_gemma2_dir):
    from socratic_lora import QuantSettings
    model, _ = load_model(tiny_gemma2_dir, quant=QuantSettings(bits=4, compute_dtype="float32"),
                          mode="cpu")
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = apply_lora(model, LoraSettings(r=RANK, alpha=8, dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    x = torch.randint(0, VOCAB, (2, SEQ_LEN))
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
