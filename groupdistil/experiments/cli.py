"""The ``groupdistil compare`` subcommand (its arguments are declared in :mod:`groupdistil.cli`).

A comparison finished with the same experiment file, run configs and data files is recognised from their content
and stat (:func:`groupdistil.rundir.request_key`) before torch or a pipeline is imported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..yamlfile import load_yaml, read_text
from ..rundir import finished_with, record_request, request_key, tree_signature


def compare_request_key(args: argparse.Namespace) -> str | None:
    """What a ``compare`` asks for: the experiment file, the run configs it names, the data root's files."""
    exp = Path(args.experiment)
    if not exp.is_file():
        return None
    raw = load_yaml(exp)
    configs = {k: read_text(Path(raw[k])) for k in ("student_config", "teacher_config")
               if isinstance(raw.get(k), str) and raw[k] and Path(raw[k]).is_file()}
    data = Path(args.data_root)
    return request_key({"command": "compare", "experiment": read_text(exp), "configs": configs,
                        "set": sorted(args.set or []), "data": tree_signature(data) if data.exists() else None})


def _flat_set(item: str) -> tuple[str, object]:
    """``train.max_steps=20`` -> ``("train.max_steps", 20)`` (the value parsed as YAML, as ``run --set``)."""
    from ..config import parse_set

    key = item.split("=", 1)[0].strip()
    node: object = parse_set([item])
    for part in key.split("."):
        node = node[part]  # type: ignore[index]
    return key, node


def cmd_compare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    key = compare_request_key(args)
    if key and finished_with(out, key, "report.html"):
        print(f"[compare] {out}: every run finished and the report is written (same experiment, configs and data "
              f"files); report: {out / 'report.html'}", file=sys.stderr)
        return 0
    from .run import run_comparison

    synthesised = not Path(args.data_root).exists()
    overrides = {k: v for item in args.set or [] for k, v in [_flat_set(item)]}
    run_comparison(args.experiment, args.data_root, args.out, overrides=overrides, jobs=args.jobs,
                   reuse=args.reuse)
    if key and synthesised:  # the data root this comparison synthesised exists now: its files are in the request
        key = compare_request_key(args)
    if key:
        record_request(out, key)
    return 0
