"""FastDecoder (socratic_lora.fastgen) against the model's own `generate`, on the CPU.

The CUDA-graph replay itself needs a GPU (bench/gen_perf.py runs it there and compares its
tokens with plain `generate`); here the same step function runs eagerly, so these tests
check what the graph records: cache writes, masks (causal, sliding window, left padding),
positions, the softcap and the token choice."""
import pytest
import torch

from socratic_lora.fastgen import FastDecoder

VOCAB = 256


def _model(kind, window=None):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if kind == "gemma2":
        cfg = Gemma2Config(sliding_window=window or 4096, **common)
    elif kind == "gemma3_text":
        cfg = Gemma3TextConfig(sliding_window=window or 512, **common)
    else:
        cfg = LlamaConfig(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    if not cfg.tie_word_embeddings:      # spread the logits out: fewer near-ties in argmax
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    return model


def _plain(model, ids, mask, new, **kw):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    return out[:, ids.shape[1]:]


def _prompts(batch, length, pad_rows=()):
    g = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in pad_rows:           # left padding
        ids[row, :n] = 0
        mask[row, :n] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "llama"])
def test_greedy_equals_generate(kind):
    model = _model(kind)
    ids, mask = _prompts(1, 12)
    got = FastDecoder(model, bucket=16).generate(ids, mask, max_new_tokens=20)
    assert torch.equal(got, _plain(model, ids, mask, 20))


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text"])
def test_left_padded_batch_and_sliding_window(kind):
    # window 8 < prompt + new tokens: the local layers must forget what the window drops
    model = _model(kind, window=8)
    ids, mask = _prompts(3, 10, pad_rows=[(1, 4), (2, 9)])
    got = FastDecoder(model, bucket=8).generate(ids, mask, max_new_tokens=16)
    assert torch.equal(got, _plain(model, ids, mask, 16))


def test_window_matters_for_this_check():
    """The sliding-window test above could pass with the window ignored if it had no effect;
    it does have one on these prompts."""
    narrow, wide = _model("gemma2", window=8), _model("gemma2", window=4096)
    ids, mask = _prompts(3, 10, pad_rows=[(1, 4), (2, 9)])
    assert not torch.equal(_plain(narrow, ids, mask, 16), _plain(wide, ids, mask, 16))


def test_decoder_is_reused_and_reset_between_calls():
    model = _model("gemma2")
    dec = FastDecoder(model, bucket=64)
    a_ids, a_mask = _prompts(2, 9, pad_rows=[(0, 3)])
    b_ids, b_mask = _prompts(2, 11)
    first = dec.generate(a_ids, a_mask, max_new_tokens=7)
    state = dec._state
    second = dec.generate(b_ids, b_mask, max_new_tokens=7)
    assert dec._state is state                       # same buffers: same bucket and batch
    assert torch.equal(second, _plain(model, b_ids, b_mask, 7))
    assert torch.equal(dec.generate(a_ids, a_mask, max_new_tokens=7), first)


def test_eos_stops_a_row_and_pads_after_it():
    model = _model("gemma2")
    ids, mask = _prompts(2, 8)
    free = FastDecoder(model).generate(ids, mask, max_new_tokens=12)
    eos = int(free[0, 3])                             # a token row 0 produces at step 4
    got = FastDecoder(model).generate(ids, mask, max_new_tokens=12, eos_token_id=eos,
                                      pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)[:, 8:]
    first = int((free[0] == eos).nonzero()[0])
    assert got[0, first] == eos and (got[0, first + 1:] == 0).all()
    assert torch.equal(got[:, :ref.shape[1]], ref)


def test_sampling_is_seeded_and_respects_top_k():
    model = _model("gemma2")
    ids, mask = _prompts(4, 6)
    dec = FastDecoder(model)
    torch.manual_seed(3)
    a = dec.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=1)
    assert torch.equal(a, _plain(model, ids, mask, 10))          # top_k=1 is greedy
    torch.manual_seed(5)
    b = dec.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=2.0)
    torch.manual_seed(5)
    c = dec.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=2.0)
    assert torch.equal(b, c) and not torch.equal(b, a)


def test_peft_lora_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    model = _model("gemma2")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.eval()
    ids, mask = _prompts(1, 8)
    got = FastDecoder(peft_model).generate(ids, mask, max_new_tokens=10)
    with torch.no_grad():
        ref = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                  min_new_tokens=10, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)[:, 8:]
    assert torch.equal(got, ref)


def test_adapter_state_is_part_of_the_recorded_step():
    """A replayed CUDA graph ignores Python control flow, so switching the adapter off (as the
    evaluation does for its base systems) must record a new step, not reuse the old one."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    model = get_peft_model(_model("gemma2"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    model.eval()
    ids, mask = _prompts(2, 8)
    dec = FastDecoder(model)
    tuned = dec.generate(ids, mask, max_new_tokens=10)
    tuned_state = dec._state
    with model.disable_adapter():
        base = dec.generate(ids, mask, max_new_tokens=10)
        assert dec._state is not tuned_state
        with torch.no_grad():
            ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                 min_new_tokens=10, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)[:, 8:]
    assert torch.equal(base, ref) and not torch.equal(base, tuned)
    base_state = dec._state
    assert torch.equal(dec.generate(ids, mask, max_new_tokens=10), tuned)
    assert dec._state is not base_state


def test_refusals():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig
    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2))
    with pytest.raises(NotImplementedError, match="gpt_neox.*model.generate"):
        FastDecoder(neox)
    model = _model("gemma2")
    dec = FastDecoder(model)
    ids, mask = _prompts(2, 6)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        dec.generate(ids, mask)
    with pytest.raises(ValueError, match="at least one token"):
        dec.generate(ids[:, :0])
    with pytest.raises(ValueError, match="512 positions"):
        dec.generate(ids[:, :4], max_new_tokens=600)
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        FastDecoder(model, cuda_graph=True)
