"""Saving predictions in the native geometry of the input.

Predictions come back from the working space of :func:`mms_pipeline.transforms.preprocess` (in-plane ``Spacingd``
and ``ResizeWithPadOrCropd``) through MONAI ``Invertd`` (:attr:`mms_pipeline.pipeline.MMSPipeline.inverter`); the
prediction passed to ``Invertd`` must be a MetaTensor, or ``Invertd`` skips it with a warning. MONAI recomputes the
native affine in float64 (off by ~1e-15), so :func:`save_prediction` writes the input file's own geometry instead.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from groupdistil.io import atomic_path

#: NIfTI xform code "scanner" (used when no original header is given)
XFORM_SCANNER = 1
#: largest difference (mm) between ``affine`` and the header's affine for the header's geometry to be kept
SAME_AFFINE_ATOL = 1e-6


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
