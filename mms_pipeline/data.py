"""Reading the M&Ms-1 release: metadata CSV, subject folders, 4-D NIfTI volumes, splits and groups.

Layout as distributed (``root`` is the ``OpenDataset`` folder)::

    <root>/<metadata CSV>
    <root>/Training/Labeled/<code>/<code>_sa.nii.gz + <code>_sa_gt.nii.gz
    <root>/Training/Unlabeled/<code>/<code>_sa.nii.gz      (no labels: never used for supervised training)
    <root>/Validation/<code>/<code>_sa.nii.gz + <code>_sa_gt.nii.gz
    <root>/Testing/<code>/<code>_sa.nii.gz + <code>_sa_gt.nii.gz

Both files are 4-D ``(x, y, slice, time)``; only the ED and ES frames of the ``_gt`` file are annotated
(0 background, 1 LV blood pool, 2 MYO, 3 RV).

Metadata CSV: found in ``root`` under one of :data:`METADATA_CSV_NAMES` unless ``data.metadata_csv`` names it
(relative to ``root`` or absolute). Columns are looked up by name; a leading unnamed index column is ignored.
Required: :data:`REQUIRED_COLUMNS`. ``Pathology`` is optional (the older release lacks it and the other clinical
columns): without it ``Subject.pathology`` is ``None``. ``ED``/``ES`` are 0-based indices into the time axis (never
assume 0: Philips ED is often the last frames). Gaps in ``Height``/``Weight`` are fine (never read).

Every CSV row must have a folder on disk and every folder a CSV row; each problem raises a one-line
:class:`~groupdistil.errors.UserError` naming the subject and the file. The CSV must be UTF-8 (a byte-order mark is
fine); an undecodable byte is reported with its offset and line.

Every NIfTI file is checked when the release is read (:func:`read_subjects`, headers only): 4-D, no zero-size
dimension, ED/ES inside the time axis, a finite and non-singular affine, spatial voxel sizes (header pixdim and
affine) within :data:`SPACING_RANGE_MM`, and a label of the image's shape and affine (within
:data:`AFFINE_ATOL_MM`). The voxels are checked when they are loaded (:func:`load_volumes`, once per file: the
pipeline keeps what it loads): finite image values, labels in {0, 1, 2, 3}.

Splits and groups: :mod:`mms_pipeline.splits`.
"""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from monai.data import MetaTensor
from monai.transforms import LoadImage

from groupdistil.errors import UserError
from groupdistil.io import file_digest, read_utf8_text

METADATA_CSV_NAMES = (
    "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv",
    "201014_M&Ms_Dataset_Information_-_opendataset.csv",
)
REQUIRED_COLUMNS = ("External code", "VendorName", "Vendor", "Centre", "ED", "ES")
CLINICAL_COLUMNS = ("Age", "Pathology", "Sex", "Height", "Weight")
ALL_COLUMNS = REQUIRED_COLUMNS + CLINICAL_COLUMNS
VENDOR_NAMES = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}
VENDOR_CENTRES = {"A": (1, 6), "B": (2, 3), "C": (4,), "D": (5,)}
LABELS = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}
PHASES = ("ED", "ES")
#: release folder -> split it holds as distributed
RELEASE_FOLDERS = {
    "Training/Labeled": "train",
    "Training/Unlabeled": "unlabeled",
    "Validation": "val",
    "Testing": "test",
}
SPLITS = ("train", "val", "test")
GROUP_BY = ("vendor", "centre")
#: sane spatial voxel sizes (mm): real M&Ms has 0.98-1.63 in-plane and 5-10 between slices; an absurd size makes the
#: in-plane resampling allocate a huge grid
SPACING_RANGE_MM = (0.1, 50.0)
#: largest distance (mm) between where the image and its label put the same voxel (compared at the grid's corners)
AFFINE_ATOL_MM = 1e-3
#: smallest |det| of the affine's 3x3 part over the product of its column norms (1 for orthogonal voxel axes)
MIN_NORMALISED_DET = 1e-3


