"""GPU benchmark (one card, about 3 minutes): the Waterbirds-style distillation step, ResNet-18 student and
ResNet-50 teacher at 224 x 224, batch 128, through the engine's real ``Method.update``.

    python benchmarks/gpu.py [--batch-size 128] [--image-size 224] [--steps 25] [--repeats 5]
    python benchmarks/gpu.py --cpu-dry-run      # the same logic on CPU at tiny sizes (no numbers worth reading)

Measures, on preloaded random batches already on the GPU (no data loading):

- images/s of the groupdistil step (teacher forward inside the step) in fp32 (torch defaults: cuDNN may use TF32
  for convolutions; the flags are printed) and in bf16 autocast with channels_last (the trainer's CUDA setting);
- the share of step time the GPU is busy: the union of the CUDA kernel/memcpy intervals of profiled steps
  (``torch.profiler``) over the wall time of an unprofiled step;
- ``groupdistil_over_kd_step`` on GPU (bf16 + channels_last) with the teacher's outputs cached (as the trainer
  does for deterministic data: the strict case) and with the teacher forward in the step;
- ``host_syncs``: whether a step of each variant runs without any host-device synchronisation
  (``torch.cuda.set_sync_debug_mode("error")`` around a few steps after the warm-up: "none", or the first
  synchronising call's message).

Depends only on torch, torchvision and the engine's pure-torch parts (``groupdistil.methods``, ``.weighting``,
``.teacher``). ``groupdistil.losses`` imports MONAI for its Dice loss; where MONAI is absent a stand-in that fails
if called is registered first (this benchmark has a classification head only, so the Dice loss never runs).
Prints a table, then one JSON line (last line of stdout).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
import torchvision  # noqa: E402
from timing import interleaved, machine_info, median, paired_ratio, seconds_per_call  # noqa: E402
from torch import nn  # noqa: E402

N_GROUPS = 4  # Waterbirds: (landbird, waterbird) x (land, water)
N_CLASSES = 2
TRAIN_COUNTS = [3498, 184, 56, 1057]  # Waterbirds training group sizes (only the adjustment would read them)
#: configs/waterbirds.yaml: loss, method_args and optimizer (SGD) of the student
LOSS = {"alpha": 0.5, "tau": 4.0, "lambda_dice": 1.0, "lambda_ce": 1.0, "lambda_kd": 1.0}
HPARAMS = {"eta": 0.01}
SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1.0e-4}


def import_engine() -> dict[str, Any]:
    """``METHODS``, ``TaskLoss`` and ``Teacher`` (the engine imports MONAI only for segmentation heads, so this
    classification benchmark runs where MONAI is not installed)."""
    from groupdistil.losses import TaskLoss
    from groupdistil.methods import METHODS
    from groupdistil.runtime import Runtime
    from groupdistil.teacher import Teacher

    return {"METHODS": METHODS, "TaskLoss": TaskLoss, "Teacher": Teacher, "Runtime": Runtime}


class Classifier(nn.Module):
    """A torchvision backbone returning ``{"cls": logits}`` (as ``waterbirds_pipeline.models.Classifier``)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": self.backbone(x)}


class Variant:
    """One (method, precision, teacher cache) setting: a fresh student, its method, and preloaded batches.

    ``teacher_model`` is shared between variants and must already be in the variant's memory format.
    """

    def __init__(self, engine: dict[str, Any], method: str, bf16: bool, cached: bool, teacher_model: nn.Module,
                 batches: list[dict[str, torch.Tensor]], device: torch.device) -> None:
        fmt = torch.channels_last if bf16 else torch.contiguous_format
        autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16) if bf16 else nullcontext
        torch.manual_seed(0)
        student = Classifier(torchvision.models.resnet18(num_classes=N_CLASSES)).to(device, memory_format=fmt)
        teacher = engine["Teacher"](teacher_model, autocast)
        criterion = engine["TaskLoss"]({"cls": 1.0}, LOSS)
        runtime = engine["Runtime"](device=device, autocast=autocast,
                                    optimizer=lambda params: torch.optim.SGD(params, **SGD))
        hparams = {k: v for k, v in HPARAMS.items() if k in engine["METHODS"].get(method).hparams_spec}
        self.method = engine["METHODS"].get(method)(student, criterion, N_GROUPS, TRAIN_COUNTS, hparams,
                                                    teacher=teacher, runtime=runtime).to(device)
        self.batches = [{**b, "x": b["x"].contiguous(memory_format=fmt)} for b in batches]
        if cached:  # what Teacher.build_cache stores on a GPU: fp16 logits indexed by the sample index
            n = sum(len(b["index"]) for b in batches)
            cache = torch.empty(n, N_CLASSES, dtype=torch.float16, device=device)
            for b in self.batches:
                cache[b["index"]] = teacher(b)["cls"].to(torch.float16)
            teacher.cache = {"cls": cache}

    def step(self, i: int) -> None:
        self.method.update(self.batches[i % len(self.batches)])


def make_batches(n: int, batch: int, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(batch, 3, size, size, generator=g).to(device),
             "cls": torch.randint(0, N_CLASSES, (batch,), generator=g).to(device),
             "group": torch.randint(0, N_GROUPS, (batch,), generator=g).to(device),
             "index": torch.arange(k * batch, (k + 1) * batch, device=device)} for k in range(n)]


