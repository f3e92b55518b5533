"""Lesson 02's and 03's package additions: the weight-memory figure, the 4-bit code books and
round trip (bitsandbytes on the CPU), and the placement-plan figure."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from conftest import reference_config, tiny_gemma2_config  # noqa: E402
from socratic_lora import plan_placement, weight_memory  # noqa: E402
from socratic_lora.placement import plot_plan  # noqa: E402
from socratic_lora.quant import (bytes_per_weight, codebook, plot_weight_memory,  # noqa: E402
                                 quantize_roundtrip)

GiB = 2**30


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _bar_totals(ax):
    """Top of each stacked bar, by x position."""
    tops = {}
    for p in ax.patches:
        x = round(p.get_x() + p.get_width() / 2, 6)
        tops[x] = max(tops.get(x, 0.0), p.get_y() + p.get_height())
    return [tops[x] for x in sorted(tops)]


# --- plot_weight_memory ---

def test_weight_memory_bars_match_the_estimate():
    config = tiny_gemma2_config(layers=3)
    fig = plot_weight_memory(config, bits=(32, 16, 8, 4), limits={"budget": 0.0001})
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    expected = [weight_memory(config, b)["gib"] for b in (32, 16, 8, 4)]
    assert _bar_totals(ax) == pytest.approx(expected, rel=1e-9)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32-bit", "16-bit", "8-bit", "4-bit (NF4)"]
    assert any(line.get_ydata()[0] == 0.0001 for line in ax.get_lines())     # the limit line
    assert any(t.get_text() == "budget" for t in ax.texts)


def test_weight_memory_of_gemma2_2b_by_precision():
    fig = plot_weight_memory(reference_config(), bits=(16, 4))
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["4.87 GiB", "2.07 GiB"]              # docs/gpu-checks.md: 2.07 planned
    assert "2.61B parameters" in fig.axes[0].get_title()
    # the 4-bit bar's linear part is a quarter of the 16-bit one's, plus the block scales
    lin16, lin4 = sorted((p for p in fig.axes[0].patches), key=lambda p: p.get_x())[0::2][:2]
    assert lin4.get_height() / lin16.get_height() == pytest.approx(bytes_per_weight(4) / 2)


@pytest.mark.parametrize("bits", [(), (16, 2), (3,)])
def test_weight_memory_rejects_unknown_precisions(bits):
    with pytest.raises(ValueError, match="choose from 32, 16, 8 and 4"):
        plot_weight_memory(tiny_gemma2_config(), bits=bits)


# --- codebook and quantize_roundtrip (bitsandbytes, CPU) ---

def test_nf4_codebook():
    nf4 = codebook("nf4")
    assert nf4.shape == (16,)
    assert torch.all(nf4[1:] > nf4[:-1])                   # sorted, no duplicates
    assert nf4[0] == -1 and nf4[-1] == 1 and (nf4 == 0).sum() == 1
    # normal quantiles: the steps grow away from zero
    steps = (nf4[1:] - nf4[:-1])
    assert steps[7] < steps[-1] and steps[6] < steps[0]


def test_fp4_codebook_is_symmetric_with_two_zeros():
    fp4 = codebook("fp4")
    assert fp4.shape == (16,) and (fp4 == 0).sum() == 2
    assert sorted(fp4.tolist()) == sorted((-fp4).tolist())
    with pytest.raises(ValueError, match="use nf4 or fp4"):
        codebook("int4")


def _normal(rows=256, cols=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02


def test_roundtrip_error_nf4_beats_fp4_on_normal_weights():
    w = _normal()
    nf4, fp4 = quantize_roundtrip(w, "nf4"), quantize_roundtrip(w, "fp4")
    assert 0.05 < nf4["relative_error"] < 0.15
    assert nf4["relative_error"] < fp4["relative_error"]
    assert nf4["mean_abs_error"] < fp4["mean_abs_error"]
    assert nf4["weights"] == w.numel()


def test_roundtrip_bytes_match_the_memory_arithmetic():
    w = _normal()                                          # 262144 weights: whole 64 x 256 blocks
    for dq in (True, False):
        r = quantize_roundtrip(w, double_quant=dq)
        # + 4 bytes: the one float32 offset that double quantization keeps per tensor
        assert r["bytes"] == w.numel() * bytes_per_weight(4, dq) + (4 if dq else 0)
    assert quantize_roundtrip(w, double_quant=True)["bytes"] < quantize_roundtrip(w, double_quant=False)["bytes"]


def test_roundtrip_storage_dtype_changes_packing_not_size():
    w = _normal()
    u8, bf16 = quantize_roundtrip(w, storage_dtype="uint8"), quantize_roundtrip(w, storage_dtype="bfloat16")
    assert u8["packed_dtype"] == "uint8" and u8["packed_shape"] == (w.numel() // 2, 1)
    assert bf16["packed_dtype"] == "bfloat16" and bf16["packed_shape"] == (w.numel() // 4, 1)
    assert u8["bytes"] == bf16["bytes"]
    assert u8["relative_error"] == pytest.approx(bf16["relative_error"])


def test_roundtrip_is_exact_for_values_on_the_code_book():
    # every block of 64 holds the 16 code values times a per-block scale: nothing to round
    code = codebook("nf4")
    scales = torch.tensor([0.5, 0.02, 1.0, 3.0]).repeat_interleave(64)
    w = (code.repeat(len(scales) // 16) * scales).reshape(4, 64)
    r = quantize_roundtrip(w, "nf4", double_quant=False)
    assert r["max_abs_error"] < 1e-6


@pytest.mark.parametrize("bad,match", [(torch.zeros(64), "2-D floating-point"),
                                       (torch.zeros(4, 64, dtype=torch.int64), "2-D floating-point"),
                                       ([[0.0] * 64], "2-D floating-point")])
def test_roundtrip_rejects_what_is_not_a_weight_matrix(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_roundtrip(bad)


def test_roundtrip_rejects_bad_settings():
    with pytest.raises(ValueError, match="use nf4 or fp4"):
        quantize_roundtrip(_normal(4, 64), quant_type="int4")
    with pytest.raises(ValueError, match="storage_dtype='int4'"):
        quantize_roundtrip(_normal(4, 64), storage_dtype="int4")


# --- plot_plan ---

def _rows(ax):
    """Sum of bar widths per bar row (y position), top row first."""
    out = {}
    for p in ax.patches:
        y = round(p.get_y() + p.get_height() / 2, 6)
        out[y] = out.get(y, 0.0) + p.get_width()
    return [out[y] for y in sorted(out, reverse=True)]


def test_plot_plan_draws_every_block_where_the_plan_put_it():
    plan = plan_placement(reference_config(), "balanced", {0: "4GiB", 1: "4GiB"}, bits=4)
    fig = plot_plan(plan)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    used = plan.bytes_per_device()
    assert _rows(ax) == pytest.approx([used[0] / GiB, used[1] / GiB])
    drawn = sum(1 for b in plan.blocks if b.bytes > 0)         # the tied head and rotary take none
    assert len(ax.patches) == drawn
    texts = [t.get_text() for t in ax.texts]
    assert "layer 0, 1.14 GiB" in texts and "layers 1-25, 0.94 GiB" in texts
    assert "embed_tokens" in texts
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks == ["GPU 1\nbudget 4.00", "GPU 0\nbudget 4.00"]
    budget_marks = [line for line in ax.get_lines() if line.get_xdata()[0] == 4.0]
    assert len(budget_marks) == 2


def test_plot_plan_shows_the_cpu_row_of_an_offloading_plan():
    plan = plan_placement(reference_config(), "balanced", {0: "2GiB", 1: "2GiB"}, bits=16,
                          allow_offload=True)
    ax = plot_plan(plan).axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[0].startswith("CPU") and len(ticks) == 3
    used = plan.bytes_per_device()
    assert _rows(ax) == pytest.approx([used[0] / GiB, used[1] / GiB, used["cpu"] / GiB])
    # the 24 GiB CPU budget lies far off the picture: only the two GPU budgets are marked
    assert len(ax.get_lines()) == 2


def test_plot_plan_into_given_axes():
    plan = plan_placement(reference_config(), "data_parallel", {0: "4GiB", 1: "4GiB"}, bits=4,
                          local_rank=1)
    fig, axes = plt.subplots(2, 1)
    assert plot_plan(plan, ax=axes[1], legend=False) is fig
    assert not axes[0].patches and axes[1].patches
    assert [t.get_text() for t in axes[1].get_yticklabels()] == ["GPU 1\nbudget 4.00"]
    assert axes[1].get_legend() is None
    assert plot_plan(plan).axes[0].get_legend() is not None


def test_plot_plan_rejects_what_is_not_a_plan():
    with pytest.raises(ValueError, match="give a Plan"):
        plot_plan({"": 0})
