"""Bad input through the command line: every case exits with status 2, prints exactly one
error line that names the file and line (or the key, or the folder) and what to do, shows no
traceback, and leaves no output behind.

tests/test_data.py checks `load_dialogues` itself; here the same kinds of file (and more) go
through `socratic-lora train`, where the data is validated before any model is loaded.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from socratic_lora.cli import main

GOOD = {"id": "ok-1", "topic": "空の色", "subject": "science",
        "messages": [{"role": "user", "content": "なぜ空は青いの？"},
                     {"role": "assistant", "content": "夕方の空は何色でしょう？"}]}


def line(d) -> str:
    return json.dumps(d, ensure_ascii=False)


def dialogue(*pairs, **extra) -> str:
    msgs = [p if isinstance(p, dict) else {"role": p[0], "content": p[1]} for p in pairs]
    return line({**GOOD, **extra, "messages": msgs})


def cli(capsys, *argv):
    """Run the CLI in this process; returns (status, the one error line, stdout)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    errors = [x for x in err.splitlines() if x.startswith("socratic-lora ")]
    assert len(errors) == 1, err                     # one line, not a wall of text
    return status, errors[0], out


def assert_refused(capsys, argv, *needles, nothing_in=()):
    status, msg, _ = cli(capsys, *argv)
    assert status == 2, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    for path in nothing_in:
        assert not Path(path).exists(), f"{path} was written although the command failed"
    return msg


@pytest.fixture
def config(tmp_path):
    """Write a training config (and optionally its train file); returns (yaml, output_dir)."""
    def make(data: bytes | str | None = None, name="d.jsonl", **keys):
        if data is not None:
            f = tmp_path / name
            f.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
            keys.setdefault("train_data", str(f))
        keys.setdefault("model", str(tmp_path / "model-never-loaded"))
        keys.setdefault("eval_data", None)
        keys.setdefault("output_dir", str(tmp_path / "run"))
        cfg = tmp_path / "config.yaml"
        cfg.write_text(yaml.safe_dump(keys, allow_unicode=True), encoding="utf-8")
        return cfg, Path(keys["output_dir"])
    return make


