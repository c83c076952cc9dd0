"""What a run prints and logs while it trains: ``train_log.jsonl`` lines (one host sync per flush) and progress."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist_utils
from .errors import UserError

LOG_KEYS_GROUP = ("group_loss", "group_count", "group_signal", "group_weight")


def log(msg: str) -> None:
    """One line on stderr, from the main process only."""
    if dist_utils.is_main():
        print(msg, file=sys.stderr, flush=True)


class StepLogger:
    """Buffers per-step tensors on the device and writes them to ``train_log.jsonl`` in one host sync per flush."""

    def __init__(self, path: Path, enabled: bool, tracker: "Tracker | None" = None) -> None:
        self.path, self.enabled, self.tracker = path, enabled, tracker
        self.buffer: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.last: dict[str, Any] = {}

    def add(self, step: int, values: dict[str, torch.Tensor]) -> None:
        self.buffer.append((step, values))

    def flush(self) -> None:
        """Write buffered lines; raise if a loss was not finite (naming the step)."""
        if not self.buffer:
            return
        keys = list(self.buffer[0][1])
        flat = torch.cat([torch.cat([v[k].reshape(-1).float() for k in keys]) for _, v in self.buffer]).cpu()
        sizes = [self.buffer[0][1][k].numel() for k in keys]
        rows = flat.view(len(self.buffer), -1).tolist()
        lines = []
        for (step, _), row in zip(self.buffer, rows):
            rec: dict[str, Any] = {"step": step}
            pos = 0
            for k, n in zip(keys, sizes):
                vals = row[pos:pos + n]
                pos += n
                rec[k] = vals if k in LOG_KEYS_GROUP else vals[0]
            lines.append(rec)
        self.buffer.clear()
        bad = next((r for r in lines if not math.isfinite(r["loss"])), None)
        if self.enabled:
            good = lines if bad is None else [r for r in lines if r["step"] < bad["step"]]
            with open(self.path, "a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in good)
                fh.flush()
                os.fsync(fh.fileno())
            if self.tracker is not None:  # the same host values: no further device synchronisation
                for r in good:
                    self.tracker.train_record(r)
        if bad is not None:
            raise UserError(f"non-finite loss ({bad['loss']}) at step {bad['step']}; training stopped, the last "
                            f"good checkpoint is kept (lower train.lr or check the data)")
        self.last = lines[-1]



class Progress:
    """tqdm on a terminal; plain periodic lines otherwise (logs of batch jobs stay readable)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled, self.total = enabled, total
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.t0, self.start = time.time(), start
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, info: dict[str, Any], every: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if info and step % every == 0:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()})
        elif self.enabled and step % every == 0:
            rate = (step - self.start) / max(1e-9, time.time() - self.t0)
            extra = " ".join(f"{k} {v:.4g}" for k, v in info.items())
            log(f"step {step}/{self.total} {extra} ({rate:.2f} steps/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Tracker:
    """TensorBoard event files in ``RUN_DIR/tensorboard`` (``train.tensorboard: true``; the ``tracking`` extra).

    Tags: ``train/<key>`` for every logged scalar (``train/loss``, ``train/seg/dice``, ...), ``train/<key>/<group>``
    for the per-group vectors (``group_loss``, ``group_count``, ``group_signal``, ``group_weight``),
    ``val/worst_group_metric``, ``val/average_metric``, ``val/group_metric/<group>``, and the report's PNG figures
    as images. ``train_log.jsonl`` and ``eval_log.jsonl`` stay the source of truth; a resumed run purges the events
    after its checkpoint's step.
    """

    def __init__(self, folder: Path, group_names: list[str], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.groups = group_names
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def train_record(self, rec: dict[str, Any]) -> None:
        """One event per step holding all of the step's scalars (the tags ``add_scalar`` would write, read back the
        same by TensorBoard): the cost of an event is mostly per event, so one per step is much cheaper than one
        ``add_scalar`` event per value (measured: ``benchmarks/README.md``)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = []
        for k, v in rec.items():
            if k == "step":
                continue
            if isinstance(v, list):
                values += [Summary.Value(tag=f"train/{k}/{g}", simple_value=float(x)) for g, x in zip(self.groups, v)]
            else:
                values.append(Summary.Value(tag=f"train/{k}", simple_value=float(v)))
        self.writer._get_file_writer().add_summary(Summary(value=values), rec["step"])

    def validation(self, step: int, metrics: dict[str, Any]) -> None:
        for k in ("worst_group_metric", "average_metric"):
            self.writer.add_scalar(f"val/{k}", float(metrics[k]), step)
        for g, v in (metrics.get("group_metric") or {}).items():
            self.writer.add_scalar(f"val/group_metric/{g}", float(v), step)
        self.writer.flush()

    def figures(self, folder: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        for png in sorted(Path(folder).glob("*.png")):
            with Image.open(png) as im:
                self.writer.add_image(f"report/{png.stem}", np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def tracking_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def progress_iter(items: list, desc: str, enabled: bool = True):
    """Iterate ``items`` with progress on the main process: tqdm on a terminal, else a line at 25/50/75/100%."""
    if not enabled or not dist_utils.is_main():
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        return
    n, t0, marks = len(items), time.time(), {max(1, round(len(items) * f)) for f in (0.25, 0.5, 0.75, 1.0)}
    for k, item in enumerate(items, 1):
        yield item
        if k in marks:
            log(f"{desc}: {k}/{n} ({time.time() - t0:.0f}s)")
