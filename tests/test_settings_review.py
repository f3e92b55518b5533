"""Config values a run would only trip over after loading the model: refused when read, naming
the key (and the override, when it came from --set), and nothing written for a refused run."""
import pytest

from socratic_lora.cli import main
from socratic_lora.train import load_settings, train


@pytest.mark.parametrize("key,value,says", [
    ("min_japanese", "60%", "expected float"),
    ("min_japanese", 1.5, "give 0..1"),
    ("min_char_count", 0.5, "expected int"),
    ("min_char_count", 0, "at least 1"),
    ("eval_steps", "ten", "expected int"),
    ("eval_steps", 0, "positive number of steps"),
    ("neftune_alpha", "five", "expected float"),
    ("neftune_alpha", -1.0, "must be positive"),
    ("lr_scheduler", "cosin", "did you mean 'cosine'?"),
    ("optimizer", "adam_w", "not one of transformers' choices"),
    ("report_to", "tensorbord", "did you mean 'tensorboard'?"),
    ("report_to", "tensorboard,wandbb", "'wandbb'"),
    ("mode", "fast", "use reference, speed or memory"),
    ("save_total_limit", 0, "positive whole number"),
    ("banned", ["ok", ""], "list of non-empty strings"),
    ("banned", "word", "list of non-empty strings"),
    ("lora_targets", ["q_proj", 3], "list of non-empty strings"),
    ("learning_rate", "fast", "expected float"),
])
def test_bad_values_are_refused_when_read(key, value, says):
    with pytest.raises(ValueError) as err:
        load_settings("demo", **{key: value})
    assert f"'{key}'" in str(err.value) and says in str(err.value), str(err.value)


def test_good_values_pass():
    s = load_settings("demo", lr_scheduler="linear", optimizer="adamw_torch_fused",
                      report_to="tensorboard,wandb", eval_steps=10, min_japanese=0.6,
                      min_char_count=20, neftune_alpha=5, banned=["x"], mode="memory")
    assert s.neftune_alpha == 5.0 and isinstance(s.neftune_alpha, float)


def test_a_learning_rate_written_2e_4_is_a_number(tmp_path):
    """YAML 1.1 reads 2e-4 (no dot) as a string; it is what people write for learning rates."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 2e-4\nneftune_alpha: 5e0\n")
    s = load_settings(cfg)
    assert s.learning_rate == 2e-4 and s.neftune_alpha == 5.0
    assert load_settings(cfg, learning_rate="1e-3").learning_rate == 1e-3
    with pytest.raises(ValueError, match="expected float"):
        load_settings(cfg, learning_rate="inf")


def test_an_override_error_names_the_override_not_the_file(capsys, tmp_path):
    with pytest.raises(ValueError) as err:
        load_settings("demo", max_step=10)
    assert str(err.value).startswith("override max_step=10: unknown key 'max_step'")
    assert "did you mean 'max_steps'" in str(err.value)
    out = tmp_path / "run"
    status = main(["train", "--config", "demo", "--set", f"output_dir={out}",
                   "--set", "lr_scheduler=cosin"])
    err = capsys.readouterr().err
    assert status == 2 and "lr_scheduler='cosin'" in err and "did you mean 'cosine'" in err
    assert not out.exists()


def test_a_run_refused_before_training_leaves_no_output_folder(monkeypatch, tmp_path,
                                                              tiny_chat_dir):
    import socratic_lora.train as t

    def broken(*a, **k):
        raise ValueError("refused by TrainingArguments")
    monkeypatch.setattr(t, "training_arguments", broken)
    out = tmp_path / "runs" / "x"
    with pytest.raises(ValueError, match="refused by TrainingArguments"):
        train(load_settings("demo", model=tiny_chat_dir, eval_data=None, max_steps=1,
                            output_dir=str(out)))
    assert not out.exists()
