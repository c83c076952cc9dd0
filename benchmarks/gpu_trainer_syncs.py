"""Does the trainer's training step make the host wait for the GPU? (issue 17: "no per-step host-device sync")

    python benchmarks/gpu_trainer_syncs.py CONFIG.yaml --data-root DIR --out DIR [--teacher RUN] [--method M]
                                           [--set key=value ...] [--steps 8] [--cpu-dry-run]

Builds the real :class:`~groupdistil.trainer.Trainer` of ``groupdistil run`` (same config resolution), takes its
DataLoader, runs 3 warm-up steps, then ``--steps`` steps of exactly what the training loop does between two log
flushes (batch to the device, channels_last, ``Method.update``, ``StepLogger.add``) under
``torch.cuda.set_sync_debug_mode("error")``: CUDA raises at the first call that synchronises. Prints one JSON line:
``{"host_syncs": "none" | "<the first synchronising call>", ...}``. Needs a CUDA device (exits 2 otherwise);
``--cpu-dry-run`` runs the same steps on the CPU without the check (``host_syncs`` null), to test the script.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True, help="a new run folder (only config.yaml is written)")
    p.add_argument("--teacher")
    p.add_argument("--method")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cpu-dry-run", action="store_true")
    args = p.parse_args(argv)
    cuda = not args.cpu_dry_run
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 2
    from groupdistil.config import parse_set, resolve_config
    from groupdistil.pipeline import get_pipeline
    from groupdistil.progress import StepLogger
    from groupdistil.runtime import setup_process
    from groupdistil.trainer import Trainer

    overrides = parse_set(args.set)
    overrides.setdefault("train", {})["device"] = "cuda" if cuda else "cpu"
    if args.method:
        overrides["method"] = args.method
    cfg = resolve_config(args.config, overrides)
    setup_process(cfg["train"])
    trainer = Trainer(cfg, get_pipeline(cfg["pipeline"]), Path(args.data_root), Path(args.out), args.teacher)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    training = trainer.build("new")
    logger = StepLogger(Path(args.out) / "train_log.jsonl", True, None)
    batches = iter(training.loader(0))
    device, t = trainer.device, trainer.t

    def step(i: int) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        if cuda and t["channels_last"]:
            batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
        logger.add(i, training.method.update(batch))

    for i in range(3):
        step(i)
    logger.flush()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    result = {"config": args.config, "method": cfg["method"], "steps": args.steps,
              "host_syncs": "none" if cuda else None}
    start = time.perf_counter()
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3, 3 + args.steps):
            step(i)
    except RuntimeError as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "groupdistil" in f.filename]
        where = f" at {frames[-1].filename.split('groupdistil')[-1]}:{frames[-1].lineno}" if frames else ""
        result["host_syncs"] = str(exc).splitlines()[0][:200] + where
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    sync()
    result["seconds_per_step"] = round((time.perf_counter() - start) / args.steps, 4)
    logger.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
