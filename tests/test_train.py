"""The training pipeline on tiny models: configs, a short run, its report, resume, recipes."""
import json
from importlib.resources import files

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from socratic_lora.train import load_settings, train

CONFIGS = sorted(p.name[:-5] for p in files("socratic_lora").joinpath("configs").iterdir()
                 if p.name.endswith(".yaml"))


def test_all_six_configs_ship():
    assert set(CONFIGS) >= {"demo", "colab_t4", "kaggle_2xt4_balanced", "kaggle_2xt4_ddp",
                            "rinna_neox_3.6b_dolly", "gemma2_27b_qlora"}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_starts_with_its_command(name):
    s = load_settings(name)
    text = files("socratic_lora").joinpath(f"configs/{name}.yaml").read_text("utf-8")
    assert text.startswith("# ") and "train --config " + name in text.splitlines()[0]
    assert s.lora_r > 0 and s.output_dir


def test_config_values_from_the_sources():
    kb = load_settings("kaggle_2xt4_balanced")
    assert (kb.bits, kb.placement, kb.gpu_budgets, kb.allow_offload) == (4, "balanced", ["4GiB", "4GiB"], False)
    assert (kb.lora_r, kb.lora_alpha, kb.lora_dropout, kb.lora_targets) == (16, 32, 0.1, "attention")
    assert load_settings("kaggle_2xt4_ddp").placement == "data_parallel"
    rinna = load_settings("rinna_neox_3.6b_dolly")
    assert rinna.lora_targets == ["query_key_value"] and rinna.lora_r == 8
    assert rinna.prompt_format == "instruction"
    big = load_settings("gemma2_27b_qlora")
    assert (big.lora_r, big.lora_alpha, big.lora_targets, big.learning_rate, big.epochs) == \
        (64, 64, "all-linear", 2e-4, 2.0)
    assert (big.min_japanese, big.min_char_count, big.neftune_alpha) == (0.6, 20, 5.0)


@pytest.mark.parametrize("text,match", [
    ("lora_rank: 8\n", "unknown key 'lora_rank' \\(did you mean 'lora_r'\\?\\)"),
    ("lora_r: sixteen\n", "key 'lora_r': 'sixteen' is a str, expected int"),
    ("lora_r: 0\n", "key 'lora_r': 0 must be a positive rank"),
    ("lora_r: -4\n", "key 'lora_r': -4 must be a positive rank"),
    ("placement: everywhere\n", "key 'placement'"),
    ("gradient_checkpointing: 1\n", "key 'gradient_checkpointing': 1 is a int, expected bool"),
    ("packing: yes please\n", "key 'packing': 'yes please' is a str, expected bool"),
    ("packing: true\nmax_length: 512\npack_length: 256\n",
     r"key 'pack_length': 256: give a whole number of tokens of at least max_length \(512\), "
     r"e.g. 1024"),
    ("packing: true\npack_length: long\n", "key 'pack_length': 'long'"),
    ("pack_length: 2048\n", "key 'pack_length': is set but packing is false"),
    ("- a\n- b\n", "expected 'key: value' lines"),
    ("model: [unclosed\n", "not valid YAML"),
    ("lora_r:\n", r"key 'lora_r' has no value \(an empty 'key:' line or null\); give one like 16"),
    ("learning_rate: null\n", "key 'learning_rate' has no value"),
])
def test_bad_configs_name_the_key(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_settings(str(p))


def test_none_overrides_and_nullable_keys_take_effect(tmp_path):
    """eval_data=None turns evaluation off (it used to be dropped silently, leaving the
    config's 'eval'); keys that may be empty accept null in YAML too."""
    assert load_settings("demo").eval_data == "eval"
    assert load_settings("demo", eval_data=None).eval_data is None
    with pytest.raises(ValueError, match=r"override lora_r=None \(--set lora_r= with no value"):
        load_settings("demo", lora_r=None)          # names the override, not the YAML file
    p = tmp_path / "c.yaml"
    p.write_text("eval_data: null\nmin_japanese:\n")
    s = load_settings(str(p))
    assert s.eval_data is None and s.min_japanese is None


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="demo"):
        load_settings("dmeo")


