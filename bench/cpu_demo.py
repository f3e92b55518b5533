"""The `demo` run on the CPU, before and after: the plain recipe (`mode: reference`) against the
shipped `mode: speed`, and float32 against bf16 autocast, one after the other on this machine.

    python bench/cpu_demo.py [--runs "reference;speed;reference:float32"] [--max-steps N]
                             [--out bench/results/cpu_demo.jsonl]

Each run is `socratic-lora train --config demo --set mode=M [--set compute_dtype=D]
--set save_steps=1000` in a process of its own (checkpoint writes left out, as in
docs/performance.md). Recorded per run: the report's tokens/s (training tokens over the
training time), its wall time and losses, and the process's peak RSS. Run it on an idle
machine: another process on the same cores changes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(rc)")


def run_one(spec: str, max_steps: int | None, workdir: Path) -> dict:
    mode, _, dtype = spec.partition(":")
    out = workdir / spec.replace(":", "_")
    cmd = [sys.executable, "-m", "socratic_lora.cli", "train", "--config", "demo",
           "--set", f"output_dir={out}", "--set", f"mode={mode}", "--set", "save_steps=1000"]
    if dtype:
        cmd += ["--set", f"compute_dtype={dtype}"]
    if max_steps:
        cmd += ["--set", f"max_steps={max_steps}"]
    t0 = time.perf_counter()
    # A wrapper process per run, so RUSAGE_CHILDREN is this run's peak alone.
    p = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{spec}: train failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    rss = [int(x.split()[1]) for x in p.stdout.splitlines() if x.startswith("maxrss_kib ")]
    rep = json.loads((out / "report.json").read_text())
    return {"run": spec, "mode": mode, "compute_dtype": dtype or "auto",
            "tokens_per_s": round(rep["tokens_per_s"], 1),
            "train_wall_s": rep["wall_time_s"], "process_wall_s": round(wall, 1),
            "steps": rep.get("steps"), "final_loss": rep["final_loss"],
            "mean_loss": rep.get("mean_loss"), "eval_loss": rep.get("eval_loss"),
            "peak_rss_gb": round(rss[-1] * 1024 / 1e9, 2) if rss else None,
            "command": shlex.join(cmd[1:]).replace(str(workdir), "$TMP")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="reference;speed;reference:float32",
                   help="';'-separated MODE[:COMPUTE_DTYPE]")
    p.add_argument("--max-steps", type=int, default=None, help="cut every run to N steps")
    p.add_argument("--out", default=None, help="append one JSON line per run here")
    a = p.parse_args(argv)
    specs = [s.strip() for s in a.runs.split(";") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for spec in specs:
            row = run_one(spec, a.max_steps, Path(d))
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["x_first"] = round(r["tokens_per_s"] / base, 3)
        r.update(date=time.strftime("%Y-%m-%d"), cpu=platform.processor() or platform.machine(),
                 cores=os.cpu_count(), bench_command=shlex.join(["python", *sys.argv]))
        print(f"{r['run']:>20}: {r['tokens_per_s']:8.1f} tokens/s ({r['x_first']:.2f}x), "
              f"train {r['train_wall_s']} s, peak RSS {r['peak_rss_gb']} GB, "
              f"losses {r['final_loss']:.3f} / {r['eval_loss']}")
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
