"""Where a run executes: the process setup, and the :class:`Runtime` a method is built with.

``setup_process`` holds every process-wide side effect (the torchrun process group, the CPU thread count,
deterministic kernels); the command line calls it once before any run. A :class:`Runtime` is everything a method
needs from its surroundings (device, autocast, the all-reduce, gradient scale and clipping, the optimizer and
scheduler factories, the DDP wrapper): the trainer builds one per run, and a method is complete when constructed.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import Tensor, nn

from . import distributed as dist_utils
from .errors import UserError

Predictor = Callable[[Tensor], dict[str, Tensor]]


def setup_process(train_cfg: dict[str, Any]) -> torch.device:
    """Process-wide setup from a run's ``train`` section; returns the device this process trains on.

    Starts the process group under torchrun (``WORLD_SIZE`` > 1), sets torch's CPU threads (``num_threads`` > 0)
    and asks for deterministic kernels on the CPU, where they exist for every op this project uses.
    """
    device = dist_utils.init_from_env() or pick_device(train_cfg["device"])
    if train_cfg["num_threads"] > 0:
        torch.set_num_threads(train_cfg["num_threads"])
    elif device.type == "cpu":
        cores, load = os.cpu_count() or 1, os.getloadavg()[0]
        free = max(1, int(cores - load + 0.5))
        if free < torch.get_num_threads():  # torch's default (one thread per core) would oversubscribe a busy machine
            print(f"note: the machine is busy (load {load:.1f} on {cores} cores): using {free} torch thread(s) "
                  f"instead of {torch.get_num_threads()}; set train.num_threads to choose", file=sys.stderr)
            torch.set_num_threads(free)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def machine_state(load_at_start: float | None = None) -> dict[str, Any]:
    """What the timings of a run depend on besides the code: torch's CPU threads, the cores, the load averages
    (at the start of training and now). Timings are indicative: on a shared machine they move with the load."""
    cores = os.cpu_count() or 1
    return {"torch_threads": torch.get_num_threads(), "cpu_cores": cores,
            "load_average_at_start": None if load_at_start is None else round(load_at_start, 2),
            "load_average_at_end": round(os.getloadavg()[0], 2),
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
                   grad_clip=float(train_cfg["grad_clip"]), optimizer=partial(build_optimizer, t=train_cfg),
                   scheduler=partial(build_scheduler, t=train_cfg), **kw)

    def predictor(self, model: nn.Module) -> Predictor:
        """``x -> {head: float32 logits}``: ``model`` in eval mode under inference mode and this autocast."""

        def predict(x: Tensor) -> dict[str, Tensor]:
            model.eval()
            with torch.inference_mode(), self.autocast():
                return {k: v.float() for k, v in model(x.to(self.device)).items()}

        return predict


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
