"""The lessons' setup: the one switch, platform detection, shipped architectures."""
import pytest

from socratic_lora.lesson import detect_platform, setup
from socratic_lora.placement import KNOWN_CONFIGS, known_config, plan_placement


def test_platform_detection(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert detect_platform() == "local"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert detect_platform() == "kaggle"
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261101")
    assert detect_platform() == "colab"


def test_gpu_switch_without_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*use_gpu_model=False"):
        setup(True, work=tmp_path / "w")
    assert not (tmp_path / "w").exists()   # nothing created for a refused setup


def test_gpu_switch_picks_the_t4_configs(tmp_path, monkeypatch):
    for gpus, config in ((1, "colab_t4"), (2, "kaggle_2xt4_balanced")):
        monkeypatch.setattr("torch.cuda.device_count", lambda g=gpus: g)
        env = setup(True, work=tmp_path)
        assert (env.model, env.config, env.gpus) == ("google/gemma-2-2b-jpn-it", config, gpus)
        assert "gemma-2-2b-jpn-it" in str(env)
        assert env.settings().output_dir == str(tmp_path / config)
        assert env.quant.bits == 4 and env.quant.quant_type == "nf4"   # as str(env) says


def test_offline_switch_names_the_model_and_hides_its_path(tmp_path):
    env = setup(False, work=tmp_path / "runs")
    assert env.config == "demo"
    assert "Gemma 3 270M" in str(env)
    assert env.model not in str(env)          # an absolute cache path never reaches a page
    s = env.settings(max_steps=1)
    assert s.output_dir == str(tmp_path / "runs" / "demo") and s.max_steps == 1
    assert env.quant is None


def test_evaluation_loads_the_base_with_the_quantization_it_is_given(monkeypatch):
    """Lessons 07/08 pass env.quant: on the GPU the page's model is the 4-bit one."""
    from socratic_lora import QuantSettings, generate
    from socratic_lora.evaluate import run_eval_sample
    seen = {}

    class Loaded(Exception):
        pass

    def fake_load(model, adapter=None, **kw):
        seen.update(kw, model=model)
        raise Loaded
    monkeypatch.setattr(generate, "load_chat_model", fake_load)
    q = QuantSettings(bits=4)
    with pytest.raises(Loaded):
        run_eval_sample("some/model", split="eval", per_subject=1, systems=("base",), quant=q)
    assert seen == {"model": "some/model", "quant": q, "prompt_format": None}


@pytest.mark.parametrize("model_id", sorted(KNOWN_CONFIGS))
def test_shipped_architectures_plan_without_a_download(model_id, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = known_config(model_id)
    assert config.vocab_size in (256000, 32000)
    plan = plan_placement(model_id, "cpu", bits=4)
    assert set(plan.placed.values()) == {"cpu"}


def test_gemma2_2b_shipped_config_matches_the_reference():
    from conftest import reference_config
    ref, shipped = reference_config(), known_config("google/gemma-2-2b-jpn-it")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "final_logit_softcapping"):
        assert getattr(shipped, key) == getattr(ref, key), key


def test_unknown_architecture_is_named():
    with pytest.raises(KeyError, match="not shipped; known: google/gemma-2-2b-jpn-it"):
        known_config("google/gemma-7b")
