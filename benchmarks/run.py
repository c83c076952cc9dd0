"""CPU benchmarks of the engine and both pipelines (issue 6): a table, then one JSON line (last line of stdout).

    python benchmarks/run.py [--quick] [--with-quickstart] [--threads N] [--data-dir DIR] [--debug]

``--quick``: tiny sizes (about two minutes on a quiet 2-core machine); default: the configs' own sizes on small
synthetic data sets (several minutes on 2 cores). Ratios are medians over interleaved repeats, each suite adding
repeats within a time budget until its ratios' medians are known to 1%; the table shows their interquartile range
and the number of repeats (see ``timing.py``). The rows and how each is measured: ``benchmarks/README.md``. Progress
goes to stderr; the engine's own log lines are hidden unless ``--debug``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # timing/suites, and the engine even without the editable install

import torch  # noqa: E402
from suites import (  # noqa: E402
    PipelineBench,
    Result,
    Sizes,
    epoch_suite,
    fingerprint_suite,
    heldout_suite,
    mms_latency_suite,
    quickstart_suite,
    step_suite,
    tensorboard_suite,
    trainer_suite,
    waterbirds_latency_suite,
)
from timing import busy_cores, load_average, machine_info  # noqa: E402

#: key -> (comparison, bound); a missing key has no target
TARGETS: dict[str, tuple[str, float]] = {
    "groupdistil_over_kd_step": ("<=", 1.03),
    "groupdistil_over_kd_step_waterbirds": ("<=", 1.03),
    "trainer_over_plain_loop": ("<=", 1.05),
    "kd_cached_over_erm_epoch": ("<=", 1.10),
    "loader_over_step_throughput": (">=", 1.5),
    "loader_over_step_throughput_waterbirds": (">=", 1.5),
    # issue 17: the network at least 4x faster than the teacher's, the whole path (with the inversion) 3x
    "student_over_teacher_latency_mms_volume": ("<=", 0.25),
    "student_over_teacher_latency_mms_volume_whole_path": ("<=", 0.33),
    "heldout_refresh_share_of_step": ("<=", 0.05),
    "fingerprint_share_of_data_loading": ("<=", 0.05),
    "fingerprint_share_of_data_loading_waterbirds": ("<=", 0.05),
    "tensorboard_share_of_step": ("<=", 0.02),
}

#: (repeats at least, warm-up steps, timed steps, loader batches, epoch warm-up steps, batch-1 forwards, preloaded
#: batches, repeats at most and seconds per suite while a ratio's median is not known to 1% yet)
SIZES = {
    "quick": Sizes(repeats=11, warmup=2, steps=3, loader_batches=3, epochs_warmup_steps=1, latency_calls=3, preload=2,
                   max_repeats=81, budget_s=25.0, details=False),
    "full": Sizes(repeats=11, warmup=3, steps=8, loader_batches=10, epochs_warmup_steps=2, latency_calls=10, preload=4,
                  max_repeats=81, budget_s=120.0),
}
#: config overrides (quick: smaller inputs and batches; full: the configs as they are)
OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {"mms": {"data": {"roi": [64, 64]}, "train": {"batch_size": 8}},
              "waterbirds": {"data": {"image_size": 32}, "train": {"batch_size": 16}}},
    "full": {"mms": {}, "waterbirds": {}},
}
#: synthetic data sets (pipeline ``synthesize`` options)
SYNTH: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {"mms": {"tiny": True}, "waterbirds": {"scale": 0.02}},
    "full": {"mms": {"train_counts": {"A": 4, "B": 2}, "unlabeled_counts": {}, "val_per_centre": 1,
                     "test_per_vendor": 1},
             "waterbirds": {"scale": 0.1}},
}

#: every key each suite reports (so a failed or skipped suite still has its rows, as null)
SUITE_KEYS = {
    "step_mms": ["groupdistil_over_kd_step", "loader_over_step_throughput"],
    "step_waterbirds": ["groupdistil_over_kd_step_waterbirds", "loader_over_step_throughput_waterbirds"],
    "trainer": ["trainer_over_plain_loop"],
    "epoch": ["kd_cached_over_erm_epoch", "kd_uncached_over_erm_epoch", "teacher_cache_build_seconds"],
    "latency_mms": ["student_over_teacher_latency_mms_volume", "student_over_teacher_latency_mms_volume_whole_path"],
    "latency_waterbirds": ["student_over_teacher_latency_waterbirds_image",
                           "student_over_teacher_latency_waterbirds_image_b64"],
    "heldout": ["heldout_refresh_share_of_step"],
    "fingerprint_mms": ["fingerprint_share_of_data_loading"],
    "fingerprint_waterbirds": ["fingerprint_share_of_data_loading_waterbirds"],
    "tensorboard": ["tensorboard_share_of_step"],
    "quickstart": ["quickstart_seconds"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (about three minutes on a quiet machine)")
    p.add_argument("--with-quickstart", action="store_true",
                   help="also time the README quickstart (groupdistil compare ...; takes minutes)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--data-dir", type=Path, help="keep and reuse the synthetic data sets here (default: a temp dir)")
    p.add_argument("--configs", type=Path, default=REPO / "configs", help="folder of the run configs")
    p.add_argument("--debug", action="store_true", help="show the engine's log lines and raise on the first error")
    p.add_argument("--only", nargs="+", metavar="SUITE", choices=[s for s in SUITE_KEYS if s != "quickstart"],
                   help="run only these suites (the others' rows are null); e.g. --only latency_mms trainer")
    return p.parse_args(argv)


def status(key: str, value: float | None) -> str:
    if key not in TARGETS:
        return ""
    if value is None or not math.isfinite(value):
        return "SKIP"
    op, bound = TARGETS[key]
    return "PASS" if (value <= bound if op == "<=" else value >= bound) else "MISS"


def fmt(r: Result) -> str:
    if r.value is None:
        return "null"
    if r.unit == "x":
        return f"{r.value:.3f}"
    if r.unit == "s":
        return f"{r.value:.2f} s"
    return f"{r.value:.0f} {r.unit}"


def fmt_spread(r: Result) -> str:
    """``Q1-Q3 (n)`` of a ratio over its repeats."""
    if r.spread is None or r.value is None:
        return ""
    return f"{r.spread[0]:.3f}-{r.spread[1]:.3f} ({r.repeats})"


def print_table(mode: str, machine: dict[str, Any], state: dict[str, Any], rows: list[Result]) -> None:
    loads, busy = state["load_average"], state["busy_cores"]
    print(f"GroupDistil benchmarks ({mode}): torch {machine['torch']}, {machine['torch_threads']} threads, "
          f"{machine['cpu']} ({machine['cpu_count']} cores), device {machine['device']}")
    print(f"cores busy with other processes at start {busy['start']}, at end {busy['end']} (/proc/stat over 0.25 s); "
          f"load average (1 min) at start {loads['start']}, at end {loads['end']}"
          + (" -- other processes were running at the start: timings are likely distorted"
             if (busy["start"] or 0) > 0.5 else ""))
    w = max(len(r.key) for r in rows)
    print(f"{'metric':{w}}  {'value':>12}  {'IQR (repeats)':>20}  {'target':>8}  {'status':6}  notes")
    for r in rows:
        target = " ".join(str(t) for t in TARGETS[r.key]) if r.key in TARGETS else ""
        print(f"{r.key:{w}}  {fmt(r):>12}  {fmt_spread(r):>20}  {target:>8}  {status(r.key, r.value):6}  {r.note}")


def json_line(mode: str, machine: dict[str, Any], state: dict[str, Any], rows: list[Result]) -> str:
    def clean(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else round(v, 4)

    out: dict[str, Any] = {r.key: clean(r.value) for r in rows if r.in_json}
    out["status"] = {k: status(k, out.get(k)) for k in TARGETS}
    out["details"] = {r.key: clean(r.value) for r in rows if not r.in_json}
    out["spread"] = {r.key: [clean(r.spread[0]), clean(r.spread[1])] for r in rows if r.spread is not None}
    out["repeats"] = {r.key: r.repeats for r in rows if r.repeats is not None}
    out["notes"] = {r.key: r.note for r in rows if r.value is None}
    out.update({"mode": mode, "machine": machine, **state})
    return json.dumps(out)


class Runner:
    """Runs suites one by one: progress on stderr, the engine's output hidden, a failure turns into null rows."""

    def __init__(self, debug: bool, only: list[str] | None = None) -> None:
        self.debug, self.only, self.t0 = debug, set(only or SUITE_KEYS), time.perf_counter()
        self.rows: dict[str, list[Result]] = {}

    def wanted(self, suites: list[str]) -> bool:
        return any(s in self.only for s in suites)

    def skip(self, suite: str, why: str, quiet: bool = False) -> None:
        self.rows[suite] = [Result(k, None, note=why) for k in SUITE_KEYS[suite]]
        if quiet:
            return
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {suite}: skipped ({why})", file=sys.stderr, flush=True)

    def run(self, suite: str, fn: Callable[[], Any]) -> Any:
        if suite in SUITE_KEYS and suite not in self.only:
            self.skip(suite, "not run (--only)", quiet=True)
            return None
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {suite} ...", file=sys.stderr, flush=True)
        hidden = io.StringIO()
        try:
            with contextlib.nullcontext() if self.debug else contextlib.redirect_stderr(hidden):
                out = fn()
        except Exception as e:  # noqa: BLE001 - one suite failing must not stop the others
            if self.debug:
                raise
            detail = (traceback.format_exception_only(type(e), e)[-1].strip() or type(e).__name__)[:160]
            self.skip(suite, f"failed: {detail}")
            return None
        if suite in SUITE_KEYS:
            self.rows[suite] = out
        return out


