"""Merge a LoRA adapter into a 16-bit copy of its base and save it (lesson 09).

    socratic-lora merge --adapter runs/demo/adapter --out runs/demo/merged

The adapter is merged into the base loaded in 16 bits, never into the 4-bit model it was
trained on: merging into quantized weights rounds the update away. Saved as safetensors with
the tokenizer and the chat template; an optional push to the hub uses HF_TOKEN, never echoed.
"""
from __future__ import annotations

from pathlib import Path

import torch


def merge_adapter(adapter, out, model="default", dtype=torch.bfloat16, overwrite=False):
    """Write base + adapter, merged, to `out` (a folder loadable with from_pretrained)."""
    from peft import PeftModel

    from .generate import adapter_base, check_adapter
    from .models import default_model_path, get_hf_token, load_config, load_model
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
    if model == "default" and (adapter / "socratic_lora.json").exists():
        model = adapter_base(adapter) or model
    model_id = str(default_model_path()) if model == "default" else model
    token = None if Path(model_id).is_dir() else get_hf_token()
    check_adapter(adapter, load_config(model_id, token=token), model_id)
    base, tok = load_model(model_id, mode="cpu", dtype=dtype)   # 16-bit, on the CPU
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.config.use_cache = True

    def save(tmp):
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(save, out)      # the old folder (--overwrite) goes only once the new is whole
    return out


def push_to_hub(folder, repo_id: str, private: bool = True):
    """Upload a merged folder or an adapter; the token comes from HF_TOKEN or the notebook's
    secret store and is never printed."""
    from huggingface_hub import HfApi

    from .models import get_hf_token

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
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id)
