"""Scoring one M&Ms model on the val or test split: each subject's ED and ES volumes through the model
(:mod:`mms_pipeline.inference`), scored in their native geometry (:mod:`mms_pipeline.metrics`), the subject's
pathology decided (:mod:`mms_pipeline.pathology`), then summarised per vendor and per centre.

``worst_group_metric`` is the lowest per-group mean (over structures and phases) Dice, ``average_metric`` the mean
Dice over all volumes (``eval.metric: accuracy``: the same for the per-subject pathology accuracy).

Final evaluation files (``out_dir``): ``per_case.csv`` (test; ``per_case_val.csv`` for val) in the official column
order plus HD95, clinical indices (on the ED row) and classification; predicted masks
``predictions/<code>_sa_ED.nii.gz`` / ``_ES`` (``predictions_val/`` for val) in each input's shape and affine;
``examples.npz`` (test: best and worst volume per group) for the report.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from groupdistil.distributed import barrier, gather_objects, is_main, shard
from groupdistil.errors import UserError
from groupdistil.pipeline import Predictor
from groupdistil.progress import progress_iter
from groupdistil.stats import group_mean

from . import data, scoring
from .examples import EXAMPLES_FILE, ExampleCollector
from .geometry import save_prediction
from .inference import VolumeInference
from .metrics import STRUCTURES, mean_dice, write_per_case_csv
from .metrics import summarise as summarise_rows
from .pathology import Pathology
from .report import PER_CASE_FILE
from .splits import group_column

SPLITS = ("val", "test")


@dataclass
class PhaseCase:
    """One evaluation volume: preprocessed image ``(1, H, W, Z)`` (with its invertible trace) and native truth."""

    image: MetaTensor
    gt: np.ndarray  # (X, Y, Z) uint8, native geometry


@dataclass
class SubjectCase:
    subject: data.Subject
    spacing: tuple[float, float, float]  # native voxel size (header zooms), mm
    phases: dict[str, PhaseCase]


def load_case(subject: data.Subject, preprocessor: Compose) -> SubjectCase:
    """The subject's ED and ES images preprocessed, with their native truth and voxel size."""
    vols = data.load_volumes(subject)
    gts, spacing = scoring.native_truth(subject, vols)
    phases = {phase: PhaseCase(preprocessor({"image": vols["image"], "frame": subject.frame(phase)})["image"],
                               gts[phase])
              for phase in data.PHASES}
    return SubjectCase(subject, spacing, phases)


def prediction_dir(out_dir: Path, split: str) -> Path:
    """Where the final evaluation writes the predicted masks: ``predictions/`` (test), ``predictions_val/``."""
    return out_dir / ("predictions" if split == "test" else f"predictions_{split}")


def per_case_name(split: str) -> str:
    """The per-case table of a split: ``per_case.csv`` (test), ``per_case_val.csv``."""
    return PER_CASE_FILE if split == "test" else f"per_case_{split}.csv"


def group_means(rows: list[dict[str, Any]], key: str, value: Callable[[dict[str, Any]], float]) -> dict[str, float]:
    """``{str(row[key]): mean of value(row)}``, groups sorted as group names are."""
    groups = sorted({str(r[key]) for r in rows}, key=lambda g: (len(g), g))
    means, _ = group_mean([value(r) for r in rows], [groups.index(str(r[key])) for r in rows], len(groups))
    return {g: float(m) for g, m in zip(groups, means)}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")


