"""The teacher as one object (:class:`TeacherSource`): opened from a run folder, a checkpoint, a TorchScript file or
saved probabilities; checked against the run; distilled online, from a cache or from its probabilities
(:class:`Teacher`); run once over a training set (:func:`in_order`); and evaluated at the end of a student run, or its
recorded evaluation reused (:func:`recorded_evaluation`) when it was made on the same data with the same settings.

Saved probabilities (read by the pipeline's :meth:`~groupdistil.pipeline.Pipeline.teacher_targets`) become the
cache directly: the KD term receives ``log max(p, PROB_FLOOR)`` as the teacher's logits. Since ``softmax(log p) = p``
and softmax ignores a constant added over the classes, ``softmax(log p / tau) = p^(1/tau) / sum_k p_k^(1/tau)``: when
``p = softmax(z)`` this equals ``softmax(z / tau)``, so ``loss.tau`` means exactly what it means with the teacher's
logits (up to the floor and the storage precision of the files).
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import load_model_from_checkpoint, resolve_checkpoint
from .errors import UserError
# the probability helpers are part of this module's interface (pipelines and tests import them from here)
from .probabilities import (PROB_FLOOR, PROB_SUM_ATOL, is_probabilities_source, probabilities_identity,  # noqa: F401
                            probabilities_problem)
from .pipeline import Pipeline, evaluated, evaluation_values
from .progress import log


def in_order(dataset: Dataset, batch_size: int, device: torch.device,
             num_workers: int = 0) -> Iterator[dict[str, Tensor]]:
    """Every sample of a training set once, in index order and without augmentation (keys ``(index, 0)``), as
    batches on ``device``: the one pass over the training set for the teacher cache, inferred groups and
    per-sample weights."""
    n = len(dataset)  # type: ignore[arg-type]
    keys = [[(i, 0) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    for b in DataLoader(dataset, batch_sampler=keys, num_workers=num_workers):
        yield {k: v.to(device, non_blocking=True) for k, v in b.items()}


class Teacher:
    """The distillation callable ``batch -> {head: logits}``: a frozen model run under inference mode, or its cache.

    The returned tensors are ordinary tensors (cloned out of inference mode) so the KD term can use them in the
    autograd graph of the student. A teacher given as saved probabilities (:meth:`from_probabilities`) has no model:
    its cache is all it has.
    """

    def __init__(self, model: nn.Module | None, autocast: Callable[[], Any]) -> None:
        self.model = model.eval().requires_grad_(False) if model is not None else None
        self.autocast = autocast
        self.cache: dict[str, Tensor] | None = None

    @classmethod
    def from_probabilities(cls, targets: dict[str, Tensor], device: torch.device,
                           dtype: torch.dtype = torch.float16) -> Teacher:
        """A teacher without a model whose cache holds ``log max(p, PROB_FLOOR)`` of each head's probabilities
        ``(N, K[, H, W])`` (training-set order), as its logits (see the module docstring for what ``tau`` does)."""
        teacher = cls(None, nullcontext)
        teacher.cache = {h: torch.log(p.float().clamp_min(PROB_FLOOR)).to(device=device, dtype=dtype)
                         for h, p in targets.items()}
        return teacher

    @torch.inference_mode()
    def _forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.model is None:
            raise RuntimeError("a teacher given as saved probabilities has no model to run")
        with self.autocast():
            return self.model(x)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.cache is not None:
            idx = batch["index"]
            return {h: t[idx].float() for h, t in self.cache.items()}
        return {h: t.clone() for h, t in self._forward(batch["x"]).items()}

    def build_cache(self, dataset: Dataset, device: torch.device, batch_size: int, num_workers: int = 0,
                    dtype: torch.dtype = torch.float16) -> None:
        """Run the teacher once over the (deterministic) training set and keep its logits on ``device``.

        The cache lives in memory for this run only, so a different teacher or data can never hit it.
        """
        n = len(dataset)  # type: ignore[arg-type]
        cache: dict[str, Tensor] = {}
        for batch in in_order(dataset, batch_size, device, num_workers):
            for h, t in self._forward(batch["x"]).items():
                if h not in cache:
                    cache[h] = torch.empty((n, *t.shape[1:]), dtype=dtype, device=device)
                cache[h][batch["index"]] = t.to(dtype)
        self.cache = cache


#: the splits of a run's final evaluation
SPLITS = ("val", "test")


@dataclass(frozen=True)
class TeacherRecord:
    """A teacher's final evaluation as its own run recorded it, valid for a student run's data and settings.

    ``metrics[split]`` is the teacher run's ``metrics.json[split]`` (the evaluation of its selected model, the one a
    student distils) without teacher entries of its own: what ``Pipeline.evaluate`` of the teacher returns.
    ``timing[split]`` is its ``timing.json[split]``; ``outputs[split]`` its per-case outputs as the pipeline reads
    them from the folder (:meth:`Pipeline.recorded_outputs`), None for a pipeline without outputs.
    """

    run_dir: Path
    metrics: dict[str, dict[str, Any]]
    timing: dict[str, dict[str, Any]]
    outputs: dict[str, Any] = field(default_factory=dict)

    def seconds_per_case(self, split: str) -> float | None:
        """The teacher's ``infer_seconds_per_case`` on ``split`` as its run measured it."""
        return self.timing.get(split, {}).get("infer_seconds_per_case")


