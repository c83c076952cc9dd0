"""The Waterbirds pipeline: bird classification (landbird / waterbird) with the background as spurious attribute.

Groups: landbird_land, landbird_water, waterbird_land, waterbird_water (2 * y + place). The data root is the folder
with ``metadata.csv`` or its parent holding ``waterbird_complete95_forest2water2/``.
"""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from groupdistil import distributed as dist_utils
from groupdistil.config import Rule, check_rules, one_of
from groupdistil.errors import UserError
from groupdistil.pipeline import Pipeline
from groupdistil.runtime import Predictor

from . import metadata, report, synthetic
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageStore, WaterbirdsDataset, resize_size, tensor_transform
from .metrics import accuracy_summary
from .models import build_model
from .report import PREDICTIONS, WaterbirdsComparison
from .shape_images import SHAPE_NAMES

__all__ = ["LABELS", "TEACHER_PROBS_CSV", "WaterbirdsComparison", "WaterbirdsPipeline"]

#: the file a folder of saved Waterbirds teacher probabilities holds (``--teacher FOLDER``)
TEACHER_PROBS_CSV = "teacher_probs.csv"
#: the classes the model predicts under each ``data.label``: the bird, or the pretraining corpus's object classes
LABELS: dict[str, tuple[str, ...]] = {"y": metadata.CLASS_NAMES, "shape": SHAPE_NAMES}


