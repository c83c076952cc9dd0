"""The synthetic pretraining corpus (``groupdistil synth waterbirds --option corpus=pretrain``): a valid data set of
the Waterbirds layout, balanced over groups, its label independent of the background, and trainable as it is."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from groupdistil.cli import main
from groupdistil.errors import UserError
from waterbirds_pipeline import metadata
from waterbirds_pipeline.pipeline import WaterbirdsPipeline
from waterbirds_pipeline.synthetic import SHAPE_NAMES, corpus_counts

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"corpus": "pretrain", "scale": 0.01, "min_size": 32, "max_size": 48}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "pretrain"
    args = [f"--option={k}={v}" for k, v in OPTIONS.items()]
    assert main(["synth", "waterbirds", "--out", str(out), "--seed", "0", *args]) == 0
    return out


def test_layout_balance_and_labels(corpus: Path) -> None:
    meta = metadata.read_metadata(corpus)  # the pipeline's own reader accepts it
    counts = corpus_counts(OPTIONS["scale"])
    for split in metadata.SPLITS:
        groups = np.bincount(meta.group[meta.where(split)], minlength=4).tolist()
        assert groups == counts[split] and len(set(groups)) == 1, split  # y and place independent, balanced
    with open(corpus / metadata.METADATA, newline="") as fh:
        rows = list(csv.DictReader(fh))
    shapes = np.array([int(r["shape"]) for r in rows])
    assert all(int(r["y"]) == int(r["shape"]) % 2 for r in rows)
    assert all(r["img_filename"].split("/")[0] == f"{int(r['shape']) + 1:03d}.{SHAPE_NAMES[int(r['shape'])]}"
               for r in rows)
    train = shapes[[r["split"] == "0" for r in rows]]
    assert set(train.tolist()) == set(range(len(SHAPE_NAMES)))  # every shape class is trained on
    assert np.bincount(train).max() - np.bincount(train).min() <= 2  # and about equally often
    styles = {r["place_filename"].split("/")[1] for r in rows}
    assert len(styles) == 6


def test_the_waterbirds_pipeline_trains_on_it(corpus: Path, tmp_path: Path) -> None:
    pipeline = WaterbirdsPipeline({"data": {"image_size": 32}}, corpus)
    item = pipeline.train_dataset()[0]
    assert tuple(item["x"].shape) == (3, 32, 32)
    out = tmp_path / "pretrain_run"
    assert main(["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(corpus), "--out", str(out),
                 "--set", "model.arch=resnet18", "--set", "data.image_size=32", "--set", "train.batch_size=16",
                 "--max-steps", "2"]) == 0
    assert (out / "checkpoints" / "best.pt").is_file()


def test_shape_label_trains_a_14_class_head(corpus: Path, tmp_path: Path, synth_root: Path) -> None:
    """``data.label: shape``: the corpus's 14 object classes as the target (groups stay (y, place)); a downstream
    run from it loads the backbone and keeps its own 2-class head. Without the column: one clear error."""
    pipeline = WaterbirdsPipeline({"data": {"image_size": 32, "label": "shape"}}, corpus)
    meta = metadata.read_metadata(corpus)
    assert pipeline.heads == {"cls": 14} and pipeline.class_names() == list(SHAPE_NAMES)
    train = meta.where("train")
    assert pipeline.train_dataset().y.tolist() == meta.shape[train].tolist() != meta.y[train].tolist()
    out = tmp_path / "shapes"
    tiny = ["--set", "model.arch=resnet18", "--set", "data.image_size=32", "--set", "train.batch_size=16",
            "--max-steps", "2"]
    assert main(["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(corpus), "--out", str(out),
                 "--set", "data.label=shape", *tiny]) == 0
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert tuple(best["backbone.fc.weight"].shape) == (14, 512)
    assert set(json.loads((out / "metrics.json").read_text())["test"]["class_metric"]) <= set(SHAPE_NAMES)
    down = tmp_path / "down"
    assert main(["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(synth_root), "--out",
                 str(down), "--set", f"model.init_from={out}", *tiny]) == 0
    with pytest.raises(UserError, match=r"metadata.csv: data.label: shape needs the column 'shape'"):
        WaterbirdsPipeline({"data": {"label": "shape"}}, synth_root)
    with pytest.raises(UserError, match="config: data.label = 'bird' is not allowed; it must be y .the bird. or shape"):
        WaterbirdsPipeline({"data": {"label": "bird"}}, corpus)


def test_deterministic_and_bad_corpus(tmp_path: Path) -> None:
    opts = {**OPTIONS, "scale": 0.001, "min_per_group": 1}
    for name in ("a", "b"):
        WaterbirdsPipeline.synthesize(tmp_path / name, 5, **opts)
    files = lambda d: {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    assert files(tmp_path / "a") == files(tmp_path / "b")
    with pytest.raises(UserError, match="unknown Waterbirds synthesis corpus 'imagenet'; valid: waterbirds, pretrain"):
        WaterbirdsPipeline.synthesize(tmp_path / "c", 0, corpus="imagenet")
