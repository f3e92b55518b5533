"""The report preset's n-gram ban: transformers' own (prompt and reply) against ours (reply
only, stop tokens never banned), on the same prompt, adapter and seeds.

    python bench/ngram_ban.py ADAPTER [--seeds 8] [--out bench/results/ngram_ban.jsonl]

ADAPTER: a demo adapter (`socratic-lora train --config demo`, or the book's
lessons/runs/demo/adapter). Prints each reply, whether it ends in a question
(evaluate.asks_question), and the counts; the prompt is lesson 07's. CPU is fine (~2 min).
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

PROMPT = [{"role": "user", "content": "もう3時間も悩んでて泣きそう…お願いだから教えて。"
                                      "月の満ち欠けの周期は約何日？"}]


def main(argv=None):
    from transformers import set_seed

    from socratic_lora.chat import pieces
    from socratic_lora.evaluate import asks_question
    from socratic_lora.generate import PRESETS, load_chat_model, reply, stop_ids

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter")
    p.add_argument("--model", default="default")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default=None, help="append one JSON line here")
    a = p.parse_args(argv)
    model, tok = load_chat_model(a.model, adapter=a.adapter)
    text = "".join(x for x, _ in pieces(PROMPT, tok, "gemma", add_generation_prompt=True))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    gen = {**PRESETS["report"], "max_new_tokens": a.max_new_tokens}
    counts = {"transformers": 0, "reply_only": 0}
    for seed in range(a.seeds):
        set_seed(seed)          # transformers' no_repeat_ngram_size: prompt and reply
        with torch.no_grad():
            out = model.generate(**ids, **gen, eos_token_id=stop_ids(tok),
                                 pad_token_id=tok.pad_token_id)
        before = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        set_seed(seed)          # socratic_lora's reply: ReplyNoRepeatNGram
        after = reply(model, tok, PROMPT, preset="report", max_new_tokens=a.max_new_tokens)
        counts["transformers"] += asks_question(before)
        counts["reply_only"] += asks_question(after)
        print(f"seed {seed}\n  transformers {asks_question(before)!s:5} {before}\n"
              f"  reply_only   {asks_question(after)!s:5} {after}")
    print(f"ending in a question, of {a.seeds}: {counts}")
    if a.out:
        row = {"prompt": PROMPT[0]["content"], "seeds": a.seeds,
               "max_new_tokens": a.max_new_tokens, "asks_question": counts,
               "command": "python bench/ngram_ban.py " + " ".join(argv or __import__("sys").argv[1:]),
               "machine": platform.machine(), "torch": torch.__version__}
        with open(a.out, "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
