"""Generation: sampling presets, multi-turn chat that fits the context window, streaming,
and batched generation with left padding for evaluation (lesson 07).

    from socratic_lora.generate import load_chat_model, reply
    model, tok = load_chat_model("default", adapter="runs/demo/adapter")
    print(reply(model, tok, [{"role": "user", "content": "答えだけ教えて"}], preset="greedy"))
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .chat import pieces

# Named decoding settings. "report": the source training report's sampling; "competition":
# the write-up's repetition penalty on greedy decoding; "greedy": deterministic, for evaluation.
# no_repeat_ngram_size is applied to the reply only and never bans the stop tokens
# (ReplyNoRepeatNGram): transformers' own setting also counts the prompt, so a tutor could
# neither quote the learner nor end its turn after "？" once the learner's turn ended so.
PRESETS = {
    "report": dict(do_sample=True, temperature=0.7, top_p=0.75, top_k=40,
                   no_repeat_ngram_size=2, max_new_tokens=256),
    "competition": dict(do_sample=False, repetition_penalty=1.1, max_new_tokens=256),
    "greedy": dict(do_sample=False, max_new_tokens=128),
}


def stop_ids(tok) -> list[int]:
    """Generation stops on <eos> and on <end_of_turn> (Gemma's end of a turn)."""
    ids = [tok.eos_token_id]
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end, int) and end != tok.unk_token_id:
        ids.append(end)
    return ids


def adapter_base(adapter) -> str | None:
    """The base an adapter was trained on, as training recorded it (socratic_lora.json), else
    peft's adapter_config.json; None when neither says."""
    adapter = Path(adapter)
    for name, key in (("socratic_lora.json", "base"),
                      ("adapter_config.json", "base_model_name_or_path")):
        f = adapter / name
        if f.is_file():
            try:
                base = json.loads(f.read_text("utf-8")).get(key)
            except (ValueError, AttributeError):
                raise ValueError(f"{f}: not a valid JSON object; re-save the adapter") from None
            if base:
                return str(base)
    return None


def check_adapter(adapter, base_config=None, base_id="the base") -> None:
    """Refuse an adapter folder that is missing, pickle-only, or made for another base.

    Only adapter_model.safetensors is loaded (a pickled adapter_model.bin can run code when
    loaded). With `base_config`, every LoRA matrix's shape is compared with the layer it
    attaches to, on an empty (meta) model: a mismatch is reported before any weight loads."""
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter {adapter}: no such folder; give the folder training "
                                "wrote (runs/NAME/adapter)")
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {adapter}: no adapter_config.json; give the adapter "
                                "folder that training wrote (runs/NAME/adapter)")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        pickle = " (only adapter_model.bin, a pickle file)" if (adapter / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"adapter {adapter}: no adapter_model.safetensors{pickle}; this "
                                "package loads safetensors only, because a .bin file can run code "
                                "when it is loaded: re-save it with save_pretrained(folder) from a "
                                "source you trust")
    if base_config is None:
        return
    from safetensors import safe_open

    from .placement import empty_model

    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{weights}: not a readable safetensors file ({e}); re-save the "
                         "adapter") from None
    modules = dict(empty_model(base_config).named_modules())
    made_for = adapter_base(adapter)
    hint = (f"; it was trained on {made_for}: load it with that base (--model {made_for})"
            if made_for else "; load it with the base it was trained on")
    for key, shape in sorted(shapes.items()):
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(part):
                continue
            name = key[:-len(part)].removeprefix("base_model.model.")
            layer = modules.get(name)
            if layer is None:
                raise ValueError(f"adapter {adapter} does not fit {base_id}: the base has no "
                                 f"layer '{name}'{hint}")
            want = getattr(layer, "in_features" if dim == 1 else "out_features", None)
            if want is not None and shape[dim] != want:
                side = "inputs" if dim == 1 else "outputs"
                raise ValueError(f"adapter {adapter} does not fit {base_id}: layer '{name}' has "
                                 f"{want} {side} in the base, {shape[dim]} in the adapter{hint}")


PROMPT_FORMATS = ("gemma", "instruction")


