"""Native geometry: a native mask through the pipeline's preprocessing and back (its Invertd), saved as NIfTI, keeps its
shape and its non-orthonormal affine exactly; the fast in-plane inversion reproduces Invertd."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import LoadImage

from mms_pipeline.geometry import XFORM_SCANNER, invert_inplane, save_prediction
from mms_pipeline.pipeline import MMSPipeline

# sheared, non-orthonormal direction cosines (as in the M&Ms validation/test files), float32-exact as read from a file
SHEARED = np.array([[1.37, 0.05, 0.3, -100.5],
                    [0.02, -1.36, 0.7, 50.25],
                    [0.01, 0.04, 9.9, -20.0],
                    [0.0, 0.0, 0.0, 1.0]]).astype(np.float32).astype(np.float64)


def _labels(shape: tuple[int, int, int], t: int) -> np.ndarray:
    g = np.indices(shape, dtype=np.float64)
    cx, cy = shape[0] / 2 + t, shape[1] / 2
    lab = np.zeros(shape, dtype=np.uint8)
    lab[((g[0] - cx) / 15) ** 2 + ((g[1] - cy) / 12) ** 2 < 1] = 2
    lab[((g[0] - cx) / 9) ** 2 + ((g[1] - cy) / 7) ** 2 < 1] = 1
    lab[((g[0] - cx + 19) / 6) ** 2 + ((g[1] - cy) / 10) ** 2 < 1] = 3
    return lab


def _write_4d(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, path)


def test_nibabel_round_trips_a_sheared_affine(tmp_path: Path) -> None:
    mask = _labels((40, 36, 4), 0)
    save_prediction(tmp_path / "p.nii.gz", mask, SHEARED)
    back = nib.load(tmp_path / "p.nii.gz")
    assert np.array_equal(back.affine, SHEARED)
    assert back.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(back.dataobj), mask)
    assert int(back.header["sform_code"]) == int(back.header["qform_code"]) == XFORM_SCANNER
    assert not list(tmp_path.glob(".*"))  # atomic write: no temporary file left


def test_header_geometry_is_copied_bit_for_bit_and_scaling_dropped(tmp_path: Path) -> None:
    _write_4d(tmp_path / "img.nii.gz", np.random.default_rng(0).random((40, 36, 4, 3)).astype(np.float32), SHEARED)
    src = nib.load(tmp_path / "img.nii.gz")
    hdr = src.header.copy()
    hdr.set_slope_inter(2.0, 5.0)  # an image header's scaling must not rescale the labels
    mask = _labels((40, 36, 4), 0)
    # an affine that went through float64 transforms (MONAI's inverse) still selects the header's geometry
    save_prediction(tmp_path / "p.nii.gz", mask, src.affine + 1e-13, hdr)
    back = nib.load(tmp_path / "p.nii.gz")
    assert np.array_equal(back.affine, src.affine)
    assert np.array_equal(back.header.get_qform(), src.header.get_qform())
    assert np.array_equal(back.header.get_sform(), src.header.get_sform())
    assert back.header.get_zooms() == src.header.get_zooms()[:3]
    assert back.shape == mask.shape and np.array_equal(np.asarray(back.dataobj), mask)


def test_pipeline_preprocess_invert_save_round_trip(tmp_path: Path) -> None:
    """Native 4-D files -> the pipeline's preprocessing of one frame -> its Invertd (as ``predict_volume``: class
    probabilities, then argmax) -> NIfTI: same shape, same sheared affine, same labels up to resampling."""
    shape, frames, frame = (75, 44, 5), 3, 1
    labels = np.stack([_labels(shape, t) for t in range(frames)], axis=-1)
    image = (np.random.default_rng(1).random((*shape, frames)) * 500).astype(np.float32)
    _write_4d(tmp_path / "sa.nii.gz", image, SHEARED)
    _write_4d(tmp_path / "sa_gt.nii.gz", labels, SHEARED)
    pipe = MMSPipeline({"data": {"roi": [64, 64], "spacing": [1.25, 1.25]}, "model": {}, "eval": {}}, tmp_path)
    load = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)  # as mms_pipeline.data
    out = pipe.preprocessor({"image": load(tmp_path / "sa.nii.gz"), "label": load(tmp_path / "sa_gt.nii.gz"),
                             "frame": frame})
    work = out["image"]
    assert tuple(work.shape) == (1, 64, 64, shape[2])  # x: 75 -> 82 cropped; y: 44 -> 48 padded

    # "probabilities" made in the working space: the one-hot of the preprocessed truth
    probs = F.one_hot(out["label"][0].as_tensor().round().long(), 4).permute(3, 0, 1, 2).float()
    native = pipe.inference.inverter({"image": work, "pred": MetaTensor(probs, affine=work.affine)})["pred"]
    pred = native.argmax(0).numpy().astype(np.uint8)
    assert pred.shape == shape
    assert np.abs(native.affine.numpy() - SHEARED).max() < 1e-9  # MONAI's float64 recomputation: close, not equal
    for label in (1, 2, 3):
        p, g = pred == label, labels[..., frame] == label
        assert 2 * np.count_nonzero(p & g) / (p.sum() + g.sum()) > 0.95

    src = nib.load(tmp_path / "sa.nii.gz")
    save_prediction(tmp_path / "sa_ED.nii.gz", pred, native.affine.numpy(), src.header)
    back = nib.load(tmp_path / "sa_ED.nii.gz")
    assert back.shape == shape and np.array_equal(back.affine, SHEARED) and np.array_equal(back.affine, src.affine)
    assert np.array_equal(np.asarray(back.dataobj), pred)


@pytest.mark.parametrize(("mask", "match"), [(np.zeros((4, 4)), "3-D"), (np.full((2, 2, 2), 300), "uint8"),
                                             (np.full((2, 2, 2), -1), "uint8")])
def test_save_prediction_rejects_bad_masks(tmp_path: Path, mask: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        save_prediction(tmp_path / "p.nii.gz", mask, SHEARED)


def _work_volume(tmp_path: Path, spacing: list[float], roi: list[int]) -> tuple[MMSPipeline, MetaTensor]:
    """One frame of a sheared native volume (75 x 44 x 5) through the pipeline's preprocessing."""
    shape = (75, 44, 5)
    image = (np.random.default_rng(1).random((*shape, 2)) * 500).astype(np.float32)
    _write_4d(tmp_path / "sa.nii.gz", image, SHEARED)
    pipe = MMSPipeline({"data": {"roi": roi, "spacing": spacing}, "model": {}, "eval": {}}, tmp_path)
    load = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)
    return pipe, pipe.preprocessor({"image": load(tmp_path / "sa.nii.gz"), "frame": 0})["image"]


