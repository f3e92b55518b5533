"""Plan where a model's layers go before loading it, then check that they went there.

    from socratic_lora import plan_placement
    plan = plan_placement("google/gemma-2-2b-jpn-it", mode="balanced",
                          gpu_budgets={0: "4GiB", 1: "4GiB"}, bits=4)
    print(plan)                       # a table: layer ranges and GiB per device (lesson 03)

The plan is computed on an empty (meta) model, so it runs on a CPU for GPUs that do not
exist. Budgets are for weights only, as loaded (like `max_memory` in transformers): keep
room for activations yourself, and, with `mode: reference`, for peft's
`prepare_model_for_kbit_training`, which then casts every weight that is not 4-bit (the
embedding too: +1.1 GiB on the first GPU for gemma-2-2b) to float32. Nothing is offloaded to the CPU unless `allow_offload=True`; if the
budgets are too small the planner refuses and says how much is missing on which device.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

MODES = ("balanced", "single", "data_parallel", "cpu")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


class PlacementError(ValueError):
    """The model does not fit the budgets, or a loaded model is not where the plan put it."""


def parse_memory(value, where: str = "memory budget") -> int:
    """'4GiB' -> 4294967296; an int is taken as bytes. Only binary units (KiB, MiB, GiB, TiB)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: {value!r} is not a size; write e.g. '4GiB' or a number of bytes")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{where}: {value} bytes must be positive")
        if value < 2**20:    # '4' meant as GiB would be 4 bytes: no model fits, and why is unclear
            raise ValueError(f"{where}: {value} is read as bytes, too small for any weights; "
                             f"did you mean '{value}GiB'? (メモリ量は '4GiB' のように書いてください)")
        return value
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(B|KiB|MiB|GiB|TiB)", value.strip())
    if not m and value.strip().startswith("-"):
        raise ValueError(f"{where}: {value!r} must be positive; write e.g. '4GiB'")
    if not m:
        hint = ""
        g = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kKmMgGtT])i?[bB]\s*", value)
        if g and not g.group(1).startswith("-"):
            hint = f" (did you mean '{g.group(1)}{g.group(2).upper()}iB'? GB/MB are ambiguous)"
        raise ValueError(f"{where}: {value!r} is not a size{hint}; write e.g. '4GiB' or '512MiB' "
                         "(メモリ量は '4GiB' のように書いてください)")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ValueError(f"{where}: {value!r} must be positive")
    return size


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


@dataclass
class Block:
    """A unit the planner places whole: a decoder layer, the embeddings, the final norm..."""
    name: str
    params: int = 0
    quantized_params: int = 0
    bytes: float = 0.0
    offload_bytes: float = 0.0     # on the CPU next to GPUs: bitsandbytes leaves an offloaded
                                   # block unquantized (16-bit), whatever `bits` says
    layer: int | None = None       # index for decoder layers, None for the other blocks
    tied_to: str | None = None     # a block whose weights this one shares (tied output head)


# Architectures the book plans for, shipped so that planning needs no download or token.
KNOWN_CONFIGS = {
    "google/gemma-2-2b-jpn-it": "gemma-2-2b-jpn-it.json",
    "google/gemma-2-27b-it": "gemma-2-27b-it.json",
    "rinna/japanese-gpt-neox-3.6b": "japanese-gpt-neox-3.6b.json",
}


def known_config(model_id: str):
    """The shipped config of a model in KNOWN_CONFIGS (architecture only, no weights)."""
    import json
    from importlib.resources import files

    from transformers import AutoConfig
    if model_id not in KNOWN_CONFIGS:
        raise KeyError(f"{model_id!r} is not shipped; known: {', '.join(KNOWN_CONFIGS)}")
    raw = json.loads(files("socratic_lora").joinpath(
        f"data/model_configs/{KNOWN_CONFIGS[model_id]}").read_text(encoding="utf-8"))
    return AutoConfig.for_model(**raw)


def _load_config(model_or_config, token=None, trust_remote_code=False):
    if isinstance(model_or_config, (str, os.PathLike)):
        if str(model_or_config) in KNOWN_CONFIGS and not os.path.isdir(model_or_config):
            return known_config(str(model_or_config))   # planning: no download, no token
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(model_or_config, token=token,
                                          trust_remote_code=trust_remote_code)
    return getattr(model_or_config, "config", model_or_config)


