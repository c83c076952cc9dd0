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
from .plan import PRETRAIN, RunSpec, plan_runs
from .report import Writer
from .schema import Experiment, load_experiment
from .summary import WORST, read_results


def say(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def prepare_data(exp: Experiment, spec: RunSpec, pipeline_cls: type[Pipeline]) -> None:
    """Synthesise a missing data root (always for a data-sweep level and for the pretraining data); an interrupted
    synthesis is redone."""
    root = spec.data_root
    if root.exists() and not synthetic_incomplete(root):
        return
    if spec.method == PRETRAIN and exp.pretrain is not None:
        seed, options, key = exp.pretrain.data_seed, exp.pretrain.data_options, "pretrain.data option"
    elif spec.level or exp.synthesize_if_missing:
        seed, options, key = exp.data_seed, {**exp.data_options, **spec.level}, "data option"
    else:
        raise UserError(f"{root}: data root does not exist (set data.synthesize_if_missing: true in {exp.path}, "
                        f"or make one with 'groupdistil synth {pipeline_cls.name} --out {root}')")
    say(f"synthesising {pipeline_cls.name} data into {root} (seed {seed}, options {options})")
    synthesize_data(pipeline_cls, root, seed, options, force=True, source=f"{exp.path}: {key}")


class Reusable:
    """Finished runs of other comparison folders (``compare --reuse DIR``), indexed by the hash of their resolved
    config (:func:`~groupdistil.config.config_hash` over everything, the data fingerprint and the teacher's identity
    included): a run is reused only where the trainer would recognise it as this very run."""

    def __init__(self, sources: list[Path]) -> None:
        import yaml

        from ..config import config_hash

        self.by_hash: dict[str, Path] = {}
        for src in sources:
            if not src.is_dir():
                raise UserError(f"compare --reuse {src}: not a folder")
            for cfg_path in sorted(src.rglob("config.yaml")):
                if not (cfg_path.parent / "metrics.json").is_file():
                    continue
                try:
                    cfg = yaml.safe_load(cfg_path.read_text())
                except (yaml.YAMLError, UnicodeDecodeError):
                    continue
                if isinstance(cfg, dict):
                    self.by_hash.setdefault(config_hash(cfg, exclude=()), cfg_path.parent)

    def place(self, trainer: Any) -> Path | None:
        """Copy the finished run matching ``trainer``'s resolved config into its (new or empty) run folder."""
        import shutil

        from ..config import config_hash
        from ..rundir import LOCK_NAME

        run_dir = trainer.run_dir
        if not self.by_hash or (run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir())):
            return None
        src = self.by_hash.get(config_hash(trainer.cfg, exclude=()))
        if src is None:
            return None
        shutil.copytree(src, run_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LOCK_NAME))
        return src


def train_one(spec: RunSpec, pipeline_cls: type[Pipeline], reuse: Reusable | None = None,
              threads: int = 0) -> tuple[dict[str, Any] | None, str]:
    """Train (or skip, resume, or reuse) one run; returns its metrics (None when nothing was trained) and a note.

    ``threads`` > 0 sets torch's CPU threads where the run's config leaves them to the default (parallel jobs)."""
    import torch

    from ..runtime import setup_process
    from ..trainer import Trainer

    setup_process(spec.cfg["train"])  # threads and deterministic kernels of this run
    if threads > 0 and spec.cfg["train"]["num_threads"] == 0:
        torch.set_num_threads(threads)
    teacher = str(spec.teacher_dir) if spec.teacher_dir is not None else None
    init = str(spec.init_dir) if spec.init_dir is not None else None
    trainer = Trainer(copy.deepcopy(spec.cfg), pipeline_cls, spec.data_root, spec.run_dir, teacher, init_path=init)
    src = reuse.place(trainer) if reuse is not None else None
    metrics = trainer.run()
    return metrics, (f"reused from {src}" if src is not None else "")


