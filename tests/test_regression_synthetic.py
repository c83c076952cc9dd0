"""Cross-machine regression pins of the synthetic datasets (the inputs of every tiny run and of the quickstart).

Pinned in ``tests/golden.json`` (section ``synthetic``), for the data of ``tests/test_golden.py`` (tiny M&Ms,
seed 0; Waterbirds scale 0.02, 40-56 px, seed 0):

- exact: the metadata CSVs (SHA-256), the file list, every M&Ms label volume (SHA-256 of the uint8 voxels),
  the image shapes and dtypes;
- within a tolerance: the M&Ms int16 images (sum and sum of squares of the voxels: float64 noise and scaling are
  rounded to integers, so a voxel may move by one count when numpy's SIMD kernels differ), the voxel-to-world
  affines (stored as float32 in the NIfTI header), and the mean of each decoded Waterbirds JPEG per channel
  (JPEG decoding, polygon rasterisation and float-to-uint8 truncation can move single pixels).

The tolerances are measured (docs/reproducibility.md): with numpy's AVX2/AVX-512 kernels disabled
(``NPY_DISABLE_CPU_FEATURES``), with torch kernels and thread counts changed, and with older numpy / scipy / pillow
(2.2 / 1.16 / 11.3 instead of 2.4 / 1.17 / 13.0) the values above did not move at all; only the pipeline's resized
Waterbirds inputs (Pillow's resampling) moved, by 0.04 on a channel mean. The bands allow a few flipped voxels or
pixels and stay far below any change of the generators (another seed, option or rendering step moves them by
orders of magnitude more).

Regenerate on purpose with ``GROUPDISTIL_UPDATE_GOLDEN=1 python -m pytest tests/test_regression_synthetic.py``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from golden_io import GOLDEN, load_section, write_section
from PIL import Image

from mms_pipeline.pipeline import MMSPipeline
from waterbirds_pipeline.data import decode_image, resize_size
from waterbirds_pipeline.pipeline import WaterbirdsPipeline

UPDATE = os.environ.get("GROUPDISTIL_UPDATE_GOLDEN") == "1"
SECTION = "synthetic"

#: int16 M&Ms images: relative band on the voxel sum and sum of squares (one flipped voxel moves a sum by
#: ~1e-6 of it; measured spread 0)
REL_IMAGE_SUMS = 1e-4
#: affine entries (mm), stored as float32 in the header (one float32 ulp of 120 mm is 7.6e-6)
ABS_AFFINE = 1e-4
#: mean of a decoded Waterbirds JPEG channel, 0-255 (one flipped pixel of a 40 x 40 image moves it by < 0.16;
#: measured spread 0)
ABS_JPEG_MEAN = 0.5

MMS_OPTIONS: dict[str, Any] = {"seed": 0, "tiny": True}
WATERBIRDS_OPTIONS: dict[str, Any] = {"seed": 0, "scale": 0.02, "min_size": 40, "max_size": 56}






def golden_value(section: str, key: str, got: Any) -> Any:
    """The golden value of ``section/key``; with GROUPDISTIL_UPDATE_GOLDEN=1, store ``got`` and return it."""
    if UPDATE:
        values = load_section(section) or {}
        values[key] = json.loads(json.dumps(got))
        write_section(section, values)
        return values[key]
    golden = load_section(section)
    if golden is None or key not in golden:
        pytest.fail(f"{GOLDEN} has no {section}/{key}: run GROUPDISTIL_UPDATE_GOLDEN=1 python -m pytest "
                    f"{Path(__file__).name} once, review the file and commit it")
    return golden[key]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- fingerprints -----------------------------------------------------------------------------------------------
def mms_fingerprint(root: Path) -> dict[str, Any]:
    """``{"csv": sha, "files": [...], "labels": {file: sha}, "images": {file: {shape, dtype, sum, sumsq}},
    "affines": {file: [16 floats]}}`` of a synthetic M&Ms release."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    csvs = [f for f in files if f.endswith(".csv")]
    out: dict[str, Any] = {"files": files, "csv": {f: sha256((root / f).read_bytes()) for f in csvs},
                           "labels": {}, "images": {}, "affines": {}}
    for f in files:
        if not f.endswith(".nii.gz"):
            continue
        img = nib.load(root / f)
        data = np.asarray(img.dataobj)
        if f.endswith("_gt.nii.gz"):
            out["labels"][f] = {"shape": list(data.shape), "dtype": str(data.dtype),
                                "sha256": sha256(np.ascontiguousarray(data).tobytes())}
        else:
            v = data.astype(np.int64)
            out["images"][f] = {"shape": list(data.shape), "dtype": str(data.dtype), "sum": int(v.sum()),
                                "sumsq": int((v * v).sum())}
            out["affines"][f] = [float(x) for x in img.affine.flatten()]
    return out


