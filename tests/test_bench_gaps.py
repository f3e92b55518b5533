"""bench/gaps.py: GPU idle time from a profiler trace, charged to what the host was doing."""
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gaps  # noqa: E402


def _trace(tmp_path):
    """Host thread 1: op A (0-100 us) launches kernel k1 (runs 10-40), op B (100-300) launches
    k2 at 250 (runs 260-300) after the GPU went idle at 40: a 220 us host gap charged to B;
    k3 was launched at 120, early, but ran only at 320 after k2: a 20 us device gap."""
    ev = [
        {"ph": "X", "cat": "cpu_op", "name": "A", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "B", "ts": 100, "dur": 200, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "inner", "ts": 240, "dur": 20, "tid": 1},
        {"ph": "X", "cat": "cuda_runtime", "name": "launch", "ts": 5, "dur": 2, "tid": 1,
         "args": {"correlation": 1}},
        {"ph": "X", "cat": "cuda_runtime", "name": "launch", "ts": 250, "dur": 2, "tid": 1,
         "args": {"correlation": 2}},
        {"ph": "X", "cat": "cuda_runtime", "name": "launch", "ts": 120, "dur": 2, "tid": 1,
         "args": {"correlation": 3}},
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 10, "dur": 30, "args": {"correlation": 1}},
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 260, "dur": 40, "args": {"correlation": 2}},
        {"ph": "X", "cat": "kernel", "name": "k3", "ts": 320, "dur": 10, "args": {"correlation": 3}},
    ]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    return str(path)


def test_gaps_are_charged_to_the_outermost_host_op_or_the_device(tmp_path, capsys):
    r = gaps.analyse(gaps.load(_trace(tmp_path)))
    assert r["gpu_busy_ms"] * 1e3 == 80 and r["span_ms"] * 1e3 == 320
    assert r["idle_ms"] * 1e3 == 240
    got = {(kind, name): (round(ms * 1e3), n) for kind, name, ms, n in r["by_cause"]}
    assert got == {("host", "B"): (220, 1), ("device", "kernel"): (20, 1)}
    gaps.main([_trace(tmp_path)])
    assert "GPU busy 0.1 ms of a 0.3 ms span" in capsys.readouterr().out


def _launch(ts, corr, tid=1):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2,
            "tid": tid, "args": {"correlation": corr}}


def _kernel(ts, dur, corr, stream=7):
    return {"ph": "X", "cat": "kernel", "name": f"k{corr}", "ts": ts, "dur": dur, "tid": stream,
            "args": {"correlation": corr}}


def test_two_gpu_events_with_the_same_start_and_duration_do_not_crash():
    """Two GPU events with equal start and duration (two streams or GPUs, zero-length
    memsets) once made the sort compare the event dicts: TypeError."""
    ev = [{"ph": "X", "cat": "cpu_op", "name": "A", "ts": 0, "dur": 300, "tid": 1},
          _launch(5, 1), _launch(6, 2), _launch(200, 3),
          _kernel(10, 30, 1, stream=7), _kernel(10, 30, 2, stream=13), _kernel(210, 10, 3)]
    r = gaps.analyse(ev)
    assert round(r["idle_ms"] * 1e3) == 170


def test_the_outermost_op_wins_when_an_inner_op_starts_at_the_same_time():
    """An inner op starting in the same microsecond as its parent must not be reported
    instead of the outermost op."""
    ev = [{"ph": "X", "cat": "cpu_op", "name": "outer", "ts": 100, "dur": 200, "tid": 1},
          {"ph": "X", "cat": "cpu_op", "name": "inner", "ts": 100, "dur": 150, "tid": 1},
          _launch(5, 1), _launch(200, 2), _kernel(10, 30, 1), _kernel(210, 10, 2)]
    r = gaps.analyse(ev)
    assert [(k, n) for k, n, _, _ in r["by_cause"]] == [("host", "outer")]