def recorded_evaluation(checkpoint: Path, run_hash: str | None, step: int | None, cfg: dict[str, Any],
                        evaluation_config: Callable[[dict[str, Any]], dict[str, Any]],
                        where: dict[str, Any]) -> tuple[TeacherRecord | None, str]:
    """The teacher's recorded final evaluation when it holds for a student run (config ``cfg``), else None; and why
    (one phrase).

    It holds when ``checkpoint`` (of config hash ``run_hash``, saved at ``step``) is ``RUN/checkpoints/best.pt`` of
    a finished run (``metrics.json`` with val and test) whose ``config.yaml`` has that hash and whose selected step
    is ``step``, made on the same data (``run.data_fingerprint`` equal and known), with equal ``evaluation_config``
    (the pipeline's data and evaluation settings), on the same device and precision (``where``: ``{"device",
    "precision"}``, as ``timing.json["machine"]`` records them).
    """
    import yaml

    from .config import config_hash

    ck_path = Path(checkpoint)
    run_dir = ck_path.parent.parent
    if ck_path.name != "best.pt" or ck_path.parent.name != "checkpoints":
        return None, "not the best.pt of a run folder"
    files = {name: run_dir / name for name in ("metrics.json", "config.yaml", "timing.json")}
    missing = [name for name, p in files.items() if not p.is_file()]
    if missing:
        return None, f"no {', '.join(missing)} in {run_dir}"
    try:
        metrics, timing = (json.loads(files[n].read_text()) for n in ("metrics.json", "timing.json"))
        teacher_cfg = yaml.safe_load(files["config.yaml"].read_text()) or {}
    except Exception as e:  # noqa: BLE001 - an unreadable record is only not used
        return None, f"its files do not read ({type(e).__name__})"
    if not all(isinstance(d, dict) for d in (metrics, timing, teacher_cfg)):
        return None, "its files do not hold what a run writes"
    fingerprint = (cfg.get("run") or {}).get("data_fingerprint")
    if config_hash(teacher_cfg, exclude=()) != run_hash:
        return None, f"{files['config.yaml']} is not the checkpoint's config"
    if metrics.get("selected_step") != step or not all(isinstance(metrics.get(s), dict) for s in SPLITS):
        return None, f"{files['metrics.json']} is not the evaluation of the checkpoint's step"
    if not fingerprint or (teacher_cfg.get("run") or {}).get("data_fingerprint") != fingerprint:
        return None, "made on other data (data fingerprint)"
    if evaluation_config(teacher_cfg) != evaluation_config(cfg):
        return None, "made with other data or evaluation settings"
    machine = timing.get("machine") or {}
    if any(machine.get(k) != v for k, v in where.items()):
        return None, (f"made on {machine.get('device', 'an unrecorded device')} in "
                      f"{machine.get('precision', 'an unrecorded precision')}")
    own = {s: {k: v for k, v in metrics[s].items() if not k.startswith("teacher")} for s in SPLITS}
    return TeacherRecord(run_dir, own, {s: timing.get(s) or {} for s in SPLITS}), "same data and settings"


