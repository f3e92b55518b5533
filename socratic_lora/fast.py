"""A faster, leaner QLoRA training path for Gemma 2 (and other decoder-only models).

    from socratic_lora.fast import FastSettings, apply_fast_path
    model = apply_fast_path(peft_model, FastSettings.preset("speed"))     # or "memory"

or, from a training config, `mode: speed` / `mode: memory` (TrainSettings; `train.py` then
loads through `load_for_training` below). `mode: reference` is the plain recipe.

Each technique is one switch of `FastSettings`, so each can be measured on its own
(bench/perf.py, docs/performance.md):

- `chunked_ce`: the loss without the [tokens x 256k] logits. The last hidden states of the
  positions that have a label are multiplied with the output matrix a chunk of tokens at a
  time; Gemma 2's final logit softcap (30 * tanh(x / 30)) and the cross entropy are applied
  per chunk, and the gradient of the hidden states is computed in the same pass (the loss
  is linear in the upstream gradient, so it is scaled in backward). Memory: one chunk of
  logits instead of all of them; time: one matrix product fewer than forward + backward.
- `attention="flex"`: PyTorch's flex_attention through transformers, which keeps Gemma 2's
  attention softcap (50) and sliding window; eager attention materialises the scores.
- `flex_tuned`: on H100/H200 (compute capability 9.0) flex attention runs with block sizes
  measured for Gemma 2's head_dim 256 (bench/flex_tune.py): backward 0.67 -> 0.52 ms a layer.
- `lean_kbit`: skip peft's `prepare_model_for_kbit_training`, which casts the embedding
  (590 M parameters, also the tied output matrix) and the norms to float32; here everything
  not quantized stays in the compute dtype and only the adapter trains.
- `fused_ops`: RMSNorm and GELU(gate) * up as autograd functions that save only their inputs
  (eager RMSNorm keeps several float32 copies of its input for backward).
- `checkpoint`: "all", "none", or a number of decoder layers to checkpoint; `offload`
  moves each checkpointed layer's input to pinned CPU memory until backward.
- `compile`: torch.compile for the element-wise parts (loss chunk, RMSNorm, GELU * up).
- `dequant="torch"` (with compile="layers"): the 4-bit weights are unpacked with plain
  torch operations instead of bitsandbytes' Python-dispatched ops, so the compiled decoder
  layer becomes one graph of fused kernels and cuBLAS calls. The 16-bit weight is never kept
  for backward: it is unpacked again there (eager: `_Linear4bit`; compiled: a checkpointed
  region, which the compiler's partitioner must recompute).
- `fuse_projections` (with dequant="torch"): Gemma 2's q/k/v projections and the MLP's gate
  and up projections read the same input; their 4-bit weights are unpacked into one stacked
  matrix and multiplied once, and the LoRA adapters of q/k/v as one product with the stacked
  A matrices and one with the block-diagonal B (fewer, larger matmuls, fewer launches; with
  LoRA dropout the adapters run one by one, each with its own mask).
- `keep_outputs` (compiled layers, dequant="torch"): only the unpacking is recomputed in
  backward; the projections' outputs are saved where backward needs them (o_proj and
  down_proj always; gate/up in the layers chosen, 151 MB a layer for Gemma 2 2B at 8 x 512,
  else multiplied out again).

Correctness: tests/test_fast.py (CPU) checks the chunked loss and its gradients against the
model's own loss; bench/perf.py compares the first-step loss and the LoRA gradients of each
path with the reference on the GPU, on identical batches.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
MODES = ("reference", "speed", "memory")


@dataclass
class FastSettings:
    chunked_ce: bool = True          # loss without the full logits
    ce_chunk: int = 512              # tokens per loss chunk (memory: chunk x vocab x 12 bytes)
    attention: str = "flex"          # flex | eager (the recipe's default for Gemma 2)
    lean_kbit: bool = True           # keep embeddings/norms in the compute dtype (no fp32 copies)
    fused_ops: bool = True           # RMSNorm and GELU*up that save only their inputs
    checkpoint: str | int | float = "all"  # all | none | keep | number of layers | share 0..1
    offload: bool = False            # checkpointed layer inputs wait in pinned CPU memory
    compile: bool | str = False      # True: compile the element-wise parts; "layers": each
                                     # decoder layer (regional compilation, no fused_ops);
                                     # "model": the whole decoder stack as one graph
    compile_mode: str | None = None  # torch.compile mode for "layers"/"model" (None: default;
                                     # "reduce-overhead": CUDA graphs, with "model" only: per
                                     # layer they re-record every call, docs/performance.md)
    dequant: str = "bnb"             # bnb | torch (4-bit unpacking traced by torch.compile)
    flex_tuned: bool = True          # measured flex-attention block sizes on H100/H200
    fuse_projections: bool | str = True  # q/k/v and gate/up as one 4-bit matmul each
                                     # (dequant="torch"); "qkv": q/k/v only
    cache_masks: bool = True         # flex attention, batches without a mask: causal masks built
                                     # once per shape (Collator(causal_only=True) sends none)
    keep_outputs: bool | int | float = True  # compiled layers (dequant="torch"): the layers
                                     # (True: all, or a number / share 0..1) whose MLP keeps
                                     # its gate/up outputs for backward; in the others the
                                     # backward multiplies them out again (less memory)

    @classmethod
    def preset(cls, mode: str) -> "FastSettings":
        """speed: each decoder layer compiled, 4-bit unpacking inside the compiled graph, no
        checkpointing, gate/up recomputed in backward (Gemma 2 2B at 8 x 512: 5.7 GiB on an
        H200, docs/performance.md); memory: every layer checkpointed, its input offloaded to
        the CPU, each layer's outputs kept only between its recomputation and its backward,
        small loss chunks (2.75 GiB); reference: every technique off (the plain recipe)."""
        if mode == "speed":
            # Keeping gate/up for backward (keep_outputs=True) measured within the run-to-run
            # noise on an H200 (s9r1: slower, s9r2: +4 %) for +3.5 GiB (0.49x the recipe).
            return cls(ce_chunk=256, checkpoint="none", offload=False, compile="layers",
                       dequant="torch", keep_outputs=False)
        if mode == "memory":
            # Checkpointed layers keep their outputs anyway (from recomputation to backward);
            # False matters where a config switches the checkpointing off.
            return cls(ce_chunk=128, checkpoint="all", offload=True, compile="layers",
                       dequant="torch", keep_outputs=False)
        if mode == "reference":
            return cls(chunked_ce=False, attention="eager", lean_kbit=False, fused_ops=False,
                       checkpoint="keep", offload=False, compile=False, flex_tuned=False,
                       fuse_projections=False, cache_masks=False)
        raise ValueError(f"mode={mode!r}: use reference, speed or memory")

    def replace(self, **changes) -> "FastSettings":
        return dataclasses.replace(self, **changes)


# --- chunked linear cross-entropy with the final logit softcap ---------------------------
def _sum_of_exp_is_safe(cap: float | None, vocab: int) -> bool:
    """exp of capped logits summed over the vocabulary stays below float32's maximum
    (3.4e38 = e^88.7), so the max need not be subtracted."""
    return cap is not None and cap + math.log(max(vocab, 1)) < 88.0


def _chunk_loss_and_grad(logits, target, cap: float | None, safe: bool | None = None):
    """Summed cross entropy of one chunk of (uncapped) logits and d(sum)/d(logits).

    logits: [c, V] in the matmul dtype; target: [c] int64 (all valid). Works in float32.
    With the softcap z = cap * tanh(x / cap) every |z| < cap, so the row sum of exp(z) is
    below V * e^cap and cannot overflow in float32 when cap + ln V < 88 (Gemma 2: 30 + 12.5);
    then no max is subtracted (one pass fewer).
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))   # may be the input itself
    if safe if safe is not None else _sum_of_exp_is_safe(cap, x.shape[-1]):
        t = x.div_(cap).tanh_()                       # in place: one float32 buffer
        zt = t.gather(1, target[:, None]).squeeze(1) * cap
        p = torch.exp(t * cap)                        # second float32 buffer
        s = p.sum(-1, keepdim=True)
        lse = torch.log(s).squeeze(-1)
        p.div_(s)
    else:
        t = None
        z = cap * torch.tanh(x / cap) if cap is not None else x
        lse = torch.logsumexp(z, -1)
        zt = z.gather(1, target[:, None]).squeeze(1)
        p = torch.exp(z - lse[:, None])
        if cap is not None:
            t = z.div_(cap)
    loss = (lse - zt).sum()
    p.scatter_add_(1, target[:, None], torch.full_like(zt[:, None], -1.0))
    if t is not None:
        p.mul_(t.mul_(t).neg_().add_(1))              # d softcap / dx = 1 - tanh^2
    return loss, p.to(logits.dtype)


