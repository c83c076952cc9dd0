"""Reading M&Ms-1: CSV quirks, validation errors (each names the subject and the file), frames, splits, groups, the
training set's keys, models and whole-volume inference."""
from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from groupdistil.errors import UserError
from groupdistil.pipeline import evaluation_values
from mms_pipeline.data import (
    METADATA_CSV_NAMES,
    REQUIRED_COLUMNS,
    load_volumes,
    read_metadata,
    read_subjects,
)
from mms_pipeline.geometry import invert_inplane
from mms_pipeline.pipeline import MMSPipeline
from mms_pipeline.splits import assign_splits

REAL_HEADER = ",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight\n"


def _subject(root: Path, vendor: str, split: str = "train"):
    return next(s for s in read_subjects(root) if s.vendor == vendor and s.split == split)


def _rewrite_nifti(path: Path, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(edit(np.asarray(img.dataobj)), img.affine, img.header), path)


# --- metadata CSV ---------------------------------------------------------------------------------------------
def test_csv_columns_by_name_with_index_column_reordering_and_gaps(tmp_path: Path) -> None:
    path = tmp_path / METADATA_CSV_NAMES[0]
    path.write_text(",Pathology,ES,External code,Centre,ED,Vendor,VendorName,Height,Weight,Age,Sex\n"
                    "0,DCM,9,A0S9V9,1,0,A,Siemens,,81.0,55,M\n"
                    "1,NOR,10,B1C2D3,2,29,B,Philips,172.0,,40,F\n")
    rec = read_metadata(path)
    assert rec["A0S9V9"] == {"vendor": "A", "centre": 1, "ed": 0, "es": 9, "pathology": "DCM"}
    assert rec["B1C2D3"] == {"vendor": "B", "centre": 2, "ed": 29, "es": 10, "pathology": "NOR"}


def test_old_six_column_csv_has_no_pathology(tmp_path: Path) -> None:
    path = tmp_path / METADATA_CSV_NAMES[1]
    path.write_text("\ufeff,External code,VendorName,Vendor,Centre,ED,ES\n0,A0S9V9,Siemens,A,1,0,9\n")
    assert read_metadata(path)["A0S9V9"]["pathology"] is None


