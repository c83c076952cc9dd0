"""Running a comparison: synthesise missing data, train every run of the plan in order, write the outputs.

:func:`run_comparison` is the entry point (``groupdistil compare``); it holds the comparison folder's lock while it
trains and writes, so two commands never write into the same folder.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from ..config import load_yaml
from ..errors import UserError
from ..pipeline import Pipeline, get_pipeline, synthesize_data, synthetic_incomplete
from ..rundir import FolderLock
from .plan import RunSpec, plan_runs
from .report import Writer
from .schema import Experiment, load_experiment
from .summary import WORST, read_results


def say(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def prepare_data(exp: Experiment, root: Path, level: dict[str, Any], pipeline_cls: type[Pipeline]) -> None:
    """Synthesise a missing data root (always for a data-sweep level); an interrupted synthesis is redone."""
    if root.exists() and not synthetic_incomplete(root):
        return
    if not (level or exp.synthesize_if_missing):
        raise UserError(f"{root}: data root does not exist (set data.synthesize_if_missing: true in {exp.path}, "
                        f"or make one with 'groupdistil synth {pipeline_cls.name} --out {root}')")
    options = {**exp.data_options, **level}
    say(f"synthesising {pipeline_cls.name} data into {root} (seed {exp.data_seed}, options {options})")
    synthesize_data(pipeline_cls, root, exp.data_seed, options, force=True, source=f"{exp.path}: data option")


def train_all(exp: Experiment, specs: list[RunSpec], pipeline_cls: type[Pipeline], out: Path) -> None:
    """Train (or skip, or resume) every run in order, one progress line per run."""
    from ..runtime import setup_process
    from ..trainer import Trainer

    t_all = time.time()
    ready: set[Path] = set()
    trained: list[float] = []  # seconds of each run trained (or resumed) by this call, for the ETA
    for i, spec in enumerate(specs, 1):
        if spec.data_root not in ready:
            prepare_data(exp, spec.data_root, spec.level, pipeline_cls)
            ready.add(spec.data_root)
        tag = f"[{i}/{len(specs)}] {spec.run_dir.relative_to(out)}"
        if not (spec.run_dir / "metrics.json").exists():
            say(f"{tag}: started")
        t0 = time.time()
        teacher = str(spec.teacher_dir) if spec.teacher_dir is not None else None
        setup_process(spec.cfg["train"])  # threads and deterministic kernels of this run
        try:
            metrics = Trainer(copy.deepcopy(spec.cfg), pipeline_cls, spec.data_root, spec.run_dir, teacher).run()
        except UserError as e:
            raise UserError(f"{tag}: {e} (in a comparison: delete that run folder to retrain it)") from None
        if metrics is None:
            say(f"{tag}: skipped (finished earlier)")
        else:
            trained.append(time.time() - t0)
            left = sum(1 for s in specs[i:] if not (s.run_dir / "metrics.json").exists())
            eta = f"; about {left * sum(trained) / len(trained) / 60:.0f} min left for {left} run(s)" if left else ""
            say(f"{tag}: finished in {trained[-1]:.1f}s (test worst-group {metrics['test'][WORST]:.4f}); "
                f"{time.time() - t_all:.0f}s elapsed{eta}")
    say(f"all {len(specs)} runs finished ({time.time() - t_all:.0f}s)")


def run_comparison(experiment: str | Path, data_root: str | Path, out: str | Path,
                   pipeline_cls: type[Pipeline] | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """Plan, train (skipping finished runs), and report a comparison; returns the report.html path.

    ``pipeline_cls`` defaults to the student config's ``pipeline`` looked up with ``get_pipeline`` (tests inject one).
    """
    exp = load_experiment(experiment)
    if overrides:  # compare --set key=value: every run, the teacher's too
        bad = [k for k in overrides if k.split(".")[0] in ("seed", "method", "pipeline", "groups", "run")]
        if bad:
            raise UserError(f"compare --set {bad[0]}: set by the experiment (use its methods / seeds / teacher_seed)")
        exp = dataclasses.replace(exp, set={**exp.set, **overrides}, teacher_set={**exp.teacher_set, **overrides})
    if pipeline_cls is None:
        pipeline_cls = get_pipeline(str(load_yaml(exp.student_config).get("pipeline")))
    out = Path(out).resolve()
    specs = plan_runs(exp, Path(data_root).resolve(), out, pipeline_cls)
    with FolderLock(out, "comparison"):
        train_all(exp, specs, pipeline_cls, out)
        groups = read_results(specs)
        path = Writer(exp, pipeline_cls, specs, groups, out).write()
    say(f"report: {path}")
    return path
