"""Model registry, forward contract, and ImageNet weights: from the hub cache, or a clear error offline."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from groupdistil.errors import UserError
from waterbirds_pipeline.models import build_model, imagenet_checkpoint


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache with downloads failing as they do without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def test_forward_returns_cls_logits() -> None:
    model = build_model("resnet18", pretrained=False, n_classes=2).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert set(out) == {"cls"} and out["cls"].shape == (3, 2)


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(UserError, match="unknown model.arch 'vgg'; valid: resnet18, resnet34, resnet50"):
        build_model("vgg", pretrained=False, n_classes=2)


def test_pretrained_offline_is_an_error(offline_hub: Path) -> None:
    url, cached = imagenet_checkpoint("resnet18")
    assert cached == offline_hub / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UserError) as err:
        build_model("resnet18", pretrained=True, n_classes=2)
    msg = str(err.value)
    assert "could not be loaded" in msg and str(cached) in msg and url in msg and "pretrained: false" in msg


def test_pretrained_from_the_hub_cache(offline_hub: Path) -> None:
    _, cached = imagenet_checkpoint("resnet18")
    cached.parent.mkdir(parents=True)
    reference = torchvision.models.resnet18().state_dict()
    torch.save(reference, cached)
    model = build_model("resnet18", pretrained=True, n_classes=2)
    assert torch.equal(model.backbone.conv1.weight, reference["conv1.weight"])
    assert model.backbone.fc.out_features == 2
