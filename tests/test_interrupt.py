"""Hard kills (SIGKILL) of `socratic-lora train`, then --resume: the final adapter equals that
of a run that was never interrupted, and a checkpoint cut off mid-save is never resumed from.

CPU, the tiny chat model of conftest.py, fixed seed, 4 steps with a checkpoint every 2.
Tolerance for "equal": torch.testing.assert_close with rtol=1e-5, atol=1e-7 (on this machine the
weights come out bit-identical; the tolerance only allows for other CPUs' kernels).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from socratic_lora.cli import main
from socratic_lora.train import CHECKPOINT_MARKER, STAGING, complete_checkpoints

ROWS = [{"id": f"k-{i}", "topic": f"話題{i}", "subject": "science",
         "messages": [{"role": "user", "content": f"{i}番目の質問です。なぜ空は青いの？"},
                      {"role": "assistant", "content": f"いい問いですね。{i}つ目の手がかりは何でしょう？"}]}
        for i in range(8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_chat_dir):
    """A config for 4 steps with checkpoints at 2 and 4, and the uninterrupted run's adapter."""
    root = tmp_path_factory.mktemp("interrupt")
    data = root / "dialogues.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", "utf-8")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        model=tiny_chat_dir, placement="cpu", train_data=str(data), eval_data=None, lora_r=4,
        lora_alpha=8, lora_dropout=0.0, lora_targets="attention", gradient_checkpointing=False,
        batch_size=2, learning_rate=5e-3, warmup=0, logging_steps=1, save_steps=2,
        save_total_limit=5, max_steps=4, max_length=64, seed=7, output_dir=str(root / "unused"))))
    reference = root / "reference"
    assert main(["train", "--config", str(cfg), "--set", f"output_dir={reference}"]) == 0
    weights = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)   # it learned
    return root, cfg, weights


def command(cfg, out, *extra):
    return [sys.executable, "-m", "socratic_lora.cli", "train", "--config", str(cfg),
            "--set", f"output_dir={out}", *extra]


def resume_and_compare(cfg, out, reference, expect_from):
    assert main(["train", "--config", str(cfg), "--set", f"output_dir={out}", "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert Path(report["resumed_from"]).name == expect_from and report["steps"] == 4
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=1e-5, atol=1e-7)


def test_sigkill_between_checkpoints_then_resume(setup):
    root, cfg, reference = setup
    out = root / "killed"
    log = open(root / "killed.log", "w")
    proc = subprocess.Popen(command(cfg, out), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir():      # appears whole: it is renamed into place
        assert proc.poll() is None, "the run ended before checkpoint-2 appeared"
        assert time.time() < deadline, "no checkpoint-2 after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    log.close()
    assert not (out / "adapter").exists() and not (out / "checkpoint-4").exists()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    resume_and_compare(cfg, out, reference, "checkpoint-2")


KILL_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
save_rng = Trainer._save_rng_state
def killed(self, output_dir):      # weights and optimizer of checkpoint-4 are written by now
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng(self, output_dir)
Trainer._save_rng_state = killed
from socratic_lora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_save_is_ignored_on_resume(setup):
    root, cfg, reference = setup
    out = root / "killed_mid_save"
    argv = command(cfg, out)
    argv[1:3] = ["-c", KILL_DURING_SAVE]
    proc = subprocess.run(argv, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = out / STAGING / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").exists() and (partial / "optimizer.pt").exists()
    assert not (partial / CHECKPOINT_MARKER).exists() and not (partial / "trainer_state.json").exists()
    assert not (out / "checkpoint-4").exists()            # never where --resume looks
    # Even a half checkpoint *in place* (as Trainer alone would leave it) is skipped: it has no
    # completion marker. transformers' own get_last_checkpoint would pick it.
    from transformers.trainer_utils import get_last_checkpoint
    os.replace(partial, out / "checkpoint-4")
    assert Path(get_last_checkpoint(str(out))).name == "checkpoint-4"
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    resume_and_compare(cfg, out, reference, "checkpoint-2")
    assert (out / "checkpoint-4" / CHECKPOINT_MARKER).exists()   # re-saved whole this time
    assert not (out / STAGING).exists()


def test_resume_with_only_a_cut_off_checkpoint_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(out), "train_data": "train", "eval_data": None}))
    assert main(["train", "--config", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint-* folder" in err and "checkpoint-2 incomplete" in err
    assert "Traceback" not in err
