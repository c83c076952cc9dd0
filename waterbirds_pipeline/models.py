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
    """State dict of the ImageNet weights, from the torch hub cache or downloaded; a UserError if neither works."""
    url, cached = imagenet_checkpoint(arch)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu")
    except Exception as e:  # no network (URLError, OSError, ...) or an unreadable cached file
        raise UserError(
            f"model.pretrained: the ImageNet weights of {arch} could not be loaded from {cached} nor downloaded from "
            f"{url} ({type(e).__name__}: {e}); put that file at {cached} (the torch hub cache, see TORCH_HOME) "
            f"or set model.pretrained: false"
        ) from None


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
