"""The Waterbirds pipeline: bird classification (landbird / waterbird) with the background as spurious attribute.

Groups: landbird_land, landbird_water, waterbird_land, waterbird_water (2 * y + place). The data root is the folder
with ``metadata.csv`` or its parent holding ``waterbird_complete95_forest2water2/``.
"""
from __future__ import annotations

import dataclasses
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
from groupdistil.errors import UserError
from groupdistil.pipeline import Pipeline, Predictor
from groupdistil.teacher import TeacherRecord

from . import metadata, report, synthetic
from .data import IMAGENET_MEAN, IMAGENET_STD, ImageStore, WaterbirdsDataset, resize_size, tensor_transform
from .metrics import accuracy_summary
from .models import build_model

#: the file a folder of saved Waterbirds teacher probabilities holds (``--teacher FOLDER``)
TEACHER_PROBS_CSV = "teacher_probs.csv"


class WaterbirdsPipeline(Pipeline):
    """Waterbirds (or its synthetic stand-in): data, ResNet classifiers, group accuracies and the report."""

    name: ClassVar[str] = "waterbirds"
    #: what a run writes into RUN_DIR besides the engine's files (removed by ``run --force``)
    run_outputs: ClassVar[tuple[str, ...]] = ("predictions.csv", "group_accuracy_*.png")
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

    def __init__(self, cfg: dict[str, Any], data_root: Path) -> None:
        super().__init__(cfg, data_root)
        self.data_cfg = self.cfg["data"]
        self.eval_cfg = self.cfg["eval"]
        if int(self.data_cfg["image_size"]) < 8 or int(self.eval_cfg["batch_size"]) < 1:
            raise UserError("data.image_size must be >= 8 and eval.batch_size >= 1")
        self.root = metadata.resolve_root(self.data_root)
        self.meta = metadata.read_metadata(self.root)
        label = _label(self.cfg)
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

    @property
    def train_group_counts(self) -> list[int]:
        return np.bincount(self.train_groups().numpy(), minlength=len(self.group_names)).tolist()

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

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, predict: Predictor, split: str, out_dir: Path | None = None,
                 teacher: Predictor | TeacherRecord | None = None) -> dict[str, Any]:
        """Accuracies on ``split`` (see :mod:`waterbirds_pipeline.metrics`); the teacher's under ``"teacher"``.

        Every process evaluates its shard of the split and the predictions are gathered. With ``out_dir``, the
        main process (re)writes the split's rows of ``out_dir/predictions.csv``, keeping the other split's rows.
        ``infer_seconds_per_case``: the evaluation's seconds per image without the teacher's forward passes, which
        are ``teacher_infer_seconds_per_case`` (a recorded teacher: its run's ``infer_seconds_per_case``).
        """
        t0 = time.time()
        rows = self.meta.where(split)
        y, group = self.labels[rows], self.meta.group[rows]
        running = teacher is not None and not isinstance(teacher, TeacherRecord)
        preds, seconds = self._predict([predict, teacher] if running else [predict], split)  # type: ignore[list-item]
        counts = self.train_group_counts
        result = accuracy_summary(preds[0], y, group, self.group_names, counts, self.class_names())
        timing = {"infer_seconds_per_case": (time.time() - t0 - sum(seconds[1:])) / len(rows)}
        teacher_preds = None
        if isinstance(teacher, TeacherRecord):  # the teacher run's own evaluation on this data and these settings
            teacher_preds = teacher.cases[split]
            result["teacher"] = teacher.metrics[split]
            timing["teacher_infer_seconds_per_case"] = teacher.seconds_per_case(split)
        elif teacher is not None:
            teacher_preds = preds[1]
            result["teacher"] = accuracy_summary(teacher_preds, y, group, self.group_names, counts, self.class_names())
            timing["teacher_infer_seconds_per_case"] = seconds[1] / len(rows)
        if teacher_preds is not None:
            result["teacher_agreement"] = float((preds[0] == teacher_preds).mean())
        if out_dir is not None and dist_utils.is_main():
            self._write_predictions(Path(out_dir), split, preds[0], teacher_preds)
        result["timing"] = timing
        return result

    def load_teacher_record(self, record: TeacherRecord) -> TeacherRecord | None:
        """The record with the teacher's predicted class of every val and test image (``record.cases[split]``,
        int64 in split order, from its run's ``predictions.csv``: for the agreement and the ``teacher_prediction``
        column); None when that file is missing or does not fit this data."""
        path = record.run_dir / "predictions.csv"
        try:
            cases = {split: report.read_predictions(path, self.meta, split) for split in ("val", "test")}
        except UserError:
            return None
        return dataclasses.replace(record, cases=cases)

    def _write_predictions(self, out_dir: Path, split: str, pred: np.ndarray, teacher: np.ndarray | None) -> None:
        """(Re)write the rows of ``split`` in ``out_dir/predictions.csv`` (predictions in split order)."""
        rows = self.meta.where(split)
        table = {"img_id": self.meta.img_id[rows], "y": self.labels[rows], "place": self.meta.place[rows],
                 "group": np.asarray(self.group_names)[self.meta.group[rows]], "prediction": pred}
        if teacher is not None:
            table["teacher_prediction"] = teacher
        csv_rows = [{"split": split, **dict(zip(table, values))} for values in zip(*table.values())]
        report.update_predictions(out_dir / "predictions.csv", split, csv_rows)

    def score_predictions(self, pred: Path, split: str, out_dir: Path) -> dict[str, Any]:
        """Score a predictions CSV made elsewhere (``img_id``, ``prediction``; see
        :func:`waterbirds_pipeline.report.read_predictions`) with the four accuracies, and write the split's rows
        of ``out_dir/predictions.csv`` as :meth:`evaluate` does."""
        rows = self.meta.where(split)
        preds = report.read_predictions(Path(pred), self.meta, split)
        result = accuracy_summary(preds, self.labels[rows], self.meta.group[rows], self.group_names,
                                  self.train_group_counts, self.class_names())
        self._write_predictions(Path(out_dir), split, preds, None)
        return result

    def _predict(self, predictors: list[Predictor], split: str) -> tuple[list[np.ndarray], list[float]]:
        """Predicted class of every image of ``split`` by each predictor, int64 ``(N,)`` each, in split order; and
        the seconds each predictor's forward passes took on this process.

        One pass over this process's shard, then the shards of all processes are gathered.
        """
        dataset = self._dataset(split, augment=False)
        positions = list(dist_utils.shard(len(dataset)))
        loader = DataLoader(Subset(dataset, positions), batch_size=int(self.eval_cfg["batch_size"]), shuffle=False)
        chunks: list[list[torch.Tensor]] = [[] for _ in predictors]
        seconds = [0.0 for _ in predictors]
        with torch.no_grad():
            for batch in loader:
                for k, predict in enumerate(predictors):
                    start = time.perf_counter()
                    chunks[k].append(predict(batch["x"])["cls"].argmax(1).cpu())
                    seconds[k] += time.perf_counter() - start
        mine = np.stack([np.asarray(positions, dtype=np.int64),
                         *(torch.cat(c).numpy() if c else np.zeros(0, np.int64) for c in chunks)])
        gathered = np.concatenate(dist_utils.gather_objects([mine]), axis=1)
        ordered = gathered[:, np.argsort(gathered[0])]
        return list(ordered[1:]), seconds

    def write_report(self, run_dir: Path, metrics: dict[str, Any], info: dict[str, Any]) -> None:
        report.write_report(run_dir, metrics, info, self.group_names, self.train_group_counts)

    @classmethod
    def metric_note(cls, cfg: dict[str, Any]) -> str:
        return ("Worst-group metric: the lowest test accuracy over the four (bird, background) groups. Average "
                "metric: the per-group test accuracies weighted by the training group proportions (the group DRO "
                "paper's average; not the raw test accuracy).")

    case_unit: ClassVar[str] = "images"

    @classmethod
    def case_scores(cls, run_dir: Path) -> list[tuple[str, str, float]] | None:
        """``(img_id, group, 1.0 if correct else 0.0)`` of each test image, from ``predictions.csv``."""
        return report.case_scores(Path(run_dir) / "predictions.csv")

    @classmethod
    def preprocessing(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """What the model of a run config expects as input (written next to exported models)."""
        size = int(cls.with_defaults(cfg)["data"]["image_size"])
        return {
            "input": f"RGB image, float (3, {size}, {size})",
            "input_shape": [3, size, size],
            "resize": f"to {resize_size(size)} x {resize_size(size)} (aspect ratio not kept), bilinear, antialiased",
            "crop": f"centre {size} x {size}",
            "intensity": "scale to [0, 1], then normalise with ImageNet mean and std",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "classes": _class_names(cls.with_defaults(cfg)),
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


def _label(cfg: dict[str, Any]) -> str:
    label = cfg.get("data", {}).get("label", "y")
    if label not in ("y", "shape"):
        raise UserError(f"data.label: '{label}' is not a Waterbirds target; valid: y (the bird), shape (the "
                        f"pretraining corpus's {metadata.N_SHAPES} object classes)")
    return str(label)


def _class_names(cfg: dict[str, Any]) -> list[str]:
    """The classes the model predicts under ``cfg``'s ``data.label``."""
    return list(metadata.CLASS_NAMES) if _label(cfg) == "y" else list(synthetic.SHAPE_NAMES)
