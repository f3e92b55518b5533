import pytest
import torch

from conftest import reference_config
from socratic_lora import QuantSettings, bnb_config, compute_dtype, weight_memory
from socratic_lora.quant import bytes_per_weight

T4, A100, H100 = (7, 5), (8, 0), (9, 0)


@pytest.mark.parametrize("capability,expected", [(T4, torch.float16), ((6, 1), torch.float16),
                                                 (A100, torch.bfloat16), (H100, torch.bfloat16)])
def test_auto_compute_dtype_by_capability(capability, expected):
    assert compute_dtype("auto", capability) == expected


def test_auto_compute_dtype_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_dtype("auto") == torch.bfloat16


def test_auto_ignores_is_bf16_supported_on_t4(monkeypatch):
    # torch says a T4 "supports" bf16 (through emulation); we must still pick float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: T4)
    assert compute_dtype("auto") == torch.float16


def test_explicit_and_bad_compute_dtype():
    assert compute_dtype("float32", T4) == torch.float32
    with pytest.raises(ValueError, match="compute_dtype='fp16'"):
        compute_dtype("fp16")


def test_bnb_config_4bit_matches_settings():
    cfg = bnb_config(QuantSettings(bits=4), capability=T4)
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant is True
    assert cfg.bnb_4bit_compute_dtype == torch.float16
    assert cfg.bnb_4bit_quant_storage == torch.uint8
    fp4 = bnb_config(QuantSettings(bits=4, quant_type="fp4", double_quant=False), capability=H100)
    assert fp4.bnb_4bit_quant_type == "fp4" and fp4.bnb_4bit_use_double_quant is False
    assert fp4.bnb_4bit_compute_dtype == torch.bfloat16


def test_bnb_config_8bit_and_16bit():
    assert bnb_config(QuantSettings(bits=8)).load_in_8bit
    assert bnb_config(QuantSettings(bits=16)) is None
    with pytest.raises(ValueError, match="bits=3"):
        bnb_config(QuantSettings(bits=3))
    with pytest.raises(ValueError, match="quant_type='int4'"):
        bnb_config(QuantSettings(quant_type="int4"))


def test_weight_memory_of_gemma2_2b():
    cfg = reference_config()
    m16, m8, m4 = (weight_memory(cfg, bits=b) for b in (16, 8, 4))
    assert 2.60e9 < m16["parameters"] < 2.62e9        # 2.61 B parameters
    assert m16["bytes"] == 2 * m16["parameters"]      # every weight in 16 bits
    # embeddings (256000 x 2304, tied to the output head) stay 16-bit when quantizing
    embed = 256000 * 2304
    assert m4["quantized_parameters"] == m16["parameters"] - embed - (2 * 26 * 2304 + 26 * 2 * 2304 + 2304)
    q = m4["quantized_parameters"]
    rest = m4["parameters"] - q
    assert m4["bytes"] == pytest.approx(q * bytes_per_weight(4) + rest * 2)
    assert m8["bytes"] == pytest.approx(q * 1 + rest * 2)
    assert m4["gib"] < m8["gib"] < m16["gib"]


def test_double_quant_saves_about_a_third_of_a_bit():
    saved_bits = 8 * (bytes_per_weight(4, double_quant=False) - bytes_per_weight(4, True))
    assert 0.35 < saved_bits < 0.40