def recorded_prompt_format(folder) -> str | None:
    """The prompt format training recorded for an adapter (socratic_lora.json, copied into a
    merged folder); None when nothing is recorded (adapters from before it was recorded,
    other tools, plain models)."""
    f = Path(folder) / "socratic_lora.json"
    if not f.is_file():
        return None
    try:
        fmt = json.loads(f.read_text("utf-8")).get("prompt_format")
    except (ValueError, AttributeError):
        raise ValueError(f"{f}: not a valid JSON object; re-save the adapter") from None
    if fmt is not None and fmt not in PROMPT_FORMATS:
        raise ValueError(f"{f}: prompt_format {fmt!r} is not one of {', '.join(PROMPT_FORMATS)}")
    return fmt


def model_prompt_format(model) -> str:
    """The format `model` was trained to read (load_chat_model sets it); gemma otherwise."""
    return getattr(model, "socratic_prompt_format", None) or "gemma"


def load_chat_model(model="default", adapter=None, prompt_format: str | None = None,
                    **load_kwargs):
    """A base model, a base plus a LoRA adapter, or a merged folder, ready to generate.

    With an adapter and model="default", the base is taken from the adapter's record.
    `prompt_format` (gemma | instruction): how reply/reply_batch write prompts for it; None
    takes what training recorded with the adapter (or the merged folder), else gemma. It is
    kept on the returned model (`model_prompt_format`)."""
    from .models import default_model_path, get_hf_token, is_local, load_config, load_model

    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format={prompt_format!r}: use {' or '.join(PROMPT_FORMATS)}")

    if adapter is not None:
        check_adapter(adapter)
        if model == "default":
            record = Path(adapter) / "socratic_lora.json"
            if record.exists():
                model = adapter_base(adapter) or model
    model_id = str(default_model_path()) if model == "default" else model
    if adapter is not None:
        token = None if is_local(model_id) else get_hf_token()
        check_adapter(adapter, load_config(model_id, token=token), model_id)
    if is_local(model_id):
        model_id = str(Path(model_id).expanduser())     # '~/merged': its record is read too
    if prompt_format is None:
        source = adapter if adapter is not None else model_id if is_local(model_id) else None
        prompt_format = recorded_prompt_format(source) if source is not None else None
    m, tok = load_model(model_id, **load_kwargs)
    if adapter is not None:
        from peft import PeftModel
        m = PeftModel.from_pretrained(m, adapter)
    m.eval()
    m.config.use_cache = True
    m.socratic_prompt_format = prompt_format or "gemma"
    return m, tok


def context_window(model) -> int:
    return getattr(model.config, "max_position_embeddings", 8192)


def fit_history(tok, messages, max_prompt_tokens: int, prompt_format="gemma") -> list[dict]:
    """Drop the oldest user/assistant exchanges (never the system message or the newest user
    turn) until the prompt fits `max_prompt_tokens`."""
    msgs = list(messages)
    system = [msgs.pop(0)] if msgs and msgs[0]["role"] == "system" else []
    while True:
        text = "".join(p for p, _ in pieces(system + msgs, tok, prompt_format,
                                            add_generation_prompt=True))
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens or len(msgs) <= 1:
            return system + msgs
        msgs = msgs[2:]


def _settings(preset, overrides):
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: use one of {', '.join(PRESETS)}")
    return {**PRESETS[preset], **overrides}


class ReplyNoRepeatNGram:
    """Logits processor: no n-gram of token ids occurs twice in the reply (the tokens after
    the first `start`), and the `keep` ids (the stop tokens) are never banned.

    transformers' `no_repeat_ngram_size` looks at prompt and reply together; in a chat the
    prompt holds the learner's words and "？<end_of_turn>", so the reply could neither quote
    the learner nor end its turn after a question."""

    def __init__(self, size: int, start: int, keep=()):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"no_repeat_ngram_size={size!r}: use a whole number of tokens >= 1")
        self.size, self.start, self.keep = size, start, set(keep)

    def __call__(self, input_ids, scores):
        n = self.size
        for row, ids in enumerate(input_ids[:, self.start:].tolist()):
            if len(ids) < n - 1:
                continue
            tail = tuple(ids[len(ids) - n + 1:]) if n > 1 else ()
            banned = {ids[i + n - 1] for i in range(len(ids) - n + 1)
                      if tuple(ids[i:i + n - 1]) == tail} - self.keep
            if banned:
                scores[row, sorted(banned)] = float("-inf")
        return scores


