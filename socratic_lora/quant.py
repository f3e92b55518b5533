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


# --- Lesson 02 (quantization): the 4-bit code books, a round trip on a real weight, a figure ---

def _bnb_functional():
    """`bitsandbytes.functional`, imported without its import-time notice that an optional
    CPU kernel package (`kernels`) is missing: the notice is about speed, not correctness."""
    import logging

    log = logging.getLogger("bitsandbytes")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_f
    finally:
        log.setLevel(old)
    return bnb_f


def codebook(quant_type: str = "nf4") -> torch.Tensor:
    """The 16 values a 4-bit code stands for, before scaling by its block's absmax (float32, CPU).

    nf4: quantiles of a normal distribution (dense near 0, where most weights are), exact 0;
    fp4: a tiny float format (1 sign, 2 exponent, 1 mantissa bit), +0 and -0 both present.
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: use nf4 or fp4")
    return _bnb_functional().get_4bit_type(quant_type, device="cpu").float().cpu()


def quantize_roundtrip(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                       blocksize: int = BLOCK, storage_dtype: str = "uint8") -> dict:
    """Quantize `weight` to 4 bits with bitsandbytes, de-quantize it, and measure the damage.

    Runs on the tensor's device (bitsandbytes >= 0.48 has CPU kernels, so the book runs it on
    the CPU). Returns the errors (mean and max absolute, relative Frobenius norm), what the
    quantized tensor costs in bytes (packed codes + block scales, + the second-level scales
    with double quantization; the per-tensor code tables of about 1 KiB are not counted) and
    the dtype and shape the packed codes are stored in.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("quantize_roundtrip: give a 2-D floating-point weight matrix, e.g. "
                         "model.get_submodule('model.layers.0.mlp.down_proj').weight")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: use nf4 or fp4")
    if storage_dtype not in DTYPES:
        raise ValueError(f"storage_dtype={storage_dtype!r}: use one of {sorted(DTYPES)}")
    bnb_f = _bnb_functional()
    w = weight.detach()
    packed, state = bnb_f.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                        quant_type=quant_type, quant_storage=DTYPES[storage_dtype])
    back = bnb_f.dequantize_4bit(packed, state)
    diff = back.float() - w.float()
    n = w.numel()
    scale_bytes = state.absmax.numel() * state.absmax.element_size()
    if state.nested:  # second-level float32 scales, plus one float32 offset
        scale_bytes += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
    total = packed.numel() * packed.element_size() + scale_bytes
    return {
        "quant_type": quant_type,
        "double_quant": double_quant,
        "weights": n,
        "mean_abs_error": diff.abs().mean().item(),
        "max_abs_error": diff.abs().max().item(),
        "relative_error": (diff.norm() / w.float().norm()).item(),
        "bytes": total,
        "bytes_per_weight": total / n,
        "packed_dtype": str(packed.dtype).replace("torch.", ""),
        "packed_shape": tuple(packed.shape),
    }


def plot_weight_memory(config, bits=(32, 16, 8, 4), double_quant: bool = True,
                       limits: dict | None = None, title: str | None = None):
    """A matplotlib Figure: weight memory (GiB) of the model of `config` (a config, a model
    or a model id) at each precision in `bits`, one stacked bar each: the decoder's linear
    layers (what bitsandbytes quantizes) and the rest (embeddings, norms: kept 16-bit, or
    32-bit in the 32-bit bar).

    `limits` draws dashed lines, e.g. {"one T4 (15 GiB)": 15}. Labels are ASCII, because
    Japanese text needs a font that a build machine may lack; lesson 02 explains them.
    """
    import matplotlib.pyplot as plt

    from .placement import _load_config

    config = _load_config(config)
    bits = tuple(bits)
    bad = [b for b in bits if b not in (32, 16, 8, 4)]
    if not bits or bad:
        raise ValueError(f"bits={bits!r}: choose from 32, 16, 8 and 4")
    linear = weight_memory(config, 4, double_quant)["quantized_parameters"]
    rows = []
    for b in bits:
        mem = weight_memory(config, b, double_quant)
        per = {32: 4.0, 16: 2.0}.get(b) or bytes_per_weight(b, double_quant)
        rows.append((b, linear * per / 2**30, (mem["bytes"] - linear * per) / 2**30,
                     mem["parameters"]))
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    x = list(range(len(rows)))
    lin = [r[1] for r in rows]
    rest = [r[2] for r in rows]
    ax.bar(x, lin, color="#4e79a7", label="linear layers (quantized below 16-bit)")
    ax.bar(x, rest, bottom=lin, color="#f28e2b", label="embeddings, norms (not quantized)")
    for i, (a, c) in enumerate(zip(lin, rest)):
        ax.text(i, a + c, f"{a + c:.2f} GiB", ha="center", va="bottom", fontsize=9)
    for k, (name, value) in enumerate((limits or {}).items()):
        ax.axhline(value, color="grey", linestyle=("--", ":", "-.")[k % 3], linewidth=1)
        ax.text(len(rows) - 0.55, value, name, ha="right", va="bottom", fontsize=8,
                color="dimgrey", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    ax.set_xticks(x, [f"{b}-bit" + (" (NF4)" if b == 4 else "") for b, *_ in rows])
    ax.set_ylabel("weight memory (GiB)")
    top = max(a + c for a, c in zip(lin, rest))
    ax.set_ylim(0, 1.15 * max([top, *(limits or {}).values()]))
    ax.set_title(title or f"weights of {getattr(config, 'model_type', 'model')} "
                          f"({rows[0][3] / 1e9:.2f}B parameters) by precision", fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
