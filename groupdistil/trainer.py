"""One trainer for every pipeline and method: plain PyTorch, readable top to bottom.

    Trainer(...)   check everything (config, teacher, data, sizes) before anything is written
    .run()         lock RUN_DIR -> new / resume / done -> Training(...) builds the parts -> loop -> final evaluation

    Training.loop: for step: batch -> method.update -> log -> validate/select -> checkpoint

RUN_DIR layout: ``config.yaml`` (resolved config, group names in order), ``train_log.jsonl`` (one line per optimizer
step), ``eval_log.jsonl`` (one line per validation), ``checkpoints/last.pt`` (full training state, for resume),
``checkpoints/best.pt`` (the selected model: best worst-group validation metric), ``metrics.json``,
``timing.json`` and the pipeline's per-case files and report (:mod:`groupdistil.final`).
"""
from __future__ import annotations

import copy
import json
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import distributed as dist_utils
from .checkpoint import CKPT_FORMAT, init_from, load_checkpoint, rng_state, set_rng_state, weights_identity
from .config import config_hash, dump_yaml, select_method_args
from .errors import UserError
from .final import final_evaluation
from .grouping import InferredGroups, infer_training_groups
from .io import atomic_torch_save, atomic_write_text
from .losses import TaskLoss
from .methods import METHODS, Method
from .pipeline import Pipeline
from .progress import Progress, StepLogger, Tracker, log, tracking_available
from .rundir import FolderLock, prepare_run_dir, truncate_jsonl
from .runtime import Runtime, load_average, pick_device
from .sampling import StepBatchSampler, heldout_batches, heldout_split
from .teacher import TeacherSource

