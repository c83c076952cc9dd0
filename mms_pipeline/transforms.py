"""MONAI transforms of the M&Ms pipeline and the cached 2-D training set.

Deterministic preprocessing of one phase (:func:`preprocess`), on ``{"image": (T, X, Y, Z), "label": (T, X, Y, Z),
"frame": t}`` (4-D volumes with time as channels, as :func:`mms_pipeline.data.load_volumes` returns them):

1. :class:`SelectFramed`: keep time frame ``t`` -> ``(1, X, Y, Z)``;
2. ``Spacingd``: in-plane resampling to ``data.spacing`` (mm), slice spacing kept (pixdim ``-1``); labels nearest;
3. ``ScaleIntensityRangePercentilesd``: per-volume clip to the ``data.intensity_percentiles`` and scale to [0, 1]
   (raw scales differ by orders of magnitude between vendors);
4. ``ResizeWithPadOrCropd``: centre crop/pad in-plane to ``data.roi`` -> ``(1, H, W, Z)``.

Steps 2 and 4 are invertible: ``Invertd`` with the same :class:`~monai.transforms.Compose` maps predictions back to
the native geometry.

Training augmentation (:func:`augmentation`, 2-D slices ``{"x": (1, H, W), "seg": (1, H, W)}``): intensity-driven
(gamma 0.5-1.6, bias field, scale/shift, Gaussian noise, blur) plus mild affine (rotation +-15 deg, scale +-10%) and
optional flips. :class:`SliceDataset` applies it per key ``(index, seed)`` with every random draw derived from the key.
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

VOLUME_KEYS = ("image", "label")


class SelectFramed(MapTransform):
    """Keep one time frame of channel-first 4-D volumes: ``(T, X, Y, Z) -> (1, X, Y, Z)``; ``t = d[frame_key]``."""

    def __init__(self, keys: Sequence[str], frame_key: str = "frame", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.frame_key = frame_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        t = int(d[self.frame_key])
        for key in self.key_iterator(d):
            d[key] = d[key][t : t + 1]
        return d


def _resample(keys: Sequence[str], spacing: Sequence[float], mode: Sequence[str]) -> Spacingd:
    """Step 2: in-plane resampling to ``spacing`` (mm), the slice spacing kept."""
    return Spacingd(list(keys), pixdim=(float(spacing[0]), float(spacing[1]), -1.0), mode=tuple(mode),
                    allow_missing_keys=True)


def _crop_or_pad(keys: Sequence[str], roi: Sequence[int]) -> ResizeWithPadOrCropd:
    """Step 4: centre crop / zero pad in-plane to ``roi`` (H, W)."""
    return ResizeWithPadOrCropd(list(keys), spatial_size=(int(roi[0]), int(roi[1]), -1), allow_missing_keys=True)


def preprocess(spacing: Sequence[float], roi: Sequence[int], percentiles: Sequence[float]) -> Compose:
    """Deterministic per-phase preprocessing (see the module docstring); ``label`` may be absent."""
    keys = list(VOLUME_KEYS)
    return Compose([
        SelectFramed(keys, allow_missing_keys=True),
        _resample(keys, spacing, ("bilinear", "nearest")),
        ScaleIntensityRangePercentilesd("image", lower=float(percentiles[0]), upper=float(percentiles[1]),
                                        b_min=0.0, b_max=1.0, clip=True),
        _crop_or_pad(keys, roi),
    ])


def preprocess_probabilities(spacing: Sequence[float], roi: Sequence[int]) -> Compose:
    """The spatial steps of :func:`preprocess` (2 and 4, the same parameters, so the same working grid) for
    ``{"probs": (C, X, Y, Z)}``: class probabilities of one phase in its image's native geometry (MetaTensor with the
    image's affine), resampled bilinearly (a convex combination of distributions stays one). Intensity scaling is
    for images only. Padded positions come out all zero: see :func:`fill_padding`."""
    return Compose([_resample(["probs"], spacing, ("bilinear",)), _crop_or_pad(["probs"], roi)])


def fill_padding(probs: torch.Tensor) -> torch.Tensor:
    """``(C, ...)`` probabilities after :func:`preprocess_probabilities`: positions that the crop/pad filled with
    zeros (sum over classes < 0.5) become background (class 0) with probability 1, as the label is padded with 0;
    the others are renormalised to sum to 1."""
    total = probs.sum(0, keepdim=True)
    background = torch.zeros_like(probs)
    background[0] = 1.0
    return torch.where(total < 0.5, background, probs / total.clamp_min(1e-12))


def augmentation(flip: bool = False) -> Compose:
    """Random 2-D augmentation of ``{"x": (1, H, W) in ~[0, 1], "seg": (1, H, W)}``."""
    spatial: list[Any] = [
        RandAffined(["x", "seg"], prob=0.5, rotate_range=np.deg2rad(15.0), scale_range=0.1,
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
    ]
    if flip:
        spatial += [RandFlipd(["x", "seg"], prob=0.5, spatial_axis=axis) for axis in (0, 1)]
    intensity = [
        RandAdjustContrastd("x", prob=0.5, gamma=(0.5, 1.6)),
        RandBiasFieldd("x", prob=0.3, degree=3, coeff_range=(0.0, 0.3)),
        RandScaleIntensityd("x", factors=0.2, prob=0.5),
        RandShiftIntensityd("x", offsets=0.1, prob=0.5),
        RandGaussianSmoothd("x", prob=0.15, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
        RandGaussianNoised("x", prob=0.3, std=0.05),
    ]
    return Compose(spatial + intensity)


def item_seed(index: int, seed: int) -> int:
    """A 32-bit seed that is a pure function of the key ``(index, seed)``."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(index)]).generate_state(1)[0])


class SliceDataset(Dataset):
    """Preprocessed 2-D slices held in memory, indexed by ``(index, seed)`` (or a plain ``index``: seed 0).

    Item: ``x`` float ``(1, H, W)``, ``seg`` long ``(1, H, W)``, ``group`` / ``index`` long scalars and, when
    ``cls`` is given, ``cls`` long scalar. With ``augment`` all random draws derive from the key.
    """

    def __init__(self, x: torch.Tensor, seg: torch.Tensor, group: torch.Tensor, cls: torch.Tensor | None = None,
                 augment: Compose | None = None) -> None:
        if not (len(x) == len(seg) == len(group)) or (cls is not None and len(cls) != len(x)):
            raise ValueError("x, seg, group and cls must have the same length")
        self.x, self.seg, self.group, self.cls, self.augment = x, seg, group, cls, augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        x, seg = self.x[index], self.seg[index].float()
        if self.augment is not None:
            self.augment.set_random_state(seed=item_seed(index, seed))
            out = self.augment({"x": x.clone(), "seg": seg})
            x, seg = out["x"], out["seg"]
        item = {
            "x": convert_to_tensor(x, track_meta=False, dtype=torch.float32),
            "seg": convert_to_tensor(seg, track_meta=False).round().long(),
            "group": self.group[index].clone(),
            "index": torch.tensor(index, dtype=torch.long),
        }
        if self.cls is not None:
            item["cls"] = self.cls[index].clone()
        return item
