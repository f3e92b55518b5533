"""Cases where the stacked q/k/v and gate/up projections (fast.py, fuse_projections) must
give what peft's per-projection computation gives, or cost nothing extra: found by an
independent review of session 8. Each test compares a model with fuse_projections on against
the same model with it off (CPU, float32, tiny 4-bit Gemma 2 whose layers can be stacked)."""
import pytest
import torch

from conftest import VOCAB
from socratic_lora.fast import FastSettings, apply_fast_path

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def stackable(tmp_path_factory):
    from conftest import save_tiny
    from test_fast import _stackable_config
    return save_tiny(_stackable_config(2), tmp_path_factory.mktemp("s8") / "m")


def _ids():
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _model(path, fuse, **lora):
    from test_fast import _tiny_4bit_lora
    model = _tiny_4bit_lora(path, torch.float32, **lora)
    return apply_fast_path(model, FastSettings(attention="eager", checkpoint="none",
                                               dequant="torch", fuse_projections=fuse))


def _loss(model, **kw):
    ids = _ids()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids, **kw).loss.item()


def test_lora_bias_is_not_dropped_by_the_stacked_projections(stackable):
    """LoraConfig(lora_bias=True) gives lora_B a bias, which the stacked product (block-
    diagonal B weights only) would drop: peft's own path must run."""
    losses = []
    for fuse in (False, True):
        model = _model(stackable, fuse, lora_bias=True)
        for n, p in model.named_parameters():
            if "lora_B" in n and n.endswith(".bias"):
                torch.nn.init.normal_(p.data, std=1.0, generator=torch.Generator().manual_seed(0))
        losses.append(_loss(model))
    assert model.fast_report["fused_qkv"] == 2
    assert abs(losses[0] - losses[1]) < 1e-5, losses


def test_mixed_adapter_batches_use_each_rows_adapter(stackable):
    """peft's mixed-batch inference (`adapter_names=[...]`) works through forward pre-hooks on
    the LoRA layers, which the stacked path never calls: each row must still get its own
    adapter."""
    from peft import LoraConfig
    out = {}
    for fuse in (False, True):
        model = _model(stackable, fuse)
        torch.manual_seed(3)
        model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["q_proj", "k_proj", "v_proj",
                                                              "o_proj"]))
        model.eval()
        with torch.no_grad():
            out[fuse] = model(input_ids=_ids(), adapter_names=["default", "other"]).logits
    assert torch.allclose(out[True], out[False], atol=1e-4), \
        (out[True] - out[False]).abs().amax(dim=(1, 2))


@pytest.mark.parametrize("targets", [["gate_proj"], ["up_proj"], ["q_proj", "v_proj"]])
def test_an_adapter_added_after_the_fast_path_is_applied(stackable, targets):
    """Stacking is decided when the projections have no adapter; an adapter added later
    (add_adapter / load_adapter) to only some of them must be applied (once this raised
    AttributeError or was ignored)."""
    from peft import LoraConfig
    losses = []
    for fuse in (False, True):
        model = _model(stackable, fuse, target_modules=["o_proj", "down_proj"])
        torch.manual_seed(4)
        model.add_adapter("late", LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                             init_lora_weights=False))
        model.set_adapter("late")
        losses.append(_loss(model))
    assert abs(losses[0] - losses[1]) < 1e-5, losses


def test_merge_and_unload_is_seen_by_the_stacked_projections(stackable):
    """peft's 4-bit merge replaces each base layer's weight by a newly quantized Params4bit;
    after merge_and_unload (no LoRA wrapper left) the stacked copy of the old weights must not
    be used (generation with a cache falls back anyway, so the model would disagree with
    itself)."""
    losses = []
    for fuse in (False, True):
        merged = _model(stackable, fuse).merge_and_unload()
        losses.append(_loss(merged))
    assert abs(losses[0] - losses[1]) < 1e-4, losses


def test_ddp_does_not_broadcast_the_stacked_4bit_data_at_every_forward(stackable, tmp_path):
    """The stacked data must not be buffers: DDP's default broadcast_buffers=True (Trainer
    leaves it so) broadcasts every buffer from rank 0 before every forward: for Gemma 2 2B in
    speed mode about 0.7 GB of 4-bit data a step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        sent = {}
        for fuse in (False, True):
            model = _model(stackable, fuse)
            ddp = DDP(model)
            bytes_ = []
            real = ddp._distributed_broadcast_coalesced

            def record(tensors, *a, _real=real, _b=bytes_, **k):
                _b.append(sum(t.numel() * t.element_size() for t in tensors))
                return _real(tensors, *a, **k)
            ddp._distributed_broadcast_coalesced = record
            ids = _ids()
            ddp(input_ids=ids, labels=ids).loss.backward()
            sent[fuse] = sum(bytes_)
    finally:
        dist.destroy_process_group()
    assert sent[True] <= sent[False] + 1024, sent


def test_applying_the_fast_path_twice_does_not_recurse(stackable):
    """A second apply_fast_path must not store the fused forward as the 'unfused' one, or
    every fallback (a KV cache: generation) would call itself until RecursionError."""
    model = _model(stackable, True)
    apply_fast_path(model, FastSettings(attention="eager", checkpoint="none", dequant="torch"))
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=_ids(), max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_casting_the_model_leaves_the_stacked_code_tables_in_float32(stackable):
    """model.to(dtype) casts floating buffers; the stacked NF4 code table, nested scales and
    offsets must stay float32, or the stacked unpacking would drift from bitsandbytes'."""
    losses = []
    for fuse in (False, True):
        model = _model(stackable, fuse).to(torch.bfloat16)
        losses.append(_loss(model))
    assert losses[0] == losses[1], losses


def test_an_attention_class_of_another_shape_is_left_unfused(stackable, monkeypatch):
    """The fused attention forward repeats transformers 5.x's Gemma2Attention.forward; a class
    with q/k norms (as Gemma 3 has) or other leading parameters keeps its own forward."""
    from test_fast import _tiny_4bit_lora
    model = _tiny_4bit_lora(stackable, torch.float32)
    for layer in model.get_base_model().model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
    apply_fast_path(model, FastSettings(attention="eager", checkpoint="none", dequant="torch"))
    assert model.fast_report["fused_qkv"] == 0 and model.fast_report["fused_gate_up"] == 2
    model = _tiny_4bit_lora(stackable, torch.float32)
    attn_cls = type(model.get_base_model().model.layers[0].self_attn)

    def forward(self, hidden_states, cache_position, position_embeddings=None,
                attention_mask=None, **kwargs):
        raise AssertionError("not called")
    monkeypatch.setattr(attn_cls, "forward", forward)
    apply_fast_path(model, FastSettings(attention="eager", checkpoint="none", dequant="torch"))
    assert model.fast_report["fused_qkv"] == 0
