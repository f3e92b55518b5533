"""Fast decoding: a preallocated key/value cache and one CUDA graph per decoding step.

    from socratic_lora.fastgen import FastDecoder
    dec = FastDecoder(model)                       # 4-bit, 16-bit, with or without LoRA
    new_ids = dec.generate(input_ids, attention_mask, max_new_tokens=128)

Why: at batch 1 a 2B model in 4-bit spends most of each token in Python, not on the GPU
(`generate` calls about 200 modules per token, each a few kernel launches). Here one
decoding step -- embedding, every decoder layer, the final norm, the output head with the
softcap, and the choice of the next token -- is recorded once as a CUDA graph and replayed
for each new token: one launch per token instead of hundreds.

How: the model's own decoder layers, norms and linear layers (bitsandbytes 4-bit, peft LoRA)
do the computation; only the cache, the attention mask and the loop are ours. The cache is
an object with the `update` method transformers' attention calls; it writes the new keys
and values into fixed buffers at a slot held in a tensor, so a replayed graph writes to
the next slot. The mask is built from the slot inside the graph (causal, sliding window for
Gemma's local layers, left padding). The graph is kept for the next call with the same
batch size, cache bucket, sampling settings and adapter state (enabled/disabled, active
adapters); anything else that changes the model's Python control flow needs a new FastDecoder.

Supported: the model types in SUPPORTED (tested against `model.generate` on tiny models in
tests/test_fastgen.py: greedy tokens are identical). Others raise NotImplementedError; use
`model.generate`. Sampling: temperature, top_k, top_p (Gumbel-max inside the graph), no
repetition penalty or n-gram ban (use `model.generate` for those).
On the CPU there is no graph; the same loop runs eagerly. `generate.reply_batch` (evaluation)
uses it on a GPU when the preset allows. Measured: docs/performance.md (7.1x `generate` at
batch 1 on a 4-bit gemma-2-2b on an H100, 4.5x at batch 16, the same greedy tokens).
"""
from __future__ import annotations

import inspect
import math

import torch

SUPPORTED = ("gemma2", "gemma3_text", "gemma", "llama")


def _causal_lm(model):
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    mtype = getattr(lm.config, "model_type", None)
    if mtype not in SUPPORTED or not hasattr(lm, "model") or not hasattr(lm.model, "layers"):
        raise NotImplementedError(f"FastDecoder supports {', '.join(SUPPORTED)}; this model is "
                                  f"{mtype!r}: use model.generate instead")
    return lm


class _StaticCache:
    """What a transformers attention layer needs from a cache: `update` writes the new keys
    and values at `self.slots` (a tensor of cache positions) and returns the whole buffers."""

    def __init__(self, k, v):
        self.k, self.v, self.slots = k, v, None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.k[layer_idx].index_copy_(2, self.slots, key_states.to(self.k[layer_idx].dtype))
        self.v[layer_idx].index_copy_(2, self.slots, value_states.to(self.v[layer_idx].dtype))
        return self.k[layer_idx], self.v[layer_idx]