#: what the engine writes into RUN_DIR (the pipeline adds its ``run_outputs``); ``export`` is ``groupdistil export``'s
ENGINE_OUTPUTS = ("config.yaml", "train_log.jsonl", "eval_log.jsonl", "checkpoints", "metrics.json", "timing.json",
                  "report.md", "report.html", "export", "groups_inferred.csv", ".request.json", "tensorboard")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """One run described by a resolved config, to be trained into ``run_dir``; whole when constructed."""

    def __init__(self, cfg: dict[str, Any], pipeline_cls: type[Pipeline], data_root: Path, run_dir: Path,
                 teacher_path: str | None = None, force: bool = False, init_path: str | None = None) -> None:
        """Check everything (teacher, data, sizes) before anything is written; ``cfg`` is copied, never changed.

        ``init_path``: the weights ``model.init_from`` names when the config holds a symbolic name (an experiment's
        ``pretrain:<name>``, resolved by ``groupdistil compare``); by default ``model.init_from`` itself.

        Process-wide setup (process group, threads, deterministic kernels) is :func:`runtime.setup_process`'s, done
        once by the caller.
        """
        self.cfg, self.run_dir, self.force = copy.deepcopy(cfg), Path(run_dir), force
        cfg = self.cfg
        self.t = cfg["train"]
        self.device = pick_device(self.t["device"])
        self.main = dist_utils.is_main()
        seed_everything(cfg["seed"])
        try:
            self.method_cls: type[Method] = METHODS.get(cfg["method"])
        except KeyError as e:
            raise UserError(str(e).strip("'\"")) from None
        select_method_args(cfg, cfg["method_args"], "method_args")  # defaults filled, ranges checked
        self.inferring = cfg["grouping"]["mode"] != "labels"
        uses_teacher = self.method_cls.needs_teacher or self.inferring
        if uses_teacher and not teacher_path:
            why = (f"method '{cfg['method']}' distils a teacher" if self.method_cls.needs_teacher else
                   f"grouping.mode '{cfg['grouping']['mode']}' infers the groups from a teacher")
            raise UserError(f"{why}: give --teacher RUN_DIR (a run of configs/{pipeline_cls.name}_teacher.yaml)")
        #: the teacher (None for a method without one), opened and so checked before anything is written
        self.teacher = TeacherSource.open(str(teacher_path), pipeline_cls, cfg) if uses_teacher else None
        self.pipeline = pipeline_cls(cfg, data_root)
        if self.teacher is not None:
            self.teacher.check(self.pipeline, cfg)
        cfg["groups"] = list(self.pipeline.group_names)
        counts = list(self.pipeline.train_group_counts)
        n_train, bs, world = sum(counts), self.t["batch_size"], dist_utils.world_size()
        if bs > n_train:
            raise UserError(f"train.batch_size = {bs} is larger than the training set ({n_train} samples under "
                            f"{data_root})")
        if bs % world:
            raise UserError(f"train.batch_size = {bs} must be divisible by the number of processes ({world})")
        unseen = [name for name, n in zip(cfg["groups"], counts) if n == 0]
        if unseen and self.method_cls.weights_groups and not self.inferring:
            log(f"note: group(s) {', '.join(unseen)} have no training samples: their weight is 0 throughout (out of "
                f"the simplex; the trained groups' weights sum to 1); they are evaluated and reported as unseen")
        self.runtime = Runtime.for_run(self.t, self.device)
        if self.t["tensorboard"] and not tracking_available():
            raise UserError("train.tensorboard: true needs the tensorboard package: pip install -e '.[tracking]'")
        # the teacher is identified by what it is (its run's config hash and the selected step), not where it sits,
        # so a comparison folder can be moved or copied and its finished runs are still recognised
        cfg["run"] = {"data_fingerprint": self.pipeline.fingerprint(),
                      "teacher": self.teacher.identity if self.teacher is not None else None}
        self.init_path = init_path or (cfg.get("model") or {}).get("init_from")
        if self.init_path:  # the starting weights by content: a changed weights file is another run
            if str(self.init_path).startswith("pretrain:") and not init_path:
                raise UserError(f"model.init_from = {self.init_path!r} names a pretraining run of an experiment file "
                                f"(its 'pretrain' section, resolved by groupdistil compare); give a run folder or "
                                f"a weights file here")
            cfg["run"]["init_from"] = weights_identity(self.init_path)
        self.run_hash = config_hash(cfg, exclude=())

    def outputs(self) -> tuple[str, ...]:
        """Glob patterns of everything a run writes into RUN_DIR (what ``--force`` removes, and only that)."""
        return ENGINE_OUTPUTS + tuple(self.pipeline.run_outputs)

    def status(self) -> str:
        """'new', 'resume' or 'done' (:func:`rundir.prepare_run_dir`, on the main process with the folder locked);
        its answer, or its error, given to every rank."""
        answer: tuple[str, str] = ("", "")
        if self.main:
            try:
                answer = (prepare_run_dir(self.run_dir, self.cfg, self.outputs(), self.force), "")
            except UserError as e:
                answer = ("", str(e))
        status, error = dist_utils.broadcast_object(answer)  # type: ignore[misc]
        if error:
            raise UserError(error)
        return status

    def build(self, status: str) -> Training:
        """The parts of this run's training (a subclass may build a subclass of :class:`Training`)."""
        return Training(self, status)

    def run(self) -> dict[str, Any] | None:
        """Train (or resume, or recognise as finished) the run, holding the run folder's lock throughout."""
        lock = FolderLock(self.run_dir, "run") if self.main else nullcontext()
        with lock:
            status = self.status()
            if status == "done":
                log(f"{self.run_dir}: already finished (metrics.json exists); nothing to do")
                return None
            try:
                t_start = time.time()
                training = self.build(status)
                if status == "new" and self.main:
                    atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
            except BaseException:
                if self.main and status == "new" and not (self.run_dir / "config.yaml").exists():
                    lock.remove_if_empty()  # a failed setup leaves nothing that blocks the corrected rerun
                raise
            step = training.loop()
            return training.finish(step, time.time() - t_start)


