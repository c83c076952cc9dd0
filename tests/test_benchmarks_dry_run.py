"""The GPU scripts cannot rot on machines without a GPU: their logic runs on the CPU at tiny sizes (issue 17)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_gpu_benchmark_cpu_dry_run() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--cpu-dry-run"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = _last_json(r.stdout)
    assert out["dry_run"] is True
    for key in ("images_per_s_fp32", "images_per_s_bf16_channels_last", "groupdistil_over_kd_step",
                "groupdistil_over_kd_step_uncached"):
        assert out[key] > 0
    assert set(out["host_syncs"]) == {"gd_fp32", "gd_bf16", "kd_bf16", "gd_bf16_cached", "kd_bf16_cached"}
    assert all(v is None for v in out["host_syncs"].values())  # nothing to check without CUDA