@dataclass(frozen=True)
class TeacherEvaluation:
    """The teacher's evaluation on one split: what ``Pipeline.evaluate`` returns for it (without ``timing`` and
    ``outputs``), its inference seconds per case and its per-case ``outputs`` (None when the pipeline has none)."""

    metrics: dict[str, Any]
    seconds_per_case: float | None
    outputs: Any = None


class TeacherSource:
    """The teacher of one run, whatever it was given as: a run folder, a checkpoint or a TorchScript file (a model,
    kept on the CPU until :meth:`to`), or saved probabilities (no model).

    ``run_hash`` and ``step`` identify it by content (:attr:`identity`), so a moved or copied teacher is the same
    teacher; ``record`` is its recorded evaluation once :meth:`use_record` found one that holds for the run.
    """

    def __init__(self, path: str, run_hash: str | None, step: int | None, model: nn.Module | None) -> None:
        self.path, self.run_hash, self.step, self.model = str(path), run_hash, step, model
        self.record: TeacherRecord | None = None

    @property
    def identity(self) -> str:
        """What a run records as its teacher (``run.teacher``): ``<run hash>@step<step>``."""
        return f"{self.run_hash}@step{self.step}"

    @classmethod
    def open(cls, path: str, pipeline_cls: Any, cfg: dict[str, Any]) -> TeacherSource:
        """Open (and so check) the teacher ``--teacher PATH`` names, before anything of the run is written; what a
        teacher of saved probabilities cannot do under ``cfg`` is refused here."""
        if not is_probabilities_source(path):
            model, ck = load_model_from_checkpoint(path, pipeline_cls)
            return cls(path, ck.get("run_hash"), ck.get("step"), model)
        mode, cache = cfg["grouping"]["mode"], cfg["train"]["teacher_cache"]
        if mode != "labels":
            raise UserError(f"{path}: grouping.mode '{mode}' infers the groups from a teacher model, and a teacher "
                            f"given as saved probabilities has none; use grouping.mode: labels, or a teacher run "
                            f"folder, checkpoint or TorchScript file")
        if cache != "auto":
            raise UserError(f"{path}: train.teacher_cache: {cache} cannot be used with a teacher given as saved "
                            f"probabilities (they are the teacher cache); set train.teacher_cache: auto")
        return cls(path, probabilities_identity(path), 0, None)

    def check(self, pipeline: Any, cfg: dict[str, Any]) -> None:
        """A teacher model must give logits of the same number of classes for every head the student is trained on
        (its probabilities are checked when they are read: :meth:`distiller`)."""
        shape = pipeline.preprocessing(cfg).get("input_shape")
        if self.model is None or not shape:
            return
        with torch.inference_mode():
            out = self.model.eval()(torch.zeros(1, *shape))
        for head in cfg["loss"]["heads"] or pipeline.heads:
            want = pipeline.heads.get(head)
            got = out[head].shape[1] if head in out else None
            if got != want:
                have = {h: int(t.shape[1]) for h, t in out.items()}
                raise UserError(f"{self.path}: the teacher's heads {have} do not match this run's "
                                f"{dict(pipeline.heads)} (head '{head}': {got} vs {want} classes; was it trained "
                                f"with other data.classes or model settings?)")

    def to(self, device: torch.device, channels_last: bool) -> None:
        """Move the model to the run's device (channels_last on CUDA when the run asks for it)."""
        if self.model is not None:
            self.model = self.model.to(device)
            if device.type == "cuda" and channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)

    def distiller(self, pipeline: Any, dataset: Dataset, runtime: Any, cfg: dict[str, Any]) -> Teacher:
        """The KD term's teacher: the model run online, or cached once over the (deterministic) training set with
        ``train.teacher_cache: auto``, or the saved probabilities (checked against this run's heads and sizes)."""
        t, device = cfg["train"], runtime.device
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        t0 = time.time()
        if self.model is None:
            return Teacher.from_probabilities(self._probabilities(pipeline, len(dataset), cfg), device, dtype)
        teacher = Teacher(self.model, runtime.autocast)
        if t["teacher_cache"] == "auto" and not pipeline.train_is_random():
            teacher.build_cache(dataset, device, t["batch_size"], t["num_workers"], dtype)
            log(f"teacher outputs cached for {len(dataset)} training samples in {time.time() - t0:.1f}s")
        return teacher

    def _probabilities(self, pipeline: Any, n: int, cfg: dict[str, Any]) -> dict[str, Tensor]:
        t0 = time.time()
        targets = pipeline.teacher_targets(Path(self.path))
        used = cfg["loss"]["heads"] or pipeline.heads
        for head in used:
            want, p = pipeline.heads.get(head), targets.get(head)
            if p is None or p.dim() < 2 or int(p.shape[1]) != want or int(p.shape[0]) != n:
                got = "none" if p is None else f"shape {tuple(p.shape)}"
                raise UserError(f"{self.path}: the saved probabilities cover heads {sorted(targets)}, this run "
                                f"distils {sorted(used)} (head '{head}': {got}, expected ({n}, {want}, ...): "
                                f"{n} training samples, {want} classes); for a model with more heads than the "
                                f"probabilities give, set loss.heads to those they give")
        log(f"teacher probabilities read from {self.path} for {n} training samples in {time.time() - t0:.1f}s "
            f"(no teacher model: the teacher is not evaluated)")
        return {h: targets[h] for h in used}

    def use_record(self, pipeline: Any, cfg: dict[str, Any], runtime: Any) -> None:
        """Take the teacher run's recorded val/test evaluation when it holds for this run (:func:`recorded_evaluation`;
        a pipeline with per-case ``outputs`` must also read them from the teacher's folder): the final evaluation
        then reports it instead of running the teacher again."""
        if self.model is None:
            return
        ck_path = resolve_checkpoint(self.path)
        where = {"device": runtime.device.type, "precision": runtime.precision}
        record, why = recorded_evaluation(ck_path, self.run_hash, self.step, cfg,
                                          lambda c: evaluation_values(type(pipeline), c), where)
        if record is not None and type(pipeline).recorded_outputs is not Pipeline.recorded_outputs:
            outputs = {s: pipeline.recorded_outputs(record.run_dir, s) for s in SPLITS}
            record = None if any(o is None for o in outputs.values()) else replace(record, outputs=outputs)
            why = why if record is not None else f"the {pipeline.name} pipeline cannot read its per-case outputs"
        if record is not None:
            log(f"teacher: its val and test evaluation is taken from {record.run_dir}/metrics.json ({why}), "
                f"not run again")
        elif ck_path.name == "best.pt":
            log(f"teacher: evaluated again at the end of the run (its recorded evaluation: {why})")
        self.record = record

    def evaluate(self, pipeline: Any, runtime: Any, split: str) -> TeacherEvaluation | None:
        """The teacher's evaluation on ``split``: recorded, or computed by the pipeline (None: probabilities)."""
        if self.record is not None:
            return TeacherEvaluation(self.record.metrics[split], self.record.seconds_per_case(split),
                                     self.record.outputs.get(split))
        if self.model is None:
            return None
        m, timing, outputs = evaluated(pipeline, runtime.predictor(self.model), split)
        return TeacherEvaluation(m, timing.get("infer_seconds_per_case"), outputs)
