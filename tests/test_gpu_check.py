"""bench/gpu_check.sh, the prepared GPU check, stays wired: its --dry-run (no GPU work) collects the pytest
steps, runs the snippets, runs every framework-free benchmark's command line (without CUDA each parses
its options and measures nothing) and fails on a bench/bench_*.py that is neither a step nor listed as
needing a framework."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stdout[-2000:] + r.stderr[-2000:]
    status = {line.split()[0]: line.split()[1] for line in summary.splitlines()[4:]}
    benches = {p.stem for p in (ROOT / "bench").glob("bench_*.py")} - {
        "bench_serving", "bench_vllm_drafting", "bench_sglang_drafting"}
    steps = {"nvidia-smi", "environment", "kernel-tests", "paged-forward-e2e", "stream-baseline"} | benches
    assert status == {s: "ok" for s in steps}
    assert "kernels/fp4_moe/test_fp4_moe.py" in (tmp_path / "03_kernel-tests.log").read_text()
