"""One chunk of the fused loss (256 tokens x Gemma's 256k vocabulary, softcap 30), timed.

    python bench/loss_chunk.py --out bench/results/loss_chunk.jsonl

Compares, on the GPU, the eager chunk (in-place float32 buffers), the compiled chunk that
socratic_lora.fast uses, and variants of it, against the float64 result; the time is the
element-wise work around the two matrix products of each chunk (docs/performance.md).
"""
from __future__ import annotations

import argparse
import json

import torch

import socratic_lora.fast as fast


def exp_minus_lse(logits, target, cap, safe=True):
    """The formulation shipped before (run s7r7 timed both): probabilities as
    exp(z - lse), a logarithm per element."""
    x = logits.float()
    t = torch.tanh(x / cap)
    z = t * cap
    lse = torch.log(torch.exp(z).sum(-1, keepdim=True))
    zt = z.gather(1, target[:, None])
    loss = (lse - zt).sum()
    hit = torch.arange(z.shape[-1], device=z.device)[None, :] == target[:, None]
    g = (torch.exp(z - lse) - hit.to(z.dtype)) * (1 - t * t)
    return loss, g.to(logits.dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(a.rows, a.vocab, device="cuda", generator=g) * 10).to(torch.bfloat16)
    target = torch.randint(0, a.vocab, (a.rows,), device="cuda", generator=g)
    ref_loss, ref_g = fast._chunk_loss_and_grad(logits.double(), target, 30.0)
    variants = {
        "eager": fast._chunk_loss_and_grad,
        "compiled exp(z) / s (shipped)": fast._chunk_fn(True),
        "compiled exp(z - lse)": torch.compile(exp_minus_lse, dynamic=True),
    }
    for name, fn in variants.items():
        for _ in range(3):
            loss, grad = fn(logits.clone(), target, 30.0, True)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        xs = [logits.clone() for _ in range(a.iters)]      # eager works in place
        torch.cuda.synchronize()
        ev[0].record()
        for x in xs:
            loss, grad = fn(x, target, 30.0, True)
        ev[1].record()
        torch.cuda.synchronize()
        row = {"variant": name, "rows": a.rows, "vocab": a.vocab,
               "ms": round(ev[0].elapsed_time(ev[1]) / a.iters, 4),
               "loss_rel_err": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
               "grad_max_err": (grad.double() - ref_g).abs().max().item(),
               "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
