import pytest
import torch
from toy_pipeline import ToyNet, make_data

from groupdistil.config import ENGINE_DEFAULTS
from groupdistil.losses import TaskLoss
from groupdistil.methods import METHODS
from groupdistil.teacher import Teacher


def batch(n=16):
    d = make_data(n, 0)
    d["index"] = torch.arange(n)
    return d


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_updates_and_predicts(name):
    torch.manual_seed(0)
    student = ToyNet(4)
    cls = METHODS.get(name)
    teacher = Teacher(ToyNet(8), lambda: torch.no_grad())
    crit = TaskLoss({"seg": 1.0, "cls": 1.0}, ENGINE_DEFAULTS["loss"])
    m = cls(student, crit, 3, [10, 4, 2], cls.defaults(), teacher=teacher)
    before = [p.clone() for p in student.parameters()]
    logs = m.update(batch())
    assert torch.isfinite(logs["loss"])
    assert logs["group_loss"].shape == (3,) and logs["group_count"].shape == (3,)
    if name in ("groupdro", "groupdistil"):
        assert logs["group_weight"].shape == (3,)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    out = m.predict(batch()["x"])
    assert out["seg"].shape == (16, 3, 16, 16) and out["cls"].shape == (16, 2)
    if cls.needs_teacher:
        assert "cls/kd" in logs and "seg/kd" in logs


def test_unknown_method_lists_valid_names():
    with pytest.raises(KeyError, match="erm, groupdistil, groupdro, kd"):
        METHODS.get("dro")


def test_distillation_methods_need_a_teacher():
    crit = TaskLoss({"cls": 1.0}, ENGINE_DEFAULTS["loss"])
    with pytest.raises(ValueError, match="teacher"):
        METHODS.get("groupdistil")(ToyNet(4), crit, 3, [1, 1, 1], {})


def test_teacher_outputs_are_usable_in_autograd_and_teacher_is_frozen():
    t = Teacher(ToyNet(4), lambda: torch.no_grad())
    out = t(batch(4))
    assert not out["cls"].requires_grad and not torch.is_inference(out["cls"])
    assert all(not p.requires_grad for p in t.model.parameters()) and not t.model.training
