"""Flex attention block sizes for Gemma 2's attention (head_dim 256, softcap 50, causal).

    python bench/flex_tune.py --out bench/results/flex_tune.jsonl

Times forward and forward + backward of torch's flex_attention on one decoder layer's
shapes (batch 8 x 512, 8 query heads over 4 KV heads, head_dim 256, bf16) for torch's
default kernel options and a list of others (`fwd_*` / `bwd_*` keys of `kernel_options`),
and checks each against the default's outputs and gradients. The fastest valid set is what
`FastSettings.flex_kernel_options` ships (socratic_lora/fast.py); options that do not fit
the GPU's shared memory fail to compile and are reported as such.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

CANDIDATES = [
    {},                                                       # torch's default
    {"bwd_num_warps": 8},
    {"bwd_num_stages": 1, "bwd_num_warps": 8},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
     "bwd_num_stages": 3},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
     "bwd_num_warps": 8},
    {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
     "bwd_num_stages": 1, "bwd_num_warps": 8},
    {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32,
     "bwd_num_stages": 3},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2},
    {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 2},
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    B, S, H, KV, D, cap = a.batch, a.seq, 8, 4, 256, 50.0
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = rand(B, H, S, D), rand(B, KV, S, D), rand(B, KV, S, D)
    dout = rand(B, H, S, D)
    mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, S, S, device="cuda")

    def score_mod(score, b, h, qi, ki):
        return cap * torch.tanh(score / cap)

    rows, ref = [], None
    for opts in CANDIDATES:
        torch._dynamo.reset()
        fn = torch.compile(flex_attention)
        row = {"kernel_options": opts, "device": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "shape": [B, H, KV, S, D]}
        try:
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))

            def step():
                out = fn(qq, kk, vv, score_mod=score_mod, block_mask=mask, enable_gqa=True,
                         scale=D ** -0.5, kernel_options=dict(opts) or None)
                out.backward(dout)
                return out
            t0 = time.perf_counter()
            out = step()
            torch.cuda.synchronize()
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            got = (out.detach(), qq.grad.clone(), kk.grad.clone(), vv.grad.clone())
            if ref is None:
                ref = got
            row["max_err_vs_default"] = max((x.float() - y.float()).abs().max().item()
                                            for x, y in zip(got, ref))
            with torch.no_grad():
                for _ in range(3):
                    fn(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=True,
                       scale=D ** -0.5, kernel_options=dict(opts) or None)
            for name, body in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "both")):
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                ev[0].record()
                for _ in range(a.iters):
                    if body == "fwd":
                        with torch.no_grad():
                            fn(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=True,
                               scale=D ** -0.5, kernel_options=dict(opts) or None)
                    else:
                        qq.grad = kk.grad = vv.grad = None
                        step()
                ev[1].record()
                torch.cuda.synchronize()
                row[name] = round(ev[0].elapsed_time(ev[1]) / a.iters, 4)
            row["bwd_ms"] = round(row["fwd_bwd_ms"] - row["fwd_ms"], 4)
        except Exception as e:           # e.g. out of shared memory for these block sizes
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    ok = [r for r in rows if "error" not in r]
    best = min(ok, key=lambda r: r["fwd_bwd_ms"])
    print("default:", ok[0]["fwd_bwd_ms"] if ok and not ok[0]["kernel_options"] else None,
          "ms; best:", best["kernel_options"], best["fwd_bwd_ms"], "ms")


if __name__ == "__main__":
    main()