def empty_model(config):
    """The model of `config` with every tensor on the meta device: shapes, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _layers_path(model) -> str:
    """The name of the ModuleList holding the decoder layers (the largest one)."""
    lists = [(sum(p.numel() for p in m.parameters()), n) for n, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise PlacementError(f"{type(model).__name__} has no list of decoder layers to place")
    return max(lists)[1]


def block_sizes(config, bits: int = 16, double_quant: bool = True) -> list[Block]:
    """Blocks of the model in forward order, with parameter counts and weight bytes at `bits`.

    Linear weights in the decoder take `bytes_per_weight(bits)`; everything else (embeddings,
    norms, biases, the output head) stays 16-bit as bitsandbytes leaves it (32-bit if bits=32).
    """
    from .quant import bytes_per_weight

    model = empty_model(_load_config(config))
    layers = _layers_path(model)
    blocks: list[Block] = []

    def walk(module, prefix):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == layers:
                blocks.extend(Block(f"{full}.{i}", layer=i) for i in range(len(child)))
            elif layers.startswith(full + "."):
                walk(child, full + ".")
            else:
                blocks.append(Block(full))
    walk(model, "")

    def owner(param_name):
        return max((b for b in blocks if param_name.startswith(b.name + ".")),
                   key=lambda b: len(b.name))

    head = model.get_output_embeddings()
    linear_weights = {f"{n}.weight" for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and m is not head}
    plain = 4 if bits == 32 else 2
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        b = owner(name)
        if id(p) in seen:  # a tied weight: counted once, where it first appears
            if seen[id(p)] is not b:
                b.tied_to = seen[id(p)].name
            continue
        seen[id(p)] = b
        b.params += p.numel()
        b.offload_bytes += p.numel() * plain
        if name in linear_weights and bits < 16:
            b.quantized_params += p.numel()
            b.bytes += p.numel() * bytes_per_weight(bits, double_quant)
        else:
            b.bytes += p.numel() * plain
    return blocks


@dataclass
class Plan:
    mode: str
    device_map: dict
    budgets: dict                   # device -> bytes
    blocks: list[Block] = field(repr=False, default_factory=list)
    placed: dict = field(default_factory=dict)   # block name -> device
    allow_offload: bool = False

    def offloaded(self) -> bool:
        """Some blocks on the CPU next to GPUs (allow_offload): those stay unquantized."""
        return self.mode != "cpu" and "cpu" in self.placed.values()

    def bytes_per_device(self) -> dict:
        out = {}
        for b in self.blocks:
            d = self.placed[b.name]
            out[d] = out.get(d, 0.0) + (b.offload_bytes if d == "cpu" and self.offloaded()
                                        else b.bytes)
        return out

    def layers_per_device(self) -> dict:
        out = {}
        for b in self.blocks:
            if b.layer is not None:
                out.setdefault(self.placed[b.name], []).append(b.layer)
        return out

    def gpus(self) -> list:
        return sorted({d for d in self.placed.values() if isinstance(d, int)})

    def table(self) -> str:
        used, layers = self.bytes_per_device(), self.layers_per_device()
        rows = [f"placement plan ({self.mode})",
                f"{'device':<7} {'layers':<10} {'other blocks':<40} {'GiB':>6} {'budget':>7}"]
        for d in sorted(used, key=lambda d: (isinstance(d, str), d)):
            ls = layers.get(d, [])
            span = f"{ls[0]}-{ls[-1]}" if len(ls) > 1 else (str(ls[0]) if ls else "-")
            other = ", ".join(b.name.rsplit(".", 1)[-1] + (" (tied)" if b.tied_to else "")
                              for b in self.blocks if b.layer is None and self.placed[b.name] == d)
            name = f"GPU {d}" if isinstance(d, int) else d.upper()
            budget = gib(self.budgets[d]) if d in self.budgets else "-"
            rows.append(f"{name:<7} {span:<10} {other[:40]:<40} {gib(used[d]):>6} {budget:>7}")
        rows.append(f"{'total':<7} {sum(1 for b in self.blocks if b.layer is not None):<10} "
                    f"{'':<40} {gib(sum(used.values())):>6}")
        if self.offloaded() and any(b.quantized_params for b in self.blocks):
            rows.append("(CPU blocks stay 16-bit: bitsandbytes does not quantize offloaded "
                        "modules)")
        return "\n".join(rows)

    __str__ = table


def gpu_budgets_from_free(fraction: float = 0.9) -> dict:
    """Budgets from the free memory of each visible GPU (keeps 10 % for activations by default)."""
    if not torch.cuda.is_available():
        raise PlacementError("gpu_budgets='free' needs visible GPUs, and none is visible")
    return {i: int(torch.cuda.mem_get_info(i)[0] * fraction)
            for i in range(torch.cuda.device_count())}


def _budgets(gpu_budgets) -> dict:
    if gpu_budgets is None or gpu_budgets == "free":
        return gpu_budgets_from_free()
    if isinstance(gpu_budgets, (list, tuple)):
        gpu_budgets = dict(enumerate(gpu_budgets))
    if not isinstance(gpu_budgets, dict) or not gpu_budgets:
        raise ValueError(f"gpu_budgets={gpu_budgets!r}: give {{0: '4GiB', 1: '4GiB'}}, a list, or 'free'")
    out = {}
    for k, v in gpu_budgets.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"gpu_budgets: {k!r} is not a GPU index (0, 1, ...)")
        out[k] = parse_memory(v, f"gpu_budgets[{k}]")
    return out


def _split_layers(fixed_first, fixed_last, layer_bytes, budgets):
    """Contiguous split of the layers over the GPUs minimising the largest budget share.

    Each GPU gets at least one layer; extra bytes sit on the first and last GPU.
    Returns (counts per GPU, worst share). Dynamic programming over split points.
    """
    gpus, n = list(budgets), len(layer_bytes)
    prefix = [0.0]
    for x in layer_bytes:
        prefix.append(prefix[-1] + x)
    k = len(gpus)
    INF = float("inf")
    # best[g][i]: worst share when GPUs 0..g hold the first i layers
    best = [[INF] * (n + 1) for _ in range(k)]
    cut = [[0] * (n + 1) for _ in range(k)]
    for g in range(k):
        extra = (fixed_first if g == 0 else 0) + (fixed_last if g == k - 1 else 0)
        for i in range(g + 1, n + 1):
            starts = range(0, 1) if g == 0 else range(g, i)
            for j in starts:
                prev = 0.0 if g == 0 else best[g - 1][j]
                share = max(prev, (prefix[i] - prefix[j] + extra) / budgets[gpus[g]])
                if share < best[g][i]:
                    best[g][i], cut[g][i] = share, j
    counts, i = [], n
    for g in range(k - 1, -1, -1):
        j = cut[g][i]
        counts.append(i - j)
        i = j
    return counts[::-1], best[k - 1][n]


def plan_placement(model_or_config, mode: str = "balanced", gpu_budgets=None,
                   cpu_budget="24GiB", bits: int = 4, double_quant: bool = True,
                   allow_offload: bool = False, local_rank: int | None = None) -> Plan:
    """Compute the device map for `mode` from a model id, config or model, without loading it.

    balanced: decoder layers split over all GPUs in `gpu_budgets` (embeddings on the first,
    final norm on the last). single: everything on the first GPU. data_parallel: one whole copy
    on this process's GPU (LOCAL_RANK under `accelerate launch`). cpu: everything on the CPU.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {', '.join(MODES)}")
    blocks = block_sizes(_load_config(model_or_config), bits=bits, double_quant=double_quant)
    total = sum(b.bytes for b in blocks)
    cpu = parse_memory(cpu_budget, "cpu_budget")
    if mode == "cpu":
        if total > cpu:
            raise PlacementError(f"the weights need {gib(total)} GiB but cpu_budget is {gib(cpu)} "
                                 f"GiB: {gib(total - cpu)} GiB missing on the CPU")
        return Plan(mode, {"": "cpu"}, {"cpu": cpu}, blocks, {b.name: "cpu" for b in blocks})
    budgets = _budgets(gpu_budgets)
    if mode == "data_parallel":
        rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        if rank not in budgets:
            raise PlacementError(f"data_parallel: this process's GPU {rank} has no budget "
                                 f"(budgets for GPUs {sorted(budgets)})")
        budgets = {rank: budgets[rank]}
    elif mode == "single":
        first = min(budgets)
        budgets = {first: budgets[first]}
    if allow_offload:
        budgets["cpu"] = cpu

    gpus = [d for d in budgets if d != "cpu"]
    layer_blocks = [b for b in blocks if b.layer is not None]
    first_layer = blocks.index(layer_blocks[0])
    last_layer = blocks.index(layer_blocks[-1])
    head = [b for b in blocks[:first_layer]]
    tail = [b for b in blocks[last_layer + 1:]]
    placed = {}
    if len(gpus) > 1 and len(layer_blocks) >= len(gpus):
        counts, worst = _split_layers(sum(b.bytes for b in head), sum(b.bytes for b in tail),
                                      [b.bytes for b in layer_blocks], {g: budgets[g] for g in gpus})
        order = [g for g, c in zip(gpus, counts) for _ in range(c)]
        for b, g in zip(layer_blocks, order):
            placed[b.name] = g
        for b in head:
            placed[b.name] = gpus[0]
        for b in tail:
            placed[b.name] = gpus[-1]
        fits = worst <= 1.0
    else:
        for b in blocks:
            placed[b.name] = gpus[0]
        fits = total <= budgets[gpus[0]]
    if not fits:
        placed = _fill_in_order(blocks, budgets, placed, allow_offload, bits)
    for b in blocks:  # a tied block lives with the weights it shares
        if b.tied_to:
            placed[b.name] = placed[b.tied_to]
    whole = len(set(placed.values())) == 1
    device_map = {"": next(iter(placed.values()))} if whole else dict(placed)
    return Plan(mode, device_map, budgets, blocks, placed, allow_offload)


