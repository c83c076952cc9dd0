"""2-D U-Nets (segmentation_models_pytorch) with an optional classification head, returning ``{head: logits}``.

The configs' student (``configs/mms.yaml``: a ``tu-tf_mobilenetv3_small_minimal_100`` encoder) has far fewer
parameters than the teacher (``configs/mms_teacher.yaml``: ``resnet18``) but is not faster in proportion: the two
16-channel convolutions of the last decoder stage and the segmentation head run at full resolution in both models,
and there they cost the same whatever their channel count (memory-bound). A student without that stage (logits
upsampled from half resolution), or with lighter convolutions there, measured worse on M&Ms (README).
``benchmarks/mms_models.py`` measures both models: parameters, inference per volume as evaluation runs it, one
training step.

Depthwise convolutions (MobileNet) slow down badly when torch threads outnumber free cores: use one thread per
free core (``OMP_NUM_THREADS``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import safetensors.torch
import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from torch import nn

from groupdistil.errors import UserError

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


def _drop_unused_encoder_blocks(encoder: nn.Module) -> None:
    """With fewer than 5 decoder stages, timm's MobileNet / EfficientNet feature models still hold and run the deeper
    blocks whose output no stage reads: cut them (same weights, same outputs; the parameters count and the forward
    pass no longer include them). Other encoders are left as they are."""
    model = getattr(encoder, "model", None)
    stages = getattr(model, "_stage_out_idx", None)
    runs_blocks_itself = getattr(model, "feature_hooks", 1) is None  # with hooks, timm reads features differently
    if isinstance(getattr(model, "blocks", None), nn.Sequential) and stages and runs_blocks_itself:
        model.blocks = model.blocks[:max(stages)]


def check_encoder(encoder: str) -> None:
    """``model.encoder`` names an smp encoder or a timm model (``tu-<name>``); else a UserError listing the valid
    names (the registries decide, so this is not a config rule)."""
    known = smp.encoders.get_encoder_names()
    if encoder not in known and not (encoder.startswith("tu-") and timm.is_model(encoder[3:])):
        raise UserError(f"model.encoder: unknown encoder '{encoder}'; valid: 'tu-<timm model name>' or one of "
                        f"{', '.join(known)}")


def build_unet(encoder: str, decoder_channels: Sequence[int], heads: Mapping[str, int], in_channels: int = 1,
               dropout: float = 0.2, pretrained: bool = False, cls_head: str = "encoder") -> SegClsNet:
    """``smp.Unet(encoder, encoder_weights=None, ...)``; a ``cls`` head when ``heads`` has one: ``cls_head``
    ``encoder`` (avg pooling on the deepest encoder features) or ``morphology`` (:class:`MorphologyHead`).
    ``pretrained``: the encoder's ImageNet weights from the local cache (see :func:`cached_encoder_weights`); never
    downloaded: when they are not cached, a UserError says what to do.

    One decoder stage per entry of ``decoder_channels``: 5 uses the encoder down to stride 32 (smp's default), 4
    stops at stride 16 (3 at stride 8). The config's values were checked by the pipeline's rules
    (:data:`mms_pipeline.config.RULES`); the encoder name is checked here (:func:`check_encoder`)."""
    check_encoder(encoder)
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
    return SegClsNet(net, classify=aux is not None, morphology=morphology)
