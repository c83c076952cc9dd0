"""The signals EG can ascend (method_args.signal): train, heldout, excess. EG identity on real runs' logs, the
held-out samples never trained on, and the excess loss by hand."""
import json
import math

import pytest
import torch
from toy_pipeline import ToyNet, make_data, train_toy

from groupdistil.config import ENGINE_DEFAULTS, deep_merge
from groupdistil.losses import TaskLoss, per_sample_ce
from groupdistil.methods import METHODS
from groupdistil.runtime import Runtime
from groupdistil.sampling import StepBatchSampler, heldout_split
from groupdistil.sampling import heldout_split
from groupdistil.teacher import Teacher


def run(cfg, out, **kw):
    return train_toy(cfg, out, **kw)




@pytest.mark.parametrize("signal", ["train", "heldout", "excess"])
def test_eg_identity_holds_for_every_signal(toy_cfg, teacher_dir, tmp_path, signal):
    eta = 0.5
    cfg = deep_merge(toy_cfg, {"method": "groupdistil",
                               "method_args": {"eta": eta, "signal": signal, "heldout_every": 5}})
    t = run(cfg, tmp_path / signal, teacher_path=str(teacher_dir))
    rows = [json.loads(x) for x in (tmp_path / signal / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    prev = [1 / 3] * 3
    for r in rows:
        q, sig = r["group_weight"], r["group_signal"]
        covered = [g for g in range(3) if (r["group_count"][g] > 0 if signal != "heldout" else True)]
        diffs = [math.log(q[g]) - math.log(prev[g]) - eta * sig[g] for g in covered]
        assert max(diffs) - min(diffs) < 1e-5, (r["step"], diffs)
        assert abs(sum(q) - 1) < 1e-5
        if signal == "train":
            assert sig == r["group_loss"]
        if signal == "excess":
            assert min(sig) >= 0.0
        prev = q
    if signal == "heldout":
        groups = t.pipeline.train_groups()
        held = heldout_split(t.pipeline.train_cases(), groups, t.cfg["method_args"]["heldout_fraction"], t.cfg["seed"])
        for g in range(3):  # 10% of each group's samples (each its own case here)
            assert len(held[groups[held] == g]) == round(0.1 * int((groups == g).sum()))
        signals = [tuple(r["group_signal"]) for r in rows]
        assert signals[0] == signals[4] and signals[4] != signals[5]  # refreshed every 5 updates (before 1, 6, 11)


def test_heldout_cases_are_never_drawn_and_whole():
    cases = [f"s{i // 5}" for i in range(200)]  # 40 cases of 5 samples
    groups = torch.tensor([(i // 5) % 3 for i in range(200)])
    held = heldout_split(cases, groups, 0.2, seed=3)
    held_cases = {cases[i] for i in held.tolist()}
    # whole cases: the held-out samples are exactly every sample of the held-out cases, each once
    assert {i for i in range(200) if cases[i] in held_cases} == set(held.tolist())
    assert len(held) == 5 * len(held_cases)
    for g in range(3):  # 20% of each group's cases, at least one
        n_cases = len({cases[i] for i in range(200) if int(groups[i]) == g})
        assert len({c for c in held_cases if int(groups[cases.index(c)]) == g}) == round(0.2 * n_cases)
    assert torch.equal(held, heldout_split(cases, groups, 0.2, seed=3))
    keep = torch.tensor([i for i in range(200) if i not in set(held.tolist())])
    for balanced in (None, groups):
        sampler = StepBatchSampler(200, 16, seed=0, groups=balanced, indices=keep)
        it = iter(sampler)
        drawn = {i for _ in range(100) for i, _ in next(it)}
        assert not drawn & set(held.tolist()) and drawn <= set(keep.tolist())


def test_heldout_losses_take_no_gradient():
    torch.manual_seed(0)
    student = ToyNet(4)
    grad_on_heldout = []
    student.register_forward_hook(lambda m, i, o: grad_on_heldout.append((i[0].shape[0], torch.is_grad_enabled())))
    d = make_data(16, 0)
    d["index"] = torch.arange(16)
    held = {k: v[:5] for k, v in make_data(5, 1).items()}
    held["index"] = torch.arange(5)
    cls = METHODS.get("groupdro")
    crit = TaskLoss({"seg": 1.0, "cls": 1.0}, ENGINE_DEFAULTS["loss"])
    m = cls(student, crit, 3, [10, 4, 2], {"signal": "heldout", "heldout_every": 1}, heldout=[held])
    m.update(d)
    assert (5, False) in grad_on_heldout and (16, True) in grad_on_heldout
    assert all(not g for n, g in grad_on_heldout if n == 5)


def test_excess_signal_by_hand():
    """One GroupDistil update with signal excess: q moves by exp(eta * max(0, mean_g(CE_student - CE_teacher)))."""
    torch.manual_seed(1)
    student, teacher_net = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    class Head(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"cls": self.net(x)}

    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    batch = {"x": x, "cls": y, "group": groups, "index": torch.arange(6)}
    crit = TaskLoss({"cls": 1.0}, {**ENGINE_DEFAULTS["loss"], "alpha": 0.5, "tau": 2.0})
    eta = 0.7
    with torch.no_grad():
        diff = per_sample_ce(student(x), y) - per_sample_ce(teacher_net(x), y)
    m = METHODS.get("groupdistil")(Head(student), crit, 3, [2, 2, 2], {"eta": eta, "signal": "excess"},
                                   teacher=Teacher(Head(teacher_net), lambda: torch.no_grad()))
    logs = m.update(batch)
    signal = torch.stack([diff[groups == g].mean().clamp_min(0) for g in range(3)])
    torch.testing.assert_close(logs["group_signal"], signal)
    raw = torch.exp(eta * signal)
    torch.testing.assert_close(logs["group_weight"], raw / raw.sum())


def test_heldout_refresh_runs_the_teacher_once_and_matches_a_fresh_computation():
    """The held-out batches are fixed: the teacher's outputs on them are computed at the first refresh and reused
    (issue 17: the refresh cost was mostly the teacher); every refresh equals the per-sample training loss of the
    current student with a freshly run teacher, by group."""
    torch.manual_seed(2)
    student, teacher_net = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    class Head(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.calls = net, 0

        def forward(self, x):
            self.calls += 1
            return {"cls": self.net(x)}

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(n, 4, generator=g), "cls": torch.randint(0, 3, (n,), generator=g),
                "group": torch.arange(n) % 3, "index": torch.arange(n)}

    held = [batch(5, 1), batch(4, 2)]
    crit = TaskLoss({"cls": 1.0}, {**ENGINE_DEFAULTS["loss"], "alpha": 0.5, "tau": 2.0})
    teacher_head = Head(teacher_net)
    m = METHODS.get("groupdistil")(Head(student), crit, 3, [3, 3, 3], {"signal": "heldout", "heldout_every": 1},
                                   teacher=Teacher(teacher_head, lambda: torch.no_grad()), heldout=held,
                                   runtime=Runtime(optimizer=lambda p: torch.optim.SGD(p, lr=0.5)))
    for step in range(3):
        m.update(batch(6, 10 + step))  # refreshes first, then moves the student
        with torch.no_grad():
            losses = torch.cat([crit({"cls": student(b["x"])}, b, {"cls": teacher_net(b["x"])})["total"] for b in held])
        groups = torch.cat([b["group"] for b in held])
        want = torch.stack([losses[groups == g].mean() for g in range(3)])
        m.refresh_heldout()
        torch.testing.assert_close(m.heldout_signal, want)
    assert teacher_head.calls == len(held) + 3  # once per held-out batch, plus one per training batch


def test_excess_needs_a_teacher_and_signal_values_are_checked():
    from groupdistil.config import select_method_args
    from groupdistil.errors import UserError

    with pytest.raises(UserError, match="signal 'excess' needs a teacher"):
        select_method_args({"method": "groupdro", "method_args": {"signal": "excess"}}, {}, "x")
    with pytest.raises(UserError, match="method_args.signal must be one of train, heldout, excess"):
        select_method_args({"method": "groupdistil", "method_args": {"signal": "val"}}, {}, "x")