def _fill_in_order(blocks, budgets, balanced, allow_offload, bits=4):
    """Budgets too small for the balanced split: fill devices in order, CPU last if allowed."""
    gpus = [d for d in budgets if d != "cpu"]
    used = dict.fromkeys(budgets, 0.0)
    placed, g = {}, 0
    for b in blocks:  # GPUs in order; a block that fits no remaining GPU goes to the CPU
        fit = next((i for i in range(g, len(gpus)) if used[gpus[i]] + b.bytes <= budgets[gpus[i]]), None)
        size = b.bytes
        if fit is not None:
            g, dev = fit, gpus[fit]
        elif allow_offload and used["cpu"] + b.offload_bytes <= budgets["cpu"]:
            dev, size = "cpu", b.offload_bytes      # offloaded blocks are not quantized
        else:
            break
        placed[b.name] = dev
        used[dev] += size
    if len(placed) == len(blocks):
        return placed
    # Refuse: report, per GPU, how far over budget the balanced split would be.
    over = {}
    for b in blocks:
        dev = balanced[b.name]
        over[dev] = over.get(dev, 0.0) + b.bytes
    lines = [f"GPU {dev}: needs {gib(n)} GiB, budget {gib(budgets[dev])} GiB, "
             f"{gib(n - budgets[dev])} GiB missing"
             for dev, n in over.items() if n > budgets.get(dev, 0)]
    total = sum(b.bytes for b in blocks)
    gpu_total = sum(v for k, v in budgets.items() if k != "cpu")
    msg = (f"the weights need {gib(total)} GiB but the GPU budgets give {gib(gpu_total)} GiB; "
           + "; ".join(lines))
    if allow_offload:
        cpu_need = used["cpu"] + sum(b.offload_bytes for b in blocks if b.name not in placed)
        msg += (f"; the CPU budget ({gib(budgets['cpu'])} GiB) cannot take the rest either: "
                f"it would need about {gib(cpu_need)} GiB, since offloaded blocks stay 16-bit")
    else:
        fewer = ", use fewer bits (4-bit)" if bits > 4 else ""
        msg += (f". Raise the budgets{fewer}, or pass allow_offload=True to let layers run on "
                "the CPU (slow) / メモリが足りません")
    raise PlacementError(msg)


