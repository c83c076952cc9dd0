"""``groupdistil evaluate``: predictions made elsewhere scored as a run scores its own.

M&Ms: the ground truth copied as predictions (this project's and nnU-Net's file names) scores Dice 1 and distance 0;
a tiny run's own ``predictions/`` reproduce its ``per_case.csv`` byte for byte and its per-vendor summary; every bad
predictions folder exits 2 with one line naming the file. Waterbirds: a predictions CSV scored with the four
accuracies. Also: the bootstrap CIs in the reports and the OUT folder rules.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from groupdistil.cli import main
from mms_pipeline import scoring
from mms_pipeline.data import PHASES
from mms_pipeline.geometry import save_prediction
from mms_pipeline.pathology import features as index_features
from mms_pipeline.metrics import DISTANCE_METRICS, STRUCTURES, read_per_case_csv
from mms_pipeline.pipeline import MMSPipeline
from waterbirds_pipeline.pipeline import WaterbirdsPipeline

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--set", "data.roi=[64, 64]", "--set", "train.batch_size=8", "--set", "model.encoder=resnet18",
            "--set", "model.decoder_channels=[16, 16, 8, 8, 8]", "--max-steps", "4", "--set", "train.num_threads=1"]
# the default pathology head (model.cls_head: indices) reads the label maps' clinical indices, so a run's
# classification columns are reproduced from its predictions too


@pytest.fixture(scope="module")
def mms_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate") / "OpenDataset"
    MMSPipeline.synthesize(root, seed=0, tiny=True)
    return root


def test_subjects(root: Path) -> list:
    return MMSPipeline(MMSPipeline.with_defaults({"pipeline": "mms"}), root).splits["test"]


test_subjects.__test__ = False  # a helper, not a test


def write_truth(root: Path, folder: Path, naming: str = "groupdistil") -> Path:
    """The ground truth of every test subject and phase as a predictions folder: this project's files (the input's
    header copied, as a run writes them) or nnU-Net's (its conversion: ``Nifti1Image(frame, image.affine)``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in test_subjects(root):
        lab, img = nib.load(s.label), nib.load(s.image)
        for ph in PHASES:
            arr = np.asarray(lab.dataobj[..., s.frame(ph)]).round().astype(np.uint8)
            path = folder / scoring.file_name(s, ph, naming)
            if naming == "groupdistil":
                save_prediction(path, arr, img.affine, img.header)
            else:
                nib.save(nib.Nifti1Image(arr, img.affine), path)
    return folder


