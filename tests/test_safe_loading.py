"""Safe loading: safetensors only (a pickle .bin is refused, never unpickled), no remote code
unless the caller turns it on, and no output folder overwritten without --overwrite."""
import inspect
import json
import pickle
from pathlib import Path

import pytest

from socratic_lora.cli import main
from socratic_lora.models import load_model


class Booby:
    """Unpickling this writes a file: proof that a pickle was loaded."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path(self.path).write_text, ("pickle code ran",))


def booby_trapped(path: Path, sentinel: Path) -> None:
    path.write_bytes(pickle.dumps(Booby(sentinel)))


def refused(capsys, argv, *needles):
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def sentinel(tmp_path):
    s = tmp_path / "PICKLE_OR_REMOTE_CODE_RAN"
    yield s
    assert not s.exists(), "untrusted code ran"


def test_the_trap_works(tmp_path):
    """The booby-trapped file really runs code when unpickled (so the tests below can fail)."""
    trap, ran = tmp_path / "x.bin", tmp_path / "ran"
    booby_trapped(trap, ran)
    pickle.loads(trap.read_bytes())
    assert ran.read_text() == "pickle code ran"


def test_model_with_only_pickle_weights_is_refused(capsys, tmp_path, tiny_gemma2_dir, sentinel):
    from transformers import AutoConfig
    folder = tmp_path / "bin_model"
    AutoConfig.from_pretrained(tiny_gemma2_dir).save_pretrained(folder)
    booby_trapped(folder / "pytorch_model.bin", sentinel)
    refused(capsys, ["chat", "--model", folder, "--prompt", "hi"],
            "no *.safetensors weights in the folder (only pickle .bin files)", "safetensors only")
    with pytest.raises(OSError, match="safetensors only"):
        load_model(str(folder), mode="cpu")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_gemma2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2_dir)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path)
    (path / "socratic_lora.json").write_text(json.dumps({"base": tiny_gemma2_dir}))
    return path


def test_adapter_with_only_pickle_weights_is_refused(capsys, tmp_path, adapter_dir,
                                                      tiny_gemma2_dir, sentinel):
    bad = tmp_path / "bin_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    booby_trapped(bad / "adapter_model.bin", sentinel)
    refused(capsys, ["chat", "--model", tiny_gemma2_dir, "--adapter", bad, "--prompt", "hi"],
            "no adapter_model.safetensors (only adapter_model.bin, a pickle file)")
    refused(capsys, ["merge", "--adapter", bad, "--model", tiny_gemma2_dir, "--out",
                     tmp_path / "merged"], "adapter_model.bin")
    assert not (tmp_path / "merged").exists()


def test_the_good_adapter_passes_the_same_checks(adapter_dir, tiny_gemma2_dir):
    from transformers import AutoConfig

    from socratic_lora.generate import adapter_base, check_adapter
    check_adapter(adapter_dir, AutoConfig.from_pretrained(tiny_gemma2_dir), tiny_gemma2_dir)
    assert adapter_base(adapter_dir) == tiny_gemma2_dir


def remote_code_model(folder: Path, sentinel: Path, model_type: str, base_config=None) -> Path:
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('remote code ran')\n")
    cfg = json.loads(Path(base_config).read_text()) if base_config else {}
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_remote_code_is_not_run_by_default(capsys, tmp_path, sentinel):
    folder = remote_code_model(tmp_path / "custom", sentinel, "evil_lm")
    refused(capsys, ["plan", "--model", folder, "--mode", "cpu"],
            "needs its own Python code", "trust_remote_code=True")
    refused(capsys, ["chat", "--model", folder, "--prompt", "hi"], "trust_remote_code=True")
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False


def test_a_known_architecture_with_auto_map_loads_the_builtin_code(tmp_path, tiny_gemma2_dir,
                                                                    sentinel):
    import shutil
    folder = remote_code_model(tmp_path / "gemma_with_auto_map", sentinel, "gemma2",
                               Path(tiny_gemma2_dir) / "config.json")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_gemma2_dir) / name, folder)
    model, _ = load_model(str(folder), mode="cpu")
    assert type(model).__module__.startswith("transformers.models.gemma2")


# --- output folders -----------------------------------------------------------------------
def test_train_refuses_an_output_dir_with_other_files(capsys, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {out}\ntrain_data: train\neval_data: null\n")
    refused(capsys, ["train", "--config", cfg], f"{out} already holds files (notes.txt)",
            "--overwrite", "--resume")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_only_what_a_run_writes(tmp_path):
    from socratic_lora.train import STAGING, check_output_dir
    out = tmp_path / "run"
    for d in ("checkpoint-4", "adapter", STAGING, "my_data"):
        (out / d).mkdir(parents=True)
    for f in ("report.json", "report.md", "loss.png", "notes.txt"):
        (out / f).write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_dir(out, resume=False, overwrite=False)
    assert check_output_dir(out, resume=False, overwrite=True) is None
    assert sorted(p.name for p in out.iterdir()) == ["my_data", "notes.txt"]


def test_eval_refuses_a_non_empty_out(capsys, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text('{"earlier": true}')
    refused(capsys, ["eval", "--out", out], "already holds files", "--overwrite")
    assert (out / "eval.json").read_text() == '{"earlier": true}'


def test_eval_files_are_written_whole_or_not_at_all(tmp_path):
    from socratic_lora.cli import _write_eval_atomically

    def dies_half_way(res, folder):
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text('{"half": ')
        raise OSError("disk full")
    out = tmp_path / "eval"
    with pytest.raises(OSError):
        _write_eval_atomically(dies_half_way, {}, out)
    assert not out.exists() and not list(tmp_path.iterdir())

    out.mkdir()
    (out / "eval.json").write_text("old")
    (out / "notes.txt").write_text("mine")

    def writes(res, folder):
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps(res))
    _write_eval_atomically(writes, {"new": 1}, out)
    assert json.loads((out / "eval.json").read_text()) == {"new": 1}
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]   # no temporary folder left


def test_merge_overwrite_never_replaces_the_working_directory(capsys, tmp_path, adapter_dir,
                                                             monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep")
    monkeypatch.chdir(work)
    refused(capsys, ["merge", "--adapter", adapter_dir, "--out", ".", "--overwrite"],
            "refusing to replace this folder")
    refused(capsys, ["merge", "--adapter", adapter_dir, "--out", "."], "is not empty", "--overwrite")
    assert (work / "precious.txt").read_text() == "keep"


def test_a_failed_save_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    """merge --overwrite and the final adapter: a save that dies half way (disk full,
    Ctrl-C) keeps the old folder whole and removes its own temporary folder."""
    from socratic_lora.train import save_atomically
    target = tmp_path / "merged"
    target.mkdir()
    (target / "model.safetensors").write_text("old weights")

    def dies(folder, exc):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half")
        raise exc
    for exc in (OSError("disk full"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            save_atomically(lambda p: dies(p, exc), target)
        assert (target / "model.safetensors").read_text() == "old weights"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    def writes(folder):
        folder.mkdir()
        (folder / "model.safetensors").write_text("new weights")
    save_atomically(writes, target)
    assert (target / "model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    save_atomically(writes, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "merged"]