def _chunk_loss_and_grad_for_compiler(logits, target, cap: float | None, safe: bool):
    """`_chunk_loss_and_grad` written for torch.compile: no in-place buffers and a one-hot
    by comparison instead of scatter, so the compiler makes one reduction over the logits
    (the row sums) and one element-wise pass that writes the gradient, recomputing the
    softcap there instead of storing float32 copies. One 256-token chunk on an H200
    (bench/loss_chunk.py): eager 1.66 ms, this 0.42 ms; the in-place version compiled made
    3 kernels and about 0.48 ms (profile of session 7). `safe`: `_sum_of_exp_is_safe`,
    decided by the caller (a plain bool to the compiler, not a function of a symbolic size)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if cap is not None:
        t = torch.tanh(x / cap)
        z = t * cap
    else:
        t, z = None, x
    hit = torch.arange(z.shape[-1], device=z.device)[None, :] == target[:, None]
    zt = z.gather(1, target[:, None])
    if safe:                                          # |z| < cap: the sum cannot overflow
        s = torch.exp(z).sum(-1, keepdim=True)
        loss = (torch.log(s) - zt).sum()
        g = torch.exp(z) / s - hit.to(z.dtype)        # no logarithm per element
    else:
        lse = torch.logsumexp(z, -1, keepdim=True)
        loss = (lse - zt).sum()
        g = torch.exp(z - lse) - hit.to(z.dtype)
    if t is not None:
        g = g * (1 - t * t)                           # d softcap / dx = 1 - tanh^2
    return loss, g.to(logits.dtype)


_compiled_chunk = None


def _chunk_fn(compile: bool):
    global _compiled_chunk
    if not compile:
        return _chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad_for_compiler, dynamic=True)
    return _compiled_chunk


class _LinearSoftcapCE(torch.autograd.Function):
    """sum over rows of CE(cap * tanh(h @ W.T / cap), target); gradients made in forward."""

    @staticmethod
    def forward(ctx, h, weight, target, cap, chunk, compile):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) \
            else weight.dtype
        w = weight.to(dtype)
        fn = _chunk_fn(compile)
        safe = _sum_of_exp_is_safe(cap, weight.shape[0])
        acc = torch.promote_types(dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=h.device) if need_w else None
        for i in range(0, h.shape[0], chunk):
            hc = h[i:i + chunk].to(dtype)
            with torch.autocast(h.device.type, enabled=False):
                loss, dlogits = fn(hc @ w.t(), target[i:i + chunk], cap, safe)
                total += loss
                if need_h:
                    grad_h[i:i + chunk] = (dlogits @ w).to(h.dtype)
                if need_w:
                    grad_w += (dlogits.t() @ hc).to(grad_w.dtype)
            del dlogits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def chunked_causal_lm_loss(hidden, weight, labels, softcap: float | None = None,
                           chunk: int = 1024, num_items_in_batch=None, shift_labels=None,
                           compile: bool = False):
    """The causal-LM loss transformers computes from `lm_head(hidden)` (softcap included),
    without the full logits: mean over labelled positions, or sum / num_items_in_batch.

    hidden: [B, S, H] last hidden states (after the final norm); weight: [V, H] output
    matrix; labels: [B, S] with -100 where no loss is taken (shifted by one here, as the
    model does, unless `shift_labels` is given)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    # Balanced placement: the output matrix (tied to the embeddings) can sit on the first GPU
    # while the last layer's hidden states come from another one. Bring the small [B, S, H]
    # states to the matrix (autograd carries their gradient back), never the [V, H] matrix.
    hidden = hidden.to(weight.device)
    shift_labels = shift_labels.to(hidden.device)
    mask = shift_labels != IGNORE
    # Only positions that have a target. Integer indices, not the boolean mask: both cost one
    # host synchronisation here (the count), but the mask's backward (index_put with a mask)
    # would synchronise again at the start of backward and leave the GPU idle meanwhile.
    idx = mask.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    target = shift_labels.reshape(-1).index_select(0, idx)
    if chunk <= 0:
        raise ValueError(f"ce_chunk={chunk}: must be a positive number of tokens")
    total = _LinearSoftcapCE.apply(h, weight, target, softcap, chunk, compile)
    if num_items_in_batch is None:
        denom = mask.sum().clamp(min=1)
    else:
        denom = num_items_in_batch
        if torch.is_tensor(denom):
            denom = denom.to(total.device)
    return total / denom


# --- fused RMSNorm (Gemma style: x * rstd * (1 + w)) and GELU(gate) * up ------------------
def _f32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rms_fwd(x, w, eps, offset):
    xf = _f32(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * (offset + _f32(w))).to(x.dtype), rstd


def _rms_bwd(g, x, w, rstd, offset, need_w):
    xhat = _f32(x) * rstd
    gf = _f32(g)
    gw = gf * (offset + _f32(w))
    dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    dw = (gf * xhat).reshape(-1, x.shape[-1]).sum(0) if need_w else None
    return dx.to(x.dtype), dw


_compiled = {}


def _maybe_compiled(name, fn, compile):
    if not compile:
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, offset, compile):
        y, rstd = _maybe_compiled("rms_fwd", _rms_fwd, compile)(x, w, eps, offset)
        ctx.save_for_backward(x, w, rstd)
        ctx.offset, ctx.compile = offset, compile
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, rstd = ctx.saved_tensors
        dx, dw = _maybe_compiled("rms_bwd", _rms_bwd, ctx.compile)(
            g, x, w, rstd, ctx.offset, ctx.needs_input_grad[1])
        return dx, (dw.to(w.dtype) if dw is not None else None), None, None, None


