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
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import UserError
from .teacher import TeacherRecord

ENTRY_POINT_GROUP = "groupdistil.pipelines"

Predictor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class GroupBreakdown:
    """Per-group test values of one finished run by structure (:meth:`Pipeline.group_breakdown`), for the
    comparison report's table per structure and group.

    ``values[group][column]`` (NaN when the run has none), ``n[group]`` the number of test units
    (:attr:`Pipeline.case_unit`) of each group; ``columns`` with ``higher_is_better`` and ``digits`` of each;
    ``grouping`` names the groups (``vendor``, ``centre``); ``note`` says how the values are computed."""

    grouping: str
    columns: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    digits: tuple[int, ...]
    values: dict[str, dict[str, float]]
    n: dict[str, int]
    note: str = ""


class Pipeline(abc.ABC):
    """One dataset: its data, its models, its evaluation and its report."""

    name: ClassVar[str]
    #: defaults of the pipeline's config sections: ``{"data": {...}, "model": {...}, "eval": {...}}``
    defaults: ClassVar[dict[str, dict[str, Any]]]
    #: glob patterns of the files and folders a run of this pipeline writes into RUN_DIR besides the engine's own
    #: (per-case tables, predictions, figures); ``run --force`` removes exactly these and the engine's
    run_outputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: dict[str, Any], data_root: Path) -> None:
        self.cfg = self.with_defaults(cfg)
        self.data_root = Path(data_root)

    @classmethod
    def with_defaults(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """``cfg`` with every pipeline section (``data``, ``model``, ``eval``) filled from :attr:`defaults`.

        A resolved run config already is; this lets a pipeline be built from a partial one (tests, notebooks). The
        one place where pipeline defaults are filled in: pipelines read ``self.cfg[section][key]`` directly.
        """
        return {**cfg, **{sec: {**vals, **(cfg.get(sec) or {})} for sec, vals in cls.defaults.items()}}

    # --- data -------------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def group_names(self) -> list[str]:
        """Names of the groups, in index order."""

    @property
    @abc.abstractmethod
    def train_group_counts(self) -> list[int]:
        """Number of training samples (as the training dataset counts them) of each group."""

    @abc.abstractmethod
    def train_dataset(self) -> Dataset:
        """The training set, indexed by ``(index, seed)`` keys; ``len()`` is the number of samples."""

    @abc.abstractmethod
    def train_groups(self) -> torch.Tensor:
        """Group index of every training sample, long ``(N,)`` (for group-balanced sampling)."""

    def class_names(self) -> list[str] | None:
        """Names of the classes of the ``cls`` head, for inferred groups within each class (None: not known)."""
        return None

    def train_cases(self) -> list[str]:
        """The case (subject, image) of every training sample, in dataset order: samples of one case are held out
        together (the ``heldout`` signal). Default: every sample its own case."""
        return [str(i) for i in range(sum(self.train_group_counts))]

    @abc.abstractmethod
    def train_is_random(self) -> bool:
        """True when training samples are randomly augmented (then teacher outputs cannot be cached)."""

    def fingerprint(self) -> str:
        """A short string that changes when the data changes (used to refuse resuming on other data)."""
        return ""

    def teacher_targets(self, source: Path) -> dict[str, torch.Tensor]:
        """A teacher made elsewhere, given as its saved probabilities (``--teacher SOURCE``): ``{head: p}`` with ``p``
        float ``(N, K[, H, W])`` the teacher's class probabilities of every training sample, in training-set order
        (index ``i`` is :meth:`train_dataset` sample ``i``, as the network input ``x`` is after preprocessing), for
        each head they cover. The engine distils ``log p`` as the teacher's logits through the teacher cache
        (:meth:`groupdistil.teacher.Teacher.from_probabilities`).

        Every problem is a UserError naming the file (and row): a missing or extra case, a wrong shape, values that
        are not probabilities (:func:`groupdistil.teacher.probabilities_problem`), training inputs that would no
        longer match the saved probabilities (random augmentation). Nothing may be unpickled. Optional: the default
        refuses."""
        raise UserError(f"{source}: this pipeline cannot read teacher probabilities (pipeline '{self.name}'); give "
                        f"--teacher a teacher run folder, checkpoint or TorchScript file")

    # --- models -----------------------------------------------------------------------------------------------
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
        """The model of a run config (teacher loading, export, the trainer), without reading any data."""
        return cls.build_model(cls.with_defaults(cfg))

    @classmethod
    def preprocessing(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """A description of the input preprocessing of a run config (written next to exported models); must hold
        ``input_shape`` (C, H, W) for export."""
        return {}

    @classmethod
    def metric_note(cls, cfg: dict[str, Any]) -> str:
        """One or two sentences saying what ``worst_group_metric`` and ``average_metric`` measure under ``cfg``
        (shown in comparison reports); "" for a generic sentence."""
        return ""

    #: what one score of :meth:`case_scores` stands for, named in the comparison reports ("n = subjects")
    case_unit: ClassVar[str] = "cases"

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
        vendor), for the comparison report; None (the default) when the pipeline has no structures: the comparison
        then shows its per-group metric only."""
        return None

    @classmethod
    def group_label(cls, group: str, cfg: dict[str, Any]) -> str:
        """How reports show a group of a run with config ``cfg`` (e.g. ``A (Siemens)`` for a vendor letter)."""
        return str(group)

    # --- evaluation -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, predict: Predictor, split: str, out_dir: Path | None = None,
                 teacher: Predictor | TeacherRecord | None = None) -> dict[str, Any]:
        """Evaluate on ``split`` (``"val"`` or ``"test"``).

        Returns JSON-serialisable metrics with at least ``worst_group_metric`` (higher is better; model selection
        uses it on ``val``), ``average_metric`` and ``group_metric`` (``{group name: value}``, the per-group metric
        whose minimum is ``worst_group_metric``). An optional ``timing`` entry (seconds:
        ``infer_seconds_per_case`` and ``teacher_infer_seconds_per_case``, a case being a volume for M&Ms and an
        image for Waterbirds) is moved by the trainer into ``timing.json`` and the report's ``info``, so
        ``metrics.json`` stays identical between identical runs. When ``out_dir`` is given, per-case files are
        written there
        (atomically). ``teacher``, when given, is evaluated alongside where the pipeline reports it; a
        :class:`~groupdistil.teacher.TeacherRecord` (only given to a pipeline whose :meth:`load_teacher_record`
        accepted it) is the teacher's recorded evaluation on this data with these settings, reported instead of
        running the teacher, with the same content (its ``metrics[split]`` under ``teacher``, its
        ``infer_seconds_per_case`` as ``teacher_infer_seconds_per_case``).
        """

    @classmethod
    def evaluation_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """What a model's evaluation depends on in a run config besides its weights (which cases, groups and metrics,
        how inference runs): a student whose value equals its teacher run's, on the same data, reports the
        teacher's recorded evaluation (:meth:`load_teacher_record`). Default: the ``data`` and ``eval`` sections."""
        cfg = cls.with_defaults(cfg)
        return {"data": cfg.get("data"), "eval": cfg.get("eval")}

    def load_teacher_record(self, record: TeacherRecord) -> TeacherRecord | None:
        """Accept a teacher's recorded evaluation (checked by the engine: same data, same :meth:`evaluation_config`,
        same device and precision), completed with whatever else :meth:`evaluate` reads from the teacher's folder
        (``record.cases``); None keeps evaluating the teacher by running it. Default: None (not supported)."""
        return None

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
