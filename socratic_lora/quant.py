"""Quantization settings: 4-bit NF4/FP4 or 8-bit, and the weight-memory arithmetic.

    from socratic_lora import QuantSettings, bnb_config
    config = bnb_config(QuantSettings(bits=4))   # what lesson 02 (quantization) builds

`bnb_config` turns our own small settings into a `transformers.BitsAndBytesConfig`;
`weight_memory` estimates the bytes of a model's weights at 16, 8 and 4 bits from its
config alone, without loading anything.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "uint8": torch.uint8}
# bitsandbytes quantizes in blocks of 64 weights, one absmax scale per block.
BLOCK = 64
DOUBLE_QUANT_BLOCK = 256  # second-level blocks of the 8-bit absmax scales (double quantization)


@dataclass
class QuantSettings:
    bits: int = 4                    # 4 (QLoRA), 8 (LLM.int8) or 16 (no quantization)
    quant_type: str = "nf4"          # nf4 suits normally distributed weights; fp4 is the older format
    double_quant: bool = True        # quantize the scales too: about 0.37 bits per weight saved
    compute_dtype: str = "auto"      # auto | bfloat16 | float16 | float32; auto picks by hardware
    storage_dtype: str = "uint8"     # how packed 4-bit weights are stored; uint8 is the usual choice


def compute_dtype(setting: str = "auto", capability: tuple[int, int] | None = None) -> torch.dtype:
    """The dtype the matrix products run in.

    "auto": compute capability >= 8.0 (A100, H100, L4, RTX 30xx) gives bfloat16; a T4 (7.5) or
    older gives float16, because `torch.cuda.is_bf16_supported()` says yes on a T4 but runs
    bfloat16 through slow emulation; no GPU gives bfloat16. `capability` defaults to GPU 0's.
    """
    if setting != "auto":
        if setting not in DTYPES or setting == "uint8":
            raise ValueError(f"compute_dtype={setting!r}: use auto, bfloat16, float16 or float32")
        return DTYPES[setting]
    if capability is None:
        if not torch.cuda.is_available():
            return torch.bfloat16
        capability = torch.cuda.get_device_capability(0)
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def bnb_config(settings: QuantSettings, capability: tuple[int, int] | None = None,
               cpu_offload: bool = False):
    """Build the `BitsAndBytesConfig` for `settings`; None for 16-bit (no quantization)."""
    from transformers import BitsAndBytesConfig

    if settings.bits == 16:
        return None
    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cpu_offload)
    if settings.bits != 4:
        raise ValueError(f"bits={settings.bits}: use 4, 8 or 16")
    if settings.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={settings.quant_type!r}: use nf4 or fp4")
    if settings.storage_dtype not in DTYPES:
        raise ValueError(f"storage_dtype={settings.storage_dtype!r}: use one of {sorted(DTYPES)}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.quant_type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(settings.compute_dtype, capability),
        bnb_4bit_quant_storage=DTYPES[settings.storage_dtype],
        llm_int8_enable_fp32_cpu_offload=cpu_offload,
    )


def bytes_per_weight(bits: int, double_quant: bool = True) -> float:
    """Bytes one quantized linear weight costs, its share of the block scales included."""
    if bits == 16:
        return 2.0
    if bits == 8:
        return 1.0  # plus one float32 scale per row, negligible
    if bits == 4:
        scales = (1 / BLOCK + 4 / (BLOCK * DOUBLE_QUANT_BLOCK)) if double_quant else 4 / BLOCK
        return 0.5 + scales
    raise ValueError(f"bits={bits}: use 4, 8 or 16")


def weight_memory(config, bits: int = 16, double_quant: bool = True) -> dict:
    """Estimate weight bytes of the model described by `config` (a transformers config).

    Linear layers inside the decoder are quantized; embeddings, norms and the output head stay
    16-bit, as bitsandbytes does. Returns counts and bytes (see lesson 02 for the arithmetic).
    """
    from .placement import block_sizes  # meta-model sizes, shared with the placement planner

    sizes = block_sizes(config, bits=bits, double_quant=double_quant)
    return {
        "bits": bits,
        "parameters": sum(s.params for s in sizes),
        "quantized_parameters": sum(s.quantized_params for s in sizes),
        "bytes": sum(s.bytes for s in sizes),
        "gib": sum(s.bytes for s in sizes) / 2**30,
    }