def rms_norm(x, weight, eps=1e-6, offset=1.0, compile=False):
    """Gemma's RMSNorm, float32 inside, saving only x and 1/rms for backward."""
    return _RMSNorm.apply(x, weight, eps, offset, compile)


def _gelu_mul(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def _gelu_mul_bwd(g, gate, up):
    gf = _f32(gate)
    k = 0.7978845608028654  # sqrt(2 / pi)
    inner = k * (gf + 0.044715 * gf * gf * gf)
    th = torch.tanh(inner)
    act = 0.5 * gf * (1 + th)
    dact = 0.5 * (1 + th) + 0.5 * gf * (1 - th * th) * k * (1 + 3 * 0.044715 * gf * gf)
    gg = _f32(g)
    return (gg * _f32(up) * dact).to(gate.dtype), (gg * act).to(up.dtype)


class _GeluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, compile):
        ctx.save_for_backward(gate, up)
        ctx.compile = compile
        return _maybe_compiled("gelu_mul", _gelu_mul, compile)(gate, up)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        if ctx.compile:
            dg, du = _maybe_compiled("gelu_mul_bwd", _gelu_mul_bwd, True)(g, gate, up)
        else:   # eager: PyTorch's own fused GELU backward (one kernel) beats the formula
            dg = torch.ops.aten.gelu_backward(g * up, gate, approximate="tanh")
            du = g * F.gelu(gate, approximate="tanh")
        return dg, du, None


def gelu_mul(gate, up, compile=False):
    """gelu_tanh(gate) * up saving only gate and up (eager also keeps gelu(gate))."""
    return _GeluMul.apply(gate, up, compile)


# --- checkpointing with the layer input parked in pinned CPU memory ----------------------
_copy_streams: dict = {}
_pending: list = []        # offloaded layers of the current step (weak references to their
                           # autograd contexts, so a forward without backward frees them)


def _copy_stream(device):
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


def _fetch(ctx):
    """Start copying a layer's input back to the GPU on the copy stream (once)."""
    if ctx.fetched is None and ctx.saved is not None:
        stream = _copy_stream(ctx.device)
        with torch.cuda.stream(stream):
            ctx.fetched = ctx.saved.to(ctx.device, non_blocking=True)
            ctx.fetch_done = stream.record_event()
    return ctx.fetched


class _OffloadedCheckpoint(torch.autograd.Function):
    """Checkpointing with the layer input parked in pinned CPU memory. On a GPU the copies run
    on their own stream, so they overlap the layers' computation: forward copies each input
    out while the next layer runs; backward brings the next layer's input back while the
    current one is recomputed and differentiated."""

    @staticmethod
    def forward(ctx, run, pinned, hidden):
        ctx.run, ctx.device, ctx.fetched = run, hidden.device, None
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        if hidden.device.type == "cuda":
            stream = _copy_stream(hidden.device)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(stream):
                pinned.copy_(hidden, non_blocking=True)
            hidden.record_stream(stream)     # its memory is not reused before the copy ends
            ctx.saved = pinned
            if len(_pending) > 4096:         # forwards that never got a backward
                _pending.clear()
            _pending.append(weakref.ref(ctx))
        else:
            ctx.saved = hidden.detach().clone()
        with torch.no_grad():
            out = run(hidden)
        if not torch.is_tensor(out):
            raise TypeError("offloaded checkpointing needs a layer that returns one tensor")
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.device.type == "cuda":
            hidden = _fetch(ctx)
            current = torch.cuda.current_stream(ctx.device)
            current.wait_event(ctx.fetch_done)      # this input only, not the prefetch below
            hidden.record_stream(current)
            # Prefetch the layer before (next in backward): drop this layer, graphs freed
            # without backward and layers already differentiated from the top first.
            while _pending:
                before = _pending[-1]()
                if before is not None and before is not ctx and before.saved is not None:
                    _fetch(before)
                    break
                _pending.pop()
        else:
            hidden = ctx.saved
        hidden = hidden.detach().requires_grad_(True)
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        # The graph's nodes outlive backward for as long as anything holds the loss, and
        # ctx.run holds the layer and so its weights (tests/test_fast.py). This is not what
        # keeps ~1 GiB allocated after each memory-mode run in one perf.py process: that
        # stayed after this change (s9r5, H200; cause not found).
        ctx.saved = ctx.fetched = ctx.fetch_done = ctx.run = None
        return None, None, hidden.grad


_compiled_layer_forward = {}


def _compile_kwargs(s: FastSettings) -> dict:
    """torch.compile arguments for compile='layers'/'model'.

    dynamic=None (torch's automatic dynamic shapes): the first shape is compiled static;
    when a second sequence length arrives, the layer is compiled once more with the length
    symbolic, and that graph serves every later length. dynamic=False would compile anew
    for every padded length of real data (up to the cache limit, then run eager); packed
    rows (`packing: true`) have one shape and never recompile.
    (Inductor's cpp_wrapper, which would launch kernels from C++, fails on the 4-bit
    unpacking kernel in torch 2.11: not offered.)"""
    return {"dynamic": None, "mode": s.compile_mode}


def _make_offload_checkpoint(layer, compile_inner=False, compile_kwargs=None):
    buffers = {}

    def checkpoint_fn(run, hidden, *args):
        if args:
            raise TypeError("offloaded checkpointing expects only hidden_states positionally")
        if compile_inner and hasattr(run, "func"):
            # Compile the layer's computation, not the offloading around it (one compiled
            # function for all layers: parameters are graph inputs).
            key = (run.func, repr(compile_kwargs))
            fn = _compiled_layer_forward.get(key)
            if fn is None:
                fn = _compiled_layer_forward[key] = torch.compile(
                    run.func, **(compile_kwargs or {}))
            run = functools.partial(fn, *run.args, **run.keywords)
        key = (tuple(hidden.shape), hidden.dtype)
        if hidden.device.type == "cuda" and key not in buffers:
            buffers.clear()
            buffers[key] = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        return _OffloadedCheckpoint.apply(run, buffers.get(key), hidden)
    return checkpoint_fn


