import pytest
import torch
from toy_pipeline import ToyDataset, ToyNet, make_data

from groupdistil.config import ENGINE_DEFAULTS
from groupdistil.losses import TaskLoss
from groupdistil.methods import METHODS
from groupdistil.teacher import Teacher


def batch(n=16):
    d = make_data(n, 0)
    d["index"] = torch.arange(n)
    return d


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_updates_the_student(name):
    torch.manual_seed(0)
    student = ToyNet(4)
    cls = METHODS.get(name)
    teacher = Teacher(ToyNet(8), lambda: torch.no_grad())
    crit = TaskLoss({"seg": 1.0, "cls": 1.0}, ENGINE_DEFAULTS["loss"])
    m = cls(student, crit, 3, [10, 4, 2], cls.defaults(), teacher=teacher)
    data = make_data(16, 0)
    m.prepare(ToyDataset(data, augment=False), data["group"], 8)
    before = [p.clone() for p in student.parameters()]
    logs = m.update(batch())
    assert torch.isfinite(logs["loss"])
    assert logs["group_loss"].shape == (3,) and logs["group_count"].shape == (3,)
    if name in ("groupdro", "groupdistil"):
        assert logs["group_weight"].shape == (3,)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    out = m.runtime.predictor(student)(batch()["x"])  # the trained student, as evaluation runs it
    assert out["seg"].shape == (16, 3, 16, 16) and out["cls"].shape == (16, 2)
    if cls.needs_teacher:
        assert "cls/kd" in logs and "seg/kd" in logs


def test_unknown_method_lists_valid_names():
    with pytest.raises(KeyError, match="erm, groupdistil, groupdro, jtt_kd, kd, kd_reweighted"):
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


def test_inverse_frequency_weights_by_hand():
    """kd_reweighted: objective sum_i w_i l_i / sum_i w_i with w_i = 1 / n_{g_i} (training counts)."""
    torch.manual_seed(0)
    data = make_data(16, 0)
    cls = METHODS.get("kd_reweighted")
    crit = TaskLoss({"cls": 1.0}, ENGINE_DEFAULTS["loss"])
    m = cls(ToyNet(4), crit, 3, [10, 4, 2], {}, teacher=Teacher(ToyNet(8), lambda: torch.no_grad()))
    m.prepare(ToyDataset(data, augment=False), data["group"], 8)
    counts = torch.bincount(data["group"], minlength=3).float()
    torch.testing.assert_close(m.sample_w, 1.0 / counts[data["group"]])
    b = {**data, "index": torch.arange(16)}
    terms = m.per_sample(b, m.student(b["x"]))
    obj, logs = m.aggregate(terms, b)
    w = 1.0 / counts[data["group"]]
    torch.testing.assert_close(obj, (w * terms["total"]).sum() / w.sum())
    group_means = torch.stack([terms["total"][data["group"] == g].mean() for g in range(3)])
    torch.testing.assert_close(obj, group_means.mean())  # = the unweighted mean of the group means


def test_jtt_split_on_a_hand_made_set():
    """jtt_kd upweights exactly the samples the teacher gets wrong (classification), by lambda_up."""

    class Fixed(torch.nn.Module):  # a 'teacher' that predicts class 1 everywhere
        def forward(self, x):
            return {"cls": torch.tensor([[0.0, 5.0]]).expand(len(x), 2), "seg": torch.zeros(len(x), 3, 16, 16)}

    class ClsOnly(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"cls": self.net(x)["cls"]}

    data = make_data(16, 0)
    crit = TaskLoss({"cls": 1.0}, ENGINE_DEFAULTS["loss"])
    m = METHODS.get("jtt_kd")(ClsOnly(ToyNet(4)), crit, 3, [10, 4, 2], {"lambda_up": 5.0},
                              teacher=Teacher(ClsOnly(Fixed()), lambda: torch.no_grad()))
    note = m.prepare(ToyDataset(data, augment=False), data["group"], 5)
    wrong = data["cls"] != 1
    assert torch.equal(m.error_set, wrong) and f"{int(wrong.sum())} of 16 training samples upweighted x5" in note
    torch.testing.assert_close(m.sample_w, torch.where(wrong, 5.0, 1.0))