@dataclass(frozen=True)
class Subject:
    """One subject of the release. ``ed``/``es`` index the time axis; ``label`` is None for unlabelled ones."""

    code: str
    vendor: str
    centre: int
    ed: int
    es: int
    pathology: str | None
    split: str
    image: Path
    label: Path | None

    def frame(self, phase: str) -> int:
        return self.ed if phase == "ED" else self.es

    def group(self, group_by: str) -> str:
        return self.vendor if group_by == "vendor" else str(self.centre)


# --- metadata CSV --------------------------------------------------------------------------------------------
def find_metadata_csv(root: Path, override: str | None = None) -> Path:
    """The metadata CSV: ``override`` (relative to ``root`` or absolute), else a known name in ``root``."""
    root = Path(root)
    if override:
        path = Path(override) if Path(override).is_absolute() else root / override
        if not path.is_file():
            raise UserError(f"data.metadata_csv: {path} does not exist")
        return path
    for name in METADATA_CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise UserError(
        f"{root}: no M&Ms metadata CSV found (expected one of {', '.join(METADATA_CSV_NAMES)}; "
        "or set data.metadata_csv)"
    )


def _int_field(value: str, code: str, column: str, path: Path) -> int:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not np.isfinite(number) or number != int(number):
        raise UserError(f"subject {code}: {path}: column '{column}' must be an integer, got '{value}'")
    return int(number)


def read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of the metadata CSV by subject code: ``{code: {vendor, centre, ed, es, pathology}}``.

    ``pathology`` is None when the CSV has no ``Pathology`` column and ``""`` when the subject's cell is empty."""
    path = Path(path)
    rows = list(csv.reader(io.StringIO(read_utf8_text(path, "metadata CSV"), newline="")))
    if not rows:
        raise UserError(f"{path}: the metadata CSV is empty")
    header = [name.strip() for name in rows[0]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)}")
    col = {name: header.index(name) for name in ALL_COLUMNS if name in header}
    records: dict[str, dict[str, Any]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in col.items()}
        code = cells["External code"]
        if not code:
            raise UserError(f"{path}: line {line}: empty 'External code'")
        if code in records:
            raise UserError(f"subject {code}: {path}: listed twice")
        vendor = cells["Vendor"]
        if vendor not in VENDOR_NAMES:
            raise UserError(
                f"subject {code}: {path}: unknown vendor code '{vendor}' (valid: {', '.join(VENDOR_NAMES)})"
            )
        records[code] = {
            "vendor": vendor,
            "centre": _int_field(cells["Centre"], code, "Centre", path),
            "ed": _int_field(cells["ED"], code, "ED", path),
            "es": _int_field(cells["ES"], code, "ES", path),
            "pathology": cells.get("Pathology"),  # None: no such column; "": empty cell
        }
    return records


# --- release folders -----------------------------------------------------------------------------------------
def scan_release(root: Path) -> dict[str, tuple[str, Path]]:
    """Subject folders on disk: ``{code: (release split, folder)}``."""
    root = Path(root)
    found: dict[str, tuple[str, Path]] = {}
    for rel, split in RELEASE_FOLDERS.items():
        folder = root / rel
        if not folder.is_dir():
            continue
        for sub in sorted(folder.iterdir()):
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            if sub.name in found:
                raise UserError(f"subject {sub.name}: {sub}: also in {found[sub.name][1]}")
            found[sub.name] = (split, sub)
    if not found:
        raise UserError(f"{root}: no subject folders under {', '.join(RELEASE_FOLDERS)}")
    return found


