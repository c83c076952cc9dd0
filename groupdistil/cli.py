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
import sys
from pathlib import Path
from typing import Any, Callable

from .config import parse_set, resolve_config
from .errors import UserError
from .pipeline import get_pipeline, synthesize_data


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import setup_process
    from .trainer import Trainer

    overrides = parse_set(args.set or [])
    for key, value in (("method", args.method), ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    for key, value in (("max_steps", args.max_steps), ("checkpoint_every", args.checkpoint_every)):
        if value is not None:
            overrides.setdefault("train", {})[key] = value
    notes: list[str] = []
    cfg = resolve_config(args.config, overrides, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    data_root = Path(args.data_root)
    if not data_root.exists():
        raise UserError(f"{data_root}: data root does not exist (make a synthetic one with "
                        f"'groupdistil synth {cfg['pipeline']} --out {data_root}')")
    setup_process(cfg["train"])
    trainer = Trainer(cfg, get_pipeline(cfg["pipeline"]), data_root, Path(args.out), args.teacher, args.force)
    trainer.run()
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    options = parse_set(args.option or [])
    synthesize_data(get_pipeline(args.pipeline), Path(args.out), args.seed, options, force=args.force)
    print(f"wrote synthetic {args.pipeline} data to {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="groupdistil", description="Group-robust knowledge distillation.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train one run (teacher, student or baseline) into a run folder")
    r.add_argument("config", help="run config YAML (configs/<pipeline>.yaml or <pipeline>_teacher.yaml)")
    r.add_argument("--data-root", required=True, help="dataset folder in the real release's layout")
    r.add_argument("--out", required=True, help="run folder (created; rerun the same command to resume)")
    r.add_argument("--method", help="erm | kd | groupdro | groupdistil (overrides the config)")
    r.add_argument("--teacher", help="the teacher's run folder or checkpoint (kd, groupdistil)")
    r.add_argument("--seed", type=int)
    r.add_argument("--max-steps", type=int)
    r.add_argument("--checkpoint-every", type=int)
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=0.01")
    r.add_argument("--force", action="store_true",
                   help="start the run folder over: remove everything the run wrote there, then train")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("synth", help="write a synthetic dataset in the real layout")
    s.add_argument("pipeline", help="mms | waterbirds")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a synthesis option, e.g. train_counts={A: 30, B: 3} (mms) or scale=0.1 (waterbirds)")
    s.add_argument("--force", action="store_true",
                   help="replace a synthetic data set written earlier into --out (never a folder with other content)")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    s.set_defaults(func=cmd_synth)

    for extra in _extra_commands:
        extra(sub)
    return p


def _add_export(sub: Any) -> None:
    from .export import add_parser

    add_parser(sub)


def _add_compare(sub: Any) -> None:
    from .experiments.cli import add_parser

    add_parser(sub)


def _add_evaluate(sub: Any) -> None:
    from .evaluate import add_parser

    add_parser(sub)


_extra_commands: list[Callable[[Any], None]] = [_add_compare, _add_export, _add_evaluate]


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
