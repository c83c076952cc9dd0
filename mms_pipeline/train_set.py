"""The M&Ms training set: the 2-D slices of the ED and ES volumes of the training subjects, preprocessed once
(:func:`mms_pipeline.transforms.preprocess`) and held in memory as a :class:`~mms_pipeline.transforms.SliceDataset`,
with where each slice comes from (its subject, phase and index along z; the subject's native affine)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.transforms import Compose

from . import data
from .transforms import SliceDataset


@dataclass(frozen=True)
class TrainingSlices:
    """The training set and the origin of each of its slices."""

    dataset: SliceDataset
    cases: list[str]  # the subject of every slice (held out together)
    slices: list[tuple[str, str, int]]  # (subject, phase, z) of every slice: where its teacher probabilities come from
    affines: dict[str, torch.Tensor]  # each training subject's native affine (its probabilities' grid)


def build(subjects: Sequence[data.Subject], preprocessor: Compose, group_of: Callable[[data.Subject], int],
          class_of: Callable[[data.Subject], int] | None, drop_empty: bool,
          augment: Compose | None) -> TrainingSlices:
    """Every slice of the ED and ES volumes of ``subjects`` (in order; ``drop_empty``: only those with a labelled
    structure), with the group (``group_of``) and, given ``class_of``, the pathology class of its subject;
    ``augment`` is applied per item (:class:`~mms_pipeline.transforms.SliceDataset`)."""
    xs, segs, groups, classes, cases, slices, affines = [], [], [], [], [], [], {}
    for subject in subjects:
        vols = data.load_volumes(subject)
        affines[subject.code] = vols["image"].affine.clone()
        for phase in data.PHASES:
            out = preprocessor({**vols, "frame": subject.frame(phase)})
            x = out["image"].as_tensor().permute(3, 0, 1, 2)  # (1, H, W, Z) -> (Z, 1, H, W)
            seg = out["label"].as_tensor().permute(3, 0, 1, 2).round().to(torch.uint8)
            z = torch.arange(len(x))
            if drop_empty:
                keep = (seg > 0).flatten(1).any(1)
                x, seg, z = x[keep], seg[keep], z[keep]
            xs.append(x.float())
            segs.append(seg)
            groups += [group_of(subject)] * len(x)
            cases += [subject.code] * len(x)
            slices += [(subject.code, phase, int(k)) for k in z]
            if class_of is not None:
                classes += [class_of(subject)] * len(x)
    dataset = SliceDataset(torch.cat(xs), torch.cat(segs), torch.tensor(groups, dtype=torch.long),
                           torch.tensor(classes, dtype=torch.long) if class_of is not None else None, augment)
    return TrainingSlices(dataset, cases, slices, affines)
