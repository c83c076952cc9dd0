"""Groups without labels: the error split, k-means, the adjusted Rand index, and training that never reads the true
group column."""
import json

import numpy as np
import pytest
import torch
from toy_pipeline import train_toy

from groupdistil.config import deep_merge
from groupdistil.grouping import adjusted_rand_index, confusion, infer_groups, kmeans


def run(cfg, out, **kw):
    return train_toy(cfg, out, **kw)




def test_error_split_on_a_hand_made_set():
    passed = {"cls": torch.tensor([0, 0, 1, 1, 1]), "pred": torch.tensor([0, 1, 1, 0, 1]), "feat": torch.zeros(5, 2)}
    groups, names = infer_groups("error", 2, 0, passed, [str(i) for i in range(5)], ["land", "water"])
    assert groups.tolist() == [0, 1, 2, 3, 2]
    assert names == ["land/right", "land/wrong", "water/right", "water/wrong"]


def test_kmeans_is_stable_for_a_seed_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (30, 3)), rng.normal(5, 0.1, (20, 3))])
    a, b = kmeans(x, 2, seed=4), kmeans(x, 2, seed=4)
    assert np.array_equal(a, b)
    assert len(set(a[:30])) == 1 and len(set(a[30:])) == 1 and a[0] != a[30]


def test_cases_stay_together_and_classes_are_split():
    feat = torch.tensor([[0.0], [0.1], [5.0], [5.1], [0.0], [5.0]])
    passed = {"feat": feat, "cls": torch.tensor([0, 0, 0, 0, 1, 1])}
    groups, names = infer_groups("kmeans", 2, 0, passed, ["a", "a", "b", "b", "c", "d"], ["n", "p"])
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[0] != groups[2]
    assert set(groups[:4].tolist()) <= {0, 1} and set(groups[4:].tolist()) <= {2, 3} and len(names) == 4


def test_adjusted_rand_index_and_confusion_by_hand():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    # contingency [[2, 0, 0], [0, 1, 1]]: index 1, row pairs 1 + 1, column pairs 1, expected 2 * 1 / 6, max 1.5:
    # (1 - 1/3) / (1.5 - 1/3) = 4/7 (also scikit-learn's documented value for this pair)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert confusion(torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]), 2, 2) == [[0, 2], [1, 0]]


@pytest.mark.parametrize("mode", ["error", "kmeans"])
def test_inferred_groups_never_read_the_true_group_column(toy_cfg, teacher_dir, tmp_path, mode):
    """The same images with the group column permuted: identical training logs (the true groups only serve
    evaluation), a groups_inferred.csv, and the agreement in metrics.json."""
    cfg = deep_merge(toy_cfg, {"method": "groupdistil", "method_args": {"eta": 0.5},
                               "grouping": {"mode": mode, "k": 2}})
    shuffled = deep_merge(cfg, {"data": {"shuffle_groups": True}})
    run(cfg, tmp_path / "a", teacher_path=str(teacher_dir))
    run(shuffled, tmp_path / "b", teacher_path=str(teacher_dir))
    assert (tmp_path / "a" / "train_log.jsonl").read_text() == (tmp_path / "b" / "train_log.jsonl").read_text()
    rows = (tmp_path / "a" / "groups_inferred.csv").read_text().splitlines()
    assert rows[0] == "index,case,true_group,inferred_group" and len(rows) == 193
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    g = m["grouping"]
    assert g["mode"] == mode and -1 <= g["adjusted_rand_index"] <= 1
    assert sum(map(sum, g["confusion"]["counts"])) == 192 and len(g["confusion"]["counts"]) == 3
    log = json.loads((tmp_path / "a" / "train_log.jsonl").read_text().splitlines()[0])
    assert len(log["group_weight"]) == len(g["groups"]) == len(m["train_groups"])
    assert set(m["test"]["group_metric"]) == {"g0", "g1", "g2"}  # evaluated on the true groups


def test_selection_by_average_needs_no_group_labels(toy_cfg, tmp_path):
    cfg = deep_merge(toy_cfg, {"train": {"selection": "average"}})
    t = run(cfg, tmp_path / "avg")
    evals = [json.loads(x) for x in (tmp_path / "avg" / "eval_log.jsonl").read_text().splitlines()]
    best = max(evals, key=lambda r: r["average_metric"])
    assert json.loads((tmp_path / "avg" / "metrics.json").read_text())["selected_step"] == best["step"]
    assert torch.load(tmp_path / "avg" / "checkpoints" / "best.pt", weights_only=True)["step"] == best["step"]
    assert t.result["selected_step"] == best["step"]


def test_selection_by_worst_class(toy_cfg, tmp_path):
    """``train.selection: worst_class`` maximises the lowest per-class validation metric (no group labels); a
    pipeline whose evaluation has no per-class metric is refused with a message."""
    from toy_pipeline import ToyPipeline

    from groupdistil.errors import UserError
    from groupdistil.trainer import selection_score

    rec = {"worst_group_metric": 0.2, "average_metric": 0.7, "class_metric": {"a": 0.9, "b": 0.4}}
    assert [selection_score(rec, s, "toy") for s in ("worst_group", "average", "worst_class")] == [0.2, 0.7, 0.4]
    with pytest.raises(UserError, match="reports no per-class metric"):
        selection_score({"worst_group_metric": 0.2, "average_metric": 0.7}, "worst_class", "toy")

    class ClassToy(ToyPipeline):
        def evaluate(self, predict, split, out_dir=None):
            out = super().evaluate(predict, split, out_dir)
            d = self.splits[split]
            ok = (predict(d["x"])["cls"].argmax(1).cpu() == d["cls"]).float()
            out["class_metric"] = {str(k): float(ok[d["cls"] == k].mean()) for k in (0, 1)}
            return out

    cfg = deep_merge(toy_cfg, {"train": {"selection": "worst_class"}})
    import copy

    from groupdistil.trainer import Trainer
    Trainer(copy.deepcopy(cfg), ClassToy, tmp_path / "wc", tmp_path / "wc").run()
    evals = [json.loads(x) for x in (tmp_path / "wc" / "eval_log.jsonl").read_text().splitlines()]
    best = max(evals, key=lambda r: min(r["class_metric"].values()))
    assert json.loads((tmp_path / "wc" / "metrics.json").read_text())["selected_step"] == best["step"]
