"""Cases for FastDecoder (socratic_lora.fastgen) and the torch 4-bit unpacking
(socratic_lora.fast, dequant="torch") that tests/test_fastgen.py and tests/test_fast.py do not
cover: one decoder reused across cache buckets, batch sizes and max_new_tokens 1..4 (the
edge of the warm-up logic), Gemma 1, tied Llama, sdpa attention, 16-bit models, several eos
ids, top_p/top_k sampling against the nucleus computed here, the position limit capping the
cache; bitsandbytes blocksizes, odd element counts, output dtypes, storage dtypes, Linear4bit
layers with a bias and other compute dtypes, and a 4-bit model decoded by FastDecoder.
CPU only (the CUDA graph records the same step that runs eagerly here)."""
import types

import pytest
import torch

from socratic_lora.fastgen import FastDecoder
from test_fastgen import VOCAB, _model, _plain, _prompts

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _from_config(cfg, attn="eager"):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


# --- FastDecoder ------------------------------------------------------------------------------
def test_gemma3_window_shorter_than_prompt_with_left_padding():
    model = _model("gemma3_text", window=6)
    ids, mask = _prompts(3, 12, pad_rows=[(0, 5), (2, 11)])     # row 2: one real token
    got = FastDecoder(model, bucket=8).generate(ids, mask, max_new_tokens=20)
    assert torch.equal(got, _plain(model, ids, mask, 20))


def test_one_decoder_across_buckets_batch_sizes_and_short_outputs():
    """Prompt + new tokens crossing a bucket of 8 between calls, the batch size changing,
    max_new_tokens 1..4 (no step, one step, the warm-up edge), and back to the first case."""
    model = _model("gemma2", window=8)
    dec = FastDecoder(model, bucket=8)
    calls = [(2, 5, 3, [(0, 2)], 8), (2, 7, 3, [(1, 3)], 16), (3, 7, 1, [(0, 1)], 8),
             (1, 9, 2, [], 16), (3, 7, 4, [(2, 5)], 16), (2, 5, 3, [(0, 2)], 8)]
    for batch, length, new, pads, capacity in calls:
        ids, mask = _prompts(batch, length, pad_rows=pads)
        got = dec.generate(ids, mask, max_new_tokens=new)
        assert got.shape == (batch, new)
        assert dec._state["arange"].numel() == capacity
        assert torch.equal(got, _plain(model, ids, mask, new)), (batch, length, new)


def test_cache_capped_at_the_models_positions():
    """need = 20 = max_position_embeddings; the bucket of 16 would round it up to 32."""
    from transformers import Gemma2Config
    model = _from_config(Gemma2Config(sliding_window=8, **{**COMMON,
                                                           "max_position_embeddings": 20}))
    ids, mask = _prompts(2, 10, pad_rows=[(1, 4)])
    dec = FastDecoder(model, bucket=16)
    got = dec.generate(ids, mask, max_new_tokens=10)
    assert dec._state["arange"].numel() == 20
    assert torch.equal(got, _plain(model, ids, mask, 10))


def _gemma1():
    from transformers import GemmaConfig
    return _from_config(GemmaConfig(**{**COMMON, "num_key_value_heads": 1}))


def _llama_tied():
    from transformers import LlamaConfig
    return _from_config(LlamaConfig(tie_word_embeddings=True, **COMMON))


def _llama_sdpa_bias():
    from transformers import LlamaConfig
    return _from_config(LlamaConfig(attention_bias=True, **COMMON), attn="sdpa")


def _gemma3_sdpa():
    from transformers import Gemma3TextConfig
    return _from_config(Gemma3TextConfig(sliding_window=6, **COMMON), attn="sdpa")


def _llama3_rope():
    from transformers import LlamaConfig
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return _from_config(LlamaConfig(rope_scaling=rope, **COMMON))


@pytest.mark.parametrize("build", [_gemma1, _llama_tied, _llama_sdpa_bias, _gemma3_sdpa,
                                   _llama3_rope])
def test_other_supported_variants_equal_generate(build):
    model = build()
    dec = FastDecoder(model)
    if model.config.model_type == "gemma":
        assert dec.softcap is None                    # Gemma 1 has no final softcap
        # the embedding is scaled exactly once: by its module or by FastDecoder
        assert (dec._scale is None) == hasattr(model.model.embed_tokens, "embed_scale")
    ids, mask = _prompts(3, 9, pad_rows=[(1, 3), (2, 8)])
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=10), _plain(model, ids, mask, 10))


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_models_agree_with_generate(kind, dtype):
    """16-bit on the CPU, left padding (a row with one real token: fully masked padded
    queries must not turn into NaN that leaks into the real ones) and a window of 6."""
    model = _model(kind, window=6).to(dtype)
    ids, mask = _prompts(3, 9, pad_rows=[(1, 3), (2, 8)])
    got = FastDecoder(model).generate(ids, mask, max_new_tokens=10)
    ref = _plain(model, ids, mask, 10)
    assert torch.equal(got[:, 0], ref[:, 0])
    assert (got == ref).float().mean() >= 0.9


