"""Timing helpers shared by ``run.py`` (CPU) and ``gpu.py``: pure Python + torch, nothing else.

Every measurement is taken as *interleaved repeats*: each repeat runs every variant once, in an order rotated by
one each repeat, so slow drifts of the machine (other processes, thermal state) hit all variants alike. Ratios are
medians over repeats of the per-repeat ratio (paired), or of the per-variant medians where variants are not paired.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping

import torch


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> str:
    """``min-max`` of a list of seconds, as a short string for the table's notes."""
    return f"{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f} ms"


def interleaved(variants: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every variant once per repeat (order rotated each repeat); each returns its own measured seconds."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(float(variants[name]()))
    return out


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of ``num[i] / den[i]``."""
    return median([a / b for a, b in zip(num, den)])


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
