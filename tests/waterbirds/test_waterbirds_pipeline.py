"""The pipeline contract: groups and counts, evaluation with predictions.csv (its outputs, a teacher's added to it,
read back from a finished run), the report, declared config keys and their rules."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from groupdistil.config import resolve_config
from groupdistil.errors import UserError
from waterbirds_pipeline.pipeline import WaterbirdsPipeline
from waterbirds_pipeline.report import PREDICTION_COLUMNS

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


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_gives_the_predicted_class_of_every_image(pipeline: WaterbirdsPipeline,
                                                           synth_counts: dict[str, list[int]]) -> None:
    model = pipeline.model_for({"model": {}}).eval()
    for split in ("val", "test"):
        m = pipeline.evaluate(model, split)
        outputs = m.pop("outputs")
        assert outputs.dtype == np.int64 and outputs.shape == (sum(synth_counts[split]),)
        assert m.pop("timing")["infer_seconds_per_case"] > 0
        assert "teacher" not in m and "teacher_agreement" not in m  # the teacher's row is the engine's
        dataset = pipeline._dataset(split, augment=False)  # split order: the dataset's order
        x = torch.stack([dataset[i]["x"] for i in range(len(dataset))])
        with torch.no_grad():
            assert outputs.tolist() == model(x)["cls"].argmax(1).tolist()
        assert m == pipeline._score(outputs, split)


def test_a_teacher_added_to_predictions_and_read_back(pipeline: WaterbirdsPipeline, tmp_path: Path) -> None:
    """The teacher's outputs as the engine hands them over (its own evaluation, or a finished teacher run's record
    read back with ``recorded_outputs``) give the same predictions.csv, with the columns and row order of
    :data:`PREDICTION_COLUMNS`; the agreement the engine computes from the outputs."""
    teacher_dir = tmp_path / "teacher"
    own = {s: pipeline.evaluate(always(1), s, out_dir=teacher_dir) for s in ("val", "test")}  # the teacher's run
    assert pipeline.recorded_outputs(tmp_path / "elsewhere", "val") is None  # no predictions.csv: run it again
    for split in ("val", "test"):
        recorded = pipeline.recorded_outputs(teacher_dir, split)
        assert recorded is not None and recorded.dtype == np.int64
        assert recorded.tolist() == own[split]["outputs"].tolist() == [1] * len(recorded)
    for name, source in (("ran", lambda s: own[s]["outputs"]), ("recorded", lambda s: pipeline.recorded_outputs(
            teacher_dir, s))):
        for split in ("val", "test"):
            student = pipeline.evaluate(always(0), split, out_dir=tmp_path / name)
            teacher = source(split)
            pipeline.add_teacher_outputs(tmp_path / name, split, teacher)
            assert float((student["outputs"] == teacher).mean()) == 0.0  # the engine's teacher_agreement
    ran, recorded = (tmp_path / name / "predictions.csv" for name in ("ran", "recorded"))
    assert ran.read_bytes() == recorded.read_bytes()
    rows = read_rows(ran)
    assert tuple(rows[0]) == PREDICTION_COLUMNS
    n_val = len(own["val"]["outputs"])
    assert [r["split"] for r in rows] == ["val"] * n_val + ["test"] * len(own["test"]["outputs"])
    assert all(r["prediction"] == "0" and r["teacher_prediction"] == "1" for r in rows)
    # rows are written in split order: the teacher's column lines up with the images
    ids = [int(r["img_id"]) for r in rows[:n_val]]
    assert ids == pipeline.meta.img_id[pipeline.meta.where("val")].tolist()

    # a teacher that answers per image: its column follows the images, the other split's rows are kept
    varied = (np.arange(n_val) % 2).astype(np.int64)
    pipeline.add_teacher_outputs(ran.parent, "val", varied)
    after = read_rows(ran)
    assert [r["teacher_prediction"] for r in after[:n_val]] == [str(v) for v in varied]
    assert after[n_val:] == rows[n_val:]
    pipeline.evaluate(always(1), "val", out_dir=ran.parent)  # the val rows of another model: no teacher column
    assert [r["teacher_prediction"] for r in read_rows(ran)] == [""] * n_val + ["1"] * (len(rows) - n_val)
    with pytest.raises(ValueError, match="teacher outputs"):
        pipeline.add_teacher_outputs(ran.parent, "val", varied[:-1])
    with pytest.raises(UserError, match="evaluate writes them first"):
        pipeline.add_teacher_outputs(tmp_path / "nothing", "val", varied)


def test_recorded_outputs_that_do_not_fit_are_none(pipeline: WaterbirdsPipeline, tmp_path: Path) -> None:
    pipeline.evaluate(always(1), "val", out_dir=tmp_path)
    assert pipeline.recorded_outputs(tmp_path, "test") is None  # no test rows
    rows = read_rows(tmp_path / "predictions.csv")
    with open(tmp_path / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[1:])  # an image of the split without a prediction
    assert pipeline.recorded_outputs(tmp_path, "val") is None


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
    assert WaterbirdsPipeline.comparison.case_scores(Path("/nonexistent")) is None
    assert WaterbirdsPipeline.comparison.case_unit == "images"
    assert "training group proportions" in WaterbirdsPipeline.comparison.metric_note({})


@pytest.mark.parametrize("key, value, allowed", [
    ("data.image_size", 4, ">= 8"),
    ("eval.batch_size", 0, ">= 1"),
    ("data.label", "bird", "y (the bird) or shape (the pretraining corpus's 14 object classes)"),
])
def test_rules_refuse_bad_values_before_the_data_is_read(key: str, value: object, allowed: str,
                                                         tmp_path: Path) -> None:
    section, name = key.split(".")
    message = f"config: {key} = {value!r} is not allowed; it must be {allowed}"
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        WaterbirdsPipeline({section: {name: value}}, tmp_path / "no data here")
    with pytest.raises(UserError, match="not allowed"):
        WaterbirdsPipeline.model_for({section: {name: value}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"pipeline": "waterbirds", "method": "erm", section: {name: value}}))
    with pytest.raises(UserError, match=re.escape(message.removeprefix("config: "))):  # before anything is built
        resolve_config(path, pipeline_cls=WaterbirdsPipeline)


def test_evaluate_and_report(pipeline: WaterbirdsPipeline, synth_counts: dict[str, list[int]],
                             tmp_path: Path) -> None:
    val = pipeline.evaluate(always(0), "val", out_dir=tmp_path)
    teacher = pipeline.evaluate(always(1), "val")  # as the engine evaluates the teacher and adds its row
    teacher_outputs = teacher.pop("outputs")
    pipeline.add_teacher_outputs(tmp_path, "val", teacher_outputs)
    teacher.pop("timing")
    val["teacher"] = teacher
    assert val["group_acc"] == {"landbird_land": 1.0, "landbird_water": 1.0, "waterbird_land": 0.0,
                                "waterbird_water": 0.0}
    assert val["worst_group_metric"] == 0.0 and val["teacher"]["worst_group_acc"] == 0.0
    assert float((val.pop("outputs") == teacher_outputs).mean()) == 0.0  # the engine's teacher_agreement
    n_val = sum(synth_counts["val"])
    assert val["avg_acc"] == pytest.approx(sum(synth_counts["val"][:2]) / n_val)
    test = pipeline.evaluate(pipeline.model_for({"model": {}}).eval(), "test", out_dir=tmp_path)
    test.pop("outputs")
    assert list(test["group_n"].values()) == synth_counts["test"]

    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["split"] for r in rows] == ["val"] * n_val + ["test"] * sum(synth_counts["test"])
    assert set(rows[0]) == {"img_id", "split", "y", "place", "group", "prediction", "teacher_prediction"}
    assert all(r["prediction"] == "0" and r["teacher_prediction"] == "1" for r in rows[:n_val])
    assert all(r["group"] == pipeline.group_names[2 * int(r["y"]) + int(r["place"])] for r in rows)

    assert val["timing"]["infer_seconds_per_case"] > 0
    scores = WaterbirdsPipeline.comparison.case_scores(tmp_path)
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
    val.pop("outputs")
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