def test_several_eos_ids_stop_rows_at_different_steps():
    model = _model("gemma2")
    ids, mask = _prompts(3, 8, pad_rows=[(2, 2)])
    free = FastDecoder(model).generate(ids, mask, max_new_tokens=12)
    eos = [int(free[0, 2]), int(free[1, 0])]       # row 0 stops at step 3, row 1 at step 1
    assert not set(eos) & set(free[2].tolist())     # row 2 never stops
    got = FastDecoder(model).generate(ids, mask, max_new_tokens=12, eos_token_id=eos,
                                      pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)[:, 8:]
    assert torch.equal(got, ref)
    first0 = int(torch.isin(free[0], torch.tensor(eos)).nonzero()[0])
    assert (got[0, first0 + 1:] == 0).all() and (got[1, 1:] == 0).all()
    assert torch.equal(got[2], free[2])


def _nucleus(logits, temperature, top_k, top_p):
    """The tokens a nucleus sampler may pick and their renormalised probabilities."""
    lg = logits / temperature
    if top_k:
        lg = lg.masked_fill(lg < torch.topk(lg, top_k).values[-1], float("-inf"))
    probs, idx = torch.softmax(lg, -1).sort(descending=True)
    n = int((probs.cumsum(0) < top_p).sum()) + 1          # smallest set with mass >= top_p
    q = torch.zeros_like(logits)
    q[idx[:n]] = probs[:n] / probs[:n].sum()
    return set(idx[:n].tolist()), q


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (3.0, 0, 0.5),
                                                     (3.0, 20, 0.9), (10.0, 0, 0.3)])
def test_sampling_stays_inside_the_nucleus(temperature, top_k, top_p):
    model = _model("gemma2")
    ids, mask = _prompts(1, 8)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[0, -1].float()
    allowed, _ = _nucleus(logits, temperature, top_k, top_p)
    assert 1 < len(allowed) < VOCAB
    torch.manual_seed(0)
    got = FastDecoder(model).generate(ids.repeat(512, 1), mask.repeat(512, 1), max_new_tokens=1,
                                      do_sample=True, temperature=temperature, top_k=top_k,
                                      top_p=top_p)[:, 0]
    seen = set(got.tolist())
    assert seen <= allowed
    assert len(seen) > 1


def test_sampling_frequencies_follow_the_renormalised_nucleus():
    model = _model("gemma2")
    ids, mask = _prompts(1, 8)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[0, -1].float()
    _, q = _nucleus(logits, 3.0, 5, 0.99)
    torch.manual_seed(1)
    got = FastDecoder(model).generate(ids.repeat(2048, 1), mask.repeat(2048, 1), max_new_tokens=1,
                                      do_sample=True, temperature=3.0, top_k=5, top_p=0.99)[:, 0]
    freq = torch.bincount(got, minlength=VOCAB).float() / got.numel()
    assert 0.5 * (freq - q).abs().sum() < 0.06            # total variation distance


def test_reply_batch_fast_sampling_uses_the_same_defaults_as_generate():
    from socratic_lora.generate import _fast_decoder
    model = _model("gemma2")
    ids, mask = _prompts(1, 8)
    gen = dict(do_sample=True, temperature=5.0, max_new_tokens=1)   # e.g. greedy + overrides
    dec = _fast_decoder(model, gen, fast=True)                        # what reply_batch calls
    assert dec is not None
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[0, -1]
    top_k = model.generation_config.top_k or 50          # what model.generate applies
    allowed = set(torch.topk(logits, top_k).indices.tolist())
    torch.manual_seed(0)
    with torch.no_grad():
        ref = model.generate(ids.repeat(256, 1), attention_mask=mask.repeat(256, 1),
                             pad_token_id=0, eos_token_id=None, **gen)[:, 8]
    assert set(ref.tolist()) <= allowed                   # generate: only the top 50
    torch.manual_seed(0)
    got = dec.generate(ids.repeat(256, 1), mask.repeat(256, 1), pad_token_id=0, **gen)[:, 0]
    assert set(got.tolist()) <= allowed


# --- dequant="torch" --------------------------------------------------------------------------
def _roundtrip(shape, blocksize, quant_type, nested, dtype, storage=torch.uint8):
    bf = pytest.importorskip("bitsandbytes.functional")
    from socratic_lora.fast import _quant_parts, _unpack
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    packed, qs = bf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                  compress_statistics=nested, quant_storage=storage)
    tensors, meta = _quant_parts(qs)
    got = _unpack(packed, *tensors, meta, dtype)
    ref = bf.dequantize_4bit(packed, qs)
    assert got.shape == tuple(shape) and got.dtype == dtype
    # bitsandbytes returns some 1-D weights as [1, n]; the values are what is compared
    assert torch.equal(got.reshape(-1), ref.reshape(-1))
    if w.numel() > 1:                # one value is its own absmax: exact after quantization
        assert (got.float() - w.float()).abs().max() > 0


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_torch_dequant_other_blocksizes(blocksize, nested):
    _roundtrip((33, 70), blocksize, "nf4", nested, torch.bfloat16)


