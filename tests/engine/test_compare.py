"""``groupdistil compare``: resume after an interruption, runs.csv, sweeps, statistics, experiment validation."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from numpy.testing import assert_allclose
from toy_pipeline import ToyPipeline

from groupdistil.errors import UserError
from groupdistil.experiments import plan, report, run_comparison, schema
from groupdistil.io import atomic_write_json
from groupdistil.pipeline import ComparisonHooks
from groupdistil.stats import mean_std, pair_cases, paired_t, wilcoxon_paired
from groupdistil.trainer import Trainer

TOY_RUN = {"pipeline": "toy", "model": {"width": 4}, "data": {"n_train": 64},
           "train": {"max_steps": 4, "batch_size": 16, "eval_every": 4, "checkpoint_every": 4, "log_every": 2,
                     "device": "cpu"}}


class CaseToyComparison(ComparisonHooks):
    @classmethod
    def case_scores(cls, run_dir):
        return [tuple(r) for r in json.loads((Path(run_dir) / "cases.json").read_text())]


class CaseToy(ToyPipeline):
    """The toy pipeline plus per-case test scores (1 correct / 0 wrong), for the paired per-case test."""

    def evaluate(self, predict, split, out_dir=None):
        out = super().evaluate(predict, split, out_dir)
        if out_dir is not None and split == "test":
            d = self.splits["test"]
            ok = (predict(d["x"])["cls"].argmax(1).cpu() == d["cls"]).float().tolist()
            rows = [[f"case{i}", self.group_names[g], s] for i, (g, s) in enumerate(zip(d["group"].tolist(), ok))]
            atomic_write_json(Path(out_dir) / "cases.json", rows)
        return out

    comparison = CaseToyComparison


def write_experiment(tmp_path, **keys):
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(TOY_RUN))
    exp = {"student_config": str(tmp_path / "toy.yaml"), "teacher_config": str(tmp_path / "toy.yaml"),
           "methods": ["kd", "groupdistil"], "seeds": [0, 1], "data": {"synthesize_if_missing": True}, **keys}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_interrupted_comparison_continues_without_redoing_finished_runs(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    exp = write_experiment(tmp_path)
    built: list[str] = []
    build = Trainer.build

    def counting_build(self, status):
        built.append(self.run_dir.name)
        if len(built) == 3 and fail:
            raise RuntimeError("simulated crash")
        return build(self, status)

    monkeypatch.setattr(Trainer, "build", counting_build)
    fail = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=CaseToy)
    out = tmp_path / "out"
    assert built == ["teacher", "kd__seed=0", "groupdistil__seed=0"]
    assert (tmp_path / "data").is_dir()  # synthesised
    done = {p: p.stat().st_mtime_ns for p in (out / "teacher" / "metrics.json", out / "runs/kd__seed=0/metrics.json")}
    assert not (out / "report.html").exists()

    fail, built[:] = False, []
    report = run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=CaseToy)
    assert built == ["groupdistil__seed=0", "kd__seed=1", "groupdistil__seed=1"]
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    rows = read_csv(out / "runs.csv")
    assert [(r["method"], r["seed"]) for r in rows] == [("teacher", "0"), ("kd", "0"), ("groupdistil", "0"),
                                                        ("kd", "1"), ("groupdistil", "1")]
    tests = read_csv(out / "paired_tests.csv")
    t_worst = next(t for t in tests if t["metric"] == "worst_group_metric")
    assert t_worst["n"] == "2" and t_worst["a"] == "groupdistil" and t_worst["b"] == "kd"
    gd = [float(r["worst_group_metric"]) for r in rows if r["method"] == "groupdistil"]
    kd = [float(r["worst_group_metric"]) for r in rows if r["method"] == "kd"]
    assert_allclose(float(t_worst["mean_diff"]), sum(gd) / 2 - sum(kd) / 2, atol=1e-9)
    assert any(t["test"].startswith("Wilcoxon") for t in tests)  # CaseToy gives per-case scores
    html = report.read_text()
    for text in ("groupdistil − kd", "Wilcoxon", "data:image/png;base64", "Worst-group"):
        assert text in html, text
    assert (out / "report.md").exists() and (out / "plots" / "group_weights.png").exists()

    built[:] = []  # a finished comparison reruns nothing
    run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=CaseToy)
    assert built == []

    # a comparison folder that was moved (or copied elsewhere) is still recognised: runs name their teacher by
    # its checkpoint (run hash and step), not by its path
    moved = tmp_path / "moved"
    out.rename(moved)
    built[:] = []
    run_comparison(exp, tmp_path / "data", moved, pipeline_cls=CaseToy)
    assert built == []
    assert read_csv(moved / "runs.csv") == rows


def test_runs_csv_columns_and_sweeps(tmp_path):
    torch.set_num_threads(1)
    exp = write_experiment(tmp_path, methods=["kd", "groupdistil"], seeds=[0],
                           sweep={"method_args.eta": [0.01, 0.5]}, sweep_methods=["groupdistil"],
                           data={"sweep": {"minority_scale": [1.0, 0.25]}}, metric_note="toy accuracy")
    report = run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=ToyPipeline)
    out = tmp_path / "out"
    rows = read_csv(out / "runs.csv")
    assert list(rows[0]) == ["method", "seed", "minority_scale", "method_args.eta", "worst_group_metric",
                             "average_metric", "group.g0", "group.g1", "group.g2", "val.worst_group_metric",
                             "val.average_metric", "run_dir"]
    assert [r["run_dir"] for r in rows[:4]] == ["minority_scale=1.0/teacher", "minority_scale=1.0/runs/kd__seed=0",
                                                "minority_scale=1.0/runs/groupdistil__eta=0.01__seed=0",
                                                "minority_scale=1.0/runs/groupdistil__eta=0.5__seed=0"]
    assert len(rows) == 8 and {r["minority_scale"] for r in rows} == {"1.0", "0.25"}
    assert [r["method_args.eta"] for r in rows[:4]] == ["", "", "0.01", "0.5"]
    for r in rows:
        m = json.loads((out / r["run_dir"] / "metrics.json").read_text())["test"]
        assert_allclose(float(r["worst_group_metric"]), m["worst_group_metric"])
        assert_allclose(float(r["group.g1"]), m["group_metric"]["g1"])
    assert (tmp_path / "data" / "minority_scale=0.25").is_dir()
    cmp_rows = read_csv(out / "comparison.csv")
    assert len(cmp_rows) == 8 and cmp_rows[0]["n_seeds"] == "1" and cmp_rows[0]["worst_group_metric_std"] == ""
    tests = read_csv(out / "paired_tests.csv")  # one seed: no t-test
    assert {t["test"] for t in tests} == {"n/a"} and len(tests) == 8  # 2 levels x 2 etas x 2 metrics
    for png in ("group_weights__minority_scale=1.0.png", "worst_vs_eta__minority_scale=0.25.png",
                "worst_vs_data_level.png", "worst_vs_average__minority_scale=1.0.png"):
        assert (out / "plots" / png).exists(), png
    assert "plots/worst_vs_average__minority_scale=0.25.png" in (out / "report.md").read_text()
    assert "toy accuracy" in report.read_text() and "n/a" in (out / "report.md").read_text()


def test_sweep_expansion(tmp_path):
    exp = schema.load_experiment(write_experiment(
        tmp_path, methods=["erm", "groupdro", "groupdistil"], seeds=[3, 4],
        sweep={"method_args.eta": [0.001, 0.1], "train.lr": [0.1, 0.2, 0.3]}, sweep_methods=["groupdro", "groupdistil"],
        set={"train.max_steps": 2}))
    assert plan.expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert plan.expand_grid({}) == [{}]
    specs = plan.plan_runs(exp, tmp_path / "data", tmp_path / "out", ToyPipeline)
    assert len(specs) == 1 + 2 * (1 + 2 * 6)
    assert specs[0].method == "teacher" and specs[0].cfg["seed"] == 0 and specs[0].cfg["train"]["max_steps"] == 4
    names = [s.run_dir.name for s in specs[1:]]
    assert names[:3] == ["erm__seed=3", "groupdro__eta=0.001__lr=0.1__seed=3", "groupdro__eta=0.001__lr=0.2__seed=3"]
    assert len(set(names)) == len(names)
    gd = [s for s in specs if s.method == "groupdistil" and s.seed == 4]
    assert sorted((s.cfg["method_args"]["eta"], s.cfg["train"]["lr"]) for s in gd) == sorted(
        (e, lr) for e in (0.001, 0.1) for lr in (0.1, 0.2, 0.3))
    assert all(s.cfg["train"]["max_steps"] == 2 and s.teacher_dir == tmp_path / "out" / "teacher" for s in gd)
    assert all(s.teacher_dir is None for s in specs if s.method in ("erm", "groupdro"))
    assert plan.short_keys(["a.eta", "b.eta", "c.lr"]) == {"a.eta": "a.eta", "b.eta": "b.eta", "c.lr": "lr"}


def test_paired_statistics_match_hand_computation():
    a, b = [0.80, 0.70, 0.90], [0.75, 0.72, 0.80]
    d = [0.05, -0.02, 0.10]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = paired_t(a, b)
    assert t.n == 3
    assert_allclose(t.mean_diff, mean)
    assert_allclose(t.statistic, mean / (sd / math.sqrt(3)))
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert_allclose([t.ci_low, t.ci_high], [mean - half, mean + half])
    # two-sided p for t with 2 degrees of freedom: 1 - |t| / sqrt(t^2 + 2)
    assert_allclose(t.p, 1 - abs(t.statistic) / math.sqrt(t.statistic ** 2 + 2))
    assert paired_t([0.5], [0.4]) is None and paired_t([], []) is None
    ms = mean_std([1.0, 2.0, 4.0])
    assert_allclose([ms.mean, ms.std], [7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)])
    assert math.isnan(mean_std([1.0]).std)


def test_case_pairing_and_wilcoxon_match_hand_computation():
    seed0_a = [("c1", "g", 0.9), ("c2", "g", 0.6), ("c3", "h", 0.1), ("c4", "g", 0.5)]
    seed0_b = [("c2", "g", 0.5), ("c1", "g", 0.7), ("c3", "h", 0.9)]  # c4 missing: not paired in seed 0
    seed1_a = [("c1", "g", 0.7), ("c4", "g", 0.2)]
    seed1_b = [("c1", "g", 0.9), ("c4", "g", 0.6), ("c2", "g", 0.1)]
    ids, xa, xb = pair_cases([seed0_a, seed1_a], [seed0_b, seed1_b], "g")
    assert ids == ["c1", "c2", "c4"]
    assert_allclose(xa, [0.8, 0.6, 0.2])
    assert_allclose(xb, [0.8, 0.5, 0.6])
    w = wilcoxon_paired([1.0, 2.0, 3.0, 4.0, 5.0], [0.9, 2.3, 2.7, 3.6, 4.5])  # d = .1 -.3 .3 .4 .5
    # ranks of |d|: .1->1, .3->2.5, .3->2.5, .4->4, .5->5; W+ = 12.5, W- = 2.5; statistic = min = 2.5
    assert w.n == 5 and w.test.startswith("Wilcoxon")
    assert_allclose(w.statistic, 2.5)
    assert_allclose(w.mean_diff, 0.2)
    assert_allclose(w.median_diff, 0.3)
    assert 0.0 < w.p < 1.0
    assert math.isnan(wilcoxon_paired([1.0, 2.0], [1.0, 2.0]).p)


@pytest.mark.parametrize("keys, match", [
    ({"methods": ["kd", "teacher"]}, r"exp\.yaml: key 'methods': 'teacher' is not a method"),
    ({"methods": ["kd", "dro"]}, r"exp\.yaml: key 'methods': unknown method 'dro'; valid: erm, groupdistil"),
    ({"sweep_methods": ["erm"]}, r"exp\.yaml: key 'sweep_methods': unknown method of 'methods' 'erm'"),
    ({"sweep": {"method_args.eta": 0.1}}, r"exp\.yaml: key 'sweep\.method_args\.eta' must be a non-empty list"),
    ({"sweep": {"seed": [1, 2]}}, r"exp\.yaml: key 'sweep\.seed' is set by the experiment"),
    ({"seeds": [0, 0]}, r"exp\.yaml: key 'seeds' must be a non-empty list of distinct integers"),
    ({"seed": [0]}, r"exp\.yaml: unknown config key 'seed'; valid keys at top level: data, methods, metric_note"),
    ({"data": {"synthesise": True}}, r"exp\.yaml: unknown config key 'data\.synthesise'"),
    ({"data": {"sweep": [1]}}, r"exp\.yaml: key 'data\.sweep' must be a mapping"),
    ({"teacher_seed": "one"}, r"exp\.yaml: config key 'teacher_seed' must be of type int"),
    ({"teacher_config": ""}, r"exp\.yaml: missing key 'teacher_config' \(methods kd, groupdistil distil"),
    ({"pairs": [["kd"]]}, r"exp\.yaml: key 'pairs': each entry is \[first, second\]"),
    ({"set": {"train.lrr": 0.1}}, r"exp\.yaml: key 'set': unknown config key 'train\.lrr'"),
    ({"sweep": {"method_args.eta": ["big"]}}, r"exp\.yaml: key 'sweep': config key 'method_args\.eta' must be of type"),
])
def test_experiment_validation_errors(tmp_path, keys, match):
    path = write_experiment(tmp_path, **keys)
    with pytest.raises(UserError, match=match):
        exp = schema.load_experiment(path)
        plan.plan_runs(exp, tmp_path / "data", tmp_path / "out", ToyPipeline)


def test_missing_data_root_without_synthesis_is_an_error(tmp_path):
    path = write_experiment(tmp_path, data={"synthesize_if_missing": False})
    with pytest.raises(UserError, match=r"data root does not exist \(set data\.synthesize_if_missing: true"):
        run_comparison(path, tmp_path / "nodata", tmp_path / "out", pipeline_cls=ToyPipeline)


def test_unknown_synthesis_option_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ToyPipeline, "synthesize", classmethod(lambda cls, out, seed=0, n_cases=4: None))
    path = write_experiment(tmp_path, data={"sweep": {"minority_scale": [1.0]}})
    with pytest.raises(UserError, match=r"exp\.yaml: data option 'minority_scale' is not an option .*; valid: n_cases"):
        run_comparison(path, tmp_path / "data", tmp_path / "out", pipeline_cls=ToyPipeline)


def test_cli_subcommand_looks_the_pipeline_up_by_name(tmp_path, monkeypatch, capsys):
    from groupdistil.experiments import run as run_module

    torch.set_num_threads(1)
    monkeypatch.setattr(run_module, "get_pipeline", {"toy": ToyPipeline}.__getitem__)
    from groupdistil.cli import build_parser

    exp = write_experiment(tmp_path, methods=["erm"], seeds=[0], teacher_config="")
    argv = ["compare", str(exp), "--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
            "--set", "train.max_steps=3", "--set", "train.lr=2e-2"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    cfg = yaml.safe_load((tmp_path / "o" / "runs" / "erm__seed=0" / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 3 and cfg["train"]["lr"] == 0.02  # compare --set reaches every run
    assert [r["run_dir"] for r in read_csv(tmp_path / "o" / "runs.csv")] == ["runs/erm__seed=0"]
    assert "Paired comparisons" not in (tmp_path / "o" / "report.md").read_text()
    # the data root this comparison synthesised is part of the recorded request: the rerun is recognised at once
    monkeypatch.setattr(run_module, "run_comparison", lambda *a, **k: pytest.fail("finished comparison rerun"))
    assert args.func(build_parser().parse_args(argv)) == 0
    assert "every run finished and the report is written" in capsys.readouterr().err


def test_group_weight_plot_leaves_out_groups_never_trained_on(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "group_weight": [0.3, 0.3, 0.2, 0.2], "group_count": [3, 1 if s == 2 else 0, 0, 0]}
            for s in (1, 2, 3)]
    (run / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    weights, seen = report.read_group_weights(run)
    assert sorted(weights) == [1, 2, 3] and seen == {0, 1}  # group 1 seen once is kept; 2 and 3 never
    spec = plan.RunSpec("groupdistil", 0, {}, {}, {}, run, tmp_path, groups=["A", "B", "C", "D"])
    figs = []
    monkeypatch.setattr(report, "save_figure", lambda fig, png: figs.append(fig))
    report.plot_group_weights(tmp_path / "w.png", {("", "groupdistil", ""): [spec]}, "weights")
    (ax,) = [a for a in figs[0].axes if a.get_visible()]
    assert [ln.get_label() for ln in ax.get_lines()] == ["A", "B"]
    assert "not shown: C, D (no training samples: weight 0)" in ax.get_title()


def test_robust_teacher_table_plans_and_runs_at_tiny_size(tmp_path):
    """teacher_methods: one teacher per method (erm, groupdro); every distilling student once per teacher."""
    torch.set_num_threads(1)
    exp = write_experiment(tmp_path, methods=["erm", "kd", "groupdistil"], seeds=[0], teacher_methods=["erm",
                                                                                                     "groupdro"])
    run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=CaseToy)
    out = tmp_path / "out"
    cfgs = {t: yaml.safe_load((out / f"teacher={t}" / "config.yaml").read_text()) for t in ("erm", "groupdro")}
    assert cfgs["erm"]["method"] == "erm" and cfgs["groupdro"]["method"] == "groupdro"
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == ["erm__seed=0", "groupdistil__teacher=erm__seed=0", "groupdistil__teacher=groupdro__seed=0",
                     "kd__teacher=erm__seed=0", "kd__teacher=groupdro__seed=0"]
    rows = read_csv(out / "runs.csv")
    assert sorted((r["method"], r["teacher"]) for r in rows) == sorted(
        [("teacher", "erm"), ("teacher", "groupdro"), ("erm", ""), ("kd", "erm"), ("kd", "groupdro"),
         ("groupdistil", "erm"), ("groupdistil", "groupdro")])
    for t in ("erm", "groupdro"):  # each student names the checkpoint of its own teacher
        ck = torch.load(out / f"teacher={t}" / "checkpoints" / "best.pt", weights_only=True)
        run_cfg = yaml.safe_load((out / "runs" / f"kd__teacher={t}__seed=0" / "config.yaml").read_text())["run"]
        assert run_cfg["teacher"] == f"{ck['run_hash']}@step{ck['step']}"
    md = (out / "report.md").read_text()
    assert "kd teacher=groupdro" in md and "groupdistil teacher=erm" in md
    built = []
    orig = Trainer.build
    Trainer.build = lambda self, status: built.append(self.run_dir.name) or orig(self, status)
    try:
        run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=CaseToy)  # all finished
    finally:
        Trainer.build = orig
    assert built == []


def test_parallel_jobs_train_the_same_runs_as_one_process(tmp_path):
    """``compare --jobs 2``: students start once their teacher has finished, each run's output goes to OUT/logs/,
    and every run's training log is byte-identical to the one-process comparison's."""
    exp = write_experiment(tmp_path)
    over = {"train.num_threads": 1}
    run_comparison(exp, tmp_path / "data", tmp_path / "one", pipeline_cls=ToyPipeline, overrides=over)
    run_comparison(exp, tmp_path / "data", tmp_path / "two", pipeline_cls=ToyPipeline, overrides=over, jobs=2)
    one, two = read_csv(tmp_path / "one" / "runs.csv"), read_csv(tmp_path / "two" / "runs.csv")
    assert [r["method"] for r in two] == ["teacher", "kd", "groupdistil", "kd", "groupdistil"]
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k != "run_dir"} == {k: v for k, v in b.items() if k != "run_dir"}
        assert (tmp_path / "one" / a["run_dir"] / "train_log.jsonl").read_bytes() == \
            (tmp_path / "two" / b["run_dir"] / "train_log.jsonl").read_bytes()
    logs = sorted(p.name for p in (tmp_path / "two" / "logs").iterdir())
    assert logs == ["runs__groupdistil__seed=0.log", "runs__groupdistil__seed=1.log", "runs__kd__seed=0.log",
                    "runs__kd__seed=1.log", "teacher.log"]
    assert "step 4/4" in (tmp_path / "two" / "logs" / "teacher.log").read_text()
    with pytest.raises(UserError, match="--jobs 0"):
        run_comparison(exp, tmp_path / "data", tmp_path / "three", pipeline_cls=ToyPipeline, jobs=0)


def test_reuse_copies_only_runs_with_the_very_same_config(tmp_path, monkeypatch):
    """``compare --reuse DIR``: the teacher, KD and the eta=0.01 GroupDistil runs of an earlier comparison are copied
    in (same resolved config, data and teacher); the new eta is trained; a changed setting reuses nothing."""
    torch.set_num_threads(1)
    first = write_experiment(tmp_path, seeds=[0])
    run_comparison(first, tmp_path / "data", tmp_path / "first", pipeline_cls=ToyPipeline)
    built: list[str] = []
    build = Trainer.build

    def counting_build(self, status):
        built.append(self.run_dir.name)
        return build(self, status)

    monkeypatch.setattr(Trainer, "build", counting_build)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    second = write_experiment(sweep, seeds=[0], sweep={"method_args.eta": [0.01, 0.5]}, sweep_methods=["groupdistil"])
    run_comparison(second, tmp_path / "data", tmp_path / "second", pipeline_cls=ToyPipeline,
                   reuse=[tmp_path / "first"])
    assert built == ["groupdistil__eta=0.5__seed=0"]
    old, new = tmp_path / "first", tmp_path / "second"
    assert (old / "runs/groupdistil__seed=0/train_log.jsonl").read_bytes() == \
        (new / "runs/groupdistil__eta=0.01__seed=0/train_log.jsonl").read_bytes()
    assert (new / "teacher" / "metrics.json").is_file()

    built[:] = []  # another lr: the configs differ, nothing is reused
    run_comparison(first, tmp_path / "data", tmp_path / "third", pipeline_cls=ToyPipeline,
                   overrides={"train.lr": 0.02}, reuse=[tmp_path / "first"])
    assert built == ["teacher", "kd__seed=0", "groupdistil__seed=0"]
    with pytest.raises(UserError, match="the comparison folder itself"):
        run_comparison(first, tmp_path / "data", tmp_path / "first", pipeline_cls=ToyPipeline,
                       reuse=[tmp_path / "first"])


def test_pretraining_stage_runs_once_and_its_weights_start_teacher_and_students(tmp_path, monkeypatch):
    """An experiment's ``pretrain`` section: each model is pretrained once into OUT/pretrain/<name> on its own data
    (synthesised), the teacher and students named by ``model.init_from: pretrain:<name>`` start from its weights
    (identified by content in their config), and a rerun trains nothing."""
    torch.set_num_threads(1)
    exp = write_experiment(tmp_path, seeds=[0], methods=["erm", "kd"],
                           set={"model.init_from": "pretrain:net"}, teacher_set={"model.init_from": "pretrain:net"},
                           pretrain={"config": str(tmp_path / "toy.yaml"), "data_root": str(tmp_path / "corpus"),
                                     "data": {"seed": 7}, "set": {"train.max_steps": 2},
                                     "models": {"net": {"model.width": 4}}})
    starts: list[tuple[str, str | None]] = []
    init = Trainer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        starts.append((self.run_dir.name, self.init_path and Path(self.init_path).name))

    monkeypatch.setattr(Trainer, "__init__", recording_init)
    run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=CaseToy)
    out = tmp_path / "out"
    assert starts == [("net", None), ("teacher", "net"), ("erm__seed=0", "net"), ("kd__seed=0", "net")]
    assert (tmp_path / "corpus").is_dir() and (out / "pretrain" / "net" / "metrics.json").is_file()
    pre_cfg = yaml.safe_load((out / "pretrain" / "net" / "config.yaml").read_text())
    assert pre_cfg["train"]["max_steps"] == 2 and pre_cfg["model"]["init_from"] is None
    for run in ("teacher", "runs/erm__seed=0"):
        cfg = yaml.safe_load((out / run / "config.yaml").read_text())
        assert cfg["model"]["init_from"] == "pretrain:net" and cfg["run"]["init_from"].startswith("sha256:")
    rows = read_csv(out / "runs.csv")
    assert {r["method"] for r in rows} == {"teacher", "erm", "kd"}  # pretraining runs are inputs, not results
    # the student's first weights are the pretrained ones (same architecture, all tensors loaded)
    pre = torch.load(out / "pretrain/net/checkpoints/best.pt", weights_only=True)["model"]
    net = CaseToy.model_for(yaml.safe_load((out / "runs/erm__seed=0/config.yaml").read_text()))
    from groupdistil.checkpoint import init_from
    assert "0 missing" in init_from(net, out / "pretrain" / "net")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in pre.items())

    done = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    assert len(done) == 4  # the pretraining run, the teacher and the two students
    run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=CaseToy)  # nothing to train again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == done

    bad = write_experiment(tmp_path, set={"model.init_from": "pretrain:other"}, methods=["erm"],
                           pretrain={"config": str(tmp_path / "toy.yaml"), "data_root": str(tmp_path / "corpus"),
                                     "models": {"net": {}}})
    with pytest.raises(UserError, match="names no pretraining run of this experiment; valid: pretrain:net"):
        plan.plan_runs(schema.load_experiment(bad), tmp_path / "data", tmp_path / "out2", CaseToy)
