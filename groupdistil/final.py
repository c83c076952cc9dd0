"""The end of a run: the selected and the last model evaluated on val and test (every rank, sharded), the teacher's
row beside the student's, then (main process) ``timing.json``, the pipeline's report and, last, ``metrics.json``,
whose presence marks a finished run."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import distributed as dist_utils
from .checkpoint import load_checkpoint
from .io import atomic_write_json
from .pipeline import Pipeline, evaluated
from .progress import log
from .runtime import Predictor, Runtime, count_params, machine_state
from .teacher import SPLITS, TeacherSource

if TYPE_CHECKING:
    from .trainer import Training


def evaluate_with_teacher(pipeline: Pipeline, runtime: Runtime, predict: Predictor, split: str,
                          out_dir: Path | None, teacher: TeacherSource | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, timing)`` of one model on ``split`` with the teacher's evaluation under ``"teacher"`` (and the
    student's agreement with it, for a pipeline whose evaluation gives per-case ``outputs``)."""
    m, timing, outputs = evaluated(pipeline, predict, split, out_dir)
    theirs = teacher.evaluate(pipeline, runtime, split) if teacher is not None else None
    if theirs is not None:
        m["teacher"] = theirs.metrics
        timing["teacher_infer_seconds_per_case"] = theirs.seconds_per_case
        if outputs is not None and theirs.outputs is not None:
            m["teacher_agreement"] = float((np.asarray(outputs) == np.asarray(theirs.outputs)).mean())
            if out_dir is not None and dist_utils.is_main():
                pipeline.add_teacher_outputs(out_dir, split, theirs.outputs)
    return m, timing


def final_evaluation(tr: Training, step: int, train_seconds: float) -> dict[str, Any]:
    """Evaluate the last and the selected model of a finished loop; write timing, report and metrics."""
    cfg, pipeline, runtime, teacher = tr.trainer.cfg, tr.trainer.pipeline, tr.runtime, tr.teacher
    t0 = time.time()
    best_state = dist_utils.broadcast_object(
        load_checkpoint(tr.run_dir / "checkpoints" / "best.pt") if tr.main else None)
    selected = copy.deepcopy(tr.student)
    selected.load_state_dict(best_state["model"])
    metrics: dict[str, Any] = {"selected_step": int(best_state["step"]), "groups": cfg["groups"],
                               "train_groups": tr.group_names, "train_group_counts": tr.counts,
                               "unseen_groups": [g for g, n in zip(tr.group_names, tr.counts) if not n]}
    if tr.inferred is not None:
        metrics["grouping"] = tr.inferred.info
    timing: dict[str, Any] = {"train_seconds": train_seconds}
    last: dict[str, Any] = {"step": step}
    for split in SPLITS:
        metrics[split], timing[split] = evaluate_with_teacher(pipeline, runtime, runtime.predictor(selected), split,
                                                              tr.run_dir, teacher)
        if metrics["selected_step"] == step:  # the same weights: no second evaluation
            last[split] = {k: v for k, v in metrics[split].items() if not k.startswith("teacher")}
        else:
            last[split] = evaluated(pipeline, runtime.predictor(tr.student), split)[0]
    metrics["last"] = last
    timing["eval_seconds"] = time.time() - t0
    if teacher is not None and teacher.record is not None:  # the teacher's figures and time are its run's own
        timing["teacher_evaluation_from"] = str(teacher.record.run_dir)
    timing["machine"] = machine_state(tr.load_at_start, runtime)
    if tr.main:
        model = teacher.model if teacher is not None else None
        info = {"method": cfg["method"], "seed": cfg["seed"], "params": count_params(tr.student),
                **({"teacher": cfg["run"]["teacher"]} if teacher is not None and model is None else {}),
                "teacher_params": count_params(model) if model is not None else None,
                "train_seconds": train_seconds, **timing.get("test", {})}
        atomic_write_json(tr.run_dir / "timing.json", {**timing, "params": info["params"],
                                                       "teacher_params": info["teacher_params"]})
        info["machine"] = timing["machine"]
        pipeline.write_report(tr.run_dir, metrics, info)
        if tr.tracker is not None:
            tr.tracker.figures(tr.run_dir, step)
            tr.tracker.close()
        atomic_write_json(tr.run_dir / "metrics.json", metrics)  # last: its presence marks a finished run
        log(f"done: selected step {metrics['selected_step']}, test worst-group "
            f"{metrics['test']['worst_group_metric']:.4f}, average {metrics['test']['average_metric']:.4f}; "
            f"{tr.run_dir}/metrics.json")
    dist_utils.barrier()
    return metrics