# --- 1. dialogue files ------------------------------------------------------------------------
BAD_FILES = {
    # name: (file content, (line,) or None, what the message must say)
    "invalid_json": (line(GOOD) + "\n" + '{"id": "x", "messages": [\n', 2, "invalid JSON"),
    "missing_role": (dialogue({"content": "a"}, ("assistant", "b")), 1,
                     "field 'messages[0].role': None is not a role"),
    "wrong_role": (dialogue(("student", "a"), ("assistant", "b")), 1, "'student' is not a role"),
    "not_alternating": (dialogue(("user", "a"), ("assistant", "b"), ("assistant", "c")), 1,
                        "'assistant' where 'user' was expected"),
    "empty_content": (dialogue(("user", "a"), ("assistant", "")), 1,
                      "messages[1].content': missing, empty or only whitespace"),
    "ideographic_space_content": (dialogue(("user", "\u3000\u3000"), ("assistant", "b")), 1,
                                  "messages[0].content': missing, empty or only whitespace"),
    "content_not_text": (dialogue(("user", 42), ("assistant", "b")), 1, "messages[0].content"),
    "messages_not_a_list": (line({**GOOD, "messages": "user: hi"}), 1, "field 'messages'"),
    "system_in_the_middle": (dialogue(("user", "a"), ("assistant", "b"), ("system", "s"),
                                      ("assistant", "c")), 1, "system message can only come first"),
    "learner_speaks_last": (line(GOOD) + "\n" + dialogue(("user", "a"), ("assistant", "b"),
                                                         ("user", "c"), id="ok-2"), 2,
                            "does not end with the tutor"),
    "duplicate_id": (line(GOOD) + "\n" + line({**GOOD, "id": "ok-2"}) + "\n" + line(GOOD), 3,
                     "'ok-1' already used on line 1"),
    "shift_jis_bytes": (line(GOOD).encode() + b"\n" + line({**GOOD, "id": "ok-2"}).encode("utf-8")
                        .replace("なぜ空は青いの？".encode(), "なぜ空は青いの？".encode("shift_jis")),
                        2, "not UTF-8"),
    "byte_order_mark": (b"\xef\xbb\xbf" + line(GOOD).encode(), 1, "byte order mark"),
    "empty_list": ("[]\n", 1, "a JSON array"),
    "list_of_dialogues": (json.dumps([GOOD, {**GOOD, "id": "ok-2"}]), 1, "a JSON array"),
    "a_bare_string": (line(GOOD) + '\n"just text"\n', 2, "expected a JSON object"),
    "blank_line_between": (line(GOOD) + "\n\n" + line({**GOOD, "id": "ok-2"}), 2, "empty line"),
    "huge_line": (line({**GOOD, "topic": "x" * 1_100_000}), 1, "line of 1,100,"),
    "empty_file": (b"", None, "no dialogues"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_dialogue_file(capsys, config, name):
    data, lineno, says = BAD_FILES[name]
    cfg, out = config(data)
    where = f"d.jsonl:{lineno}:" if lineno else "d.jsonl"
    assert_refused(capsys, ["train", "--config", cfg], where, says, nothing_in=[out])


def test_bad_eval_file_is_named_not_the_train_file(capsys, config, tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(line(GOOD) + "\n" + dialogue(("user", "a")) + "\n", encoding="utf-8")
    train = tmp_path / "train.jsonl"
    train.write_text(line(GOOD) + "\n", encoding="utf-8")
    cfg, out = config(train_data=str(train), eval_data=str(bad))
    assert_refused(capsys, ["train", "--config", cfg], "eval.jsonl:2:", "does not end with the tutor",
                   nothing_in=[out])


def test_missing_data_file(capsys, config, tmp_path):
    cfg, out = config(train_data=str(tmp_path / "typo.jsonl"))
    assert_refused(capsys, ["train", "--config", cfg], "typo.jsonl", "not a shipped split",
                   nothing_in=[out])


# --- 2. configs ---------------------------------------------------------------------------
BAD_CONFIGS = {
    # name: (keys, what the message must say)
    "unknown_key": ({"learning_rat": 1e-4}, "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    "wrong_type": ({"batch_size": "eight"}, "key 'batch_size': 'eight' is a str, expected int"),
    "list_for_a_number": ({"epochs": [1, 2]}, "key 'epochs'"),
    "negative_rank": ({"lora_r": -8}, "key 'lora_r': -8 must be a positive rank"),
    "zero_batch": ({"batch_size": 0}, "key 'batch_size': 0 must be a positive"),
    "zero_learning_rate": ({"learning_rate": 0}, "key 'learning_rate'"),
    "dropout_one": ({"lora_dropout": 1.0}, "key 'lora_dropout'"),
    "bits_3": ({"bits": 3}, "key 'bits': 3: use 4 (QLoRA), 8 or 16"),
    "compute_dtype_fp64": ({"compute_dtype": "fp64"}, "key 'compute_dtype': 'fp64'"),
    "max_steps_zero": ({"max_steps": 0}, "key 'max_steps'"),
    "memory_4GB": ({"gpu_budgets": ["4GB"]}, "key 'gpu_budgets[0]': '4GB' is not a size (did you mean '4GiB'?"),
    "memory_4_gib": ({"gpu_budgets": ["4GiB", "4 gib"]}, "key 'gpu_budgets[1]': '4 gib'"),
    "memory_negative": ({"gpu_budgets": ["-1GiB"]}, "key 'gpu_budgets[0]': '-1GiB' must be positive"),
    "memory_lots": ({"gpu_budgets": ["lots"]}, "key 'gpu_budgets[0]': 'lots' is not a size"),
    "gpu_index_not_a_number": ({"gpu_budgets": {"first": "4GiB"}}, "'first' is not a GPU index"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_value_names_the_key(capsys, config, name):
    keys, says = BAD_CONFIGS[name]
    cfg, out = config(line(GOOD), **keys)
    assert_refused(capsys, ["train", "--config", cfg], "config.yaml: ", says, nothing_in=[out])


def test_zero_rank_through_set(capsys, config):
    cfg, out = config(line(GOOD))
    assert_refused(capsys, ["train", "--config", cfg, "--set", "lora_r=0"],
                   "key 'lora_r': 0 must be a positive rank", nothing_in=[out])


@pytest.mark.parametrize("pair,says", [("max_steps", "write key=value"),
                                       ("banned=[oops", "not valid YAML; quote it")])
def test_bad_set_override(capsys, config, pair, says):
    cfg, out = config(line(GOOD))
    assert_refused(capsys, ["train", "--config", cfg, "--set", pair], f"--set '{pair}'", says,
                   nothing_in=[out])


def test_config_file_that_does_not_exist(capsys, tmp_path):
    assert_refused(capsys, ["train", "--config", tmp_path / "nope.yaml"], "nope.yaml: no such file")


def test_gpu_that_does_not_exist(capsys, config, tiny_gemma2_dir):
    cfg, out = config(line(GOOD), model=tiny_gemma2_dir, placement="balanced",
                      gpu_budgets={0: "1GiB", 99: "1GiB"})
    assert_refused(capsys, ["train", "--config", cfg], "gpu_budgets puts layers on GPU", "99",
                   "GPU(s) are visible", nothing_in=[out])


@pytest.mark.parametrize("flag,size,says", [("--gpu", "4GB", "did you mean '4GiB'"),
                                            ("--gpu", "4 gib", "'4 gib' is not a size"),
                                            ("--gpu", "-1GiB", "must be positive"),
                                            ("--cpu", "lots", "--cpu: 'lots' is not a size")])
def test_plan_memory_strings(capsys, flag, size, says):
    assert_refused(capsys, ["plan", "--model", "google/gemma-2-2b-jpn-it", f"{flag}={size}"], says)


# --- 3. models and adapters -------------------------------------------------------------------
@pytest.fixture(scope="module")
def not_a_causal_lm(tmp_path_factory):
    from transformers import ViTConfig
    path = tmp_path_factory.mktemp("vit")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32).save_pretrained(path)
    return path


def test_model_that_is_not_a_causal_lm_in_a_config(capsys, config, not_a_causal_lm):
    cfg, out = config(line(GOOD), model=str(not_a_causal_lm))
    assert_refused(capsys, ["train", "--config", cfg], f"model {not_a_causal_lm}",
                   "'vit' model is not a causal language model", "gemma-2-2b-jpn-it",
                   nothing_in=[out])


def test_model_that_is_not_a_causal_lm_in_plan(capsys, not_a_causal_lm):
    assert_refused(capsys, ["plan", "--model", not_a_causal_lm, "--mode", "cpu"],
                   "not a causal language model")


def test_model_folder_without_config(capsys, tmp_path):
    (tmp_path / "weights").mkdir()
    assert_refused(capsys, ["chat", "--model", tmp_path / "weights", "--prompt", "hi"],
                   "the folder has no config.json", "save_pretrained")


def test_model_folder_that_does_not_exist(capsys, tmp_path):
    assert_refused(capsys, ["chat", "--model", tmp_path / "nope", "--prompt", "hi"],
                   "no such folder")


@pytest.fixture(scope="module")
def adapter_for_other_base(tmp_path_factory, tiny_gemma2_dir):
    """A LoRA adapter trained on a tiny Gemma 2 with hidden size 48 (tiny_gemma2_dir has 64)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import tiny_gemma2_config
    cfg = tiny_gemma2_config()
    cfg.hidden_size, cfg.head_dim = 48, 12
    base_dir = tmp_path_factory.mktemp("other_base")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(path)
    (path / "socratic_lora.json").write_text(json.dumps({"base": str(base_dir)}))
    return path, base_dir


def test_adapter_made_for_another_base_in_chat(capsys, adapter_for_other_base, tiny_gemma2_dir):
    adapter, base = adapter_for_other_base
    msg = assert_refused(capsys, ["chat", "--model", tiny_gemma2_dir, "--adapter", adapter,
                                  "--prompt", "hi"],
                         f"adapter {adapter} does not fit {tiny_gemma2_dir}", "q_proj",
                         f"--model {base}")
    assert "48" in msg and "64" in msg


def test_adapter_made_for_another_base_in_merge(capsys, adapter_for_other_base, tiny_gemma2_dir,
                                                tmp_path):
    adapter, _ = adapter_for_other_base
    assert_refused(capsys, ["merge", "--adapter", adapter, "--model", tiny_gemma2_dir,
                            "--out", tmp_path / "merged"], "does not fit",
                   nothing_in=[tmp_path / "merged"])


def test_adapter_folder_without_adapter_config(capsys, tmp_path, tiny_gemma2_dir):
    (tmp_path / "runs").mkdir()
    assert_refused(capsys, ["chat", "--model", tiny_gemma2_dir, "--adapter", tmp_path / "runs",
                            "--prompt", "hi"], "no adapter_config.json", "runs/NAME/adapter")


# --- 4. eval options ---------------------------------------------------------------------------
def test_eval_limit_zero(capsys, tmp_path):
    assert_refused(capsys, ["eval", "--limit", "0", "--out", tmp_path / "ev"],
                   "--limit 0: must be a positive number", nothing_in=[tmp_path / "ev"])


def test_eval_out_is_a_file(capsys, tmp_path):
    (tmp_path / "ev").write_text("notes")
    assert_refused(capsys, ["eval", "--out", tmp_path / "ev"], "is a file")
    assert (tmp_path / "ev").read_text() == "notes"


# --- the real process: exit status 2 and a clean stderr ---------------------------------------
def test_real_process_exits_2_without_traceback(config):
    cfg, out = config(BAD_FILES["shift_jis_bytes"][0])
    proc = subprocess.run([sys.executable, "-m", "socratic_lora.cli", "train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("socratic-lora train: error: ") and "d.jsonl:2: not UTF-8" in last
    assert not out.exists()


def test_unexpected_errors_are_one_line_too(capsys, monkeypatch):
    """A bug (not an error we raise on purpose) still gives one line, with a debug hint."""
    import socratic_lora.placement as placement

    def boom(*a, **k):
        raise TypeError("something\nwent wrong")
    monkeypatch.setattr(placement, "plan_placement", boom)
    msg = assert_refused(capsys, ["plan", "--model", "google/gemma-2-2b-jpn-it", "--mode", "cpu"],
                         "something went wrong", "SOCRATIC_LORA_DEBUG=1")
    assert "TypeError" in msg
