"""Train a LoRA adapter with transformers' Trainer, from one YAML config.

    socratic-lora train --config demo            # offline default on the CPU (lesson 06)
    socratic-lora train --config colab_t4 --resume
    accelerate launch --num_processes 2 -m socratic_lora.cli train --config kaggle_2xt4_ddp

One code path for the CPU, one GPU, `balanced` over several GPUs and data parallel under
`accelerate launch`. Writes the adapter, checkpoints, and report.{json,md} with loss.png.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from .lora import LoraSettings, apply_lora, trainable_report
from .quant import QuantSettings, compute_dtype


@dataclass
class TrainSettings:
    # Model
    model: str = "default"            # "default" = offline Gemma 3 270M; or a hub id / local folder
    bits: int = 16                    # 4 = QLoRA (least memory), 8, or 16 (fastest where it fits)
    compute_dtype: str = "auto"       # auto: bf16 on A100/H100 and CPU, fp16 on T4; or float32
    placement: str = "auto"           # auto | cpu | single | balanced | data_parallel
    gpu_budgets: list | None = None   # per-GPU weight budgets, e.g. ["4GiB", "4GiB"]; None = free memory
    allow_offload: bool = False       # let layers that do not fit go to the CPU (slow); off = refuse
    # LoRA
    lora_r: int = 16                  # rank: more capacity and memory as it grows
    lora_alpha: int = 32              # update scale alpha/r; keep alpha = 2r
    lora_dropout: float = 0.1         # regularisation for small data; 0.0 is faster
    lora_targets: str | list = "attention"  # attention | mlp | all-linear | list of layer names
    gradient_checkpointing: bool = True     # recompute activations: less memory, ~30 % slower.
                                      # mode speed/memory: the preset picks the layers (speed:
                                      # none, memory: all); false turns it off in every mode
    mode: str = "reference"           # reference | speed | memory: socratic_lora.fast (docs/performance.md)
    # Data
    train_data: str = "train"         # shipped split name, a .jsonl/.csv/.tsv/.json/.parquet,
                                      # or a folder of them (its train split)
    eval_data: str | None = "eval"    # same (a folder: its test or validation split); None = none
    prompt_format: str = "gemma"      # gemma (turn format) | instruction (### 指示 / ### 応答)
    max_length: int = 1024            # tokens per example
    length_policy: str = "truncate"   # truncate at a turn boundary | drop the example
    packing: bool = False             # several examples per row, each attending only to
                                      # itself: little padding, one shape (prepare.pack_examples)
    pack_length: int | None = None    # tokens per packed row; None = max_length. Rows of about
                                      # twice the mean example fill well (95 % for ours at 1024)
    min_japanese: float | None = None # keep examples at least this share Japanese (0.6 in the write-up)
    min_char_count: int | None = None # drop examples with characters rarer than this (20)
    banned: list = field(default_factory=list)  # drop examples containing these strings
    # Training
    output_dir: str = "runs/demo"     # adapter, checkpoints and report go here
    epochs: float = 1.0               # passes over the training data
    max_steps: int = -1               # stop after this many steps (-1 = use epochs)
    batch_size: int = 8               # per device; lower it on out-of-memory
    grad_accum: int = 1               # effective batch = batch_size * grad_accum * GPUs
    learning_rate: float = 2e-4       # LoRA tolerates 1e-4 .. 1e-3
    lr_scheduler: str = "cosine"      # cosine | linear | constant
    warmup: float = 0.03              # warm-up steps, or a share of all steps if below 1
    weight_decay: float = 0.0
    optimizer: str = "adamw_torch"    # adamw_torch | paged_adamw_8bit (less memory, needs CUDA)
    logging_steps: int = 5
    save_steps: int = 50              # checkpoint every N steps (resume with --resume)
    save_total_limit: int = 2         # keep the newest N checkpoints
    eval_steps: int | None = None     # evaluate every N steps; None = at the end
    neftune_alpha: float | None = None  # NEFTune embedding noise (5 in the competition write-up)
    seed: int = 42
    report_to: str = "none"           # none | tensorboard | wandb (if installed)


def _config_path(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"config {p}: no such file")
        return p
    shipped = files("socratic_lora").joinpath(f"configs/{name_or_path}.yaml")
    if not shipped.is_file():
        names = sorted(x.name[:-5] for x in files("socratic_lora").joinpath("configs").iterdir()
                       if x.name.endswith(".yaml"))
        raise FileNotFoundError(f"config {name_or_path!r}: not a file and not a shipped config "
                                f"({', '.join(names)})")
    return Path(str(shipped))


# What a key that may be None holds otherwise (an example value of its type).
_NULLABLE_EXAMPLES = {"eval_data": "eval", "pack_length": 2048, "min_japanese": 0.6,
                      "min_char_count": 20, "eval_steps": 50, "neftune_alpha": 5.0}


def _as_float(value):
    """YAML 1.1 reads 2e-4 (no dot) as a string: accept a string float() reads, like 2e-4."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def _check_type(key, value, default, where):
    if value is None:
        return value
    if default is None:
        default = _NULLABLE_EXAMPLES.get(key)
        if default is None:          # gpu_budgets: checked by check_values
            return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        value = _as_float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif key == "lora_targets":
        ok = isinstance(value, str) or (isinstance(value, list) and value
                                        and all(isinstance(x, str) and x for x in value))
        default = "['q_proj', 'v_proj']"
    elif key == "banned":
        ok = isinstance(value, list) and all(isinstance(x, str) and x for x in value)
        default = ["禁止語"]
    else:
        ok = isinstance(value, type(default))
    if not ok:
        expected = "a list of non-empty strings" if key in ("lora_targets", "banned") \
            else type(default).__name__
        raise ValueError(f"{where}: key '{key}': {value!r} is a {type(value).__name__}, "
                         f"expected {expected} like {default!r}")
    return value


