"""Save gemma-2-2b-jpn-it's architecture with random weights (same time and memory as the real
weights; GPU.md): python bench/make_gemma2_2b.py /tmp/g2b"""
import json
import sys
from pathlib import Path

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

raw = json.loads((Path(__file__).parents[1] / "tests/data/gemma-2-2b-jpn-it.config.json").read_text())
config = Gemma2Config(**{k: v for k, v in raw.items() if not k.startswith("_") and k != "architectures"})
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = Gemma2ForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
print("saved", sys.argv[1], sum(p.numel() for p in model.parameters()) / 1e9, "B parameters")

# The benchmarks feed token ids directly; the loader still wants a tokenizer in the folder.
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                        unk_token="<unk>").save_pretrained(sys.argv[1])
