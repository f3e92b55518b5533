"""Token lengths and tutor-label spans of the shipped training dialogues, for benchmarks
that need real padding (bench/perf.py --data dialogues) on a machine without the tokenizer.

    python bench/dialogue_shapes.py bench/data/train_shapes.json

Tokenised with the offline default's tokenizer (Gemma 3's, the same family as Gemma 2's) and
the training pipeline's own tokenize_examples (max_length 512): one entry per dialogue,
[length, [[start, end], ...]] with the labelled (tutor) token spans.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from socratic_lora import default_model_path  # noqa: E402
from socratic_lora.models import load_tokenizer  # noqa: E402
from socratic_lora.prepare import read_source, tokenize_examples  # noqa: E402


def spans(labels):
    out, start = [], None
    for i, t in enumerate(labels + [-100]):
        if t != -100 and start is None:
            start = i
        elif t == -100 and start is not None:
            out.append([start, i])
            start = None
    return out


tok = load_tokenizer(str(default_model_path()))
examples, rep = tokenize_examples(tok, read_source("train"), 512)
shapes = [[len(e["input_ids"]), spans(e["labels"])] for e in examples]
Path(sys.argv[1]).write_text(json.dumps({"source": "train split, tokenize_examples(max_length=512)",
                                         "report": str(rep), "examples": shapes}) + "\n")
print(rep, f"-> {sys.argv[1]}")
