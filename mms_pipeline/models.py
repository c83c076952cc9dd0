"""2-D U-Nets (segmentation_models_pytorch) with an optional classification head, returning ``{head: logits}``.

The pair of ``configs/mms*.yaml``, measured on this project's shared CPUs (1 thread, ``python -m
mms_pipeline.models`` reproduces it; volume = 8 slices of 96 x 96, training step = batch 16, AdamW):

=======================================================  ========  ==================  ===================
model                                                    params    inference / volume  training step
=======================================================  ========  ==================  ===================
teacher ``resnet18``, decoder (128, 64, 32, 16, 16)      12.46 M   ~180 ms             ~1.2 s
student ``tu-tf_mobilenetv3_small_minimal_100``,         0.64 M    ~45 ms (4x faster)  ~0.36 s
decoder (32, 16, 16, 8, 8)
=======================================================  ========  ==================  ===================

Depthwise convolutions (MobileNet) slow down badly when torch threads outnumber free cores: use one thread per
free core (``OMP_NUM_THREADS``).
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from groupdistil.errors import UserError
from groupdistil.runtime import count_params


class SegClsNet(nn.Module):
    """Wraps an smp model: ``x (B, C, H, W) -> {"seg": (B, n_seg, H, W)[, "cls": (B, n_cls)]}``."""

    def __init__(self, net: nn.Module, classify: bool) -> None:
        super().__init__()
        self.net, self.classify = net, classify

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        if self.classify:
            seg, cls = out
            return {"seg": seg, "cls": cls}
        return {"seg": out}


def build_unet(encoder: str, decoder_channels: Sequence[int], heads: Mapping[str, int], in_channels: int = 1,
               dropout: float = 0.2, pretrained: bool = False) -> SegClsNet:
    """``smp.Unet(encoder, encoder_weights=None, ...)``; a ``cls`` head (avg pooling on the deepest encoder features)
    when ``heads`` has one. ``pretrained`` weights cannot be downloaded offline: a UserError says what to do."""
    if pretrained:
        raise UserError(
            "model.pretrained: true needs encoder weights from a model hub, which cannot be downloaded offline; "
            "set model.pretrained: false (weights from scratch) or put the weights in the torch hub cache first"
        )
    known = smp.encoders.get_encoder_names()
    if encoder not in known and not (encoder.startswith("tu-") and timm.is_model(encoder[3:])):
        raise UserError(f"model.encoder: unknown encoder '{encoder}'; valid: 'tu-<timm model name>' or one of "
                        f"{', '.join(known)}")
    aux = {"classes": int(heads["cls"]), "pooling": "avg", "dropout": float(dropout)} if "cls" in heads else None
    try:
        net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=int(heads["seg"]),
                       decoder_channels=tuple(int(c) for c in decoder_channels), aux_params=aux)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"model: cannot build Unet('{encoder}', decoder_channels={list(decoder_channels)}): "
                        f"{exc}") from None
    return SegClsNet(net, classify=aux is not None)


@torch.inference_mode()
def seconds_per_volume(model: nn.Module, slices: int = 8, size: int = 96, repeats: int = 5) -> float:
    """Median CPU time of a forward pass over one ``(slices, 1, size, size)`` volume."""
    model.eval()
    x = torch.randn(slices, 1, size, size)
    model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def _benchmark(pairs: Mapping[str, Mapping[str, Any]]) -> None:
    torch.set_num_threads(1)
    for role, cfg in pairs.items():
        model = build_unet(cfg["encoder"], cfg["decoder_channels"], {"seg": 4, "cls": 4})
        print(f"{role:8s} {cfg['encoder']:36s} {count_params(model) / 1e6:6.2f} M params "
              f"{seconds_per_volume(model) * 1000:7.0f} ms / volume")


if __name__ == "__main__":
    _benchmark({
        "teacher": {"encoder": "resnet18", "decoder_channels": (128, 64, 32, 16, 16)},  # configs/mms_teacher.yaml
        "student": {"encoder": "tu-tf_mobilenetv3_small_minimal_100", "decoder_channels": (32, 16, 16, 8, 8)},  # mms
    })
