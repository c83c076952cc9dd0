"""The plan of a comparison: every run of the grid (:class:`RunSpec`) with its config and its folder.

Folder names come from the swept values: ``{"method_args.eta": 0.01}`` -> ``eta=0.01`` (the last part of a dotted
key, unless two keys share it), joined by ``__``; see :mod:`groupdistil.experiments` for the layout.
"""
from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import check_ranges, config_schema, deep_merge, resolve_config, select_method_args, validate
from ..errors import UserError
from ..pipeline import Pipeline
from .schema import PRETRAIN_PREFIX, Experiment


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """``{a: [1, 2], b: [x]}`` -> ``[{a: 1, b: x}, {a: 2, b: x}]`` (cartesian product; ``{}`` -> ``[{}]``)."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 0.1}`` -> ``{"train": {"lr": 0.1}}`` (values kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        for part in reversed(str(key).split(".")):
            value = {part: value}
        out = deep_merge(out, value)
    return out


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Dotted key -> its last part, unless two keys share a last part (then the full key)."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def fmt_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def label(values: dict[str, Any], sep: str = "__") -> str:
    """``{"method_args.eta": 0.01}`` -> ``eta=0.01`` (file-name safe)."""
    short = short_keys(list(values))
    return sep.join(re.sub(r"[^\w.=+-]", "_", f"{short[k]}={fmt_value(v)}") for k, v in values.items())


@dataclass
class RunSpec:
    """One run of the grid (the teacher has method ``teacher``)."""

    method: str
    seed: int
    params: dict[str, Any]  # swept values (dotted key -> value)
    level: dict[str, Any]  # data-sweep values (synth option -> value)
    cfg: dict[str, Any]
    run_dir: Path
    data_root: Path
    teacher_dir: Path | None = None
    init_dir: Path | None = None  # the pretraining run whose weights model.init_from (pretrain:<name>) names
    result: dict[str, float] = field(default_factory=dict)  # test metrics, filled after training
    groups: list[str] = field(default_factory=list)  # group names in index order, filled after training

    @property
    def variant(self) -> tuple[str, str, str]:
        """(data level, method, swept values): the runs of a variant differ by seed only."""
        return label(self.level), self.method, label(self.params, " ")

    @property
    def title(self) -> str:
        """``groupdistil eta=0.01``: the method and its swept values."""
        return " ".join(filter(None, [self.method, label(self.params, " ")]))


PRETRAIN = "pretrain"  # RunSpec.method of a pretraining run


def plan_pretraining(exp: Experiment, out: Path, pipeline_cls: type[Pipeline]) -> list[RunSpec]:
    """The runs of the experiment's ``pretrain`` section, in ``OUT/pretrain/<name>`` (none without it)."""
    pre = exp.pretrain
    if pre is None:
        return []
    src = f"{exp.path}: key 'pretrain'"
    specs = []
    for name, over in pre.models.items():
        cfg = resolve_config(pre.config, deep_merge(deep_merge(nest(pre.set), nest(over)), {"seed": pre.seed}),
                             pipeline_cls, src)
        specs.append(RunSpec(PRETRAIN, pre.seed, {PRETRAIN: name}, {}, cfg, out / PRETRAIN / name,
                             pre.data_root.resolve()))
    return specs


def _init_dir(cfg: dict[str, Any], exp: Experiment, out: Path, where: str) -> Path | None:
    """The pretraining run folder that ``model.init_from: pretrain:<name>`` of ``cfg`` names (None otherwise)."""
    init = (cfg.get("model") or {}).get("init_from")
    if not (isinstance(init, str) and init.startswith(PRETRAIN_PREFIX)):
        return None
    name = init[len(PRETRAIN_PREFIX):]
    names = list(exp.pretrain.models) if exp.pretrain is not None else []
    if name not in names:
        raise UserError(f"{exp.path}: key '{where}': model.init_from {init!r} names no pretraining run of this "
                        f"experiment; valid: {', '.join(PRETRAIN_PREFIX + n for n in names) or '(no pretrain section)'}")
    return out / PRETRAIN / name


def plan_runs(exp: Experiment, data_root: Path, out: Path, pipeline_cls: type[Pipeline]) -> list[RunSpec]:
    """Every run of the grid: the pretraining runs, then each data level's teacher, then students seed by seed."""
    from ..methods import METHODS

    src = str(exp.path)
    students = {m: resolve_config(exp.student_config, deep_merge(nest(exp.set), {"method": m}), pipeline_cls,
                                  f"{src}: key 'set'", strict_method_args=False) for m in exp.methods}
    variants = expand_grid(exp.sweep)
    schema = config_schema(pipeline_cls)
    for params in variants:
        validate(nest(params), schema, f"{src}: key 'sweep'")
    teachers: dict[str, dict[str, Any]] = {}  # teacher method ('' when there is one teacher) -> its config
    if exp.teacher_config is not None:
        for tm in exp.teacher_methods or [""]:
            over = deep_merge(nest(exp.teacher_set), {"seed": exp.teacher_seed, **({"method": tm} if tm else {})})
            teachers[tm] = resolve_config(exp.teacher_config, over, pipeline_cls, f"{src}: key 'teacher_set'")
    specs: list[RunSpec] = plan_pretraining(exp, out, pipeline_cls)
    for level in expand_grid(exp.data_sweep):
        root, lout = (data_root / label(level), out / label(level)) if level else (data_root, out)
        tdirs = {tm: lout / (f"teacher={tm}" if tm else "teacher") for tm in teachers}
        for tm, tcfg in teachers.items():
            specs.append(RunSpec("teacher", exp.teacher_seed, {"teacher": tm} if tm else {}, level,
                                 copy.deepcopy(tcfg), tdirs[tm], root,
                                 init_dir=_init_dir(tcfg, exp, out, "teacher_set")))
        for seed in exp.seeds:
            for method in exp.methods:
                needs = METHODS.get(method).needs_teacher
                for params in variants if method in exp.sweep_methods else [{}]:
                    cfg = deep_merge(students[method], {"seed": seed, **nest(params)})
                    select_method_args(cfg, nest(params).get("method_args") or {}, f"{src}: key 'sweep'")
                    check_ranges(cfg, f"{src}: key 'sweep'", pipeline_cls)
                    for tm in (teachers if needs else [""]):
                        p = {**params, "teacher": tm} if tm else params
                        name = "__".join(filter(None, [method, label(p), f"seed={seed}"]))
                        specs.append(RunSpec(method, seed, p, level, copy.deepcopy(cfg), lout / "runs" / name, root,
                                             tdirs[tm] if needs else None, _init_dir(cfg, exp, out, "set")))
    return specs