# --- 4-bit weights unpacked with torch operations -----------------------------------------
def _blockwise(values, absmax, blocksize):
    """values [n] float32 times absmax of each block of `blocksize` consecutive values."""
    n = values.numel()
    full = n - n % blocksize
    out = (values[:full].view(-1, blocksize) * absmax[:full // blocksize, None]).reshape(full)
    if full < n:
        out = torch.cat([out, values[full:] * absmax[full // blocksize]])
    return out


def dequantize_4bit_torch(packed, absmax, code, blocksize, shape, dtype, nested=None):
    """bitsandbytes' 4-bit format (NF4 or FP4) unpacked with torch ops only.

    packed: two 4-bit indices per byte, the high nibble first, row-major over `shape` (any
    storage dtype: bitsandbytes' `quant_storage` may hold the bytes as bf16, fp16, fp32, int8);
    code: the 16 values of the data type; absmax: float32 per block of `blocksize` values, or
    (double quantization) uint8 indices into `nested = (code2, absmax2, blocksize2, offset)`.
    Equals `bitsandbytes.functional.dequantize_4bit` (tests/test_fast.py)."""
    if nested is not None:
        code2, absmax2, blocksize2, offset = nested
        scales = _blockwise(code2.float()[absmax.reshape(-1).long()], absmax2.float(),
                            blocksize2)
        if offset.dim() == 0:
            absmax = scales + offset
        else:            # stacked layers (_stack_4bit): one offset per nested block
            absmax = (scales.view(-1, blocksize2) + offset[:, None]).reshape(-1)
    n = math.prod(shape)
    p = packed.reshape(-1).view(torch.uint8)   # the bytes, whatever `quant_storage` holds them
    idx = torch.stack((p >> 4, p & 15), dim=-1).reshape(-1)[:n].long()
    return _blockwise(code.float()[idx], absmax.float(), blocksize).view(shape).to(dtype)


def _quant_parts(qs):
    """The tensors and constants of a bitsandbytes QuantState (a Python object torch.compile
    would have to guard on) as plain arguments."""
    tensors = (qs.absmax, qs.code, None, None, None)
    nested_bs = None
    if qs.nested:
        tensors = (qs.absmax, qs.code, qs.state2.code, qs.state2.absmax, qs.offset)
        nested_bs = qs.state2.blocksize
    return tensors, (qs.blocksize, tuple(qs.shape), nested_bs)


def _unpack(packed, absmax, code, code2, absmax2, offset, meta, dtype):
    blocksize, shape, nested_bs = meta
    nested = (code2, absmax2, nested_bs, offset) if nested_bs is not None else None
    return dequantize_4bit_torch(packed, absmax, code, blocksize, shape, dtype, nested)


def _dequant_matmul(x, meta, sizes, *tensors):
    """x @ W.T, split along the output into `sizes` (inside the region, so that the split
    outputs stay must-recompute in a compiled layer, as a single layer's output is)."""
    y = x @ _unpack(*tensors, meta, x.dtype).t()
    return y.split(sizes, -1) if len(sizes) > 1 else (y,)


class _Linear4bit(torch.autograd.Function):
    """y = x @ dequant(W).T; backward dequantises again instead of saving the weight
    (saving it would keep a 16-bit copy of every layer's weights for backward)."""

    @staticmethod
    def forward(ctx, x, meta, *tensors):
        ctx.save_for_backward(*tensors)
        ctx.meta = meta
        return x @ _unpack(*tensors, meta, x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        w = _unpack(*ctx.saved_tensors, ctx.meta, grad.dtype)
        return (grad @ w,) + (None,) * 7


def _matmul_4bit(x, tensors, meta, compute_dtype, sizes, keep=True):
    """x @ W.T with W unpacked by torch ops from (packed, absmax, code, code2, absmax2,
    offset) and `meta`; returns the output split into `sizes`, each in x's dtype. `keep`
    (compiled only): the output may be kept for backward; otherwise it is recomputed."""
    dt = x.dtype
    h = x.to(compute_dtype) if compute_dtype is not None else x
    if torch.compiler.is_compiling():
        # Inside a compiled layer the partitioner would merge the backward's dequantisation
        # with the forward's and keep the 16-bit weight for backward (it must be
        # materialised for the matmul there): +156 MB per Gemma 2 2B layer. Ops inside a
        # checkpointed region are marked must-recompute instead, so only the unpacking
        # goes in the region, and the partitioner saves the matmul's output where a later
        # operation needs it in backward (GELU * up needs gate and up, the norms after
        # o_proj and down_proj their inputs). With keep=False the matmul is in the region
        # too: its output is never saved, and backward multiplies it out again
        # (Gemma 2 2B, 8 x 512: gate/up 151 MB a layer, against 0.35 TFLOP recomputed).
        if keep:
            # Unpacked straight to the dtype the product runs in: under autocast with another
            # compute dtype (bitsandbytes' default is float32), autocast's cast of the weight
            # would otherwise sit outside the region and be saved.
            wdt = h.dtype
            if torch.is_autocast_enabled(h.device.type):
                wdt = torch.get_autocast_dtype(h.device.type)
            w = torch.utils.checkpoint.checkpoint(_unpack, *tensors, meta, wdt,
                                                  use_reentrant=False)
            y = h @ w.t()
            outs = y.split(sizes, -1) if len(sizes) > 1 else (y,)
        else:
            outs = torch.utils.checkpoint.checkpoint(_dequant_matmul, h, meta, tuple(sizes),
                                                     *tensors, use_reentrant=False)
    else:
        y = _Linear4bit.apply(h, meta, *tensors)
        outs = y.split(sizes, -1) if len(sizes) > 1 else (y,)
    return tuple(o.to(dt) for o in outs)


def _linear4bit_forward(self, x):
    """Forward of a bitsandbytes Linear4bit with torch unpacking: one function for every
    module (read from `self`), so one compiled graph serves all layers of a shape."""
    tensors, meta = _quant_parts(self.weight.quant_state)
    (out,) = _matmul_4bit(x, (self.weight, *tensors), meta, self.compute_dtype,
                          (self.out_features,), getattr(self, "_socratic_keep", True))
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out


def _patch_linear4bit(lm):
    """Route every bitsandbytes Linear4bit through `_linear4bit_forward` (peft's LoRA wrappers
    call their base layer, so the adapters stay as they are). Returns the number patched."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for mod in lm.modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        qs = getattr(mod.weight, "quant_state", None)
        if qs is None or getattr(qs, "packing_format_for_cpu", False):
            continue
        if mod.compute_dtype is None:
            mod.compute_dtype = lm.dtype if lm.dtype.is_floating_point else torch.bfloat16
        if qs.code is None or qs.code.numel() != 16:
            import bitsandbytes.functional as bf
            qs.code = bf.get_4bit_type(qs.quant_type, device=qs.absmax.device)
        mod.forward = types.MethodType(_linear4bit_forward, mod)
        n += 1
    return n


# --- q/k/v and gate/up as one matmul each -----------------------------------------------
def _base_and_lora(mod):
    """(the base layer, the peft LoRA wrapper or None) of a projection."""
    base = getattr(mod, "base_layer", None)
    return (base, mod) if base is not None and hasattr(mod, "lora_A") else (mod, None)


def _fusable(mods) -> bool:
    """Whether projections reading the same input can be computed as one: all 4-bit layers
    on our torch unpacking with the same input size and compute dtype and no bias, and
    either all or none wrapped by LoRA."""
    bases, loras = zip(*(_base_and_lora(m) for m in mods))
    if len({l is None for l in loras}) != 1:
        return False
    for b in bases:
        fwd = getattr(getattr(b, "forward", None), "__func__", None)
        if fwd is not _linear4bit_forward or b.bias is not None:
            return False
    return len({(b.in_features, b.compute_dtype, b.weight.device) for b in bases}) == 1


def _stack_4bit(owner, layers) -> bool:
    """Move the 4-bit data of `layers` into one buffer per kind (packed bytes, block scales,
    nested scales), kept on `owner`; each layer's own tensors become views into them, so no
    memory is added and the layers still work on their own (generation, peft's path).
    Stacked, the weights unpack in one plain element-wise kernel (unpacking them separately
    and concatenating ran 3x slower on an H200). False, with nothing changed, when the
    layers' formats differ or a layer's blocks do not end where it ends."""
    qss = [layer.weight.quant_state for layer in layers]
    q0 = qss[0]
    for layer, q in zip(layers, qss):
        n = math.prod(q.shape)
        if (q.blocksize != q0.blocksize or q.nested != q0.nested or n % q.blocksize
                or q.code is None or not torch.equal(q.code, q0.code)
                or not layer.weight.is_contiguous()
                or layer.weight.numel() * layer.weight.element_size() * 2 != n):
            return False
        if q.nested and (q.state2.blocksize != q0.state2.blocksize
                         or (n // q.blocksize) % q.state2.blocksize
                         or not torch.equal(q.state2.code, q0.state2.code)):
            return False

    def stack(tensors):
        """One buffer holding `tensors` (as bytes); the views of it, shaped as they were."""
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])
        views, at = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            views.append(flat[at:at + nbytes].view(t.dtype).view(t.shape))
            at += nbytes
        return flat, views

    packed, views = stack([layer.weight.data for layer in layers])
    for layer, v in zip(layers, views):
        layer.weight.data = v
    absmax, views = stack([q.absmax for q in qss])
    for q, v in zip(qss, views):
        q.absmax = v
    absmax_dtype = q0.absmax.dtype
    absmax2 = offsets = code2 = None
    if q0.nested:
        absmax2, views = stack([q.state2.absmax for q in qss])
        for q, v in zip(qss, views):
            q.state2.absmax = v
        absmax2 = absmax2.view(q0.state2.absmax.dtype)
        offsets = torch.cat([q.offset.float().reshape(1).expand(q.state2.absmax.numel())
                             for q in qss])
        code2 = q0.state2.code
    # Plain attributes, not buffers: DDP broadcasts every buffer before every forward
    # (0.7 GB a step for Gemma 2 2B), and model.to(dtype) would cast the code tables. Call
    # apply_fast_path after the model is placed (a later .to(device) moves the layers only).
    owner._socratic_stack = (packed, absmax.view(absmax_dtype), q0.code, code2, absmax2,
                             offsets)
    owner._socratic_weights = tuple(layer.weight for layer in layers)
    rows = sum(q.shape[0] for q in qss)
    owner._socratic_meta = (q0.blocksize, (rows, q0.shape[1]),
                            q0.state2.blocksize if q0.nested else None)
    owner._socratic_sizes = tuple(q.shape[0] for q in qss)
    return True


def _one_plain_adapter(loras):
    """The adapter name if every wrapper applies exactly that one adapter now, as plain LoRA
    without bias (what the stacked computation does); None otherwise (adapters disabled or
    merged, several active, DoRA or another variant, lora_bias: then each projection runs on
    its own, as peft does)."""
    name = None
    for m in loras:
        if m.disable_adapters or m.merged:
            return None
        active = [a for a in m.active_adapters if a in m.lora_A]
        if len(active) != 1 or (name is not None and active[0] != name):
            return None
        name = active[0]
        if name in getattr(m, "lora_variant", {}) or m.lora_B[name].bias is not None:
            return None
    return name


def _stack_is_current(owner, mods, bases, loras) -> bool:
    """Whether the stacked computation may stand in for calling `mods` now: the layers still
    hold the weights that were stacked (peft's 4-bit merge/unmerge installs new ones), the
    adapters are on all of them or on none (one can be added later), and no module has
    hooks the stacked path would skip (peft's mixed-adapter batches use pre-hooks)."""
    if any(b.weight is not w for b, w in zip(bases, owner._socratic_weights)):
        return False
    if any(l is None for l in loras) and any(l is not None for l in loras):
        return False
    return not any(m._forward_pre_hooks or m._forward_hooks for m in mods)


def _fused_projections(owner, x, mods):
    """[m(x) for m in mods] as one unpacked 4-bit matmul with the weights `_stack_4bit` put
    on `owner` (and, with LoRA, one product with the stacked A matrices and one with the
    block-diagonal B), or None when the adapters' state needs peft's own per-projection
    path. Equals peft's computation up to rounding (tests/test_fast.py): fewer, larger
    matrix products and fewer kernels to launch."""
    bases, loras = zip(*(_base_and_lora(m) for m in mods))
    if not _stack_is_current(owner, mods, bases, loras):
        return None
    name = None
    if loras[0] is not None:
        name = _one_plain_adapter(loras)
        if name is None:
            return None
    ys = _matmul_4bit(x, owner._socratic_stack, owner._socratic_meta, bases[0].compute_dtype,
                      owner._socratic_sizes, getattr(owner, "_socratic_keep", True))
    if name is None:
        return ys
    # As peft's bnb.Linear4bit: without autocast the adapters compute in their own dtype
    # and the result is cast back; under autocast the products run in the autocast dtype.
    convert = not torch.is_autocast_enabled()
    xa = x.to(loras[0].lora_A[name].weight.dtype) if convert else x
    scales = [m.scaling[name] for m in loras]
    if not all(isinstance(m.lora_dropout[name], torch.nn.Identity) for m in loras):
        # Dropout draws a mask per projection: the adapters run one by one, in peft's
        # order (the same random masks), only the base product stays stacked.
        deltas = [m.lora_B[name](m.lora_A[name](m.lora_dropout[name](xa))) * c
                  for m, c in zip(loras, scales)]
    else:
        a = torch.cat([m.lora_A[name].weight for m in loras], 0)
        bs = [m.lora_B[name].weight for m in loras]
        if len(set(scales)) == 1:
            delta = F.linear(F.linear(xa, a), torch.block_diag(*bs)) * scales[0]
        else:
            delta = F.linear(F.linear(xa, a),
                             torch.block_diag(*(b * c for b, c in zip(bs, scales))))
        deltas = delta.split(owner._socratic_sizes, -1)
    if convert:
        deltas = [d.to(ys[0].dtype) for d in deltas]
    return tuple(y + d for y, d in zip(ys, deltas))


def _attention_forward_fused(self, hidden_states, position_embeddings=None,
                             attention_mask=None, *args, **kwargs):
    """Gemma2Attention.forward with q, k and v from `_fused_projections`. With a key/value
    cache (generation) or adapters peft must apply itself, the original forward runs."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    qkv = None
    if not args and cache is None:
        qkv = _fused_projections(self, hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    if qkv is None:
        return self._socratic_unfused_forward(hidden_states, position_embeddings,
                                              attention_mask, *args, **kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    ns = self._socratic_namespace
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in qkv)
    cos, sin = position_embeddings
    q, k = ns.apply_rotary_pos_emb(q, k, cos, sin)
    impl = self.config._attn_implementation
    table = ns.ALL_ATTENTION_FUNCTIONS
    if hasattr(table, "get_interface"):
        attention = table.get_interface(impl, ns.eager_attention_forward)
    else:
        attention = ns.eager_attention_forward if impl == "eager" else table[impl]
    out, weights = attention(self, q, k, v, attention_mask,
                             dropout=self.attention_dropout if self.training else 0.0,
                             scaling=self.scaling, sliding_window=self.sliding_window,
                             softcap=self.attn_logit_softcapping, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _mlp_forward_fused(self, x):
    """A gated MLP's forward with gate and up from `_fused_projections`."""
    gate_up = _fused_projections(self, x, (self.gate_proj, self.up_proj))
    if gate_up is None:
        return self._socratic_unfused_forward(x)
    gate, up = gate_up
    compiled = getattr(self, "_socratic_gelu_mul", None)     # set by _patch_fused
    if compiled is not None:
        return self.down_proj(gelu_mul(gate, up, compiled))
    return self.down_proj(self.act_fn(gate) * up)


# MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)).
_GATED_MLPS = ("GemmaMLP", "Gemma2MLP", "Gemma3MLP", "LlamaMLP")


def _patch_fused_projections(lm, gate_up: bool = True):
    """Gemma 2's q/k/v and (gate_up) every gated MLP's gate/up as one matmul each (on 4-bit
    layers with torch unpacking). Returns (attention modules, MLPs) patched."""
    import sys
    n_attn = n_mlp = 0
    for mod in lm.modules():
        name = type(mod).__name__
        if hasattr(mod, "_socratic_unfused_forward"):      # apply_fast_path ran before
            n_attn += name == "Gemma2Attention"
            n_mlp += name != "Gemma2Attention"
            continue
        if name == "Gemma2Attention" and _fusable((mod.q_proj, mod.k_proj, mod.v_proj)):
            ns = sys.modules[type(mod).__module__]
            if not all(hasattr(ns, f) for f in ("apply_rotary_pos_emb", "eager_attention_forward",
                                                 "ALL_ATTENTION_FUNCTIONS")):
                continue
            # _attention_forward_fused repeats transformers 5.x's forward: leave a class that
            # has changed shape (other leading parameters, q/k norms as in Gemma 3) alone.
            head = list(inspect.signature(type(mod).forward).parameters)[:4]
            if head != ["self", "hidden_states", "position_embeddings", "attention_mask"] or \
                    hasattr(mod, "q_norm") or hasattr(mod, "k_norm"):
                continue
            if not _stack_4bit(mod, [_base_and_lora(m)[0] for m in
                                     (mod.q_proj, mod.k_proj, mod.v_proj)]):
                continue
            mod._socratic_namespace = ns
            mod._socratic_unfused_forward = mod.forward
            mod.forward = types.MethodType(_attention_forward_fused, mod)
            n_attn += 1
        elif (gate_up and name in _GATED_MLPS and _fusable((mod.gate_proj, mod.up_proj))
              and _stack_4bit(mod, [_base_and_lora(m)[0] for m in (mod.gate_proj, mod.up_proj)])):
            mod._socratic_unfused_forward = mod.forward
            mod.forward = types.MethodType(_mlp_forward_fused, mod)
            n_mlp += 1
    return n_attn, n_mlp


# --- applying the techniques to a model -------------------------------------------------
def _causal_lm(model):
    """The transformers *ForCausalLM inside a peft model (or the model itself)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(m, "lm_head") or not hasattr(m, "model"):
        raise TypeError(f"{type(m).__name__}: the fast path needs a *ForCausalLM with .model "
                        "and .lm_head (a decoder-only transformers model)")
    return m


def _decoder_layers(lm):
    layers = getattr(lm.model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(lm).__name__}: no .model.layers; cannot place checkpoints")
    return list(layers)


# Flex attention's Triton block sizes for Gemma 2's head_dim 256 on compute capability 9.0
# (H100, H200), from bench/flex_tune.py (bench/results/flex_tune.jsonl, one H200, batch 8 x
# 512): torch's default backward (64, 64, 64, 64, 2 stages, 4 warps) 0.67 ms a layer, this
# one 0.52 ms; forward 0.101 -> 0.078 ms. Other GPUs keep torch's defaults: larger blocks
# may not fit their shared memory (the kernel would then fail to compile).
TUNED_FLEX_OPTIONS = {
    (9, 0, 256): {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                  "bwd_BLOCK_N2": 32, "bwd_num_warps": 8,
                  "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8,
                  "fwd_num_stages": 2},
}


def _flex_kernel_options(lm) -> dict | None:
    """The measured options for this model's head size on its GPUs, if every GPU it uses
    is of the kind they were measured on and it computes in 16 bits (measured in bf16; in
    float32 the same tiles would need twice the shared memory, more than the GPU has);
    None (torch's defaults) otherwise."""
    if lm.dtype not in (torch.bfloat16, torch.float16):
        return None
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kinds = {torch.cuda.get_device_capability(p.device) if p.device.type == "cuda" else None
             for p in lm.parameters()}
    if len(kinds) != 1 or None in kinds:
        return None
    opts = TUNED_FLEX_OPTIONS.get((*kinds.pop(), head_dim))
    return dict(opts) if opts else None


def _causal_mask_cache(lm, size: int = 64):
    """For Gemma 2 with flex attention: a function (input_ids) -> the model's mask mapping
    ({"full_attention": ..., "sliding_attention": ...}) for batches with neither attention
    mask nor position ids, built by transformers' own functions once per (batch, length,
    device) and reused (up to `size` shapes; padded batches have one shape per width);
    None for other models.

    Without it the model rebuilds the same two BlockMasks at every forward: about 3 ms of
    host work, during which the GPU waits (bench/gaps.py). They hold only block indices
    (read, never written, by forward and backward), so one object can serve every step."""
    import sys
    from collections import OrderedDict
    base = lm.model
    cfg = base.config
    ns = sys.modules[type(base).__module__]
    makers = {"full_attention": getattr(ns, "create_causal_mask", None),
              "sliding_attention": getattr(ns, "create_sliding_window_causal_mask", None)}
    types_ = set(getattr(cfg, "layer_types", None) or ())
    if (type(base).__name__ != "Gemma2Model" or not types_ or not types_ <= set(makers)
            or None in makers.values()):
        return None
    cache = OrderedDict()

    def masks(input_ids):
        if cfg._attn_implementation != "flex_attention" or torch.is_inference_mode_enabled():
            # eager/sdpa masks are cheap and may be skipped; masks made under inference mode
            # would be inference tensors, unusable by a later training step
            return None
        b, n = input_ids.shape
        key = (b, n, input_ids.device)
        if key not in cache:
            # Only the embeddings' shape, dtype and device are read: an expanded view.
            embeds = torch.empty((1, 1, 1), dtype=lm.dtype, device=input_ids.device).expand(
                b, n, cfg.hidden_size)
            pos = torch.arange(n, device=input_ids.device).unsqueeze(0)
            # Positional: the 4th parameter is named past_key_values or cache by version.
            cache[key] = {t: makers[t](cfg, embeds, None, None, position_ids=pos) for t in types_}
            while len(cache) > size:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]
    return masks


def _patch_loss(lm, s: FastSettings, attention_kwargs: dict | None = None):
    original = lm.forward
    cap = getattr(lm.config, "final_logit_softcapping", None)
    attention_kwargs = attention_kwargs or {}
    masks = _causal_mask_cache(lm) if s.cache_masks else None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        # With labels (training and evaluation loss) only the loss is returned; without
        # them (generation, inspection) the model's own forward gives the logits.
        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, past_key_values=past_key_values,
                            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        kwargs.pop("ignore_index", None)
        if s.compile_mode in ("reduce-overhead", "max-autotune") and torch.is_grad_enabled():
            # CUDA graphs: the previous step's outputs are no longer needed (its backward ran).
            torch.compiler.cudagraph_mark_step_begin()
        # (peft's causal-LM wrapper passes output_attentions/output_hidden_states/return_dict,
        # None unless asked for; anything else, e.g. packed-sequence arguments, needs the
        # model's own masks.)
        extra = [k for k, v in kwargs.items() if v is not None and k not in
                 ("output_attentions", "output_hidden_states", "return_dict")]
        if (masks is not None and attention_mask is None and position_ids is None
                and input_ids is not None and not extra):
            attention_mask = masks(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, inputs_embeds=inputs_embeds,
                         use_cache=False, **attention_kwargs, **kwargs)
        loss = chunked_causal_lm_loss(out.last_hidden_state, self.lm_head.weight, labels,
                                      softcap=cap, chunk=s.ce_chunk,
                                      num_items_in_batch=num_items, shift_labels=shift_labels,
                                      compile=bool(s.compile))
        # The loss is computed where the output matrix is (with balanced placement and an
        # untied output matrix: the last GPU); Trainer expects it on the inputs' device.
        where = input_ids if input_ids is not None else inputs_embeds
        if where is not None:
            loss = loss.to(where.device)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    lm.forward = types.MethodType(forward, lm)
    lm._socratic_original_forward = original


def _patch_fused(lm, s: FastSettings):
    n_norm = n_mlp = 0
    for mod in lm.modules():
        name = type(mod).__name__
        if name.endswith("RMSNorm") and name.startswith("Gemma") and hasattr(mod, "weight"):
            eps = getattr(mod, "eps", getattr(mod, "variance_epsilon", 1e-6))

            def norm_forward(self, x, eps=eps):
                return rms_norm(x, self.weight, eps, 1.0, s.compile is True)
            mod.forward = types.MethodType(norm_forward, mod)
            n_norm += 1
        elif name.endswith("MLP") and all(hasattr(mod, a) for a in ("gate_proj", "up_proj",
                                                                      "down_proj")):
            act = getattr(lm.config, "hidden_activation", None) or getattr(lm.config, "hidden_act", "")
            if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
                continue

            def mlp_forward(self, x):
                return self.down_proj(gelu_mul(self.gate_proj(x), self.up_proj(x), s.compile is True))
            mod.forward = types.MethodType(mlp_forward, mod)
            mod._socratic_gelu_mul = s.compile is True        # for _mlp_forward_fused
            n_mlp += 1
    return n_norm, n_mlp


def _layer_share(name, value, n, words) -> set[int]:
    """The layers (of n) that a number of layers or a share 0..1 of them picks, spread
    evenly (peak memory depends on how many, not on which)."""
    k = value
    if isinstance(k, float) and 0.0 <= k <= 1.0:
        k = max(1, round(k * n)) if k > 0 else 0
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"{name}={value!r}: use {words}, a number of layers from 0 to {n} "
                         "or a share from 0.0 to 1.0")
    return {int(i * n / k) for i in range(k)} if k else set()


def _checkpoint_choice(s: FastSettings, n: int) -> set[int] | None:
    """The layers (of n) that `s.checkpoint` checkpoints; None for "keep"."""
    if s.checkpoint == "keep":
        return None
    if s.checkpoint == "none":
        return set()
    if s.checkpoint == "all":
        return set(range(n))
    return _layer_share("checkpoint", s.checkpoint, n, "'all', 'none', 'keep'")


def _keep_choice(s: FastSettings, n: int) -> set[int]:
    """The layers (of n) whose MLP keeps its gate/up outputs for backward."""
    if s.keep_outputs is True:
        return set(range(n))
    if s.keep_outputs is False:
        return set()
    return _layer_share("keep_outputs", s.keep_outputs, n, "True, False")


def _set_keep_outputs(lm, s: FastSettings, checkpointed) -> list[int]:
    """Mark the MLP projections of the layers that recompute their outputs in backward
    (read by `_matmul_4bit` through the module: each choice is its own compiled graph).
    Returns the layers whose MLP keeps them. A checkpointed layer keeps them (its saved
    outputs live only from its recomputation to its backward), and so does an MLP where
    recomputing would save nothing: not gated, or with adapters on gate/up (the sum with
    the adapter's output, which GELU * up needs, is saved either way)."""
    layers = _decoder_layers(lm)
    keep = _keep_choice(s, len(layers)) | set(checkpointed)
    kept = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        projs = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
        gated = mlp is not None and None not in projs
        if gated and any(_base_and_lora(m)[1] is not None for m in projs):
            gated = False
        mods = [mlp] + [_base_and_lora(m)[0] for m in projs] if gated else []
        for m in mods:
            m._socratic_keep = i in keep
        if i in keep or not gated:
            kept.append(i)
    return kept


def _set_checkpointing(lm, s: FastSettings):
    layers = _decoder_layers(lm)
    chosen = _checkpoint_choice(s, len(layers))
    if chosen is None:
        return [i for i, layer in enumerate(layers) if getattr(layer, "gradient_checkpointing", False)]
    if chosen:
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):   # its name from transformers 5.2x
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for i, layer in enumerate(layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise TypeError(f"{type(layer).__name__}: not a transformers GradientCheckpointingLayer")
        layer.gradient_checkpointing = i in chosen
        if i in chosen and s.offload:
            layer._gradient_checkpointing_func = _make_offload_checkpoint(
                layer, compile_inner=s.compile == "layers", compile_kwargs=_compile_kwargs(s))
    if chosen and s.offload:
        # The offloaded checkpoint is an autograd Function: it is only differentiated when
        # its input requires grad, so the embedding output must (cheap: one [B, S, H] copy).
        lm.enable_input_require_grads()
    return sorted(chosen)


def _gpus_without_flex(model) -> list:
    """The model's GPUs (index, compute capability) on which flex attention cannot train.

    Below compute capability 8.0 (T4: 7.5, V100: 7.0) torch has no Triton kernel for flex
    attention and runs an eager fallback whose backward fails in float16 ("expected scalar
    type Half but found Float"); Unsloth met it on Colab and Kaggle T4s and skips flex on
    such cards (unslothai/unsloth PRs 4302 and 8137)."""
    out = set()
    for p in model.parameters():
        if p.device.type == "cuda":
            cap = torch.cuda.get_device_capability(p.device)
            if cap < (8, 0):
                out.add((p.device.index or 0, cap))
    return sorted(out)


def apply_fast_path(model, settings: FastSettings | str = "speed"):
    """Switch the techniques of `settings` on, in place, for a (peft-wrapped) causal LM.

    Returns the same model with `model.fast_settings` and `model.fast_report` (what was
    changed). Call after `get_peft_model` (LoRA dropout is the adapter's own setting)."""
    s = FastSettings.preset(settings) if isinstance(settings, str) else settings
    # Every setting is checked before the model is touched.
    if s.attention not in ("flex", "eager"):
        raise ValueError(f"attention={s.attention!r}: use flex or eager")
    if s.fuse_projections not in (True, False, "qkv"):
        raise ValueError(f"fuse_projections={s.fuse_projections!r}: use True, False or 'qkv'")
    if s.dequant not in ("bnb", "torch"):
        raise ValueError(f"dequant={s.dequant!r}: use bnb or torch")
    if s.compile not in (False, True, "layers", "model"):
        raise ValueError(f"compile={s.compile!r}: use False, True, 'layers' or 'model'")
    if s.compile_mode not in (None, "default", "reduce-overhead", "max-autotune",
                              "max-autotune-no-cudagraphs"):
        raise ValueError(f"compile_mode={s.compile_mode!r}: use None, 'default', "
                         "'reduce-overhead', 'max-autotune' or 'max-autotune-no-cudagraphs'")
    lm = _causal_lm(model)
    chosen = _checkpoint_choice(s, len(_decoder_layers(lm)))
    _keep_choice(s, len(_decoder_layers(lm)))
    if s.compile == "model" and s.offload and chosen:
        raise ValueError("compile='model' traces the whole decoder stack in one graph; "
                         "offloaded checkpoints need compile='layers' (or offload=False)")
    report = {}
    if s.attention == "flex":
        old_gpus = _gpus_without_flex(lm)
        if old_gpus:
            import warnings
            where = ", ".join(f"GPU {i} (compute capability {a}.{b})" for i, (a, b) in old_gpus)
            msg = (f"attention='flex' needs compute capability 8.0 or newer to train; {where} "
                   "is older, so eager attention is used (softcapping kept). / この GPU では "
                   "flex attention で学習できないため、eager アテンションを使います。")
            warnings.warn(msg, stacklevel=2)
            s = s.replace(attention="eager")
            report["attention_fallback"] = msg
    if s.attention == "flex":
        if hasattr(lm, "set_attn_implementation"):
            lm.set_attn_implementation("flex_attention")
        else:
            lm.config._attn_implementation = "flex_attention"
        report["attention"] = lm.config._attn_implementation
    if s.fused_ops and s.compile not in ("layers", "model"):   # the compiler fuses them
        report["fused_norms"], report["fused_mlps"] = _patch_fused(lm, s)
    if s.dequant == "torch":
        report["linear4bit_torch"] = _patch_linear4bit(lm)
        if s.fuse_projections:
            report["fused_qkv"], report["fused_gate_up"] = _patch_fused_projections(
                lm, gate_up=s.fuse_projections is True)
    report["checkpointed_layers"] = _set_checkpointing(lm, s)
    if s.dequant == "torch":        # the marks are read where the layers are compiled
        kept = _set_keep_outputs(lm, s, report["checkpointed_layers"])
        if s.compile in ("layers", "model"):    # uncompiled, every output is kept
            report["layers_keeping_mlp_outputs"] = kept
    if s.compile == "model":
        # One graph (forward and backward) for embedding, masks, all layers and the final
        # norm: no guards, wrappers or autograd nodes per layer on the host.
        lm.model.compile(**_compile_kwargs(s))
        report["compiled_model"] = type(lm.model).__name__
    if s.compile == "layers":
        import torch._dynamo
        # One compiled graph serves all layers of a kind (parameters are graph inputs);
        # the limit only matters if guards differ between layers.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in _decoder_layers(lm):
            if s.offload and layer.gradient_checkpointing:   # compiled inside the offload
                continue
            if hasattr(layer, "_hf_hook") and hasattr(layer, "_old_forward"):
                # Balanced placement: accelerate wraps the layer's forward in a hook that
                # moves the inputs to the layer's GPU, and the hook is marked not to be
                # compiled, so compiling the whole module would break its graph at every
                # layer (balanced speed mode ran at 0.69x one GPU). Compile the layer's own
                # forward, which the hook calls, and leave the hook outside.
                layer._old_forward = torch.compile(layer._old_forward, **_compile_kwargs(s))
            else:
                layer.compile(**_compile_kwargs(s))
        report["compiled_layers"] = len(_decoder_layers(lm))
    attention_kwargs = {}
    if s.attention == "flex" and s.flex_tuned:
        # Passed with the training forward (transformers hands model kwargs to the attention
        # function): it rides on the chunked-loss forward below.
        opts = _flex_kernel_options(lm)
        if opts and s.chunked_ce:
            attention_kwargs["kernel_options"] = opts
            report["flex_kernel_options"] = opts
    if s.chunked_ce:
        _patch_loss(lm, s, attention_kwargs)
        report["loss"] = f"chunked linear cross-entropy, {s.ce_chunk} tokens a chunk"
    model.fast_settings, model.fast_report = s, report
    return model


def lean_kbit_preparation(model):
    """What the adapter needs from a 4-bit model, without peft's float32 copies: freeze the
    base, keep the embedding and norms in the compute dtype, no cache."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


def load_for_training(s, fast_settings: FastSettings | None = None):
    """`train.load_for_training` for `mode: speed | memory` (TrainSettings `s`);
    `fast_settings` replaces the mode's preset (bench/perf.py uses it for single switches)."""
    from peft import get_peft_model

    from .lora import LoraSettings, lora_config
    from .models import default_model_path, load_model
    from .quant import QuantSettings
    from .train import _placement

    mode = getattr(s, "mode", "reference")
    if mode not in MODES:
        raise ValueError(f"config key 'mode': {mode!r}: use reference, speed or memory")
    if mode == "reference" and fast_settings is None:
        raise ValueError("mode 'reference' is the plain recipe: use train.load_for_training")
    fs = fast_settings or FastSettings.preset(mode)
    if not s.gradient_checkpointing:
        fs = fs.replace(checkpoint="none", offload=False)
    model_id = str(default_model_path()) if s.model == "default" else s.model
    quant = QuantSettings(bits=s.bits, compute_dtype=s.compute_dtype)
    placement = _placement(s)
    model, tok = load_model(model_id, quant=quant, mode=placement, gpu_budgets=s.gpu_budgets,
                            allow_offload=s.allow_offload)
    if placement == "cpu":       # no compiled kernels on the CPU: the CPU path stays eager
        fs = fs.replace(attention="eager", offload=False, compile=False, dequant="bnb")
    if fs.offload and placement not in ("single", "data_parallel"):
        fs = fs.replace(offload=False)
    model = lean_kbit_preparation(model)
    lora = LoraSettings(r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                        targets=s.lora_targets)
    model = get_peft_model(model, lora_config(lora, model))
    return apply_fast_path(model, fs), tok
