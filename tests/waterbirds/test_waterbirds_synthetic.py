"""Synthetic Waterbirds: release layout, group proportions, balance of val/test, varied sizes, determinism."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groupdistil.errors import UserError
from waterbirds_pipeline import metadata
from waterbirds_pipeline.pipeline import WaterbirdsPipeline
from waterbirds_pipeline.synthetic import REAL_TRAIN, group_counts


def test_default_counts_follow_the_release() -> None:
    counts = group_counts(0.2)
    assert counts["train"] == [700, 37, 11, 211]
    assert counts["val"] == [93, 93, 27, 27] and counts["test"] == [186, 186, 54, 54]
    train = np.array(counts["train"])
    assert np.allclose(train[[0, 3]] / (train[[0, 3]] + train[[1, 2]]), 0.95, atol=0.005)  # 95% on matching place
    assert np.allclose(train / train.sum(), np.array(REAL_TRAIN) / sum(REAL_TRAIN), atol=0.002)


def test_every_group_has_a_few_images() -> None:
    for split, counts in group_counts(0.001, min_per_group=3).items():
        assert min(counts) >= 3, split


def test_layout(synth_root: Path, synth_counts: dict[str, list[int]]) -> None:
    with open(synth_root / metadata.METADATA, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == metadata.COLUMNS
        rows = list(reader)
    assert len(rows) == sum(map(sum, synth_counts.values()))
    assert all("/" in r["img_filename"] and r["img_filename"].endswith(".jpg") for r in rows)
    meta = metadata.read_metadata(synth_root)
    for split in ("val", "test"):  # exactly half of each class on each background
        n = np.bincount(meta.group[meta.where(split)], minlength=4)
        assert n[0] == n[1] and n[2] == n[3], split
    sizes = {Image.open(p).size for p in meta.path}
    assert len(sizes) > len(meta.path) // 2
    assert all(40 <= max(w, h) <= 72 and min(w, h) >= 0.75 * max(w, h) - 1 for w, h in sizes)


def test_deterministic_given_seed(tmp_path: Path) -> None:
    opts = {"scale": 0.001, "min_per_group": 1, "min_size": 24, "max_size": 40}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        WaterbirdsPipeline.synthesize(tmp_path / name, seed, **opts)
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*.jpg"))}  # noqa: E731
    assert (tmp_path / "a" / "metadata.csv").read_bytes() == (tmp_path / "b" / "metadata.csv").read_bytes()
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown Waterbirds synthesis option.*colour.*valid: scale"):
        WaterbirdsPipeline.synthesize(tmp_path, 0, colour="red")
    with pytest.raises(UserError, match="scale > 0"):
        WaterbirdsPipeline.synthesize(tmp_path, 0, scale=0)
