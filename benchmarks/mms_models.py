"""The M&Ms models of the configs side by side: parameters, inference per volume, one training step.

    python benchmarks/mms_models.py [THREADS]

Builds the networks of ``configs/mms_teacher.yaml`` and ``configs/mms.yaml`` as their runs train them
(:meth:`MMSPipeline.build_model <mms_pipeline.pipeline.MMSPipeline.build_model>`). Inference runs as evaluation runs
it (:meth:`groupdistil.runtime.Runtime.predictor`: a channels_last copy with BatchNorm folded into the convolutions)
on one volume of 8 slices of 96 x 96; a training step is batch 16, AdamW, cross-entropy. Teacher and student are
interleaved, 8 repeats each, and the median is printed; the machine's speed can move between runs minutes apart, so
compare numbers of one run, or ranges over several.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the engine and the pipelines even without the editable install

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from groupdistil.runtime import Runtime, count_params  # noqa: E402
from mms_pipeline.pipeline import MMSPipeline  # noqa: E402

CONFIGS = {"teacher": REPO / "configs" / "mms_teacher.yaml", "student": REPO / "configs" / "mms.yaml"}
REPEATS = 8


def build(path: Path) -> tuple[dict, nn.Module]:
    """The ``model`` section of a config (defaults filled) and the network its runs train."""
    cfg = MMSPipeline.with_defaults(yaml.safe_load(path.read_text()))
    return cfg["model"], MMSPipeline.build_model(cfg)


def main(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    models = {role: build(path) for role, path in CONFIGS.items()}
    x, batch = torch.randn(8, 1, 96, 96), torch.randn(16, 1, 96, 96)
    target = torch.randint(0, 4, (16, 96, 96))
    infer: dict[str, list[float]] = {role: [] for role in models}
    train: dict[str, list[float]] = {role: [] for role in models}
    opts = {role: torch.optim.AdamW(net.parameters()) for role, (_, net) in models.items()}
    for _ in range(REPEATS):
        for role, (_, net) in models.items():
            predict = Runtime().predictor(net)
            predict(x)  # warm-up
            start = time.perf_counter()
            predict(x)
            infer[role].append(time.perf_counter() - start)
            net.train()
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(net(batch)["seg"], target)
            opts[role].zero_grad()
            loss.backward()
            opts[role].step()
            train[role].append(time.perf_counter() - start)
    for role, (m, net) in models.items():
        print(f"{role:8s} {m['encoder']:36s} decoder {list(m['decoder_channels'])}: "
              f"{count_params(net) / 1e6:5.2f} M params, {statistics.median(infer[role]) * 1e3:6.1f} ms / volume "
              f"(8 x 96 x 96), {statistics.median(train[role]):5.2f} s / training step (batch 16), "
              f"{threads} thread(s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
