"""The pipeline contract: groups and counts, evaluation with predictions.csv, the report, declared config keys."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from groupdistil.teacher import TeacherRecord
from waterbirds_pipeline.pipeline import WaterbirdsPipeline

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def always(cls: int):
    """A predictor that answers ``cls`` for every image."""
    return lambda x: {"cls": torch.nn.functional.one_hot(torch.full((len(x),), cls), 2).float()}


def test_groups_and_counts(pipeline: WaterbirdsPipeline, synth_counts: dict[str, list[int]]) -> None:
    assert pipeline.group_names == ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water"]
    assert pipeline.heads == {"cls": 2}
    assert pipeline.train_group_counts == synth_counts["train"]
    groups = pipeline.train_groups()
    assert groups.dtype == torch.long and len(groups) == len(pipeline.train_dataset())
    assert torch.bincount(groups).tolist() == synth_counts["train"]


def test_a_recorded_teacher_gives_what_running_it_gives(pipeline: WaterbirdsPipeline, tmp_path: Path) -> None:
    teacher_dir = tmp_path / "teacher"
    own = {s: pipeline.evaluate(always(1), s, out_dir=teacher_dir) for s in ("val", "test")}  # the teacher's run
    empty = TeacherRecord(tmp_path / "elsewhere", {}, {})
    assert pipeline.load_teacher_record(empty) is None  # no predictions.csv there: the teacher is run again
    record = pipeline.load_teacher_record(TeacherRecord(
        teacher_dir, {s: {k: v for k, v in m.items() if k != "timing"} for s, m in own.items()},
        {s: m["timing"] for s, m in own.items()}))
    assert record is not None and all((record.cases[s] == 1).all() for s in ("val", "test"))
    for split in ("val", "test"):
        ran, recorded = (pipeline.evaluate(always(0), split, out_dir=tmp_path / name, teacher=t)
                         for name, t in (("ran", always(1)), ("recorded", record)))
        assert ran.pop("timing")["teacher_infer_seconds_per_case"] > 0
        assert recorded.pop("timing")["teacher_infer_seconds_per_case"] == own[split]["timing"][
            "infer_seconds_per_case"]
        assert ran == recorded and ran["teacher_agreement"] == 0.0
    ran_csv, recorded_csv = (tmp_path / name / "predictions.csv" for name in ("ran", "recorded"))
    assert ran_csv.read_bytes() == recorded_csv.read_bytes()


def test_model_for_fills_defaults(pipeline: WaterbirdsPipeline) -> None:
    model = pipeline.model_for({"model": {}})
    assert model.backbone.fc.out_features == 2
    assert type(pipeline.model_for({"model": {"arch": "resnet50"}}).backbone.layer1[0]).__name__ == "Bottleneck"


def test_model_and_preprocessing_without_data() -> None:
    cfg = {"data": {"image_size": 64}, "model": {"arch": "resnet18", "pretrained": False}}
    model = WaterbirdsPipeline.model_for(cfg)
    assert model.backbone.fc.out_features == 2
    prep = WaterbirdsPipeline.preprocessing(cfg)
    assert "73 x 73" in prep["resize"] and "64 x 64" in prep["crop"] and prep["classes"] == ["landbird", "waterbird"]
    assert WaterbirdsPipeline.case_scores(Path("/nonexistent")) is None


def test_evaluate_and_report(pipeline: WaterbirdsPipeline, synth_counts: dict[str, list[int]],
                             tmp_path: Path) -> None:
    val = pipeline.evaluate(always(0), "val", out_dir=tmp_path, teacher=always(1))
    assert val["group_acc"] == {"landbird_land": 1.0, "landbird_water": 1.0, "waterbird_land": 0.0,
                                "waterbird_water": 0.0}
    assert val["worst_group_metric"] == 0.0 and val["teacher"]["worst_group_acc"] == 0.0
    assert val["teacher_agreement"] == 0.0
    n_val = sum(synth_counts["val"])
    assert val["avg_acc"] == pytest.approx(sum(synth_counts["val"][:2]) / n_val)
    test = pipeline.evaluate(pipeline.model_for({"model": {}}).eval(), "test", out_dir=tmp_path)
    assert list(test["group_n"].values()) == synth_counts["test"]

    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["split"] for r in rows] == ["val"] * n_val + ["test"] * sum(synth_counts["test"])
    assert set(rows[0]) == {"img_id", "split", "y", "place", "group", "prediction", "teacher_prediction"}
    assert all(r["prediction"] == "0" and r["teacher_prediction"] == "1" for r in rows[:n_val])
    assert all(r["group"] == pipeline.group_names[2 * int(r["y"]) + int(r["place"])] for r in rows)

    assert val["timing"]["infer_seconds_per_case"] > 0
    scores = WaterbirdsPipeline.case_scores(tmp_path)
    assert scores is not None and len(scores) == sum(synth_counts["test"])
    first = rows[n_val]
    assert scores[0] == (first["img_id"], first["group"], float(first["prediction"] == first["y"]))

    pipeline.evaluate(always(1), "val", out_dir=tmp_path)  # replaces the val rows only
    with open(tmp_path / "predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)

    metrics = {"selected_step": 10, "val": val, "test": test, "last": {"step": 20, "val": val, "test": test},
               "teacher": {"val": val["teacher"], "test": val["teacher"]}}
    pipeline.write_report(tmp_path, metrics, {"params": 123, "method": "groupdistil", "train_seconds": 1.5})
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for key in ("worst_group_acc", "avg_acc", "train_weighted_avg_acc", "mean_group_acc", "teacher test acc",
                "waterbird_land", "train_seconds", "123"):
        assert key in md and key in page
    assert "data:image/png;base64," in page and (tmp_path / "group_accuracy_test.png").is_file()


def test_report_without_optional_parts(pipeline: WaterbirdsPipeline, tmp_path: Path) -> None:
    val = pipeline.evaluate(always(0), "val")
    pipeline.write_report(tmp_path, {"val": val, "test": val}, {})
    assert "teacher" not in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("name", ["waterbirds.yaml", "waterbirds_teacher.yaml"])
def test_configs_use_declared_keys(name: str) -> None:
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    assert cfg["pipeline"] == "waterbirds"
    for section, defaults in WaterbirdsPipeline.defaults.items():
        assert set(cfg.get(section) or {}) <= set(defaults), section


@pytest.mark.slow
def test_end_to_end_teacher_then_student(synth_root: Path, synth_counts: dict[str, list[int]], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``groupdistil run`` of the teacher config, then of the student config distilling it (tiny settings)."""
    import groupdistil.pipeline
    from groupdistil.cli import main

    # only this pipeline: the test must not depend on the other installed pipelines
    monkeypatch.setattr(groupdistil.pipeline, "pipeline_classes", lambda: {"waterbirds": WaterbirdsPipeline})
    tiny = ["--data-root", str(synth_root), "--max-steps", "3", "--debug"]
    for key in ("train.batch_size=8", "train.eval_every=2", "data.image_size=32", "model.arch=resnet18"):
        tiny += ["--set", key]
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert main(["run", str(CONFIGS / "waterbirds_teacher.yaml"), "--out", str(teacher), *tiny]) == 0
    assert main(["run", str(CONFIGS / "waterbirds.yaml"), "--out", str(student), "--teacher", str(teacher), *tiny]) == 0

    with open(student / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(synth_counts["val"]) + sum(synth_counts["test"])
    assert all(r["teacher_prediction"] in ("0", "1") for r in rows)
    report = (student / "report.html").read_text()
    assert "teacher test acc" in report and "data:image/png;base64," in report
