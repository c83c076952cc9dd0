"""A Waterbirds teacher given as saved probabilities (``teacher_probs.csv``: img_id, p0, p1 of every training image):
read in training order, distilled end to end, and every bad file refused with one line naming it (exit 2, nothing
written)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from groupdistil.cli import main
from waterbirds_pipeline import metadata
from waterbirds_pipeline.pipeline import TEACHER_PROBS_CSV, WaterbirdsPipeline

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = ["--set", "model.arch=resnet18", "--set", "data.image_size=32", "--set", "train.batch_size=16",
        "--set", "train.eval_every=10", "--set", "eval.batch_size=64", "--set", "train.num_threads=1",
        "--max-steps", "2"]


def write_probs(root: Path, folder: Path, edit=None) -> Path:
    """``folder/teacher_probs.csv`` from the training labels, smoothed (0.9 on the true class); ``edit(rows)`` may
    change the rows (lists of strings, header first) before they are written."""
    meta = metadata.read_metadata(metadata.resolve_root(root))
    rows = [["img_id", "p0", "p1"]]
    for r in meta.where("train"):
        y = int(meta.y[r])
        rows.append([str(int(meta.img_id[r])), "0.1" if y else "0.9", "0.9" if y else "0.1"])
    if edit is not None:
        edit(rows, meta)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / TEACHER_PROBS_CSV, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return folder


def test_probabilities_are_read_in_training_order(pipeline: WaterbirdsPipeline, synth_root: Path,
                                                  tmp_path: Path) -> None:
    folder = write_probs(synth_root, tmp_path / "probs", edit=lambda rows, meta: rows[1:].reverse())
    probs = pipeline.teacher_targets(folder)["cls"]
    y = torch.stack([pipeline.train_dataset()[(i, 0)]["cls"] for i in range(len(probs))])
    assert probs.shape == (len(y), 2) and torch.equal(probs.argmax(1), y)
    assert torch.allclose(probs.max(1).values, torch.full((len(y),), 0.9))
    # the CSV file itself works as well as its folder; a split column selects the training rows
    assert torch.equal(pipeline.teacher_targets(folder / TEACHER_PROBS_CSV)["cls"], probs)

    def with_split(rows, meta):
        rows[0].append("split")
        for r in rows[1:]:
            r.append("train")
        rows.append([str(int(meta.img_id[meta.where("test")[0]])), "0.5", "0.5", "test"])
    assert torch.equal(pipeline.teacher_targets(write_probs(synth_root, tmp_path / "split", with_split))["cls"],
                       probs)


def test_a_probabilities_teacher_distils_a_student(synth_root: Path, tmp_path: Path) -> None:
    folder = write_probs(synth_root, tmp_path / "probs")
    out = tmp_path / "kd"
    assert main(["run", str(CONFIGS / "waterbirds.yaml"), "--data-root", str(synth_root), "--out", str(out),
                 "--method", "groupdistil", "--teacher", str(folder), *TINY]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["run"]["teacher"].startswith("probabilities-")
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(np.isfinite(r["cls/kd"]) and r["cls/kd"] > 0 for r in logs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "teacher" not in metrics["test"]  # no model: nothing to evaluate
    assert "probabilities-" in (out / "report.md").read_text()


def _missing(rows, meta):
    del rows[3]


def _extra(rows, meta):
    rows.append([str(int(meta.img_id[meta.where("val")[0]])), "0.5", "0.5"])


def _twice(rows, meta):
    rows.append(list(rows[1]))


def _nan(rows, meta):
    rows[4][1] = "nan"


def _sum(rows, meta):
    rows[4][1:] = ["0.6", "0.6"]


def _column(rows, meta):
    for r in rows:
        del r[2]


@pytest.mark.parametrize("edit, where, match", [
    (_missing, "teacher_probs.csv", "no teacher probability for 1 train image"),
    (_extra, "teacher_probs.csv:", "an image of the val split, not of train"),
    (_twice, "teacher_probs.csv:", "img_id listed twice"),
    (_nan, "teacher_probs.csv:5", "1 non-finite probabilities"),
    (_sum, "teacher_probs.csv:5", "do not sum to 1"),
    (_column, "teacher_probs.csv", "missing column(s) p1"),
])
def test_each_bad_probabilities_file_exits_2_naming_it(synth_root: Path, tmp_path: Path, capsys, edit, where,
                                                       match) -> None:
    folder = write_probs(synth_root, tmp_path / "probs", edit)
    out = tmp_path / "kd"
    code = main(["run", str(CONFIGS / "waterbirds.yaml"), "--data-root", str(synth_root), "--out", str(out),
                 "--method", "kd", "--teacher", str(folder), *TINY])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: ") and where in err and match in err, err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("make, match", [
    (lambda d: d, f"no {TEACHER_PROBS_CSV} in this folder"),
    (lambda d: (d / "probs.npz").write_bytes(b"x") and d / "probs.npz", "not a CSV"),
])
def test_a_folder_without_the_csv_or_another_file_is_refused(synth_root: Path, tmp_path: Path, capsys, make,
                                                             match) -> None:
    folder = tmp_path / "probs"
    folder.mkdir()
    source = make(folder)
    code = main(["run", str(CONFIGS / "waterbirds.yaml"), "--data-root", str(synth_root), "--out",
                 str(tmp_path / "kd"), "--method", "kd", "--teacher", str(source), *TINY])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"error: {source}: " in err and match in err, err
