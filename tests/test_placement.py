import pytest
import torch

from conftest import reference_config, tiny_gemma2_config, tiny_neox_config
from socratic_lora import PlacementError, parse_memory, plan_placement, verify_placement
from socratic_lora.placement import block_sizes

GiB = 2**30


@pytest.mark.parametrize("text,expected", [("4GiB", 4 * GiB), ("512MiB", 512 * 2**20),
                                           ("1.5GiB", int(1.5 * GiB)), (2**30, GiB)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad,hint", [("4GB", "did you mean '4GiB'"), ("4 gib", "did you mean '4GiB'"),
                                      ("-1GiB", "must be positive"), ("lots", "not a size"),
                                      (0, "positive"), (True, "not a size"), ("0GiB", "positive"),
                                      (4, "read as bytes.*did you mean '4GiB'")])
def test_parse_memory_rejects(bad, hint):
    with pytest.raises(ValueError, match=hint):
        parse_memory(bad, "gpu_budgets[0]")


def _check(plan, gpus):
    layers = plan.layers_per_device()
    assert set(layers) == set(gpus), plan.table()            # layers on every GPU
    assert "cpu" not in plan.placed.values()                  # nothing offloaded
    for dev, used in plan.bytes_per_device().items():
        assert used <= plan.budgets[dev]
    assert sorted(sum(layers.values(), [])) == list(range(26))  # every layer once, in order
    assert all(a < b for a, b in zip(layers[0], layers[1]))


def test_balanced_gemma2_2b_over_two_4gib_gpus_4bit():
    plan = plan_placement(reference_config(), "balanced", {0: "4GiB", 1: "4GiB"}, bits=4)
    _check(plan, [0, 1])
    assert plan.device_map["model.embed_tokens"] == 0
    assert plan.device_map["lm_head"] == 0                    # tied to the embeddings
    assert plan.device_map["model.norm"] == 1
    table = plan.table()
    assert "GPU 0" in table and "GPU 1" in table and "CPU" not in table


def test_balanced_gemma2_2b_over_two_15gib_gpus_16bit():
    plan = plan_placement(reference_config(), "balanced", ["15GiB", "15GiB"], bits=16)
    _check(plan, [0, 1])
    used = plan.bytes_per_device()
    assert abs(used[0] - used[1]) < 0.25 * GiB                 # balanced by bytes
    assert sum(used.values()) == pytest.approx(2 * 2.614e9, rel=1e-3)


def test_the_source_notebooks_budgets_fit_without_offloading_in_16bit():
    # the source set 4 GiB per GPU and lost two layers to the CPU; 16-bit needs 4.87 GiB
    plan = plan_placement(reference_config(), "balanced", {0: "4GiB", 1: "4GiB"}, bits=16)
    _check(plan, [0, 1])


def test_refuses_when_budgets_are_too_small():
    with pytest.raises(PlacementError) as err:
        plan_placement(reference_config(), "balanced", {0: "2GiB", 1: "2GiB"}, bits=16)
    msg = str(err.value)
    assert "missing" in msg and "GPU" in msg and "allow_offload" in msg
    assert "4.87 GiB" in msg                                   # what the weights need
    assert "use fewer bits (4-bit)" in msg
    with pytest.raises(PlacementError) as err:                 # already 4-bit: no such advice
        plan_placement(reference_config(), "balanced", {0: "0.5GiB", 1: "0.5GiB"}, bits=4)
    assert "fewer bits" not in str(err.value) and "allow_offload" in str(err.value)


def test_refusal_names_the_device_that_is_short():
    with pytest.raises(PlacementError, match=r"GPU 0: needs .* GiB missing"):
        plan_placement(reference_config(), "single", {0: "2GiB"}, bits=16)


def test_offload_only_when_allowed():
    plan = plan_placement(reference_config(), "balanced", {0: "2GiB", 1: "2GiB"}, bits=16,
                          allow_offload=True)
    assert "cpu" in plan.placed.values()
    assert set(plan.layers_per_device()) >= {0, 1}
    for dev, used in plan.bytes_per_device().items():
        assert used <= plan.budgets[dev]