class WaterbirdsPipeline(Pipeline):
    """Waterbirds (or its synthetic stand-in): data, ResNet classifiers, group accuracies and the report."""

    name: ClassVar[str] = "waterbirds"
    #: what a run writes into RUN_DIR besides the engine's files (removed by ``run --force``)
    run_outputs: ClassVar[tuple[str, ...]] = (PREDICTIONS, "group_accuracy_*.png")
    comparison: ClassVar[type[WaterbirdsComparison]] = WaterbirdsComparison
    defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "data": {
            "image_size": 224,  # crop side; images are first resized to image_size * 256 / 224
            "augment": False,  # random resized crop (scale 0.7-1) + horizontal flip on training images
            "cache_images": True,  # decode and resize every image once, keep uint8 tensors in memory
            # the class to predict: y (landbird / waterbird), or shape: the 14 object classes of the synthetic
            # pretraining corpus (its extra column; for pretraining a backbone, groups stay (y, place))
            "label": "y",
        },
        "model": {
            "arch": "resnet18",  # resnet18 | resnet34 | resnet50
            "pretrained": False,  # torchvision ImageNet weights (from the torch hub cache when offline)
            "init_from": None,  # run folder, checkpoint or plain state dict: the backbone's weights (fc may differ)
        },
        "eval": {
            "batch_size": 64,
        },
    }
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule("data.image_size", lambda v: v >= 8, ">= 8"),
        Rule("data.label", one_of(*LABELS), f"y (the bird) or shape (the pretraining corpus's {len(SHAPE_NAMES)} "
                                            f"object classes)"),
        Rule("eval.batch_size", lambda v: v >= 1, ">= 1"),
    )

    def __init__(self, cfg: dict[str, Any], data_root: Path) -> None:
        super().__init__(cfg, data_root)
        self.data_cfg = self.cfg["data"]
        self.eval_cfg = self.cfg["eval"]
        self.root = metadata.resolve_root(self.data_root)
        self.meta = metadata.read_metadata(self.root)
        label = self.data_cfg["label"]
        if label == "shape" and self.meta.shape is None:
            raise UserError(f"{self.root / metadata.METADATA}: data.label: shape needs the column "
                            f"'{metadata.SHAPE_COLUMN}' of the pretraining corpus (groupdistil synth waterbirds "
                            f"--option corpus=pretrain); this table has none")
        #: the class of every image (N,): the bird (y) or, for pretraining, the corpus's shape class
        self.labels: np.ndarray = self.meta.y if label == "y" else self.meta.shape  # type: ignore[assignment]
        for code, split in enumerate(metadata.SPLITS):
            if not (self.meta.split == code).any():
                raise UserError(f"{self.root / metadata.METADATA}: no image of split {code} ({split})")
        self._stores: dict[str, ImageStore] = {}

    # --- data -------------------------------------------------------------------------------------------------
    @property
    def group_names(self) -> list[str]:
        return list(metadata.GROUP_NAMES)

    def train_groups(self) -> torch.Tensor:
        return torch.as_tensor(self.meta.group[self.meta.where("train")], dtype=torch.long)

    def train_is_random(self) -> bool:
        return bool(self.data_cfg["augment"])

    def train_dataset(self) -> WaterbirdsDataset:
        return self._dataset("train", augment=self.train_is_random())

    def fingerprint(self) -> str:
        """Content hash of ``metadata.csv`` and of every image it lists (see :func:`metadata.fingerprint`)."""
        return metadata.fingerprint(self.root, self.meta)

    def teacher_targets(self, source: Path) -> dict[str, torch.Tensor]:
        """A teacher's saved class probabilities of the training images (:data:`TEACHER_PROBS_CSV` in the folder
        ``source``, or the CSV file ``source``; format: :func:`waterbirds_pipeline.report.read_teacher_probabilities`)
        as ``{"cls": (N_train, 2)}`` in training order. They are per image, so with ``data.augment: true`` every
        augmented view of an image is distilled towards its image's probabilities."""
        source = Path(source)
        path = source / TEACHER_PROBS_CSV if source.is_dir() else source
        if source.is_dir() and not path.is_file():
            raise UserError(f"{source}: no {TEACHER_PROBS_CSV} in this folder (a Waterbirds teacher given as saved "
                            f"probabilities is a CSV with columns img_id, {', '.join(report.PROB_COLUMNS)} covering "
                            f"every training image)")
        if path.suffix.lower() != ".csv":
            columns = ", ".join(report.PROB_COLUMNS)
            raise UserError(f"{path}: not a CSV; a Waterbirds teacher given as saved probabilities is a CSV (or a "
                            f"folder holding {TEACHER_PROBS_CSV}) with columns img_id, {columns}")
        probs = report.read_teacher_probabilities(path, self.meta)
        return {"cls": torch.as_tensor(probs, dtype=torch.float32)}

    def _images(self, split: str) -> ImageStore:
        """The split's images, decoded and resized once per pipeline (when ``data.cache_images``)."""
        if split not in self._stores:
            rows = self.meta.where(split)
            self._stores[split] = ImageStore(
                [self.meta.path[i] for i in rows], [self.meta.describe(i) for i in rows],
                resize_size(int(self.data_cfg["image_size"])), bool(self.data_cfg["cache_images"]),
                num_threads=min(4, os.cpu_count() or 1))
        return self._stores[split]

    def _dataset(self, split: str, augment: bool) -> WaterbirdsDataset:
        rows = self.meta.where(split)
        transform = tensor_transform(int(self.data_cfg["image_size"]), augment)
        return WaterbirdsDataset(self._images(split), self.labels[rows], self.meta.group[rows], transform, augment)

    # --- models -----------------------------------------------------------------------------------------------
    @property
    def heads(self) -> dict[str, int]:
        return {"cls": len(self.class_names())}

    def class_names(self) -> list[str]:
        return _class_names(self.cfg)

    @classmethod
    def build_model(cls, cfg: dict[str, Any]) -> nn.Module:
        m = cfg["model"]
        return build_model(str(m["arch"]), bool(m["pretrained"]), len(_class_names(cfg)))

    @classmethod
    def _checked(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """``cfg`` with defaults, its values checked by :attr:`rules` (for what is built from a config alone)."""
        cfg = cls.with_defaults(cfg)
        check_rules(cfg, "config", cls.rules)
        return cfg

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, predict: Predictor, split: str, out_dir: Path | None = None) -> dict[str, Any]:
        """Accuracies of one model on ``split`` (see :mod:`waterbirds_pipeline.metrics`), with ``timing``
        (``infer_seconds_per_case``: the evaluation's seconds per image, the writing of predictions.csv left out) and
        ``outputs``: the predicted class of every image of the split, int64 ``(N,)`` in split order.

        Every process evaluates its shard of the split and the predictions are gathered. With ``out_dir``, the main
        process (re)writes the split's rows of ``out_dir/predictions.csv``, keeping the other split's rows; the
        teacher's predictions are added by :meth:`add_teacher_outputs`.
        """
        t0 = time.perf_counter()
        pred = self._predict(predict, split)
        result = self._score(pred, split)
        result["timing"] = {"infer_seconds_per_case": (time.perf_counter() - t0) / len(pred)}
        if out_dir is not None and dist_utils.is_main():
            self._write_predictions(Path(out_dir), split, pred)
        result["outputs"] = pred
        return result

    def recorded_outputs(self, run_dir: Path, split: str) -> np.ndarray | None:
        """The ``prediction`` column of a finished run's ``predictions.csv`` for ``split`` (int64, split order); None
        when that file is missing or does not fit this data (:func:`waterbirds_pipeline.report.read_predictions`)."""
        try:
            return report.read_predictions(Path(run_dir) / PREDICTIONS, self.meta, split)
        except UserError:
            return None

    def add_teacher_outputs(self, out_dir: Path, split: str, outputs: np.ndarray) -> None:
        """Set the ``teacher_prediction`` column of the rows of ``split`` in ``out_dir/predictions.csv`` (written by
        :meth:`evaluate`) to ``outputs``, the teacher's predicted classes in split order (main process; atomic)."""
        rows = self.meta.where(split)
        if len(outputs) != len(rows):
            raise ValueError(f"{len(outputs)} teacher outputs for the {len(rows)} images of {split}")
        if dist_utils.is_main():
            values = {str(int(i)): int(v) for i, v in zip(self.meta.img_id[rows], outputs)}
            report.set_split_column(Path(out_dir) / PREDICTIONS, split, "teacher_prediction", values)

    def _write_predictions(self, out_dir: Path, split: str, pred: np.ndarray) -> None:
        """(Re)write the rows of ``split`` in ``out_dir/predictions.csv`` (predictions in split order)."""
        rows = self.meta.where(split)
        table = {"img_id": self.meta.img_id[rows], "y": self.labels[rows], "place": self.meta.place[rows],
                 "group": np.asarray(self.group_names)[self.meta.group[rows]], "prediction": pred}
        csv_rows = [{"split": split, **dict(zip(table, values))} for values in zip(*table.values())]
        report.update_predictions(out_dir / PREDICTIONS, split, csv_rows)

    def _score(self, pred: np.ndarray, split: str) -> dict[str, Any]:
        """The accuracies of the predicted classes ``pred`` of the images of ``split`` (split order)."""
        rows = self.meta.where(split)
        return accuracy_summary(pred, self.labels[rows], self.meta.group[rows], self.group_names,
                                self.train_group_counts, self.class_names())

    def score_predictions(self, pred: Path, split: str, out_dir: Path) -> dict[str, Any]:
        """Score a predictions CSV made elsewhere (``img_id``, ``prediction``; see
        :func:`waterbirds_pipeline.report.read_predictions`) with the four accuracies, and write the split's rows
        of ``out_dir/predictions.csv`` as :meth:`evaluate` does."""
        preds = report.read_predictions(Path(pred), self.meta, split)
        result = self._score(preds, split)
        self._write_predictions(Path(out_dir), split, preds)
        return result

    def _predict(self, predict: Predictor, split: str) -> np.ndarray:
        """Predicted class of every image of ``split``, int64 ``(N,)`` in split order: one pass over this process's
        shard, then the shards of all processes are gathered."""
        dataset = self._dataset(split, augment=False)
        positions = list(dist_utils.shard(len(dataset)))
        loader = DataLoader(Subset(dataset, positions), batch_size=int(self.eval_cfg["batch_size"]), shuffle=False)
        with torch.no_grad():
            chunks = [predict(batch["x"])["cls"].argmax(1).cpu() for batch in loader]
        mine = np.stack([np.asarray(positions, dtype=np.int64),
                         torch.cat(chunks).numpy().astype(np.int64) if chunks else np.zeros(0, np.int64)])
        gathered = np.concatenate(dist_utils.gather_objects([mine]), axis=1)
        return gathered[1, np.argsort(gathered[0])]

    def write_report(self, run_dir: Path, metrics: dict[str, Any], info: dict[str, Any]) -> None:
        report.write_report(run_dir, metrics, info, self.group_names, self.train_group_counts)

    @classmethod
    def preprocessing(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """What the model of a run config expects as input (written next to exported models)."""
        cfg = cls._checked(cfg)
        size = int(cfg["data"]["image_size"])
        return {
            "input": f"RGB image, float (3, {size}, {size})",
            "input_shape": [3, size, size],
            "resize": f"to {resize_size(size)} x {resize_size(size)} (aspect ratio not kept), bilinear, antialiased",
            "crop": f"centre {size} x {size}",
            "intensity": "scale to [0, 1], then normalise with ImageNet mean and std",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "classes": _class_names(cfg),
        }

    # --- synthetic data ---------------------------------------------------------------------------------------
    @classmethod
    def synthesize(cls, out: Path, seed: int = 0, **options: Any) -> None:
        """Synthetic Waterbirds in the release layout; options: ``scale``, ``min_size``, ``max_size``,
        ``min_per_group`` (see :func:`waterbirds_pipeline.synthetic.synthesize`)."""
        valid = [p for p in inspect.signature(synthetic.synthesize).parameters if p not in ("out", "seed")]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise UserError(f"unknown Waterbirds synthesis option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        synthetic.synthesize(Path(out), seed, **options)


def _class_names(cfg: dict[str, Any]) -> list[str]:
    """The classes the model predicts under ``data.label`` of ``cfg`` (defaults filled, rules checked)."""
    return list(LABELS[cfg["data"]["label"]])
