"""A tiny synthetic Waterbirds shared by the tests of this folder (generated once per session)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from waterbirds_pipeline.pipeline import WaterbirdsPipeline
from waterbirds_pipeline.synthetic import group_counts

SCALE = 0.02  # 99 train, 26 val, 52 test images
SIZES = {"min_size": 40, "max_size": 72}


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("waterbirds") / "waterbird_complete95_forest2water2"
    WaterbirdsPipeline.synthesize(root, seed=0, scale=SCALE, **SIZES)
    return root


@pytest.fixture(scope="session")
def synth_counts() -> dict[str, list[int]]:
    """Images per group of each split of ``synth_root``."""
    return group_counts(SCALE)


@pytest.fixture(scope="session")
def pipeline(synth_root: Path) -> WaterbirdsPipeline:
    cfg = {"data": {"image_size": 32, "augment": True}, "model": {"arch": "resnet18"}, "eval": {"batch_size": 16}}
    return WaterbirdsPipeline(cfg, synth_root)
