"""Merge a LoRA adapter into a 16-bit copy of its base and save it (lesson 09).

    socratic-lora merge --adapter runs/demo/adapter --out runs/demo/merged

The adapter is merged into the base loaded in 16 bits, never into the 4-bit model it was
trained on: merging into quantized weights rounds the update away. Saved as safetensors with
the tokenizer and the chat template; an optional push to the hub uses HF_TOKEN, never echoed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def merge_base(adapter, model="default") -> str:
    """The base merge_adapter merges into: `model`, or for "default" the base the adapter's
    training recorded (socratic_lora.json), else the offline default ("default")."""
    from .generate import adapter_base

    if model == "default" and (Path(adapter) / "socratic_lora.json").exists():
        return adapter_base(adapter) or model
    return model


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def merge_adapter(adapter, out, model="default", dtype=torch.bfloat16, overwrite=False):
    """Write base + adapter, merged, to `out` (a folder loadable with from_pretrained)."""
    from peft import PeftModel

    from .generate import check_adapter, recorded_prompt_format
    from .models import default_model_path, get_hf_token, is_local, load_config, load_model
    from .train import save_atomically

    adapter, out = Path(adapter), Path(out)
    check_adapter(adapter)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder name")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite or choose another folder")
    if overwrite and out.exists() and (out.resolve() in (Path.cwd(), Path.home(), *Path.cwd().parents)
                                       or (out / ".git").exists()):
        raise FileExistsError(f"--out {out}: refusing to replace this folder (it holds your "
                              "working directory, home or a git repository); give a new folder")
    model = merge_base(adapter, model)
    model_id = str(default_model_path()) if model == "default" else model
    if overwrite and out.exists():
        # --overwrite replaces `out` whole: never when the adapter or the base is inside it
        for what, src in (("the adapter", adapter), ("the base model", model_id)):
            if is_local(src) and _inside(Path(src).expanduser().resolve(), out.resolve()):
                raise FileExistsError(
                    f"--out {out}: refusing to replace this folder, it holds {what} being merged "
                    f"({src}); give a new folder such as {out / 'merged'} / 上書きすると元の"
                    f"{'アダプター' if src is adapter else 'ベースモデル'}が消えます")
    token = None if is_local(model_id) else get_hf_token()
    check_adapter(adapter, load_config(model_id, token=token), model_id)
    base, tok = load_model(model_id, mode="cpu", dtype=dtype)   # 16-bit, on the CPU
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.config.use_cache = True

    fmt = recorded_prompt_format(adapter)

    def save(tmp):
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if fmt:     # chat/eval on the merged folder write prompts the way training did
            (tmp / "socratic_lora.json").write_text(json.dumps({"prompt_format": fmt}))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(save, out)      # the old folder (--overwrite) goes only once the new is whole
    return out


# The notice Gemma's terms (section 3.1) ask every distribution of Gemma or a model derivative
# (a merged model, an adapter) to carry in a "Notice" text file.
GEMMA_NOTICE = ("Gemma is provided under and subject to the Gemma Terms of Use found at "
                "ai.google.dev/gemma/terms\n")
_TEMPLATE_MARK = "[More Information Needed]"     # peft's and transformers' card template
# Files whose base model field records where the base was loaded from (a local path, when
# it was a folder): uploaded with the folder's name instead (_public_json).
_BASE_FIELDS = {"adapter_config.json": "base_model_name_or_path", "socratic_lora.json": "base"}


def _is_hub_id(name) -> bool:
    """Whether `name` is a hub repository id (owner/name), not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(name or "")
    if not text or text.startswith(("/", "~", ".")) or "\\" in text or Path(text).exists():
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _offline_default(base) -> bool:
    from .models import offline_default_dir
    if base == "default":
        return True
    return bool(base) and not _is_hub_id(base) and \
        Path(str(base)).expanduser().resolve() == offline_default_dir().resolve()


def _public_name(base) -> str:
    """How a base may be named in a shared file: its hub id, or only a folder's last part (a
    full path can show a user name)."""
    import re
    text = str(base)
    return text if _is_hub_id(text) else re.split(r"[\\/]", text.rstrip("\\/"))[-1]


def _json_field(path: Path, key):
    """`key` of the JSON object in `path`; None when the file, the object or the key is
    missing or unreadable."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _gemma_config(folder: Path) -> bool:
    return str(_json_field(folder / "config.json", "model_type") or "").startswith("gemma")


def _names_gemma(base) -> bool:
    """Whether `base` (hub id, folder or "default") is a Gemma model: a folder by its
    config.json's model_type, a hub id or a missing folder by its (last) name."""
    if not base:
        return False
    if _offline_default(base):
        return True
    folder = Path(str(base)).expanduser()
    if not _is_hub_id(base) and (folder / "config.json").is_file():
        return _gemma_config(folder)
    return "gemma" in _public_name(base).lower()


def _is_gemma(folder: Path, base) -> bool:
    """A merged folder by its config.json's model_type; an adapter by the bases it records."""
    recorded = [_json_field(folder / name, key) for name, key in _BASE_FIELDS.items()]
    return _gemma_config(folder) or any(_names_gemma(b) for b in (base, *recorded))


def _is_template(text: str) -> bool:
    """peft's/transformers' unfilled card: the marker many times (a card that mentions it
    once or twice is the user's)."""
    return text.count(_TEMPLATE_MARK) >= 3


