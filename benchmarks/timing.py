"""Timing helpers shared by ``run.py`` (CPU) and ``gpu.py``: pure Python + torch, nothing else.

Every measurement is taken as *interleaved repeats*: each repeat runs every variant once, in an order rotated by
one each repeat, so slow drifts of the machine (other processes, thermal state) hit all variants alike. Ratios are
medians over repeats of the per-repeat ratio (paired), with their interquartile range as the spread; a suite adds
repeats (within a time budget) until each ratio's median is known to 1% (:func:`interleaved`).
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """``(Q1, median, Q3)`` of ``values`` (inclusive method: Q1 = Q3 = the value itself for one value)."""
    if len(values) < 2:
        return float(values[0]), float(values[0]), float(values[0])
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return float(q1), float(q2), float(q3)


def spread(values: list[float]) -> str:
    """``min-max`` of a list of seconds, as a short string for the table's notes."""
    return f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} ms"


def median_rel_se(values: list[float]) -> float:
    """Standard error of the median of ``values`` relative to it, estimated from the interquartile range:
    ``se ~= 1.2533 * sigma / sqrt(n)`` with ``sigma ~= IQR / 1.349``, i.e. ``0.93 * IQR / sqrt(n) / median``."""
    q1, q2, q3 = quartiles(values)
    return 0.93 * (q3 - q1) / math.sqrt(len(values)) / abs(q2) if q2 else math.inf


#: stop adding repeats once every watched ratio's median is known to this relative standard error: two runs then
#: differ by 2 * sqrt(2) * 1% ~= 2.8% at most in about 95% of cases (the ``--quick`` goal: agree within 3%)
REL_SE = 0.01


def interleaved(variants: Mapping[str, Callable[[], float]], repeats: int,
                ratios: Sequence[tuple[str, str]] = (), max_repeats: int | None = None,
                budget_s: float = math.inf) -> dict[str, list[float]]:
    """Run every variant once per repeat (order rotated each repeat); each returns its own measured seconds.

    ``repeats`` at least; then, for each ``(num, den)`` of ``ratios`` whose per-repeat ratio ``num[i] / den[i]`` has
    a median not yet known to :data:`REL_SE` (:func:`median_rel_se`), more repeats, up to ``max_repeats`` and while
    less than ``budget_s`` seconds have passed since the start."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    start, r = time.perf_counter(), 0
    most = max(repeats, max_repeats or repeats)

    def settled() -> bool:
        return all(median_rel_se(ratio_values(out[a], out[b])) <= REL_SE for a, b in ratios)

    while r < repeats or (r < most and time.perf_counter() - start < budget_s and not settled()):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(float(variants[name]()))
        r += 1
    return out


def ratio_values(num: list[float], den: list[float]) -> list[float]:
    """The per-repeat ratios ``num[i] / den[i]``."""
    return [a / b for a, b in zip(num, den)]


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of ``num[i] / den[i]``."""
    return median(ratio_values(num, den))


def seconds_per_call(fn: Callable[[int], Any], n: int, sync: Callable[[], None] = lambda: None) -> float:
    """Mean seconds of ``fn(i)`` over ``i = 0..n-1`` (``sync`` before starting and stopping the clock)."""
    sync()
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    sync()
    return (time.perf_counter() - start) / n


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def busy_cores() -> float | None:
    """Cores in use by other processes now (``/proc/stat`` over 0.25 s, the engine's measurement); None where it
    cannot be read (the engine falls back to the load average)."""
    from groupdistil.runtime import measure_busy

    busy = measure_busy()
    return round(busy.cores, 2) if busy.source == "/proc/stat" else None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
