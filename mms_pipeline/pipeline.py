"""The M&Ms-1 pipeline: LV / MYO / RV segmentation of 2-D short-axis slices (and optional pathology classification),
with scanner vendors (or centres) as groups.

Training samples are the 2-D slices of the ED and ES volumes of the training subjects, preprocessed once
(:mod:`mms_pipeline.transforms`) and held in memory. Evaluation runs the 2-D model over whole preprocessed ED and
ES volumes with MONAI's ``SliceInferer``, maps the class probabilities back to each input's native geometry with
``Invertd``, takes the argmax and scores it there (:mod:`mms_pipeline.metrics`): per volume and phase, summarised
per vendor and per centre. ``worst_group_metric`` is the lowest per-group mean (over structures and phases) Dice,
``average_metric`` the mean Dice over all volumes (``eval.metric: accuracy``: the same for the per-subject
pathology accuracy). A subject's pathology comes, with ``model.cls_head: indices`` (the default), from the clinical
indices of its predicted ED and ES masks (:mod:`mms_pipeline.pathology`); with a network head (``encoder``,
``morphology``), from the mean softmax over its ED and ES slices with predicted foreground.

Final evaluation files (``out_dir``): ``per_case.csv`` (test; ``per_case_val.csv`` for val) in the official column
order plus HD95, clinical indices (on the ED row) and classification; predicted masks
``predictions/<code>_sa_ED.nii.gz`` / ``_ES`` (``predictions_val/`` for val) in each input's shape and affine;
``examples.npz`` (test: best and worst volume per vendor) for the report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import Compose, Invertd
from torch import nn

from groupdistil.config import hash_neutral_at_default
from groupdistil.distributed import barrier, gather_objects, is_main, shard
from groupdistil.errors import UserError
from groupdistil.pipeline import GroupBreakdown, Pipeline, Predictor
from groupdistil.progress import progress_iter
from groupdistil.teacher import TeacherRecord
from groupdistil.stats import group_mean

from . import data, report, results, scoring, soft_targets
from .geometry import invert_inplane, save_prediction
from .metrics import STRUCTURES, mean_dice, write_per_case_csv
from .metrics import summarise as summarise_rows
from .models import CLS_HEADS, NETWORK_CLS_HEADS, build_unet
from .pathology import IndexClassifier
from .pathology import features as index_features
from .synth import synthesize as synthesize_release
from .transforms import SliceDataset, augmentation, preprocess, preprocess_probabilities

N_SEG = len(data.LABELS)
OTHER = "other"

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "metadata_csv": None,  # path (relative to the data root or absolute); None: a known name in the root
        "group_by": "vendor",  # vendor | centre
        "splits": None,  # None: as distributed; or {train: SEL, val: SEL | holdout, test: SEL} (see data.py)
        "val_fraction": 0.2,  # holdout fraction of the train selection when data.splits has no val selection
        "split_seed": 0,
        "spacing": [1.5, 1.5],  # in-plane working spacing, mm (slice spacing is kept)
        "roi": [128, 128],  # in-plane working size (H, W), multiples of 32
        "intensity_percentiles": [0.5, 99.5],  # per-volume clip, then scaled to [0, 1]
        "augment": True,  # intensity-driven + mild affine augmentation of training slices
        "flip": False,  # random flips as well (when augment)
        "drop_empty": False,  # drop training slices without any labelled structure
        "classes": ["NOR", "DCM", "HCM", OTHER],  # pathology classes of the cls head
        "class_map": {},  # pathology code -> class, e.g. {HHD: HCM}; unlisted codes go to 'other' if it is a class
    },
    "model": {
        "encoder": "tu-tf_mobilenetv3_small_minimal_100",  # any smp encoder name, e.g. resnet18
        "decoder_channels": [32, 16, 16, 16, 16],  # one per decoder stage: 5 (encoder to stride 32), 4 or 3
        "head_kernel": 3,  # segmentation head convolution: 3 (3 x 3, smp's) | 1 (1 x 1)
        "separable_stages": 0,  # the last N decoder stages with depthwise-separable convolutions
        "separable_head": False,  # the 3 x 3 head as depthwise 3 x 3 + BatchNorm + 1 x 1
        "pretrained": False,  # smp/timm ImageNet encoder weights, from the local cache only (never downloaded)
        "init_from": None,  # run folder, checkpoint or state dict: the encoder's weights (decoder, heads may differ)
        "classify": True,  # decide each subject's pathology (data.classes)
        "dropout": 0.2,  # dropout of a network classification head
        # indices: from the clinical indices of the predicted segmentation (no network head; mms_pipeline.pathology)
        # | encoder (network head on pooled encoder features) | morphology (network head on the predicted shape)
        "cls_head": "indices",
    },
    "eval": {
        "metric": "dice",  # dice | accuracy: what worst_group_metric / average_metric measure
        "sw_batch_size": 32,  # slices per forward pass at inference
    },
}

#: added after M&Ms runs existed; at these values a model is built as before, and finished runs are still recognised
hash_neutral_at_default("mms", {"model.head_kernel": 3, "model.separable_stages": 0, "model.separable_head": False})


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


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}': {msg}")


class MMSPipeline(Pipeline):
    """M&Ms-1 as distributed (or :meth:`synthesize`'s synthetic copy); see the module docstrings for the details."""

    name = "mms"
    #: what a run writes into RUN_DIR besides the engine's files (removed by ``run --force``)
    run_outputs = ("per_case.csv", "per_case_*.csv", "predictions", "predictions_*", "examples.npz", "report_*.png")
    defaults = DEFAULTS

    # --- config ---------------------------------------------------------------------------------------------------
    def section(self, name: str) -> dict[str, Any]:
        """A config section (its defaults were filled by :meth:`Pipeline.with_defaults`)."""
        return self.cfg[name]

    @cached_property
    def dcfg(self) -> dict[str, Any]:
        d = self.section("data")
        _check(d["group_by"] in data.GROUP_BY, "data.group_by", f"'{d['group_by']}' is not one of {data.GROUP_BY}")
        roi = d["roi"]
        _check(len(roi) == 2 and all(int(r) > 0 and int(r) % 32 == 0 for r in roi), "data.roi",
               f"{roi} must be two positive multiples of 32")
        _check(len(d["spacing"]) == 2 and all(float(s) > 0 for s in d["spacing"]), "data.spacing",
               f"{d['spacing']} must be two positive numbers (mm)")
        lo, hi = d["intensity_percentiles"]
        _check(0 <= lo < hi <= 100, "data.intensity_percentiles", f"{[lo, hi]} must satisfy 0 <= lo < hi <= 100")
        _check(0 < d["val_fraction"] < 1, "data.val_fraction", f"{d['val_fraction']} must be in (0, 1)")
        classes = [str(c) for c in d["classes"]]
        _check(len(classes) >= 2 and len({c.lower() for c in classes}) == len(classes), "data.classes",
               f"{classes} must be at least two distinct names")
        known = {c.lower() for c in classes}
        bad = sorted(str(v) for v in (d["class_map"] or {}).values() if str(v).lower() not in known)
        _check(not bad, "data.class_map", f"maps to {bad}, which are not in data.classes {classes}")
        return d

    @cached_property
    def mcfg(self) -> dict[str, Any]:
        m = self.section("model")
        _check(m["cls_head"] in CLS_HEADS, "model.cls_head", f"'{m['cls_head']}' is not one of {', '.join(CLS_HEADS)}")
        return m

    @cached_property
    def ecfg(self) -> dict[str, Any]:
        e = self.section("eval")
        _check(e["metric"] in ("dice", "accuracy"), "eval.metric", f"'{e['metric']}' is not one of dice, accuracy")
        _check(e["metric"] == "dice" or self.mcfg["classify"], "eval.metric",
               "accuracy needs the classification head (model.classify: true)")
        return e

    # --- data -----------------------------------------------------------------------------------------------------
    @cached_property
    def splits(self) -> dict[str, list[data.Subject]]:
        """Subjects of train / val / test, validated (files, CSV, pathology classes when classifying)."""
        d = self.dcfg
        subjects = data.read_subjects(self.data_root, d["metadata_csv"])
        splits = data.assign_splits(subjects, d["splits"], d["val_fraction"], d["split_seed"], d["group_by"])
        for name, subs in splits.items():
            if not subs:
                raise UserError(f"{self.data_root}: the {name} split has no labelled subjects (see data.splits)")
        if self.mcfg["classify"]:
            for s in (s for subs in splits.values() for s in subs):
                self.class_index(s)
        return splits

    def class_index(self, subject: data.Subject | str) -> int:
        """Index in ``data.classes`` of the subject's (or the subject code's) pathology (``class_map`` first, then
        'other')."""
        if isinstance(subject, str):
            subject = self.subjects_by_code[subject]
        classes = [str(c).lower() for c in self.dcfg["classes"]]
        if subject.pathology is None:
            raise UserError(f"subject {subject.code}: {self.csv_path} has no 'Pathology' column (older release?); "
                            "set model.classify: false")
        if not subject.pathology:
            raise UserError(f"subject {subject.code}: {self.csv_path}: the subject's 'Pathology' cell is empty; "
                            "fill it in, or set model.classify: false")
        cmap = {str(k).lower(): str(v).lower() for k, v in (self.dcfg["class_map"] or {}).items()}
        name = cmap.get(subject.pathology.lower(), subject.pathology.lower())
        if name not in classes:
            name = OTHER
        if name not in classes:
            raise UserError(f"subject {subject.code}: {self.csv_path}: pathology '{subject.pathology}' is not in "
                            f"data.classes {self.dcfg['classes']} and there is no '{OTHER}' class (see data.class_map)")
        return classes.index(name)

    @cached_property
    def subjects_by_code(self) -> dict[str, data.Subject]:
        return {s.code: s for subs in self.splits.values() for s in subs}

    @cached_property
    def csv_path(self) -> Path:
        return data.find_metadata_csv(self.data_root, self.dcfg["metadata_csv"])

    @cached_property
    def group_names(self) -> list[str]:
        return data.group_names(self.splits, self.dcfg["group_by"])

    def group_index(self, subject: data.Subject) -> int:
        return self.group_names.index(subject.group(self.dcfg["group_by"]))

    @cached_property
    def preprocessor(self) -> Compose:
        d = self.dcfg
        return preprocess(d["spacing"], d["roi"], d["intensity_percentiles"])

    @cached_property
    def _train_set(self) -> SliceDataset:
        xs, segs, groups, classes, cases, slices, affines = [], [], [], [], [], [], {}
        for subject in self.splits["train"]:
            vols = data.load_volumes(subject)
            affines[subject.code] = vols["image"].affine.clone()
            for phase in data.PHASES:
                out = self.preprocessor({**vols, "frame": subject.frame(phase)})
                x = out["image"].as_tensor().permute(3, 0, 1, 2)  # (1, H, W, Z) -> (Z, 1, H, W)
                seg = out["label"].as_tensor().permute(3, 0, 1, 2).round().to(torch.uint8)
                z = torch.arange(len(x))
                if self.dcfg["drop_empty"]:
                    keep = (seg > 0).flatten(1).any(1)
                    x, seg, z = x[keep], seg[keep], z[keep]
                xs.append(x.float())
                segs.append(seg)
                groups += [self.group_index(subject)] * len(x)
                cases += [subject.code] * len(x)
                slices += [(subject.code, phase, int(k)) for k in z]
                if "cls" in self.heads:
                    classes += [self.class_index(subject)] * len(x)
        ds = SliceDataset(
            torch.cat(xs), torch.cat(segs), torch.tensor(groups, dtype=torch.long),
            torch.tensor(classes, dtype=torch.long) if "cls" in self.heads else None,
            augmentation(self.dcfg["flip"]) if self.dcfg["augment"] else None,
        )
        ds.cases = cases  # the subject of every slice (held out together)
        ds.slices = slices  # (subject, phase, z) of every slice: where its teacher probabilities come from
        ds.affines = affines  # each training subject's native affine (its probabilities' grid)
        return ds

    @property
    def train_group_counts(self) -> list[int]:
        return torch.bincount(self._train_set.group, minlength=len(self.group_names)).tolist()

    def train_dataset(self) -> SliceDataset:
        train = self._train_set
        self.load_eval_cases()
        if self.classifies_by_indices:
            self.index_classifier  # fitted (and its inputs checked) before the first step
        return train

    def load_eval_cases(self) -> None:
        """Read (and so check) this rank's validation and test volumes now, before any training step: a bad file
        stops the run at once instead of at the first validation or after training. They are kept (:meth:`case`),
        as the evaluation would keep them."""
        for split in ("val", "test"):
            for i in shard(len(self.splits[split])):
                self.case(split, i)

    def train_groups(self) -> torch.Tensor:
        return self._train_set.group.clone()

    def train_cases(self) -> list[str]:
        return list(self._train_set.cases)

    def train_is_random(self) -> bool:
        return bool(self.dcfg["augment"])

    def teacher_targets(self, source: Path) -> dict[str, torch.Tensor]:
        """A teacher given as nnU-Net's saved probabilities (:mod:`mms_pipeline.soft_targets`): ``{"seg": (N, 4, H,
        W)}``, each training slice's per-pixel probabilities in the working geometry (the spatial steps of the
        slice's own preprocessing). Needs ``data.augment: false``: augmented slices would no longer match them."""
        source = Path(source)
        if self.dcfg["augment"]:
            raise UserError(f"{source}: a teacher given as saved probabilities needs data.augment: false (random "
                            f"augmentation would move the training slices away from the teacher's per-pixel "
                            f"probabilities); add --set data.augment=false")
        files = soft_targets.match_files(source, self.splits["train"], self.splits)
        ds = self._train_set
        positions: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for i, (code, phase, z) in enumerate(ds.slices):
            positions.setdefault((code, phase), []).append((i, z))
        transform = preprocess_probabilities(self.dcfg["spacing"], self.dcfg["roi"])
        out = torch.zeros(len(ds), N_SEG, *ds.x.shape[-2:])
        for subject in self.splits["train"]:
            shape = nib.load(subject.image).shape[:3]
            for phase in data.PHASES:
                probs = soft_targets.read_probabilities(files[(subject.code, phase)], subject, shape, N_SEG)
                work = soft_targets.to_working(probs, ds.affines[subject.code], transform)  # (C, H, W, Z)
                for i, z in positions.get((subject.code, phase), []):
                    out[i] = work[..., z]
        return {"seg": out}

    def fingerprint(self) -> str:
        """Content hash of the metadata CSV and of every NIfTI file of the train, val and test subjects."""
        used = [s for subs in self.splits.values() for s in subs]
        return data.fingerprint(self.data_root, self.dcfg["metadata_csv"], used)

    # --- models ---------------------------------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        return list(self.dcfg["classes"])

    @property
    def heads(self) -> dict[str, int]:
        return self.heads_for(self.mcfg)

    def heads_for(self, model_cfg: dict[str, Any]) -> dict[str, int]:
        return self._heads({**self.cfg, "model": model_cfg})

    @staticmethod
    def _heads(cfg: dict[str, Any]) -> dict[str, int]:
        """Heads of the network of a config with filled sections: segmentation, and classification when a network
        head classifies (``model.cls_head`` encoder or morphology; ``indices`` classifies after inference)."""
        m = cfg["model"]
        if m["classify"] and m.get("cls_head", "indices") in NETWORK_CLS_HEADS:
            return {"seg": N_SEG, "cls": len(cfg["data"]["classes"])}
        return {"seg": N_SEG}

    @property
    def classifies_by_indices(self) -> bool:
        return bool(self.mcfg["classify"]) and self.mcfg["cls_head"] == "indices"

    @cached_property
    def index_classifier(self) -> IndexClassifier:
        """:class:`~mms_pipeline.pathology.IndexClassifier` fitted on the true clinical indices of the training
        subjects (``model.cls_head: indices``)."""
        from .metrics import clinical_indices

        x, y = [], []
        for s in self.splits["train"]:
            gts, spacing = scoring.native_truth(s, data.load_volumes(s))
            ind = clinical_indices(gts["ED"], gts["ES"], gts["ED"], gts["ES"], spacing, spacing)
            f = index_features(ind)
            if not np.isfinite(f).all():
                raise UserError(f"subject {s.code}: its ground truth has an empty LV or RV at ED, so the pathology "
                                f"classifier (model.cls_head: indices) cannot use it; set model.cls_head or "
                                f"model.classify: false")
            x.append(f)
            y.append(self.class_index(s))
        return IndexClassifier(len(self.dcfg["classes"])).fit(np.stack(x), y)

    def classify_rows(self, subject: data.Subject, rows: list[dict[str, Any]],
                      probs: torch.Tensor | None = None) -> None:
        """Add ``cls_correct``, ``Pathology`` and ``cls_pred`` to the subject's ED row: from the slice probabilities
        ``probs (Z, K)`` of a network head, or (``cls_head: indices``) from the row's clinical indices."""
        if probs is not None:
            predicted = int(probs.mean(0).argmax())
        elif self.classifies_by_indices:
            predicted = int(self.index_classifier.predict(index_features(rows[0]))[0])
        else:
            return
        rows[0].update({"cls_correct": float(predicted == self.class_index(subject)), "Pathology": subject.pathology,
                        "cls_pred": self.dcfg["classes"][predicted]})

    @classmethod
    def build_model(cls, cfg: dict[str, Any]) -> nn.Module:
        m = cfg["model"]
        return build_unet(m["encoder"], m["decoder_channels"], cls._heads(cfg), in_channels=1,
                          dropout=m["dropout"], pretrained=m["pretrained"], cls_head=m["cls_head"],
                          head_kernel=m["head_kernel"], separable_stages=m["separable_stages"],
                          separable_head=m["separable_head"])

    @classmethod
    def preprocessing(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        d = cls.with_defaults(cfg)["data"]
        return {
            "input": "one short-axis slice, float (1, H, W), of the ED or ES frame (metadata CSV indices)",
            "input_shape": [1, *(int(r) for r in d["roi"])],
            "spacing_mm": list(d["spacing"]), "roi": list(d["roi"]),
            "resampling": "in-plane only (MONAI Spacingd, pixdim (sx, sy, -1)), bilinear; then centre crop/pad",
            "intensity": f"per volume: clip to percentiles {list(d['intensity_percentiles'])}, scale to [0, 1]",
            "outputs": {"seg": dict(data.LABELS), **({"cls": list(d["classes"])}
                                                      if "cls" in cls._heads(cls.with_defaults(cfg)) else {})},
        }

    # --- evaluation -----------------------------------------------------------------------------------------------
    def load_case(self, subject: data.Subject) -> SubjectCase:
        vols = data.load_volumes(subject)
        gts, spacing = scoring.native_truth(subject, vols)
        phases = {}
        for phase in data.PHASES:
            image = self.preprocessor({"image": vols["image"], "frame": subject.frame(phase)})["image"]
            phases[phase] = PhaseCase(image=image, gt=gts[phase])
        return SubjectCase(subject, spacing, phases)

    @cached_property
    def _cases(self) -> dict[str, dict[int, SubjectCase]]:
        return {"val": {}, "test": {}}

    def case(self, split: str, i: int) -> SubjectCase:
        """The ``i``-th subject of ``split``, preprocessed once and kept (each rank keeps only its shard)."""
        cache = self._cases[split]
        if i not in cache:
            cache[i] = self.load_case(self.splits[split][i])
        return cache[i]

    @cached_property
    def inferer(self) -> SliceInferer:
        return SliceInferer(roi_size=tuple(int(r) for r in self.dcfg["roi"]), sw_batch_size=self.ecfg["sw_batch_size"],
                            spatial_dim=2, progress=False)

    def infer_slices(self, predict: Predictor, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        """``SliceInferer``'s outputs for a preprocessed volume ``(1, H, W, Z)``: ``seg`` ``(1, C, H, W, Z)``, ``cls``
        ``(1, K, 1 or H, 1 or W, Z)``. When a slice is exactly one window (``preprocess`` crops and pads every volume
        to ``data.roi``) sliding-window inference reduces to the network on the slices in batches of
        ``eval.sw_batch_size`` (one window, weight 1, count 1): that is run directly, without the window
        bookkeeping (about 1.2 ms a volume, issue 17); any other size goes through ``SliceInferer``."""
        roi = tuple(int(r) for r in self.dcfg["roi"])
        if volume.ndim != 4 or tuple(volume.shape[1:3]) != roi:
            return self.inferer(volume[None], _spatial_outputs(predict))
        slices = volume.permute(3, 0, 1, 2)  # (Z, 1, H, W)
        batch = int(self.ecfg["sw_batch_size"])
        parts = [predict(slices[i:i + batch]) for i in range(0, len(slices), batch)]
        out = {k: torch.cat([p[k] for p in parts]).to(volume.device) for k in parts[0]}
        return {k: v.permute(1, 2, 3, 0)[None] if v.ndim == 4 else v.T[None, :, None, None, :] for k, v in out.items()}

    @cached_property
    def inverter(self) -> Invertd:
        return Invertd(keys="pred", transform=self.preprocessor, orig_keys="image", nearest_interp=False)

    @torch.inference_mode()
    def predict_volume(self, predict: Predictor, image: MetaTensor) -> tuple[np.ndarray, torch.Tensor | None, float]:
        """Native-geometry labels ``(X, Y, Z)``, per-slice class probabilities ``(Z_fg, K)`` of the slices with
        predicted foreground (all slices when none), and the inference seconds, of one preprocessed volume."""
        start = time.perf_counter()
        out = self.infer_slices(predict, image.as_tensor())
        seconds = time.perf_counter() - start
        probs = torch.softmax(out["seg"][0].float().cpu(), dim=0)  # (C, H, W, Z)
        native = invert_inplane(probs, image)  # Invertd's result, resampled in 2-D (mms_pipeline.geometry)
        if native is None:
            native = self.inverter({"image": image, "pred": MetaTensor(probs, affine=image.affine)})["pred"].as_tensor()
        labels = channel_argmax(native).numpy().astype(np.uint8)
        cls = None
        if "cls" in out:
            per_slice = torch.softmax(out["cls"][0, :, 0, 0, :].float().cpu(), dim=0).T  # (Z, K)
            fg = channel_argmax(probs).flatten(0, 1).any(0)  # (Z,)
            cls = per_slice[fg] if fg.any() else per_slice
        return labels, cls, seconds

    def evaluate_subject(self, predict: Predictor, case: SubjectCase, pred_dir: Path | None) -> dict[str, Any]:
        """Per-phase rows (official columns + extras) and the inference time; when ``pred_dir`` is given the
        predictions are written there as ``<code>_sa_ED.nii.gz`` / ``_ES`` in the input's geometry."""
        s = case.subject
        preds, cls_probs, seconds = {}, [], 0.0
        for phase, pc in case.phases.items():
            pred, cls, sec = self.predict_volume(predict, pc.image)
            seconds += sec
            preds[phase] = pred
            if cls is not None:
                cls_probs.append(cls)
            if pred_dir is not None:
                img = nib.load(s.image)
                save_prediction(pred_dir / scoring.file_name(s, phase, "groupdistil"), pred, img.affine, img.header)
        rows = scoring.subject_rows(s, preds, {ph: pc.gt for ph, pc in case.phases.items()}, case.spacing)
        self.classify_rows(s, rows, torch.cat(cls_probs) if cls_probs else None)
        return {"rows": rows, "seconds": seconds / len(case.phases)}

    def run_split(self, predict: Predictor, split: str,
                  pred_dir: Path | None) -> tuple[list[dict[str, Any]], float]:
        """Rows of every volume of ``split`` (sharded over ranks, gathered) and mean inference seconds per volume."""
        subjects = self.splits[split]
        todo = list(shard(len(subjects)))
        progress = progress_iter(todo, f"evaluating {split} subjects", enabled=pred_dir is not None)  # final only
        mine = [(i, self.evaluate_subject(predict, self.case(split, i), pred_dir)) for i in progress]
        results = sorted(gather_objects(mine), key=lambda r: r[0])
        rows = [row for _, r in results for row in r["rows"]]
        return rows, float(np.mean([r["seconds"] for _, r in results]))

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The metrics of one model on one split (JSON-able)."""
        key = "Vendor" if self.dcfg["group_by"] == "vendor" else "Centre"
        per_subject = [r for r in rows if "cls_correct" in r]
        dice_by_group = _group_means(rows, key, mean_dice)
        out: dict[str, Any] = {
            "metric": self.ecfg["metric"],
            "dice_by_group": dice_by_group,
            "by_vendor": summarise_rows(rows, "Vendor"),
            "by_centre": summarise_rows(rows, "Centre"),
            "n_volumes": len(rows),
        }
        if per_subject:
            acc_by_group = _group_means(per_subject, key, lambda r: r["cls_correct"])
            acc_by_vendor = _group_means(per_subject, "Vendor", lambda r: r["cls_correct"])
            out.update({"cls_from": self.mcfg["cls_head"],
                        "cls_acc": float(np.mean([r["cls_correct"] for r in per_subject])),
                        "cls_acc_by_group": acc_by_group, "cls_acc_by_vendor": acc_by_vendor,
                        "worst_vendor_cls_acc": min(acc_by_vendor.values())})
        if self.ecfg["metric"] == "accuracy":
            group_metric, average = out["cls_acc_by_group"], out["cls_acc"]
            truth = [self.dcfg["classes"][self.class_index(r["Name"])] for r in per_subject]
            class_metric = {c: float(np.mean([r["cls_correct"] for r, t in zip(per_subject, truth) if t == c]))
                            for c in self.dcfg["classes"] if c in truth}  # per class: the share recognised
        else:
            group_metric, average = dice_by_group, float(np.mean([mean_dice(r) for r in rows]))
            class_metric = {s: float(np.mean([float(r[f"Dice {s}"]) for r in rows])) for s in STRUCTURES}
        worst = min(group_metric, key=group_metric.get)
        return {"worst_group_metric": group_metric[worst], "worst_group": worst, "average_metric": average,
                "group_metric": group_metric, "class_metric": class_metric, **out}

    def evaluate(self, predict: Predictor, split: str, out_dir: Path | None = None,
                 teacher: Predictor | TeacherRecord | None = None) -> dict[str, Any]:
        if split not in ("val", "test"):
            raise UserError(f"unknown split '{split}'; valid: val, test")
        pred_dir = None if out_dir is None else prediction_dir(Path(out_dir), split)
        rows, seconds = self.run_split(predict, split, pred_dir)
        result = self.summarise(rows)
        timing = {"infer_seconds_per_case": seconds}
        if isinstance(teacher, TeacherRecord):  # the teacher run's own evaluation on this data and these settings
            result["teacher"] = teacher.metrics[split]
            timing["teacher_infer_seconds_per_case"] = teacher.seconds_per_case(split)
        elif teacher is not None:
            teacher_rows, teacher_seconds = self.run_split(teacher, split, None)
            result["teacher"] = self.summarise(teacher_rows)
            timing["teacher_infer_seconds_per_case"] = teacher_seconds
        if out_dir is not None:
            barrier()  # every rank has written its predictions
            if is_main():
                name = report.PER_CASE_FILE if split == "test" else f"per_case_{split}.csv"
                write_per_case_csv(Path(out_dir) / name, rows)
                if split == "test":
                    self.save_examples(rows, Path(out_dir))
        result["timing"] = timing
        return result

    @classmethod
    def evaluation_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """The ``data`` and ``eval`` sections, and how pathology is decided (``model.classify``, ``model.cls_head``:
        the student's pipeline scores the teacher's predictions with the student's setting)."""
        cfg = cls.with_defaults(cfg)
        m = cfg["model"]
        return {"data": cfg["data"], "eval": cfg["eval"],
                "model": {"classify": m["classify"], "cls_head": m["cls_head"]}}

    def load_teacher_record(self, record: TeacherRecord) -> TeacherRecord:
        """Its ``metrics[split]`` is :meth:`summarise` of the teacher's rows, what :meth:`evaluate` reports."""
        return record

    def score_predictions(self, pred: Path, split: str, out_dir: Path) -> dict[str, Any]:
        """Score label maps made elsewhere (:mod:`mms_pipeline.scoring`) as :meth:`evaluate` scores the model's: the
        same ``per_case.csv`` (``per_case_<split>.csv`` for val) and, for test, ``examples.npz`` in ``out_dir``;
        returns :meth:`summarise` of the rows plus ``naming`` (``groupdistil`` or ``nnunet``)."""
        if split not in ("val", "test"):
            raise UserError(f"unknown split '{split}'; valid: val, test")
        if self.ecfg["metric"] != "dice" and not self.classifies_by_indices:
            raise UserError(f"eval.metric is '{self.ecfg['metric']}' (pathology classification) with "
                            f"model.cls_head {self.mcfg['cls_head']}, which label maps cannot score; evaluate with "
                            f"eval.metric: dice, or model.cls_head: indices (pathology from the maps' indices)")
        rows, collector, naming = scoring.score_folder(Path(pred), self.splits[split], split,
                                                       results.group_column(self.dcfg["group_by"]))
        for i, subject in enumerate(self.splits[split]):  # rows: ED then ES of each subject, in order
            self.classify_rows(subject, rows[2 * i:2 * i + 2])
        name = report.PER_CASE_FILE if split == "test" else f"per_case_{split}.csv"
        write_per_case_csv(Path(out_dir) / name, rows)
        if split == "test":
            collector.save(Path(out_dir) / report.EXAMPLES_FILE)
        return {**self.summarise(rows), "naming": naming}

    def save_examples(self, rows: list[dict[str, Any]], out_dir: Path) -> None:
        """Best and worst volume per group (vendor or centre: ``data.group_by``) as ``out_dir/examples.npz`` (from
        the written predictions)."""
        key = results.group_column(self.dcfg["group_by"])
        chosen: dict[tuple[str, str], dict[str, Any]] = {}
        for group in sorted({str(r[key]) for r in rows}):
            mine = [r for r in rows if str(r[key]) == group]
            for r in (max(mine, key=mean_dice), min(mine, key=mean_dice)):
                chosen[(r["Name"], r["ED/ES"])] = r
        by_code = {s.code: s for s in self.splits["test"]}
        collector = report.ExampleCollector(key)
        for (code, phase), row in chosen.items():
            subject = by_code[code]
            vols = data.load_volumes(subject)
            t = subject.frame(phase)
            pred = np.asarray(nib.load(prediction_dir(out_dir, "test") / f"{code}_sa_{phase}.nii.gz").dataobj)
            collector.add(row, vols["image"][t].numpy(), vols["label"][t].numpy().round().astype(np.uint8), pred)
        collector.save(out_dir / report.EXAMPLES_FILE)

    @classmethod
    def metric_note(cls, cfg: dict[str, Any]) -> str:
        metric, group = _metric_and_grouping(cfg)
        if metric == "accuracy":
            return (f"Worst-group metric: the subject-level pathology classification accuracy of the worst test "
                    f"{group}. Average metric: the accuracy over all test subjects. Per-case test: each subject "
                    f"scored 1 if its pathology was right, 0 if not.")
        return (f"Worst-group metric: the mean Dice (over LV, MYO, RV and the ED and ES phases) of the worst test "
                f"{group}. Average metric: the mean Dice over all test cases.")

    case_unit = "subjects"

    @classmethod
    def case_scores(cls, run_dir: Path) -> list[tuple[str, str, float]] | None:
        """One test score per subject, on the run's own metric (:func:`mms_pipeline.results.case_scores`: a
        subject's ED and ES mean Dice averaged; or whether its pathology was right)."""
        metric, group_by = _metric_and_grouping(results.run_config(Path(run_dir)))
        return results.case_scores(Path(run_dir) / report.PER_CASE_FILE, metric, group_by)

    @classmethod
    def group_breakdown(cls, run_dir: Path) -> GroupBreakdown | None:
        """Dice and HD95 of LV, MYO, RV per group and n subjects (:func:`mms_pipeline.results.group_breakdown`)."""
        _, group_by = _metric_and_grouping(results.run_config(Path(run_dir)))
        return results.group_breakdown(Path(run_dir) / report.PER_CASE_FILE, group_by)

    @classmethod
    def group_label(cls, group: str, cfg: dict[str, Any]) -> str:
        return report.group_title(group, _metric_and_grouping(cfg)[1])

    def write_report(self, run_dir: Path, metrics: dict[str, Any], info: dict[str, Any]) -> None:
        report.write_mms_report(run_dir, metrics, {**info, "group_by": self.dcfg["group_by"]})

    # --- synthetic data -------------------------------------------------------------------------------------------
    @classmethod
    def synthesize(cls, out: Path, seed: int = 0, **options: Any) -> None:
        synthesize_release(out, seed, **options)


def _metric_and_grouping(cfg: dict[str, Any]) -> tuple[str, str]:
    """``(eval.metric, data.group_by)`` of a (possibly partial) run config, defaults filled in."""
    cfg = MMSPipeline.with_defaults(cfg)
    return cfg["eval"]["metric"], cfg["data"]["group_by"]


def prediction_dir(out_dir: Path, split: str) -> Path:
    """Where the final evaluation writes the predicted masks: ``predictions/`` (test), ``predictions_val/``."""
    return out_dir / ("predictions" if split == "test" else f"predictions_{split}")


def channel_argmax(p: torch.Tensor) -> torch.Tensor:
    """``p.argmax(0)`` of a channel-first tensor ``(C, *spatial) -> (*spatial)``: the same indices (the first
    maximum; a NaN counts as the maximum), from ``torch.max(p, 0)``, which vectorises over the spatial positions on
    the CPU where ``argmax`` over the outer dimension does not (about 8x faster on ``(4, 112, 112, 7)``)."""
    return torch.max(p, 0).indices


def _spatial_outputs(predict: Predictor) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Wrap a predictor for ``SliceInferer``: ``cls`` logits ``(B, K)`` are broadcast to ``(B, K, H, W)`` so the
    sliding-window machinery carries them (one window per slice: the value comes back unchanged)."""

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: v.to(x.device) for k, v in predict(x).items()}  # stitched where the windows come from (CPU)
        h, w = x.shape[-2:]
        return {k: v[:, :, None, None].expand(-1, -1, h, w).contiguous() if v.ndim == 2 else v
                for k, v in out.items()}

    return run


def _group_means(rows: list[dict[str, Any]], key: str, value: Callable[[dict[str, Any]], float]) -> dict[str, float]:
    """``{str(row[key]): mean of value(row)}``, groups sorted as group names are."""
    groups = sorted({str(r[key]) for r in rows}, key=lambda g: (len(g), g))
    means, _ = group_mean([value(r) for r in rows], [groups.index(str(r[key])) for r in rows], len(groups))
    return {g: float(m) for g, m in zip(groups, means)}
