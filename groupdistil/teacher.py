"""The frozen teacher: a model run under inference mode, optionally cached (loading: :mod:`groupdistil.checkpoint`);
and a teacher's final evaluation recorded in its run folder (:func:`recorded_evaluation`), which a student run
reports instead of evaluating the teacher again when it was made on the same data with the same settings."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


class Teacher:
    """Callable ``batch -> {head: logits}`` running a frozen model under inference mode.

    The returned tensors are ordinary tensors (cloned out of inference mode) so the KD term can use them in the
    autograd graph of the student.
    """

    def __init__(self, model: nn.Module, autocast: Callable[[], Any]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.autocast = autocast
        self.cache: dict[str, Tensor] | None = None

    @torch.inference_mode()
    def _forward(self, x: Tensor) -> dict[str, Tensor]:
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
