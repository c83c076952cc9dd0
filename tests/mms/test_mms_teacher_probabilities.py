"""An M&Ms teacher given as nnU-Net v2's ``--save_probabilities`` output (``<case>.npz`` with ``probabilities``
(C, z, y, x), ``<case>.pkl`` never opened): the probabilities of each training slice in the working geometry,
a student distilled end to end, and every bad folder refused with one line naming the file (exit 2, nothing
written)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from groupdistil.cli import main
from mms_pipeline import scoring
from mms_pipeline.data import PHASES, Subject
from mms_pipeline.pipeline import MMSPipeline

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_RUN = ["--set", "data.roi=[64, 64]", "--set", "train.batch_size=8", "--set", "model.encoder=resnet18",
            "--set", "model.decoder_channels=[16, 16, 8, 8, 8]", "--set", "train.num_threads=1",
            "--set", "data.augment=false", "--method", "kd", "--max-steps", "2"]


class Marker:
    """Unpickling this creates the file ``path``: it shows whether a ``.pkl`` was ever opened."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_hot_npz(subject: Subject, phase: str) -> np.ndarray:
    """nnU-Net's layout of the subject's ground truth as probabilities: float16 (4, z, y, x)."""
    label = np.asarray(nib.load(subject.label).dataobj[..., subject.frame(phase)]).round().astype(int)
    return np.stack([label == k for k in range(4)]).astype(np.float16).transpose(0, 3, 2, 1)