def evaluate(pred: Path, root: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--pred", str(pred), "--data-root", str(root), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def truth_dir(mms_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_truth(mms_root, tmp_path_factory.mktemp("truth") / "pred")


def test_ground_truth_scores_dice_1_and_distance_0(mms_root: Path, truth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert evaluate(truth_dir, mms_root, out) == 0
    rows = read_per_case_csv(out / "per_case.csv")
    assert len(rows) == 2 * len(test_subjects(mms_root))
    for r in rows:
        for s in STRUCTURES:
            assert r[f"Dice {s}"] == 1.0 and r[f"Jaccard {s}"] == 1.0, (r["Name"], s)
            assert all(r[f"{m} {s}"] == 0.0 for m in DISTANCE_METRICS), (r["Name"], s)
        assert all(r[k] == 0.0 for k in r if k.endswith(" err") and not math.isnan(r[k]))
    metrics = json.loads((out / "metrics.json").read_text())
    ev = metrics["test"]
    assert ev["worst_group_metric"] == 1.0 and ev["average_metric"] == 1.0 and ev["naming"] == "groupdistil"
    assert ev["class_metric"] == {"LV": 1.0, "MYO": 1.0, "RV": 1.0}  # per structure (train.selection: worst_class)
    assert set(ev["by_vendor"]) >= {"A", "B", "C", "D", "worst"} and set(ev["by_centre"]) > {"worst"}
    assert metrics["evaluated"]["split"] == "test" and metrics["evaluated"]["pipeline"] == "mms"
    # pathology from the clinical indices of the label maps (model.cls_head: indices, the default): the classifier
    # fitted on the training subjects' true indices, applied to the (here perfect) predicted indices
    pipe = MMSPipeline(MMSPipeline.with_defaults({"pipeline": "mms"}), mms_root)
    ed = [r for r in rows if r["ED/ES"] == "ED"]
    want = [pipe.dcfg["classes"][int(pipe.index_classifier.predict(index_features(r))[0])] for r in ed]
    assert [r["cls_pred"] for r in ed] == want and all(r["Pathology"] for r in ed)
    assert ev["cls_acc"] == pytest.approx(np.mean([r["cls_correct"] for r in ed]))
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "scored predictions" in md and "bootstrap intervals" in md and "1.000 [1.000, 1.000]" in md
    assert "worst vendor" in page and (out / "examples.npz").is_file()
    assert "Checkpoints" not in md  # no training: no model selection section

    # nnU-Net's file names (Dataset114_MNMs: <code>_frame<NN>), with the files nnUNetv2_predict adds
    nnunet = write_truth(mms_root, tmp_path / "nnunet", naming="nnunet")
    for extra in ("dataset.json", "plans.json", "predict_from_raw_data_args.json"):
        (nnunet / extra).write_text("{}")
    assert evaluate(nnunet, mms_root, tmp_path / "eval_nnunet") == 0
    assert (tmp_path / "eval_nnunet" / "per_case.csv").read_bytes() == (out / "per_case.csv").read_bytes()
    assert json.loads((tmp_path / "eval_nnunet" / "metrics.json").read_text())["test"]["naming"] == "nnunet"

    # rerunning into the same OUT replaces its outputs; OUT holding other files is refused
    assert evaluate(truth_dir, mms_root, out) == 0


@pytest.fixture(scope="module")
def tiny_run(mms_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "mms_erm"
    args = ["run", str(ROOT / "configs/mms_teacher.yaml"), "--data-root", str(mms_root), "--out", str(run_dir)]
    assert main([*args, *TINY_RUN]) == 0
    return run_dir


def test_a_runs_own_predictions_reproduce_its_per_case_csv(mms_root: Path, tiny_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    assert evaluate(tiny_run / "predictions", mms_root, out) == 0  # config: the run's own config.yaml
    assert "using the config of the run folder" in capsys.readouterr().err
    assert (out / "per_case.csv").read_bytes() == (tiny_run / "per_case.csv").read_bytes()
    got = json.loads((out / "metrics.json").read_text())["test"]
    want = json.loads((tiny_run / "metrics.json").read_text())["test"]
    for key in ("worst_group_metric", "worst_group", "average_metric", "group_metric", "dice_by_group", "by_vendor",
                "by_centre", "n_volumes"):
        assert got[key] == want[key], key
    # the run's report shows the same bootstrap table as the evaluation's
    table = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| worst vendor")]
    assert table and table[0] in (tiny_run / "report.md").read_text()


def _first(folder: Path, suffix: str = "_sa_ES.nii.gz") -> Path:
    return min(folder.glob(f"*{suffix}"))


def _rewrite(path: Path, arr: np.ndarray | None = None, shift: float = 0.0) -> None:
    img = nib.load(path)
    data = np.asarray(img.dataobj) if arr is None else arr
    affine = img.affine.copy()
    affine[0, 3] += shift
    nib.save(nib.Nifti1Image(data, affine), path)


def _missing(d: Path) -> Path:
    p = _first(d)
    p.unlink()
    return p


def _extra(d: Path) -> Path:
    p = d / "notes.txt"
    p.write_text("x")
    return p


def _shape(d: Path) -> Path:
    p = _first(d)
    _rewrite(p, np.asarray(nib.load(p).dataobj)[:-1])
    return p


def _affine(d: Path) -> Path:
    p = _first(d)
    _rewrite(p, shift=0.5)
    return p


def _labels(d: Path) -> Path:
    p = _first(d)
    arr = np.asarray(nib.load(p).dataobj).copy()
    arr[0, 0, 0] = 5
    _rewrite(p, arr)
    return p


def _unreadable(d: Path) -> Path:
    p = _first(d)
    p.write_bytes(p.read_bytes()[:100])
    return p


@pytest.mark.parametrize("damage, message", [
    (_missing, "missing: the ES prediction of test subject"),
    (_extra, "not a prediction of a test subject"),
    (_shape, "does not match the image's"),
    (_affine, "the prediction's affine differs from its image's"),
    (_labels, "label values 5 outside {0, 1, 2, 3}"),
    (_unreadable, "unreadable NIfTI"),
])
def test_bad_predictions_exit_2_naming_the_file(mms_root: Path, truth_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture, damage, message: str) -> None:
    pred = tmp_path / "pred"
    shutil.copytree(truth_dir, pred)
    bad = damage(pred)
    capsys.readouterr()
    assert evaluate(pred, mms_root, tmp_path / "eval") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert str(bad) in err[0] and message in err[0], err[0]
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_out_folder_rules(mms_root: Path, truth_dir: Path, tiny_run: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    assert evaluate(truth_dir, mms_root, tiny_run) == 2  # a run folder is never written into
    assert "not empty and not an evaluation folder" in capsys.readouterr().err
    assert evaluate(truth_dir, mms_root, truth_dir.parent) == 2
    assert "may not hold the predictions" in capsys.readouterr().err
    assert evaluate(truth_dir, mms_root, tmp_path / "e", "--config", str(ROOT / "configs/waterbirds.yaml")) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "e").exists()  # a failed evaluation into a new folder leaves nothing
    # a failed evaluation into an earlier evaluation's folder leaves its outputs as they were
    done = tmp_path / "done"
    assert evaluate(truth_dir, mms_root, done) == 0
    before = {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()}
    (tmp_path / "empty").mkdir()
    assert evaluate(tmp_path / "empty", mms_root, done) == 2
    assert {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()} == before
    assert not (done / ".evaluate.partial").exists()


# --- Waterbirds ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wb") / "waterbird_complete95_forest2water2"
    WaterbirdsPipeline.synthesize(root, seed=0, scale=0.02, min_size=40, max_size=56)
    return root


def _metadata(root: Path) -> list[dict[str, str]]:
    with open(root / "metadata.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_waterbirds_predictions_csv(wb_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    meta = _metadata(wb_root)
    test = [{"img_id": r["img_id"], "prediction": r["y"]} for r in meta if r["split"] == "2"]
    out = tmp_path / "eval"
    assert evaluate(_write_csv(tmp_path / "truth.csv", test), wb_root, out) == 0
    ev = json.loads((out / "metrics.json").read_text())["test"]
    for key in ("worst_group_acc", "avg_acc", "train_weighted_avg_acc", "mean_group_acc"):
        assert ev[key] == 1.0, key
    md = (out / "report.md").read_text()
    assert "95% bootstrap intervals" in md and "[1.000, 1.000]" in md and "Waterbirds: scored predictions" in md

    # always "landbird": group accuracies 1, 1, 0, 0, and the same numbers as the pipeline's own evaluation
    land = [{"img_id": r["img_id"], "prediction": "0"} for r in meta if r["split"] == "2"]
    assert evaluate(_write_csv(tmp_path / "land.csv", land), wb_root, out) == 0
    ev = json.loads((out / "metrics.json").read_text())["test"]
    assert list(ev["group_acc"].values()) == [1.0, 1.0, 0.0, 0.0] and ev["worst_group_acc"] == 0.0
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["split"] for r in rows} == {"test"} and len(rows) == len(land)

    bad_cases = [
        ([{"img_id": r["img_id"], "pred": "0"} for r in land], "missing column(s) prediction"),
        (land[1:], "no prediction for 1 test image(s)"),
        (land + land[:1], "img_id listed twice"),
        ([{**land[0], "prediction": "2"}, *land[1:]], "prediction '2' is not a class"),
        ([{"img_id": "999999", "prediction": "0"}, *land], "no image with this img_id"),
        ([{"img_id": next(r["img_id"] for r in meta if r["split"] == "0"), "prediction": "0"}, *land],
         "an image of the train split, not of test"),
    ]
    for i, (rows, message) in enumerate(bad_cases):
        path = _write_csv(tmp_path / f"bad{i}.csv", rows)
        capsys.readouterr()
        assert evaluate(path, wb_root, tmp_path / f"eval_bad{i}") == 2, message
        err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("note: ")]
        assert len(err) == 1 and err[0].startswith(f"error: {path}") and message in err[0], err


def test_waterbirds_reproduces_the_pipelines_own_evaluation(wb_root: Path, tmp_path: Path) -> None:
    pipeline = WaterbirdsPipeline({"data": {"image_size": 32}, "model": {"arch": "resnet18"}, "eval": {}}, wb_root)
    run = tmp_path / "run"
    model = pipeline.model_for({"model": {"arch": "resnet18"}}).eval()
    want = {split: pipeline.evaluate(model, split, out_dir=run) for split in ("val", "test")}  # both splits' rows
    for split in ("val", "test"):
        out = tmp_path / f"eval_{split}"
        assert evaluate(run / "predictions.csv", wb_root, out, "--split", split) == 0  # its 'split' column selects
        got = json.loads((out / "metrics.json").read_text())[split]
        assert got == {k: v for k, v in want[split].items() if k not in ("timing", "outputs")}


def test_a_pipeline_without_scoring_refuses(toy_cfg: dict, tmp_path: Path) -> None:
    from toy_pipeline import ToyPipeline

    from groupdistil.errors import UserError

    with pytest.raises(UserError, match="pipeline 'toy' cannot score predictions made elsewhere"):
        ToyPipeline(toy_cfg, tmp_path).score_predictions(tmp_path, "test", tmp_path / "out")
