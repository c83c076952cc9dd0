import math

import pytest
import torch
from monai.losses import DiceLoss
from torch.testing import assert_close

from groupdistil.losses import (
    ClassificationLoss,
    SegmentationLoss,
    TaskLoss,
    kd_term,
    per_sample_ce,
)


def kd_reference(zs, zt, tau):
    """Float64 loop reference: tau^2 * sum_k pt_k log(pt_k / ps_k), averaged over positions."""
    zs, zt = zs.double(), zt.double()
    out = []
    for b in range(zs.shape[0]):
        s = zs[b].reshape(zs.shape[1], -1)
        t = zt[b].reshape(zt.shape[1], -1)
        vals = []
        for j in range(s.shape[1]):
            ps = [math.exp(v / tau) for v in s[:, j].tolist()]
            pt = [math.exp(v / tau) for v in t[:, j].tolist()]
            ps = [p / sum(ps) for p in ps]
            pt = [p / sum(pt) for p in pt]
            vals.append(sum(a * math.log(a / c) for a, c in zip(pt, ps)))
        out.append(tau * tau * sum(vals) / len(vals))
    return torch.tensor(out, dtype=torch.float64)


def test_kd_known_value():
    zs = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    zt = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_T = (3/4, 1/4), p_S = (1/2, 1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert_close(kd_term(zs, zt, 1.0), torch.tensor([expected], dtype=torch.float64))


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_kd_matches_reference_classification(tau):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert_close(kd_term(zs, zt, tau), kd_reference(zs, zt, tau))


def test_kd_per_pixel_is_mean_over_pixels():
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    zt = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    out = kd_term(zs, zt, 2.0)
    assert out.shape == (3,)
    assert_close(out, kd_reference(zs, zt, 2.0))


def test_kd_tau_squared_scaling():
    # with logits scaled by tau, the softmaxes at temperature tau are those at temperature 1: KD scales by tau^2
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert_close(kd_term(3.0 * zs, 3.0 * zt, 3.0), 9.0 * kd_term(zs, zt, 1.0))


def test_kd_zero_when_student_equals_teacher_and_positive_otherwise():
    z = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    assert_close(kd_term(z, z.clone(), 4.0), torch.zeros(4, dtype=torch.float64))
    assert (kd_term(z, z + torch.randn_like(z), 4.0) > 0).all()


def test_per_sample_ce_matches_torch():
    logits = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 1, 5, 5))
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[i:i + 1], target[i:i + 1, 0]) for i in range(3)])
    assert_close(per_sample_ce(logits, target), expected)


def test_segmentation_dice_term_matches_monai_per_sample():
    """The Dice term of SegmentationLoss is MONAI's foreground soft Dice of each sample on its own, for label maps
    given as (B, 1, H, W) or (B, H, W)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (4, 1, 8, 8), generator=g)
    ref = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)  # mean over classes of one sample
    expected = torch.stack([ref(logits[i:i + 1], target[i:i + 1]) for i in range(4)])
    loss = SegmentationLoss()
    assert_close(loss(logits, target, None)["dice"], expected)
    assert_close(loss(logits, target[:, 0], None)["dice"], expected)


def test_classification_loss_combination():
    zs, zt, y = torch.randn(6, 3), torch.randn(6, 3), torch.randint(0, 3, (6,))
    out = ClassificationLoss(alpha=0.3, tau=2.0)(zs, y, zt)
    assert_close(out["total"], 0.3 * per_sample_ce(zs, y) + 0.7 * kd_term(zs, zt, 2.0))
    assert set(ClassificationLoss()(zs, y, None)) == {"ce", "total", "label"}
    assert_close(out["label"], per_sample_ce(zs, y))  # the label loss: without the KD term


def test_segmentation_loss_and_task_loss_weights():
    zs, zt = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    cs, ct = torch.randn(2, 3), torch.randn(2, 3)
    seg, y = torch.randint(0, 4, (2, 1, 8, 8)), torch.randint(0, 3, (2,))
    cfg = {"alpha": 0.5, "tau": 2.0, "lambda_dice": 1.0, "lambda_ce": 0.5, "lambda_kd": 2.0}
    seg_out = SegmentationLoss(1.0, 0.5, 2.0, tau=2.0)(zs, seg, zt)
    assert_close(seg_out["total"], seg_out["dice"] + 0.5 * seg_out["ce"] + 2.0 * seg_out["kd"])
    task = TaskLoss({"seg": 1.0, "cls": 0.25}, cfg)
    out = task({"seg": zs, "cls": cs}, {"seg": seg, "cls": y}, {"seg": zt, "cls": ct})
    cls_total = ClassificationLoss(0.5, 2.0)(cs, y, ct)["total"]
    assert_close(out["total"], seg_out["total"] + 0.25 * cls_total)
    assert out["total"].shape == (2,)
    assert {"seg/dice", "seg/ce", "seg/kd", "cls/ce", "cls/kd"} <= set(out)


@pytest.mark.parametrize("kwargs", [{"alpha": 1.5}, {"tau": 0.0}])
def test_bad_loss_options_raise(kwargs):
    with pytest.raises(ValueError):
        ClassificationLoss(**kwargs)


def test_unknown_head_raises():
    with pytest.raises(ValueError, match="valid"):
        TaskLoss({"depth": 1.0}, {"alpha": 0.5, "tau": 1.0, "lambda_dice": 1, "lambda_ce": 1, "lambda_kd": 1})
