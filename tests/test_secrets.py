"""A fake Hugging Face token planted in HF_TOKEN is never printed, logged or written.

Every CLI command that reads the token runs with it (train on a tiny local model, chat, eval,
merge with --push-to-hub, plan, and the hub-id paths that pass it to transformers); then
stdout/stderr (file-descriptor level, so library log handlers are included), every file the
commands wrote (adapter, checkpoints, trainer_state, training_args.bin, reports, eval, merged
model) and every cache file touched meanwhile are scanned for it: zero hits.
"""
import dataclasses
import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from socratic_lora.cli import main
from socratic_lora.train import TrainSettings, load_settings

TOKEN = "hf_" + "".join(random.Random(os.getpid()).choices(string.ascii_letters, k=34))


def hits(root: Path, since: float | None = None) -> list[str]:
    """Files under `root` (changed since `since`, if given) that contain the token."""
    found = []
    for p in root.rglob("*") if root.exists() else []:
        try:
            if p.is_file() and (since is None or p.stat().st_mtime >= since) \
                    and TOKEN.encode() in p.read_bytes():
                found.append(str(p))
        except OSError:
            pass
    return found


@pytest.fixture
def planted(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("SOCRATIC_LORA_CACHE", str(tmp_path / "cache"))
    return time.time() - 1


def test_no_command_prints_or_writes_the_token(planted, capfd, caplog, tmp_path, tiny_chat_dir):
    caplog.set_level("DEBUG")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(
        {"id": f"s-{i}", "topic": "t", "subject": "science",
         "messages": [{"role": "user", "content": f"質問{i}"},
                      {"role": "assistant", "content": f"どう思いますか{i}？"}]}, ensure_ascii=False)
        for i in range(4)) + "\n", "utf-8")
    cfg = tmp_path / "c.yaml"
    run = tmp_path / "run"
    cfg.write_text(yaml.safe_dump(dict(
        model=tiny_chat_dir, placement="cpu", train_data=str(data), eval_data=str(data),
        lora_r=2, lora_alpha=4, gradient_checkpointing=False, batch_size=2, max_steps=2,
        save_steps=1, logging_steps=1, max_length=48, output_dir=str(run))))
    adapter = str(run / "adapter")
    status = {
        "train": main(["train", "--config", str(cfg)]),
        "chat": main(["chat", "--model", tiny_chat_dir, "--adapter", adapter, "--preset", "greedy",
                      "--prompt", "なぜ空は青いの？"]),
        "eval": main(["eval", "--model", tiny_chat_dir, "--adapter", adapter, "--limit", "1",
                      "--max-new-tokens", "3", "--systems", "base,tuned", "--out",
                      str(tmp_path / "eval")]),
        # merges, then the upload fails offline: the token was read and handed to the hub client
        "merge": main(["merge", "--adapter", adapter, "--out", str(tmp_path / "merged"),
                       "--push-to-hub", "someone/tutor"]),
        "plan": main(["plan", "--model", "google/gemma-2-2b-jpn-it", "--mode", "cpu"]),
        # hub ids that are not shipped: the token goes to transformers, which fails offline
        "plan_hub": main(["plan", "--model", "someone/private-model", "--mode", "cpu"]),
        "chat_hub": main(["chat", "--model", "someone/private-model", "--prompt", "hi"]),
    }
    out, err = capfd.readouterr()
    assert status == {"train": 0, "chat": 0, "eval": 0, "merge": 2, "plan": 0, "plan_hub": 2,
                      "chat_hub": 2}, (status, err[-3000:])
    # the paths really ran: files written, failures reported on one line each
    assert (run / "checkpoint-2" / "training_args.bin").exists()
    assert (run / "checkpoint-2" / "trainer_state.json").exists() and (run / "report.json").exists()
    assert (tmp_path / "eval" / "eval.json").exists() and (tmp_path / "merged" / "config.json").exists()
    # merge --push-to-hub wrote the card and Gemma's NOTICE before trying to upload
    assert (tmp_path / "merged" / "NOTICE").exists()
    assert str(tmp_path) not in (tmp_path / "merged" / "README.md").read_text()
    assert "socratic-lora merge: error:" in err and "socratic-lora plan: error:" in err
    assert "tutor> " in out
    assert TOKEN not in out and TOKEN not in err and TOKEN not in caplog.text
    assert hits(tmp_path) == []
    from huggingface_hub import constants
    assert hits(Path(constants.HF_HOME), since=planted) == []


