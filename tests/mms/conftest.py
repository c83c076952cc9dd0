"""A tiny synthetic M&Ms-1 release shared by the tests of this folder (generated once per session, ~0.2 s)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from mms_pipeline.data import METADATA_CSV_NAMES
from mms_pipeline.pipeline import MMSPipeline

#: working geometry small enough for the 64 x 64 tiny volumes
TINY_CFG: dict[str, Any] = {"data": {"roi": [64, 64], "spacing": [2.0, 2.0]}, "model": {}, "eval": {}}


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mms_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny release: train A 3 + B 2 labelled, C 1 unlabelled; val 1 per vendor-centre; test 1 per vendor."""
    root = tmp_path_factory.mktemp("mms") / "OpenDataset"
    MMSPipeline.synthesize(root, seed=0, tiny=True)
    return root


def tiny_pipeline(root: Path, **sections: dict[str, Any]) -> MMSPipeline:
    """A pipeline on ``root`` with :data:`TINY_CFG`, each given section updated (``data={"augment": False}``)."""
    cfg = {name: {**values, **sections.get(name, {})} for name, values in TINY_CFG.items()}
    return MMSPipeline(cfg, root)


@pytest.fixture(scope="session")
def make_pipeline() -> Callable[..., MMSPipeline]:
    return tiny_pipeline


@pytest.fixture(scope="session")
def mms_pipeline(mms_root: Path) -> MMSPipeline:
    return tiny_pipeline(mms_root)


class MetadataCsv:
    """Read and rewrite the metadata CSV of a release as raw cells (header, rows)."""

    def __init__(self, root: Path) -> None:
        self.path = root / METADATA_CSV_NAMES[0]

    def read(self) -> tuple[list[str], list[list[str]]]:
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        return rows[0], rows[1:]

    def write(self, header: list[str], rows: list[list[str]]) -> None:
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerows([header, *rows])

    def set(self, code: str, column: str, value: str) -> None:
        header, rows = self.read()
        for r in rows:
            if r[1] == code:
                r[header.index(column)] = value
        self.write(header, rows)


@pytest.fixture(scope="session")
def metadata_csv() -> type[MetadataCsv]:
    return MetadataCsv


@pytest.fixture
def broken_copy(mms_root: Path, tmp_path: Path) -> Callable[[], Path]:
    """A fresh copy of the tiny release to break (under this test's tmp_path)."""

    def make() -> Path:
        dst = tmp_path / "OpenDataset"
        shutil.copytree(mms_root, dst)
        return dst

    return make