def host_syncs(variant: Variant, steps: int, device: torch.device) -> str | None:
    """"none" when ``steps`` steps of ``variant`` ran with no host-device synchronisation (CUDA's sync debug mode
    raises at the first one; its message is returned); ``None`` on the CPU dry run (nothing to check)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(steps):
            variant.step(i)
    except RuntimeError as exc:
        return str(exc).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return "none"


def busy_seconds(variant: Variant, steps: int, device: torch.device) -> float | None:
    """Seconds per step during which the device runs work: the union of the profiler's device-event intervals
    (CUDA kernels, copies, memsets; on the CPU dry run: CPU ops) over ``steps`` profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    kind = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    with profile(activities=activities) as prof:
        for i in range(steps):
            variant.step(i)
        sync(device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == kind)
    total, end = 0.0, float("-inf")
    for s, e in spans:  # union of intervals, in microseconds
        if e > end:
            total += e - max(s, end)
            end = e
    return total / steps * 1e-6 if spans else None  # None: the profiler recorded no device events


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(variants: dict[str, Variant], steps: int, device: torch.device) -> dict[str, float | None]:
    """Run each variant's first steps one variant at a time; returns its peak device memory (GiB; None on CPU)."""
    peak = {}
    for name, v in variants.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(steps):
            v.step(i)
        sync(device)
        peak[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    return peak


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=25, help="timed steps per variant and repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--cpu-dry-run", action="store_true", help="run the logic on CPU at tiny sizes (no CUDA needed)")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        args.batch_size, args.image_size, args.steps, args.repeats, args.warmup, args.profile_steps = 4, 32, 2, 2, 1, 2
    return args


def measure(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    engine = import_engine()
    torch.manual_seed(0)
    teacher_fp32 = Classifier(torchvision.models.resnet50(num_classes=N_CLASSES)).to(device)
    teachers = {False: teacher_fp32, True: copy.deepcopy(teacher_fp32).to(memory_format=torch.channels_last)}
    batches = make_batches(4, args.batch_size, args.image_size, device)
    specs = {"gd_fp32": ("groupdistil", False, False), "gd_bf16": ("groupdistil", True, False),
             "kd_bf16": ("kd", True, False), "gd_bf16_cached": ("groupdistil", True, True),
             "kd_bf16_cached": ("kd", True, True)}
    variants = {name: Variant(engine, m, bf16, cached, teachers[bf16], batches, device)
                for name, (m, bf16, cached) in specs.items()}
    peak = warm_up(variants, args.warmup, device)

    def timer(v: Variant) -> Callable[[], float]:
        return lambda: seconds_per_call(v.step, args.steps, lambda: sync(device))

    t = interleaved({name: timer(v) for name, v in variants.items()}, args.repeats)
    busy = {name: busy_seconds(variants[name], args.profile_steps, device) for name in ("gd_fp32", "gd_bf16")}
    syncs = {name: host_syncs(v, 3, device) for name, v in variants.items()}
    b = args.batch_size
    return {
        "images_per_s_fp32": b / median(t["gd_fp32"]),
        "images_per_s_bf16_channels_last": b / median(t["gd_bf16"]),
        "bf16_speedup": paired_ratio(t["gd_fp32"], t["gd_bf16"]),
        **{f"gpu_busy_share_{p}": None if busy[f"gd_{p}"] is None else busy[f"gd_{p}"] / median(t[f"gd_{p}"])
           for p in ("fp32", "bf16")},
        "groupdistil_over_kd_step": paired_ratio(t["gd_bf16_cached"], t["kd_bf16_cached"]),
        "groupdistil_over_kd_step_uncached": paired_ratio(t["gd_bf16"], t["kd_bf16"]),
        "step_ms": {name: round(median(v) * 1e3, 2) for name, v in t.items()},
        "step_ms_spread": {name: [round(min(v) * 1e3, 2), round(max(v) * 1e3, 2)] for name, v in t.items()},
        "host_syncs": syncs,
        "peak_memory_gib": peak,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        msg = "no CUDA device: benchmarks/gpu.py needs a GPU (use --cpu-dry-run to check its logic on CPU)"
        print(f"error: {msg}", file=sys.stderr)
        print(json.dumps({"error": msg}))
        return 2
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    start = time.perf_counter()
    out = measure(args, device)
    info = machine_info(device)
    info.update({"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                 "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn_benchmark": torch.backends.cudnn.benchmark})
    print(f"GroupDistil GPU benchmark on {info.get('device_name', 'CPU (dry run)')}: ResNet-18 student / ResNet-50 "
          f"teacher, {args.image_size} px, batch {args.batch_size}, torch {info['torch']}"
          + (" -- CPU DRY RUN: numbers are meaningless" if args.cpu_dry_run else ""))
    for key, value in out.items():
        shown = f"{value:.3f}" if isinstance(value, float) else json.dumps(value)
        print(f"  {key:36s} {shown}")
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    out.update({"device_name": info.get("device_name"), "dry_run": args.cpu_dry_run, "machine": info,
                "sizes": {"batch": args.batch_size, "image": args.image_size, "steps": args.steps,
                          "repeats": args.repeats}, "seconds": round(time.perf_counter() - start, 1)})
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
