"""The synthetic release matches the real M&Ms-1 layout, CSV format and quirks, and is a pure function of its seed."""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from groupdistil.errors import UserError
from mms_pipeline.data import ALL_COLUMNS, METADATA_CSV_NAMES, VENDOR_CENTRES, VENDOR_NAMES
from mms_pipeline.pipeline import MMSPipeline
from mms_pipeline.synth import ANATOMY, contraction, phantom_labels


def _rows(root: Path) -> dict[str, dict[str, str]]:
    with open(root / METADATA_CSV_NAMES[0], newline="") as fh:
        return {r["External code"]: r for r in csv.DictReader(fh)}


def _folders(root: Path) -> dict[str, str]:
    """code -> release folder (relative)."""
    out = {}
    for rel in ("Training/Labeled", "Training/Unlabeled", "Validation", "Testing"):
        for d in (root / rel).iterdir():
            out[d.name] = rel
    return out


def test_csv_has_the_real_name_and_columns(mms_root: Path, metadata_csv) -> None:
    assert (mms_root / METADATA_CSV_NAMES[0]).is_file()
    header, rows = metadata_csv(mms_root).read()
    assert header == ["", *ALL_COLUMNS]  # leading unnamed index column, then the 11 named columns
    assert [r[0] for r in rows] == [str(i) for i in range(len(rows))]
    assert any(r[header.index("Height")] == "" or r[header.index("Weight")] == "" for r in rows)  # gaps
    assert all(len(r[1]) == 6 and r[1].isalnum() for r in rows)


def test_layout_vendors_and_files(mms_root: Path) -> None:
    rows, folders = _rows(mms_root), _folders(mms_root)
    assert set(rows) == set(folders)
    by_folder: dict[str, set[str]] = {}
    for code, rel in folders.items():
        row = rows[code]
        by_folder.setdefault(rel, set()).add(row["Vendor"])
        assert row["VendorName"] == VENDOR_NAMES[row["Vendor"]]
        assert int(row["Centre"]) in VENDOR_CENTRES[row["Vendor"]]
        files = sorted(p.name for p in (mms_root / rel / code).iterdir())
        expected = [f"{code}_sa.nii.gz"] + ([] if rel == "Training/Unlabeled" else [f"{code}_sa_gt.nii.gz"])
        assert files == sorted(expected)
    assert by_folder == {"Training/Labeled": {"A", "B"}, "Training/Unlabeled": {"C"},
                         "Validation": {"A", "B", "C", "D"}, "Testing": {"A", "B", "C", "D"}}
    val_centres = {int(rows[c]["Centre"]) for c, rel in folders.items() if rel == "Validation"}
    assert val_centres == {1, 2, 3, 4, 5, 6}


def test_volumes_are_4d_with_labels_only_at_ed_and_es(mms_root: Path) -> None:
    rows, folders = _rows(mms_root), _folders(mms_root)
    means: dict[str, list[float]] = {}
    for code, rel in folders.items():
        ed, es = int(rows[code]["ED"]), int(rows[code]["ES"])
        img = nib.load(mms_root / rel / code / f"{code}_sa.nii.gz")
        assert img.ndim == 4 and img.get_data_dtype() == np.int16 and ed != es
        means.setdefault(rows[code]["Vendor"], []).append(float(np.asarray(img.dataobj).mean()))
        if rel == "Training/Unlabeled":
            continue
        gt = np.asarray(nib.load(mms_root / rel / code / f"{code}_sa_gt.nii.gz").dataobj)
        assert gt.shape == img.shape
        annotated = [t for t in range(gt.shape[3]) if gt[..., t].any()]
        assert annotated == sorted({ed, es})
        assert set(np.unique(gt[..., ed])) == {0, 1, 2, 3}
        lv = [np.count_nonzero(gt[..., t] == 1) for t in (ed, es)]
        assert lv[1] < lv[0]  # the LV contracts from ED to ES
        if rows[code]["Vendor"] == "B":
            assert ed >= gt.shape[3] - 2  # Philips: ED among the last frames
        if rows[code]["Vendor"] == "A":
            assert ed == 0
    vendor_means = {v: np.mean(m) for v, m in means.items()}
    assert max(vendor_means.values()) / min(vendor_means.values()) > 10


def test_val_and_test_affines_are_sheared_and_refused_by_itk(mms_root: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    folders = _folders(mms_root)
    for code, rel in folders.items():
        img = nib.load(mms_root / rel / code / f"{code}_sa.nii.gz")
        cosines = img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0)
        orthonormal = np.allclose(cosines.T @ cosines, np.eye(3), atol=1e-4)
        assert orthonormal == rel.startswith("Training"), (code, rel)
    code = next(c for c, rel in folders.items() if rel == "Testing")
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(mms_root / "Testing" / code / f"{code}_sa.nii.gz"))


def test_deterministic_in_seed(tmp_path: Path, mms_root: Path) -> None:
    MMSPipeline.synthesize(tmp_path / "again", seed=0, tiny=True)
    MMSPipeline.synthesize(tmp_path / "other", seed=1, tiny=True)
    csv_name = METADATA_CSV_NAMES[0]
    assert (tmp_path / "again" / csv_name).read_bytes() == (mms_root / csv_name).read_bytes()
    assert (tmp_path / "other" / csv_name).read_bytes() != (mms_root / csv_name).read_bytes()
    code, rel = next(iter(_folders(mms_root).items()))
    a = nib.load(mms_root / rel / code / f"{code}_sa.nii.gz")
    b = nib.load(tmp_path / "again" / rel / code / f"{code}_sa.nii.gz")
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.array_equal(a.affine, b.affine)


def test_options_are_checked(tmp_path: Path, mms_root: Path) -> None:
    with pytest.raises(UserError, match="unknown synthesize option"):
        MMSPipeline.synthesize(tmp_path / "x", tiny=True, size=3)
    with pytest.raises(UserError, match="empty or new folder"):
        MMSPipeline.synthesize(mms_root, tiny=True)
    with pytest.raises(UserError, match="train_counts"):
        MMSPipeline.synthesize(tmp_path / "y", tiny=True, train_counts={"E": 2})


def test_contraction_is_zero_at_ed_and_one_at_es() -> None:
    c = contraction(10, ed=9, es=3)
    assert c[9] == pytest.approx(0) and c[3] == pytest.approx(1) and np.all((c >= 0) & (c <= 1))


def test_pathology_geometry() -> None:
    """DCM: larger LV blood pool and lower ejection than HCM; HCM: more myocardium per blood volume."""

    def volumes(pathology: str) -> tuple[float, float, float]:
        lab = phantom_labels((96, 96, 6), (1.5, 1.5), ANATOMY[pathology], np.array([0.0, 1.0]),
                             np.random.default_rng(0))
        lv_ed, lv_es = (np.count_nonzero(lab[..., t] == 1) for t in (0, 1))
        return lv_ed, (lv_ed - lv_es) / lv_ed, np.count_nonzero(lab[..., 0] == 2) / lv_ed

    dcm, hcm = volumes("DCM"), volumes("HCM")
    assert dcm[0] > 2 * hcm[0] and dcm[1] < hcm[1] and hcm[2] > 2 * dcm[2]
    arv, nor = (np.count_nonzero(phantom_labels((96, 96, 6), (1.5, 1.5), ANATOMY[p], np.zeros(1),
                                                np.random.default_rng(0)) == 3) for p in ("ARV", "NOR"))
    assert arv > 1.5 * nor
