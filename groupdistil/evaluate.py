"""``groupdistil evaluate``: score predictions made elsewhere with the conventions of a run's evaluation.

    groupdistil evaluate --pred PRED --data-root DIR --out OUT [--split test|val] [--config CONFIG.yaml] [--debug]

``PRED`` is what the pipeline scores (:meth:`groupdistil.pipeline.Pipeline.score_predictions`): for M&Ms a folder
of label maps (a run's ``predictions/``, or nnU-Net's output folder), for Waterbirds a CSV with ``img_id`` and
``prediction``. The config (data settings: splits, groups) is ``--config`` (a ``configs/*.yaml`` or a run's
``config.yaml``), else the ``config.yaml`` of the run folder holding ``PRED``, else the defaults of the one
installed pipeline that reads ``--data-root``.

OUT receives what a run's final evaluation writes for that split (the pipeline's per-case files), the report
(``report.md``, ``report.html``) and, last, ``metrics.json``: ``{"evaluated": {predictions, data_root, split, config,
pipeline}, "groups": [...], "<split>": EVAL}``. OUT is locked for the whole command (one writer); it must be new,
empty or an earlier evaluation's folder (whose outputs are replaced only when the new evaluation succeeds: it is
made in ``OUT/.evaluate.partial`` first), and may not hold PRED nor lie inside it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .config import ENGINE_DEFAULTS, deep_merge, load_yaml, resolve_config
from .errors import UserError
from .io import atomic_write_json
from .pipeline import Pipeline, get_pipeline, pipeline_names
from .rundir import LOCK_NAME, FolderLock, remove_orphan_temporaries, remove_outputs

#: what evaluate writes besides the pipeline's ``run_outputs``
OUTPUTS = ("metrics.json", "report.md", "report.html")
SPLITS = ("val", "test")
#: where the outputs are made before they replace an earlier evaluation's (a failed one leaves those as they were)
PARTIAL = ".evaluate.partial"


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def resolve(config: str | Path | None, pred: Path, data_root: Path) -> tuple[dict[str, Any], str]:
    """The config to score with and where it came from (see the module docstring)."""
    if config is not None:
        return resolve_config(config), str(config)
    run_config = pred.parent / "config.yaml"
    if run_config.is_file() and load_yaml(run_config).get("pipeline"):
        note(f"--config not given: using the config of the run folder holding the predictions ({run_config})")
        return resolve_config(run_config), str(run_config)
    readers, why = [], []
    for name in pipeline_names():
        cls = get_pipeline(name)
        try:
            _ = cls(cls.with_defaults({"pipeline": name}), data_root).group_names
            readers.append(name)
        except UserError as e:
            why.append(f"{name}: {e}")
    if len(readers) != 1:
        found = (f"several pipelines read it ({', '.join(readers)})" if readers
                 else f"no pipeline reads it ({'; '.join(why)})")
        raise UserError(f"{data_root}: {found}; give --config CONFIG.yaml")
    note(f"--config not given: scoring with the defaults of the {readers[0]} pipeline (the one that reads "
         f"{data_root}); give --config for other data settings (splits, groups)")
    return deep_merge(ENGINE_DEFAULTS, {"pipeline": readers[0]}), f"defaults of the {readers[0]} pipeline"


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_out(out: Path, pred: Path, pipeline_cls: type[Pipeline]) -> tuple[str, ...]:
    """The patterns of what evaluate writes into ``out``; refuses an ``out`` that is not new, empty or an earlier
    evaluation's folder, or that holds (or lies inside) the predictions."""
    if _inside(pred, out) or _inside(out, pred):
        raise UserError(f"{out}: --out may not hold the predictions ({pred}) nor lie inside them; use another --out")
    patterns = (*OUTPUTS, *pipeline_cls.run_outputs)
    if not out.exists():
        return patterns
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    ours = {p.name for pat in patterns for p in out.glob(pat)} | {LOCK_NAME}
    other = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
    if other or (out / "config.yaml").exists():
        raise UserError(f"{out}: not empty and not an evaluation folder (holds {', '.join(other[:3])}"
                        f"{', ...' if len(other) > 3 else ''}); use a new --out (a run folder is never written into)")
    return patterns


def evaluate_predictions(pred: str | Path, data_root: str | Path, out: str | Path, split: str = "test",
                         config: str | Path | None = None) -> dict[str, Any]:
    """Score ``pred`` on ``split`` of ``data_root`` into ``out``; returns the metrics written to metrics.json."""
    pred, data_root, out = Path(pred).resolve(), Path(data_root), Path(out).resolve()
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    if not pred.exists():
        raise UserError(f"{pred}: predictions not found")
    if not data_root.exists():
        raise UserError(f"{data_root}: data root does not exist")
    cfg, source = resolve(config, pred, data_root)
    pipeline_cls = get_pipeline(cfg["pipeline"])
    patterns = check_out(out, pred, pipeline_cls)
    with FolderLock(out, "evaluation") as lock:
        check_out(out, pred, pipeline_cls)  # again, now that no other process can write here
        work = out / PARTIAL
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            pipeline = pipeline_cls(cfg, data_root)
            result = pipeline.score_predictions(pred, split, work)
        except UserError:
            shutil.rmtree(work, ignore_errors=True)
            lock.remove_if_empty()
            raise
        evaluated = {"predictions": str(pred), "data_root": str(data_root.resolve()), "split": split,
                     "config": source, "pipeline": pipeline_cls.name}
        metrics = {"evaluated": evaluated, "groups": list(pipeline.group_names), split: result}
        pipeline.write_report(work, metrics, {**evaluated, **{k: v for k, v in result.items() if k == "naming"}})
        remove_outputs(out, patterns)  # an earlier evaluation's files go only once this one has succeeded
        remove_orphan_temporaries(out)
        for p in sorted(work.iterdir()):
            os.replace(p, out / p.name)
        work.rmdir()
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


def cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_predictions(args.pred, args.data_root, args.out, args.split, args.config)
    ev = metrics[args.split]
    print(f"scored {args.pred} ({args.split}): worst group {ev.get('worst_group')} {ev['worst_group_metric']:.4f}, "
          f"average {ev['average_metric']:.4f}; report: {Path(args.out) / 'report.html'}")
    return 0
