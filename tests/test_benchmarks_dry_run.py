"""The GPU scripts cannot rot on machines without a GPU: their logic runs on the CPU at tiny sizes (issue 17); and the
benchmarks' repeat logic (timing.py) on made-up timings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _timing():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import timing

    return timing


def test_interleaved_adds_repeats_until_the_ratio_settles() -> None:
    timing = _timing()
    noisy = iter([1.0, 1.3, 0.8, 1.2, 0.9] * 100)
    steady = timing.interleaved({"a": lambda: 2.0, "b": lambda: 1.0}, 3, [("a", "b")], max_repeats=20)
    assert len(steady["a"]) == 3 and timing.paired_ratio(steady["a"], steady["b"]) == 2.0  # IQR 0: settled
    varied = timing.interleaved({"a": lambda: next(noisy), "b": lambda: 1.0}, 3, [("a", "b")], max_repeats=20)
    assert len(varied["a"]) == 20  # never known to 1%: up to max_repeats
    budget = timing.interleaved({"a": lambda: next(noisy), "b": lambda: 1.0}, 3, [("a", "b")], max_repeats=20,
                                budget_s=0.0)
    assert len(budget["a"]) == 3  # no time left after the minimum


def test_quartiles_and_the_median_standard_error() -> None:
    timing = _timing()
    assert timing.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert timing.quartiles([7.0]) == (7.0, 7.0, 7.0)
    assert timing.median_rel_se([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(0.93 * 2.0 / 5 ** 0.5 / 3.0)


def test_only_runs_the_named_suites_and_leaves_the_others_null() -> None:
    """``benchmarks/run.py --only``: unselected suites are not called and their rows are null with the reason; an
    unknown suite name is refused by the argument parser."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    runner = run.Runner(debug=True, only=["trainer"])
    called: list[str] = []
    runner.run("step_mms", lambda: called.append("step_mms"))
    assert not called and [r.value for r in runner.rows["step_mms"]] == [None, None]
    assert runner.rows["step_mms"][0].note == "not run (--only)"
    runner.run("trainer", lambda: called.append("trainer") or [])
    assert called == ["trainer"] and runner.wanted(["trainer", "epoch"]) and not runner.wanted(["epoch"])
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "no_such_suite"])