class Evaluation:
    """The evaluation of models on the ``val`` and ``test`` subjects of ``splits``: their volumes preprocessed once
    and kept (each rank keeps only its shard), run through ``inference``, scored, the pathology decided by
    ``pathology``, summarised per group of ``group_by`` on ``metric`` (``eval.metric``)."""

    def __init__(self, splits: Mapping[str, Sequence[data.Subject]], preprocessor: Compose,
                 inference: VolumeInference, pathology: Pathology, group_by: str, metric: str) -> None:
        self.splits, self.preprocessor, self.inference = splits, preprocessor, inference
        self.pathology, self.group_by, self.metric = pathology, group_by, metric
        self._cases: dict[str, dict[int, SubjectCase]] = {split: {} for split in SPLITS}
        self._by_code = {s.code: s for subs in splits.values() for s in subs}

    def case(self, split: str, i: int) -> SubjectCase:
        """The ``i``-th subject of ``split``, preprocessed once and kept."""
        cache = self._cases[split]
        if i not in cache:
            cache[i] = load_case(self.splits[split][i], self.preprocessor)
        return cache[i]

    def load_cases(self) -> None:
        """Read (and so check) this rank's validation and test volumes now (they are kept, as evaluating keeps them):
        a bad file stops a run at once instead of at the first validation or after training."""
        for split in SPLITS:
            for i in shard(len(self.splits[split])):
                self.case(split, i)

    def evaluate_subject(self, predict: Predictor, case: SubjectCase, pred_dir: Path | None) -> dict[str, Any]:
        """Per-phase rows (official columns + extras) and the inference time; when ``pred_dir`` is given the
        predictions are written there as ``<code>_sa_ED.nii.gz`` / ``_ES`` in the input's geometry."""
        s = case.subject
        preds, cls_probs, seconds = {}, [], 0.0
        for phase, pc in case.phases.items():
            pred, cls, sec = self.inference.predict_volume(predict, pc.image)
            seconds += sec
            preds[phase] = pred
            if cls is not None:
                cls_probs.append(cls)
            if pred_dir is not None:
                img = nib.load(s.image)
                save_prediction(pred_dir / scoring.file_name(s, phase, "groupdistil"), pred, img.affine, img.header)
        rows = scoring.subject_rows(s, preds, {ph: pc.gt for ph, pc in case.phases.items()}, case.spacing)
        self.pathology.classify_rows(s, rows, torch.cat(cls_probs) if cls_probs else None)
        return {"rows": rows, "seconds": seconds / len(case.phases)}

    def run_split(self, predict: Predictor, split: str,
                  pred_dir: Path | None) -> tuple[list[dict[str, Any]], float]:
        """Rows of every volume of ``split`` (sharded over ranks, gathered) and mean inference seconds per volume."""
        todo = list(shard(len(self.splits[split])))
        progress = progress_iter(todo, f"evaluating {split} subjects", enabled=pred_dir is not None)  # final only
        mine = [(i, self.evaluate_subject(predict, self.case(split, i), pred_dir)) for i in progress]
        results = sorted(gather_objects(mine), key=lambda r: r[0])
        rows = [row for _, r in results for row in r["rows"]]
        return rows, float(np.mean([r["seconds"] for _, r in results]))

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The metrics of one model on one split (JSON-able)."""
        key = group_column(self.group_by)
        per_subject = [r for r in rows if "cls_correct" in r]
        dice_by_group = group_means(rows, key, mean_dice)
        out: dict[str, Any] = {
            "metric": self.metric,
            "dice_by_group": dice_by_group,
            "by_vendor": summarise_rows(rows, "Vendor"),
            "by_centre": summarise_rows(rows, "Centre"),
            "n_volumes": len(rows),
        }
        if per_subject:
            acc_by_group = group_means(per_subject, key, lambda r: r["cls_correct"])
            acc_by_vendor = group_means(per_subject, "Vendor", lambda r: r["cls_correct"])
            out.update({"cls_from": self.pathology.cls_head,
                        "cls_acc": float(np.mean([r["cls_correct"] for r in per_subject])),
                        "cls_acc_by_group": acc_by_group, "cls_acc_by_vendor": acc_by_vendor,
                        "worst_vendor_cls_acc": min(acc_by_vendor.values())})
        if self.metric == "accuracy":
            group_metric, average = out["cls_acc_by_group"], out["cls_acc"]
            classes = self.pathology.classes
            truth = [classes[self.pathology.class_index(self._by_code[r["Name"]])] for r in per_subject]
            class_metric = {c: float(np.mean([r["cls_correct"] for r, t in zip(per_subject, truth) if t == c]))
                            for c in classes if c in truth}  # per class: the share recognised
        else:
            group_metric, average = dice_by_group, float(np.mean([mean_dice(r) for r in rows]))
            class_metric = {s: float(np.mean([float(r[f"Dice {s}"]) for r in rows])) for s in STRUCTURES}
        worst = min(group_metric, key=group_metric.get)
        return {"worst_group_metric": group_metric[worst], "worst_group": worst, "average_metric": average,
                "group_metric": group_metric, "class_metric": class_metric, **out}

    def evaluate(self, predict: Predictor, split: str, out_dir: Path | None = None) -> dict[str, Any]:
        """:meth:`summarise` of one model's rows on ``split``, with ``timing``; the files of the module docstring
        in ``out_dir`` when given."""
        _check_split(split)
        pred_dir = None if out_dir is None else prediction_dir(Path(out_dir), split)
        rows, seconds = self.run_split(predict, split, pred_dir)
        result = self.summarise(rows)
        if out_dir is not None:
            barrier()  # every rank has written its predictions
            if is_main():
                write_per_case_csv(Path(out_dir) / per_case_name(split), rows)
                if split == "test":
                    self.save_examples(rows, Path(out_dir))
        result["timing"] = {"infer_seconds_per_case": seconds}
        return result

    def score_predictions(self, pred: Path, split: str, out_dir: Path) -> dict[str, Any]:
        """Score label maps made elsewhere (:mod:`mms_pipeline.scoring`) as :meth:`evaluate` scores a model's: the
        same per-case table and, for test, ``examples.npz`` in ``out_dir``; returns :meth:`summarise` of the rows
        plus ``naming`` (``groupdistil`` or ``nnunet``)."""
        _check_split(split)
        if self.metric != "dice" and not self.pathology.by_indices:
            raise UserError(f"eval.metric is '{self.metric}' (pathology classification) with model.cls_head "
                            f"{self.pathology.cls_head}, which label maps cannot score; evaluate with eval.metric: "
                            f"dice, or model.cls_head: indices (pathology from the maps' indices)")
        rows, collector, naming = scoring.score_folder(Path(pred), self.splits[split], split,
                                                       group_column(self.group_by))
        for i, subject in enumerate(self.splits[split]):  # rows: ED then ES of each subject, in order
            self.pathology.classify_rows(subject, rows[2 * i:2 * i + 2])
        write_per_case_csv(Path(out_dir) / per_case_name(split), rows)
        if split == "test":
            collector.save(Path(out_dir) / EXAMPLES_FILE)
        return {**self.summarise(rows), "naming": naming}

    def save_examples(self, rows: list[dict[str, Any]], out_dir: Path) -> None:
        """Best and worst volume per group as ``out_dir/examples.npz`` (from the written test predictions)."""
        key = group_column(self.group_by)
        chosen: dict[tuple[str, str], dict[str, Any]] = {}
        for group in sorted({str(r[key]) for r in rows}):
            mine = [r for r in rows if str(r[key]) == group]
            for r in (max(mine, key=mean_dice), min(mine, key=mean_dice)):
                chosen[(r["Name"], r["ED/ES"])] = r
        collector = ExampleCollector(key)
        for (code, phase), row in chosen.items():
            subject = self._by_code[code]
            vols = data.load_volumes(subject)
            t = subject.frame(phase)
            pred = np.asarray(nib.load(prediction_dir(out_dir, "test") / f"{code}_sa_{phase}.nii.gz").dataobj)
            collector.add(row, vols["image"][t].numpy(), vols["label"][t].numpy().round().astype(np.uint8), pred)
        collector.save(out_dir / EXAMPLES_FILE)
