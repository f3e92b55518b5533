"""Recompute the metrics of saved evaluations from their stored replies (evaluate.rescore)
and rewrite eval.json / eval.md / eval.png in place; prints what changed.

    python bench/rescore_eval.py docs/results/demo_eval docs/results/demo_eval_adversarial

Use it when the metric rules change: the replies stay, the numbers follow the new rules.
"""
import json
import sys
from pathlib import Path

from socratic_lora.evaluate import rescore, write_eval

for folder in map(Path, sys.argv[1:]):
    old = json.loads((folder / "eval.json").read_text("utf-8"))
    new = rescore(old)
    for system, metrics in new["systems"].items():
        changed = {k: (old["systems"][system].get(k), v) for k, v in metrics.items()
                   if old["systems"][system].get(k) != v}
        print(f"{folder.name}/{system}: " + (", ".join(
            f"{k} {a if a is None else round(a, 4)} -> {round(b, 4)}"
            for k, (a, b) in changed.items()) or "unchanged"))
    write_eval(new, folder)