def write_probs(pipeline: MMSPipeline, folder: Path, marker: Path | None = None) -> Path:
    """The folder nnUNetv2_predict --save_probabilities would write for the training cases (the truth one-hot):
    ``<case>.npz``, ``<case>.pkl`` (a pickle that leaves ``marker`` when unpickled), ``<case>.nii.gz`` and its
    json files."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in pipeline.splits["train"]:
        for ph in PHASES:
            case = scoring.nnunet_case(s, ph)
            np.savez_compressed(folder / f"{case}.npz", probabilities=one_hot_npz(s, ph))
            (folder / f"{case}.pkl").write_bytes(pickle.dumps(Marker(marker or folder.parent / "UNPICKLED")))
            (folder / f"{case}.nii.gz").write_bytes(b"a label map, not read")
    for extra in scoring.NNUNET_EXTRAS:
        (folder / extra).write_text("{}")
    return folder


@pytest.fixture(scope="module")
def probs_dir(mms_root: Path, make_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_probs(make_pipeline(mms_root, data={"augment": False}), tmp_path_factory.mktemp("probs") / "nnunet")


@pytest.mark.parametrize("drop_empty", [False, True])
def test_each_training_slice_gets_its_probabilities_in_the_working_geometry(mms_root: Path, make_pipeline,
                                                                             probs_dir: Path, drop_empty: bool):
    pipe = make_pipeline(mms_root, data={"augment": False, "drop_empty": drop_empty})
    probs = pipe.teacher_targets(probs_dir)["seg"]
    seg = pipe.train_dataset().seg[:, 0].long()
    assert probs.shape == (len(seg), 4, *seg.shape[-2:])
    assert torch.allclose(probs.sum(1), torch.ones(()), atol=1e-5) and probs.min() >= 0
    # the truth's one-hot through bilinear resampling against the truth through nearest: they differ only at edges
    agree = (probs.argmax(1) == seg).float()
    assert agree.mean() > 0.99 and agree[seg > 0].mean() > 0.95
    assert torch.equal(probs[:, 0, 0, 0], torch.ones(len(seg)))  # the corner is padding: background


def test_a_probabilities_teacher_distils_a_student_and_never_unpickles(mms_root: Path, probs_dir: Path,
                                                                       tmp_path: Path) -> None:
    marker = probs_dir.parent / "UNPICKLED"
    out = tmp_path / "kd"
    assert main(["run", str(CONFIGS / "mms.yaml"), "--data-root", str(mms_root), "--out", str(out),
                 "--teacher", str(probs_dir), *TINY_RUN]) == 0
    assert not marker.exists()  # no .pkl was opened
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Marker(probe)))
    assert probe.exists()  # what unpickling one would have done
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["run"]["teacher"].startswith("probabilities-") and cfg["data"]["augment"] is False
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["seg/kd"]) and r["seg/kd"] > 0 for r in logs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "teacher" not in metrics["test"]  # no model: nothing to evaluate
    md = (out / "report.md").read_text()
    assert "| student |" in md and "saved probabilities probabilities-" in md


def _subject(pipe: MMSPipeline, split: str = "train") -> Subject:
    return pipe.splits[split][0]


def _missing(pipe: MMSPipeline, d: Path) -> Path:
    path = d / f"{scoring.nnunet_case(_subject(pipe), 'ES')}.npz"
    path.unlink()
    return path


def _extra(pipe: MMSPipeline, d: Path) -> Path:
    s = _subject(pipe, "val")
    path = d / f"{scoring.nnunet_case(s, 'ED')}.npz"
    np.savez_compressed(path, probabilities=one_hot_npz(s, "ED"))
    return path


def _shape(pipe: MMSPipeline, d: Path) -> Path:
    s = _subject(pipe)
    path = d / f"{scoring.nnunet_case(s, 'ED')}.npz"
    np.savez_compressed(path, probabilities=one_hot_npz(s, "ED")[:, :, :, :-1])  # one x column short
    return path


def _nan(pipe: MMSPipeline, d: Path) -> Path:
    s = _subject(pipe)
    path = d / f"{scoring.nnunet_case(s, 'ES')}.npz"
    p = one_hot_npz(s, "ES")
    p[2, 1, 3, 4] = np.nan
    np.savez_compressed(path, probabilities=p)
    return path


def _not_probabilities(pipe: MMSPipeline, d: Path) -> Path:
    s = _subject(pipe)
    path = d / f"{scoring.nnunet_case(s, 'ES')}.npz"
    np.savez_compressed(path, probabilities=one_hot_npz(s, "ES") * np.float16(0.5))
    return path


def _other_file(pipe: MMSPipeline, d: Path) -> Path:
    path = d / "notes.txt"
    path.write_text("x")
    return path


def _not_a_folder(pipe: MMSPipeline, d: Path) -> Path:
    return d / f"{scoring.nnunet_case(_subject(pipe), 'ED')}.npz"


@pytest.mark.parametrize("breakage, match", [
    (_missing, "missing: the ES probabilities of training subject"),
    (_extra, "not a training case of this run (subject"),
    (_shape, "probabilities of shape (4, 4, 64, 63), expected (classes, z, y, x) = (4, 4, 64, 64)"),
    (_nan, "1 non-finite probabilities (NaN/Inf), the first at (class, z, y, x) (2, 1, 3, 4)"),
    (_not_probabilities, "do not sum to 1 over the classes"),
    (_other_file, "not an nnU-Net probabilities file"),
    (_not_a_folder, "not a folder; an M&Ms teacher given as saved probabilities"),
])
def test_each_bad_probabilities_folder_exits_2_naming_the_file(mms_root: Path, make_pipeline, probs_dir: Path,
                                                               tmp_path: Path, capsys,
                                                               breakage: Callable[[MMSPipeline, Path], Path],
                                                               match: str) -> None:
    folder = tmp_path / "nnunet"
    shutil.copytree(probs_dir, folder)
    bad = breakage(make_pipeline(mms_root, data={"augment": False}), folder)
    teacher = bad if breakage is _not_a_folder else folder
    out = tmp_path / "kd"
    code = main(["run", str(CONFIGS / "mms.yaml"), "--data-root", str(mms_root), "--out", str(out),
                 "--teacher", str(teacher), *TINY_RUN])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"error: {bad}: ") and match in err, err
    assert not out.exists() and not (probs_dir.parent / "UNPICKLED").exists()


def test_augmentation_is_refused_with_one_line(mms_root: Path, probs_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["run", str(CONFIGS / "mms.yaml"), "--data-root", str(mms_root), "--out", str(tmp_path / "kd"),
                 "--teacher", str(probs_dir), *TINY_RUN, "--set", "data.augment=true"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err == (f"error: {probs_dir}: a teacher given as saved probabilities needs data.augment: "
                                 f"false (random augmentation would move the training slices away from the teacher's "
                                 f"per-pixel probabilities); add --set data.augment=false")