def load_pipeline(name: str) -> tuple[Any, str]:
    """The pipeline class, or None and why it does not import (a pipeline still in progress)."""
    try:
        if name == "mms":
            from mms_pipeline.pipeline import MMSPipeline as cls
        else:
            from waterbirds_pipeline.pipeline import WaterbirdsPipeline as cls
    except Exception as e:  # noqa: BLE001
        return None, f"{name} pipeline does not import ({type(e).__name__}: {str(e)[:100]})"
    return cls, ""


def setup_bench(runner: Runner, name: str, mode: str, configs: Path, data: Path, work: Path,
                suites: list[str]) -> PipelineBench | None:
    cls, why = load_pipeline(name)
    student, teacher = configs / f"{name}.yaml", configs / f"{name}_teacher.yaml"
    missing = [str(p) for p in (student, teacher) if not p.is_file()]
    if not runner.wanted(suites):
        for s in suites:
            runner.skip(s, "not run (--only)", quiet=True)
        return None
    if cls is None or missing:
        for s in suites:
            runner.skip(s, why or f"missing {', '.join(missing)}")
        return None
    bench = runner.run(f"setup {name} (synthetic data, teacher checkpoint)", lambda: PipelineBench.create(
        cls, student, teacher, OVERRIDES[mode][name], data / f"{name}_{mode}", work, SYNTH[mode][name]))
    if bench is None:
        for s in suites:
            runner.skip(s, f"{name} setup failed")
    return bench


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the Trainer sets it on CPU, for every side alike
    sizes = SIZES[mode]
    load_start, busy_start = load_average(), busy_cores()
    runner = Runner(args.debug, args.only)
    with tempfile.TemporaryDirectory(prefix="groupdistil_bench_") as tmp:
        work = Path(tmp)
        data = args.data_dir.resolve() if args.data_dir else work / "data"
        data.mkdir(parents=True, exist_ok=True)
        mms = setup_bench(runner, "mms", mode, args.configs, data, work,
                          ["step_mms", "latency_mms", "heldout", "fingerprint_mms"])
        wb = setup_bench(runner, "waterbirds", mode, args.configs, data, work,
                         ["step_waterbirds", "trainer", "epoch", "latency_waterbirds", "fingerprint_waterbirds",
                          "tensorboard"])
        if mms is not None:
            runner.run("step_mms", lambda: step_suite(mms, sizes, ""))
        if wb is not None:
            runner.run("step_waterbirds", lambda: step_suite(wb, sizes, "_waterbirds"))
            runner.run("trainer", lambda: trainer_suite(wb, sizes))
            runner.run("epoch", lambda: epoch_suite(wb, sizes))
        if mms is not None:
            runner.run("latency_mms", lambda: mms_latency_suite(mms, sizes))
            runner.run("heldout", lambda: heldout_suite(mms, sizes))
            runner.run("fingerprint_mms", lambda: fingerprint_suite(mms, sizes))
        if wb is not None:
            runner.run("latency_waterbirds", lambda: waterbirds_latency_suite(wb, sizes))
            runner.run("fingerprint_waterbirds", lambda: fingerprint_suite(wb, sizes))
            runner.run("tensorboard", lambda: tensorboard_suite(wb, sizes))
        experiment = args.configs / "experiments" / "quickstart.yaml"
        if not args.with_quickstart:
            runner.rows["quickstart"] = [Result("quickstart_seconds", None, unit="s",
                                                note="not run: pass --with-quickstart (it takes minutes)")]
        elif not experiment.is_file():
            runner.skip("quickstart", f"missing {experiment}")
        else:
            runner.run("quickstart", lambda: quickstart_suite(REPO, experiment.resolve(), work))
    state = {"load_average": {"start": load_start, "end": load_average()},
             "busy_cores": {"start": busy_start, "end": busy_cores()}}
    machine = machine_info(torch.device("cpu"))
    rows = [r for suite in SUITE_KEYS for r in runner.rows.get(suite, [])]
    print_table(mode, machine, state, rows)
    print(json_line(mode, machine, state, rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
