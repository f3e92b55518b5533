"""Command-line flags that were silently ignored, misread or crashed late."""
import pytest

from socratic_lora import cli
from socratic_lora.cli import main


def refused(capsys, argv, *needles):
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("systems,says", [
    ("tuned", "needs --adapter"),
    ("base,tuned", "needs --adapter"),
    ("base,base,prompted", "a system named twice"),
    (",", "no system"),
    ("base,judge", "unknown ['judge']"),
])
def test_eval_systems_are_checked_before_any_model_loads(capsys, monkeypatch, tmp_path,
                                                         systems, says):
    def no_model(*a, **k):
        raise AssertionError("run_eval must not be reached")
    monkeypatch.setattr("socratic_lora.evaluate.run_eval", no_model)
    refused(capsys, ["eval", "--systems", systems, "--out", tmp_path / "e"], says)
    assert not (tmp_path / "e").exists()


def test_eval_default_systems_without_adapter_drop_tuned(monkeypatch, tmp_path):
    seen = {}

    def fake_run_eval(model, adapter, split, systems, *rest, **kwargs):
        seen["systems"] = systems
        raise KeyboardInterrupt          # stop here: the systems are what is checked
    monkeypatch.setattr("socratic_lora.evaluate.run_eval", fake_run_eval)
    assert main(["eval", "--out", str(tmp_path / "e")]) == 130
    assert seen["systems"] == ["base", "prompted", "fewshot"]


def test_chat_with_an_empty_prompt_is_refused(capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("read stdin"))
    refused(capsys, ["chat", "--prompt", "  "], "--prompt is empty")


@pytest.mark.parametrize("argv", [["--steps", "-1"], ["--steps", "0"], ["--lr", "0"]])
def test_demo_needs_positive_steps_and_lr(capsys, argv):
    refused(capsys, ["demo", *argv], "both must be positive")


@pytest.mark.parametrize("command,argv,resume", [("_chat", ["chat", "--prompt", "hi"], False),
                                                  ("_train", ["train", "--config", "demo"], True)])
def test_interrupt_message_mentions_resume_only_for_train(capsys, monkeypatch, command, argv,
                                                          resume):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, command, interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"socratic-lora {argv[0]}: interrupted" in err and ("--resume" in err) == resume
