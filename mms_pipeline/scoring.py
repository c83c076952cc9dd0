"""Scoring M&Ms label maps made elsewhere (``groupdistil evaluate``), with the conventions of a run's evaluation.

A predictions folder holds one 3-D label map (0 background, 1 LV, 2 MYO, 3 RV) per subject of the split and phase,
in the native geometry of the subject's ``<code>_sa.nii.gz`` (its shape without the time axis, its affine), named

- as this project writes them (``predictions/`` of a run): ``<code>_sa_ED.nii.gz`` and ``<code>_sa_ES.nii.gz``;
- or as nnU-Net v2 names them after its M&Ms conversion (``Dataset114_MNMs.py``: one case per frame,
  ``<code>_frame<NN>``, ``NN`` the 0-based ED or ES index of the metadata CSV, two digits), and as
  ``nnUNetv2_predict`` writes them: ``<code>_frame<NN>.nii.gz``. The files nnU-Net adds to its output folder
  (``dataset.json``, ``plans.json``, ``predict_from_raw_data_args.json``, ``<case>.npz`` / ``<case>.pkl`` with
  ``--save_probabilities``) are ignored.

The naming is chosen by which one names more of the expected files. Files whose name starts with a dot are
ignored. Everything else is checked, and each problem is a one-line UserError naming the file: a missing prediction,
an extra file, an unreadable file, a shape other than the image's (a trailing axis of length 1 is accepted), an
affine that puts a voxel more than ``data.AFFINE_ATOL_MM`` away from where the image puts it, label values outside
{0, 1, 2, 3}. Rows are built by :func:`subject_rows`, the function the pipeline's own evaluation uses.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

from groupdistil.errors import UserError

from . import data
from .examples import ExampleCollector
from .metrics import case_metrics, clinical_indices

NAMINGS = ("groupdistil", "nnunet")
#: what nnUNetv2_predict writes into its output folder besides the label maps
NNUNET_EXTRAS = ("dataset.json", "plans.json", "predict_from_raw_data_args.json")


def native_truth(subject: data.Subject,
                 vols: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], tuple[float, float, float]]:
    """The ED and ES ground truth ``(X, Y, Z)`` uint8 of loaded volumes (:func:`data.load_volumes`) and the voxel
    size (header zooms, mm): what every score of the subject is computed against."""
    zooms = nib.load(subject.image).header.get_zooms()[:3]
    gts = {ph: vols["label"][subject.frame(ph)].numpy().round().astype(np.uint8) for ph in data.PHASES}
    return gts, tuple(float(z) for z in zooms)


def subject_rows(subject: data.Subject, preds: Mapping[str, np.ndarray], gts: Mapping[str, np.ndarray],
                 spacing: Sequence[float]) -> list[dict[str, Any]]:
    """The per-case rows of one subject (ED, then ES): ids, :func:`case_metrics`, and the clinical indices on the
    ED row."""
    rows = [{"Name": subject.code, "ED/ES": ph, "Vendor": subject.vendor, "Centre": subject.centre,
             **case_metrics(preds[ph], gts[ph], spacing)} for ph in data.PHASES]
    rows[0].update(clinical_indices(preds["ED"], preds["ES"], gts["ED"], gts["ES"], spacing, spacing))
    return rows


def nnunet_case(subject: data.Subject, phase: str) -> str:
    """nnU-Net's case name of a subject's ``phase`` after its M&Ms conversion: ``<code>_frame<NN>``, NN the 0-based
    ED or ES frame index, two digits."""
    return f"{subject.code}_frame{subject.frame(phase):02d}"


def file_name(subject: data.Subject, phase: str, naming: str) -> str:
    """The file name of a subject's prediction of ``phase`` under ``naming`` (see the module docstring)."""
    if naming == "groupdistil":
        return f"{subject.code}_sa_{phase}.nii.gz"
    return f"{nnunet_case(subject, phase)}.nii.gz"


def _pattern(naming: str) -> str:
    return ("<code>_sa_ED.nii.gz and <code>_sa_ES.nii.gz" if naming == "groupdistil"
            else "nnU-Net's <code>_frame<NN>.nii.gz, NN the ED or ES frame index")


def folder_files(folder: Path) -> dict[str, Path]:
    """``{name: path}`` of the files of ``folder`` whose name does not start with a dot."""
    return {p.name: p for p in Path(folder).iterdir() if not p.name.startswith(".")}


def every_expected(folder: Path, expected: Mapping[str, tuple[str, str]], present: Mapping[str, Path],
                   missing_what: Callable[[str, str, int], str]) -> dict[tuple[str, str], Path]:
    """``{(code, phase): file}`` of the ``expected`` file names (``{name: (code, phase)}``) of ``folder``; the first
    missing one is a UserError ``<folder>/<name>: missing: <missing_what(code, phase, number missing)>``."""
    missing = [n for n in expected if n not in present]
    if missing:
        code, phase = expected[missing[0]]
        raise UserError(f"{Path(folder) / missing[0]}: missing: {missing_what(code, phase, len(missing))}")
    return {key: present[name] for name, key in expected.items()}


