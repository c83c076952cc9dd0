"""2-D U-Nets (segmentation_models_pytorch) with an optional classification head, returning ``{head: logits}``.

The pair of ``configs/mms*.yaml``, measured 2026-12-06 on a 2-core AMD EPYC VM (``python -m mms_pipeline.models
[THREADS]`` reproduces it; inference as evaluation runs it, :meth:`groupdistil.runtime.Runtime.predictor`: a
channels_last copy with BatchNorm folded into the convolutions; volume = 8 slices of 96 x 96; training step = batch
16, AdamW, cross-entropy; median of 8 interleaved repeats, the range over 2 runs at 1 thread and 3 at 2 threads: the
VM's speed moved by up to a third between runs minutes apart):

=======================================================  ========  =========================  ====================
model                                                    params    inference / volume         training step
                                                                   1 thread / 2 threads       1 / 2 threads
=======================================================  ========  =========================  ====================
teacher ``resnet18``, decoder (128, 64, 32, 16, 16)      12.46 M   98-105 ms / 57-62 ms       0.75-0.86 / 0.44-0.51 s
student ``tu-tf_mobilenetv3_small_minimal_100``,         0.65 M    25-31 ms / 17-23 ms        0.25-0.27 / 0.17-0.21 s
decoder (32, 16, 16, 16, 16)                                       (0.26-0.30 / 0.30-0.37)
=======================================================  ========  =========================  ====================

The student has 19x fewer parameters but is only 3-4x faster: the two 16-channel convolutions of the last decoder
stage and the segmentation head run at full resolution in both models and cost the same there (about 1.4 ms each
for 7 x 96 x 96 at 2 threads, whatever their channel count: memory-bound). A student without that stage (logits
upsampled from half resolution) was 0.22 of the teacher but measured worse and less stable on M&Ms (README); so
were lighter versions of that stage (``separable_stages``, ``separable_head``, ``head_kernel``: 0.19-0.24 of the
teacher).

Depthwise convolutions (MobileNet) slow down badly when torch threads outnumber free cores: use one thread per
free core (``OMP_NUM_THREADS``).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import safetensors.torch
import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import initialization as smp_init
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from torch import nn

from groupdistil.errors import UserError
from groupdistil.runtime import count_params


#: the pathology heads (``model.cls_head``): ``indices`` (the default) decides from the clinical indices of the
#: predicted segmentation after inference (:mod:`mms_pipeline.pathology`): the network has no classification output
CLS_HEADS = ("indices", "encoder", "morphology")
#: the heads that are part of the network (trained with a classification loss)
NETWORK_CLS_HEADS = ("encoder", "morphology")


class MorphologyHead(nn.Module):
    """Pathology logits of a slice from the shape of its predicted heart, as a cardiologist reads it.

    From the segmentation softmax ``p (B, 4, H, W)`` (background, LV, MYO, RV; gradients stopped, so the
    classification loss never reaches the segmentation network): the soft areas ``a_k = mean_hw p_k`` of LV, MYO and
    RV, the radii ``r_LV = sqrt(a_LV)``, ``r_epi = sqrt(a_LV + a_MYO)``, the wall ``r_epi - r_LV``, and the ratios
    MYO / (LV + MYO) and RV / (LV + MYO + RV); then an MLP ``8 -> hidden -> K``. Inputs are resampled to a fixed
    spacing, so areas are physical up to a constant. It sees no image texture, so it cannot memorise a subject by
    its appearance (the encoder-pooled head did: training accuracy 1.00, validation at chance).
    """

    n_features = 8

    def __init__(self, n_classes: int, hidden: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.n_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    @staticmethod
    def features(seg_logits: torch.Tensor) -> torch.Tensor:
        """``(B, 4, H, W)`` logits -> ``(B, 8)`` shape features (float32, no gradient to the logits)."""
        p = torch.softmax(seg_logits.detach().float(), dim=1)
        a = p[:, 1:4].mean(dim=(2, 3)) * 100.0  # % of the crop
        lv, myo, rv = a[:, 0], a[:, 1], a[:, 2]
        r_lv, r_epi = lv.sqrt(), (lv + myo).sqrt()
        eps = 1e-3
        return torch.stack([lv, myo, rv, r_lv, r_epi, r_epi - r_lv, myo / (lv + myo + eps),
                            rv / (lv + myo + rv + eps)], dim=1)

    def forward(self, seg_logits: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(seg_logits))


class SegClsNet(nn.Module):
    """Wraps an smp model: ``x (B, C, H, W) -> {"seg": (B, n_seg, H, W)[, "cls": (B, n_cls)]}``.

    The ``cls`` head is smp's (average pooling of the deepest encoder features, ``aux_params``) or, with ``morphology``
    given, a :class:`MorphologyHead` on the segmentation output."""

    #: ``model.init_from`` (:func:`groupdistil.checkpoint.init_from`): the encoder must load fully; decoder and heads
    #: may stay random. Plain weights may be a whole smp model (``net.``), smp encoder weights (``net.encoder.``) or
    #: the timm model inside a ``tu-`` encoder (``net.encoder.model.``)
    init_required = ("net.encoder.",)
    init_optional = ()
    init_prefixes = ("", "net.", "net.encoder.", "net.encoder.model.")

    def __init__(self, net: nn.Module, classify: bool, morphology: MorphologyHead | None = None) -> None:
        super().__init__()
        self.net, self.classify = net, classify or morphology is not None
        self.morphology = morphology

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        if self.morphology is not None:
            return {"seg": out, "cls": self.morphology(out)}
        if self.classify:
            seg, cls = out
            return {"seg": seg, "cls": cls}
        return {"seg": out}


def cached_encoder_weights(encoder: str) -> tuple[Path | None, str]:
    """The ImageNet weights of ``encoder`` in the local caches (``None`` when absent), and where to put them.

    smp encoders: ``model.safetensors`` of their ``smp-hub`` repository (``imagenet`` weights) in the Hugging Face hub
    cache, at the pinned revision; ``tu-`` encoders: timm's default pretrained tag, as the file of its URL in the
    torch hub cache (``TORCH_HOME``) or ``model.safetensors`` / ``pytorch_model.bin`` in the hub cache. Nothing is
    downloaded.
    """
    hub = Path(hf_constants.HF_HUB_CACHE)
    if encoder.startswith("tu-"):
        cfg = timm.models.get_pretrained_cfg(encoder[3:])
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise UserError(f"model.pretrained: timm has no pretrained weights for '{encoder[3:]}'; set "
                            f"model.pretrained: false, or model.init_from: a local weights file")
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors",
                                                                                    "pytorch_model.bin"]
        places = [(cfg.hf_hub_id, name, None) for name in names if cfg.hf_hub_id]
        legacy = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name if cfg.url else None
        where = (f"{legacy} (the torch hub cache)" if legacy else "") + (" or " if legacy and places else "") \
            + (f"the Hugging Face hub cache {hub} (repository {cfg.hf_hub_id})" if places else "")
    else:
        settings = smp.encoders.encoders[encoder]["pretrained_settings"]
        tag = "imagenet" if "imagenet" in settings else next(iter(settings), None)
        if tag is None:
            raise UserError(f"model.pretrained: smp has no pretrained weights for encoder '{encoder}'; set "
                            f"model.pretrained: false, or model.init_from: a local weights file")
        repo_id, revision = settings[tag]["repo_id"], settings[tag]["revision"]
        places, legacy = [(repo_id, "model.safetensors", revision)], None
        where = str(hub / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision / "model.safetensors")
    if legacy is not None and legacy.is_file():
        return legacy, where
    for repo_id, filename, revision in places:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str):
            return Path(found), where
    return None, where


def _pretrained_unet(encoder: str, in_channels: int, **kwargs: Any) -> nn.Module:
    """An ``smp.Unet`` whose encoder has its cached ImageNet weights (the first convolution adapted to
    ``in_channels`` as smp and timm do: summed over RGB); a UserError says what to do when they are not cached."""
    weights, where = cached_encoder_weights(encoder)
    if weights is None:
        raise UserError(
            f"model.pretrained: the ImageNet weights of encoder '{encoder}' are not in the local cache and cannot be "
            f"downloaded offline (nothing is downloaded here); put the weights file at {where}, or set "
            f"model.init_from: a local run folder or weights file (a state dict of the model or its encoder), or "
            f"model.pretrained: false")
    if encoder.startswith("tu-"):  # timm reads the local file itself and adapts the first convolution
        return smp.Unet(encoder_name=encoder, encoder_weights=True, in_channels=in_channels,
                        pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=3, **kwargs)
    net.encoder.load_state_dict(safetensors.torch.load_file(str(weights), device="cpu"))
    net.encoder.set_in_channels(in_channels, pretrained=True)
    return net


def _depthwise3x3_bn(channels: int) -> list[nn.Module]:
    """Depthwise 3 x 3 convolution (no bias) and its BatchNorm: the first half of a separable convolution."""
    return [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), nn.BatchNorm2d(channels)]


def separable_conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """A depthwise-separable stand-in for smp's ``Conv2dReLU`` 3 x 3 (MobileNet's block): depthwise 3 x 3, BatchNorm,
    ReLU, pointwise 1 x 1, BatchNorm, ReLU. Both BatchNorms fold into their convolutions at inference
    (:mod:`groupdistil.fold`)."""
    block = nn.Sequential(*_depthwise3x3_bn(in_channels), nn.ReLU(inplace=True),
                          nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                          nn.ReLU(inplace=True))
    smp_init.initialize_decoder(block)
    return block


def separable_head_conv(in_channels: int, classes: int) -> nn.Sequential:
    """The segmentation head's 3 x 3 convolution factored as depthwise 3 x 3, BatchNorm, 1 x 1 to the classes (no
    activation between: a low-rank 3 x 3 convolution, still a 3 x 3 view of the last features)."""
    return nn.Sequential(*_depthwise3x3_bn(in_channels), nn.Conv2d(in_channels, classes, 1))


def _drop_unused_encoder_blocks(encoder: nn.Module) -> None:
    """With fewer than 5 decoder stages, timm's MobileNet / EfficientNet feature models still hold and run the deeper
    blocks whose output no stage reads: cut them (same weights, same outputs; the parameters count and the forward
    pass no longer include them). Other encoders are left as they are."""
    model = getattr(encoder, "model", None)
    stages = getattr(model, "_stage_out_idx", None)
    runs_blocks_itself = getattr(model, "feature_hooks", 1) is None  # with hooks, timm reads features differently
    if isinstance(getattr(model, "blocks", None), nn.Sequential) and stages and runs_blocks_itself:
        model.blocks = model.blocks[:max(stages)]


def build_unet(encoder: str, decoder_channels: Sequence[int], heads: Mapping[str, int], in_channels: int = 1,
               dropout: float = 0.2, pretrained: bool = False, cls_head: str = "encoder", head_kernel: int = 3,
               separable_stages: int = 0, separable_head: bool = False) -> SegClsNet:
    """``smp.Unet(encoder, encoder_weights=None, ...)``; a ``cls`` head when ``heads`` has one: ``cls_head``
    ``encoder`` (avg pooling on the deepest encoder features) or ``morphology`` (:class:`MorphologyHead`).
    ``pretrained``: the encoder's ImageNet weights from the local cache (see :func:`cached_encoder_weights`); never
    downloaded: when they are not cached, a UserError says what to do.

    One decoder stage per entry of ``decoder_channels``: 5 uses the encoder down to stride 32 (smp's default), 4
    stops at stride 16 (3 at stride 8). ``head_kernel``: the segmentation head's convolution, 3 x 3 (smp's) or 1 x 1
    (a per-pixel linear read-out, as the original U-Net's). ``separable_stages``: the last N decoder stages use
    depthwise-separable convolutions (:func:`separable_conv_relu`) instead of full 3 x 3 ones; ``separable_head``: the
    3 x 3 head as a depthwise 3 x 3 convolution, BatchNorm and a 1 x 1 convolution to the classes."""
    if not 3 <= len(decoder_channels) <= 5:
        raise UserError(f"model.decoder_channels: one entry per decoder stage, 3 to 5 of them (the encoder depth), "
                        f"got {list(decoder_channels)}")
    if head_kernel not in (1, 3):
        raise UserError(f"model.head_kernel: 1 or 3, got {head_kernel!r}")
    if not 0 <= separable_stages <= len(decoder_channels):
        raise UserError(f"model.separable_stages: 0 to {len(decoder_channels)} (the decoder stages), got "
                        f"{separable_stages!r}")
    if separable_head and head_kernel != 3:
        raise UserError(f"model.separable_head: needs model.head_kernel 3, got {head_kernel}")
    known = smp.encoders.get_encoder_names()
    if encoder not in known and not (encoder.startswith("tu-") and timm.is_model(encoder[3:])):
        raise UserError(f"model.encoder: unknown encoder '{encoder}'; valid: 'tu-<timm model name>' or one of "
                        f"{', '.join(known)}")
    if cls_head not in CLS_HEADS:
        raise UserError(f"model.cls_head: unknown head '{cls_head}'; valid: {', '.join(CLS_HEADS)}")
    morphology = None
    if "cls" in heads and cls_head == "morphology":
        morphology = MorphologyHead(int(heads["cls"]), dropout=float(dropout))
    aux = ({"classes": int(heads["cls"]), "pooling": "avg", "dropout": float(dropout)}
           if "cls" in heads and morphology is None else None)
    kwargs = {"classes": int(heads["seg"]), "decoder_channels": tuple(int(c) for c in decoder_channels),
              "encoder_depth": len(decoder_channels), "aux_params": aux}
    try:
        if pretrained:
            net = _pretrained_unet(encoder, in_channels, **kwargs)
        else:
            net = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, **kwargs)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"model: cannot build Unet('{encoder}', decoder_channels={list(decoder_channels)}"
                        f"{', pretrained' if pretrained else ''}): {exc}") from None
    _drop_unused_encoder_blocks(net.encoder)
    if head_kernel != 3 or separable_head:
        conv = net.segmentation_head[0]
        net.segmentation_head[0] = (
            separable_head_conv(conv.in_channels, conv.out_channels) if separable_head
            else nn.Conv2d(conv.in_channels, conv.out_channels, head_kernel, padding=head_kernel // 2))
        smp_init.initialize_head(net.segmentation_head)
    for block in list(net.decoder.blocks)[len(net.decoder.blocks) - separable_stages:] if separable_stages else []:
        block.conv1 = separable_conv_relu(block.conv1[0].in_channels, block.conv1[0].out_channels)
        block.conv2 = separable_conv_relu(block.conv2[0].in_channels, block.conv2[0].out_channels)
    return SegClsNet(net, classify=aux is not None, morphology=morphology)


def _benchmark(threads: int = 1) -> None:
    """Parameters, inference per volume (as evaluation runs it: :meth:`groupdistil.runtime.Runtime.predictor`) and
    one training step (batch 16, AdamW, cross-entropy) of the models of ``configs/mms_teacher.yaml`` and
    ``configs/mms.yaml``, interleaved, at ``threads`` threads."""
    import yaml

    from groupdistil.runtime import Runtime

    torch.set_num_threads(threads)
    configs = Path(__file__).resolve().parents[1] / "configs"
    models = {}
    from mms_pipeline.pipeline import MMSPipeline  # (the pipeline imports this module)

    for role, name in (("teacher", "mms_teacher.yaml"), ("student", "mms.yaml")):
        cfg = MMSPipeline.with_defaults(yaml.safe_load((configs / name).read_text()))
        models[role] = (cfg["model"], MMSPipeline.build_model(cfg))  # the network the config's runs train
    x, batch = torch.randn(8, 1, 96, 96), torch.randn(16, 1, 96, 96)
    target = torch.randint(0, 4, (16, 96, 96))
    infer: dict[str, list[float]] = {role: [] for role in models}
    train: dict[str, list[float]] = {role: [] for role in models}
    opts = {role: torch.optim.AdamW(net.parameters()) for role, (_, net) in models.items()}
    for repeat in range(8):
        for role, (_, net) in models.items():
            predict = Runtime().predictor(net)
            predict(x)  # warm-up
            start = time.perf_counter()
            predict(x)
            infer[role].append(time.perf_counter() - start)
            net.train()
            start = time.perf_counter()
            loss = nn.functional.cross_entropy(net(batch)["seg"], target)
            opts[role].zero_grad()
            loss.backward()
            opts[role].step()
            train[role].append(time.perf_counter() - start)
    for role, (m, net) in models.items():
        print(f"{role:8s} {m['encoder']:36s} decoder {list(m['decoder_channels'])}: "
              f"{count_params(net) / 1e6:5.2f} M params, {statistics.median(infer[role]) * 1e3:6.1f} ms / volume "
              f"(8 x 96 x 96), "
              f"{statistics.median(train[role]):5.2f} s / training step (batch 16)")


if __name__ == "__main__":
    import sys

    _benchmark(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