def test_token_in_a_library_error_is_masked(planted, capsys, monkeypatch):
    """If a library ever put the token in its message, the CLI line shows hf_*** instead."""
    import transformers

    def leaky(*a, **k):
        raise OSError(f"401 Client Error for url https://huggingface.co/x (token {TOKEN})")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", leaky)
    assert main(["chat", "--model", "someone/gated-model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert TOKEN not in err and "hf_***" in err and "someone/gated-model" in err

    from socratic_lora.models import load_model
    with pytest.raises(OSError) as e:
        load_model("someone/gated-model", token=TOKEN)
    assert TOKEN not in str(e.value) and TOKEN not in repr(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__   # no chained original


def test_settings_have_no_token_field_and_reject_one(planted, tmp_path):
    assert not [f.name for f in dataclasses.fields(TrainSettings) if "token" in f.name.lower()]
    assert TOKEN not in repr(load_settings("demo"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"hf_token: {TOKEN}\n")
    with pytest.raises(ValueError) as e:
        load_settings(str(cfg))
    assert "unknown key 'hf_token'" in str(e.value) and TOKEN not in str(e.value)


def test_real_process_output_has_no_token(planted, tmp_path):
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "socratic_lora.cli", "plan", "--model",
                           "someone/private-model"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "someone/private-model" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert hits(tmp_path) == []


def test_token_from_the_colab_secret_store_is_masked_in_cli_errors(monkeypatch):
    """A token that came from Colab's secret store (not the environment) is masked in any
    error line too, also where the code that raised did not have the token at hand."""
    import types

    from socratic_lora import models
    from socratic_lora.cli import error_line
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    store_token = "hf_" + "".join(random.Random(7).choices(string.ascii_letters, k=34))
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: store_token
                                           if name == "HF_TOKEN" else None)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setattr(models, "_store_tokens", set())
    leak = RuntimeError(f"upload failed: 401 for token {store_token}")
    assert store_token in error_line(leak)          # not read from the store yet
    assert models.get_hf_token() == store_token
    line = error_line(leak)
    assert store_token not in line and "hf_***" in line and "upload failed" in line


class _FakeApi:
    """HfApi's three calls push_to_hub makes, against an in-memory hub."""
    hub: dict = {}
    uploads: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        if repo_id in self.hub and not exist_ok:
            raise RuntimeError("exists")
        self.hub.setdefault(repo_id, private)      # an existing repository keeps its setting

    def repo_info(self, repo_id):
        import types
        return types.SimpleNamespace(private=self.hub[repo_id])

    def create_commit(self, repo_id, operations, commit_message=""):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        self.uploads.append((files, repo_id))
        return f"uploaded {repo_id}"


def test_push_to_hub_never_uploads_into_an_existing_public_repository(planted, monkeypatch,
                                                                      tmp_path):
    import huggingface_hub

    from socratic_lora.export import push_to_hub
    (tmp_path / "README.md").write_text("# a card\n")
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "hub", {"me/public-one": False})
    monkeypatch.setattr(_FakeApi, "uploads", [])
    with pytest.raises(PermissionError, match="me/public-one already exists and is public"):
        push_to_hub(tmp_path, "me/public-one")
    assert _FakeApi.uploads == []
    assert push_to_hub(tmp_path, "me/new-one") == "uploaded me/new-one"
    assert _FakeApi.hub["me/new-one"] is True                     # created private
    assert push_to_hub(tmp_path, "me/public-one", private=False) == "uploaded me/public-one"
    assert [r for _, r in _FakeApi.uploads] == ["me/new-one", "me/public-one"]


def test_sharing_needs_a_filled_card_and_the_gemma_notice(planted, monkeypatch, tmp_path):
    """push_to_hub refuses a folder without a model card, with peft's unfilled template, or
    a Gemma derivative without NOTICE; write_card writes both, never a local path."""
    import huggingface_hub

    from socratic_lora.export import GEMMA_NOTICE, push_to_hub, write_card
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "hub", {})
    monkeypatch.setattr(_FakeApi, "uploads", [])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    base_dir = tmp_path / "alice" / "gemma-3-270m"
    base_dir.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(base_dir)}))
    (adapter / "socratic_lora.json").write_text(json.dumps({"base": str(base_dir)}))
    with pytest.raises(FileNotFoundError, match="no model card"):
        push_to_hub(adapter, "me/tutor")
    (adapter / "README.md").write_text("---\nbase_model: /home/alice\n---\n" + "".join(
        f"- **{k}:** [More Information Needed]\n" for k in ("Developed by", "Language(s)",
                                                             "License", "Finetuned from")))
    with pytest.raises(ValueError, match="unfilled template"):
        push_to_hub(adapter, "me/tutor")
    (adapter / "README.md").write_text("# my own card\n")
    with pytest.raises(FileNotFoundError, match="needs a NOTICE file"):
        push_to_hub(adapter, "me/tutor")
    assert _FakeApi.uploads == []
    with pytest.raises(FileExistsError, match="already written"):     # my card is kept
        write_card(adapter)
    files = write_card(adapter, overwrite=True)
    assert [f.name for f in files] == ["README.md", "NOTICE"]
    card = (adapter / "README.md").read_text()
    assert "license: gemma" in card and "library_name: peft" in card and "base_model" not in card
    assert "alice" not in card and "gemma-3-270m" in card and "CC BY 4.0" in card
    assert (adapter / "NOTICE").read_text() == GEMMA_NOTICE
    assert push_to_hub(adapter, "me/tutor") == "uploaded me/tutor"
    merged = tmp_path / "merged"                     # a hub base goes into the front matter
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    write_card(merged, "google/gemma-2-2b-jpn-it")
    card = (merged / "README.md").read_text()
    assert "base_model: google/gemma-2-2b-jpn-it" in card and "library_name: transformers" in card
    (tmp_path / "cache" / "gemma-3-270m").mkdir(parents=True)   # the offline default, by name
    write_card(merged, str(tmp_path / "cache" / "gemma-3-270m"), overwrite=True)
    assert "Base model: Gemma 3 270M (base), this package's offline default" in \
        (merged / "README.md").read_text()
    other = tmp_path / "other"                       # not Gemma: no NOTICE, license to state
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    assert [f.name for f in write_card(other, "rinna/japanese-gpt-neox-3.6b")] == ["README.md"]
    assert "license: other" in (other / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        write_card(tmp_path / "missing")


def test_shared_files_never_carry_a_local_path_and_cards_are_judged_fairly(planted, monkeypatch,
                                                                          tmp_path):
    """peft records where the base was loaded from: the upload names the folder only. A base
    path from another machine never reaches the card; a card that quotes the template marker
    is the user's; Gemma is told by the model type or the base's name, not a parent folder."""
    import huggingface_hub

    from socratic_lora.export import _is_gemma, check_card, push_to_hub, write_card
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "hub", {})
    monkeypatch.setattr(_FakeApi, "uploads", [])
    adapter = tmp_path / "adapter"
    (adapter / "sub").mkdir(parents=True)
    elsewhere = "/home/alice/.cache/socratic_lora/gemma-3-270m"    # not on this machine
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": elsewhere, "r": 16}))
    (adapter / "socratic_lora.json").write_text(json.dumps({"base": elsewhere}))
    (adapter / "sub" / "w.bin").write_bytes(b"\0\1")
    (adapter / ".tmp").mkdir()
    (adapter / ".tmp" / "x").write_text("half")
    write_card(adapter)
    card = (adapter / "README.md").read_text()
    assert "alice" not in card and "home" not in card and "base_model:" not in card
    assert "local model folder (gemma-3-270m)" in card and (adapter / "NOTICE").exists()
    push_to_hub(adapter, "me/tutor")
    (files, repo), = _FakeApi.uploads
    assert sorted(files) == ["NOTICE", "README.md", "adapter_config.json", "socratic_lora.json",
                             "sub/w.bin"]                      # hidden folders stay home
    assert all(b"alice" not in data for data in files.values())
    assert json.loads(files["adapter_config.json"]) == {"base_model_name_or_path": "gemma-3-270m",
                                                        "r": 16}
    assert json.loads(files["socratic_lora.json"]) == {"base": "gemma-3-270m"}
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == elsewhere                # the local file is untouched
    hub = tmp_path / "hub_adapter"                             # a hub id is uploaded as it is
    hub.mkdir()
    (hub / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "google/gemma-2-2b-jpn-it"}))
    write_card(hub)
    push_to_hub(hub, "me/tutor2")
    assert json.loads(_FakeApi.uploads[-1][0]["adapter_config.json"]) == {
        "base_model_name_or_path": "google/gemma-2-2b-jpn-it"}
    # a card of the user's that mentions the marker once is neither refused nor overwritten
    mine = "# My card\nI replaced every [More Information Needed] by hand.\n"
    (hub / "README.md").write_text(mine)
    check_card(hub)
    with pytest.raises(FileExistsError):
        write_card(hub)
    assert (hub / "README.md").read_text() == mine
    # Gemma or not: by model_type / base name, not by a parent folder called gemma
    llama = tmp_path / "gemma" / "models" / "llama-3"
    llama.mkdir(parents=True)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    renamed = tmp_path / "base"
    renamed.mkdir()
    (renamed / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    for base, gemma in ((str(llama), False), (str(renamed), True),
                        ("/home/gemma/models/llama-3", False), ("google/gemma-2-2b", True),
                        ("rinna/japanese-gpt-neox-3.6b", False)):
        a = tmp_path / f"a{len(str(base))}{gemma}"
        a.mkdir()
        (a / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
        assert _is_gemma(a, None) is gemma, base


def test_cli_merge_card_names_the_base_it_merged_into(planted, monkeypatch, tmp_path,
                                                      capsys):
    """merge without a training record merges into the offline default: the card says so,
    not what adapter_config.json (another machine's path) names."""
    import shutil

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setattr(_FakeApi, "hub", {})
    monkeypatch.setattr(_FakeApi, "uploads", [])
    from socratic_lora import export
    from socratic_lora.export import merge_base
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/home/alice/models/other"}))
    assert merge_base(adapter) == "default"
    (adapter / "socratic_lora.json").write_text(json.dumps({"base": "google/gemma-2-2b-jpn-it"}))
    assert merge_base(adapter) == "google/gemma-2-2b-jpn-it"
    assert merge_base(adapter, "my/base") == "my/base"
    (adapter / "socratic_lora.json").unlink()

    def fake_merge(adapter, out, model="default", overwrite=False):
        Path(out).mkdir()
        (Path(out) / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
        return Path(out)
    monkeypatch.setattr(export, "merge_adapter", fake_merge)
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                 "--push-to-hub", "me/m"]) == 0
    card = (tmp_path / "m" / "README.md").read_text()
    assert "offline default" in card and "alice" not in card and "other" not in card
    assert _FakeApi.uploads[-1][1] == "me/m"
    shutil.rmtree(tmp_path / "m")


def test_a_pasted_token_with_a_newline_is_stripped_and_masked(monkeypatch):
    import types

    from socratic_lora import models
    from socratic_lora.cli import error_line
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(models, "_store_tokens", set())
    monkeypatch.setenv("HF_TOKEN", TOKEN + "\n")
    assert models.get_hf_token() == TOKEN
    line = error_line(ValueError(f"Illegal header value b'Bearer {TOKEN}\n' (x)\nmore"))
    assert TOKEN not in line and "hf_***" in line
    monkeypatch.delenv("HF_TOKEN")
    pasted = "hf_" + "".join(random.Random(9).choices(string.ascii_letters, k=34))
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: pasted + "\n")
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    assert models.get_hf_token() == pasted
    line = error_line(RuntimeError(f"401 for token {pasted}\n and more"))
    assert pasted not in line and "hf_***" in line
