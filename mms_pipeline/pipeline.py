"""The M&Ms-1 pipeline: LV / MYO / RV segmentation of 2-D short-axis slices (and optional pathology classification),
with scanner vendors (or centres) as groups.

:class:`MMSPipeline` is the engine's view of these modules, each doing one thing:

- :mod:`~mms_pipeline.config`: the config keys, their defaults and allowed values;
- :mod:`~mms_pipeline.data` and :mod:`~mms_pipeline.splits`: the release, its subjects, splits and groups;
- :mod:`~mms_pipeline.train_set`: the training slices, preprocessed once (:mod:`~mms_pipeline.transforms`) and held in
  memory; :mod:`~mms_pipeline.soft_targets`: a teacher given as nnU-Net's saved probabilities of them;
- :mod:`~mms_pipeline.models`: the 2-D U-Net;
- :mod:`~mms_pipeline.inference`: a whole volume through the model, back in the input's native geometry;
- :mod:`~mms_pipeline.evaluation`: one model scored on the val or test split, per vendor and centre, and its files;
  :mod:`~mms_pipeline.scoring`: label maps made elsewhere scored the same way;
- :mod:`~mms_pipeline.pathology`: a subject's pathology class and how a model's is decided;
- :mod:`~mms_pipeline.report` (with :mod:`~mms_pipeline.examples`) and :mod:`~mms_pipeline.comparison`: the run's
  report and what ``compare`` reads of finished runs; :mod:`~mms_pipeline.synth`: the synthetic release.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from groupdistil.errors import UserError
from groupdistil.pipeline import Pipeline, Predictor

from . import data, report, soft_targets, train_set
from .comparison import MMSComparison
from .config import DEFAULTS, EVALUATION_KEYS, RULES
from .evaluation import Evaluation
from .inference import VolumeInference
from .models import NETWORK_CLS_HEADS, build_unet
from .pathology import IndexClassifier, Pathology
from .splits import assign_splits, group_names
from .synth import synthesize as synthesize_release
from .transforms import SliceDataset, augmentation, preprocess, preprocess_probabilities

N_SEG = len(data.LABELS)


class MMSPipeline(Pipeline):
    """M&Ms-1 as distributed (or :meth:`synthesize`'s synthetic copy); see the module docstrings for the details."""

    name = "mms"
    #: what a run writes into RUN_DIR besides the engine's files (removed by ``run --force``)
    run_outputs = ("per_case.csv", "per_case_*.csv", "predictions", "predictions_*", "examples.npz", "report_*.png")
    defaults = DEFAULTS
    rules = RULES
    evaluation_keys = EVALUATION_KEYS
    comparison = MMSComparison

    # --- config (defaults filled by Pipeline.with_defaults, values checked against the rules) ---------------------
    @property
    def dcfg(self) -> dict[str, Any]:
        return self.cfg["data"]

    @property
    def mcfg(self) -> dict[str, Any]:
        return self.cfg["model"]

    @property
    def ecfg(self) -> dict[str, Any]:
        return self.cfg["eval"]

    # --- data -----------------------------------------------------------------------------------------------------
    @cached_property
    def csv_path(self) -> Path:
        return data.find_metadata_csv(self.data_root, self.dcfg["metadata_csv"])

    @cached_property
    def splits(self) -> dict[str, list[data.Subject]]:
        """Subjects of train / val / test, validated (files, CSV, pathology classes when classifying)."""
        d = self.dcfg
        subjects = data.read_subjects(self.data_root, d["metadata_csv"])
        splits = assign_splits(subjects, d["splits"], d["val_fraction"], d["split_seed"], d["group_by"])
        for name, subs in splits.items():
            if not subs:
                raise UserError(f"{self.data_root}: the {name} split has no labelled subjects (see data.splits)")
        if self.mcfg["classify"]:
            for s in (s for subs in splits.values() for s in subs):
                self.pathology.class_index(s)
        return splits

    @cached_property
    def group_names(self) -> list[str]:
        return group_names(self.splits, self.dcfg["group_by"])

    @cached_property
    def preprocessor(self) -> Compose:
        d = self.dcfg
        return preprocess(d["spacing"], d["roi"], d["intensity_percentiles"])

    @cached_property
    def training(self) -> train_set.TrainingSlices:
        """The training slices (:mod:`mms_pipeline.train_set`), with their groups and, with a network head, classes."""
        d = self.dcfg
        return train_set.build(self.splits["train"], self.preprocessor,
                               lambda s: self.group_names.index(s.group(d["group_by"])),
                               self.pathology.class_index if "cls" in self.heads else None, d["drop_empty"],
                               augmentation(d["flip"]) if d["augment"] else None)

    def train_dataset(self) -> SliceDataset:
        """The training slices; the validation and test volumes are read (and so checked) now too, and the pathology
        classifier fitted, before the first step."""
        dataset = self.training.dataset
        self.evaluation.load_cases()
        if self.pathology.by_indices:
            self.pathology.index_classifier  # noqa: B018 - fitted (and its inputs checked) now
        return dataset

    def train_groups(self) -> torch.Tensor:
        return self.training.dataset.group.clone()

    def train_cases(self) -> list[str]:
        return list(self.training.cases)

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
        transform = preprocess_probabilities(self.dcfg["spacing"], self.dcfg["roi"])
        return {"seg": soft_targets.training_probabilities(files, self.training, self.splits["train"], transform)}

    def fingerprint(self) -> str:
        """Content hash of the metadata CSV and of every NIfTI file of the train, val and test subjects."""
        used = [s for subs in self.splits.values() for s in subs]
        return data.fingerprint(self.data_root, self.dcfg["metadata_csv"], used)

    # --- pathology ------------------------------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        return list(self.dcfg["classes"])

    @cached_property
    def pathology(self) -> Pathology:
        """Each subject's pathology class and how a model's is decided (:mod:`mms_pipeline.pathology`)."""
        d, m = self.dcfg, self.mcfg
        return Pathology(d["classes"], d["class_map"], self.csv_path, m["cls_head"] if m["classify"] else None,
                         lambda: self.splits["train"])

    @property
    def index_classifier(self) -> IndexClassifier:
        """The classifier of ``model.cls_head: indices``, fitted on the training subjects' true clinical indices."""
        return self.pathology.index_classifier

    # --- model ----------------------------------------------------------------------------------------------------
    @property
    def heads(self) -> dict[str, int]:
        return self._heads(self.cfg)

    @staticmethod
    def _heads(cfg: dict[str, Any]) -> dict[str, int]:
        """Heads of the network of a config with filled sections: segmentation, and classification when a network
        head classifies (``model.cls_head`` encoder or morphology; ``indices`` classifies after inference)."""
        m = cfg["model"]
        if m["classify"] and m.get("cls_head", "indices") in NETWORK_CLS_HEADS:
            return {"seg": N_SEG, "cls": len(cfg["data"]["classes"])}
        return {"seg": N_SEG}

    @classmethod
    def build_model(cls, cfg: dict[str, Any]) -> nn.Module:
        m = cfg["model"]
        return build_unet(m["encoder"], m["decoder_channels"], cls._heads(cfg), in_channels=1,
                          dropout=m["dropout"], pretrained=m["pretrained"], cls_head=m["cls_head"])

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
    @cached_property
    def inference(self) -> VolumeInference:
        """Whole preprocessed volumes through a model, back in their native geometry (:mod:`mms_pipeline.inference`)."""
        return VolumeInference(self.dcfg["roi"], self.ecfg["sw_batch_size"], self.preprocessor)

    @cached_property
    def evaluation(self) -> Evaluation:
        """The val and test volumes, kept, and the scoring of a model on them (:mod:`mms_pipeline.evaluation`)."""
        return Evaluation(self.splits, self.preprocessor, self.inference, self.pathology, self.dcfg["group_by"],
                          self.ecfg["metric"])

    def evaluate(self, predict: Predictor, split: str, out_dir: Path | None = None) -> dict[str, Any]:
        """One model on ``split`` (:meth:`mms_pipeline.evaluation.Evaluation.evaluate`)."""
        return self.evaluation.evaluate(predict, split, out_dir)

    def score_predictions(self, pred: Path, split: str, out_dir: Path) -> dict[str, Any]:
        """Label maps made elsewhere, scored as :meth:`evaluate` scores a model's
        (:meth:`mms_pipeline.evaluation.Evaluation.score_predictions`)."""
        return self.evaluation.score_predictions(pred, split, out_dir)

    def write_report(self, run_dir: Path, metrics: dict[str, Any], info: dict[str, Any]) -> None:
        report.write_mms_report(run_dir, metrics, {**info, "group_by": self.dcfg["group_by"]})

    # --- synthetic data -------------------------------------------------------------------------------------------
    @classmethod
    def synthesize(cls, out: Path, seed: int = 0, **options: Any) -> None:
        synthesize_release(out, seed, **options)
