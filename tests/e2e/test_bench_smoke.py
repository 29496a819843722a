"""scripts/bench.py --smoke runs end to end: its own server, the engine in-process, the report.

Only the run and the shape of its report are checked; timings vary with the machine and are
never asserted (the benchmark prints PASS/MISS and exits 0 either way).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^(API|direct)\s+(\d+)\s+([0-9]+(?:\.[0-9]+)?)\s", re.M)


@pytest.mark.e2e
def test_bench_smoke_runs_and_reports(real_model_dir):
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    assert "API/direct" in out
    assert "TTFT" in out
    assert re.search(r"^\s+(PASS|MISS)\s+API/direct tok/s at 1 stream", out, re.M), out
    rows = {(mode, int(c)): float(tok_s) for mode, c, tok_s in ROW.findall(out)}
    assert {("API", 1), ("direct", 1), ("API", 2), ("direct", 2)} <= rows.keys(), out
    assert all(v > 0 for v in rows.values()), rows
    # each API phase reports the server event loop's CPU per token (the server was started here)
    assert re.search(r"^round 1 API .*server event loop \d+ us CPU per token, bench client \d+ us$", out, re.M), out
    assert re.search(r"^round 1 direct .*, bench consumers \d+ us$", out, re.M), out
    # the job section ran too: submissions while the engine is busy, polls, auth overhead
    assert re.search(r"submitGeneration p50 [0-9.]+ ms\s+p99 [0-9.]+ ms\s+\(\d+ jobs accepted/s\)", out), out
    assert re.search(r"job\(id\) poll p50 [0-9.]+ ms", out), out
    assert "auth + rate limiting on job(id)" in out, out


@pytest.mark.e2e
def test_bench_stall_runs_and_reports(real_model_dir):
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--stall", "--stall-tokens", "256", "--stall-streams", "2",
         "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    assert re.search(r"^\s+whole prompt \(unchunked\)\s+gap before it p50\s+[0-9.]+ ms; during its prefill: largest"
                     r"\s+[0-9.]+ ms", out, re.M), out
    assert re.search(r"^\s+chunks of \d+ tokens\s+gap before it", out, re.M), out


@pytest.mark.e2e
def test_bench_kernels_runs_and_reports(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "scripts/bench.py", "--kernels", "--smoke", "--model-path", str(tiny_model_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    assert re.search(r"^\s+1 rows: plain\s+[0-9.]+ us, packed\s+[0-9.]+ us\s+[0-9.]+x", out, re.M), out
    assert re.search(r"^\s+16 rows: SDPA\s+[0-9.]+ us, two matmuls\s+[0-9.]+ us\s+[0-9.]+x", out, re.M), out
    assert re.search(r"^\s+1 rows: alone\s+[0-9.]+ ms, beside a second pool\s+[0-9.]+ ms\s+[0-9.]+x", out, re.M), out
    assert re.search(r"^\s+4 rows: dense\s+[0-9.]+ ms, int8 op\s+[0-9.]+ ms, native\s+[0-9.]+ ms\s+[0-9.]+x, [0-9.]+x"
                     r"|native step: (not for this model here|unavailable)", out, re.M), out
    # float16 matrices: timed for a float32 model (a CPU without native bfloat16), else skipped
    assert re.search(r"^\s+16 rows: float32\s+[0-9.]+ ms, float16\s+[0-9.]+ ms\s+[0-9.]+x"
                     r"|float16 matrices: not for this model here", out, re.M), out


@pytest.mark.e2e
def test_bench_events_runs_and_reports():
    """The per-event section: both executors give the same results (the section checks) and
    it prints the CPU per event of each, for both selections."""
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--events", "--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    for name in ("the bench's", "confidence"):
        assert re.search(rf"^\s+{name} selection: strawberry's executor\s+[0-9.]+ us, the server's\s+[0-9.]+ us"
                         r" per event\s+[0-9.]+x$", out, re.M), out
