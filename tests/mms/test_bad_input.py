"""Corrupt M&Ms input fails when it is read, with one line naming the subject and the file: NaN/Inf voxels, broken
affines, label geometry, zero-size and absurd voxel sizes, label values, CSV cells and bytes; and the data fingerprint
follows the files' content."""
from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch

from groupdistil.errors import UserError
from mms_pipeline.data import METADATA_CSV_NAMES, load_volumes, read_subjects


def _subject(root: Path, vendor: str, split: str = "train"):
    return next(s for s in read_subjects(root) if s.vendor == vendor and s.split == split)


def _rewrite(path: Path, data: np.ndarray | None = None, sform: np.ndarray | None = None,
             zooms: tuple[float, ...] | None = None) -> None:
    """Rewrite the NIfTI ``path`` with other voxels (their dtype kept), sform (code 1, qform off) or pixdim."""
    img = nib.load(path)
    hdr = img.header.copy()
    arr = np.asarray(img.dataobj) if data is None else data
    if zooms is not None:
        hdr.set_zooms(zooms)
    if sform is not None:
        hdr.set_sform(sform, code=1)
        hdr.set_qform(None, code=0)
    out = nib.Nifti1Image(arr, None, hdr)
    out.set_data_dtype(arr.dtype)
    out.header.set_slope_inter(1.0, 0.0)
    nib.save(out, path)


def _poke(path: Path, index: tuple[int, ...], value: float, dtype: Any = np.float32) -> None:
    arr = np.asarray(nib.load(path).dataobj).astype(dtype)
    arr[index] = value
    _rewrite(path, data=arr)


def _raises(call: Callable[[], Any], code: str, path: Path, match: str) -> str:
    """``call()`` raises a one-line UserError starting with ``subject <code>: <path>: `` and matching ``match``."""
    with pytest.raises(UserError) as err:
        call()
    msg = str(err.value)
    assert msg.startswith(f"subject {code}: {path}: "), msg
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


# --- voxels: checked when loaded, before any training step ---------------------------------------------------------
def test_nan_voxel_in_a_validation_image_fails_before_training(broken_copy, make_pipeline) -> None:
    root = broken_copy()
    s = _subject(root, "C", "val")
    _poke(s.image, (1, 2, 0, s.es), np.nan)
    msg = _raises(lambda: make_pipeline(root).train_dataset(), s.code, s.image,
                  r"1 non-finite voxel value\(s\) \(NaN/Inf\), the first at voxel \(x, y, z, t\) = "
                  rf"\(1, 2, 0, {s.es}\)$")
    def background(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"seg": torch.zeros(len(x), 4, *x.shape[-2:])}

    _raises(lambda: make_pipeline(root).evaluate(background, "val"), s.code, s.image, re.escape(msg.split(": ")[-1]))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxel_in_a_training_image(broken_copy, make_pipeline, value: float) -> None:
    root = broken_copy()
    s = _subject(root, "B")
    _poke(s.image, (3, 4, 1, s.ed), value)
    _poke(s.image, (5, 6, 2, s.ed), value)
    _raises(lambda: make_pipeline(root).train_dataset(), s.code, s.image,
            rf"2 non-finite voxel value\(s\) \(NaN/Inf\), the first at voxel \(x, y, z, t\) = \(3, 4, 1, {s.ed}\)")


@pytest.mark.parametrize("value", [0.5, np.nan, 4])
def test_label_values_that_are_not_class_indices(broken_copy, value: float) -> None:
    root = broken_copy()
    s = _subject(root, "A", "test")
    _poke(s.label, (0, 0, 0, s.ed), value)
    _raises(lambda: load_volumes(_subject(root, "A", "test")), s.code, s.label,
            rf"label values {value:g} outside \{{0, 1, 2, 3\}} \(labels must be the integers 0 background")


# --- headers: checked when the release is read ---------------------------------------------------------------------
def _with_affine(edit: Callable[[np.ndarray], None]) -> Callable[[Any], Path]:
    def apply(s: Any) -> Path:
        affine = nib.load(s.image).affine.copy()
        edit(affine)
        _rewrite(s.image, sform=affine)
        return s.image
    return apply


def _shifted_label(mm: float) -> Callable[[Any], Path]:
    def apply(s: Any) -> Path:
        affine = nib.load(s.label).affine.copy()
        affine[0, 3] += mm
        _rewrite(s.label, sform=affine)
        return s.label
    return apply


def _set(index: tuple[int, int], value: float) -> Callable[[np.ndarray], None]:
    def edit(a: np.ndarray) -> None:
        a[index] = value
    return edit


