"""Where a profiled training step leaves the GPU idle, and what the host was doing then.

    python bench/gaps.py bench/results/trace_speed.json.gz [--min-us 5]

Reads a torch.profiler Chrome trace (bench/perf.py --profile MODE writes one next to its
table) and prints: the GPU's busy time (kernels, copies, memsets, overlaps merged), the step's
span, and every idle stretch of the GPU, summed by what ended it:

- "host": the kernel that ended the gap was launched after the GPU had gone idle, so the GPU
  waited for the host; the gap is charged to the outermost host operation (on the launching
  thread) that was running at the launch, e.g. `CompiledFunction` (a compiled layer's forward),
  `Optimizer.step#AdamW.step`, or `(no op)` for Python between operations (Trainer's loop,
  data loading).
- "device": the kernel had been launched before the gap began, so the GPU waited for
  something else (a copy on another stream, an event, launch latency).

A step whose host time exceeds its GPU time shows up as "host" gaps; the names say where to
cut host work. All streams and GPUs of the trace count as one timeline (a copy on a side stream
counts as busy), which fits one GPU with its offload stream. Standard library only."""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def gpu_intervals(events):
    return sorted(((e["ts"], e["ts"] + e.get("dur", 0), e) for e in events
                   if e.get("ph") == "X" and e.get("cat") in GPU_CATS),
                  key=lambda r: (r[0], r[1]))


def merged(intervals):
    spans = []
    for a, b, _ in intervals:
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return spans


class HostOps:
    """cpu_op events per thread, for 'which operation was running at time t'."""

    def __init__(self, events):
        by_tid = defaultdict(list)
        for e in events:
            if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
                by_tid[e["tid"]].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
        # Outer before inner when both start in the same microsecond (longer first).
        self.by_tid = {t: sorted(v, key=lambda r: (r[0], -r[1])) for t, v in by_tid.items()}
        self.starts = {t: [s for s, _, _ in v] for t, v in self.by_tid.items()}

    def outermost(self, tid, t):
        ops = self.by_tid.get(tid, [])
        i = bisect.bisect_right(self.starts.get(tid, []), t)
        best = None
        # Outermost = the earliest-starting op still open at t (ops nest on one thread).
        for s, e, name in ops[:i]:
            if e >= t:
                best = name
                break
        return best or "(no op)"


def analyse(events, min_us=5.0):
    gpu = gpu_intervals(events)
    if not gpu:
        raise SystemExit("no GPU events in this trace (was it recorded with CUDA activity?)")
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    host = HostOps(events)
    spans = merged(gpu)
    busy = sum(b - a for a, b in spans)
    # The first GPU event starting at or after each gap's end identifies what ended it.
    starts = [a for a, _, _ in gpu]
    by_cause = defaultdict(float)
    counts = defaultdict(int)
    idle = 0.0
    for (a0, b0), (a1, _) in zip(spans, spans[1:]):
        gap = a1 - b0
        if gap < min_us:
            continue
        idle += gap
        ev = gpu[bisect.bisect_left(starts, a1)][2]
        launch = launches.get(ev.get("args", {}).get("correlation"))
        if launch is not None and launch["ts"] > b0:
            key = ("host", host.outermost(launch["tid"], launch["ts"]))
        else:
            key = ("device", ev.get("cat", "?"))
        by_cause[key] += gap
        counts[key] += 1
    return {"gpu_busy_ms": busy / 1e3, "span_ms": (spans[-1][1] - spans[0][0]) / 1e3,
            "idle_ms": idle / 1e3,
            "by_cause": sorted(((k[0], k[1], v / 1e3, counts[k]) for k, v in by_cause.items()),
                               key=lambda r: -r[2])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--min-us", type=float, default=5.0, help="ignore shorter gaps")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    r = analyse(load(a.trace), a.min_us)
    print(f"GPU busy {r['gpu_busy_ms']:.1f} ms of a {r['span_ms']:.1f} ms span; "
          f"idle {r['idle_ms']:.1f} ms in gaps of at least {a.min_us:g} us")
    print(f"{'waited for':8}  {'ms':>7}  {'gaps':>5}  operation running at the launch")
    for kind, name, ms, n in r["by_cause"][:a.top]:
        print(f"{kind:8}  {ms:7.2f}  {n:5d}  {name[:90]}")


if __name__ == "__main__":
    main()