@pytest.mark.parametrize(("spacing", "roi"), [([1.25, 1.25], [64, 64]),  # x cropped, y padded
                                              ([0.9, 1.6], [32, 96]),  # anisotropic: x cropped, y padded more
                                              ([2.0, 2.0], [96, 96])])  # padded only
def test_fast_inplane_inversion_equals_invertd(tmp_path: Path, spacing: list[float], roi: list[int]) -> None:
    """``invert_inplane`` (2-D warps of slice blends, as ``predict_volume`` inverts) gives ``Invertd``'s probabilities
    to float32 rounding, hence its labels, on a sheared affine whose slices land between working slices."""
    pipe, work = _work_volume(tmp_path, spacing, roi)
    torch.manual_seed(0)
    probs = torch.softmax(2 * torch.randn(4, *work.shape[1:]), 0)
    want = pipe.inference.inverter({"image": work, "pred": MetaTensor(probs, affine=work.affine)})["pred"]
    want = want.as_tensor().float()
    got = invert_inplane(probs, work)
    assert got is not None and got.shape == want.shape == (4, 75, 44, 5)
    assert torch.allclose(got, want, rtol=0, atol=1e-4)
    assert float((got.argmax(0) != want.argmax(0)).float().mean()) < 1e-3  # only exact near-ties may flip


def test_fast_inversion_declines_what_it_does_not_reproduce(tmp_path: Path) -> None:
    """Another trace, another interpolation or padding mode, or a slice position that varies in-plane: ``None``
    (Invertd runs)."""
    from copy import deepcopy

    _, work = _work_volume(tmp_path, [1.25, 1.25], [64, 64])
    probs = torch.full((4, *work.shape[1:]), 0.25)
    assert invert_inplane(probs, work) is not None
    no_crop = MetaTensor(work.as_tensor(), affine=work.affine, applied_operations=work.applied_operations[:1])
    assert invert_inplane(probs, no_crop) is None
    for key, value in (("mode", "nearest"), ("padding_mode", "zeros")):
        other = deepcopy(work.applied_operations)
        other[0]["extra_info"][key] = value
        assert invert_inplane(probs, MetaTensor(work.as_tensor(), affine=work.affine, applied_operations=other)) is None
    tilted = deepcopy(work.applied_operations)
    tilted[0]["extra_info"]["src_affine"] = tilted[0]["extra_info"]["src_affine"].clone()
    tilted[0]["extra_info"]["src_affine"][2, 0] += 0.5  # the native slice is tilted against the working slices
    assert invert_inplane(probs, MetaTensor(work.as_tensor(), affine=work.affine, applied_operations=tilted)) is None