def run(tmp_path, model_dir, resume=False, callbacks=None, **kw):
    base = dict(model=model_dir, placement="cpu", train_data="train", eval_data=None,
                lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False,
                batch_size=4, learning_rate=5e-3, warmup=0, logging_steps=1, save_steps=2,
                save_total_limit=5, max_steps=4, max_length=256, output_dir=str(tmp_path / "run"))
    base.update(kw)
    return train(load_settings("demo", **base), resume=resume, callbacks=callbacks)


def test_short_run_writes_adapter_report_and_curve(tmp_path, tiny_chat_dir):
    report = run(tmp_path, tiny_chat_dir, eval_data="eval")
    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "adapter" / "socratic_lora.json").read_text())["base"] == tiny_chat_dir
    assert (out / "loss.png").stat().st_size > 1000
    saved = json.loads((out / "report.json").read_text())
    for key in ("steps", "epochs", "wall_time_s", "final_loss", "mean_loss", "eval_loss",
                "samples_per_s", "tokens_per_s", "peak_memory_gib", "trainable",
                "trainable_percent", "adapter_mb", "settings", "versions", "hardware"):
        assert key in saved, key
    assert saved["steps"] == 4 and saved["tokens_per_s"] > 0 and saved["eval_loss"] > 0
    assert saved["versions"]["transformers"].startswith("5.")
    md = (out / "report.md").read_text()
    assert "| final train loss |" in md and "![loss curve](loss.png)" in md
    losses = [h["loss"] for h in json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
    assert report["adapter_mb"] > 0


class StopAt(TrainerCallback):
    """Simulates an interrupted run: stops after `step` (its checkpoint is written)."""
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_continues_from_the_checkpoint(tmp_path, tiny_chat_dir):
    full = tmp_path / "full"
    run(full, tiny_chat_dir)
    part = tmp_path / "part"
    run(part, tiny_chat_dir, callbacks=[StopAt(2)])            # same config, stopped at step 2
    assert (part / "run" / "checkpoint-2").is_dir() and not (part / "run" / "checkpoint-4").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        run(part, tiny_chat_dir)
    report = run(part, tiny_chat_dir, resume=True)
    assert report["resumed_from"].endswith("checkpoint-2") and report["steps"] == 4
    a = load_file(full / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(part / "run" / "adapter" / "adapter_model.safetensors")
    for k in a:      # same steps on the same data in the same order: the same adapter
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_chat_dir):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(load_settings("demo", model=tiny_chat_dir, output_dir=str(tmp_path / "x")), resume=True)


def test_rinna_recipe_runs_on_a_tiny_gpt_neox(tmp_path, tiny_neox_chat_dir):
    rows = [{"instruction": f"質問{i}に答えて", "input": "", "output": f"答え{i}です。"} for i in range(8)]
    data = tmp_path / "dolly.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    s = load_settings("rinna_neox_3.6b_dolly", model=tiny_neox_chat_dir, bits=16, placement="cpu",
                      train_data=str(data), batch_size=4, grad_accum=1, max_steps=2,
                      output_dir=str(tmp_path / "rinna"), gradient_checkpointing=False)
    report = train(s)
    assert report["steps"] == 2 and report["settings"]["lora_targets"] == ["query_key_value"]


def test_gemma2_27b_recipe_runs_on_a_tiny_gemma2_with_filters(tmp_path, tiny_chat_dir):
    rows = [{"messages": [{"role": "user", "content": f"日本語の質問{i}です"},
                          {"role": "assistant", "content": f"日本語の答え{i}です"}]} for i in range(30)]
    rows.append({"messages": [{"role": "user", "content": "English only please"},
                              {"role": "assistant", "content": "Sure, here it is"}]})
    data = tmp_path / "inst.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    s = load_settings("gemma2_27b_qlora", model=tiny_chat_dir, bits=16, placement="cpu",
                      train_data=str(data), batch_size=4, grad_accum=1, max_steps=2,
                      optimizer="adamw_torch", min_char_count=2,
                      output_dir=str(tmp_path / "g27"), gradient_checkpointing=False)
    report = train(s)
    assert report["examples"]["train"] == 30
    assert any("japanese share: kept 30" in line and "removed 1" in line for line in report["data_steps"])
