"""LoRA on top of a (possibly 4-bit) base model.

    from socratic_lora import LoraSettings, apply_lora, trainable_report
    model = apply_lora(model, LoraSettings(r=16, alpha=32, targets="attention"))   # lesson 04
    print(trainable_report(model))    # trainable parameters, percent, adapter size in MB

QLoRA is this same function on a model loaded with `QuantSettings(bits=4)`: it then runs
peft's k-bit preparation first. Gradient checkpointing is a setting, not forced.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Named target sets, resolved against the model's own linear layer names.
TARGETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj",      # Gemma, Llama, ...
                  "query_key_value", "dense"],                 # GPT-NeoX (rinna 3.6B)
    "mlp": ["gate_proj", "up_proj", "down_proj", "dense_h_to_4h", "dense_4h_to_h"],
}


@dataclass
class LoraSettings:
    r: int = 16                       # rank of the update; higher learns more, costs memory
    alpha: int = 32                   # scale is alpha / r; keep alpha = 2r when changing r
    dropout: float = 0.1              # regularises small data sets; 0.0 is faster
    targets: str | list = "attention"  # attention | mlp | all-linear | a list of layer names
    bias: str = "none"                # train no biases (the adapter stays small)
    gradient_checkpointing: bool = True  # recompute activations: less memory, ~30 % slower
    use_reentrant: bool = False       # non-reentrant checkpointing works with DDP and LoRA
    modules_to_save: list = field(default_factory=list)  # extra fully trained modules


def _linear_names(model) -> set:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}


def resolve_targets(model, targets) -> list | str:
    """Turn a named target set or a list into the module names present in `model`."""
    present = _linear_names(model)
    if targets == "all-linear":
        return "all-linear"
    if isinstance(targets, str):
        if targets not in TARGETS:
            raise ValueError(f"targets={targets!r}: use attention, mlp, all-linear or a list "
                             "of layer names")
        found = [t for t in TARGETS[targets] if t in present]
        if not found:
            raise ValueError(f"targets={targets!r}: none of {TARGETS[targets]} in this model; "
                             f"its linear layers are {sorted(present)}")
        return found
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"targets: {missing} not found in this model; its linear layers are "
                         f"{sorted(present)}")
    return list(targets)


def lora_config(settings: LoraSettings, model=None):
    """The peft `LoraConfig` for `settings` (targets resolved against `model` if given)."""
    from peft import LoraConfig

    if not isinstance(settings.r, int) or settings.r <= 0:
        raise ValueError(f"lora r={settings.r!r}: the rank must be a positive integer (e.g. 16)")
    if settings.alpha <= 0:
        raise ValueError(f"lora alpha={settings.alpha!r}: must be positive (e.g. 2 * r)")
    if not 0.0 <= settings.dropout < 1.0:
        raise ValueError(f"lora dropout={settings.dropout!r}: must be in [0, 1)")
    targets = resolve_targets(model, settings.targets) if model is not None else settings.targets
    if isinstance(targets, str) and targets != "all-linear":
        targets = TARGETS[targets]
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, bias=settings.bias, task_type="CAUSAL_LM",
                      modules_to_save=settings.modules_to_save or None)


def apply_lora(model, settings: LoraSettings):
    """Wrap `model` with a fresh LoRA adapter; only the adapter is trainable."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": settings.use_reentrant}
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs)
    elif settings.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    model.config.use_cache = False
    return get_peft_model(model, lora_config(settings, model))


def trainable_report(model) -> dict:
    """Trainable and total parameters, percent, and adapter size in MB (10^6 bytes)."""
    trainable, total = model.get_nb_trainable_parameters()
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100 * trainable / total,
            "adapter_mb": size / 1e6}


def format_report(r: dict) -> str:
    return (f"trainable parameters: {r['trainable']:,} of {r['total']:,} "
            f"({r['percent']:.2f} %), adapter {r['adapter_mb']:.1f} MB")