def waterbirds_fingerprint(root: Path) -> dict[str, Any]:
    """``{"csv": sha, "rows": n, "images": {file: {"size": [w, h], "mean": [r, g, b]}}, "resized": {file: [r, g, b]}}``
    of a synthetic Waterbirds: the decoded JPEGs and the pipeline's resized input (``decode_image`` at the side
    used by the tiny runs, 32 px crops)."""
    meta = root / "metadata.csv"
    with open(meta, newline="") as fh:
        rows = list(csv.DictReader(fh))
    images, resized = {}, {}
    side = resize_size(32)
    for r in rows:
        with Image.open(root / r["img_filename"]) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float64)
            images[r["img_filename"]] = {"size": list(im.size), "mean": [float(m) for m in a.mean(axis=(0, 1))]}
        x = decode_image(root / r["img_filename"], side).double()
        resized[r["img_filename"]] = [float(m) for m in x.mean(dim=(1, 2))]
    return {"csv": sha256(meta.read_bytes()), "rows": len(rows), "images": images, "resized": resized}


def observations(base: Path) -> dict[str, Any]:
    """Synthesize both datasets under ``base`` and fingerprint them (also used to measure the tolerances)."""
    MMSPipeline.synthesize(base / "mms", **MMS_OPTIONS)
    WaterbirdsPipeline.synthesize(base / "wb", **WATERBIRDS_OPTIONS)
    return {"mms": mms_fingerprint(base / "mms"), "waterbirds": waterbirds_fingerprint(base / "wb")}


@pytest.fixture(scope="module")
def fingerprints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return observations(tmp_path_factory.mktemp("synthetic"))


# --- M&Ms ---------------------------------------------------------------------------------------------------------
def test_mms_files_and_metadata_are_exact(fingerprints: dict[str, Any]) -> None:
    got = fingerprints["mms"]
    assert got["files"] == golden_value(SECTION, "mms_files", got["files"])
    assert got["csv"] == golden_value(SECTION, "mms_csv", got["csv"]), "metadata CSV changed"


def test_mms_label_volumes_are_exact(fingerprints: dict[str, Any]) -> None:
    got = fingerprints["mms"]["labels"]
    want = golden_value(SECTION, "mms_labels", got)
    assert sorted(got) == sorted(want)
    changed = [f for f in want if got[f] != want[f]]
    assert not changed, f"label volumes changed: {changed}"


def test_mms_images_match_within_rounding(fingerprints: dict[str, Any]) -> None:
    got = fingerprints["mms"]["images"]
    want = golden_value(SECTION, "mms_images", got)
    assert sorted(got) == sorted(want)
    diffs = []
    for f, w in want.items():
        g = got[f]
        if (g["shape"], g["dtype"]) != (w["shape"], w["dtype"]):
            diffs.append(f"{f}: shape/dtype {g['shape']} {g['dtype']} != {w['shape']} {w['dtype']}")
        for k in ("sum", "sumsq"):
            if not math.isclose(g[k], w[k], rel_tol=REL_IMAGE_SUMS):
                diffs.append(f"{f}: {k} golden {w[k]}, now {g[k]}")
    assert not diffs, "synthetic M&Ms images changed:\n" + "\n".join(diffs)


def test_mms_affines_match(fingerprints: dict[str, Any]) -> None:
    got = fingerprints["mms"]["affines"]
    want = golden_value(SECTION, "mms_affines", got)
    assert sorted(got) == sorted(want)
    bad = [f for f in want if not np.allclose(got[f], want[f], rtol=0, atol=ABS_AFFINE)]
    assert not bad, f"affines changed: {bad}"


# --- Waterbirds ---------------------------------------------------------------------------------------------------
def test_waterbirds_metadata_is_exact(fingerprints: dict[str, Any]) -> None:
    got = fingerprints["waterbirds"]
    assert got["rows"] == golden_value(SECTION, "waterbirds_rows", got["rows"])
    assert got["csv"] == golden_value(SECTION, "waterbirds_csv", got["csv"]), "metadata.csv changed"


def test_waterbirds_images_match_within_tolerance(fingerprints: dict[str, Any]) -> None:
    got = fingerprints["waterbirds"]["images"]
    want = golden_value(SECTION, "waterbirds_images", got)
    assert sorted(got) == sorted(want)
    diffs = [f"{f}: size {got[f]['size']} != {w['size']}" for f, w in want.items() if got[f]["size"] != w["size"]]
    diffs += [f"{f}: channel means golden {w['mean']}, now {got[f]['mean']}" for f, w in want.items()
              if not np.allclose(got[f]["mean"], w["mean"], rtol=0, atol=ABS_JPEG_MEAN)]
    assert not diffs, "synthetic Waterbirds images changed:\n" + "\n".join(diffs[:20])


def test_waterbirds_resized_inputs_match_within_tolerance(fingerprints: dict[str, Any]) -> None:
    """The pipeline's resize (Pillow, bilinear, antialiased) rounds differently between Pillow versions: +-1 in
    about 5% of the uint8 values between Pillow 11.3 and 13.0, 0.04 on a channel mean; the band is 0.5."""
    got = fingerprints["waterbirds"]["resized"]
    want = golden_value(SECTION, "waterbirds_resized", got)
    assert sorted(got) == sorted(want)
    diffs = [f"{f}: channel means golden {w}, now {got[f]}" for f, w in want.items()
             if not np.allclose(got[f], w, rtol=0, atol=ABS_JPEG_MEAN)]
    assert not diffs, "resized Waterbirds inputs changed:\n" + "\n".join(diffs[:20])