@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (4097,), (3, 5), (2, 3, 5),
                                   (300, 70)])         # odd counts: a half-filled last byte;
@pytest.mark.parametrize("nested", [False, True])      # 300 x 70: > 256 nested blocks
def test_torch_dequant_odd_and_1d_shapes(shape, nested):
    _roundtrip(shape, 64, "nf4", nested, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_torch_dequant_output_dtypes(dtype, quant_type, nested):
    _roundtrip((33, 70), 64, quant_type, nested, dtype)


def test_torch_dequant_int8_storage():
    """int8 storage: bytes >= 128 are negative numbers; the unpacking reads them as uint8."""
    _roundtrip((64, 128), 64, "nf4", True, torch.bfloat16, storage=torch.int8)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_torch_dequant_float_storage(storage):
    """quant_storage bf16/fp16/fp32 (QuantSettings.storage_dtype, for FSDP) holds the same bytes."""
    _roundtrip((64, 128), 64, "nf4", False, torch.bfloat16, storage=storage)


def _linear4bit(bias, compute_dtype, storage=torch.uint8):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    src = torch.nn.Linear(40, 48, bias=bias)
    lin = bnb.nn.Linear4bit(40, 48, bias=bias, compute_dtype=compute_dtype,
                            compress_statistics=True, quant_type="nf4", quant_storage=storage)
    lin.weight = bnb.nn.Params4bit(src.weight.data.to(torch.bfloat16), requires_grad=False,
                                   compress_statistics=True, quant_type="nf4",
                                   quant_storage=storage)
    if bias:
        lin.bias = torch.nn.Parameter(src.bias.data.to(torch.bfloat16))
    lin = lin.to("cpu")
    assert lin.weight.quant_state is not None
    return lin


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear4bit_torch_forward_with_bias_and_compute_dtypes(bias, compute_dtype):
    """Same output and input/bias gradients as bitsandbytes' own Linear4bit, up to the
    rounding of a separate bias add and of dequantising straight to the compute dtype."""
    from socratic_lora.fast import _patch_linear4bit
    lin = _linear4bit(bias, compute_dtype)
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def run():
        xi = x.clone().requires_grad_()
        if bias:
            lin.bias.grad = None
        out = lin(xi)
        out.float().pow(2).sum().backward()
        return out, xi.grad, (lin.bias.grad.clone() if bias else None)

    ref = run()
    holder = torch.nn.Module()
    holder.lin = lin
    assert _patch_linear4bit(holder) == 1
    got = run()
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    for g, r in zip(got, ref):
        if r is not None:
            assert (g.float() - r.float()).abs().max() <= 2e-2 * r.float().abs().max()
    assert lin.compute_dtype == compute_dtype


def test_linear4bit_torch_forward_bfloat16_storage():
    from socratic_lora.fast import _patch_linear4bit
    lin = _linear4bit(False, torch.bfloat16, storage=torch.bfloat16)
    x = torch.randn(3, 40).to(torch.bfloat16)
    ref = lin(x)
    holder = torch.nn.Module()
    holder.lin = lin
    _patch_linear4bit(holder)
    assert torch.equal(lin(x), ref)


def test_fast_decoder_on_a_4bit_model_with_torch_dequant(tmp_path):
    """FastDecoder on a 4-bit Llama with biases (float16 compute) whose Linear4bit layers
    were patched by dequant="torch": the same greedy tokens as `generate` on the same
    patched model, and (up to rounding) as `generate` on an unpatched copy.
    Patched before any forward: on a CPU with AVX512-BF16 bitsandbytes repacks a weight at
    its first inference forward (quant_state.packing_format_for_cpu), which _patch_linear4bit skips."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from socratic_lora.fast import _patch_linear4bit
    _from_config(LlamaConfig(attention_bias=True, mlp_bias=True,
                             **{**COMMON, "num_hidden_layers": 2})).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16)

    def load():
        return AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=q, dtype=torch.bfloat16, device_map={"": "cpu"},
            attn_implementation="eager").eval()
    model, plain_model = load(), load()
    assert _patch_linear4bit(model) == 2 * 7
    ids, mask = _prompts(2, 9, pad_rows=[(1, 4)])
    got = FastDecoder(model).generate(ids, mask, max_new_tokens=8)
    assert torch.equal(got, _plain(model, ids, mask, 8))
    ref = _plain(plain_model, ids, mask, 8)
    assert (got == ref).float().mean() >= 0.9 and torch.equal(got[:, 0], ref[:, 0])
