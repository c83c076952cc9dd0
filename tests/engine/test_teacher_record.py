"""When a student run reports its teacher's recorded val/test evaluation instead of running the teacher again
(:func:`groupdistil.teacher.recorded_evaluation`): every condition, on a hand-made teacher run folder."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from groupdistil.config import config_hash, dump_yaml
from groupdistil.teacher import recorded_evaluation

FINGERPRINT = "f033cbe8b4eb4920"
TEACHER_CFG: dict[str, Any] = {"pipeline": "p", "method": "erm", "seed": 0, "groups": ["A", "B"],
                               "data": {"roi": [64, 64], "augment": True}, "eval": {"sw_batch_size": 32},
                               "model": {"encoder": "resnet18"}, "train": {"lr": 0.001},
                               "run": {"data_fingerprint": FINGERPRINT, "teacher": None}}
STUDENT_CFG: dict[str, Any] = {**copy.deepcopy(TEACHER_CFG), "method": "kd", "model": {"encoder": "small"},
                               "run": {"data_fingerprint": FINGERPRINT, "teacher": "x@step4"}}
SPLIT = {"worst_group_metric": 0.5, "average_metric": 0.6, "group_metric": {"A": 0.7, "B": 0.5}}
CPU = {"device": "cpu", "precision": "float32"}


def evaluation_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"data": cfg["data"], "eval": cfg["eval"]}


def make_run(root: Path, cfg: dict[str, Any] = TEACHER_CFG, step: int = 4, machine: dict[str, Any] = CPU) -> Path:
    """A finished teacher run folder: config.yaml, checkpoints/best.pt (empty: only its place matters here),
    metrics.json (its own teacher entries included, as a distilled teacher's would be) and timing.json."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "best.pt").write_bytes(b"")
    (root / "config.yaml").write_text(dump_yaml(cfg))
    split = {**SPLIT, "teacher": {"worst_group_metric": 0.9}, "teacher_agreement": 0.8}
    (root / "metrics.json").write_text(json.dumps({"selected_step": step, "val": split, "test": split}))
    timing = {s: {"infer_seconds_per_case": 0.25} for s in ("val", "test")}
    (root / "timing.json").write_text(json.dumps({**timing, "machine": {**machine, "torch_threads": 1}}))
    return root


def record(run_dir: Path, student: dict[str, Any] = STUDENT_CFG, step: int = 4, where: dict[str, Any] = CPU,
           ck_name: str = "best.pt") -> tuple[Any, str]:
    return recorded_evaluation(run_dir / "checkpoints" / ck_name, config_hash(TEACHER_CFG, exclude=()), step,
                               student, evaluation_config, where)


def test_a_finished_teacher_run_on_the_same_data_and_settings_is_used(tmp_path: Path) -> None:
    rec, why = record(make_run(tmp_path / "t"))
    assert rec is not None and why == "same data and settings" and rec.run_dir == tmp_path / "t"
    assert rec.metrics == {"val": SPLIT, "test": SPLIT}  # the teacher run's own teacher entries are left out
    assert rec.seconds_per_case("test") == 0.25


@pytest.mark.parametrize("change, why", [
    ({"data": {"roi": [96, 96], "augment": True}}, "made with other data or evaluation settings"),
    ({"eval": {"sw_batch_size": 8}}, "made with other data or evaluation settings"),
    ({"run": {"data_fingerprint": "0123456789abcdef"}}, "made on other data (data fingerprint)"),
    ({"run": {"data_fingerprint": ""}}, "made on other data (data fingerprint)"),  # a pipeline without fingerprints
])
def test_other_data_or_settings_evaluate_the_teacher_again(tmp_path: Path, change: dict, why: str) -> None:
    rec, got = record(make_run(tmp_path / "t"), {**STUDENT_CFG, **change})
    assert rec is None and got == why


def test_settings_that_do_not_change_the_evaluation_do_not_matter(tmp_path: Path) -> None:
    student = {**STUDENT_CFG, "train": {"lr": 0.5}, "seed": 3}
    assert record(make_run(tmp_path / "t"), student)[0] is not None


@pytest.mark.parametrize("where", [{"device": "cuda", "precision": "bfloat16"},
                                   {"device": "cpu", "precision": "bfloat16"}])
def test_another_device_or_precision_evaluates_again(tmp_path: Path, where: dict[str, str]) -> None:
    rec, why = record(make_run(tmp_path / "t"), where=where)
    assert rec is None and why == "made on cpu in float32"


def test_a_run_without_a_recorded_device_evaluates_again(tmp_path: Path) -> None:
    rec, why = record(make_run(tmp_path / "t", machine={}))
    assert rec is None and why == "made on an unrecorded device in an unrecorded precision"


def test_a_checkpoint_that_is_not_the_folders_selected_one_evaluates_again(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "t")
    assert record(run_dir, ck_name="last.pt")[1] == "not the best.pt of a run folder"
    assert "not the evaluation of the checkpoint's step" in record(run_dir, step=3)[1]
    other = make_run(tmp_path / "u", {**TEACHER_CFG, "seed": 1})  # another run's config beside this checkpoint
    assert "is not the checkpoint's config" in record(other)[1]


@pytest.mark.parametrize("name", ["metrics.json", "timing.json", "config.yaml"])
def test_an_unfinished_or_broken_folder_evaluates_again(tmp_path: Path, name: str) -> None:
    run_dir = make_run(tmp_path / "t")
    (run_dir / name).unlink()
    assert record(run_dir) == (None, f"no {name} in {run_dir}")
    (run_dir / name).write_text("{not json")
    assert record(run_dir)[0] is None
