"""A student run reports its teacher's recorded val/test evaluation (the teacher run's metrics.json) instead of
running the teacher again, and its report is the same: tiny M&Ms and Waterbirds runs, the teacher once given as its
run folder (recorded) and once as a copy of its checkpoint (evaluated again), compared file by file."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from groupdistil.cli import main
from mms_pipeline.pipeline import MMSPipeline
from waterbirds_pipeline.pipeline import WaterbirdsPipeline

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max-steps", "2", "--set", "train.eval_every=2", "--set", "train.num_threads=1"]
SETTINGS = {"mms": COMMON + ["--set", "data.roi=[64, 64]", "--set", "train.batch_size=8"],
            "waterbirds": COMMON + ["--set", "model.arch=resnet18", "--set", "data.image_size=32",
                                    "--set", "train.batch_size=16"]}
#: files that must be byte-identical between the two students (everything but timings)
SAME = {"mms": ["metrics.json", "per_case.csv", "per_case_val.csv", "eval_log.jsonl"],
        "waterbirds": ["metrics.json", "predictions.csv", "eval_log.jsonl"]}
#: a smaller M&Ms teacher (speed only)
TEACHER = {"mms": ["--set", "model.decoder_channels=[16, 16, 8, 8, 8]"], "waterbirds": []}
TIMING_WORDS = ("training time", "seconds", "| student |", "| teacher |", "Timings are indicative")


def synthesize(pipeline: str, root: Path) -> None:
    if pipeline == "mms":
        MMSPipeline.synthesize(root, seed=0, tiny=True)
    else:
        WaterbirdsPipeline.synthesize(root, seed=0, scale=0.02, min_size=40, max_size=56)


def run(pipeline: str, config: str, root: Path, out: Path, *extra: str) -> None:
    args = ["run", str(ROOT / "configs" / config), "--data-root", str(root), "--out", str(out)]
    assert main([*args, *extra, *SETTINGS[pipeline]]) == 0


@pytest.fixture(scope="module", params=["mms", "waterbirds"])
def students(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    """``(pipeline, base folder, the recorded student's stderr)``: ``base/teacher``, ``base/recorded`` (teacher
    given as its run folder) and ``base/computed`` (teacher given as a copy of its best.pt: evaluated again)."""
    pipeline, base = request.param, tmp_path_factory.mktemp(f"record_{request.param}")
    synthesize(pipeline, base / "data")
    run(pipeline, f"{pipeline}_teacher.yaml", base / "data", base / "teacher", *TEACHER[pipeline])
    shutil.copy(base / "teacher" / "checkpoints" / "best.pt", base / "teacher.pt")
    logs = {}
    for name, teacher in (("recorded", base / "teacher"), ("computed", base / "teacher.pt")):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            run(pipeline, f"{pipeline}.yaml", base / "data", base / name, "--method", "kd", "--teacher", str(teacher))
        logs[name] = err.getvalue()
    return pipeline, base, logs["recorded"]


def test_the_recorded_teacher_is_not_run_again(students: tuple[str, Path, str]) -> None:
    _, base, log = students
    assert f"teacher: its val and test evaluation is taken from {base / 'teacher'}/metrics.json" in log
    timing = json.loads((base / "recorded" / "timing.json").read_text())
    teacher_timing = json.loads((base / "teacher" / "timing.json").read_text())
    assert timing["teacher_evaluation_from"] == str(base / "teacher")
    for split in ("val", "test"):
        assert timing[split]["teacher_infer_seconds_per_case"] == teacher_timing[split]["infer_seconds_per_case"]
    assert "teacher_evaluation_from" not in json.loads((base / "computed" / "timing.json").read_text())
    assert json.loads((base / "computed" / "timing.json").read_text())["test"]["teacher_infer_seconds_per_case"] > 0


def test_the_report_is_the_same_as_with_the_teacher_evaluated_again(students: tuple[str, Path, str]) -> None:
    pipeline, base, _ = students
    rec, comp = base / "recorded", base / "computed"
    metrics = json.loads((rec / "metrics.json").read_text())
    teacher = json.loads((base / "teacher" / "metrics.json").read_text())
    for split in ("val", "test"):
        assert metrics[split]["teacher"] == teacher[split]  # the teacher summary is the teacher run's own
    for name in SAME[pipeline]:
        assert (rec / name).read_bytes() == (comp / name).read_bytes(), f"{pipeline}: {name} differs"

    def without_timings(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if not any(w in line for w in TIMING_WORDS)]

    assert without_timings(rec / "report.md") == without_timings(comp / "report.md")
