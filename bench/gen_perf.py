"""Generation speed of the 4-bit model: plain `generate` against faster settings.

    python bench/make_gemma2_2b.py /tmp/g2b
    python bench/gen_perf.py /tmp/g2b --batches 1,16 --variants plain,static,static_compiled \
        --out bench/results/gen_perf.jsonl

Fixed work: a 64-token random prompt, exactly 128 new tokens (min = max new tokens, greedy),
so every variant generates the same number of tokens. tokens/s = batch x new tokens / time
of one `generate` call after a warm-up call (the warm-up also compiles).

Variants:
  plain            model.generate as loaded (eager attention, dynamic cache): the baseline.
  static           cache_implementation="static" (transformers compiles the decoding step
                   itself when it judges the model compilable).
  static_compiled  static cache, transformers' own compilation off, and the model's forward
                   wrapped in torch.compile(mode="reduce-overhead") (CUDA graphs).
  fast             socratic_lora.fastgen.FastDecoder: preallocated cache, each decoding step
                   replayed from one CUDA graph (the warm-up call records it).
  fast_eager       the same step function without the graph (what the graph saves).
Greedy tokens are compared with `plain` (match share; random weights make near-ties common,
so a few differing tokens after a near-tie are rounding, not a bug).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(model_dir):
    from socratic_lora.models import load_model
    from socratic_lora.quant import QuantSettings
    model, _ = load_model(model_dir, quant=QuantSettings(bits=4, compute_dtype="bfloat16"),
                          mode="single")
    model.eval()
    model.config.use_cache = True
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def generate(model, ids, new, variant):
    if variant in ("fast", "fast_eager"):
        from socratic_lora.fastgen import FastDecoder
        key = "_fast_decoder_" + variant
        if not hasattr(model, key):
            setattr(model, key, FastDecoder(model, cuda_graph=variant == "fast"))
        dec = getattr(model, key)
        new_ids = dec.generate(ids, torch.ones_like(ids), max_new_tokens=new)
        generate.info = dict(dec.info)
        return torch.cat([ids, new_ids], 1)
    generate.info = {}
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  attention_mask=torch.ones_like(ids))
    if variant in ("static", "static_compiled"):
        kwargs["cache_implementation"] = "static"
    if variant == "static_compiled":
        kwargs["disable_compile"] = True
    with torch.no_grad():
        return model.generate(ids, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--variants", default="plain,static,static_compiled")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    for variant in a.variants.split(","):
        model = load(a.model)
        if variant == "static_compiled":
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        for b in map(int, a.batches.split(",")):
            g = torch.Generator().manual_seed(b)
            ids = torch.randint(3, model.config.vocab_size, (b, a.prompt), generator=g).cuda()
            try:
                t = time.perf_counter()
                generate(model, ids, a.new, variant)           # warm-up (and compilation)
                torch.cuda.synchronize()
                warm = time.perf_counter() - t
                torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                out = generate(model, ids, a.new, variant)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
                row = {"variant": variant, "batch": b, "prompt": a.prompt, "new_tokens": a.new,
                       "tokens_per_s": round(b * a.new / dt, 1), "seconds": round(dt, 3),
                       "warmup_s": round(warm, 1),
                       "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
                       "generated": int(out.shape[1] - a.prompt), **generate.info}
                key = ("tokens", b)
                if variant == "plain":
                    rows.append({"_tokens": key, "ids": out[:, a.prompt:].cpu()})
                else:
                    ref = next((r["ids"] for r in rows if r.get("_tokens") == key), None)
                    if ref is not None:
                        row["match_plain"] = round(
                            (ref == out[:, a.prompt:].cpu()).float().mean().item(), 3)
            except Exception as e:  # report and go on
                row = {"variant": variant, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            row["device"] = torch.cuda.get_device_name(0)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.out:                       # row by row: a stopped run keeps its rows
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    rows = [r for r in rows if "_tokens" not in r]
    base = {r["batch"]: r for r in rows if r["variant"] == "plain" and "error" not in r}
    print(f"\n{'variant':18} {'batch':>5} {'tok/s':>8} {'x plain':>8} {'match':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:18} {r['batch']:5d} {r['error'][:60]}")
            continue
        x = r["tokens_per_s"] / base[r["batch"]]["tokens_per_s"] if r["batch"] in base else 0
        print(f"{r['variant']:18} {r['batch']:5d} {r['tokens_per_s']:8.1f} {x:8.2f} "
              f"{r.get('match_plain', 1.0):6.3f}")


if __name__ == "__main__":
    main()