def verify_placement(model, plan: Plan) -> None:
    """Check a loaded model against its plan: each planned GPU holds decoder layers and no
    weight sits on the CPU (or disk) unless the plan allowed offloading."""
    hf_map = getattr(model, "hf_device_map", {}) or {}
    if "disk" in hf_map.values():
        raise PlacementError("some weights were offloaded to disk; this package never plans that")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = _layers_path(base)
    layer_devices = {}
    for name, p in base.named_parameters():
        if name.startswith(layers + "."):
            idx = int(name[len(layers) + 1:].split(".")[0])
            layer_devices.setdefault(idx, p.device)
    planned_gpus = {d for d in plan.layers_per_device() if isinstance(d, int)}
    got = {d.index for d in layer_devices.values() if d.type == "cuda"}
    missing = planned_gpus - got
    if missing:
        raise PlacementError(f"GPU(s) {sorted(missing)} were planned to hold layers but hold none")
    if plan.mode != "cpu" and not plan.allow_offload:
        on_cpu = sorted({n.rsplit(".", 1)[0] for n, p in base.named_parameters()
                         if p.device.type != "cuda"})
        if on_cpu:
            raise PlacementError(f"{len(on_cpu)} module(s) ended up off the GPUs "
                                 f"(first: {on_cpu[0]}) although offloading was not allowed")


