"""Where a run executes: the process setup, and the :class:`Runtime` a method is built with.

``setup_process`` holds every process-wide side effect (the torchrun process group, the CPU thread count,
deterministic kernels); the command line calls it once before any run. A :class:`Runtime` is everything a method
needs from its surroundings (device, autocast, the all-reduce, gradient scale and clipping, the optimizer and
scheduler factories, the DDP wrapper): the trainer builds one per run, and a method is complete when constructed.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from .errors import UserError
from .fold import fold_for_inference

Predictor = Callable[[Tensor], dict[str, Tensor]]


def setup_process(train_cfg: dict[str, Any]) -> torch.device:
    """Process-wide setup from a run's ``train`` section; returns the device this process trains on.

    Starts the process group under torchrun (``WORLD_SIZE`` > 1), sets torch's CPU threads (``num_threads`` > 0, or
    :func:`free_threads` of the CPU time other processes use now) and asks for deterministic kernels on the CPU,
    where they exist for every op this project uses.
    """
    device = dist_utils.init_from_env() or pick_device(train_cfg["device"])
    _SETUP_STATE.clear()
    if train_cfg["num_threads"] > 0:
        torch.set_num_threads(train_cfg["num_threads"])
    elif device.type == "cpu":
        cores, default = os.cpu_count() or 1, _default_threads()
        busy = measure_busy()
        _SETUP_STATE.update(busy_cores_at_start=round(busy.cores, 2), busy_measured_by=busy.source)
        threads = min(default, free_threads(busy.cores, cores))
        if threads < default:  # torch's default (one thread per core) would oversubscribe a busy machine
            print(f"note: the machine is busy ({busy.describe(cores)}): using {threads} torch "
                  f"thread(s) instead of {default}; set train.num_threads to choose", file=sys.stderr)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


#: what :func:`setup_process` measured in this process (``timing.json`` records it through :func:`machine_state`)
_SETUP_STATE: dict[str, Any] = {}


@lru_cache(maxsize=1)
def _default_threads() -> int:
    """torch's own CPU thread count (one per core, or ``OMP_NUM_THREADS``), read before setup_process changes it."""
    return torch.get_num_threads()


# --- how busy the machine is now -------------------------------------------------------------------------------
#: seconds between the two /proc/stat samples of :func:`measure_busy`
BUSY_INTERVAL = 0.25


@dataclass(frozen=True)
class CpuSample:
    """The aggregate ``cpu`` line of ``/proc/stat``: jiffies since boot, all cores together."""

    total: int  # user + nice + system + idle + iowait + irq + softirq + steal (guest time is inside user / nice)
    idle: int  # idle + iowait
    cores: int  # the number of ``cpuN`` lines


@dataclass(frozen=True)
class Busy:
    """Cores in use by other processes, and how that was measured (``/proc/stat`` or the load average)."""

    cores: float
    source: str

    def describe(self, cores: int) -> str:
        if self.source == "load average":
            return f"load {self.cores:.1f} on {cores} cores"
        return f"{self.cores:.1f} of {cores} cores in use by other processes"


def parse_proc_stat(text: str) -> CpuSample | None:
    """The ``cpu`` line of a ``/proc/stat`` text (``cpu user nice system idle iowait irq softirq steal ...``);
    None when there is none or it is malformed."""
    total = idle = None
    cores = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "cpu" and len(fields) >= 5:
            try:
                values = [int(v) for v in fields[1:9]]
            except ValueError:
                return None
            total = sum(values)
            idle = values[3] + (values[4] if len(values) > 4 else 0)
        elif fields[0].startswith("cpu") and fields[0][3:].isdigit():
            cores += 1
    if total is None or idle is None:
        return None
    return CpuSample(total, idle, max(cores, 1))


def busy_cores(first: CpuSample, second: CpuSample) -> float:
    """Cores busy between two samples: ``(dtotal - didle) / dtotal * cores`` (``didle`` counts iowait), in
    ``[0, cores]``; 0 when no time passed."""
    d_total, d_idle = second.total - first.total, second.idle - first.idle
    if d_total <= 0:
        return 0.0
    return min(max((d_total - d_idle) / d_total, 0.0), 1.0) * second.cores


def free_threads(busy: float, cores: int) -> int:
    """Threads that do not oversubscribe: ``max(1, round(cores - busy))`` (halves round up)."""
    return max(1, int(cores - busy + 0.5))


def read_proc_stat(path: str = "/proc/stat") -> CpuSample | None:
    try:
        with open(path) as fh:
            return parse_proc_stat(fh.read())
    except OSError:
        return None