def match_files(pred_dir: Path, subjects: Sequence[data.Subject],
                split: str) -> tuple[str, dict[tuple[str, str], Path]]:
    """``(naming, {(code, phase): file})`` of a predictions folder; a missing or extra file is a UserError."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: not a folder (M&Ms predictions are a folder of NIfTI label maps)")
    present = folder_files(pred_dir)
    expected = {n: {file_name(s, ph, n): (s.code, ph) for s in subjects for ph in data.PHASES} for n in NAMINGS}
    hits = {n: len(set(present) & set(names)) for n, names in expected.items()}
    naming = max(NAMINGS, key=lambda n: hits[n])  # ties: this project's naming (listed first)
    if hits[naming] == 0:
        example = file_name(subjects[0], "ED", "groupdistil") if subjects else "<code>_sa_ED.nii.gz"
        raise UserError(f"{pred_dir}: no prediction of a {split} subject found (expected {_pattern('groupdistil')}, "
                        f"or {_pattern('nnunet')}, for each of the {len(subjects)} {split} subjects, e.g. {example})")
    names = expected[naming]
    ignored = set()
    if naming == "nnunet":
        cases = {n[:-len(".nii.gz")] for n in names}
        ignored = set(NNUNET_EXTRAS) | {f"{c}{ext}" for c in cases for ext in (".npz", ".pkl")}
    extra = sorted(n for n in present if n not in names and n not in ignored)
    if extra:
        raise UserError(f"{present[extra[0]]}: not a prediction of a {split} subject (expected {_pattern(naming)} "
                        f"for each {split} subject); remove it ({len(extra)} unexpected file(s) in all)")
    return naming, every_expected(pred_dir, names, present, lambda code, phase, n: (
        f"the {phase} prediction of {split} subject {code} ({n} missing in all)"))


def read_prediction(path: Path, subject: data.Subject) -> np.ndarray:
    """The label map in ``path`` as uint8 ``(X, Y, Z)``, checked against the subject's image (shape, affine) and
    the classes."""
    where = f"subject {subject.code}: {path}"
    image = nib.load(subject.image)
    shape = tuple(int(n) for n in image.shape[:3])
    try:
        img = nib.load(path)
        arr = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for unreadable files
        raise UserError(f"{where}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != shape:
        raise UserError(f"{where}: shape {tuple(arr.shape)} does not match the image's {shape} "
                        f"({subject.image.name} without its time axis)")
    if not np.isfinite(affine).all():
        raise UserError(f"{where}: the affine (voxel-to-world matrix) has non-finite entries (NaN/Inf)")
    dist = data._affine_distance(affine, image.affine, shape)
    if not dist <= data.AFFINE_ATOL_MM:
        raise UserError(f"{where}: the prediction's affine differs from its image's ({subject.image.name}): the "
                        f"same voxel lies up to {dist:.3g} mm apart (tolerance {data.AFFINE_ATOL_MM:g} mm); "
                        f"predictions must be in the image's native geometry")
    ok = np.isin(arr, list(data.LABELS))
    if not ok.all():
        bad = np.unique(arr[~ok])
        raise UserError(f"{where}: label values {', '.join(f'{float(v):g}' for v in bad[:5])} outside {{0, 1, 2, 3}} "
                        f"(labels must be the integers 0 background, 1 LV, 2 MYO, 3 RV)")
    return arr.astype(np.uint8)


def score_folder(pred_dir: Path, subjects: Sequence[data.Subject], split: str,
                 group_key: str = "Vendor") -> tuple[list[dict[str, Any]], ExampleCollector, str]:
    """Per-case rows of every subject of ``split`` (in order), the best and worst example per group (the per-case
    column ``group_key``: ``Vendor`` or ``Centre``), and the naming the folder used. The folder's file names are
    checked first; each file when its subject is scored."""
    naming, files = match_files(pred_dir, subjects, split)
    rows: list[dict[str, Any]] = []
    collector = ExampleCollector(group_key)
    for s in subjects:
        preds = {ph: read_prediction(files[(s.code, ph)], s) for ph in data.PHASES}
        vols = data.load_volumes(s)
        gts, spacing = native_truth(s, vols)
        mine = subject_rows(s, preds, gts, spacing)
        for row, ph in zip(mine, data.PHASES):
            collector.add(row, vols["image"][s.frame(ph)].numpy(), gts[ph], preds[ph])
        rows += mine
    return rows, collector, naming