def test_offloaded_4bit_blocks_are_counted_unquantized():
    """bitsandbytes leaves modules mapped to the CPU unquantized (llm_int8_enable_fp32_cpu_offload
    skips them), so they take 2 bytes per weight there, not 0.52."""
    plan = plan_placement(reference_config(), "single", {0: "1.5GiB"}, cpu_budget="24GiB", bits=4,
                          allow_offload=True)
    on_cpu = [b for b in plan.blocks if plan.placed[b.name] == "cpu"]
    assert on_cpu and any(b.quantized_params for b in on_cpu)
    assert plan.bytes_per_device()["cpu"] == pytest.approx(sum(2 * b.params for b in on_cpu))
    assert "CPU blocks stay 16-bit" in plan.table()
    cpu_4bit = sum(b.bytes for b in on_cpu)
    assert cpu_4bit < 2 * GiB < plan.bytes_per_device()["cpu"]
    # what fits at 4 bits but not at 16: refused, saying how much the CPU would need
    need = plan.bytes_per_device()["cpu"] / GiB
    with pytest.raises(PlacementError, match=f"would need about {need:.2f} GiB, since offloaded"):
        plan_placement(reference_config(), "single", {0: "1.5GiB"}, cpu_budget="2GiB", bits=4,
                       allow_offload=True)
    gpu_only = plan_placement(reference_config(), "single", {0: "3GiB"}, bits=4)
    assert "stay 16-bit" not in gpu_only.table()


def test_single_and_data_parallel_modes(monkeypatch):
    single = plan_placement(reference_config(), "single", {0: "8GiB", 1: "8GiB"}, bits=4)
    assert single.device_map == {"": 0}
    monkeypatch.setenv("LOCAL_RANK", "1")
    dp = plan_placement(reference_config(), "data_parallel", {0: "8GiB", 1: "8GiB"}, bits=4)
    assert dp.device_map == {"": 1}
    with pytest.raises(PlacementError, match="GPU 3 has no budget"):
        plan_placement(reference_config(), "data_parallel", {0: "8GiB"}, bits=4, local_rank=3)


def test_bad_mode_and_budgets():
    with pytest.raises(ValueError, match="mode='auto'"):
        plan_placement(reference_config(), "auto", {0: "4GiB"})
    with pytest.raises(ValueError, match="not a GPU index"):
        plan_placement(reference_config(), "balanced", {"gpu0": "4GiB"})
    with pytest.raises(ValueError, match=r"gpu_budgets\[1\].*did you mean '4GiB'"):
        plan_placement(reference_config(), "balanced", {0: "4GiB", 1: "4GB"})


def test_more_than_two_gpus():
    plan = plan_placement(reference_config(), "balanced", ["3GiB"] * 4, bits=16)
    assert set(plan.layers_per_device()) == {0, 1, 2, 3}


def test_block_sizes_equal_real_parameter_bytes(tiny_gemma2_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2_dir, dtype=torch.float32)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(b.bytes for b in block_sizes(model.config, bits=32)) == real
    names = [b.name for b in block_sizes(model.config)]
    assert names[:2] == ["model.embed_tokens", "model.layers.0"] and names[-1] == "lm_head"


def test_gpt_neox_layers_are_found():
    blocks = block_sizes(tiny_neox_config())
    assert [b.layer for b in blocks if b.layer is not None] == [0, 1]
    assert blocks[-1].name == "lm_head" and blocks[-1].tied_to is None  # untied in GPT-NeoX
    assert blocks[-1].bytes == 2 * 64 * 512


def test_verify_refuses_a_model_that_is_not_where_planned(tiny_gemma2_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2_dir)   # all on the CPU
    gpu_plan = plan_placement(tiny_gemma2_config(), "balanced", {0: "1GiB", 1: "1GiB"})
    with pytest.raises(PlacementError, match=r"GPU\(s\) \[0, 1\] were planned"):
        verify_placement(model, gpu_plan)
    cpu_plan = plan_placement(tiny_gemma2_config(), "cpu")
    verify_placement(model, cpu_plan)   # consistent: no error