@pytest.mark.parametrize(("row", "match"), [
    ("0,A0S9V9,Siemens,E,1,0,9,55,NOR,M,,", r"subject A0S9V9: .*unknown vendor code 'E'"),
    ("0,A0S9V9,Siemens,A,1,zero,9,55,NOR,M,,", r"subject A0S9V9: .*'ED' must be an integer, got 'zero'"),
    ("0,A0S9V9,Siemens,A,1,0,9.5,55,NOR,M,,", r"subject A0S9V9: .*'ES' must be an integer, got '9.5'"),
    ("0,A0S9V9,Siemens,A,1,,9,55,NOR,M,,", r"subject A0S9V9: .*'ED' must be an integer"),
])
def test_bad_csv_values_name_subject_and_file(tmp_path: Path, row: str, match: str) -> None:
    path = tmp_path / METADATA_CSV_NAMES[0]
    path.write_text(REAL_HEADER + row + "\n")
    with pytest.raises(UserError, match=match) as err:
        read_metadata(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
def test_missing_required_column_names_csv_and_column(tmp_path: Path, column: str) -> None:
    path = tmp_path / METADATA_CSV_NAMES[0]
    header = REAL_HEADER.strip().split(",")
    keep = [i for i, c in enumerate(header) if c != column]
    row = ["0", "A0S9V9", "Siemens", "A", "1", "0", "9", "55", "NOR", "M", "", ""]
    path.write_text(",".join(header[i] for i in keep) + "\n" + ",".join(row[i] for i in keep) + "\n")
    with pytest.raises(UserError, match=f"{path}: missing required column.*'{column}'"):
        read_metadata(path)


def test_metadata_csv_config_entry_and_missing_csv(broken_copy, mms_root: Path) -> None:
    root = broken_copy()
    moved = root / "meta.csv"
    (root / METADATA_CSV_NAMES[0]).rename(moved)
    with pytest.raises(UserError, match="no M&Ms metadata CSV found"):
        read_subjects(root)
    n = len(read_subjects(mms_root))
    assert len(read_subjects(root, "meta.csv")) == len(read_subjects(root, str(moved))) == n
    with pytest.raises(UserError, match="data.metadata_csv: .*nope.csv does not exist"):
        read_subjects(root, "nope.csv")


# --- release validation: every error names the subject and the file ---------------------------------------------
def _breaks() -> dict[str, tuple[Callable[[Path, Any], str], str]]:
    """name -> (break the copy and return the subject code, expected message)."""

    def missing_folder(root: Path, csv) -> str:
        s = _subject(root, "A")
        for p in s.image.parent.iterdir():
            p.unlink()
        s.image.parent.rmdir()
        return s.code

    def extra_folder(root: Path, csv) -> str:
        s = _subject(root, "A")
        (root / "Validation" / "ZZ9ZZ9").mkdir()
        (root / "Validation" / "ZZ9ZZ9" / "ZZ9ZZ9_sa.nii.gz").write_bytes(s.image.read_bytes())
        return "ZZ9ZZ9"

    def frame_outside(root: Path, csv) -> str:
        s = _subject(root, "B")
        csv(root).set(s.code, "ES", "7")
        return s.code

    def shape_mismatch(root: Path, csv) -> str:
        s = _subject(root, "A")
        _rewrite_nifti(s.label, lambda a: a[:-2])
        return s.code

    def garbage(root: Path, csv) -> str:
        s = _subject(root, "B", "val")
        s.image.write_bytes(b"not a nifti file at all" * 10)
        return s.code

    def missing_label(root: Path, csv) -> str:
        s = _subject(root, "A", "test")
        s.label.unlink()
        return s.code

    return {
        "in CSV, not on disk": (missing_folder, r"listed in .*\.csv but no folder"),
        "on disk, not in CSV": (extra_folder, r"ZZ9ZZ9_sa.nii.gz|folder .*ZZ9ZZ9 is not listed in .*\.csv"),
        "frame outside time axis": (frame_outside, r"_sa.nii.gz: ES frame 7 is outside the time axis \(0..3\)"),
        "shape mismatch": (shape_mismatch, r"_sa_gt.nii.gz: label shape .* != image shape"),
        "unreadable NIfTI": (garbage, r"_sa.nii.gz: unreadable NIfTI"),
        "missing label file": (missing_label, r"label .*_sa_gt.nii.gz is missing"),
    }


@pytest.mark.parametrize("case", list(_breaks()))
def test_broken_release_raises_user_error(case: str, broken_copy, metadata_csv) -> None:
    root = broken_copy()
    make, match = _breaks()[case]
    code = make(root, metadata_csv)
    with pytest.raises(UserError, match=match) as err:
        read_subjects(root)
    assert str(err.value).startswith(f"subject {code}:") and str(root) in str(err.value)


def test_label_values_outside_range(broken_copy) -> None:
    root = broken_copy()
    s = _subject(root, "A")

    def poke(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[0, 0, 0, s.ed] = 7
        return a

    _rewrite_nifti(s.label, poke)
    with pytest.raises(UserError, match=rf"subject {s.code}: .*{s.code}_sa_gt.nii.gz: label values 7 outside"):
        load_volumes(s)


def test_truncated_nifti(broken_copy) -> None:
    root = broken_copy()
    s = _subject(root, "B")
    raw = gzip.decompress(s.image.read_bytes())
    s.image.write_bytes(gzip.compress(raw[: len(raw) // 2])[:-8])  # half the voxels, gzip trailer cut
    subjects = read_subjects(root)  # the header is intact: caught when the voxels are read
    with pytest.raises(UserError, match=rf"subject {s.code}: .*{s.code}_sa.nii.gz: unreadable or truncated"):
        load_volumes(next(x for x in subjects if x.code == s.code))


# --- frames, splits and groups -------------------------------------------------------------------------------------
def test_frames_follow_the_csv_indices(mms_root: Path, mms_pipeline: MMSPipeline) -> None:
    s = _subject(mms_root, "B")
    assert s.ed != 0  # Philips: ED at the end of the time axis
    raw = np.asarray(nib.load(s.label).dataobj)
    vols = load_volumes(s)
    assert vols["image"].shape[0] == raw.shape[3]  # time as channels
    for phase in ("ED", "ES"):
        out = mms_pipeline.preprocessor({**vols, "frame": s.frame(phase)})
        assert tuple(out["image"].shape) == (1, 64, 64, raw.shape[2])
        got = np.count_nonzero(out["label"].numpy() == 1) * 4.0  # 2 mm working pixels
        sx, sy = nib.load(s.label).header.get_zooms()[:2]
        want = np.count_nonzero(raw[..., s.frame(phase)] == 1) * sx * sy
        assert got == pytest.approx(want, rel=0.15)


def test_splits_as_distributed_and_group_counts(mms_pipeline: MMSPipeline) -> None:
    splits = mms_pipeline.splits
    assert {s.vendor for s in splits["train"]} == {"A", "B"}
    assert all(s.label is not None for sub in splits.values() for s in sub)  # unlabelled C never used
    assert mms_pipeline.group_names == ["A", "B", "C", "D"]  # C, D: val/test only, still groups
    counts = mms_pipeline.train_group_counts
    slices = {v: sum(nib.load(s.image).shape[2] * 2 for s in splits["train"] if s.vendor == v) for v in "AB"}
    assert counts == [slices["A"], slices["B"], 0, 0]
    assert torch.bincount(mms_pipeline.train_groups(), minlength=4).tolist() == counts
    assert len(mms_pipeline.train_dataset()) == sum(counts)


def test_group_by_centre(mms_root: Path, make_pipeline) -> None:
    p = make_pipeline(mms_root, data={"group_by": "centre"})
    assert p.group_names == ["1", "2", "3", "4", "5", "6"]
    assert p.train_group_counts[3:] == [0, 0, 0] and min(p.train_group_counts[:3]) > 0  # B: centres 2, 3


def test_custom_splits_are_seeded_stratified_and_disjoint(mms_root: Path) -> None:
    subjects = read_subjects(mms_root)
    spec = {"train": {"vendors": ["A", "B"]}, "test": {"vendors": ["C", "D"]}}
    a = assign_splits(subjects, spec, val_fraction=0.3, seed=0)
    assert a == assign_splits(subjects, spec, val_fraction=0.3, seed=0)
    codes = {k: {s.code for s in v} for k, v in a.items()}
    assert not (codes["train"] & codes["val"]) and not (codes["train"] & codes["test"])
    assert {s.vendor for s in a["val"]} == {"A", "B"} and {s.vendor for s in a["test"]} == {"C", "D"}
    labelled_ab = {s.code for s in subjects if s.vendor in "AB" and s.label is not None}
    assert codes["train"] | codes["val"] == labelled_ab and all(s.split == "val" for s in a["val"])
    by_centre = assign_splits(subjects, {"train": {"centres": [1, 2]}, "val": {"centres": [3]},
                                         "test": {"vendors": ["A"], "centres": [6]}})
    assert {s.centre for s in by_centre["test"]} == {6} and {s.centre for s in by_centre["val"]} == {3}
    with pytest.raises(UserError, match="train and test overlap"):
        assign_splits(subjects, {"train": {"vendors": ["A"]}, "test": {"vendors": ["A", "D"]}})
    with pytest.raises(UserError, match="unknown vendor"):
        assign_splits(subjects, {"train": {"vendors": ["Z"]}, "test": {"vendors": ["D"]}})


# --- classes -------------------------------------------------------------------------------------------------------
def test_old_csv_refuses_classification_and_works_without(broken_copy, metadata_csv, make_pipeline) -> None:
    root = broken_copy()
    csv = metadata_csv(root)
    header, rows = csv.read()
    csv.write(header[:7], [r[:7] for r in rows])
    (root / METADATA_CSV_NAMES[0]).rename(root / METADATA_CSV_NAMES[1])
    with pytest.raises(UserError, match=r"has no 'Pathology'.*set model.classify: false"):
        _ = make_pipeline(root).splits
    p = make_pipeline(root, model={"classify": False})
    assert p.heads == {"seg": 4} and "cls" not in p.train_dataset()[0]


def test_class_mapping(mms_pipeline: MMSPipeline, mms_root: Path, make_pipeline) -> None:
    s = next(x for x in mms_pipeline.splits["train"] if x.pathology not in ("NOR", "DCM", "HCM"))
    assert mms_pipeline.pathology.class_index(s) == 3  # unlisted codes -> 'other'
    mapped = make_pipeline(mms_root, data={"class_map": {s.pathology: "NOR"}})
    assert mapped.pathology.class_index(s) == 0
    strict = make_pipeline(mms_root, data={"classes": ["NOR", "DCM", "HCM"]})
    with pytest.raises(UserError, match=rf"subject {s.code}: .*pathology '{s.pathology}' is not in data.classes"):
        strict.pathology.class_index(s)


# --- training set ----------------------------------------------------------------------------------------------------
def test_network_head_slices_carry_their_subjects_class(mms_root: Path, make_pipeline) -> None:
    p = make_pipeline(mms_root, model={"cls_head": "encoder"})
    ds = p.train_dataset()
    assert p.heads == {"seg": 4, "cls": 4} and ds[(5, 0)]["cls"].shape == ()
    subject = next(s for s in p.splits["train"] if s.code == p.train_cases()[5])
    assert int(ds[(5, 0)]["cls"]) == p.pathology.class_index(subject)


def test_items_and_key_determinism(mms_pipeline: MMSPipeline) -> None:
    ds = mms_pipeline.train_dataset()
    a, b, c = ds[(5, 123)], ds[(5, 123)], ds[(5, 124)]
    assert a["x"].shape == (1, 64, 64) and a["x"].dtype == torch.float32
    assert a["seg"].shape == (1, 64, 64) and a["seg"].dtype == torch.long and int(a["seg"].max()) <= 3
    assert "cls" not in a  # the default pathology head (indices) is not part of the network
    assert a["group"].shape == () and int(a["index"]) == 5
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["x"], c["x"])
    assert not torch.equal(ds[(6, 123)]["x"], ds[6]["x"])  # seed 0 for a plain index
    assert mms_pipeline.train_is_random()


def test_no_augmentation_gives_the_cached_slice(mms_root: Path, make_pipeline) -> None:
    p = make_pipeline(mms_root, data={"augment": False, "drop_empty": True})
    ds = p.train_dataset()
    assert not p.train_is_random()
    assert torch.equal(ds[(2, 1)]["x"], ds[(2, 99)]["x"])
    assert all(int(ds[i]["seg"].max()) > 0 for i in range(len(ds)))


# --- models and inference ----------------------------------------------------------------------------------------
def test_models_and_config_errors(mms_pipeline: MMSPipeline, mms_root: Path) -> None:
    p = mms_pipeline
    net = p.model_for({"model": {"encoder": "resnet18", "decoder_channels": [32, 16, 16, 8, 8], "cls_head": "encoder"}})
    out = net(torch.zeros(2, 1, 64, 64))
    assert out["seg"].shape == (2, 4, 64, 64) and out["cls"].shape == (2, 4)
    assert set(p.model_for({"model": {}}).eval()(torch.zeros(1, 1, 32, 32))) == {"seg"}  # indices: no network head
    with pytest.raises(UserError, match="cannot be downloaded offline"):
        p.model_for({"model": {"pretrained": True}})
    with pytest.raises(UserError, match="unknown encoder 'nonet'"):
        p.model_for({"model": {"encoder": "nonet"}})
    with pytest.raises(UserError, match="data.roi"):
        _ = MMSPipeline({"data": {"roi": [100, 100]}}, mms_root).dcfg
    model = MMSPipeline.model_for({"data": {}, "model": {"classify": False}}).eval()  # no data read
    assert set(model(torch.zeros(1, 1, 32, 32))) == {"seg"}


def test_whole_volume_inference_returns_native_geometry(mms_pipeline: MMSPipeline) -> None:
    case = mms_pipeline.evaluation.case("test", 0)
    for head in ("indices", "encoder"):
        model = mms_pipeline.model_for({"model": {"cls_head": head}}).eval()
        for pc in case.phases.values():
            labels, cls, seconds = mms_pipeline.inference.predict_volume(model, pc.image)
            assert labels.shape == pc.gt.shape and labels.dtype == np.uint8 and seconds > 0
            if head == "indices":  # decided from the label map's clinical indices, after inference
                assert cls is None
            else:
                assert cls.ndim == 2 and cls.shape[1] == 4 and torch.allclose(cls.sum(1), torch.ones(len(cls)))


def _previous_predict_volume(pipe: MMSPipeline, predict: Any, image: Any) -> tuple[np.ndarray, torch.Tensor | None]:
    """``predict_volume`` as it was before the argmax became :func:`channel_argmax` (issue 17)."""
    from monai.data import MetaTensor

    from mms_pipeline.inference import spatial_outputs as _spatial_outputs

    with torch.inference_mode():
        out = pipe.inference.inferer(image.as_tensor()[None], _spatial_outputs(predict))
        probs = torch.softmax(out["seg"][0].float().cpu(), dim=0)
        native = pipe.inference.inverter({"image": image, "pred": MetaTensor(probs, affine=image.affine)})["pred"]
        labels = native.argmax(0).numpy().astype(np.uint8)
        cls = None
        if "cls" in out:
            per_slice = torch.softmax(out["cls"][0, :, 0, 0, :].float().cpu(), dim=0).T
            fg = probs.argmax(0).flatten(0, 1).any(0)
            cls = per_slice[fg] if fg.any() else per_slice
    return labels, cls


def test_slices_run_directly_give_slice_inferers_outputs(mms_pipeline: MMSPipeline, monkeypatch) -> None:
    """``infer_slices`` runs the network on the slices itself when a slice is one window, with SliceInferer's
    outputs (segmentation and the broadcast classification logits), also when the slices take several batches;
    another in-plane size goes through SliceInferer."""
    from monai.inferers import SliceInferer

    from mms_pipeline.inference import spatial_outputs as _spatial_outputs

    torch.manual_seed(0)
    net = mms_pipeline.model_for({"model": {"cls_head": "encoder"}}).eval()
    image = mms_pipeline.evaluation.case("test", 0).phases["ED"].image.as_tensor()
    calls = []
    monkeypatch.setattr(mms_pipeline.inference, "batch", 3)  # a 7-slice volume: batches of 3, 3, 1
    with torch.inference_mode():
        inferer = SliceInferer(roi_size=image.shape[1:3], sw_batch_size=3, spatial_dim=2)  # pipeline's is cached
        want = inferer(image[None], _spatial_outputs(net))
        got = mms_pipeline.inference.infer_slices(lambda x: calls.append(len(x)) or net(x), image)
        assert calls == [3] * (image.shape[-1] // 3) + ([image.shape[-1] % 3] if image.shape[-1] % 3 else [])
        assert got["seg"].shape == want["seg"].shape
        assert torch.allclose(got["seg"], want["seg"], rtol=0, atol=1e-6)
        assert torch.allclose(got["cls"][0, :, 0, 0, :], want["cls"][0, :, 0, 0, :], rtol=0, atol=1e-6)
        monkeypatch.undo()  # the pipeline's SliceInferer (cached) is made with the configured batch
        wider = torch.nn.functional.pad(image, (0, 0, 0, 32))  # (1, H, W + 32, Z): two windows per slice
        calls.clear()
        out = mms_pipeline.inference.infer_slices(lambda x: calls.append(tuple(x.shape[-2:])) or net(x), wider)
        assert out["seg"].shape[2:4] == wider.shape[1:3] and set(calls) == {tuple(image.shape[1:3])}


def test_whole_volume_inference_gives_the_labels_of_the_previous_path(mms_pipeline: MMSPipeline) -> None:
    """``predict_volume`` (channel_argmax, the 2-D inversion) labels as the plain argmax after ``Invertd``, with
    exact ties between classes too."""
    torch.manual_seed(0)
    net = mms_pipeline.model_for({"model": {"cls_head": "encoder"}}).eval()
    predictors = {"network": net,
                  "ties": lambda x: {k: v.round() for k, v in net(x).items()},  # whole logits: equal maxima
                  "uniform": lambda x: {"seg": torch.zeros(len(x), 4, *x.shape[2:])}}  # every channel tied
    for split in ("val", "test"):  # the fast 2-D inversion serves the synthetic release (no fall-back to Invertd)
        for pc in mms_pipeline.evaluation.case(split, 0).phases.values():
            assert invert_inplane(torch.full((4, *pc.image.shape[1:]), 0.25), pc.image) is not None
    for name, predict in predictors.items():
        for split in ("val", "test"):
            for pc in mms_pipeline.evaluation.case(split, 0).phases.values():
                labels, cls, _ = mms_pipeline.inference.predict_volume(predict, pc.image)
                want, want_cls = _previous_predict_volume(mms_pipeline, predict, pc.image)
                assert np.array_equal(labels, want) and labels.dtype == want.dtype, name
                assert (cls is None and want_cls is None) or torch.equal(cls, want_cls), name


@pytest.mark.parametrize("shape", [(4, 9, 7, 3), (2, 5), (5, 1, 1, 1)])
def test_channel_argmax_is_argmax(shape: tuple[int, ...]) -> None:
    from mms_pipeline.inference import channel_argmax

    g = torch.Generator().manual_seed(0)
    tied = torch.randint(0, 3, shape, generator=g).float()
    special = tied.clone()
    special[torch.rand(shape, generator=g) < 0.1] = float("nan")
    special[torch.rand(shape, generator=g) < 0.1] = float("inf")
    special[torch.rand(shape, generator=g) < 0.1] = -0.0
    for p in (torch.softmax(torch.randn(shape, generator=g), 0), tied, special, torch.zeros(shape)):
        assert torch.equal(channel_argmax(p), p.argmax(0))


def test_oracle_prediction_scores_high(mms_pipeline: MMSPipeline) -> None:
    """The ground truth, preprocessed like an image, through SliceInferer and back to native: Dice near 1."""
    s = mms_pipeline.splits["val"][0]
    vols = load_volumes(s)
    out = mms_pipeline.preprocessor({**vols, "frame": s.ed})
    onehot = torch.nn.functional.one_hot(out["label"][0].long(), 4).permute(3, 0, 1, 2).float()  # (4, H, W, Z)

    slices = out["image"].as_tensor()[0].permute(2, 0, 1)  # (Z, H, W)

    def oracle(x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of the one-hot truth of the slices ``x`` (B, 1, H, W), found by matching them to the volume."""
        z = [int(((slices - xi[0]) ** 2).flatten(1).sum(1).argmin()) for xi in x]
        return {"seg": 20 * onehot.permute(3, 0, 1, 2)[z]}

    labels, _, _ = mms_pipeline.inference.predict_volume(oracle, out["image"])
    gt = vols["label"][s.ed].numpy()
    for k in (1, 2, 3):
        p, g = labels == k, gt == k
        assert 2 * np.count_nonzero(p & g) / (p.sum() + g.sum()) > 0.9


def test_evaluation_config_holds_what_scores_a_teacher() -> None:
    """A teacher's recorded evaluation is reused only with the same data, eval and pathology settings."""
    base = {"data": {"roi": [96, 96]}, "eval": {}, "model": {"encoder": "resnet18", "decoder_channels": [8] * 5}}
    small = {**base, "model": {"encoder": "tu-tf_mobilenetv3_small_minimal_100"}}
    def values(cfg):
        return evaluation_values(MMSPipeline, cfg)

    assert values(base) == values(small)  # architectures differ
    for change in ({"model": {"cls_head": "encoder"}}, {"model": {"classify": False}}, {"eval": {"sw_batch_size": 4}},
                   {"data": {"roi": [64, 64]}}):
        assert values({**base, **change}) != values(base), change


def test_evaluate_and_outputs(mms_pipeline: MMSPipeline, tmp_path: Path) -> None:
    model = mms_pipeline.model_for({"model": {}}).eval()
    res = mms_pipeline.evaluate(model, "test", out_dir=tmp_path)
    alone = mms_pipeline.evaluate(model, "test")  # how the engine scores a teacher: no files, the same metrics
    assert {k: v for k, v in alone.items() if k != "timing"} == {k: v for k, v in res.items() if k != "timing"}
    assert set(res["group_metric"]) == {"A", "B", "C", "D"}
    assert res["worst_group_metric"] == min(res["group_metric"].values())
    assert 0 <= res["average_metric"] <= 1 and "infer_seconds_per_case" in res["timing"]
    assert set(res["cls_acc_by_vendor"]) == {"A", "B", "C", "D"}
    assert (tmp_path / "per_case.csv").is_file() and (tmp_path / "examples.npz").is_file()
    for s in mms_pipeline.splits["test"]:
        for phase in ("ED", "ES"):
            pred = nib.load(tmp_path / "predictions" / f"{s.code}_sa_{phase}.nii.gz")
            src = nib.load(s.image)
            assert pred.shape == src.shape[:3] and np.array_equal(pred.affine, src.affine)
    val = mms_pipeline.evaluate(model, "val", out_dir=tmp_path)
    assert val["timing"]["infer_seconds_per_case"] > 0 and "teacher" not in val
    assert (tmp_path / "per_case_val.csv").is_file()
    assert len(list((tmp_path / "predictions_val").iterdir())) == 2 * len(mms_pipeline.splits["val"])
    scores = MMSPipeline.comparison.case_scores(tmp_path)  # one per subject: its ED and ES volumes averaged
    assert [c for c, _, _ in scores] == [s.code for s in mms_pipeline.splits["test"]] and scores[0][1] in "ABCD"
    # a classification run (eval.metric: accuracy) is paired per subject on whether its pathology was right
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"eval": {"metric": "accuracy"}}))
    per_subject = MMSPipeline.comparison.case_scores(tmp_path)
    rows = list(csv.DictReader((tmp_path / "per_case.csv").open()))
    as_class = lambda p: p if p in ("NOR", "DCM", "HCM") else "other"  # noqa: E731 - the default data.classes
    truth = {r["Name"]: float(as_class(r["Pathology"]) == r["cls_pred"]) for r in rows if r["cls_pred"]}
    assert sorted(c for c, _, _ in per_subject) == sorted(s.code for s in mms_pipeline.splits["test"])
    assert {c: v for c, _, v in per_subject} == truth
    (tmp_path / "config.yaml").unlink()
    mms_pipeline.write_report(tmp_path, {"test": res, "val": res, "selected_step": 1}, {"method": "erm"})
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()


def test_fingerprint_changes_with_the_data(broken_copy, mms_pipeline: MMSPipeline, metadata_csv,
                                           make_pipeline) -> None:
    root = broken_copy()
    assert make_pipeline(root).fingerprint() == mms_pipeline.fingerprint()
    metadata_csv(root).set(_subject(root, "A").code, "Age", "99")
    assert make_pipeline(root).fingerprint() != mms_pipeline.fingerprint()


def test_metric_note_follows_the_metric_and_grouping() -> None:
    note = MMSPipeline.comparison.metric_note
    assert "mean Dice" in note({}) and "worst test vendor" in note({})
    cls_note = note({"eval": {"metric": "accuracy"}, "data": {"group_by": "centre"}})
    assert "classification accuracy of the worst test centre" in cls_note and "Dice" not in cls_note


def test_the_runtime_predictor_feeds_channels_last_and_keeps_the_labels(mms_pipeline: MMSPipeline) -> None:
    """``Runtime.predictor`` hands image batches to the model as channels_last (faster small convolutions on the
    CPU, issue 17): the logits of the student and the teacher architectures agree with a plain call on the
    contiguous batch to float32 rounding, and the whole path's labels and class probabilities are the same. Every
    BatchNorm of both architectures is folded into its convolution (the predictor does it when made), with
    running statistics far from the identity; also with 4 decoder stages (the encoder cut at stride 16)."""
    from groupdistil.fold import fold_batchnorm
    from groupdistil.runtime import Runtime

    torch.manual_seed(0)
    lite = {"decoder_channels": [32, 16, 16, 16]}
    for encoder, extra in (("tu-tf_mobilenetv3_small_minimal_100", {}), ("resnet18", {}),
                           ("tu-tf_mobilenetv3_small_minimal_100", lite)):
        net = mms_pipeline.model_for({"model": {"cls_head": "encoder", "encoder": encoder, **extra}}).eval()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
        x = torch.randn(3, 1, 64, 64)
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        assert fold_batchnorm(net, x)[1] == n_bn > 0, encoder
        with torch.inference_mode():
            plain = net(x)
        fast = Runtime().predictor(net)(x)
        assert fast["seg"].is_contiguous(memory_format=torch.channels_last)  # the copy ran in that layout
        assert all(p.is_contiguous() for p in net.parameters())  # the model itself is untouched
        for head in plain:
            scale = float(plain[head].abs().max())  # folding rounds differently: agreement relative to the range
            assert torch.allclose(fast[head], plain[head], rtol=0, atol=1e-5 * scale), (encoder, head)
        for pc in mms_pipeline.evaluation.case("test", 0).phases.values():
            labels, cls, _ = mms_pipeline.inference.predict_volume(Runtime().predictor(net), pc.image)
            want, want_cls = _previous_predict_volume(mms_pipeline, net, pc.image)
            assert np.array_equal(labels, want), encoder
            assert torch.allclose(cls, want_cls, atol=1e-5), encoder
