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


# --- LoRA size from a config alone (lesson 04) --------------------------------------------
def lora_targeted_linears(config, targets="attention") -> list:
    """(module name, in_features, out_features) of every linear layer LoRA would wrap in the
    model of `config`, built on the meta device: shapes only, no weights, no download.
    `targets` as in LoraSettings; "all-linear" leaves out the output layer (lm_head), as peft does."""
    from .placement import empty_model

    model = empty_model(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if targets == "all-linear":
        out = model.get_output_embeddings()
        chosen = [(n, m) for n, m in linears if m is not out]
    else:
        names = set(resolve_targets(model, targets))
        chosen = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in names]
    return [(n, m.in_features, m.out_features) for n, m in chosen]


def lora_parameter_count(config, r: int, targets="attention") -> int:
    """Trainable LoRA parameters for rank `r`: each wrapped linear W (out x in) gets
    A (r x in) and B (out x r), so r * (in + out) each. Equals what peft reports."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r}: the rank must be a positive integer (e.g. 16)")
    return sum(r * (i + o) for _, i, o in lora_targeted_linears(config, targets))


def plot_rank(config, ranks=(4, 8, 16, 32, 64), targets=("attention", "all-linear"),
              bytes_per_param: int = 4, title: str | None = None):
    """A matplotlib Figure: trainable LoRA parameters (and adapter MB in float32) against the
    rank r, one line per target set, for the model of `config` (no weights needed)."""
    import matplotlib.pyplot as plt

    from .placement import empty_model

    total = sum(p.numel() for p in empty_model(config).parameters())
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    top = 0.0
    for k, t in enumerate(targets):
        per_rank = lora_parameter_count(config, 1, t)   # the count is linear in r
        counts = [per_rank * r for r in ranks]
        top = max(top, counts[-1] / 1e6)
        label = t if isinstance(t, str) else "+".join(t)
        ax.plot(ranks, [c / 1e6 for c in counts], "o-", label=label)
        below = k == 0 and len(targets) > 1   # first line's labels under it, others above
        for r_, c in zip(ranks, counts):
            ax.annotate(f"{c / 1e6:.1f}M ({100 * c / total:.2f}%)", (r_, c / 1e6),
                        textcoords="offset points", xytext=(0, -8) if below else (-5, 3),
                        ha="center" if below else "right", va="top" if below else "bottom",
                        fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ranks), [str(r_) for r_ in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("trainable parameters (millions)")
    right = ax.secondary_yaxis("right", functions=(lambda m: m * bytes_per_param,
                                                   lambda mb: mb / bytes_per_param))
    right.set_ylabel(f"adapter size (MB, {8 * bytes_per_param}-bit)")
    ax.set_title(title or f"LoRA size vs rank ({getattr(config, 'model_type', 'model')}, "
                          f"{total / 1e9:.2f}B parameters)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="targets", loc="upper left")
    ax.set_ylim(-0.12 * top, 1.1 * top)
    ax.set_xlim(ranks[0] / 2, ranks[-1] * 1.4)
    fig.tight_layout()
    return fig
