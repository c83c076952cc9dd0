"""The contract between the engine and a dataset pipeline.

The engine never imports a pipeline. Pipelines register through the ``groupdistil.pipelines`` entry-point group
(see ``pyproject.toml``) and are looked up by name with :func:`get_pipeline`.

Batch contract (what a training ``DataLoader`` yields, after default collation):

- ``x``: float tensor ``(B, C, H, W)``, the network input;
- ``group``: long tensor ``(B,)``, the group index in ``[0, n_groups)``, in the order of ``group_names``;
- ``index``: long tensor ``(B,)``, the sample's index in the training dataset (stable across epochs; the key of the
  teacher cache);
- one target per head of the model: ``cls`` long ``(B,)`` class labels, ``seg`` long ``(B, 1, H, W)`` label maps.

Model contract: ``model(x)`` returns a ``dict`` mapping each head name (``"seg"``, ``"cls"``) to logits,
``(B, K, H, W)`` for ``seg`` and ``(B, K)`` for ``cls``.

Training datasets are indexed by a key ``(index, seed)``: all randomness of the sample's augmentation derives from
``seed``, so a run is a pure function of its seed whatever the number of workers or processes, and resumes exactly.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import Rule, check_rules, lookup
from .errors import UserError
from .runtime import Predictor

ENTRY_POINT_GROUP = "groupdistil.pipelines"


@dataclass(frozen=True)
class GroupBreakdown:
    """Per-group test values of one finished run by structure (:meth:`ComparisonHooks.group_breakdown`), for the
    comparison report's table per structure and group.

    ``values[group][column]`` (NaN when the run has none), ``n[group]`` the number of test units
    (:attr:`ComparisonHooks.case_unit`) of each group; ``columns`` with ``higher_is_better`` and ``digits`` of each;
    ``grouping`` names the groups (``vendor``, ``centre``); ``note`` says how the values are computed."""

    grouping: str
    columns: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    digits: tuple[int, ...]
    values: dict[str, dict[str, float]]
    n: dict[str, int]
    note: str = ""


class ComparisonHooks:
    """What ``groupdistil compare`` asks of a pipeline's finished runs beyond their ``metrics.json`` (all optional:
    these defaults give a report with the per-group metric only). A pipeline sets ``comparison`` to a subclass."""

    #: what one score of :meth:`case_scores` stands for, named in the comparison reports ("n = subjects")
    case_unit: ClassVar[str] = "cases"

    @classmethod
    def metric_note(cls, cfg: dict[str, Any]) -> str:
        """One or two sentences saying what ``worst_group_metric`` and ``average_metric`` measure under ``cfg``;
        "" for a generic sentence."""
        return ""

    @classmethod
    def case_scores(cls, run_dir: Path) -> list[tuple[str, str, float]] | None:
        """``(case id, group, score)`` of each test case of a finished run, for paired per-case tests; or None.

        Each score must be one independent unit (:attr:`case_unit`): the Wilcoxon test counts one pair per id. A
        pipeline whose cases are clustered (several volumes of one subject) averages them per cluster here. Ids
        that still share the text before the first space are resampled together by the bootstrap
        (:func:`groupdistil.stats.case_unit`)."""
        return None

    @classmethod
    def group_breakdown(cls, run_dir: Path) -> GroupBreakdown | None:
        """The test values of a finished run per group and structure (e.g. Dice and HD95 of LV, MYO, RV per
        vendor); None when the pipeline has no structures."""
        return None

    @classmethod
    def group_label(cls, group: str, cfg: dict[str, Any]) -> str:
        """How reports show a group of a run with config ``cfg`` (e.g. ``A (Siemens)`` for a vendor letter)."""
        return str(group)


class Pipeline(abc.ABC):
    """One dataset: its data and groups, its model, the evaluation of one model, its report, its synthetic copy.

    What a pipeline must provide is abstract; everything else is an optional hook with a default that works.
    """

    name: ClassVar[str]
    #: defaults of the pipeline's config sections: ``{"data": {...}, "model": {...}, "eval": {...}}``
    defaults: ClassVar[dict[str, dict[str, Any]]]
    #: allowed values of the pipeline's keys, checked with the engine's before anything is built or written
    rules: ClassVar[tuple[Rule, ...]] = ()
    #: the config keys (sections or dotted keys) a model's evaluation depends on besides its weights: a student whose
    #: values equal its teacher run's, on the same data, reports the teacher's recorded evaluation
    evaluation_keys: ClassVar[tuple[str, ...]] = ("data", "eval")
    #: glob patterns of the files and folders a run of this pipeline writes into RUN_DIR besides the engine's own
    #: (per-case tables, predictions, figures); ``run --force`` removes exactly these and the engine's
    run_outputs: ClassVar[tuple[str, ...]] = ()
    #: what ``groupdistil compare`` reads of this pipeline's runs besides ``metrics.json``
    comparison: ClassVar[type[ComparisonHooks]] = ComparisonHooks

    def __init__(self, cfg: dict[str, Any], data_root: Path) -> None:
        self.cfg = self.with_defaults(cfg)
        check_rules(self.cfg, "config", self.rules)
        self.data_root = Path(data_root)

    @classmethod
    def with_defaults(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """``cfg`` with every pipeline section (``data``, ``model``, ``eval``) filled from :attr:`defaults`.

        A resolved run config already is; this lets a pipeline be built from a partial one (tests, notebooks). The
        one place where pipeline defaults are filled in: pipelines read ``self.cfg[section][key]`` directly.
        """
        return {**cfg, **{sec: {**vals, **(cfg.get(sec) or {})} for sec, vals in cls.defaults.items()}}

    # --- data (required) --------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def group_names(self) -> list[str]:
        """Names of the groups, in index order."""

    @abc.abstractmethod
    def train_dataset(self) -> Dataset:
        """The training set, indexed by ``(index, seed)`` keys; ``len()`` is the number of samples."""

    @abc.abstractmethod
    def train_groups(self) -> torch.Tensor:
        """Group index of every training sample, long ``(N,)`` (for group-balanced sampling)."""

    @abc.abstractmethod
    def train_is_random(self) -> bool:
        """True when training samples are randomly augmented (then teacher outputs cannot be cached)."""

    # --- data (optional) --------------------------------------------------------------------------------------
    @property
    def train_group_counts(self) -> list[int]:
        """Number of training samples of each group."""
        return torch.bincount(self.train_groups(), minlength=len(self.group_names)).tolist()

    def class_names(self) -> list[str] | None:
        """Names of the classes of the ``cls`` head, for inferred groups within each class (None: not known)."""
        return None

    def train_cases(self) -> list[str]:
        """The case (subject, image) of every training sample, in dataset order: samples of one case are held out
        together (the ``heldout`` signal). Default: every sample its own case."""
        return [str(i) for i in range(sum(self.train_group_counts))]

    def fingerprint(self) -> str:
        """A short string that changes when the data changes (used to refuse resuming on other data)."""
        return ""

    def teacher_targets(self, source: Path) -> dict[str, torch.Tensor]:
        """A teacher made elsewhere, given as its saved probabilities (``--teacher SOURCE``): ``{head: p}`` with ``p``
        float ``(N, K[, H, W])`` the teacher's class probabilities of every training sample, in training-set order
        (index ``i`` is :meth:`train_dataset` sample ``i``, as the network input ``x`` is after preprocessing), for
        each head they cover. The engine distils ``log p`` as the teacher's logits (:mod:`groupdistil.teacher`).

        Every problem is a UserError naming the file (and row): a missing or extra case, a wrong shape, values that
        are not probabilities (:func:`groupdistil.teacher.probabilities_problem`), training inputs that would no
        longer match the saved probabilities (random augmentation). Nothing may be unpickled. The default refuses."""
        raise UserError(f"{source}: this pipeline cannot read teacher probabilities (pipeline '{self.name}'); give "
                        f"--teacher a teacher run folder, checkpoint or TorchScript file")

    # --- model ------------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def heads(self) -> dict[str, int]:
        """Heads of the model and their number of classes, e.g. ``{"seg": 4, "cls": 5}``."""

    @classmethod
    @abc.abstractmethod
    def build_model(cls, cfg: dict[str, Any]) -> nn.Module:
        """The model of a config whose sections are filled (:meth:`with_defaults`): its forward returns
        ``{head: logits}``. It depends on the config only, never on data."""

    @classmethod
    def model_for(cls, cfg: dict[str, Any]) -> nn.Module:
        """The model of a run config (teacher loading, export, the trainer), without reading any data; the config's
        values checked against :attr:`rules` first (a checkpoint's config has not been through a pipeline)."""
        cfg = cls.with_defaults(cfg)
        check_rules(cfg, "config", cls.rules)
        return cls.build_model(cfg)

    @classmethod
    def preprocessing(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """A description of the input preprocessing of a run config (written next to exported models); must hold
        ``input_shape`` (C, H, W) for export."""
        return {}

    # --- evaluation -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, predict: Predictor, split: str, out_dir: Path | None = None) -> dict[str, Any]:
        """Evaluate one model on ``split`` (``"val"`` or ``"test"``); every process evaluates its shard.

        Returns JSON-serialisable metrics with at least ``worst_group_metric`` (higher is better; model selection
        uses it on ``val``), ``average_metric`` and ``group_metric`` (``{group name: value}``, the per-group metric
        whose minimum is ``worst_group_metric``), and two entries the engine takes out: ``timing`` (seconds:
        ``infer_seconds_per_case``, a case being a volume for M&Ms and an image for Waterbirds; it goes to
        ``timing.json`` so ``metrics.json`` stays identical between identical runs) and, optionally, ``outputs``:
        the predicted class of every case in split order (int array), from which the engine computes the
        student's agreement with the teacher. When ``out_dir`` is given, per-case files are written there
        (atomically). The teacher's row is the engine's (:mod:`groupdistil.teacher`).
        """

    def recorded_outputs(self, run_dir: Path, split: str) -> Any:
        """The ``outputs`` (see :meth:`evaluate`) of a finished run's selected model as its per-case files hold
        them, or None when they are missing or do not fit this data (a teacher's recorded evaluation is then not
        used). Only read for a pipeline whose :meth:`evaluate` gives ``outputs``."""
        return None

    def add_teacher_outputs(self, out_dir: Path, split: str, outputs: Any) -> None:
        """Add the teacher's ``outputs`` (see :meth:`evaluate`) to the per-case files :meth:`evaluate` wrote into
        ``out_dir`` (main process only). Default: nothing."""

    def score_predictions(self, pred: Path, split: str, out_dir: Path) -> dict[str, Any]:
        """Score predictions made elsewhere (``groupdistil evaluate``) on ``split`` as :meth:`evaluate` scores a
        model's: the same per-case files in ``out_dir`` (atomically) and the same metrics, returned. Every missing,
        extra or malformed prediction is a UserError naming the file. Optional: the default refuses."""
        raise UserError(f"pipeline '{self.name}' cannot score predictions made elsewhere (groupdistil evaluate is "
                        f"not supported for it)")

    @abc.abstractmethod
    def write_report(self, run_dir: Path, metrics: dict[str, Any], info: dict[str, Any]) -> None:
        """Write ``report.md`` and ``report.html`` into ``run_dir`` from ``metrics`` (and ``info``: params, timings)."""

    # --- synthetic data ---------------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def synthesize(cls, out: Path, seed: int = 0, **options: Any) -> None:
        """Write a synthetic dataset in the real release's layout under ``out``."""


def evaluation_values(pipeline_cls: type[Pipeline], cfg: dict[str, Any]) -> dict[str, Any]:
    """The values of the pipeline's :attr:`~Pipeline.evaluation_keys` in a run config (defaults filled)."""
    cfg = pipeline_cls.with_defaults(cfg)
    return {key: lookup(cfg, key) for key in pipeline_cls.evaluation_keys}


def evaluated(pipeline: Pipeline, predict: Predictor, split: str,
              out_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """:meth:`Pipeline.evaluate` split into ``(metrics, timing, outputs)``: what goes to ``metrics.json``, to
    ``timing.json``, and the per-case outputs (None when the pipeline gives none)."""
    m = pipeline.evaluate(predict, split, out_dir=out_dir)
    return m, m.pop("timing", {}), m.pop("outputs", None)


def pipeline_names() -> list[str]:
    """The names of the installed pipelines (entry points of group ``groupdistil.pipelines``), without importing
    any of them."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def pipeline_classes() -> dict[str, type[Pipeline]]:
    """All installed pipelines by name (imports every pipeline package: prefer :func:`get_pipeline`)."""
    return {name: get_pipeline(name) for name in pipeline_names()}


@lru_cache(maxsize=None)
def get_pipeline(name: str) -> type[Pipeline]:
    """The pipeline class registered as ``name``; only that pipeline's package is imported."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    valid = ", ".join(pipeline_names()) or "none installed (pip install -e .)"
    raise UserError(f"unknown pipeline '{name}'; valid: {valid}")


SYNTH_MARKER = "SYNTHETIC_DATA.json"


def synthesize_data(pipeline_cls: type[Pipeline], out: Path, seed: int = 0, options: dict[str, Any] | None = None,
                    force: bool = False, source: str = "synth --option") -> None:
    """Write a synthetic data set into ``out`` (new or empty), or, with ``force``, replace one written here earlier.

    A folder with other content (a real release: its ``metadata.csv`` has the same name) is never written into. The
    data set is made in ``out/.synth.partial`` and moved into place at the end; ``out/SYNTHETIC_DATA.json`` says
    how it was made and whether it is complete, so an interrupted synthesis is recognised and redone.
    """
    import inspect
    import json
    import shutil

    options = dict(options or {})
    params = inspect.signature(pipeline_cls.synthesize).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n in params if n not in ("out", "seed")]
        for k in options:
            if k not in valid:
                raise UserError(f"{source} '{k}' is not an option of the {pipeline_cls.name} synthesiser; "
                                f"valid: {', '.join(valid) or '(none)'}")
    out = Path(out)
    marker = out / SYNTH_MARKER
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: not empty; synth writes only into a new or empty folder (use another --out, or "
                            f"--force to replace a synthetic data set written there earlier)")
        if not marker.is_file():
            raise UserError(f"{out}: --force replaces only a data set written by 'groupdistil synth' (no "
                            f"{SYNTH_MARKER} here); this folder is left as it is")
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    info = {"pipeline": pipeline_cls.name, "seed": seed, "options": options, "complete": False}
    marker.write_text(json.dumps(info, indent=1, default=str) + "\n")
    tmp = out / ".synth.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipeline_cls.synthesize(tmp, seed=seed, **options)
    except TypeError as e:  # an option of the wrong type deep in the synthesiser
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{source}: an option has a value of the wrong type ({e}); options: {options}") from None
    for p in tmp.iterdir():
        os.replace(p, out / p.name)
    tmp.rmdir()
    marker.write_text(json.dumps({**info, "complete": True}, indent=1, default=str) + "\n")


def synthetic_incomplete(root: Path) -> bool:
    """True when ``root`` holds a synthetic data set whose synthesis was interrupted."""
    import json

    marker = Path(root) / SYNTH_MARKER
    try:
        return marker.is_file() and not json.loads(marker.read_text()).get("complete", False)
    except (OSError, ValueError):
        return True
