"""Saving predictions in the native geometry of the input.

Predictions come back from the working space of :func:`mms_pipeline.transforms.preprocess` (in-plane ``Spacingd``
and ``ResizeWithPadOrCropd``) through MONAI ``Invertd`` (:attr:`mms_pipeline.inference.VolumeInference.inverter`);
the prediction passed to ``Invertd`` must be a MetaTensor, or ``Invertd`` skips it with a warning. MONAI recomputes
the native affine in float64 (off by ~1e-15), so :func:`save_prediction` writes the input file's own geometry instead.

:func:`invert_inplane` is the fast path of that inversion for the pipeline's own preprocessing: ``Spacingd`` keeps the
slice spacing, so each native slice comes from one fixed position between two working slices, and the trilinear
resampling is a blend of those two slices followed by a 2-D bilinear warp with the slices as the batch (``grid_sample``
2-D, vectorised on the CPU) instead of ``Invertd``'s 3-D one, which costs several times more per volume; the warp's
sampling grid is computed directly (:func:`pixel_affine_grid`, as MONAI's ``AffineTransform`` would, without its
batched 3-column matrix product). It gives ``Invertd``'s probabilities to float32 rounding, hence the same labels but
at exact near-ties (``tests/mms/test_geometry.py`` bounds the difference). It reads the same MONAI trace
(``image.applied_operations``); anything else falls back to ``Invertd``.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.layers import AffineTransform

from groupdistil.io import atomic_path

#: NIfTI xform code "scanner" (used when no original header is given)
XFORM_SCANNER = 1
#: largest difference (mm) between ``affine`` and the header's affine for the header's geometry to be kept
SAME_AFFINE_ATOL = 1e-6
#: largest coupling of the resampled slice position with the in-plane position (voxels) for the fast inversion
INPLANE_ATOL = 1e-6


def invert_inplane(probs: torch.Tensor, image: MetaTensor) -> torch.Tensor | None:
    """``probs (C, H, W, Z)`` in the working grid of ``image`` (an output of
    :func:`mms_pipeline.transforms.preprocess`) mapped back to the native grid ``(C, X, Y, Z)`` as ``Invertd`` maps
    them: undo the centre pad/crop (slice / zero pad), then resample from the post-``Spacingd`` grid to the native
    affine, trilinear with border padding and the recorded ``align_corners``.

    ``Spacingd`` with a kept slice spacing moves each native slice to one fixed slice position ``z'`` of the working
    grid (a sheared or oblique affine adds an in-plane offset per slice and may put ``z'`` between two slices), so the
    trilinear resampling splits exactly into a blend of the two nearest working slices with weights fixed per slice,
    then a bilinear 2-D warp per slice: one ``AffineTransform`` with the slices as the batch. ``None`` (use
    ``Invertd``) when the trace is not ``SpatialResample`` then ``ResizeWithPadOrCrop`` (centre crop, then pad),
    the resampling is not bilinear with border padding (``Spacingd``'s defaults), or ``z'`` depends on the in-plane
    position."""
    ops = image.applied_operations
    if probs.ndim != 4 or [op.get("class") for op in ops] != ["SpatialResample", "ResizeWithPadOrCrop"]:
        return None
    resample, resize = ops
    info = resample["extra_info"]
    crop, pad = resize["extra_info"].get("crop_info", {}), resize["extra_info"].get("pad_info", {})
    if (crop.get("class") != "CenterSpatialCrop" or pad.get("class") != "SpatialPad" or info.get("mode") != "bilinear"
            or info.get("padding_mode") != "border"):  # Spacingd's default, what preprocess records
        return None
    padded = [tuple(int(v) for v in p) for p in pad["extra_info"]["padded"][1:]]  # (before, after) per spatial axis
    cropped = [int(v) for v in crop["extra_info"]["cropped"]]  # (before, after) per spatial axis, flattened
    x = probs[(slice(None), *(slice(lo, n - hi) for (lo, hi), n in zip(padded, probs.shape[1:])))]
    x = F.pad(x, [v for axis in reversed(range(3)) for v in cropped[2 * axis: 2 * axis + 2]])
    if tuple(x.shape[1:]) != tuple(resize["orig_size"]):
        return None
    shift = torch.eye(4, dtype=torch.float64)  # the post-Spacingd grid's voxel origin in the working grid
    shift[:3, 3] = torch.tensor([lo - cropped[2 * i] for i, (lo, _) in enumerate(padded)], dtype=torch.float64)
    mid_affine = torch.as_tensor(image.affine, dtype=torch.float64) @ shift
    xform = torch.linalg.solve(mid_affine, torch.as_tensor(info["src_affine"], dtype=torch.float64))  # native -> mid
    if float(xform[2, :2].abs().max()) > INPLANE_ATOL:
        return None
    native = tuple(int(v) for v in resample["orig_size"])
    depth = x.shape[3]
    k = torch.arange(native[2], dtype=torch.float64)
    z = (xform[2, 2] * k + xform[2, 3]).clamp(0, depth - 1)  # each native slice's position (border padding)
    z0 = z.floor()
    w1 = (z - z0).float()[:, None, None, None]
    lo, hi = z0.long(), (z0.long() + 1).clamp(max=depth - 1)
    slices = x.permute(3, 0, 1, 2)  # (Z, C, X, Y)
    blend = slices[lo] * (1 - w1) + slices[hi] * w1 if bool(w1.any()) else slices[lo]  # whole slices: no blend
    theta = torch.eye(3, dtype=torch.float64).repeat(native[2], 1, 1)  # per slice: (i, j, 1) -> (i', j', 1)
    theta[:, :2, :2] = xform[:2, :2]
    theta[:, :2, 2] = xform[:2, 3] + xform[:2, 2] * k[:, None]
    align = info.get("align_corners")
    align = align if isinstance(align, bool) else False
    if align and min(x.shape[1:3]) < 2:  # align_corners on a 1-pixel axis: left to MONAI
        warp = AffineTransform(normalized=False, mode="bilinear", padding_mode="border", align_corners=True,
                               reverse_indexing=True)
        return warp(blend.float(), theta=theta.float(), spatial_size=native[:2]).permute(1, 2, 3, 0)
    grid = pixel_affine_grid(theta, tuple(x.shape[1:3]), native[:2], align)
    out = F.grid_sample(blend.float().contiguous(), grid, mode="bilinear", padding_mode="border", align_corners=align)
    return out.permute(1, 2, 3, 0)  # (C, X, Y, Z)


def pixel_affine_grid(theta: torch.Tensor, src: tuple[int, int], dst: tuple[int, int],
                      align_corners: bool) -> torch.Tensor:
    """``grid_sample``'s grid ``(N, X, Y, 2)`` (float32) for pixel-space affines ``theta (N, 3, 3)`` that map an
    output pixel ``(i, j, 1)`` of a ``dst`` image to an input position ``(i', j', 1)`` of a ``src`` image, what
    MONAI's ``AffineTransform(normalized=False, reverse_indexing=True)`` computes, without its ``affine_grid``
    (a batched 3-column matrix product, about as slow as the sampling itself on the CPU)."""
    i = torch.arange(dst[0], dtype=torch.float64)[None, :, None]
    j = torch.arange(dst[1], dtype=torch.float64)[None, None, :]
    t = theta.to(torch.float64)[:, :2, :, None, None]  # (N, 2, 3, 1, 1)
    pos = t[:, :, 0] * i + t[:, :, 1] * j + t[:, :, 2]  # (N, 2, X, Y): input (i', j')
    size = torch.tensor(src, dtype=torch.float64)[None, :, None, None]
    norm = 2 * pos / (size - 1) - 1 if align_corners else (2 * pos + 1) / size - 1
    return norm.flip(1).permute(0, 2, 3, 1).float()  # grid[..., 0] indexes the last axis (j), [..., 1] the first


def save_prediction(path: str | Path, mask: np.ndarray, affine: np.ndarray,
                    header: nib.Nifti1Header | None = None) -> None:
    """Write ``mask`` (X, Y, Z) as a uint8 NIfTI, atomically.

    Pass the input image's ``header`` (``nib.load(image).header``): when ``affine`` matches its affine within
    ``SAME_AFFINE_ATOL``, qform, sform and zooms are copied bit for bit (non-orthonormal direction cosines
    included) and ``nib.load(path).affine`` equals the input's. Otherwise ``affine`` becomes the sform (exact up to
    NIfTI's float32 storage; ``nib.load(path).affine`` returns it) and the qform (its nearest shear-free
    approximation), both with code "scanner". Intensity scaling of the header is dropped.
    """
    data = np.asarray(mask)
    if data.ndim != 3:
        raise ValueError(f"mask must be 3-D (X, Y, Z), got shape {data.shape}")
    if data.min(initial=0) < 0 or data.max(initial=0) > 255:
        raise ValueError(f"labels must lie in [0, 255] for uint8, got [{data.min()}, {data.max()}]")
    affine = np.asarray(affine, dtype=np.float64)
    hdr = header.copy() if header is not None else None
    keep = hdr is not None and np.allclose(hdr.get_best_affine(), affine, rtol=0, atol=SAME_AFFINE_ATOL)
    img = nib.Nifti1Image(data.astype(np.uint8), hdr.get_best_affine() if keep else affine, hdr)
    if not keep:
        img.set_sform(affine, code=XFORM_SCANNER)
        img.set_qform(affine, code=XFORM_SCANNER)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