def _open_nifti(path: Path, code: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The NIfTI image of ``path`` with only its header read (voxels stay on disk), and the spatial pixdim as
    stored: nibabel replaces a zero pixdim by 1 when it loads a header, which would hide it."""
    try:
        img = nib.load(path)
        _ = img.shape, img.affine
        with nib.openers.ImageOpener(path) as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        pixdim = np.abs(np.asarray(raw["pixdim"][1:4], dtype=np.float64))
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise UserError(f"subject {code}: {path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    return img, pixdim


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _check_geometry(img: nib.Nifti1Image, pixdim: np.ndarray, path: Path, code: str) -> None:
    """Header-only checks of one 4-D file: no zero-size dimension, a finite, non-singular affine and sane spatial
    voxel sizes, both in the header (pixdim: the evaluation's mm) and in the affine (what the resampling uses)."""
    shape = tuple(int(n) for n in img.shape)
    if 0 in shape:
        raise UserError(f"subject {code}: {path}: zero-size dimension in shape {shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise UserError(f"subject {code}: {path}: the affine (voxel-to-world matrix) has non-finite entries "
                        f"(NaN/Inf)")
    lo, hi = SPACING_RANGE_MM
    for source, sizes in (("header pixdim", pixdim),
                          ("from the affine", np.linalg.norm(affine[:3, :3], axis=0))):
        sizes = np.asarray(sizes, dtype=np.float64)
        if not ((sizes >= lo) & (sizes <= hi)).all():  # NaN fails too
            raise UserError(f"subject {code}: {path}: voxel size {_fmt(sizes)} mm ({source}) is outside the sane "
                            f"range {lo:g}..{hi:g} mm")
    det = abs(float(np.linalg.det(affine[:3, :3]))) / float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    if det < MIN_NORMALISED_DET:
        raise UserError(f"subject {code}: {path}: the affine is singular (its voxel axes are almost linearly "
                        f"dependent: |det| / product of voxel sizes = {det:.2g})")


def _affine_distance(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance (mm) between the world positions ``a`` and ``b`` give the same voxel of a grid of
    ``shape`` (the maximum over the grid is reached at a corner)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    return float(np.linalg.norm(corners @ (np.asarray(a) - np.asarray(b))[:3].T, axis=1).max())


def _check_files(code: str, ed: int, es: int, image: Path, label: Path | None) -> None:
    """Header-level checks: 4-D image with sane geometry, ED/ES inside the time axis, a label of the image's shape
    and affine."""
    img, pixdim = _open_nifti(image, code)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 4:
        raise UserError(f"subject {code}: {image}: expected a 4-D (x, y, slice, time) volume, got shape {shape}")
    _check_geometry(img, pixdim, image, code)
    for name, t in (("ED", ed), ("ES", es)):
        if not 0 <= t < shape[3]:
            raise UserError(
                f"subject {code}: {image}: {name} frame {t} is outside the time axis (0..{shape[3] - 1})"
            )
    if label is not None:
        lab, _ = _open_nifti(label, code)
        label_shape = tuple(int(n) for n in lab.shape)
        if label_shape != shape:
            raise UserError(f"subject {code}: {label}: label shape {label_shape} != image shape {shape}")
        if not np.isfinite(np.asarray(lab.affine, dtype=np.float64)).all():
            raise UserError(f"subject {code}: {label}: the affine (voxel-to-world matrix) has non-finite entries "
                            f"(NaN/Inf)")
        dist = _affine_distance(lab.affine, img.affine, shape)
        if not dist <= AFFINE_ATOL_MM:
            raise UserError(f"subject {code}: {label}: the label's affine differs from its image's ({image.name}): "
                            f"the same voxel lies up to {dist:.3g} mm apart (tolerance {AFFINE_ATOL_MM:g} mm)")


def read_subjects(root: Path, metadata_csv: str | None = None) -> list[Subject]:
    """All subjects of the release (unlabelled ones included), validated against the CSV, sorted by code."""
    root = Path(root)
    csv_path = find_metadata_csv(root, metadata_csv)
    records = read_metadata(csv_path)
    folders = scan_release(root)
    for code, (_, folder) in folders.items():
        if code not in records:
            raise UserError(f"subject {code}: folder {folder} is not listed in {csv_path}")
    subjects = []
    for code, rec in sorted(records.items()):
        if code not in folders:
            raise UserError(f"subject {code}: listed in {csv_path} but no folder {code} under {root}")
        split, folder = folders[code]
        image = folder / f"{code}_sa.nii.gz"
        label = folder / f"{code}_sa_gt.nii.gz"
        if not image.is_file():
            raise UserError(f"subject {code}: image {image} is missing")
        if split == "unlabeled":
            label = None
        elif not label.is_file():
            raise UserError(f"subject {code}: label {label} is missing")
        _check_files(code, rec["ed"], rec["es"], image, label)
        subjects.append(Subject(code=code, split=split, image=image, label=label, **rec))
    return subjects


def fingerprint(root: Path, metadata_csv: str | None = None, subjects: Sequence[Subject] | None = None) -> str:
    """sha256 (16 hex) of the metadata CSV's content and, for each NIfTI file, its relative path, size and content
    hash. The files are those of ``subjects`` (the ones a run uses), or every subject folder's when None."""
    root = Path(root)
    digest = hashlib.sha256(file_digest(find_metadata_csv(root, metadata_csv)).encode())
    if subjects is None:
        paths = sorted(p for rel in RELEASE_FOLDERS for p in (root / rel).glob("*/*.nii.gz"))
    else:
        paths = sorted(p for s in subjects for p in (s.image, s.label) if p is not None)
    for path in paths:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = path.as_posix()
        digest.update(f"{rel}:{path.stat().st_size}:{file_digest(path)}\n".encode())
    return digest.hexdigest()[:16]


# --- volumes -------------------------------------------------------------------------------------------------
_LOADER = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)


def _load_4d(path: Path, code: str) -> MetaTensor:
    try:
        vol = _LOADER(str(path))
    except Exception as exc:  # truncated gzip, bad header, ... (MONAI wraps them in RuntimeError)
        cause = exc.__cause__ or exc
        raise UserError(f"subject {code}: {path}: unreadable or truncated NIfTI ({type(cause).__name__})") from None
    return vol


def _check_finite(vol: MetaTensor, path: Path, code: str) -> None:
    """Refuse NaN/Inf voxels (they would end as a non-finite loss or a Dice of 0 far from the file)."""
    arr = vol.numpy()
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        t, x, y, z = (int(i) for i in bad[0])  # time as channels
        raise UserError(f"subject {code}: {path}: {len(bad)} non-finite voxel value(s) (NaN/Inf), the first at "
                        f"voxel (x, y, z, t) = ({x}, {y}, {z}, {t})")


def _check_label_values(vol: MetaTensor, path: Path, code: str) -> None:
    """Refuse label values other than the integers 0..3 (NaN included)."""
    arr = vol.numpy()
    lo, hi = float(arr.min()), float(arr.max())  # NaN fails the range test below
    if lo >= 0 and hi <= max(LABELS) and np.array_equal(arr, arr.astype(np.uint8)):
        return  # the fast path: two reductions and one cast
    ok = np.isin(arr, list(LABELS))
    if not ok.all():
        bad = np.unique(arr[~ok])
        raise UserError(
            f"subject {code}: {path}: label values {', '.join(f'{v:g}' for v in bad[:5])} outside {{0, 1, 2, 3}} "
            f"(labels must be the integers 0 background, 1 LV, 2 MYO, 3 RV)"
        )


def load_volumes(subject: Subject) -> dict[str, MetaTensor]:
    """The subject's 4-D volumes, time as channels: ``{"image": (T, X, Y, Z)[, "label": (T, X, Y, Z)]}``.

    The voxels are checked here (finite image values, labels in {0, 1, 2, 3}); the headers were checked by
    :func:`read_subjects`. The pipeline keeps what it loads, so each file is checked once per run."""
    out = {"image": _load_4d(subject.image, subject.code)}
    _check_finite(out["image"], subject.image, subject.code)
    if subject.label is not None:
        label = _load_4d(subject.label, subject.code)
        if label.shape != out["image"].shape:
            raise UserError(
                f"subject {subject.code}: {subject.label}: label shape {tuple(label.shape)} != image shape "
                f"{tuple(out['image'].shape)}"
            )
        _check_label_values(label, subject.label, subject.code)
        out["label"] = label
    return out