def _generate_kwargs(gen, tok, prompt_len):
    """`gen` for model.generate, with no_repeat_ngram_size as ReplyNoRepeatNGram."""
    gen = dict(gen)
    size = gen.pop("no_repeat_ngram_size", 0)
    if size:
        from transformers import LogitsProcessorList
        gen["logits_processor"] = LogitsProcessorList(
            [*(gen.pop("logits_processor", None) or []),
             ReplyNoRepeatNGram(size, prompt_len, stop_ids(tok))])
    return gen


def reply(model, tok, messages, preset: str = "greedy", stream: bool = False,
          prompt_format: str | None = None, **overrides) -> str:
    """The tutor's next turn for `messages` (ending with the learner's turn).
    `prompt_format`: None = the model's (`model_prompt_format`: what its adapter was trained on)."""
    from transformers import TextStreamer

    prompt_format = prompt_format or model_prompt_format(model)
    gen = _settings(preset, overrides)
    budget = context_window(model) - gen["max_new_tokens"]
    if budget <= 0:
        raise ValueError(f"max_new_tokens={gen['max_new_tokens']} leaves no room for the prompt "
                         f"in the model's context window ({context_window(model)} tokens); "
                         "ask for fewer new tokens")
    msgs = fit_history(tok, messages, budget, prompt_format)
    text = "".join(p for p, _ in pieces(msgs, tok, prompt_format, add_generation_prompt=True))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    n = ids["input_ids"].shape[1]
    if n > budget:      # fit_history never drops the newest learner turn (or the system)
        raise ValueError(f"the prompt is {n} tokens even with older turns dropped (the system "
                         f"message and the newest learner turn are kept), and {budget} fit before "
                         f"the {gen['max_new_tokens']} new tokens in the context window of "
                         f"{context_window(model)}; shorten that message or the system prompt "
                         "/ 入力が長すぎます")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(**ids, **_generate_kwargs(gen, tok, ids["input_ids"].shape[1]),
                             eos_token_id=stop_ids(tok), pad_token_id=tok.pad_token_id,
                             streamer=streamer)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


_FAST_KEYS = {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens"}


def _fast_decoder(model, gen, fast):
    """socratic_lora.fastgen.FastDecoder for `model` when `fast` asks for it (None: on a CUDA
    GPU, if the settings are ones the CUDA graph implements and the model type is supported)."""
    if fast is False or (fast is None and getattr(model.device, "type", "cpu") != "cuda"):
        return None
    unsupported = set(gen) - _FAST_KEYS
    if unsupported:
        if fast:
            raise ValueError(f"fast=True: FastDecoder does not implement {sorted(unsupported)}; "
                             "use fast=False or another preset")
        return None
    from .fastgen import FastDecoder
    dec = getattr(model, "_socratic_fast_decoder", None)
    if dec is None:
        try:
            dec = FastDecoder(model)
        except NotImplementedError:
            if fast:
                raise
            return None
        model._socratic_fast_decoder = dec
    return dec


def reply_batch(model, tok, conversations, preset: str = "greedy", batch_size: int = 16,
                prompt_format: str | None = None, fast: bool | None = None,
                **overrides) -> list[str]:
    """Replies for many conversations at once, left-padded so every prompt ends where
    generation starts (evaluation runs). `fast`: decode with FastDecoder (one CUDA graph
    per step, 4.5x `generate` at batch 16 on an H100); None uses it on a GPU whenever the
    preset allows (greedy or plain sampling), False never. `prompt_format` as in `reply`."""
    prompt_format = prompt_format or model_prompt_format(model)
    gen = _settings(preset, overrides)
    dec = _fast_decoder(model, gen, fast)
    old_side, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        for i in range(0, len(conversations), batch_size):
            texts = ["".join(p for p, _ in pieces(c, tok, prompt_format, add_generation_prompt=True))
                     for c in conversations[i:i + batch_size]]
            ids = tok(texts, add_special_tokens=False, return_tensors="pt",
                      padding=True).to(model.device)
            if dec is not None:
                new = dec.generate(ids["input_ids"], ids["attention_mask"],
                                   eos_token_id=stop_ids(tok), pad_token_id=tok.pad_token_id,
                                   **gen)
            else:
                with torch.no_grad():
                    gen_ids = model.generate(
                        **ids, **_generate_kwargs(gen, tok, ids["input_ids"].shape[1]),
                        eos_token_id=stop_ids(tok), pad_token_id=tok.pad_token_id)
                new = gen_ids[:, ids["input_ids"].shape[1]:]
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
    return out
