"""The M&Ms pipeline's config keys, declared once: their defaults (:data:`DEFAULTS`), their allowed values
(:data:`RULES`, checked by the engine with its own before anything is built or written:
:func:`groupdistil.config.check_rules`), and what a model's evaluation depends on besides its weights
(:data:`EVALUATION_KEYS`)."""
from __future__ import annotations

from typing import Any, Sequence

from groupdistil.config import Rule, hash_neutral_at_default, one_of

from .data import GROUP_BY
from .models import CLS_HEADS
from .pathology import OTHER

DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "metadata_csv": None,  # path (relative to the data root or absolute); None: a known name in the root
        "group_by": "vendor",  # vendor | centre
        "splits": None,  # None: as distributed; or {train: SEL, val: SEL | holdout, test: SEL} (see splits.py)
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

#: removed model options (measured worse, set by no config): a run config written while they existed holds them at
#: these values, which built the model as it is built now; left out of the config hash at these values, so those
#: finished runs are still recognised (``run`` on their folder, ``compare --reuse``, a teacher's recorded evaluation)
hash_neutral_at_default("mms", {"model.head_kernel": 3, "model.separable_stages": 0, "model.separable_head": False})


def _inplane(test: Any) -> Any:
    """A test of two in-plane values (H, W), each passing ``test``."""
    return lambda v: len(v) == 2 and all(test(x) for x in v)


def _distinct_names(classes: Sequence[Any]) -> bool:
    names = [str(c).lower() for c in classes]
    return len(names) >= 2 and len(set(names)) == len(names)


def _maps_onto_classes(cfg: dict[str, Any]) -> bool:
    known = {str(c).lower() for c in cfg["data"]["classes"]}
    return all(str(v).lower() in known for v in (cfg["data"]["class_map"] or {}).values())


#: allowed values of the pipeline's keys (``MMSPipeline.rules``); the encoder name is looked up in smp's and timm's
#: registries when the model is built (:func:`mms_pipeline.models.check_encoder`), ``data.splits`` against the subjects
RULES: tuple[Rule, ...] = (
    Rule("data.group_by", one_of(*GROUP_BY), "vendor or centre"),
    Rule("data.roi", _inplane(lambda r: int(r) > 0 and int(r) % 32 == 0), "two positive multiples of 32 (H, W)"),
    Rule("data.spacing", _inplane(lambda s: float(s) > 0), "two positive numbers (mm)"),
    Rule("data.intensity_percentiles", lambda p: len(p) == 2 and 0 <= p[0] < p[1] <= 100,
         "[lo, hi] with 0 <= lo < hi <= 100"),
    Rule("data.val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    Rule("data.classes", _distinct_names, "at least two distinct names"),
    Rule("data.class_map", _maps_onto_classes, "a mapping of pathology codes to names in data.classes", whole=True),
    Rule("model.decoder_channels", lambda c: 3 <= len(c) <= 5 and all(int(n) > 0 for n in c),
         "3 to 5 positive channel counts, one per decoder stage (the encoder depth)"),
    Rule("model.cls_head", one_of(*CLS_HEADS), "indices, encoder or morphology"),
    Rule("eval.metric", one_of("dice", "accuracy"), "dice or accuracy"),
    Rule("eval.metric", lambda cfg: cfg["eval"]["metric"] == "dice" or bool(cfg["model"]["classify"]),
         "dice when model.classify is false (accuracy scores the pathology classification)", whole=True),
    Rule("eval.sw_batch_size", lambda v: v >= 1, ">= 1"),
)

#: what a model's evaluation depends on besides its weights (which cases, groups and metrics, how inference runs, how
#: pathology is decided): a student whose values equal its teacher run's reports the teacher's recorded evaluation
EVALUATION_KEYS: tuple[str, ...] = ("data", "eval", "model.classify", "model.cls_head")


def metric_and_grouping(cfg: dict[str, Any]) -> tuple[str, str]:
    """``(eval.metric, data.group_by)`` of a (possibly partial) run config, defaults filled in."""
    metric = (cfg.get("eval") or {}).get("metric", DEFAULTS["eval"]["metric"])
    return metric, (cfg.get("data") or {}).get("group_by", DEFAULTS["data"]["group_by"])
