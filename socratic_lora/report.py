"""The training report: JSON, a Markdown table and a loss-curve PNG, written after every run.

It records what the source training report recorded by hand: steps, epochs, wall time, final
and mean loss, eval loss, samples/s and tokens/s, peak GPU memory, trainable parameters,
adapter size on disk, the settings, library versions and hardware (lesson 06).
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

LIBS = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "socratic-lora")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def hardware() -> dict:
    import torch
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpus": gpus}


def peak_memory_gib() -> dict:
    import torch
    return {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**30, 3)
            for i in range(torch.cuda.device_count())}


def loss_curve(log_history: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (tutor tokens only)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(r: dict) -> str:
    rows = [
        ("steps", r["steps"]), ("epochs", f"{r['epochs']:.2f}"),
        ("wall time", "{} min {} s".format(*divmod(round(r["wall_time_s"]), 60))),
        ("final train loss", _f(r["final_loss"])), ("mean train loss", _f(r["mean_loss"])),
        ("eval loss", _f(r["eval_loss"])), ("samples/s", _f(r["samples_per_s"], 2)),
        ("tokens/s", _f(r["tokens_per_s"], 0)),
        ("peak GPU memory (GiB)", ", ".join(f"{k}: {v}" for k, v in r["peak_memory_gib"].items()) or "- (CPU)"),
        ("trainable parameters", f"{r['trainable']:,} ({r['trainable_percent']:.2f} %)"),
        ("adapter size on disk", f"{r['adapter_mb']:.1f} MB"),
        ("examples", f"{r['examples']['train']} train, {r['examples']['eval']} eval"),
    ]
    out = ["# Training report", "", "| what | value |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "## Data", ""] + [f"- {line}" for line in r["data_steps"]]
    out += ["", "## Settings", "", "| key | value |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in r["settings"].items()]
    out += ["", "## Versions and hardware", "", f"- {r['versions']}", f"- {r['hardware']}", "",
            "![loss curve](loss.png)", ""]
    return "\n".join(out)


def _f(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def write_report(r: dict, log_history: list, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(r, ensure_ascii=False, indent=2, default=str))
    (out_dir / "report.md").write_text(markdown(r))
    loss_curve(log_history, out_dir / "loss.png")
    return out_dir / "report.md"