def _raw_pixdim(path: Path, axis: int, value: float) -> None:
    """Store ``pixdim[axis]`` in the file as is (nibabel's writer would replace a zero by 1)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    struct.pack_into("<f", raw, 76 + 4 * axis, value)  # NIfTI-1: float pixdim[8] at byte 76, little-endian here
    path.write_bytes(gzip.compress(bytes(raw)))


def _parallel_axes(a: np.ndarray) -> None:
    a[:3, 1] = a[:3, 0] * 1.1  # the y axis along the x axis


def _scaled_axis(a: np.ndarray) -> None:
    a[:3, 0] *= 1348.0 / np.linalg.norm(a[:3, 0])


def _image_pixdim(zooms: tuple[float, ...]) -> Callable[[Any], Path]:
    return lambda s: (_rewrite(s.image, zooms=zooms), s.image)[1]


def _zero_pixdim(s: Any) -> Path:
    _raw_pixdim(s.image, 3, 0.0)
    return s.image


def _zero_size(s: Any) -> Path:
    _rewrite(s.image, data=np.zeros((64, 0, 4, 4), np.int16))
    return s.image


def _cropped_label(s: Any) -> Path:
    _rewrite(s.label, data=np.asarray(nib.load(s.label).dataobj)[:, :-3])
    return s.label


HEADER_BREAKS: dict[str, tuple[Callable[[Any], Path], str]] = {
    "NaN affine": (_with_affine(_set((0, 0), np.nan)),
                   r"the affine \(voxel-to-world matrix\) has non-finite entries \(NaN/Inf\)$"),
    "Inf affine offset": (_with_affine(_set((1, 3), np.inf)), r"non-finite entries"),
    "singular affine": (_with_affine(_parallel_axes),
                        r"the affine is singular \(its voxel axes are almost linearly dependent"),
    "absurd voxel size in the affine": (
        _with_affine(_scaled_axis),
        r"voxel size \(1348, .*\) mm \(from the affine\) is outside the sane range 0.1..50 mm",
    ),
    "absurd pixdim": (_image_pixdim((1348.0, 1.25, 10.0, 1.0)),
                      r"voxel size \(1348, 1.25, 10\) mm \(header pixdim\) is outside the sane range 0.1..50 mm"),
    "zero pixdim": (_zero_pixdim, r"voxel size \(.*, .*, 0\) mm \(header pixdim\) is outside"),
    "zero-size dimension": (_zero_size, r"zero-size dimension in shape \(64, 0, 4, 4\)"),
    "label affine differs": (
        _shifted_label(0.01),
        r"the label's affine differs from its image's \(.*_sa.nii.gz\): the same voxel lies up to 0.01 mm apart "
        + r"\(tolerance 0.001 mm\)",
    ),
    "label shape differs": (_cropped_label, r"label shape \(64, 61, 4, 4\) != image shape \(64, 64, 4, 4\)"),
}


@pytest.mark.parametrize("case", list(HEADER_BREAKS))
@pytest.mark.parametrize("where", [("A", "train"), ("D", "test")])  # D/test: sheared val/test geometry
def test_bad_geometry_is_refused_when_the_release_is_read(broken_copy, case: str, where: tuple[str, str]) -> None:
    root = broken_copy()
    s = _subject(root, *where)
    path = HEADER_BREAKS[case][0](s)
    _raises(lambda: read_subjects(root), s.code, path, HEADER_BREAKS[case][1])


def test_label_affine_within_tolerance_is_accepted(broken_copy) -> None:
    root = broken_copy()
    s = _subject(root, "D", "val")
    _shifted_label(2e-4)(s)
    assert s.code in {x.code for x in read_subjects(root)}


# --- metadata CSV --------------------------------------------------------------------------------------------------
def test_empty_pathology_cell_names_the_subject(broken_copy, metadata_csv, make_pipeline) -> None:
    root = broken_copy()
    s = _subject(root, "B")
    metadata_csv(root).set(s.code, "Pathology", "")
    csv_path = root / METADATA_CSV_NAMES[0]
    with pytest.raises(UserError) as err:
        _ = make_pipeline(root).splits
    assert str(err.value) == (f"subject {s.code}: {csv_path}: the subject's 'Pathology' cell is empty; fill it in, "
                              f"or set model.classify: false")
    assert len(make_pipeline(root, model={"classify": False}).splits["train"]) == 5  # not needed without the head


@pytest.mark.parametrize("bom", [False, True])
def test_non_utf8_csv_names_the_byte_offset_and_line(broken_copy, bom: bool) -> None:
    root = broken_copy()
    path = root / METADATA_CSV_NAMES[0]
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    lines[3] = lines[3].replace(b",M,", b",\xe9,").replace(b",F,", b",\xe9,")  # a latin-1 byte in 'Sex'
    raw = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines)
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(UserError) as err:
        read_subjects(root)
    assert str(err.value) == (f"{path}: the metadata CSV is not UTF-8 text: byte 0x{raw[offset]:02x} at offset "
                              f"{offset} (line 4) cannot be decoded; save the file as UTF-8")


# --- fingerprint ---------------------------------------------------------------------------------------------------
def test_fingerprint_follows_file_content_not_only_size(broken_copy, make_pipeline, mms_pipeline) -> None:
    root = broken_copy()
    before = make_pipeline(root).fingerprint()
    assert before == mms_pipeline.fingerprint() and len(before) == 16
    unused = next(s for s in read_subjects(root) if s.label is None)  # Training/Unlabeled: never read by a run
    raw = bytearray(unused.image.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    unused.image.write_bytes(bytes(raw))
    assert make_pipeline(root).fingerprint() == before
    s = _subject(root, "A", "val")
    raw = bytearray(s.image.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same name, same size, other bytes
    s.image.write_bytes(bytes(raw))
    assert make_pipeline(root).fingerprint() != before
