"""An M&Ms teacher made elsewhere, given as its saved probabilities: nnU-Net v2's ``--save_probabilities`` output.

``nnUNetv2_predict ... --save_probabilities`` writes, per case, ``<case>.npz`` with the array ``probabilities``
``(C, z, y, x)``: the softmax class probabilities (0 background, 1 LV, 2 MYO, 3 RV) in the case image's native
geometry, axes in SimpleITK's order (the image's axes reversed; nnU-Net's nibabel reader reverses them the same way),
and ``<case>.pkl``, a pickle of properties. The ``.pkl`` is never opened (unpickling runs code): the geometry is the
image's own. Cases are named as nnU-Net's M&Ms conversion names them, ``<code>_frame<NN>``
(:func:`mms_pipeline.scoring.nnunet_case`).

The folder must hold the ``.npz`` of exactly the training cases of the run (the ED and ES frame of every training
subject); ``.pkl`` and ``.nii.gz`` files (nnU-Net's label maps) and nnU-Net's json files beside them are ignored.
Each array is checked (shape ``(4, Z, Y, X)`` for the image's ``(X, Y, Z)``, finite, in [0, 1], summing to 1 over the
classes: :func:`groupdistil.teacher.probabilities_problem`), brought to nibabel's ``(C, X, Y, Z)`` and through the
spatial steps of the training slices' preprocessing (:func:`mms_pipeline.transforms.preprocess_probabilities`).
Only the shape can reveal another axis order: with a square in-plane matrix an ``(x, y)`` swap goes unseen.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from groupdistil.errors import UserError
from groupdistil.teacher import probabilities_problem

from . import data
from .scoring import NNUNET_EXTRAS, every_expected, folder_files, nnunet_case
from .train_set import TrainingSlices
from .transforms import fill_padding

#: the array of nnU-Net's ``<case>.npz``
NPZ_KEY = "probabilities"
#: files of nnU-Net's output folder that are never opened
IGNORED_SUFFIXES = (".pkl", ".nii.gz")
_CASE = re.compile(r"^(?P<code>.+)_frame(?P<frame>\d+)$")


def match_files(folder: Path, train: Sequence[data.Subject],
                splits: Mapping[str, Sequence[data.Subject]]) -> dict[tuple[str, str], Path]:
    """``{(code, phase): <case>.npz}`` of every training subject and phase; a non-folder, a missing case, an
    ``.npz`` of a case that is not a training case, or any other file is a UserError naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; an M&Ms teacher given as saved probabilities is the output folder of "
                        f"'nnUNetv2_predict --save_probabilities' (one <case>.npz per training case)")
    expected = {f"{nnunet_case(s, ph)}.npz": (s.code, ph) for s in train for ph in data.PHASES}
    present = folder_files(folder)
    for name in sorted(present):
        if name in expected or name in NNUNET_EXTRAS or name.endswith(IGNORED_SUFFIXES):
            continue
        if name.endswith(".npz"):
            raise UserError(f"{present[name]}: not a training case of this run ({_why_not(name, train, splits)}); "
                            f"the folder must hold the probabilities of exactly the {len(expected)} training cases "
                            f"(<code>_frame<NN>.npz, NN the ED or ES frame): remove it")
        raise UserError(f"{present[name]}: not an nnU-Net probabilities file (<case>.npz; <case>.pkl, <case>.nii.gz "
                        f"and {', '.join(NNUNET_EXTRAS)} are ignored): remove it")
    return every_expected(folder, expected, present, lambda code, phase, n: (
        f"the {phase} probabilities of training subject {code} ({n} of the {len(expected)} training cases missing "
        f"in all)"))


def _why_not(name: str, train: Sequence[data.Subject], splits: Mapping[str, Sequence[data.Subject]]) -> str:
    m = _CASE.match(name[: -len(".npz")])
    if not m:
        return "not named <code>_frame<NN>"
    code, frame = m["code"], int(m["frame"])
    split = next((sp for sp, subs in splits.items() for s in subs if s.code == code), None)
    if split is None:
        return f"no subject {code} in this run's splits"
    if split != "train":
        return f"subject {code} is in the {split} split"
    s = next(s for s in train if s.code == code)
    return f"frame {frame} is neither the ED ({s.frame('ED')}) nor the ES ({s.frame('ES')}) frame of {code}"


def read_probabilities(path: Path, subject: data.Subject, shape: Sequence[int], n_classes: int) -> np.ndarray:
    """The checked probabilities of ``path`` as float32 ``(C, X, Y, Z)`` (nibabel's axis order), for the subject
    whose image has the spatial ``shape`` ``(X, Y, Z)``. Read with ``allow_pickle=False``: nothing in it runs."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if NPZ_KEY not in npz.files:
                held = ", ".join(npz.files) or "none"
                raise UserError(f"{path}: no array '{NPZ_KEY}' in this .npz (it holds {held}); expected nnU-Net's "
                                f"--save_probabilities output")
            arr = npz[NPZ_KEY]
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken zip, an object array (pickle), ...: unreadable
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path}: unreadable .npz ({type(exc).__name__}: {first})") from None
    x, y, z = (int(n) for n in shape)
    want = (n_classes, z, y, x)
    if tuple(arr.shape) != want:
        raise UserError(f"{path}: probabilities of shape {tuple(arr.shape)}, expected (classes, z, y, x) = {want} for "
                        f"subject {subject.code} ({subject.image.name} is (x, y, z) = {(x, y, z)}; nnU-Net stores the "
                        f"classes, then the image's axes reversed)")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise UserError(f"{path}: probabilities of dtype {arr.dtype}, expected numbers")
    problem = probabilities_problem(arr, "(class, z, y, x)")
    if problem:
        raise UserError(f"{path}: {problem}")
    return np.ascontiguousarray(arr.transpose(0, 3, 2, 1), dtype=np.float32)


def to_working(probs: np.ndarray, affine: torch.Tensor, transform: Compose) -> torch.Tensor:
    """Native ``(C, X, Y, Z)`` probabilities (on the grid of ``affine``, the image's) -> float32 ``(C, H, W, Z)`` in
    the working geometry of the training slices, padded positions background (:func:`transforms.fill_padding`)."""
    out = transform({"probs": MetaTensor(torch.from_numpy(probs), affine=torch.as_tensor(affine).clone())})["probs"]
    return fill_padding(out.as_tensor().float())


def training_probabilities(files: Mapping[tuple[str, str], Path], training: TrainingSlices,
                           train: Sequence[data.Subject], transform: Compose) -> torch.Tensor:
    """float32 ``(N, C, H, W)``: the probabilities of every training slice (in ``training``'s order) from the files of
    :func:`match_files`, each checked (:func:`read_probabilities`) and brought to the working geometry of the slice's
    own preprocessing (``transform``: :func:`mms_pipeline.transforms.preprocess_probabilities`)."""
    positions: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for i, (code, phase, z) in enumerate(training.slices):
        positions.setdefault((code, phase), []).append((i, z))
    n_classes = len(data.LABELS)
    out = torch.zeros(len(training.dataset), n_classes, *training.dataset.x.shape[-2:])
    for subject in train:
        shape = nib.load(subject.image).shape[:3]
        for phase in data.PHASES:
            probs = read_probabilities(files[(subject.code, phase)], subject, shape, n_classes)
            work = to_working(probs, training.affines[subject.code], transform)  # (C, H, W, Z)
            for i, z in positions.get((subject.code, phase), []):
                out[i] = work[..., z]
    return out
