"""The CPU measurements of ``run.py``, each built on the engine's own pieces (``Trainer``, ``Method.update``,
``Teacher.build_cache``, the pipelines' datasets and inference paths), never on re-implementations of them.

A :class:`PipelineBench` holds one pipeline's resolved student and teacher configs, its synthetic data and a
teacher checkpoint with random weights (timing does not depend on the weights). Each suite returns
:class:`Result` rows; ``run.py`` prints them and writes the JSON line.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timing import interleaved, median, quartiles, ratio_values, seconds_per_call, spread
from torch.utils.data import Dataset, default_collate

from groupdistil.checkpoint import CKPT_FORMAT
from groupdistil.config import deep_merge, resolve_config
from groupdistil.io import atomic_torch_save
from groupdistil.methods import METHODS
from groupdistil.pipeline import Pipeline
from groupdistil.sampling import StepBatchSampler
from groupdistil.runtime import Runtime, build_optimizer
from groupdistil.trainer import Trainer, Training, seed_everything

CPU = torch.device("cpu")


@dataclass
class Result:
    """One row of the table; ``key`` is also its JSON key (``None`` value: not measured, ``note`` says why)."""

    key: str
    value: float | None
    unit: str = "x"
    note: str = ""
    in_json: bool = True
    spread: tuple[float, float] | None = None  # interquartile range over repeats (Q1, Q3)
    repeats: int | None = None


def ratio_row(key: str, num: list[float], den: list[float], note: str = "", in_json: bool = True,
              scale: float = 1.0) -> Result:
    """The median over repeats of ``scale * num[i] / den[i]``, its interquartile range and the number of repeats."""
    q1, q2, q3 = quartiles([scale * r for r in ratio_values(num, den)])
    return Result(key, q2, note=note, in_json=in_json, spread=(q1, q3), repeats=len(num))


@dataclass
class Sizes:
    """How much each suite measures (``--quick`` shrinks everything)."""

    repeats: int  # interleaved repeats at least
    warmup: int
    steps: int  # timed training steps per repeat (step suite)
    loader_batches: int  # timed batches per repeat (loader)
    epochs_warmup_steps: int
    latency_calls: int  # forward passes per repeat at batch 1
    preload: int = 4  # distinct preloaded batches the step timings cycle through
    max_repeats: int = 0  # more repeats, up to this many, until each ratio's median is known to 1% (timing.REL_SE)
    budget_s: float = 0.0  # ... within this many seconds per suite
    details: bool = True  # informational table rows that take a suite's time (trainer with the pipeline's data)

    def repeat(self, variants: dict[str, Callable[[], float]], ratios: list[tuple[str, str]]) -> dict[str, list[float]]:
        """:func:`timing.interleaved` with these sizes: the minimum repeats, then more until ``ratios`` settle."""
        return interleaved(variants, self.repeats, ratios, self.max_repeats, self.budget_s)


# --- setup --------------------------------------------------------------------------------------------------------
@dataclass
class PipelineBench:
    """One pipeline's configs (with the benchmark's size overrides), synthetic data and teacher checkpoint."""

    cls: type[Pipeline]
    student: dict[str, Any]
    teacher: dict[str, Any]
    root: Path
    work: Path
    teacher_ckpt: Path = field(init=False)
    #: the student's ``data`` section as its config file has it (no benchmark overrides): what deployment runs
    configured_data: dict[str, Any] = field(init=False)

    @classmethod
    def create(cls, pipeline_cls: type[Pipeline], student_yaml: Path, teacher_yaml: Path, overrides: dict[str, Any],
               root: Path, work: Path, synth_options: dict[str, Any]) -> PipelineBench:
        over = deep_merge({"train": {"device": "cpu"}}, overrides)
        student = resolve_config(student_yaml, over, pipeline_cls=pipeline_cls, source="benchmark")
        teacher = resolve_config(teacher_yaml, over, pipeline_cls=pipeline_cls, source="benchmark")
        if not root.exists():
            partial = root.with_name(root.name + ".partial")
            if partial.exists():
                shutil.rmtree(partial)
            pipeline_cls.synthesize(partial, seed=0, **synth_options)
            partial.rename(root)
        bench = cls(pipeline_cls, student, teacher, root, work)
        bench.configured_data = resolve_config(student_yaml, {"train": {"device": "cpu"}}, pipeline_cls=pipeline_cls,
                                               source="benchmark")["data"]
        bench.teacher_ckpt = work / f"{pipeline_cls.name}_teacher.pt"
        seed_everything(teacher["seed"])
        model = pipeline_cls.model_for(teacher)
        atomic_torch_save({"format": CKPT_FORMAT, "config": teacher, "model": model.state_dict(), "step": 0},
                          bench.teacher_ckpt)
        return bench

    @property
    def batch_size(self) -> int:
        return int(self.student["train"]["batch_size"])

    def trainer(self, method: str, trainer_cls: type[Trainer] = Trainer, pipeline_cls: type[Pipeline] | None = None,
                build: bool = True, method_args: dict[str, Any] | None = None, **train: Any) -> Any:
        """A real ``Trainer`` on the student config (``method``, ``method_args`` and ``train`` keys overridden); with
        ``build``, the :class:`Training` it builds for a new run (student, method, loader)."""
        spec = METHODS.get(method).hparams_spec  # the student config's keys this method has (the trainer is strict)
        own = {k: v for k, v in self.student["method_args"].items() if k in spec}
        cfg = {**deep_merge(self.student, {"method": method, "train": train}),
               "method_args": {**own, **(method_args or {})}}
        (self.work / "runs").mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{method}_", dir=self.work / "runs"))
        t = trainer_cls(cfg, pipeline_cls or self.cls, self.root, run_dir, teacher_path=str(self.teacher_ckpt))
        return t.build("new") if build else t

    def models(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Student and teacher models of the configs, in eval mode."""
        seed_everything(self.student["seed"])
        return self.cls.model_for(self.student).eval(), self.cls.model_for(self.teacher).eval()


