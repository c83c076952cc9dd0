"""The ``groupdistil compare`` subcommand (added to the command line by :mod:`groupdistil.cli`)."""
from __future__ import annotations

import argparse
from typing import Any

from .run import run_comparison


def cmd_compare(args: argparse.Namespace) -> int:
    run_comparison(args.experiment, args.data_root, args.out)
    return 0


def add_parser(sub: Any) -> None:
    """Add the ``compare`` subcommand to the CLI's subparsers."""
    c = sub.add_parser("compare", help="run a grid of methods x seeds (x parameter values) and a statistical report")
    c.add_argument("experiment", help="experiment YAML (see 'groupdistil.experiments.schema' docs for the keys)")
    c.add_argument("--data-root", required=True, help="dataset folder (or the parent of data-sweep levels)")
    c.add_argument("--out", required=True, help="comparison folder (rerun the same command to continue)")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    c.set_defaults(func=cmd_compare)