def load_settings(name_or_path, **overrides) -> TrainSettings:
    """Read a YAML config (a shipped name like 'demo', or a path) into TrainSettings."""
    path = _config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected 'key: value' lines, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(TrainSettings)}
    nullable = {name for name, f in known.items() if "None" in str(f.type)}   # `int | None`
    for key, value in overrides.items():
        if value is None and key in known and key not in nullable:
            raise ValueError(f"override {key}=None (--set {key}= with no value, or a None "
                             f"argument): give a value like {getattr(TrainSettings(), key)!r}")
    raw.update(overrides)         # an override of None sets None (eval_data=None: no evaluation)
    defaults = TrainSettings()
    for key, value in raw.items():
        # an override (--set key=value, or a keyword argument) is named as such, not as a
        # line of the YAML file
        where = f"override {key}={value!r}" if key in overrides else str(path)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"{where}: unknown key '{key}'{hint}; see TrainSettings for the keys")
        if value is None and key not in nullable:
            raise ValueError(f"{path}: key '{key}' has no value (an empty 'key:' line or null); "
                             f"give one like {getattr(defaults, key)!r}, or remove the line "
                             "to use that default")
        raw[key] = _check_type(key, value, getattr(defaults, key), where)
    s = TrainSettings(**raw)
    check_values(s, str(path) if not overrides else f"{path} with overrides "
                 f"{', '.join(f'{k}={v!r}' for k, v in overrides.items())}")
    return s