def preload(trainer: Training, n: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` batches of the trainer's own training loader, on its device."""
    return [{k: v.to(trainer.device) for k, v in b.items()} for b in islice(trainer.loader(0), n)]


def predictor(model: torch.nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The trainer's own predictor on CPU (``Runtime.predictor``: eval mode, inference mode, channels_last input,
    float outputs)."""
    return Runtime().predictor(model)


# --- groupdistil vs kd step, loader vs step throughput ------------------------------------------------------------
def step_suite(pb: PipelineBench, sz: Sizes, suffix: str) -> list[Result]:
    """``Method.update`` of kd and groupdistil (same student architecture, teacher and preloaded batches), and the
    trainer's DataLoader alone (no model), interleaved."""
    kd, gd = pb.trainer("kd"), pb.trainer("groupdistil")
    cached = gd.method.teacher.cache is not None
    batches = preload(gd, sz.preload)
    loader = iter(gd.loader(0))
    next(loader)  # worker start-up is not throughput
    for method in (kd.method, gd.method):
        for i in range(sz.warmup):
            method.update(batches[i % len(batches)])

    def steps(method: Any) -> Callable[[], float]:
        return lambda: seconds_per_call(lambda i: method.update(batches[i % len(batches)]), sz.steps)

    t = sz.repeat({"kd": steps(kd.method), "groupdistil": steps(gd.method),
                   "loader": lambda: seconds_per_call(lambda i: next(loader), sz.loader_batches)},
                  [("groupdistil", "kd"), ("groupdistil", "loader")])
    b = pb.batch_size
    step_sps, loader_sps = b / median(t["groupdistil"]), b / median(t["loader"])
    teacher = "cached teacher" if cached else "teacher forward in the step"
    nw = gd.t["num_workers"]
    name = pb.cls.name
    return [
        ratio_row(f"groupdistil_over_kd_step{suffix}", t["groupdistil"], t["kd"],
                  note=f"{name} batch {b}, {teacher}; kd {median(t['kd']) * 1e3:.1f} ms, groupdistil "
                       f"{median(t['groupdistil']) * 1e3:.1f} ms ({spread(t['groupdistil'])})"),
        ratio_row(f"loader_over_step_throughput{suffix}", t["groupdistil"], t["loader"],
                  note=f"{name} loader {loader_sps:.0f} samples/s (num_workers {nw}, "
                       f"{'augmented' if gd.pipeline.train_is_random() else 'deterministic'}) / groupdistil step "
                       f"{step_sps:.0f} samples/s (preloaded)"),
        Result(f"loader_samples_per_s{suffix}", loader_sps, unit="samples/s", in_json=False),
        Result(f"step_samples_per_s{suffix}", step_sps, unit="samples/s", in_json=False),
    ]


# --- trainer vs plain loop ----------------------------------------------------------------------------------------
class MaterializedDataset(Dataset):
    """Every item of a deterministic training set computed once and held as stacked tensors (same keys, same items),
    so that a DataLoader over it only indexes and collates: the same data work as preloaded batches."""

    def __init__(self, dataset: Dataset) -> None:
        items = [dataset[(i, 0)] for i in range(len(dataset))]  # type: ignore[arg-type]
        self.tensors = {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def __len__(self) -> int:
        return len(self.tensors["index"])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {k: v[key[0]] for k, v in self.tensors.items()}


def materialized(pipeline_cls: type[Pipeline]) -> type[Pipeline]:
    class Materialized(pipeline_cls):  # type: ignore[valid-type, misc]
        def train_dataset(self) -> Dataset:
            return MaterializedDataset(super().train_dataset())

    return Materialized


class StepClockTraining(Training):
    """The real training loop, with the time each ``method.update`` starts recorded; validation, checkpoints and
    the final evaluation are skipped (they are not per-step work and the plain loop has none)."""

    def __init__(self, trainer: Trainer, status: str) -> None:
        super().__init__(trainer, status)
        self.stamps: list[float] = []
        update = self.method.update

        def clocked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            self.stamps.append(time.perf_counter())
            return update(batch)

        self.method.update = clocked  # type: ignore[method-assign]

    def validate(self, step: int) -> None:
        pass

    def save_last(self, step: int) -> None:
        pass

    def finish(self, step: int, train_seconds: float) -> None:
        return None


class StepClockTrainer(Trainer):
    """A Trainer whose run builds a :class:`StepClockTraining` (kept in ``trainings`` for its stamps)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trainings: list[StepClockTraining] = []

    def build(self, status: str) -> StepClockTraining:
        self.trainings.append(StepClockTraining(self, status))
        return self.trainings[-1]


def plain_loop(pb: PipelineBench, batches: list[dict[str, torch.Tensor]], n: int) -> list[float]:
    """A minimal hand-written loop on the same model, optimizer and loss (mean CE); returns iteration start times."""
    seed_everything(pb.student["seed"])
    model = pb.cls.model_for(pb.student).to(CPU).train()
    opt = build_optimizer(model.parameters(), pb.student["train"])
    stamps = []
    for i in range(n):
        stamps.append(time.perf_counter())
        b = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(b["x"])["cls"], b["cls"])
        loss.backward()
        opt.step()
    return stamps


def trainer_suite(pb: PipelineBench, sz: Sizes) -> list[Result]:
    """ERM: ``Trainer.run`` steps (its DataLoader + sampler, ``method.update``, StepLogger, progress) over a plain
    loop on preloaded batches. Headline: the trainer's dataset materialized in memory (both sides preloaded
    tensors); also the trainer with the pipeline's own dataset (per-sample crop + normalise in the loader)."""
    log_every = int(pb.student["train"]["log_every"])
    window = log_every  # whole flush periods: the StepLogger's per-flush cost is amortised as in a long run
    total = sz.warmup + window + 1
    ds = materialized(pb.cls)(pb.student, pb.root).train_dataset()
    sampler = StepBatchSampler(len(ds), pb.batch_size, pb.student["seed"])
    batches = [default_collate([ds[k] for k in keys]) for keys in islice(sampler, sz.preload)]

    def per_step(stamps: list[float]) -> float:
        return (stamps[sz.warmup + window] - stamps[sz.warmup]) / window

    def trainer_run(pipeline_cls: type[Pipeline]) -> Callable[[], float]:
        def run() -> float:
            t = pb.trainer("erm", StepClockTrainer, pipeline_cls, build=False, max_steps=total,
                           eval_every=10**9, checkpoint_every=10**9)
            t.run()
            return per_step(t.trainings[-1].stamps)

        return run

    variants = {"trainer": trainer_run(materialized(pb.cls)), "plain": lambda: per_step(plain_loop(pb, batches, total))}
    if sz.details:
        variants["trainer_pipeline_data"] = trainer_run(pb.cls)
    t = sz.repeat(variants, [("trainer", "plain")])
    nw = pb.student["train"]["num_workers"]
    common = f"{pb.cls.name} erm, batch {pb.batch_size}, {window} steps after {sz.warmup} warm-up"
    rows = [ratio_row("trainer_over_plain_loop", t["trainer"], t["plain"],
                      note=f"{common}; both from preloaded tensors (trainer: DataLoader num_workers {nw} + sampler "
                           f"over the materialized dataset); trainer {median(t['trainer']) * 1e3:.1f} ms, plain "
                           f"{median(t['plain']) * 1e3:.1f} ms")]
    if sz.details:
        rows.append(ratio_row("trainer_pipeline_data_over_plain_loop", t["trainer_pipeline_data"], t["plain"],
                              note=f"informational: the trainer with the pipeline's own dataset (per-sample "
                                   f"transforms in the loader) over the plain loop on preloaded batches; "
                                   f"{median(t['trainer_pipeline_data']) * 1e3:.1f} ms", in_json=False))
    return rows


# --- kd epoch (cached / uncached teacher) vs erm epoch --------------------------------------------------------------
def epoch_suite(pb: PipelineBench, sz: Sizes) -> list[Result]:
    """One epoch (``len(train) // batch`` steps of the trainer's loader + ``method.update``) of erm, kd with the
    teacher cache and kd without it; the cache's one-off build is timed apart."""
    erm, kd = pb.trainer("erm"), pb.trainer("kd", teacher_cache="off")
    teacher = kd.method.teacher
    start = time.perf_counter()
    teacher.build_cache(kd.dataset, kd.device, pb.batch_size, kd.t["num_workers"], torch.float32)  # as Trainer.build
    build_seconds = time.perf_counter() - start
    cache = teacher.cache
    n_steps = len(erm.dataset) // pb.batch_size
    loaders = {id(erm): iter(erm.loader(0)), id(kd): iter(kd.loader(0))}

    def epoch(trainer: Trainer, teacher_cache: Any = None, steps: int = n_steps) -> Callable[[], float]:
        def run() -> float:
            if trainer is kd:
                teacher.cache = teacher_cache
            it = loaders[id(trainer)]
            start = time.perf_counter()
            for _ in range(steps):
                trainer.method.update({k: v.to(trainer.device) for k, v in next(it).items()})
            return time.perf_counter() - start

        return run

    for warm in (epoch(erm, steps=sz.epochs_warmup_steps), epoch(kd, cache, sz.epochs_warmup_steps),
                 epoch(kd, None, sz.epochs_warmup_steps)):
        warm()
    t = sz.repeat({"erm": epoch(erm), "kd_cached": epoch(kd, cache), "kd_uncached": epoch(kd, None)},
                  [("kd_cached", "erm"), ("kd_uncached", "erm")])
    would_cache = not erm.pipeline.train_is_random() and pb.student["train"]["teacher_cache"] == "auto"
    what = f"{pb.cls.name}, {len(erm.dataset)} samples, {n_steps} steps of batch {pb.batch_size}"
    return [
        ratio_row("kd_cached_over_erm_epoch", t["kd_cached"], t["erm"],
                  note=f"{what}; erm {median(t['erm']):.2f} s, kd cached {median(t['kd_cached']):.2f} s per epoch"
                       + ("" if would_cache else " (this config's trainer would not cache: augmented data)")),
        ratio_row("kd_uncached_over_erm_epoch", t["kd_uncached"], t["erm"],
                  note=f"kd uncached {median(t['kd_uncached']):.2f} s per epoch"),
        Result("teacher_cache_build_seconds", build_seconds, unit="s",
               note=f"one-off Teacher.build_cache over the {len(kd.dataset)} training samples (not in the epochs)"),
    ]


# --- student vs teacher inference latency -------------------------------------------------------------------------
def mms_latency_suite(pb: PipelineBench, sz: Sizes) -> list[Result]:
    """The pipeline's whole-volume path (``predict_volume``: the slices through the network, then inversion to the
    native geometry) on one preprocessed test volume; the ratio uses the network seconds it reports
    (``infer_seconds_per_case`` in ``timing.json``), the whole path is shown too. At the configured ``data.roi`` in
    every mode (``--quick`` shrinks the training suites' images, not this one: the ratio is a property of the size
    that is deployed; fixed per-layer costs weigh more at a smaller size)."""
    pipe = pb.cls(deep_merge(pb.student, {"data": {"roi": pb.configured_data["roi"]}}), pb.root)
    image = pipe.evaluation.case("test", 0).phases["ED"].image
    student, teacher = pb.models()
    models = {"student": student, "teacher": teacher}
    whole: dict[str, list[float]] = {"student": [], "teacher": []}

    def run(role: str) -> Callable[[], float]:
        def once() -> float:  # the SliceInferer seconds predict_volume reports; the whole path's kept beside
            predict = predictor(models[role])  # a fresh copy each repeat, as each evaluation makes one
            pipe.inference.predict_volume(predict, image)  # warm-up, untimed
            infer, start = 0.0, time.perf_counter()
            for _ in range(sz.latency_calls):
                infer += pipe.inference.predict_volume(predict, image)[2]
            whole[role].append((time.perf_counter() - start) / sz.latency_calls)
            return infer / sz.latency_calls

        return once

    infer = sz.repeat({role: run(role) for role in models}, [("student", "teacher")])
    shape = tuple(image.shape)
    return [
        ratio_row("student_over_teacher_latency_mms_volume", infer["student"], infer["teacher"],
                  note=f"slices of one volume {shape} through the network, sw_batch {pipe.ecfg['sw_batch_size']}, "
                       f"{torch.get_num_threads()} threads: student {median(infer['student']) * 1e3:.0f} ms, teacher "
                       f"{median(infer['teacher']) * 1e3:.0f} ms"),
        ratio_row("student_over_teacher_latency_mms_volume_whole_path", whole["student"], whole["teacher"],
                  note=f"with inversion + argmax: student {median(whole['student']) * 1e3:.0f} ms, teacher "
                       f"{median(whole['teacher']) * 1e3:.0f} ms"),
    ]


def waterbirds_latency_suite(pb: PipelineBench, sz: Sizes) -> list[Result]:
    """Forward pass per image of the student and teacher architectures at batch 1 and batch 64."""
    size = int(pb.student["data"]["image_size"])
    fns = dict(zip(("student", "teacher"), map(predictor, pb.models())))

    def per_image(f: Callable, x: torch.Tensor, calls: int) -> Callable[[], float]:
        return lambda: seconds_per_call(lambda i: f(x), calls) / len(x)

    rows = []
    for batch, calls, suffix in ((1, sz.latency_calls, ""), (64, 1, "_b64")):
        x = torch.randn(batch, 3, size, size)
        for f in fns.values():
            f(x)
        t = sz.repeat({role: per_image(f, x, calls) for role, f in fns.items()}, [("student", "teacher")])
        rows.append(ratio_row(f"student_over_teacher_latency_waterbirds_image{suffix}", t["student"], t["teacher"],
                              note=f"{size} px, batch {batch}: student {median(t['student']) * 1e3:.2f} ms, teacher "
                                   f"{median(t['teacher']) * 1e3:.2f} ms per image"))
    return rows


# --- costs of what other issues added: held-out signal, data fingerprint, TensorBoard -----------------------------
def heldout_suite(pb: PipelineBench, sz: Sizes) -> list[Result]:
    """``method_args.signal: heldout``: one ``refresh_heldout`` (a no-gradient pass of the student, and of the teacher
    for the KD term, over the held-out batches), amortised over ``heldout_every`` steps, over one groupdistil step on
    preloaded batches of the same trainer, interleaved."""
    gd = pb.trainer("groupdistil", method_args={"signal": "heldout"})
    method, every = gd.method, int(gd.cfg["method_args"]["heldout_every"])
    batches = preload(gd, sz.preload)
    for i in range(sz.warmup):
        method.update(batches[i % len(batches)])
    method.refresh_heldout()
    t = sz.repeat({"refresh": lambda: seconds_per_call(lambda i: method.refresh_heldout(), 1),
                   "step": lambda: seconds_per_call(lambda i: method.update(batches[i % len(batches)]), sz.steps)},
                  [("refresh", "step")])
    held = sum(len(b["index"]) for b in method.heldout)
    return [ratio_row(f"heldout_refresh_share_of_step{'' if pb.cls.name == 'mms' else '_' + pb.cls.name}",
                      t["refresh"], t["step"], scale=1 / every,
                      note=f"{pb.cls.name}: refresh over {held} held-out samples of {len(gd.dataset)} "
                           f"{median(t['refresh']) * 1e3:.0f} ms every {every} steps / groupdistil step "
                           f"{median(t['step']) * 1e3:.0f} ms (batch {pb.batch_size}); it grows with the held-out "
                           f"count (heldout_fraction of the training cases)")]


def fingerprint_suite(pb: PipelineBench, sz: Sizes) -> list[Result]:
    """``Pipeline.fingerprint()`` (content hash of every file the run reads: train, val and test) over the run's
    loading of those files: ``Pipeline.train_dataset()`` as ``Trainer.build`` calls it (M&Ms: the training slices
    preprocessed, the validation and test volumes read and preprocessed, the pathology classifier fitted;
    Waterbirds: the training images decoded and resized, plus the validation and test images as the first
    validation and the final evaluation decode them), each on a fresh pipeline (nothing cached), interleaved."""
    samples: list[int] = []

    def fresh() -> Pipeline:
        p = pb.cls(pb.student, pb.root)
        getattr(p, "splits", None)  # M&Ms: the metadata table and the splits, which both sides read (not timed)
        return p

    def fingerprint() -> float:
        p = fresh()
        start = time.perf_counter()
        p.fingerprint()
        return time.perf_counter() - start

    def loading() -> float:
        p = fresh()
        start = time.perf_counter()
        samples.append(len(p.train_dataset()))  # type: ignore[arg-type]
        if pb.cls.name == "waterbirds":  # its validation and test images, decoded at the first validation / the end
            for split in ("val", "test"):
                p._images(split)  # type: ignore[attr-defined]
        return time.perf_counter() - start

    fingerprint(), loading()  # warm-up: the files in the page cache for both
    t = sz.repeat({"fingerprint": fingerprint, "loading": loading}, [("fingerprint", "loading")])
    suffix = "" if pb.cls.name == "mms" else f"_{pb.cls.name}"
    return [ratio_row(f"fingerprint_share_of_data_loading{suffix}", t["fingerprint"], t["loading"],
                      note=f"{pb.cls.name}: fingerprint {median(t['fingerprint']) * 1e3:.0f} ms / loading "
                           f"{median(t['loading']) * 1e3:.0f} ms ({samples[-1]} training samples)")]


def tensorboard_suite(pb: PipelineBench, sz: Sizes) -> list[Result]:
    """``train.tensorboard: true``: what the ``Tracker`` adds per step, ``Tracker.train_record`` of the ``log_every``
    records one ``StepLogger`` flush writes (every logged value) plus the event file's flush, amortised per step, over
    one groupdistil step on preloaded batches, interleaved."""
    from groupdistil.progress import StepLogger, Tracker, tracking_available

    if not tracking_available():
        return [Result("tensorboard_share_of_step", None, note="tensorboard is not installed (the tracking extra)")]
    gd = pb.trainer("groupdistil")
    every = int(gd.t["log_every"])
    batches = preload(gd, sz.preload)
    log_file = pb.work / "tensorboard_train_log.jsonl"
    logger = StepLogger(log_file, True)
    for i in range(every):  # the records of one flush, with the values a run logs
        logger.add(i + 1, gd.method.update(batches[i % len(batches)]))
    logger.flush()
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    tracker = Tracker(pb.work / "tensorboard", gd.train_group_names, 0)

    def log_window() -> float:
        start = time.perf_counter()
        for r in records:
            tracker.train_record(r)
        tracker.writer.flush()
        return (time.perf_counter() - start) / every

    t = sz.repeat({"tensorboard": log_window,
                   "step": lambda: seconds_per_call(lambda i: gd.method.update(batches[i % len(batches)]), sz.steps)},
                  [("tensorboard", "step")])
    tracker.close()
    values = sum(len(v) if isinstance(v, list) else 1 for k, v in records[0].items() if k != "step")
    return [ratio_row("tensorboard_share_of_step", t["tensorboard"], t["step"],
                      note=f"{pb.cls.name} groupdistil: {values} scalars per step, written every {every} steps "
                           f"({median(t['tensorboard']) * 1e6:.0f} us per step) / step "
                           f"{median(t['step']) * 1e3:.1f} ms (batch {pb.batch_size})")]


# --- quickstart ---------------------------------------------------------------------------------------------------
def quickstart_suite(repo: Path, experiment: Path, work: Path) -> list[Result]:
    """The README's quickstart command (``groupdistil compare``) in a subprocess: wall seconds, data synthesis
    included (a fresh data root)."""
    out_log = work / "quickstart.log"
    cmd = [sys.executable, "-m", "groupdistil", "compare", str(experiment), "--data-root", str(work / "mms_synth"),
           "--out", str(work / "quickstart")]
    start = time.perf_counter()
    with open(out_log, "w") as fh:
        rc = subprocess.run(cmd, cwd=repo, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = out_log.read_text().strip().splitlines()[-1:] or [""]
        return [Result("quickstart_seconds", None, unit="s", note=f"failed (exit {rc}): {tail[0][:120]}")]
    shown = experiment.relative_to(repo) if experiment.is_relative_to(repo) else experiment
    return [Result("quickstart_seconds", seconds, unit="s",
                   note=f"groupdistil compare {shown} on a fresh data root (synthesis included), cwd = repo")]
