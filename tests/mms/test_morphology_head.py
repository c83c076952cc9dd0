"""The morphology pathology head (``model.cls_head: morphology``): shape features of the predicted heart only."""
import math

import pytest
import torch
from numpy.testing import assert_allclose

from groupdistil.errors import UserError
from mms_pipeline.models import MorphologyHead, build_unet
from mms_pipeline.pipeline import MMSPipeline


def one_hot_logits(label: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` labels -> logits whose softmax is (almost exactly) the one-hot map."""
    return torch.nn.functional.one_hot(label, 4).permute(0, 3, 1, 2).float() * 50.0


def test_features_of_a_known_mask():
    label = torch.zeros(1, 10, 10, dtype=torch.long)
    label[0, :2, :2] = 1  # LV: 4 px = 4% of the crop
    label[0, 2:5, :4] = 2  # MYO: 12 px
    label[0, 8:, :] = 3  # RV: 20 px
    f = MorphologyHead.features(one_hot_logits(label))[0]
    lv, myo, rv = 4.0, 12.0, 20.0
    r_lv, r_epi = math.sqrt(lv), math.sqrt(lv + myo)
    want = [lv, myo, rv, r_lv, r_epi, r_epi - r_lv, myo / (lv + myo), rv / (lv + myo + rv)]
    assert_allclose(f.tolist(), want, rtol=1e-4)
    # where the heart sits in the crop does not matter: only its shape does
    moved = MorphologyHead.features(one_hot_logits(torch.roll(label, shifts=(1, 3), dims=(1, 2))))[0]
    assert_allclose(moved.tolist(), want, rtol=1e-4)


def test_the_classification_loss_never_reaches_the_segmentation_network():
    torch.manual_seed(0)
    net = build_unet("tu-tf_mobilenetv3_small_minimal_100", (32, 16, 16, 8, 8), {"seg": 4, "cls": 4},
                     cls_head="morphology")
    out = net(torch.randn(2, 1, 64, 64))
    assert out["seg"].shape == (2, 4, 64, 64) and out["cls"].shape == (2, 4)
    out["cls"].sum().backward()
    assert all(p.grad is None for p in net.net.parameters())
    assert all(p.grad is not None for p in net.morphology.parameters())


def test_encoder_head_is_still_smps_and_unknown_heads_are_refused():
    net = build_unet("resnet18", (32, 16, 16, 8, 8), {"seg": 4, "cls": 3})
    assert net.morphology is None and net(torch.randn(1, 1, 64, 64))["cls"].shape == (1, 3)
    with pytest.raises(UserError, match="model.cls_head = 'pixels' is not allowed; it must be indices, encoder or "
                                        "morphology"):
        MMSPipeline.model_for({"model": {"encoder": "resnet18", "cls_head": "pixels"}})