def write_card(folder, base=None, overwrite: bool = False) -> list[Path]:
    """Write a model card (README.md) and, for a Gemma base, the NOTICE file its terms ask
    for, into a merged folder or an adapter folder before sharing it. `base`: the model it
    was trained on (default: the adapter's record). A base that is not a hub id is named by
    its folder's last part only (a full path can show a user name). Returns the files
    written; an existing card other than the peft/transformers template is kept unless
    `overwrite`."""
    from .generate import adapter_base

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; merge or train first")
    base = base or adapter_base(folder)
    card = folder / "README.md"
    if card.exists() and not overwrite and not _is_template(card.read_text("utf-8")):
        raise FileExistsError(f"{card} is already written; pass overwrite=True to replace it")
    is_adapter = (folder / "adapter_config.json").is_file()
    gemma = _is_gemma(folder, base)
    if _offline_default(base):
        base_name, hub_base = "Gemma 3 270M (base), this package's offline default", None
    elif _is_hub_id(base):
        base_name, hub_base = str(base), str(base)
    elif base:
        base_name, hub_base = f"a local model folder ({_public_name(base)})", None
    else:
        base_name, hub_base = "(not recorded)", None
    front = ["---", f"license: {'gemma' if gemma else 'other'}", "language:", "- ja"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front += [f"library_name: {'peft' if is_adapter else 'transformers'}",
              "tags:", "- socratic-tutor", "- lora", "- japanese", "---", ""]
    kind = "A LoRA adapter" if is_adapter else "A model (LoRA merged into the base)"
    body = f"""# Japanese Socratic tutor

{kind} trained with socratic-lora (a Jupyter Book and Python package) to answer a learner
with guiding questions instead of the answer (ソクラテス式の家庭教師: 答えを言わずに問いで導きます).

- Base model: {base_name}
- Training data: the socratic-lora Japanese Socratic dialogues, CC BY 4.0,
  credit: socratic-lora contributors
- Intended use: practice and study; a tutor that asks questions, not a source of facts.

## Limitations
- It does not state answers on purpose, and it can be wrong about facts: check them.
- Small models drift off topic and can repeat themselves; quantizing after merging rounds
  part of the update away.

## License
"""
    if gemma:
        body += """This is a model derivative of Gemma and is distributed under the
[Gemma Terms of Use](https://ai.google.dev/gemma/terms) and the
[Gemma Prohibited Use Policy](https://ai.google.dev/gemma/prohibited_use_policy), which apply
to everyone who receives it. See NOTICE.
"""
    else:
        body += "Distributed under the base model's license; state it here before sharing.\n"
    written = [card]
    card.write_text("\n".join(front) + body, "utf-8")
    if gemma:
        (folder / "NOTICE").write_text(GEMMA_NOTICE, "utf-8")
        written.append(folder / "NOTICE")
    return written


def check_card(folder) -> None:
    """Refuse to share a folder without a model card, with peft's unfilled template, or a
    Gemma derivative without the NOTICE file its terms require."""
    folder = Path(folder)
    card = folder / "README.md"
    fix = f"write them with socratic_lora.export.write_card('{folder}') or by hand"
    if not card.is_file():
        raise FileNotFoundError(f"{folder}: no model card (README.md); {fix} / モデルカードがありません")
    if _is_template(card.read_text("utf-8")):
        raise ValueError(f"{card}: still the unfilled template ({_TEMPLATE_MARK}); {fix} / "
                         "モデルカードが未記入です")
    if _is_gemma(folder, None) and not (folder / "NOTICE").is_file():
        raise FileNotFoundError(f"{folder}: a Gemma derivative needs a NOTICE file (Gemma Terms "
                                f"of Use, section 3.1); {fix} / NOTICE がありません")


def _public_json(f: Path):
    """The bytes to upload for `f`: its base field rewritten to a public name when it holds
    a local path; None to upload the file as it is."""
    key = _BASE_FIELDS.get(f.name)
    base = _json_field(f, key) if key else None
    if not base or _is_hub_id(base) or base == "default":
        return None
    data = json.loads(f.read_text("utf-8"))
    data[key] = _public_name(base)
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def upload_operations(folder) -> list:
    """The files push_to_hub uploads, as hub commit operations: every file of `folder` but
    hidden ones, with a local base path in adapter_config.json / socratic_lora.json replaced
    by the folder's name (peft records where the base was loaded from)."""
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    ops = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue                     # .git, .cache, a save's temporary folder
        data = _public_json(f)
        ops.append(CommitOperationAdd(path_in_repo=rel,
                                      path_or_fileobj=data if data is not None else str(f)))
    return ops


def push_to_hub(folder, repo_id: str, private: bool = True):
    """Upload a merged folder or an adapter; the token comes from HF_TOKEN or the notebook's
    secret store and is never printed. The folder needs its model card (and, for Gemma, the
    NOTICE file): see write_card."""
    from huggingface_hub import HfApi

    from .models import get_hf_token

    check_card(folder)
    token = get_hf_token()
    if token is None:
        raise PermissionError("no Hugging Face token: set HF_TOKEN (Colab/Kaggle: add the "
                              "secret HF_TOKEN) / トークンが見つかりません")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    # create_repo leaves an existing repository as it is: private=True must not upload into
    # one that is public.
    if private and not api.repo_info(repo_id).private:
        raise PermissionError(f"{repo_id} already exists and is public, so the upload would be "
                              "public: make it private on the hub, choose a new name, or pass "
                              "private=False / 既存の公開リポジトリです")
    return api.create_commit(repo_id, operations=upload_operations(folder),
                             commit_message="Upload with socratic-lora")
