"""The frozen teacher: a model run under inference mode, optionally cached (loading: :mod:`groupdistil.checkpoint`),
or a teacher made elsewhere given only as its saved probabilities on the training set; and a teacher's final
evaluation recorded in its run folder (:func:`recorded_evaluation`), which a student run reports instead of
evaluating the teacher again when it was made on the same data with the same settings.

Saved probabilities (``--teacher FOLDER``, read by the pipeline's
:meth:`~groupdistil.pipeline.Pipeline.teacher_targets`) become the cache directly: the KD term receives
``log max(p, PROB_FLOOR)`` as the teacher's logits. Since ``softmax(log p) = p`` and softmax ignores a constant added
over the classes, ``softmax(log p / tau) = p^(1/tau) / sum_k p_k^(1/tau)``: when ``p = softmax(z)`` (a network's
probabilities) this equals ``softmax(z / tau)``, so ``loss.tau`` means exactly what it means with the teacher's
logits (up to the floor and the storage precision of the files).
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

#: smallest probability before the logarithm: ``log(PROB_FLOOR)`` (about -13.8) stands for ``log 0`` (a one-hot
#: target), finite, and exact enough in float16
PROB_FLOOR = 1e-6
#: largest distance from 1 of the sum of a position's saved probabilities over the classes (float16 storage of the
#: files, interpolation)
PROB_SUM_ATOL = 1e-2


class Teacher:
    """Callable ``batch -> {head: logits}`` running a frozen model under inference mode, or reading its cache.

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
        keys = [[(i, 0) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
        loader = DataLoader(dataset, batch_sampler=keys, num_workers=num_workers)
        cache: dict[str, Tensor] = {}
        for batch in loader:
            x = batch["x"].to(device, non_blocking=True)
            idx = batch["index"].to(device)
            out = self._forward(x)
            for h, t in out.items():
                if h not in cache:
                    cache[h] = torch.empty((n, *t.shape[1:]), dtype=dtype, device=device)
                cache[h][idx] = t.to(dtype)
        self.cache = cache


# --- teachers given as saved probabilities ---------------------------------------------------------------------
def is_probabilities_source(path: str | Path) -> bool:
    """True when ``--teacher PATH`` names saved probabilities rather than a model: a folder that is not a run folder
    (neither ``config.yaml`` nor ``checkpoints/`` in it), or a ``.csv`` / ``.npz`` file."""
    p = Path(path)
    if p.is_dir():
        return not ((p / "config.yaml").exists() or (p / "checkpoints").exists())
    return p.is_file() and p.suffix.lower() in (".csv", ".npz")


def probabilities_identity(path: str | Path) -> str:
    """``probabilities-<16 hex>``: a SHA-256 over the relative path and content of every file of the folder (hidden
    ones excepted; nothing is parsed), or of the file: what a run records as its teacher, so that changed files are
    never taken for the same teacher."""
    p = Path(path)
    digest = hashlib.sha256()
    files = [p] if p.is_file() else sorted(
        Path(d) / f for d, dirs, names in os.walk(p) for f in names
        if not f.startswith(".") and not any(part.startswith(".") for part in Path(d).relative_to(p).parts))
    for f in files:
        digest.update(f"{f.relative_to(p).as_posix() if f != p else f.name}\n".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return f"probabilities-{digest.hexdigest()[:16]}"


def probabilities_problem(p: np.ndarray, axes: str = "", class_axis: int = 0) -> str:
    """Why ``p`` is not a probability distribution over ``class_axis`` at every position ("" when it is): every
    value finite and in [0, 1], each position's sum over the classes within ``PROB_SUM_ATOL`` of 1. The first bad
    position is named by its index, described by ``axes`` (e.g. ``"(class, z, y, x)"``)."""
    p = np.asarray(p)
    where = f" {axes}" if axes else ""
    finite = np.isfinite(p)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        return f"{int((~finite).sum())} non-finite probabilities (NaN/Inf), the first at{where} {first}"
    inside = (p >= 0) & (p <= 1)
    if not inside.all():
        first = tuple(int(i) for i in np.argwhere(~inside)[0])
        return (f"{int((~inside).sum())} values outside [0, 1] (min {float(p.min()):.4g}, max {float(p.max()):.4g}), "
                f"the first at{where} {first}")
    off = np.abs(p.sum(axis=class_axis, dtype=np.float64) - 1.0)
    if not (off <= PROB_SUM_ATOL).all():
        first = tuple(int(i) for i in np.argwhere(off > PROB_SUM_ATOL)[0])
        return (f"the probabilities do not sum to 1 over the classes (off by up to {float(off.max()):.3g}, tolerance "
                f"{PROB_SUM_ATOL:g}; the first such position without the class axis: {first})")
    return ""


#: the splits of a run's final evaluation
SPLITS = ("val", "test")


@dataclass(frozen=True)
class TeacherRecord:
    """A teacher's final evaluation as its own run recorded it, valid for a student run's data and settings.

    ``metrics[split]`` is the teacher run's ``metrics.json[split]`` (the evaluation of its selected model, the one a
    student distils) without teacher entries of its own: what ``Pipeline.evaluate(..., teacher=predictor)`` returns
    under ``"teacher"``. ``timing[split]`` is its ``timing.json[split]``. ``cases[split]``: per-case outputs a
    pipeline read from the folder (:meth:`Pipeline.load_teacher_record`), e.g. the teacher's predictions.
    """

    run_dir: Path
    metrics: dict[str, dict[str, Any]]
    timing: dict[str, dict[str, Any]]
    cases: dict[str, Any] = field(default_factory=dict)

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