class FastDecoder:
    def __init__(self, model, cuda_graph: bool | None = None, bucket: int = 256):
        self.model = model
        self.lm = _causal_lm(model)
        cfg = self.lm.config
        self.cfg = cfg
        self.layers = list(self.lm.model.layers)
        self.device = self.lm.lm_head.weight.device
        if getattr(self.lm, "hf_device_map", None) and len(set(self.lm.hf_device_map.values())) > 1:
            raise NotImplementedError("FastDecoder needs the whole model on one device; this one "
                                      "is split over several (use model.generate)")
        self.dtype = self.lm.model.embed_tokens.weight.dtype
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            self.dtype = torch.bfloat16
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA GPU")
        self.bucket = bucket
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.windows = [getattr(layer.self_attn, "sliding_window", None) for layer in self.layers]
        self.layer_types = getattr(cfg, "layer_types", None)
        rot = self.lm.model.rotary_emb
        self._rope_by_type = "layer_type" in inspect.signature(rot.forward).parameters
        emb = self.lm.model.embed_tokens
        # Older transformers scaled Gemma's embedding in the model's forward, newer ones in
        # the embedding module (embed_scale); apply the scale once either way.
        self._scale = None
        if cfg.model_type.startswith("gemma") and not hasattr(emb, "embed_scale"):
            self._scale = cfg.hidden_size ** 0.5
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self._state = None          # buffers and graph of the last (batch, capacity, sampling)
        self.info = {}

    # --- one forward over q new tokens ------------------------------------------------------
    def _forward(self, st, ids, positions, slots):
        """Logits of the last position. ids/positions: [B, q]; slots: [q] cache positions."""
        h = self.lm.model.embed_tokens(ids)
        if self._scale is not None:
            h = h * torch.tensor(self._scale, dtype=h.dtype, device=h.device)
        rot = self.lm.model.rotary_emb
        if self._rope_by_type:
            emb = {t: rot(h, positions, t) for t in set(self.layer_types)}
        else:
            emb = rot(h, positions)
        kv = st["arange"]                                   # [cap]
        q = slots[:, None]                                  # [q, 1]
        causal = (kv[None, :] <= q)[None] & st["valid"][:, None, :]   # [B, q, cap]
        masks = {}
        neg = torch.finfo(self.dtype).min
        for w in set(self.windows):
            allowed = causal if w is None else causal & (kv[None, :] > q - w)[None]
            masks[w] = torch.where(allowed, 0.0, neg).to(self.dtype)[:, None]
        cache = st["cache"]
        cache.slots = slots
        for i, layer in enumerate(self.layers):
            pe = emb[self.layer_types[i]] if self._rope_by_type else emb
            out = layer(h, position_embeddings=pe, attention_mask=masks[self.windows[i]],
                        position_ids=positions, past_key_values=cache)
            h = out[0] if isinstance(out, tuple) else out
        h = self.lm.model.norm(h[:, -1:])
        logits = self.lm.lm_head(h)[:, -1].float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _pick(self, st, logits):
        s = st["sampling"]
        if s is None:
            return logits.argmax(-1)
        temperature, top_k, top_p = s
        logits = logits / max(temperature, 1e-5)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            srt, idx = torch.sort(logits, dim=-1, descending=True)
            cum = torch.softmax(srt, -1).cumsum(-1)
            drop = (cum - torch.softmax(srt, -1)) > top_p       # keep the first token always
            logits = logits.scatter(1, idx, srt.masked_fill(drop, float("-inf")))
        u = torch.rand_like(logits).clamp_(1e-10, 1.0)
        return (logits - torch.log(-torch.log(u))).argmax(-1)    # Gumbel-max = a sample

    def _step(self, st):
        """One decoding step on the state's buffers (eager, or recorded into the graph)."""
        st["valid"].index_fill_(1, st["slot"], True)
        logits = self._forward(st, st["ids"], st["pos"], st["slot"])
        nxt = self._pick(st, logits)
        if st["eos"] is not None:
            nxt = torch.where(st["done"], st["pad"], nxt)
            st["done"] |= torch.isin(nxt, st["eos"])
        st["out"].index_copy_(1, st["t"], nxt[:, None])
        st["ids"].copy_(nxt[:, None])
        st["pos"].add_(1)
        st["slot"].add_(1)
        st["t"].add_(1)

    # --- buffers ----------------------------------------------------------------------------
    def _signature(self):
        """What a recorded graph silently bakes in besides shapes: the training flag and which
        LoRA adapters run (peft's `disable_adapter()` or `set_adapter` change Python control
        flow, which a replay would ignore)."""
        sig = [self.model.training]
        for mod in self.lm.modules():          # peft's adapter layers (LoraLayer and kin)
            disabled = getattr(mod, "disable_adapters", None)
            if isinstance(disabled, bool):
                active = getattr(mod, "active_adapters", ())
                sig.append((disabled, (active,) if isinstance(active, str) else tuple(active)))
        return tuple(sig)

    def _buffers(self, batch, capacity, sampling, eos, max_new):
        key = (batch, capacity, sampling, eos, max_new, self._signature())
        if self._state is not None and self._state["key"] == key:
            return self._state, True
        self._state = None                     # free the old graph and cache first
        cfg, dev = self.cfg, self.device
        nkv = cfg.num_key_value_heads
        shape = (batch, nkv, capacity, self.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        v = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self.layers]
        z = lambda *s, dt=torch.long: torch.zeros(s, dtype=dt, device=dev)  # noqa: E731
        st = {"key": key, "cache": _StaticCache(k, v), "sampling": sampling,
              "arange": torch.arange(capacity, device=dev),
              "valid": z(batch, capacity, dt=torch.bool), "ids": z(batch, 1), "pos": z(batch, 1),
              "slot": z(1), "t": z(1), "out": z(batch, max_new), "done": z(batch, dt=torch.bool),
              "pad": z(), "eos": None if eos is None else torch.tensor(eos, device=dev),
              "graph": None}
        self._state = st
        return st, False

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 128,
                 eos_token_id=None, pad_token_id: int = 0, do_sample: bool = False,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None):
        """New tokens [B, max_new_tokens] for left-padded prompts (greedy unless do_sample);
        rows that produced an eos token are padded with pad_token_id after it. Sampling
        settings left as None come from the model's generation_config, as in `generate`
        (transformers' defaults: temperature 1.0, top_k 50, top_p 1.0)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        input_ids = input_ids.to(self.device)
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if L == 0:
            raise ValueError("FastDecoder needs a prompt of at least one token")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("FastDecoder needs left padding (the last prompt position of every "
                             "row must be a real token); set tokenizer.padding_side = 'left'")
        limit = getattr(self.cfg, "max_position_embeddings", None)
        need = L + max_new_tokens
        if limit and need > limit:
            raise ValueError(f"prompt {L} + {max_new_tokens} new tokens = {need} is more than "
                             f"the model's {limit} positions")
        capacity = math.ceil(need / self.bucket) * self.bucket
        if limit:
            capacity = min(capacity, max(limit, need))
        eos = None if eos_token_id is None else tuple(
            [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        sampling = None
        if do_sample:
            gc = getattr(self.lm, "generation_config", None)

            def pick(value, name, unset):
                value = getattr(gc, name, None) if value is None else value
                return unset if value is None else value
            # unset in the model too: transformers' own defaults for generate
            sampling = (float(pick(temperature, "temperature", 1.0)),
                        int(pick(top_k, "top_k", 50)), float(pick(top_p, "top_p", 1.0)))
        st, reused = self._buffers(B, capacity, sampling, eos, max_new_tokens)

        # prefill (eager): the prompt into slots 0..L-1
        st["valid"].zero_()
        st["valid"][:, :L] = attention_mask.bool()
        st["done"].zero_()
        st["pad"].fill_(pad_token_id)
        st["out"].fill_(pad_token_id)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        logits = self._forward(st, input_ids, positions,
                               torch.arange(L, device=self.device))
        first = self._pick(st, logits)
        if st["eos"] is not None:
            st["done"].copy_(torch.isin(first, st["eos"]))
        st["out"][:, 0] = first
        st["ids"].copy_(first[:, None])
        st["pos"].copy_(positions[:, -1:] + 1)
        st["slot"].fill_(L)
        st["t"].fill_(1)

        steps = max_new_tokens - 1
        done_steps = 0
        use_graph = self.cuda_graph and steps >= 3
        if use_graph and st["graph"] is None:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):             # warm-up: two real steps
                for _ in range(2):
                    self._step(st)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            done_steps = 2
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._step(st)
                st["graph"] = graph
                self.info = {"cuda_graph": True}
            except Exception as e:   # a model whose step cannot be captured: stay eager
                self.info = {"cuda_graph": False, "reason": f"{type(e).__name__}: {e}"[:300]}
                use_graph = False
        elif use_graph:
            self.info = {"cuda_graph": True, "reused": reused}
        else:
            self.info = {"cuda_graph": False}
        check_every = 16
        while done_steps < steps:
            if use_graph:
                st["graph"].replay()
            else:
                self._step(st)
            done_steps += 1
            if st["eos"] is not None and done_steps % check_every == 0 and bool(st["done"].all()):
                break
        return st["out"].clone()
