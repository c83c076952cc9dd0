"""Whole-volume inference of the 2-D model: the slices of a preprocessed volume through the network, the class
probabilities mapped back to the volume's native geometry, the argmax there.

The network sees one slice of the working size (``data.roi``) at a time, as MONAI's ``SliceInferer`` would give it
(one window per slice); the probabilities go back through the inverse of the preprocessing
(:func:`mms_pipeline.geometry.invert_inplane`, else MONAI's ``Invertd``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import Compose, Invertd

from groupdistil.pipeline import Predictor

from .geometry import invert_inplane


def channel_argmax(p: torch.Tensor) -> torch.Tensor:
    """``p.argmax(0)`` of a channel-first tensor ``(C, *spatial) -> (*spatial)``: the same indices (the first
    maximum; a NaN counts as the maximum), from ``torch.max(p, 0)``, which vectorises over the spatial positions on
    the CPU where ``argmax`` over the outer dimension does not."""
    return torch.max(p, 0).indices


def spatial_outputs(predict: Predictor) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Wrap a predictor for ``SliceInferer``: ``cls`` logits ``(B, K)`` are broadcast to ``(B, K, H, W)`` so the
    sliding-window machinery carries them (one window per slice: the value comes back unchanged)."""

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: v.to(x.device) for k, v in predict(x).items()}  # stitched where the windows come from (CPU)
        h, w = x.shape[-2:]
        return {k: v[:, :, None, None].expand(-1, -1, h, w).contiguous() if v.ndim == 2 else v
                for k, v in out.items()}

    return run


class VolumeInference:
    """Inference on preprocessed volumes ``(1, H, W, Z)`` of the working size ``roi`` (H, W), ``batch`` slices per
    forward pass (``eval.sw_batch_size``); ``preprocessor`` is the :func:`mms_pipeline.transforms.preprocess` the
    volumes went through (inverted by ``Invertd`` where the 2-D inversion does not apply)."""

    def __init__(self, roi: Sequence[int], batch: int, preprocessor: Compose) -> None:
        self.roi, self.batch, self.preprocessor = tuple(int(r) for r in roi), int(batch), preprocessor

    @cached_property
    def inferer(self) -> SliceInferer:
        return SliceInferer(roi_size=self.roi, sw_batch_size=self.batch, spatial_dim=2, progress=False)

    @cached_property
    def inverter(self) -> Invertd:
        return Invertd(keys="pred", transform=self.preprocessor, orig_keys="image", nearest_interp=False)

    def infer_slices(self, predict: Predictor, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        """``SliceInferer``'s outputs for a preprocessed volume ``(1, H, W, Z)``: ``seg`` ``(1, C, H, W, Z)``, ``cls``
        ``(1, K, 1 or H, 1 or W, Z)``. When a slice is exactly one window (``preprocess`` crops and pads every volume
        to ``data.roi``) sliding-window inference reduces to the network on the slices in batches of :attr:`batch`
        (one window, weight 1, count 1): that is run directly, without the window bookkeeping (the same outputs,
        ``tests/mms/test_data.py``); any other size goes through ``SliceInferer``."""
        if volume.ndim != 4 or tuple(volume.shape[1:3]) != self.roi:
            return self.inferer(volume[None], spatial_outputs(predict))
        slices = volume.permute(3, 0, 1, 2)  # (Z, 1, H, W)
        parts = [predict(slices[i:i + self.batch]) for i in range(0, len(slices), self.batch)]
        out = {k: torch.cat([p[k] for p in parts]).to(volume.device) for k in parts[0]}
        return {k: v.permute(1, 2, 3, 0)[None] if v.ndim == 4 else v.T[None, :, None, None, :] for k, v in out.items()}

    @torch.inference_mode()
    def predict_volume(self, predict: Predictor, image: MetaTensor) -> tuple[np.ndarray, torch.Tensor | None, float]:
        """Native-geometry labels ``(X, Y, Z)``, per-slice class probabilities ``(Z_fg, K)`` of the slices with
        predicted foreground (all slices when none), and the inference seconds, of one preprocessed volume."""
        start = time.perf_counter()
        out = self.infer_slices(predict, image.as_tensor())
        seconds = time.perf_counter() - start
        probs = torch.softmax(out["seg"][0].float().cpu(), dim=0)  # (C, H, W, Z)
        native = invert_inplane(probs, image)  # Invertd's result, resampled in 2-D (mms_pipeline.geometry)
        if native is None:
            native = self.inverter({"image": image, "pred": MetaTensor(probs, affine=image.affine)})["pred"].as_tensor()
        labels = channel_argmax(native).numpy().astype(np.uint8)
        cls = None
        if "cls" in out:
            per_slice = torch.softmax(out["cls"][0, :, 0, 0, :].float().cpu(), dim=0).T  # (Z, K)
            fg = channel_argmax(probs).flatten(0, 1).any(0)  # (Z,)
            cls = per_slice[fg] if fg.any() else per_slice
        return labels, cls, seconds