# --- Lesson 03 (multi-GPU): the plan as a picture ---

def plot_plan(plan: Plan, ax=None, title: str | None = None, legend: bool = True):
    """A matplotlib Figure: one horizontal bar per device of `plan`, its blocks laid end to
    end in forward order with widths in GiB: the blocks before the decoder layers (the
    embeddings), the layers (alternating shades), the blocks after them (final norm, an
    untied output head). A red tick marks each device's budget; a tied head takes no room.

    `ax` draws into an existing Axes (e.g. two plans side by side) and returns its Figure;
    `legend=False` leaves out the colour legend (for all but one of several plans).
    Labels are ASCII (lesson 03 explains them in Japanese).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not isinstance(plan, Plan) or not plan.blocks:
        raise ValueError("plot_plan: give a Plan from plan_placement(...)")
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 1.1 + 0.75 * len(set(plan.placed.values()))), dpi=110)
    else:
        fig = ax.figure
    devices = sorted(set(plan.placed.values()), key=lambda d: (isinstance(d, str), d))
    layer_idx = [i for i, b in enumerate(plan.blocks) if b.layer is not None]
    first = layer_idx[0] if layer_idx else len(plan.blocks)   # blocks before it: "before"
    colors = {"before": "#f28e2b", "after": "#59a14f", "layer": ("#4e79a7", "#a0cbe8")}
    used = plan.bytes_per_device()
    gpu_budgets = [v for k, v in plan.budgets.items() if k != "cpu"]
    right = 1.12 * max([*used.values(), *gpu_budgets]) / 2**30
    for row, dev in enumerate(devices):
        y = len(devices) - 1 - row
        x = 0.0
        for i, b in enumerate(plan.blocks):
            if plan.placed[b.name] != dev or b.bytes == 0:
                continue
            width = b.bytes / 2**30
            if b.layer is not None:
                color = colors["layer"][b.layer % 2]
            else:
                color = colors["before"] if i < first else colors["after"]
            ax.barh(y, width, left=x, height=0.6, color=color, edgecolor="white", linewidth=0.3)
            if b.layer is None and width > 0.12 * right:
                ax.text(x + width / 2, y, b.name.rsplit(".", 1)[-1], ha="center", va="center",
                        fontsize=8)
            x += width
        layers = plan.layers_per_device().get(dev, [])
        span = (f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1
                else f"layer {layers[0]}" if layers else "no layers")
        budget = plan.budgets.get(dev)
        tick = budget / 2**30 if budget is not None and budget / 2**30 <= right else None
        if tick is not None:
            ax.plot([tick] * 2, [y - 0.4, y + 0.4], color="#e15759", linewidth=2)
        ax.text(max(x, tick or 0.0) + 0.015 * right, y, f"{span}, {used[dev] / 2**30:.2f} GiB",
                va="center", fontsize=8)
    ax.set_yticks(range(len(devices)),
                  [(f"GPU {d}" if isinstance(d, int) else str(d).upper())
                   + (f"\nbudget {plan.budgets[d] / 2**30:.2f}" if d in plan.budgets else "")
                   for d in reversed(devices)], fontsize=8)
    ax.set_xlim(0, right * 1.3)   # room for the labels at the bar ends
    ax.set_ylim(-0.6, len(devices) - 0.4)
    ax.set_xlabel("weight memory (GiB)")
    n_layers = len(layer_idx)
    ax.set_title(title or f"placement plan ({plan.mode}): {n_layers} layers, "
                          f"{sum(used.values()) / 2**30:.2f} GiB of weights", fontsize=10)
    if legend:
        ax.legend(handles=[Patch(color=colors["before"], label="embeddings (before the layers)"),
                           Patch(color=colors["layer"][0], label="decoder layers"),
                           Patch(color=colors["after"], label="final norm / head (after)"),
                           Patch(color="#e15759", label="budget")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(devices) < 3 else -0.22),
                  ncol=4, fontsize=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