def check_values(s: TrainSettings, where: str) -> None:
    """Refuse values a run would only trip over later (after minutes of model loading):
    ranges, choices and memory sizes, each error naming the key and a valid example."""
    from .placement import parse_memory

    def bad(key, problem):
        raise ValueError(f"{where}: key '{key}': {problem}")

    if s.lora_r <= 0:
        bad("lora_r", f"{s.lora_r} must be a positive rank (e.g. 16)")
    if s.placement not in ("auto", "cpu", "single", "balanced", "data_parallel"):
        bad("placement", f"{s.placement!r}: use auto, cpu, single, balanced or data_parallel")
    if s.prompt_format not in ("gemma", "instruction"):
        bad("prompt_format", f"{s.prompt_format!r}: use gemma or instruction")
    if s.bits not in (4, 8, 16):
        bad("bits", f"{s.bits}: use 4 (QLoRA), 8 or 16")
    if s.compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
        bad("compute_dtype", f"{s.compute_dtype!r}: use auto, bfloat16, float16 or float32")
    if s.length_policy not in ("truncate", "drop"):
        bad("length_policy", f"{s.length_policy!r}: use truncate or drop")
    if s.mode not in ("reference", "speed", "memory"):
        bad("mode", f"{s.mode!r}: use reference, speed or memory")
    for key, choices in _trainer_choices().items():
        value = getattr(s, key)
        names = [x.strip() for x in value.split(",")] if key == "report_to" else [value]
        wrong = [x for x in names if x not in choices]
        if wrong:
            close = difflib.get_close_matches(wrong[0], choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            bad(key, f"{wrong[0]!r} is not one of transformers' choices{hint}: "
                f"{', '.join(choices)}")
    for key in ("lora_alpha", "batch_size", "grad_accum", "max_length", "logging_steps",
                "save_steps", "save_total_limit"):
        if getattr(s, key) <= 0:
            bad(key, f"{getattr(s, key)} must be a positive whole number")
    if s.eval_steps is not None and s.eval_steps <= 0:
        bad("eval_steps", f"{s.eval_steps} must be a positive number of steps, or null (at the end)")
    if s.min_japanese is not None and not 0 <= s.min_japanese <= 1:
        bad("min_japanese", f"{s.min_japanese} is a share of the characters: give 0..1, e.g. 0.6")
    if s.min_char_count is not None and s.min_char_count < 1:
        bad("min_char_count", f"{s.min_char_count}: give a count of at least 1, e.g. 20")
    if s.neftune_alpha is not None and not s.neftune_alpha > 0:
        bad("neftune_alpha", f"{s.neftune_alpha} must be positive (e.g. 5), or null (off)")
    if s.pack_length is not None:
        if isinstance(s.pack_length, bool) or not isinstance(s.pack_length, int) \
                or s.pack_length < s.max_length:
            bad("pack_length", f"{s.pack_length!r}: give a whole number of tokens of at least "
                f"max_length ({s.max_length}), e.g. {2 * s.max_length}; or leave it out "
                "(rows of max_length)")
        if not s.packing:
            bad("pack_length", "is set but packing is false: set packing: true, or remove it")
    if s.packing and s.neftune_alpha:
        # NEFTune scales its noise by 1 / sqrt(sequence length x hidden size), and transformers
        # takes a packed row of several examples for one sequence: each example would get
        # sqrt(row / example length) times less noise than NEFTune intends (about 1.9x less
        # for our dialogues in rows of 1024).
        bad("neftune_alpha", f"{s.neftune_alpha}: NEFTune's noise is scaled by the sequence "
            "length, and a packed row holds several examples; use packing: false with NEFTune, "
            "or remove neftune_alpha")
    if not s.learning_rate > 0:
        bad("learning_rate", f"{s.learning_rate} must be positive (LoRA: 1e-4 .. 1e-3)")
    if not 0 <= s.lora_dropout < 1:
        bad("lora_dropout", f"{s.lora_dropout} must be at least 0 and below 1 (e.g. 0.1)")
    if s.max_steps == 0 or s.max_steps < -1:
        bad("max_steps", f"{s.max_steps}: give a positive number of steps, or -1 to use epochs")
    if s.max_steps == -1 and not s.epochs > 0:
        bad("epochs", f"{s.epochs} must be positive (or set max_steps)")
    if s.warmup < 0:
        bad("warmup", f"{s.warmup} must be 0 or more")
    if not isinstance(s.output_dir, str) or not s.output_dir.strip():
        bad("output_dir", "must be a folder name, e.g. runs/demo")
    budgets = s.gpu_budgets
    if budgets is not None and budgets != "free":
        items = (budgets.items() if isinstance(budgets, dict)
                 else enumerate(budgets) if isinstance(budgets, list) else None)
        if items is None:
            bad("gpu_budgets", f"{budgets!r}: write a list like ['4GiB', '4GiB'] (GPU 0, 1)")
        for gpu, size in items:
            if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
                bad("gpu_budgets", f"{gpu!r} is not a GPU index (0, 1, ...)")
            parse_memory(size, f"{where}: key 'gpu_budgets[{gpu}]'")


def _trainer_choices() -> dict:
    """The names transformers accepts for the scheduler, the optimizer and the loggers."""
    from transformers import SchedulerType
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from transformers.training_args import OptimizerNames
    return {"lr_scheduler": [x.value for x in SchedulerType],
            "optimizer": [x.value for x in OptimizerNames],
            "report_to": ["none", "all", *INTEGRATION_TO_CALLBACK]}


def _placement(s: TrainSettings) -> str:
    import torch
    if s.placement != "auto":
        return s.placement
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return "data_parallel"
    return "single" if torch.cuda.is_available() else "cpu"


def load_for_training(s: TrainSettings):
    """Model (with a fresh LoRA adapter) and tokenizer as the settings describe."""
    if s.mode != "reference":         # the fast path: chunked loss, flex attention, ...
        from .fast import load_for_training as load_fast
        return load_fast(s)
    from .models import default_model_path, load_model

    model_id = str(default_model_path()) if s.model == "default" else s.model
    quant = QuantSettings(bits=s.bits, compute_dtype=s.compute_dtype)
    model, tok = load_model(model_id, quant=quant, mode=_placement(s), gpu_budgets=s.gpu_budgets,
                            allow_offload=s.allow_offload)
    model = apply_lora(model, LoraSettings(r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                                           targets=s.lora_targets,
                                           gradient_checkpointing=s.gradient_checkpointing))
    return model, tok


def read_data(source, prompt_format: str = "gemma", split: str | None = None) -> list[dict]:
    """`prepare.read_source`, refusing a source without examples. `split`: the split of a
    dataset folder, "train" or "eval" (its test or validation split); None refuses a folder
    with several splits."""
    from .data import DataError
    from .prepare import read_source

    dialogues = read_source(source, split=split, prompt_format=prompt_format)
    if not dialogues:
        raise DataError(f"{source}: no examples in it; check the file")
    return dialogues


def prepare_data(s: TrainSettings, tok, source, dialogues=None, char_counts=None,
                 role: str | None = None):
    """Read, filter and tokenise one data source; returns (examples, lines for the report).
    `dialogues`: the source already read (train() validates the files before loading a model).
    `char_counts`: the training data's character counts for min_char_count; None: counted
    here on s.train_data (read again when `source` is another source, e.g. the eval data), so
    evaluation examples are judged by the training data's characters, not by their own.
    `role`: "train" or "eval" (None: "train" when `source` is s.train_data); it picks the
    split of a dataset folder and whether the characters are counted here."""
    from .prepare import (char_counts as count_chars, filter_banned, filter_japanese,
                          filter_rare_chars, tokenize_examples)

    is_train = role == "train" if role else source == s.train_data
    if dialogues is None:
        dialogues = read_data(source, s.prompt_format, split="train" if is_train else "eval")
    steps = [f"{source}: {len(dialogues)} examples read"]
    if s.min_japanese is not None:
        dialogues, r = filter_japanese(dialogues, s.min_japanese)
        steps.append(str(r))
    if s.min_char_count is not None:
        if char_counts is None and not is_train:
            train_dialogues = read_data(s.train_data, s.prompt_format, split="train")
            if s.min_japanese is not None:     # counted where the training data counts them
                train_dialogues, _ = filter_japanese(train_dialogues, s.min_japanese)
            char_counts = count_chars(train_dialogues)
        dialogues, r = filter_rare_chars(dialogues, s.min_char_count, char_counts)
        steps.append(str(r))
    if s.banned:
        dialogues, r = filter_banned(dialogues, s.banned)
        steps.append(str(r))
    examples, r = tokenize_examples(tok, dialogues, s.max_length, s.length_policy, s.prompt_format)
    steps.append(str(r))
    if not examples:
        raise ValueError(f"{source}: no example left after filtering; see: " + "; ".join(steps))
    return examples, steps


def training_arguments(s: TrainSettings, model, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available() and _placement(s) != "cpu"
    # Mixed precision: bf16 or fp16 autocast on GPUs; on the CPU "auto" means bf16 autocast
    # over float32 weights (1.29x float32 on a 2-core AMX Xeon, same loss: bench/cpu_demo.py).
    dtype = compute_dtype(s.compute_dtype)
    kwargs = dict(
        output_dir=s.output_dir, per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        num_train_epochs=s.epochs, max_steps=s.max_steps, learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup, weight_decay=s.weight_decay,
        optim=s.optimizer, logging_steps=s.logging_steps, save_strategy="steps",
        save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        eval_strategy=("steps" if s.eval_steps else "no") if has_eval else "no",
        eval_steps=s.eval_steps, seed=s.seed, data_seed=s.seed, report_to=s.report_to,
        bf16=dtype == torch.bfloat16, fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu, remove_unused_columns=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # LoRA: every adapter weight gets a gradient
        disable_tqdm=False, logging_first_step=True, neftune_noise_alpha=s.neftune_alpha,
        # Trainer's own inf/NaN filter reads the loss on the host after every backward, a
        # full GPU synchronisation a step that stops the host from queueing the next step
        # while the GPU works; ReliableTrainer's check (below) stops at a non-finite loss
        # without waiting for the backward.
        logging_nan_inf_filter=False,
    )
    if on_gpu:
        # Batches go to the GPU from pinned memory without a synchronisation (a blocking
        # copy waits for everything queued on the GPU, the previous step's backward too).
        kwargs.update(dataloader_pin_memory=True, accelerator_config={"non_blocking": True})
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    # Batches of similar length (little padding); packed rows are all about pack_length long.
    if "train_sampling_strategy" in names:   # transformers >= 5.2x
        kwargs["train_sampling_strategy"] = "random" if s.packing else "group_by_length"
    else:
        kwargs["group_by_length"] = not s.packing
    args = TrainingArguments(**kwargs)
    _ = args.device              # resolve devices now, so the override below sticks
    if args.world_size == 1:
        # With several GPUs visible but one process, Trainer believes it runs DataParallel:
        # it multiplies the reported loss by n_gpu and divides the token count by it. The
        # model is one copy (single) or split (balanced), never replicated: one "GPU" it is.
        args._n_gpu = 1
    return args


def save_atomically(save, target: Path) -> None:
    """Call save(tmp) then rename tmp to target: a kill mid-save never leaves a half adapter.

    A save that fails (or is interrupted) removes its temporary folder and leaves `target`
    as it was; an old `target` is renamed aside until the new one is in place, so a whole
    folder exists at every moment (a hard kill can leave the hidden .tmp/.old folder)."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(tmp, target)
        return
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)   # the new folder is in place whatever happens here


# --- reliability: atomic checkpoints, resume from complete ones only, stop on inf/NaN ---------
CHECKPOINT_MARKER = "socratic_lora_complete.json"   # written last, inside the staging folder
STAGING = ".checkpoint-in-progress"                  # checkpoints are written here, then renamed
OUR_FILES = ("adapter", "report.json", "report.md", "loss.png", STAGING)


class TrainingDiverged(RuntimeError):
    """The loss became inf or NaN; training stopped before the optimizer used it."""


def complete_checkpoints(out) -> list[Path]:
    """checkpoint-N folders in `out` that carry the completion marker, oldest first.
    A folder without it (a save that was cut off, or not written by us) is never resumed."""
    out = Path(out)
    found = []
    for p in out.glob("checkpoint-*") if out.is_dir() else []:
        step = p.name.split("-", 1)[1]
        if step.isdigit() and p.is_dir() and (p / CHECKPOINT_MARKER).is_file():
            found.append((int(step), p))
    return [p for _, p in sorted(found)]


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> str | None:
    """Decide what a run may do with `out`; returns the checkpoint to resume from (or None).

    Without --resume or --overwrite a folder that already holds files is refused. --overwrite
    removes only what a run writes (checkpoints, adapter, report); other files stay."""
    shutil.rmtree(out / STAGING, ignore_errors=True)   # a save cut off by a kill
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume:
        done = complete_checkpoints(out)
        if not done:
            partial = [e for e in entries if e.startswith("checkpoint-")]
            extra = (f" ({', '.join(partial)} incomplete: a save was cut off)" if partial else "")
            raise FileNotFoundError(f"--resume: no checkpoint to resume from (no complete "
                                    f"checkpoint-* folder in {out}{extra}); start without --resume")
        return str(done[-1])
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        what = ("checkpoints" if any(e.startswith("checkpoint-") for e in entries)
                else "files")
        raise FileExistsError(f"{out} already holds {what} ({shown}): pass --resume to continue, "
                              "--overwrite to replace the run, or choose another output_dir")
    if int(os.environ.get("RANK", "0")) != 0:   # under DDP the first process clears the folder
        return None
    for name in entries:
        if name.startswith("checkpoint-") or name in OUR_FILES:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return None


def diverged_message(step: int, value: float, s: TrainSettings, out: Path) -> str:
    done = complete_checkpoints(out)
    kept = (f"the last good checkpoint {done[-1]} is intact (resume with --resume after the fix)"
            if done else "no checkpoint was written before it")
    return (f"step {step}: the training loss is {value} (not a finite number); stopped before "
            f"the optimizer used it, {kept}. Likely causes: float16 overflow (a T4 computes in "
            f"float16): lower learning_rate (now {s.learning_rate:g}, try "
            f"{s.learning_rate / 4:g}), or use compute_dtype bfloat16 on an A100/H100 "
            "(float32 on the CPU); or bad data: check the examples of this step "
            "(損失が inf/NaN になりました。学習率を下げるか bf16 を使い、データを確かめてください)")


class LossProbe:
    """A loss value read on the host without waiting for the work queued after it.

    `.item()` on a GPU tensor waits until the GPU has run everything queued so far; after
    `backward()` that is the whole backward pass, and the host, idle meanwhile, then queues
    the next step onto an empty GPU. Here the value is copied to pinned memory right after
    the forward, and `value()` waits for that copy only (an event recorded behind it)."""

    def __init__(self, t):
        if t.device.type == "cuda":
            import torch
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(t.device))
        else:
            self._host, self._done = t, None

    def value(self):
        if self._done is not None:
            self._done.synchronize()
        return self._host


def reliable_trainer_class(base=None):
    """A Trainer subclass that (1) writes each checkpoint-N into a staging folder, marks it
    complete and renames it into place, so a kill during a save never leaves a half
    checkpoint where --resume would look, and (2) stops at the first inf/NaN loss."""
    import torch
    from transformers import Trainer
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:
        rotate_checkpoints = None

    base = base or Trainer

    class ReliableTrainer(base):
        settings: TrainSettings | None = None

        def _save_checkpoint(self, model, trial):
            run_dir = base._get_output_dir(self, trial=trial)
            staging = os.path.join(run_dir, STAGING)
            name = f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self._get_output_dir = lambda trial=None: staging   # super() saves into staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir
            self.accelerator.wait_for_everyone()          # every rank wrote its RNG state
            if self.args.should_save:
                src, dst = os.path.join(staging, name), os.path.join(run_dir, name)
                with open(os.path.join(src, CHECKPOINT_MARKER), "w") as f:
                    json.dump({"step": self.state.global_step, "complete": True}, f)
                if os.path.exists(dst):                     # the same step saved again
                    shutil.rmtree(dst)
                os.replace(src, dst)
                shutil.rmtree(staging, ignore_errors=True)
                if rotate_checkpoints is not None:
                    rotate_checkpoints(run_dir, self.args.save_total_limit,
                                       self.state.best_model_checkpoint, use_mtime=False)
                else:                                       # older transformers 5.x
                    self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
            self.accelerator.wait_for_everyone()

        def evaluation_loop(self, *args, **kwargs):
            # The report's tokens/s counts training tokens: the collator stops counting here.
            collator = self.data_collator
            counting = getattr(collator, "counting", None)
            if counting is not None:
                collator.counting = False
            try:
                return super().evaluation_loop(*args, **kwargs)
            finally:
                if counting is not None:
                    collator.counting = counting

        trained_tokens = 0    # real tokens of the batches trained on (the report's tokens/s)
        _loss_probe = None    # False while training_step waits for compute_loss to set it

        def _probe(self, loss):
            return LossProbe(self.accelerator.gather(loss.detach().float().reshape(1)))  # all ranks stop

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if self._loss_probe is False:          # inside training_step, before backward
                self._loss_probe = self._probe(out[0] if return_outputs else out)
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            pending = getattr(self.data_collator, "pending", None)
            if pending:           # this batch's count (collated in order, one batch ahead)
                self.trained_tokens += pending.popleft()
            self._loss_probe = False
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
                probe = self._loss_probe
            finally:
                self._loss_probe = None
            if not probe:         # a subclass computed the loss some other way
                probe = self._probe(loss)
            every = probe.value()
            if not torch.isfinite(every).all():
                bad = every[~torch.isfinite(every)][0].item()
                raise TrainingDiverged(diverged_message(
                    self.state.global_step + 1, bad, self.settings or TrainSettings(),
                    Path(self.args.output_dir)))
            return loss

        _n_params = None      # (model, parameters without embeddings) for floating_point_ops

        def floating_point_ops(self, inputs):
            """Trainer's estimate (6 x tokens x parameters without embeddings), with the
            parameters counted once: transformers recounts them every step (several ms of
            host time for a 26-layer 4-bit model, time in which the GPU runs dry once the
            host is the slower side, as with offloaded checkpoints)."""
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            if self._n_params is None or self._n_params[0] is not self.model:
                self._n_params = (self.model, self.model.num_parameters(exclude_embeddings=True))
            return 6 * inputs[main].numel() * self._n_params[1]

    return ReliableTrainer


# Model families whose packed batches tests/test_packing.py and test_packing_review.py
# compare with their examples run one by one (transformers 5.x).
PACKING_CHECKED = {"gemma2", "gemma3_text", "llama", "qwen2", "gpt_neox"}


def check_packing(model) -> None:
    """Refuse packing for a model that lets packed examples see each other.

    transformers builds the per-example mask from restarting position ids only in the models
    whose mask functions receive them (Gemma, Llama, Qwen, GPT-NeoX, ...); others (OPT, Bloom,
    Falcon, ...) would silently train every example on its neighbours. Two tokens packed twice
    ([a b a b], positions [0 1 0 1]) must give the second pair the outputs of [a b] alone, much
    closer than the same tokens with positions [0 1 2 3] (which do see each other)."""
    import torch

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) in PACKING_CHECKED:
        return    # checked in tests/test_packing*.py; the probe would compile extra graphs
    emb = model.get_input_embeddings()
    device, vocab = emb.weight.device, emb.num_embeddings
    a, b = min(10, vocab - 2), min(11, vocab - 1)
    ids = torch.tensor([[a, b, a, b]], device=device)

    def logits(n, pos):
        out = model(input_ids=ids[:, :n], position_ids=torch.tensor([pos], device=device),
                    use_cache=False)
        return out.logits[0, -2:].float()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = logits(2, [0, 1])
            packed = logits(4, [0, 1, 0, 1])
            mixed = logits(4, [0, 1, 2, 3])
    finally:
        model.train(was_training)
    d_packed = (packed - alone).abs().max().item()
    d_mixed = (mixed - alone).abs().max().item()
    if not d_packed <= 0.1 * d_mixed:
        name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
        raise ValueError(
            f"packing: {name} lets packed examples see each other (outputs differ by "
            f"{d_packed:.3g} from an example alone; {d_mixed:.3g} when they are not separated): "
            "its attention mask ignores restarting position ids. Set packing: false for this "
            "model. / このモデルはパッキングに対応していません。packing: false にしてください。")


def train(s: TrainSettings, resume: bool = False, callbacks=None, overwrite: bool = False) -> dict:
    """Run one training; returns the report dict (also written to output_dir).
    `callbacks`: extra transformers TrainerCallbacks (logging, early stopping, ...).
    `resume`: continue from the newest complete checkpoint; `overwrite`: replace an earlier
    run in output_dir (without either, a folder that holds files is refused)."""
    import datasets
    import torch
    from transformers import set_seed

    from .prepare import Collator
    from .report import hardware, peak_memory_gib, versions, write_report

    set_seed(s.seed)
    out = Path(s.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file; choose a folder name")
    # Bad data fails here, in seconds, not after the model has loaded; nothing is written yet.
    read = {role: read_data(src, s.prompt_format, split=role)
            for role, src in (("train", s.train_data), ("eval", s.eval_data)) if src}
    last = check_output_dir(out, resume, overwrite)
    model, tok = load_for_training(s)
    train_ex, steps = prepare_data(s, tok, s.train_data, read["train"], role="train")
    eval_ex = None
    if s.eval_data:
        eval_ex, eval_steps = prepare_data(s, tok, s.eval_data, read["eval"], role="eval")
        steps += eval_steps
    n_train = len(train_ex)
    if s.packing:
        from .prepare import PackedCollator, pack_examples
        check_packing(model)
        length = s.pack_length or s.max_length
        train_ex, packed = pack_examples(train_ex, length)
        steps.append(str(packed))
        collator = PackedCollator(tok.pad_token_id, length=length)
    else:
        # The fast path trains right-padded batches without a mask (prepare.Collator).
        collator = Collator(tok.pad_token_id, causal_only=s.mode != "reference")
    args = training_arguments(s, model, eval_ex is not None)
    trainer = reliable_trainer_class()(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(train_ex),
        eval_dataset=datasets.Dataset.from_list(eval_ex) if eval_ex else None,
        data_collator=collator, processing_class=tok, callbacks=callbacks)
    trainer.settings = s
    out.mkdir(parents=True, exist_ok=True)     # only now: a run refused above leaves nothing
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    wall = time.perf_counter() - t0
    eval_loss = trainer.evaluate()["eval_loss"] if eval_ex else None
    if not trainer.is_world_process_zero():
        return {}
    adapter = out / "adapter"
    from .models import is_local
    # A local base is recorded as an absolute path: 'models/base' would mean another folder
    # (or a hub id) to a command run from elsewhere.
    base = (str(Path(s.model).expanduser().resolve()) if s.model != "default" and is_local(s.model)
            else s.model)
    save_atomically(lambda p: (model.save_pretrained(p), tok.save_pretrained(p),
                               (p / "socratic_lora.json").write_text(json.dumps(
                                   {"base": base, "prompt_format": s.prompt_format}))),
                    adapter)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rows_per_s = result.metrics.get("train_samples_per_second")
    rep = trainable_report(model)
    report = {
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch or 0.0,
        "wall_time_s": round(wall, 1), "final_loss": losses[-1] if losses else None,
        "mean_loss": result.training_loss, "eval_loss": eval_loss,
        # Trainer counts rows; a packed row holds n_train / rows examples on average
        "samples_per_s": rows_per_s * n_train / len(train_ex) if s.packing and rows_per_s
        else rows_per_s,
        **({"packed_rows_per_s": rows_per_s} if s.packing else {}),
        "tokens_per_s": trainer.trained_tokens * args.world_size / wall,
        "peak_memory_gib": peak_memory_gib(), "trainable": rep["trainable"],
        "trainable_percent": rep["percent"],
        "adapter_mb": (adapter / "adapter_model.safetensors").stat().st_size / 1e6,
        "examples": {"train": n_train, "eval": len(eval_ex or []),
                     **({"packed_rows": len(train_ex)} if s.packing else {})},
        "data_steps": steps, "resumed_from": last, "settings": asdict(s),
        "versions": versions(), "hardware": hardware(),
    }
    write_report(report, trainer.state.log_history, out)
    return report