class Training:
    """What one training of a :class:`Trainer`'s run is made of (student, teacher on the device, training set and
    its groups, method), built in this order when constructed, and the loop over it."""

    def __init__(self, trainer: Trainer, status: str) -> None:
        self.trainer = trainer
        cfg, t, pipeline = trainer.cfg, trainer.t, trainer.pipeline
        self.run_dir, self.main, self.device, self.runtime = trainer.run_dir, trainer.main, trainer.device, \
            trainer.runtime
        seed_everything(cfg["seed"])
        heads = cfg["loss"]["heads"] or {h: 1.0 for h in pipeline.heads}
        unknown = sorted(set(heads) - set(pipeline.heads))
        if unknown:
            raise UserError(f"loss.heads names {unknown}, which the {pipeline.name} model does not have; "
                            f"valid: {sorted(pipeline.heads)}")
        self.student = pipeline.model_for(cfg)
        if trainer.init_path and not (self.run_dir / "checkpoints" / "last.pt").is_file():  # (a resumed run has
            log(init_from(self.student, trainer.init_path))  # its own weights)
        self.student = self.student.to(self.device)
        if self.device.type == "cuda" and t["channels_last"]:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.teacher = trainer.teacher
        if self.teacher is not None:
            self.teacher.to(self.device, t["channels_last"])
            self.teacher.use_record(pipeline, cfg, self.runtime)
        self.dataset = pipeline.train_dataset()
        distiller = self.teacher.distiller(pipeline, self.dataset, self.runtime, cfg) \
            if trainer.method_cls.needs_teacher else None
        #: the groups training weighs: the pipeline's, or inferred from the teacher (``grouping.mode``)
        inf = self.inferred = self.infer_groups() if trainer.inferring else None
        self.groups, self.group_names, self.counts = (inf.groups, inf.names, inf.counts) if inf is not None else (
            pipeline.train_groups(), list(cfg["groups"]), list(pipeline.train_group_counts))
        self.inferred_device = inf.groups.to(self.device) if inf is not None else None
        #: training samples the sampler never draws (whole cases, for the ``heldout`` signal)
        needs_heldout = trainer.method_cls.needs_heldout(cfg["method_args"])
        self.heldout_idx = self.held_out_indices() if needs_heldout else torch.zeros(0, dtype=torch.long)
        n = len(self.group_names)
        counts = (torch.bincount(self.groups, minlength=n) - torch.bincount(self.groups[self.heldout_idx],
                                                                            minlength=n)).tolist() \
            if needs_heldout else self.counts
        self.method: Method = trainer.method_cls(
            self.student, TaskLoss(heads, cfg["loss"]), n, counts, cfg["method_args"], teacher=distiller,
            runtime=self.runtime, heldout=heldout_batches(
                self.dataset, self.heldout_idx, t["batch_size"], self.device, dist_utils.rank(),
                dist_utils.world_size(), self.inferred_device) if needs_heldout else None).to(self.device)
        note = self.method.prepare(self.dataset, self.groups, t["batch_size"])
        if note:
            log(note)
        self.best: dict[str, Any] | None = None  # the selected step and its validation figures
        self.start = self.resume() if status == "resume" else 0
        self.tracker = Tracker(self.run_dir / "tensorboard", self.group_names, self.start) \
            if t["tensorboard"] and self.main else None
        self.load_at_start = load_average()  # the load when training started, for timing.json

    def infer_groups(self) -> InferredGroups:
        """``grouping.mode`` error / kmeans: the training groups from the teacher, written to
        ``groups_inferred.csv`` with their agreement with the true groups."""
        g, t0 = self.trainer.cfg["grouping"], time.time()
        inf = infer_training_groups(g, self.teacher.model, self.dataset, self.trainer.pipeline, self.device,
                                    self.trainer.t["batch_size"], self.runtime.autocast)
        if self.main:
            atomic_write_text(self.run_dir / "groups_inferred.csv", inf.csv_text)
        log(f"grouping.mode {g['mode']}: {len(inf.names)} inferred groups {dict(zip(inf.names, inf.counts))}; "
            f"adjusted Rand index with the true groups {inf.info['adjusted_rand_index']:.3f} "
            f"({time.time() - t0:.1f}s)")
        return inf

    def held_out_indices(self) -> torch.Tensor:
        cfg, cases = self.trainer.cfg, self.trainer.pipeline.train_cases()
        idx = heldout_split(cases, self.groups, cfg["method_args"]["heldout_fraction"], cfg["seed"])
        if not len(idx):
            raise UserError("method_args.signal 'heldout': no group has two or more training cases to hold one out")
        log(f"held out of training for the heldout signal: {len(idx)} samples of "
            f"{len({cases[i] for i in idx.tolist()})} cases")
        return idx

    def loader(self, start_step: int) -> DataLoader:
        t = self.trainer.t
        keep = torch.ones(len(self.dataset), dtype=torch.bool).index_fill_(0, self.heldout_idx, False).nonzero() \
            .flatten() if len(self.heldout_idx) else None  # the held-out samples are never drawn
        sampler = StepBatchSampler(len(self.dataset), t["batch_size"], self.trainer.cfg["seed"], start_step,
                                   self.groups if t["balanced_sampling"] else None, dist_utils.rank(),
                                   dist_utils.world_size(), keep)
        nw = t["num_workers"]
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=nw, persistent_workers=nw > 0,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if nw > 0 else None)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def save_last(self, step: int) -> None:
        if self.main:
            method = {k: v for k, v in self.method.state_dict().items() if not k.startswith("student.")}
            atomic_torch_save({
                "format": CKPT_FORMAT, "run_hash": self.trainer.run_hash, "step": step, "config": self.trainer.cfg,
                "model": self.student.state_dict(), "method": method,
                "optimizer": self.method.optimizer.state_dict(), "scheduler": self.method.scheduler.state_dict(),
                "best": self.best, "rng": rng_state()}, self.run_dir / "checkpoints" / "last.pt")

    def resume(self) -> int:
        path = self.run_dir / "checkpoints" / "last.pt"
        ck = load_checkpoint(path)
        if ck.get("run_hash") != self.trainer.run_hash:
            raise UserError(f"{path}: this checkpoint belongs to another run (config hash differs); use --force")
        self.student.load_state_dict(ck["model"])
        self.method.load_state_dict({**ck["method"], **{f"student.{k}": v for k, v in ck["model"].items()}})
        self.method.optimizer.load_state_dict(ck["optimizer"])
        self.method.scheduler.load_state_dict(ck["scheduler"])
        self.best = ck["best"]
        set_rng_state(ck["rng"])
        for name in ("train_log.jsonl", "eval_log.jsonl"):
            if self.main:
                truncate_jsonl(self.run_dir / name, int(ck["step"]))
        log(f"resuming {self.run_dir} from step {ck['step']}")
        return int(ck["step"])

    # --- validation and model selection --------------------------------------------------------------------------
    def validate(self, step: int) -> None:
        t, pipeline = self.trainer.t, self.trainer.pipeline
        m = pipeline.evaluate(self.runtime.predictor(self.student), "val")  # every rank: evaluation is sharded
        if self.main:
            rec = {"step": step, "worst_group_metric": float(m["worst_group_metric"]),
                   "average_metric": float(m["average_metric"]),
                   "group_metric": {g: float(v) for g, v in m["group_metric"].items()}}
            if "class_metric" in m:
                rec["class_metric"] = {c: float(v) for c, v in m["class_metric"].items()}
            score = selection_score(rec, t["selection"], pipeline.name)
            if self.tracker is not None:
                self.tracker.validation(step, rec)
            with open(self.run_dir / "eval_log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if self.best is None or score > self.best["score"]:
                self.best = {"step": step, "score": score, "worst_group_metric": rec["worst_group_metric"],
                             "average_metric": rec["average_metric"]}
                atomic_torch_save({"format": CKPT_FORMAT, "run_hash": self.trainer.run_hash, "step": step,
                                   "config": self.trainer.cfg, "model": self.student.state_dict(), "val": rec},
                                  self.run_dir / "checkpoints" / "best.pt")
            log(f"validation at step {step}: worst-group {rec['worst_group_metric']:.4f} average "
                f"{rec['average_metric']:.4f} (best {t['selection'].replace('_', '-')} {self.best['score']:.4f} "
                f"at step {self.best['step']})")
        dist_utils.barrier()

    # --- the loop ------------------------------------------------------------------------------------------------
    def loop(self) -> int:
        """The optimizer steps from the start (or the resumed step) to ``train.max_steps``; returns the last step."""
        t = self.trainer.t
        logger = StepLogger(self.run_dir / "train_log.jsonl", self.main, self.tracker)
        total, step = t["max_steps"], self.start
        progress = Progress(total, self.start, self.main)
        batches = iter(self.loader(self.start))
        try:
            while step < total:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
                if self.device.type == "cuda" and t["channels_last"]:
                    batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
                if self.inferred_device is not None:  # the inferred group of every sample (never the true one)
                    batch["group"] = self.inferred_device[batch["index"]]
                values = self.method.update(batch)
                step += 1
                logger.add(step, values)
                last = step == total
                if step % t["log_every"] == 0 or last:
                    logger.flush()
                progress.update(step, {"loss": logger.last.get("loss", float("nan"))}, t["log_every"])
                if step % t["eval_every"] == 0 or last:
                    logger.flush()
                    self.validate(step)
                if step % t["checkpoint_every"] == 0 or last:
                    logger.flush()
                    self.save_last(step)
        finally:
            progress.close()
        return step

    def finish(self, step: int, train_seconds: float) -> dict[str, Any] | None:
        """The final evaluation, metrics and report (:func:`groupdistil.final.final_evaluation`)."""
        return final_evaluation(self, step, train_seconds)


def selection_score(rec: dict[str, Any], selection: str, pipeline: str) -> float:
    """What model selection maximises (``train.selection``): the worst-group metric, the average metric, or the
    worst per-class metric (``class_metric``: per class for classification, per structure for segmentation)."""
    if selection == "worst_group":
        return rec["worst_group_metric"]
    if selection == "average":
        return rec["average_metric"]
    if not rec.get("class_metric"):
        raise UserError(f"train.selection worst_class: the {pipeline} pipeline's evaluation reports no per-class "
                        f"metric (class_metric); use worst_group or average")
    return min(rec["class_metric"].values())
