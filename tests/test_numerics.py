"""Training stops at the first inf/NaN loss, names the step and the likely causes, and leaves
the last good checkpoint intact (no adapter, no report, no later checkpoint)."""
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import socratic_lora.train as train_module
from socratic_lora.cli import main
from socratic_lora.train import CHECKPOINT_MARKER, TrainingDiverged, load_settings, train

ROWS = [{"id": f"n-{i}", "topic": f"話題{i}", "subject": "science",
         "messages": [{"role": "user", "content": f"{i}番目の質問です"},
                      {"role": "assistant", "content": f"{i}つ目の手がかりは何でしょう？"}]}
        for i in range(6)]


def poison_loss_from(monkeypatch, step: int, value: float):
    """Make the model's loss `value` from the `step`-th training forward pass on (a stand-in for
    float16 overflow): a forward hook on the base model that load_for_training returns."""
    real = train_module.load_for_training

    def load(s):
        model, tok = real(s)
        calls = {"n": 0}

        def hook(module, args, kwargs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] >= step:
                    output["loss"] = output["loss"] * 0 + value
            return output
        model.get_base_model().register_forward_hook(hook, with_kwargs=True)
        return model, tok
    monkeypatch.setattr(train_module, "load_for_training", load)


@pytest.fixture
def config(tmp_path, tiny_chat_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", "utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(dict(
        model=tiny_chat_dir, placement="cpu", train_data=str(data), eval_data=None, lora_r=4,
        lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False, batch_size=2,
        learning_rate=2e-3, warmup=0, logging_steps=1, save_steps=2, max_steps=4, max_length=64,
        save_total_limit=3, output_dir=str(tmp_path / "run"))))
    return cfg, tmp_path / "run"


def test_nan_at_step_3_stops_with_the_step_and_keeps_checkpoint_2(monkeypatch, capsys, config):
    cfg, out = config
    poison_loss_from(monkeypatch, step=3, value=math.nan)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    msg = [x for x in err.splitlines() if x.startswith("socratic-lora train: error:")]
    assert len(msg) == 1, err
    msg = msg[0]
    for needle in ("step 3: the training loss is nan", "checkpoint-2 is intact", "--resume",
                   "float16 overflow", "T4", "lower learning_rate (now 0.002, try 0.0005)",
                   "bfloat16", "bad data"):
        assert needle in msg, (needle, msg)
    # The last good checkpoint is whole and finite; nothing after it was written.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / CHECKPOINT_MARKER).exists()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert all(math.isfinite(h["loss"]) for h in state["log_history"] if "loss" in h)
    weights = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_inf_at_the_first_step_raises_before_any_checkpoint(monkeypatch, config):
    cfg, out = config
    poison_loss_from(monkeypatch, step=1, value=math.inf)
    with pytest.raises(TrainingDiverged, match=r"step 1: the training loss is inf.*no checkpoint "
                                               r"was written before it"):
        train(load_settings(str(cfg), max_steps=2))
    assert not (out / "adapter").exists() and not list(out.glob("checkpoint-*"))


def test_the_loss_is_checked_from_the_forward_not_after_backward(monkeypatch, config):
    """The inf/NaN check reads a copy of the loss taken right after the forward (a
    synchronisation after backward would keep the host from queueing the next step while
    the GPU works), and Trainer's own filter, which reads the loss after backward, is off."""
    from accelerate import Accelerator
    cfg, out = config
    events = []
    real_probe, real_backward = train_module.LossProbe, Accelerator.backward

    class Probe(real_probe):
        def __init__(self, t):
            events.append(("probe", t.reshape(-1)[0].item()))
            super().__init__(t)

    def backward(self, loss, **kwargs):
        events.append(("backward", loss.item()))
        return real_backward(self, loss, **kwargs)
    monkeypatch.setattr(train_module, "LossProbe", Probe)
    monkeypatch.setattr(Accelerator, "backward", backward)
    train(load_settings(str(cfg), max_steps=2, save_steps=10))
    assert [e[0] for e in events] == ["probe", "backward"] * 2, events
    for (_, probed), (_, backed) in zip(events[::2], events[1::2]):
        assert math.isfinite(probed) and abs(probed - backed) < 1e-6   # the same loss
    s = load_settings(str(cfg))
    assert train_module.training_arguments(s, None, has_eval=False).logging_nan_inf_filter is False


def test_parameters_are_counted_once_for_the_flops_estimate(monkeypatch, config):
    """Trainer's flops estimate recounts the model's parameters at every step (milliseconds
    of host time for a 4-bit Gemma 2 2B, with the GPU waiting where the host is behind);
    ReliableTrainer counts them once and gives the same estimate."""
    from transformers import PreTrainedModel
    cfg, out = config
    counts = []
    real = PreTrainedModel.num_parameters

    def counted(self, *args, **kwargs):
        n = real(self, *args, **kwargs)
        counts.append(n)
        return n
    monkeypatch.setattr(PreTrainedModel, "num_parameters", counted)
    train(load_settings(str(cfg), max_steps=3, save_steps=2))
    assert len(counts) == 1 and counts[0] > 0
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    # 2 steps of 2 rows, each padded to a multiple of 8 tokens
    per_token = 6 * counts[0]
    assert state["total_flos"] > 0 and state["total_flos"] % per_token == 0
    assert (state["total_flos"] // per_token) % 8 == 0
