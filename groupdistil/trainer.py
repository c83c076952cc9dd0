"""One trainer for every pipeline and method: plain PyTorch, readable top to bottom.

    setup -> (resume) -> for step: batch -> method.update -> log -> validate/select -> checkpoint
          -> final evaluation of the selected and the last checkpoint -> metrics.json -> report

RUN_DIR layout: ``config.yaml`` (resolved config, group names in order), ``train_log.jsonl`` (one line per optimizer
step), ``eval_log.jsonl`` (one line per validation), ``checkpoints/last.pt`` (full training state, for resume),
``checkpoints/best.pt`` (the selected model: best worst-group validation metric), ``metrics.json``,
``timing.json`` and the pipeline's per-case files and report.
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
from .checkpoint import (CKPT_FORMAT, load_checkpoint, load_model_from_checkpoint, resolve_checkpoint, rng_state,
                         set_rng_state)
from .config import config_hash, dump_yaml, select_method_args
from .errors import UserError
from .grouping import agreement, infer_groups, teacher_pass
from .io import atomic_torch_save, atomic_write_json, atomic_write_text
from .losses import TaskLoss
from .methods import METHODS, Method
from .pipeline import Pipeline, Predictor
from .progress import Progress, StepLogger, Tracker, log, tracking_available
from .rundir import FolderLock, prepare_run_dir, truncate_jsonl
from .runtime import Runtime, count_params, load_average, machine_state, pick_device
from .sampling import StepBatchSampler, heldout_split
from .teacher import Teacher, TeacherRecord, is_probabilities_source, probabilities_identity, recorded_evaluation

#: what the engine writes into RUN_DIR (the pipeline adds its ``run_outputs``); ``export`` is ``groupdistil export``'s
ENGINE_OUTPUTS = ("config.yaml", "train_log.jsonl", "eval_log.jsonl", "checkpoints", "metrics.json", "timing.json",
                  "report.md", "report.html", "export", "groups_inferred.csv", ".request.json", "tensorboard")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """Trains one run described by a resolved config into ``run_dir``."""

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
        self.method_cls = _method_class(cfg["method"])
        select_method_args(cfg, cfg["method_args"], "method_args")  # defaults filled, ranges checked
        self.inferring = cfg["grouping"]["mode"] != "labels"
        self.uses_teacher = self.method_cls.needs_teacher or self.inferring
        self.teacher_path, self.teacher_id = teacher_path, None  # the teacher's (run hash, step)
        if self.uses_teacher:
            if not teacher_path:
                why = (f"method '{cfg['method']}' distils a teacher" if self.method_cls.needs_teacher else
                       f"grouping.mode '{cfg['grouping']['mode']}' infers the groups from a teacher")
                raise UserError(f"{why}: give --teacher RUN_DIR (a run of configs/{pipeline_cls.name}_teacher.yaml)")
        self.teacher_path = teacher_path
        #: a teacher given as saved probabilities (no model): its targets are read by the pipeline in build()
        self.teacher_probs = bool(self.uses_teacher and is_probabilities_source(teacher_path))
        if self.teacher_probs:
            teacher_ck = self.check_probabilities_teacher(str(teacher_path))
            self.teacher_cpu = None
        elif self.uses_teacher:
            # load (and so check) the teacher before anything is written
            self.teacher_cpu, teacher_ck = load_model_from_checkpoint(teacher_path, pipeline_cls)
            self.teacher_id = (teacher_ck.get("run_hash"), teacher_ck.get("step"))
        self.pipeline = pipeline_cls(cfg, data_root)
        if self.uses_teacher and not self.teacher_probs:
            self.check_teacher_heads(teacher_path)
        self.cfg["groups"] = list(self.pipeline.group_names)
        self.n_groups = len(self.cfg["groups"])
        self.train_counts = list(self.pipeline.train_group_counts)
        n_train, bs, world = sum(self.train_counts), self.t["batch_size"], dist_utils.world_size()
        if bs > n_train:
            raise UserError(f"train.batch_size = {bs} is larger than the training set ({n_train} samples under "
                            f"{data_root})")
        if bs % world:
            raise UserError(f"train.batch_size = {bs} must be divisible by the number of processes ({world})")
        self.train_group_names = list(self.cfg["groups"])  # the groups training weighs (inferred ones replace them)
        self.inferred: torch.Tensor | None = None
        unseen = [name for name, n in zip(self.cfg["groups"], self.train_counts) if n == 0]
        if unseen and self.method_cls.weights_groups and not self.inferring:
            log(f"note: group(s) {', '.join(unseen)} have no training samples: their weight is 0 throughout (out of "
                f"the simplex; the trained groups' weights sum to 1); they are evaluated and reported as unseen")
        self.runtime = Runtime.for_run(self.t, self.device)
        if self.t["tensorboard"] and not tracking_available():
            raise UserError("train.tensorboard: true needs the tensorboard package: pip install -e '.[tracking]'")
        self.tracker: Tracker | None = None
        # the teacher is identified by what it is (its run's config hash and the selected step), not where it sits,
        # so a comparison folder can be moved or copied and its finished runs are still recognised
        self.cfg["run"] = {"data_fingerprint": self.pipeline.fingerprint(),
                           "teacher": (f"{teacher_ck.get('run_hash')}@step{teacher_ck.get('step')}"
                                       if self.uses_teacher else None)}
        self.init_path = init_path or (cfg.get("model") or {}).get("init_from")
        if self.init_path:  # the starting weights by content: a changed weights file is another run
            from .checkpoint import weights_identity
            if str(self.init_path).startswith("pretrain:") and not init_path:
                raise UserError(f"model.init_from = {self.init_path!r} names a pretraining run of an experiment file "
                                f"(its 'pretrain' section, resolved by groupdistil compare); give a run folder or "
                                f"a weights file here")
            self.cfg["run"]["init_from"] = weights_identity(self.init_path)

    def check_probabilities_teacher(self, teacher_path: str) -> dict[str, Any]:
        """What a teacher given as saved probabilities cannot do, refused before anything is written; returns its
        identity ``{"run_hash": "probabilities-<sha256>", "step": 0}`` (:func:`teacher.probabilities_identity`)."""
        mode = self.cfg["grouping"]["mode"]
        if self.inferring:
            raise UserError(f"{teacher_path}: grouping.mode '{mode}' infers the groups from a teacher model, and a "
                            f"teacher given as saved probabilities has none; use grouping.mode: labels, or a teacher "
                            f"run folder, checkpoint or TorchScript file")
        if self.t["teacher_cache"] != "auto":
            raise UserError(f"{teacher_path}: train.teacher_cache: {self.t['teacher_cache']} cannot be used with a "
                            f"teacher given as saved probabilities (they are the teacher cache); set "
                            f"train.teacher_cache: auto")
        return {"run_hash": probabilities_identity(teacher_path), "step": 0}

    def probabilities_teacher(self) -> Teacher:
        """The teacher cache filled from saved probabilities (:meth:`Pipeline.teacher_targets`), its heads and sizes
        checked against this run's."""
        t0 = time.time()
        targets = self.pipeline.teacher_targets(Path(self.teacher_path))
        n = len(self.dataset)
        used = self.cfg["loss"]["heads"] or self.pipeline.heads
        for head in used:
            want = self.pipeline.heads.get(head)
            t = targets.get(head)
            if t is None or t.dim() < 2 or int(t.shape[1]) != want or int(t.shape[0]) != n:
                got = "none" if t is None else f"shape {tuple(t.shape)}"
                raise UserError(f"{self.teacher_path}: the saved probabilities cover heads {sorted(targets)}, this run "
                                f"distils {sorted(used)} (head '{head}': {got}, expected ({n}, {want}, ...): "
                                f"{n} training samples, {want} classes); for a model with more heads than the "
                                f"probabilities give, set loss.heads to those they give")
        dtype = torch.float32 if self.device.type == "cpu" else torch.float16
        teacher = Teacher.from_probabilities({h: targets[h] for h in used}, self.device, dtype)
        log(f"teacher probabilities read from {self.teacher_path} for {n} training samples in "
            f"{time.time() - t0:.1f}s (no teacher model: the teacher is not evaluated)")
        return teacher

    def check_teacher_heads(self, teacher_path: str) -> None:
        """The teacher must give logits of the same number of classes for every head the student is trained on."""
        shape = self.pipeline.preprocessing(self.cfg).get("input_shape")
        if not shape:
            return
        with torch.inference_mode():
            out = self.teacher_cpu.eval()(torch.zeros(1, *shape))
        used = self.cfg["loss"]["heads"] or self.pipeline.heads
        for head in used:
            want = self.pipeline.heads.get(head)
            got = out[head].shape[1] if head in out else None
            if got != want:
                have = {h: int(t.shape[1]) for h, t in out.items()}
                raise UserError(f"{teacher_path}: the teacher's heads {have} do not match this run's "
                                f"{dict(self.pipeline.heads)} (head '{head}': {got} vs {want} classes; was it trained "
                                f"with other data.classes or model settings?)")

    # --- run folder --------------------------------------------------------------------------------------------
    def outputs(self) -> tuple[str, ...]:
        """Glob patterns of everything a run writes into RUN_DIR (what ``--force`` removes, and only that)."""
        return ENGINE_OUTPUTS + tuple(self.pipeline.run_outputs)

    def shared_status(self) -> str:
        """:meth:`prepare_run_dir` on the main process, its answer (or its error) given to every rank."""
        answer: tuple[str, str] = ("", "")
        if self.main:
            try:
                answer = (self.prepare_run_dir(), "")
            except UserError as e:
                answer = ("", str(e))
        status, error = dist_utils.broadcast_object(answer)  # type: ignore[misc]
        self.run_hash = config_hash(self.cfg, exclude=())
        if error:
            raise UserError(error)
        return status

    def prepare_run_dir(self) -> str:
        """:func:`rundir.prepare_run_dir` for this run (main process, folder locked)."""
        return prepare_run_dir(self.run_dir, self.cfg, self.outputs(), self.force)

    # --- setup ---------------------------------------------------------------------------------------------------
    def build(self) -> None:
        seed_everything(self.cfg["seed"])
        heads = self.cfg["loss"]["heads"] or {h: 1.0 for h in self.pipeline.heads}
        unknown = sorted(set(heads) - set(self.pipeline.heads))
        if unknown:
            raise UserError(f"loss.heads names {unknown}, which the {self.pipeline.name} model does not have; "
                            f"valid: {sorted(self.pipeline.heads)}")
        self.student = self.pipeline.model_for(self.cfg)
        init = self.init_path
        if init and not (self.run_dir / "checkpoints" / "last.pt").is_file():  # a resumed run has its own weights
            from .checkpoint import init_from
            log(init_from(self.student, init))
        self.student = self.student.to(self.device)
        if self.device.type == "cuda" and self.t["channels_last"]:
            self.student = self.student.to(memory_format=torch.channels_last)
        teacher = None
        self.teacher_model = None
        if self.uses_teacher and not self.teacher_probs:
            tm = self.teacher_cpu.to(self.device)
            if self.device.type == "cuda" and self.t["channels_last"]:
                tm = tm.to(memory_format=torch.channels_last)
            teacher = Teacher(tm, self.runtime.autocast) if self.method_cls.needs_teacher else None
            self.teacher_model = tm
        self.teacher_record = self.find_teacher_record()
        criterion = TaskLoss(heads, self.cfg["loss"])
        self.dataset = self.pipeline.train_dataset()
        if self.teacher_probs:
            teacher = self.probabilities_teacher()
        if self.inferring:
            self.infer_groups()
        heldout, counts = self.heldout_batches()
        self.method: Method = self.method_cls(self.student, criterion, self.n_groups, counts,
                                              self.cfg["method_args"], teacher=teacher, runtime=self.runtime,
                                              heldout=heldout).to(self.device)
        if teacher is not None and teacher.cache is None and self.t["teacher_cache"] == "auto" and \
                not self.pipeline.train_is_random():
            t0 = time.time()
            dtype = torch.float32 if self.device.type == "cpu" else torch.float16
            teacher.build_cache(self.dataset, self.device, self.t["batch_size"], self.t["num_workers"], dtype)
            log(f"teacher outputs cached for {len(self.dataset)} training samples in {time.time() - t0:.1f}s")
        note = self.method.prepare(self.dataset, self.train_groups(), self.t["batch_size"])
        if note:
            log(note)

    def find_teacher_record(self) -> TeacherRecord | None:
        """The teacher run's recorded val/test evaluation, when it holds for this run (:func:`recorded_evaluation`)
        and the pipeline takes it: the final evaluation then reports it instead of running the teacher again."""
        if self.teacher_id is None or not self.teacher_path:
            return None
        ck_path = resolve_checkpoint(self.teacher_path)
        where = {"device": self.runtime.device.type, "precision": self.runtime.precision}
        record, why = recorded_evaluation(ck_path, *self.teacher_id, self.cfg, self.pipeline.evaluation_config, where)
        if record is not None:
            record = self.pipeline.load_teacher_record(record)
            why = why if record is not None else f"the {self.pipeline.name} pipeline cannot use its record"
        if record is not None:
            log(f"teacher: its val and test evaluation is taken from {record.run_dir}/metrics.json ({why}), "
                f"not run again")
        elif ck_path.name == "best.pt":
            log(f"teacher: evaluated again at the end of the run (its recorded evaluation: {why})")
        return record

    def train_groups(self) -> torch.Tensor:
        """The group of every training sample as training sees it: the inferred one, or the pipeline's."""
        return self.inferred.cpu() if self.inferred is not None else self.pipeline.train_groups()

    def infer_groups(self) -> None:
        """``grouping.mode`` error / kmeans: groups from the teacher; written to ``groups_inferred.csv`` with their
        agreement with the true groups (which training never uses)."""
        g = self.cfg["grouping"]
        t0 = time.time()
        passed = teacher_pass(self.teacher_model, self.dataset, self.device, self.t["batch_size"],
                              self.runtime.autocast)
        if g["mode"] == "error" and "pred" not in passed:
            raise UserError("grouping.mode 'error' needs a classification head (cls) on the teacher")
        classes = self.pipeline.class_names() if "cls" in passed and "seg" not in self.pipeline.heads else None
        inferred, names = infer_groups(g["mode"], g["k"], g["seed"], passed, self.pipeline.train_cases(), classes)
        self.inferred = inferred.to(self.device)
        self.n_groups, self.train_group_names = len(names), names
        self.train_counts = torch.bincount(inferred, minlength=len(names)).tolist()
        self.grouping_info, csv_text = agreement(g, self.pipeline.train_groups(), self.cfg["groups"], inferred, names,
                                                 self.pipeline.train_cases())
        if self.main:
            atomic_write_text(self.run_dir / "groups_inferred.csv", csv_text)
        log(f"grouping.mode {g['mode']}: {len(names)} inferred groups {dict(zip(names, self.train_counts))}; "
            f"adjusted Rand index with the true groups {self.grouping_info['adjusted_rand_index']:.3f} "
            f"({time.time() - t0:.1f}s)")

    def heldout_batches(self) -> tuple[list[dict[str, torch.Tensor]] | None, list[int]]:
        """For the ``heldout`` signal: whole training cases kept out of the sampler (``self.heldout_idx``), as
        batches on the device (this rank's share); and the training counts of the groups without them."""
        self.heldout_idx = torch.zeros(0, dtype=torch.long)
        if not self.method_cls.needs_heldout(self.cfg["method_args"]):
            return None, self.train_counts
        cases, groups = self.pipeline.train_cases(), self.train_groups()
        self.heldout_idx = heldout_split(cases, groups, self.cfg["method_args"]["heldout_fraction"], self.cfg["seed"])
        if not len(self.heldout_idx):
            raise UserError("method_args.signal 'heldout': no group has two or more training cases to hold one out")
        held = sorted({cases[i] for i in self.heldout_idx.tolist()})
        log(f"held out of training for the heldout signal: {len(self.heldout_idx)} samples of {len(held)} cases")
        keys = [(int(i), 0) for i in self.heldout_idx[dist_utils.rank()::dist_utils.world_size()]]
        bs = self.t["batch_size"]
        loader = DataLoader(self.dataset, batch_sampler=[keys[k:k + bs] for k in range(0, len(keys), bs)])
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in loader]
        if self.inferred is not None:
            for b in batches:
                b["group"] = self.inferred[b["index"]]
        counts = torch.bincount(groups, minlength=self.n_groups) - torch.bincount(
            groups[self.heldout_idx], minlength=self.n_groups)
        return batches, counts.tolist()

    def loader(self, start_step: int) -> DataLoader:
        groups = self.train_groups() if self.t["balanced_sampling"] else None
        keep = None
        if len(self.heldout_idx):
            mask = torch.ones(len(self.dataset), dtype=torch.bool)
            mask[self.heldout_idx] = False
            keep = mask.nonzero().flatten()
        sampler = StepBatchSampler(len(self.dataset), self.t["batch_size"], self.cfg["seed"], start_step, groups,
                                   dist_utils.rank(), dist_utils.world_size(), keep)
        nw = self.t["num_workers"]
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=nw, persistent_workers=nw > 0,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if nw > 0 else None)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def state(self, step: int) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT, "run_hash": self.run_hash, "step": step, "config": self.cfg,
            "model": self.student.state_dict(), "method": self.method_state(),
            "optimizer": self.method.optimizer.state_dict(), "scheduler": self.method.scheduler.state_dict(),
            "best": self.best, "rng": rng_state(),
        }

    def method_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.state_dict().items() if not k.startswith("student.")}

    def save_last(self, step: int) -> None:
        if self.main:
            atomic_torch_save(self.state(step), self.run_dir / "checkpoints" / "last.pt")

    def resume(self) -> int:
        path = self.run_dir / "checkpoints" / "last.pt"
        ck = load_checkpoint(path)
        if ck.get("run_hash") != self.run_hash:
            raise UserError(f"{path}: this checkpoint belongs to another run (config hash differs); use --force")
        self.student.load_state_dict(ck["model"])
        self.method.load_state_dict({**ck["method"], **{f"student.{k}": v for k, v in ck["model"].items()}})
        self.method.optimizer.load_state_dict(ck["optimizer"])
        self.method.scheduler.load_state_dict(ck["scheduler"])
        self.best = ck["best"]
        set_rng_state(ck["rng"])
        return int(ck["step"])

    # --- evaluation ----------------------------------------------------------------------------------------------
    def validate(self, step: int) -> None:
        m = self.pipeline.evaluate(self.runtime.predictor(self.student), "val")  # every rank: evaluation is sharded
        if self.main:
            rec = {"step": step, "worst_group_metric": float(m["worst_group_metric"]),
                   "average_metric": float(m["average_metric"]),
                   "group_metric": {g: float(v) for g, v in m["group_metric"].items()}}
            if "class_metric" in m:
                rec["class_metric"] = {c: float(v) for c, v in m["class_metric"].items()}
            score = selection_score(rec, self.t["selection"], self.pipeline.name)
            if self.tracker is not None:
                self.tracker.validation(step, rec)
            with open(self.run_dir / "eval_log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if self.best is None or score > self.best["score"]:
                self.best = {"step": step, "score": score, "worst_group_metric": rec["worst_group_metric"],
                             "average_metric": rec["average_metric"]}
                atomic_torch_save({"format": CKPT_FORMAT, "run_hash": self.run_hash, "step": step,
                                   "config": self.cfg, "model": self.student.state_dict(), "val": rec},
                                  self.run_dir / "checkpoints" / "best.pt")
            log(f"validation at step {step}: worst-group {rec['worst_group_metric']:.4f} average "
                f"{rec['average_metric']:.4f} (best {self.t['selection'].replace('_', '-')} {self.best['score']:.4f} "
                f"at step {self.best['step']})")
        dist_utils.barrier()

    # --- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any] | None:
        """Train (or resume, or recognise as finished) the run, holding the run folder's lock throughout."""
        lock = FolderLock(self.run_dir, "run") if self.main else nullcontext()
        with lock:
            status = self.shared_status()
            if status == "done":
                log(f"{self.run_dir}: already finished (metrics.json exists); nothing to do")
                return None
            try:
                t_start = time.time()
                self.build()
                if status == "new" and self.main:
                    atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
            except BaseException:
                if self.main and status == "new" and not (self.run_dir / "config.yaml").exists():
                    lock.remove_if_empty()  # a failed setup leaves nothing that blocks the corrected rerun
                raise
            return self.train(status, t_start)

    def train(self, status: str, t_start: float) -> dict[str, Any] | None:
        self.best: dict[str, Any] | None = None
        start = self.resume() if status == "resume" else 0
        if self.t["tensorboard"] and self.main:
            self.tracker = Tracker(self.run_dir / "tensorboard", self.train_group_names, start)
        logger = StepLogger(self.run_dir / "train_log.jsonl", self.main, self.tracker)
        if status == "resume":
            if self.main:
                for name in ("train_log.jsonl", "eval_log.jsonl"):
                    truncate_jsonl(self.run_dir / name, start)
            log(f"resuming {self.run_dir} from step {start}")
        total = self.t["max_steps"]
        self.t_load = load_average()  # the load when training started, for timing.json
        progress = Progress(total, start, self.main)
        step = start
        batches = iter(self.loader(start))
        try:
            while step < total:
                batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
                if self.device.type == "cuda" and self.t["channels_last"]:
                    batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)
                if self.inferred is not None:  # the inferred group of every sample (the true one is never used)
                    batch["group"] = self.inferred[batch["index"]]
                values = self.method.update(batch)
                step += 1
                logger.add(step, values)
                last = step == total
                if step % self.t["log_every"] == 0 or last:
                    logger.flush()
                progress.update(step, {"loss": logger.last.get("loss", float("nan"))}, self.t["log_every"])
                if step % self.t["eval_every"] == 0 or last:
                    logger.flush()
                    self.validate(step)
                if step % self.t["checkpoint_every"] == 0 or last:
                    logger.flush()
                    self.save_last(step)
        finally:
            progress.close()
        train_seconds = time.time() - t_start
        return self.finish(step, train_seconds)

    def finish(self, step: int, train_seconds: float) -> dict[str, Any] | None:
        """Evaluate the last and the selected model (every rank, sharded); rank 0 writes metrics and report."""
        t0 = time.time()
        teacher: Predictor | TeacherRecord | None = self.teacher_record
        if teacher is None and self.teacher_model is not None:
            teacher = self.runtime.predictor(self.teacher_model)
        best_state = dist_utils.broadcast_object(
            load_checkpoint(self.run_dir / "checkpoints" / "best.pt") if self.main else None)
        selected = copy.deepcopy(self.student)
        selected.load_state_dict(best_state["model"])
        metrics: dict[str, Any] = {"selected_step": int(best_state["step"]), "groups": self.cfg["groups"],
                                   "train_groups": self.train_group_names, "train_group_counts": self.train_counts,
                                   "unseen_groups": [g for g, n in zip(self.train_group_names, self.train_counts)
                                                     if not n]}
        if self.inferring:
            metrics["grouping"] = self.grouping_info
        timing: dict[str, Any] = {"train_seconds": train_seconds}
        last: dict[str, Any] = {"step": step}
        for split in ("val", "test"):
            m = self.pipeline.evaluate(self.runtime.predictor(selected), split, out_dir=self.run_dir,
                                       teacher=teacher)
            timing[split] = m.pop("timing", {})
            metrics[split] = m
            if metrics["selected_step"] == step:  # the same weights: no second evaluation
                last[split] = {k: v for k, v in m.items() if not k.startswith("teacher")}
            else:
                last[split] = self.pipeline.evaluate(self.runtime.predictor(self.student), split)
                last[split].pop("timing", None)
        metrics["last"] = last
        timing["eval_seconds"] = time.time() - t0
        if self.teacher_record is not None:  # the teacher's figures (and inference time) are its run's own
            timing["teacher_evaluation_from"] = str(self.teacher_record.run_dir)
        timing["machine"] = machine_state(self.t_load, self.runtime)
        if self.main:
            info = {"method": self.cfg["method"], "seed": self.cfg["seed"], "params": count_params(self.student),
                    **({"teacher": self.cfg["run"]["teacher"]} if self.teacher_probs else {}),
                    "teacher_params": count_params(self.teacher_model) if self.teacher_model is not None else None,
                    "train_seconds": train_seconds, **timing.get("test", {})}
            atomic_write_json(self.run_dir / "timing.json", {**timing, "params": info["params"],
                                                             "teacher_params": info["teacher_params"]})
            info["machine"] = timing["machine"]
            self.pipeline.write_report(self.run_dir, metrics, info)
            if self.tracker is not None:
                self.tracker.figures(self.run_dir, step)
                self.tracker.close()
            atomic_write_json(self.run_dir / "metrics.json", metrics)  # last: its presence marks a finished run
            log(f"done: selected step {metrics['selected_step']}, test worst-group "
                f"{metrics['test']['worst_group_metric']:.4f}, average {metrics['test']['average_metric']:.4f}; "
                f"{self.run_dir}/metrics.json")
        dist_utils.barrier()
        return metrics


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


def _method_class(name: str) -> type[Method]:
    try:
        return METHODS.get(name)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None