def _train_job(spec: RunSpec, pipeline_cls: type[Pipeline], reuse: Reusable | None, threads: int,
               log_path: Path) -> tuple[dict[str, Any] | None, str]:
    """:func:`train_one` in a worker process, its output going to ``log_path`` (``compare --jobs``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as fh:
        sys.stdout, sys.stderr = fh, fh
        try:
            return train_one(spec, pipeline_cls, reuse, threads)
        except UserError as e:
            raise UserError(str(e)) from None  # picklable, without the traceback's frames


class _Progress:
    """The ``[compare]`` lines: started, finished (with the test worst-group metric), an ETA."""

    def __init__(self, specs: list[RunSpec], out: Path, jobs: int) -> None:
        self.specs, self.out, self.jobs = specs, out, jobs
        self.t_all, self.trained = time.time(), []  # seconds of each run trained (or resumed) by this call
        self.started: dict[Path, float] = {}

    def tag(self, spec: RunSpec) -> str:
        return f"[{self.specs.index(spec) + 1}/{len(self.specs)}] {spec.run_dir.relative_to(self.out)}"

    def start(self, spec: RunSpec, where: str = "") -> None:
        self.started[spec.run_dir] = time.time()
        if not (spec.run_dir / "metrics.json").exists():
            say(f"{self.tag(spec)}: started{where}")

    def finish(self, spec: RunSpec, metrics: dict[str, Any] | None, note: str) -> None:
        tag = self.tag(spec)
        if metrics is None:
            say(f"{tag}: {note or 'skipped (finished earlier)'}")
            return
        self.trained.append(time.time() - self.started[spec.run_dir])
        left = sum(1 for s in self.specs if not (s.run_dir / "metrics.json").exists())
        per_run = sum(self.trained) / len(self.trained) / min(self.jobs, max(left, 1))
        eta = f"; about {left * per_run / 60:.0f} min left for {left} run(s)" if left else ""
        say(f"{tag}: finished in {self.trained[-1]:.1f}s (test worst-group {metrics['test'][WORST]:.4f}); "
            f"{time.time() - self.t_all:.0f}s elapsed{eta}")


def _failed(prog: _Progress, spec: RunSpec, e: UserError) -> UserError:
    return UserError(f"{prog.tag(spec)}: {e} (in a comparison: delete that run folder to retrain it)")


def train_all(exp: Experiment, specs: list[RunSpec], pipeline_cls: type[Pipeline], out: Path, jobs: int = 1,
              reuse: Reusable | None = None) -> None:
    """Train (or skip, resume, reuse) every run; one at a time in this process, or ``jobs`` worker processes that
    each take a run whose teacher has finished (every run's result is the same either way: runs are independent
    and each sets its own seed and threads)."""
    ready: set[Path] = set()
    for spec in specs:  # data first: synthesis is not shared between processes
        if spec.data_root not in ready:
            prepare_data(exp, spec, pipeline_cls)
            ready.add(spec.data_root)
    prog = _Progress(specs, out, jobs)
    if jobs <= 1:
        for spec in specs:
            prog.start(spec)
            try:
                metrics, note = train_one(spec, pipeline_cls, reuse)
            except UserError as e:
                raise _failed(prog, spec, e) from None
            prog.finish(spec, metrics, note)
    else:
        _train_parallel(specs, pipeline_cls, out, jobs, reuse, prog)
    say(f"all {len(specs)} runs finished ({time.time() - prog.t_all:.0f}s)")


def _train_parallel(specs: list[RunSpec], pipeline_cls: type[Pipeline], out: Path, jobs: int,
                    reuse: Reusable | None, prog: _Progress) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp
    import os

    threads = max(1, (os.cpu_count() or 1) // jobs)
    say(f"{jobs} parallel jobs, {threads} torch thread(s) each where a config leaves train.num_threads at 0; "
        f"each run's output goes to {out / 'logs'}/<run>.log")
    done: set[Path] = set()
    pending = list(specs)
    errors: list[UserError] = []
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        running: dict[cf.Future, RunSpec] = {}
        while pending or running:
            for spec in [s for s in pending if all(d is None or d in done for d in (s.teacher_dir, s.init_dir))]:
                if len(running) >= jobs or errors:
                    break
                pending.remove(spec)
                log_path = out / "logs" / (str(spec.run_dir.relative_to(out)).replace(os.sep, "__") + ".log")
                prog.start(spec, f" (log: {log_path.relative_to(out)})")
                running[pool.submit(_train_job, spec, pipeline_cls, reuse, threads, log_path)] = spec
            if not running:
                break  # what is pending waits for a teacher that failed
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                spec = running.pop(fut)
                try:
                    metrics, note = fut.result()
                except UserError as e:
                    errors.append(_failed(prog, spec, e))
                    continue
                done.add(spec.run_dir)
                prog.finish(spec, metrics, note)
    if errors:
        raise errors[0]


def run_comparison(experiment: str | Path, data_root: str | Path, out: str | Path,
                   pipeline_cls: type[Pipeline] | None = None, overrides: dict[str, Any] | None = None,
                   jobs: int = 1, reuse: list[str | Path] | None = None) -> Path:
    """Plan, train (skipping finished runs), and report a comparison; returns the report.html path.

    ``pipeline_cls`` defaults to the student config's ``pipeline`` looked up with ``get_pipeline`` (tests inject one).
    ``jobs``: runs trained at once (worker processes); ``reuse``: other comparison folders whose finished runs with
    the very same resolved config (data and teacher included) are copied in instead of being trained again.
    """
    if jobs < 1:
        raise UserError(f"compare --jobs {jobs}: must be >= 1")
    exp = load_experiment(experiment)
    if overrides:  # compare --set key=value: every run, the teacher's too
        bad = [k for k in overrides if k.split(".")[0] in ("seed", "method", "pipeline", "groups", "run")]
        if bad:
            raise UserError(f"compare --set {bad[0]}: set by the experiment (use its methods / seeds / teacher_seed)")
        exp = dataclasses.replace(exp, set={**exp.set, **overrides}, teacher_set={**exp.teacher_set, **overrides})
    if pipeline_cls is None:
        pipeline_cls = get_pipeline(str(load_yaml(exp.student_config).get("pipeline")))
    out = Path(out).resolve()
    if reuse and any(Path(r).resolve() == out for r in reuse):
        raise UserError(f"compare --reuse {out}: that is the comparison folder itself")
    specs = plan_runs(exp, Path(data_root).resolve(), out, pipeline_cls)
    with FolderLock(out, "comparison"):
        train_all(exp, specs, pipeline_cls, out, jobs,
                  Reusable([Path(r).resolve() for r in reuse]) if reuse else None)
        compared = [s for s in specs if s.method != PRETRAIN]  # pretraining runs are inputs, not results
        groups = read_results(compared)
        path = Writer(exp, pipeline_cls, compared, groups, out).write()
    say(f"report: {path}")
    return path