def measure_busy(interval: float | None = None, path: str = "/proc/stat") -> Busy:
    """The CPU time other processes use now: two ``/proc/stat`` samples ``interval`` seconds apart (this process
    sleeps in between, so it does not count itself); where there is no ``/proc/stat`` (macOS), the 1-minute load
    average (which lags: it reads about 1 for a minute after a job has ended). ``interval``: :data:`BUSY_INTERVAL`
    unless given."""
    first = read_proc_stat(path)
    if first is not None:
        time.sleep(BUSY_INTERVAL if interval is None else interval)
        second = read_proc_stat(path)
        if second is not None:
            return Busy(busy_cores(first, second), "/proc/stat")
    return Busy(load_average() or 0.0, "load average")


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_state(load_at_start: float | None = None, runtime: "Runtime | None" = None) -> dict[str, Any]:
    """What the timings of a run depend on besides the code: torch's CPU threads, the cores, the load averages
    (at the start of training and now), the cores other processes used when the threads were chosen
    (``busy_cores_at_start``, from :func:`setup_process`; None when the threads were set by the config or the run
    is not on the CPU) and, with ``runtime``, the device and precision the evaluations ran with. Timings are
    indicative: on a shared machine they move with the load."""
    cores = os.cpu_count() or 1
    end = load_average()
    where = {} if runtime is None else {"device": runtime.device.type, "precision": runtime.precision}
    return {**where, "torch_threads": torch.get_num_threads(), "cpu_cores": cores,
            "load_average_at_start": None if load_at_start is None else round(load_at_start, 2),
            "load_average_at_end": None if end is None else round(end, 2),
            "busy_cores_at_start": _SETUP_STATE.get("busy_cores_at_start"),
            "busy_measured_by": _SETUP_STATE.get("busy_measured_by"),
            "note": "indicative: timings depend on threads and on other work on the machine (load average)"}


def pick_device(name: str) -> torch.device:
    if dist_utils.is_distributed():
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def _identity(x: Any) -> Any:
    return x


def _sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3)


@dataclass(frozen=True)
class Runtime:
    """Everything a method needs from where it runs. The defaults describe one CPU process in float32 with plain
    SGD (lr 1e-3) and no scheduler, which is what unit tests want."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: Callable[[], ContextManager] = nullcontext
    precision: str = "float32"  # what ``autocast`` computes in: float32 (none) or bfloat16
    #: sums a tensor over processes (all-reduce under torchrun, identity otherwise)
    reduce: Callable[[Tensor], Tensor] = _identity
    #: multiplies the objective: the world size under DDP, whose gradient averaging divides by it
    grad_scale: float = 1.0
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = _sgd
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    #: wraps the student for the forward pass (DistributedDataParallel under torchrun)
    wrap: Callable[[nn.Module], nn.Module] = _identity

    @classmethod
    def for_run(cls, train_cfg: dict[str, Any], device: torch.device) -> "Runtime":
        """The runtime of a run: from its ``train`` section, on ``device``, DDP-aware."""
        amp = device.type == "cuda" and train_cfg["amp"]
        kw: dict[str, Any] = {}
        if dist_utils.is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            kw = {"reduce": dist_utils.all_reduce_sum, "grad_scale": float(dist_utils.world_size()),
                  "wrap": partial(DDP, device_ids=ids)}
        return cls(device=device,
                   autocast=partial(torch.autocast, "cuda", dtype=torch.bfloat16) if amp else nullcontext,
                   precision="bfloat16" if amp else "float32",
                   grad_clip=float(train_cfg["grad_clip"]), optimizer=partial(build_optimizer, t=train_cfg),
                   scheduler=partial(build_scheduler, t=train_cfg), **kw)

    def predictor(self, model: nn.Module) -> Predictor:
        """``x -> {head: float32 logits}``: ``model`` in eval mode under inference mode and this autocast.

        On the CPU the predictor runs a channels_last copy of ``model`` as it is now (the trainer makes one predictor
        per evaluation; make a new one after the weights change) with its BatchNorms folded into the convolutions
        that feed them (:func:`groupdistil.fold.fold_for_inference`: checked on a small synthetic input, the unfolded
        copy kept when the outputs differ): the few-channel, full-resolution convolutions of a small student run faster
        in that layout, and the folded copy runs no BatchNorm kernels (``benchmarks/README.md``). The logits agree with
        ``model``'s to float32 rounding, and the trained model itself is untouched (CPU training is unchanged).
        Elsewhere ``model`` is used as it is (the trainer already keeps CUDA models channels_last with
        ``train.channels_last``)."""
        net = _channels_last_copy(model) if self.device.type == "cpu" else model
        last = _is_channels_last(net)
        if net is not model:  # our own copy
            net = fold_for_inference(net)

        def predict(x: Tensor) -> dict[str, Tensor]:
            net.eval()
            x = x.to(self.device)
            if last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), self.autocast():
                return {k: v.float() for k, v in net(x).items()}

        return predict


def _is_channels_last(model: nn.Module) -> bool:
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.parameters())


def _channels_last_copy(model: nn.Module) -> nn.Module:
    """A channels_last copy of a module with 2-D convolutions (its 4-D weights); ``model`` itself otherwise (no such
    weights, or a module that cannot be copied, e.g. some TorchScript modules)."""
    if not isinstance(model, nn.Module) or not any(p.dim() == 4 and p.shape[1] * p.shape[2] * p.shape[3] > 1
                                                   for p in model.parameters()):
        return model
    try:
        net = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - an uncopyable module is used as it is
        return model
    return net.to(memory_format=torch.channels_last)


def build_optimizer(params: Iterable[nn.Parameter], t: dict[str, Any]) -> torch.optim.Optimizer:
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    return torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Linear warm-up over ``warmup`` steps, then ``constant``, ``cosine`` (to 0) or ``linear`` (to 0)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))
    if kind == "linear":
        return max(0.0, 1.0 - p)
    return 1.0


def build_scheduler(opt: torch.optim.Optimizer, t: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    f = partial(lr_factor, total=t["max_steps"], warmup=t["warmup_steps"], kind=t["schedule"])
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
