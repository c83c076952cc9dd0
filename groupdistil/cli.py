"""The ``groupdistil`` command (also ``python -m groupdistil``).

    groupdistil run CONFIG.yaml --data-root DIR --out RUN_DIR [--method NAME] [--teacher PATH] [--seed N]
                    [--max-steps N] [--checkpoint-every N] [--set key=value ...] [--force] [--debug]
    groupdistil synth {mms,waterbirds} --out DIR [--seed N] [--option key=value ...] [--force]
    groupdistil compare EXPERIMENT.yaml --data-root DIR --out DIR
    groupdistil export RUN_DIR --format torchscript|onnx
    groupdistil evaluate --pred PRED --data-root DIR --out DIR [--split test|val] [--config CONFIG.yaml]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Callable

from .config import parse_set
from .yamlfile import read_text
from .errors import UserError
from .rundir import finished_with, record_request, request_key, tree_signature


def run_request_key(args: argparse.Namespace, overrides: dict[str, Any]) -> str:
    """What a ``run`` asks for, from the files' stat and content, without importing torch or a pipeline: the config
    file, the overrides, the teacher checkpoint and every file under the data root (size and modification time)."""
    teacher = None
    if args.teacher:  # a run folder's selected checkpoint, a file, or a folder of saved probabilities (every file)
        t = Path(args.teacher)
        t = t / "checkpoints" / "best.pt" if (t / "checkpoints").is_dir() else t
        teacher = tree_signature(t) if t.exists() else str(t)
    return request_key({"command": "run", "config": read_text(Path(args.config)), "overrides": overrides,
                        "teacher": teacher, "data": tree_signature(Path(args.data_root))})


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_set(args.set or [])
    for key, value in (("method", args.method), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    for key, value in (("max_steps", args.max_steps), ("checkpoint_every", args.checkpoint_every)):
        if value is not None:
            overrides.setdefault("train", {})[key] = value
    out, data_root = Path(args.out), Path(args.data_root)
    key = run_request_key(args, overrides) if data_root.exists() and Path(args.config).is_file() else None
    if key and not args.force and finished_with(out, key, "metrics.json"):
        print(f"{out}: already finished (metrics.json exists; same config, teacher and data files); nothing to do",
              file=sys.stderr)
        return 0
    from .config import resolve_config
    from .pipeline import get_pipeline
    from .runtime import setup_process
    from .trainer import Trainer

    notes: list[str] = []
    cfg = resolve_config(args.config, overrides, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not data_root.exists():
        raise UserError(f"{data_root}: data root does not exist (make a synthetic one with "
                        f"'groupdistil synth {cfg['pipeline']} --out {data_root}')")
    setup_process(cfg["train"])
    Trainer(cfg, get_pipeline(cfg["pipeline"]), data_root, out, args.teacher, args.force).run()
    if key and (out / "metrics.json").is_file():
        record_request(out, key)
    return 0


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand whose module is imported only when it runs (``groupdistil --help`` and finished-run checks stay
    free of torch)."""

    def call(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module, __package__), name)(args)

    return call


def cmd_synth(args: argparse.Namespace) -> int:
    from .pipeline import get_pipeline, synthesize_data

    options = parse_set(args.option or [])
    synthesize_data(get_pipeline(args.pipeline), Path(args.out), args.seed, options, force=args.force)
    print(f"wrote synthetic {args.pipeline} data to {args.out}", file=sys.stderr)
    return 0


def _finish_subcommand(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int],
                       force: str | None = None) -> None:
    """The options every subcommand ends with: ``--force`` (with this help, where the subcommand has one), ``--debug``
    (also accepted after the subcommand), and the function that runs it."""
    if force is not None:
        parser.add_argument("--force", action="store_true", help=force)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="groupdistil", description="Group-robust knowledge distillation.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train one run (teacher, student or baseline) into a run folder")
    r.add_argument("config", help="run config YAML (configs/<pipeline>.yaml or <pipeline>_teacher.yaml)")
    r.add_argument("--data-root", required=True, help="dataset folder in the real release's layout")
    r.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    r.add_argument("--method", help="erm | kd | groupdro | groupdistil (overrides the config)")
    r.add_argument("--teacher", help="the teacher (kd, groupdistil): its run folder or checkpoint, a TorchScript file "
                                     "with export.json beside it, or a folder of its saved probabilities")
    r.add_argument("--seed", type=int)
    r.add_argument("--max-steps", type=int)
    r.add_argument("--checkpoint-every", type=int)
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=0.01")
    _finish_subcommand(r, cmd_run,
                       force="start the run folder over: remove everything the run wrote there, then train")

    s = sub.add_parser("synth", help="write a synthetic dataset in the real layout")
    s.add_argument("pipeline", help="mms | waterbirds")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a synthesis option, e.g. train_counts={A: 30, B: 3} (mms) or scale=0.1 (waterbirds)")
    _finish_subcommand(s, cmd_synth, force="replace a synthetic data set written earlier into --out (never a folder "
                                           "with other content)")

    c = sub.add_parser("compare", help="run a grid of methods x seeds (x parameter values) and a statistical report")
    c.add_argument("experiment", help="experiment YAML (see 'groupdistil.experiments.schema' docs for the keys)")
    c.add_argument("--data-root", required=True, help="dataset folder (or the parent of data-sweep levels)")
    c.add_argument("--out", required=True, help="comparison folder (rerun the same command to continue)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a run-config key for every run of the grid, the teacher's too (e.g. "
                        "train.max_steps=20)")
    c.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once in worker processes (a run starts when its teacher has finished); "
                        "each run's output goes to OUT/logs/. Results do not depend on N")
    c.add_argument("--reuse", action="append", metavar="DIR",
                   help="another comparison folder: its finished runs with the very same resolved config (data "
                        "and teacher included) are copied in instead of trained again (repeatable)")
    _finish_subcommand(c, _lazy(".experiments.cli", "cmd_compare"))

    e = sub.add_parser("export", help="export the selected model of a run (TorchScript or ONNX)")
    e.add_argument("run_dir")
    e.add_argument("--format", default="torchscript", choices=["torchscript", "onnx"])
    _finish_subcommand(e, _lazy(".export", "cmd_export"))

    v = sub.add_parser("evaluate", help="score predictions made elsewhere (per-case files, metrics.json, report)")
    v.add_argument("--pred", required=True,
                   help="M&Ms: folder of label maps (<code>_sa_ED.nii.gz / _ES, or nnU-Net's "
                        "<code>_frame<NN>.nii.gz); Waterbirds: CSV with img_id, prediction")
    v.add_argument("--data-root", required=True, help="dataset folder in the real release's layout (with the truth)")
    v.add_argument("--out", required=True, help="output folder (new, empty, or an earlier evaluation's)")
    v.add_argument("--split", default="test", choices=["val", "test"], help="the split the predictions are of")
    v.add_argument("--config", help="run config (configs/*.yaml or a run's config.yaml) giving the data settings")
    _finish_subcommand(v, _lazy(".evaluate", "cmd_evaluate"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line without --debug, the traceback with it
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
