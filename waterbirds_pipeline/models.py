"""Waterbirds classifiers: torchvision ResNets by name, optionally from ImageNet weights, returning ``{"cls": logits}``.

The paper distils a ResNet-50 teacher into a ResNet-18 student, both ImageNet-pretrained.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from groupdistil.errors import UserError
from groupdistil.registry import Registry

ARCHS: Registry[Callable[..., torchvision.models.ResNet]] = Registry("model.arch")
for _name in ("resnet18", "resnet34", "resnet50"):
    ARCHS.register(_name)(getattr(torchvision.models, _name))


class Classifier(nn.Module):
    """A torchvision backbone whose ``forward(x)`` returns ``{"cls": logits}``, logits ``(B, n_classes)``."""

    #: ``model.init_from`` (:func:`groupdistil.checkpoint.init_from`): the backbone must load fully, its ``fc`` head
    #: may stay random (another number of classes); plain torchvision / timm ResNet weights sit under ``backbone.``
    init_required = ("backbone.",)
    init_optional = ("backbone.fc.",)
    init_prefixes = ("", "backbone.")

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": self.backbone(x)}


def imagenet_checkpoint(arch: str) -> tuple[str, Path]:
    """URL of the torchvision ImageNet weights of ``arch`` (IMAGENET1K_V1, as the references) and their cache path."""
    url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def load_imagenet_weights(arch: str) -> dict[str, Any]:
    """State dict of the ImageNet weights, from the torch hub cache only (never downloaded: there is no network
    here), read with ``weights_only=True``; a UserError says what to do when they are not there."""
    url, cached = imagenet_checkpoint(arch)
    if not cached.is_file():
        raise UserError(
            f"model.pretrained: the ImageNet weights of {arch} could not be loaded: {cached} is not in the torch hub "
            f"cache and nothing is downloaded here; put the file of {url} at {cached} (the torch hub cache, see "
            f"TORCH_HOME), or set model.init_from: a local run folder or weights file, or model.pretrained: false")
    try:
        return torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated file, or one holding code (refused unrun)
        raise UserError(f"model.pretrained: the ImageNet weights of {arch} could not be loaded from {cached} "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); replace that file, or set "
                        f"model.pretrained: false") from None


def build_model(arch: str, pretrained: bool, n_classes: int) -> Classifier:
    """A ResNet of ``arch`` with a fresh ``n_classes`` linear head; its trunk from ImageNet when ``pretrained``."""
    try:
        factory = ARCHS.get(arch)
    except KeyError as e:
        raise UserError(e.args[0]) from None
    net = factory(weights=None)
    if pretrained:
        net.load_state_dict(load_imagenet_weights(arch))
    net.fc = nn.Linear(net.fc.in_features, n_classes)
    return Classifier(net)
