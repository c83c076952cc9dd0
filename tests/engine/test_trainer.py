import copy
import json
import math
from pathlib import Path

import pytest
import torch
from toy_pipeline import ToyPipeline, train_toy

from groupdistil.config import deep_merge
from groupdistil.errors import UserError
from groupdistil.trainer import Trainer, Training


def run(cfg, out, **kw):
    return train_toy(cfg, out, **kw).result




def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("eta", [0.01, 0.5])
def test_eg_identity_holds_in_a_real_run(toy_cfg, teacher_dir, tmp_path, eta):
    cfg = deep_merge(toy_cfg, {"method": "groupdistil", "model": {"width": 4}, "method_args": {"eta": eta}})
    run(cfg, tmp_path / "gd", teacher_path=str(teacher_dir))
    rows = read_log(tmp_path / "gd" / "train_log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    prev = [1 / 3] * 3
    for r in rows:
        q, l = r["group_weight"], r["group_loss"]
        diffs = [math.log(q[g]) - math.log(prev[g]) - eta * l[g] for g in range(3)]
        assert max(diffs) - min(diffs) < 1e-5, (r["step"], diffs)
        assert abs(sum(q) - 1) < 1e-5
        for g in range(3):
            assert (r["group_count"][g] == 0) == (l[g] == 0.0)
        prev = q
    assert sum(rows[0]["group_count"]) == 32


def test_run_folder_contract(toy_cfg, teacher_dir, tmp_path):
    cfg = deep_merge(toy_cfg, {"method": "kd"})
    metrics = run(cfg, tmp_path / "kd", teacher_path=str(teacher_dir))
    d = tmp_path / "kd"
    for name in ("config.yaml", "train_log.jsonl", "eval_log.jsonl", "metrics.json", "timing.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (d / name).exists(), name
    import yaml

    resolved = yaml.safe_load((d / "config.yaml").read_text())
    assert resolved["groups"] == ["g0", "g1", "g2"] and resolved["method"] == "kd"
    on_disk = json.loads((d / "metrics.json").read_text())
    assert on_disk["selected_step"] in (6, 12) and on_disk["last"]["step"] == 12
    assert 0.0 <= on_disk["test"]["worst_group_metric"] <= 1.0
    assert on_disk == json.loads(json.dumps(metrics))


def test_same_seed_same_metrics_and_finished_run_not_retrained(toy_cfg, tmp_path, capsys):
    a = run(toy_cfg, tmp_path / "a")
    b = run(toy_cfg, tmp_path / "b")
    assert a == b
    assert run(toy_cfg, tmp_path / "a") is None  # finished: not retrained
    assert "already finished" in capsys.readouterr().err


def test_resume_from_checkpoint_gives_identical_metrics(toy_cfg, tmp_path, monkeypatch):
    full = run(toy_cfg, tmp_path / "full")
    d = tmp_path / "part"
    save_last = Training.save_last

    class Crash(Exception):
        pass

    def save_and_crash(self, step):  # crash right after the step-6 checkpoint
        save_last(self, step)
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(Training, "save_last", save_and_crash)
        with pytest.raises(Crash):
            Trainer(copy.deepcopy(toy_cfg), ToyPipeline, d, d).run()
    assert not (d / "metrics.json").exists()
    resumed = run(toy_cfg, d)
    assert resumed == full
    assert [r["step"] for r in read_log(d / "train_log.jsonl")] == list(range(1, 13))


def test_changed_config_is_refused_unless_forced(toy_cfg, tmp_path):
    run(toy_cfg, tmp_path / "r")
    other = deep_merge(toy_cfg, {"train": {"lr": 0.01}})
    with pytest.raises(UserError, match=r"other settings \(train.lr: 0.05 -> 0.01\)"):
        run(other, tmp_path / "r")
    assert run(other, tmp_path / "r", force=True) is not None


def test_distillation_without_teacher_is_a_clear_error(toy_cfg, tmp_path):
    with pytest.raises(UserError, match="--teacher"):
        run(deep_merge(toy_cfg, {"method": "groupdistil"}), tmp_path / "x")


def test_teacher_of_wrong_architecture_is_refused(toy_cfg, teacher_dir, tmp_path):
    ck = torch.load(teacher_dir / "checkpoints" / "best.pt", weights_only=True)
    ck["config"]["model"]["width"] = 5  # the weights no longer fit the declared architecture
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="do not fit"):
        run(deep_merge(toy_cfg, {"method": "kd"}), tmp_path / "kd", teacher_path=str(tmp_path / "bad.pt"))


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(toy_cfg, tmp_path):
    cfg = deep_merge(toy_cfg, {"train": {"lr": 1.0e30, "optimizer": "sgd", "momentum": 0.0}})
    with pytest.raises(UserError, match=r"non-finite loss .* at step \d+"):
        run(cfg, tmp_path / "nan")
    assert not (tmp_path / "nan" / "metrics.json").exists()


def test_balanced_sampling_draws_groups_evenly(toy_cfg):
    from groupdistil.sampling import StepBatchSampler

    groups = ToyPipeline(toy_cfg, ".").train_groups()
    s = StepBatchSampler(len(groups), 32, 0, groups=groups)
    it = iter(s)
    for _ in range(60):  # every batch: 32 = 11 + 11 + 10 over the three groups
        counts = torch.bincount(torch.tensor([groups[i] for i, _ in next(it)]), minlength=3)
        assert sorted(counts.tolist()) == [10, 11, 11]
    plain = torch.bincount(groups, minlength=3).float() / len(groups)
    assert plain.min() < 0.2  # the data really are imbalanced


def test_sampler_shards_are_the_single_process_batch():
    from groupdistil.sampling import StepBatchSampler

    single = StepBatchSampler(100, 8, 3, start_step=5).batch_keys(17)
    shards = [StepBatchSampler(100, 8, 3, rank=r, world_size=2).batch_keys(17) for r in range(2)]
    assert shards[0] + shards[1] == single
    assert StepBatchSampler(100, 8, 3).batch_keys(17) == single  # a pure function of (seed, step)


def test_unseen_group_keeps_weight_zero_in_a_real_run(toy_cfg, teacher_dir, tmp_path, capsys):
    """A group with no training samples: weight exactly 0 at every step, the others sum to 1, the EG identity holds
    over the trained groups, and the group is still evaluated (and named unseen in metrics.json)."""
    cfg = deep_merge(toy_cfg, {"method": "groupdistil", "method_args": {"eta": 0.5},
                               "data": {"group_props": [0.8, 0.2, 0.0]}})
    run(cfg, tmp_path / "gd", teacher_path=str(teacher_dir))
    assert "group(s) g2 have no training samples: their weight is 0 throughout" in capsys.readouterr().err
    rows = read_log(tmp_path / "gd" / "train_log.jsonl")
    prev = [0.5, 0.5]
    for r in rows:
        q, l = r["group_weight"], r["group_loss"]
        assert q[2] == 0.0 and r["group_count"][2] == 0 and abs(q[0] + q[1] - 1) < 1e-6
        diffs = [math.log(q[g]) - math.log(prev[g]) - 0.5 * l[g] for g in range(2)]
        assert max(diffs) - min(diffs) < 1e-5
        prev = q[:2]
    m = json.loads((tmp_path / "gd" / "metrics.json").read_text())
    assert m["unseen_groups"] == ["g2"] and m["train_group_counts"][2] == 0 and "g2" in m["test"]["group_metric"]
    erm = deep_merge(toy_cfg, {"data": {"group_props": [0.8, 0.2, 0.0]}})
    run(erm, tmp_path / "erm")
    assert "no training samples" not in capsys.readouterr().err  # says nothing where it means nothing


@pytest.mark.parametrize("method", ["kd_reweighted", "jtt_kd"])
def test_sample_weighted_baselines_run(toy_cfg, teacher_dir, tmp_path, capsys, method):
    run(deep_merge(toy_cfg, {"method": method}), tmp_path / method, teacher_path=str(teacher_dir))
    rows = read_log(tmp_path / method / "train_log.jsonl")
    assert len(rows) == 12 and all(math.isfinite(r["loss"]) for r in rows)
    if method == "jtt_kd":  # toy has a segmentation head: the worst 20% of the teacher's label losses
        assert "jtt_kd: 38 of 192 training samples upweighted x6" in capsys.readouterr().err


def test_tensorboard_event_files_have_the_logged_tags(toy_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = deep_merge(toy_cfg, {"method": "groupdro", "train": {"tensorboard": True}})
    run(cfg, tmp_path / "tb")
    (event_dir,) = {p.parent for p in (tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*")}
    ea = EventAccumulator(str(event_dir))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/seg/dice", "train/group_weight/g0", "train/group_loss/g2", "train/group_signal/g1",
            "val/worst_group_metric", "val/average_metric", "val/group_metric/g1"} <= tags
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 13))
    rows = read_log(tmp_path / "tb" / "train_log.jsonl")
    assert [e.value for e in ea.Scalars("train/group_weight/g0")] == pytest.approx([r["group_weight"][0] for r in rows])
    evals = [json.loads(x) for x in (tmp_path / "tb" / "eval_log.jsonl").read_text().splitlines()]
    assert set(evals[0]["group_metric"]) == {"g0", "g1", "g2"}  # per-group validation values in eval_log.jsonl


def test_trainer_classes_are_whole_when_constructed():
    """Every attribute of Trainer and Training is first assigned in ``__init__`` (none appears later, set by a method
    that must have been called first): an AST scan of groupdistil/trainer.py."""
    import ast

    import groupdistil.trainer as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    assert {"Trainer", "Training"} <= set(classes)
    for name in ("Trainer", "Training"):
        methods = {f.name: f for f in classes[name].body if isinstance(f, ast.FunctionDef)}

        def assigned(fn):
            out = set()
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                    if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                for t in targets:
                    for e in ast.walk(t):
                        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                            out.add(e.attr)
            return out

        in_init = assigned(methods["__init__"])
        later = {(m, a) for m, f in methods.items() if m != "__init__" for a in assigned(f) - in_init}
        assert not later, f"{name}: attributes first assigned outside __init__: {sorted(later)}"
