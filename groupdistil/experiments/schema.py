"""The experiment file of ``groupdistil compare``: its keys, their checks, and :class:`Experiment`.

Experiment YAML (relative paths resolve against the current working directory)::

    student_config: configs/waterbirds.yaml         # required: the run config of every student run
    teacher_config: configs/waterbirds_teacher.yaml # the implicit teacher run; required when a method distils
    methods: [erm, kd, groupdro, groupdistil]       # required; 'teacher' is not a method (it always runs)
    seeds: [0, 1, 2]                                # student seeds (default [0])
    teacher_seed: 0                                 # default 0
    set: {train.max_steps: 2000}                    # dotted overrides for every student run (like --set)
    teacher_set: {train.max_steps: 4000}            # dotted overrides for the teacher run
    teacher_methods: [erm, groupdro]                # one teacher per method (default: the teacher config's);
                                                    # students run once per teacher (key 'teacher' in the tables)
    sweep: {method_args.eta: [0.001, 0.01, 0.1]}    # grid: cartesian product over the keys
    sweep_methods: [groupdistil]                    # methods the sweep applies to (default: all); others once per seed
    pairs: [[groupdistil, kd]]                      # paired comparisons first - second (default [[groupdistil, kd]])
    data:
      synthesize_if_missing: true                   # write a missing data root with the pipeline's synthesize()
      seed: 0                                       # synthesis seed
      options: {}                                   # fixed synthesize() options
      sweep: {minority_scale: [1.0, 0.25, 0.05]}    # data levels DATA_ROOT/<option>=<value>, each with its own teacher
    metric_note: "..."                              # what the metrics mean (default: the pipeline's metric_note)
    pretrain:                                       # optional: pretraining runs, trained once, in OUT/pretrain/<name>
      config: configs/waterbirds_teacher.yaml       # run config of every pretraining run
      data_root: data/waterbirds_pretrain           # its data; synthesised when missing (data.seed, data.options)
      data: {seed: 0, options: {corpus: pretrain}}
      seed: 0
      set: {train.max_steps: 2000}                  # overrides for every pretraining run
      models: {resnet50: {model.arch: resnet50}}    # name -> overrides; runs start from one with
                                                    # set / teacher_set {model.init_from: pretrain:<name>}

``set``/``sweep``/``teacher_set`` keys are checked against the run-config schema when the runs are planned
(:func:`groupdistil.experiments.plan.plan_runs`); ``seed`` and ``pipeline`` (and ``method`` for students) are set by
the experiment. Data-sweep levels are always synthesised when missing (into a ``.partial`` folder renamed on
success); a multi-option data sweep is the cartesian product, named ``<a>=<x>__<b>=<y>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import deep_merge, load_yaml, validate
from ..errors import UserError

EXPERIMENT_SCHEMA: dict[str, Any] = {
    "student_config": "", "teacher_config": "", "methods": [], "seeds": [0], "teacher_seed": 0, "teacher_methods": [],
    "set": {}, "teacher_set": {}, "sweep": {}, "sweep_methods": [], "pairs": [], "metric_note": "",
    "data": {"synthesize_if_missing": False, "seed": 0, "options": {}, "sweep": {}},
    "pretrain": {"config": "", "data_root": "", "seed": 0, "set": {}, "models": {},
                 "data": {"seed": 0, "options": {}}},
}
_FREE = {("set",), ("teacher_set",), ("sweep",), ("data", "options"), ("data", "sweep"),  # keys not checked
         ("pretrain", "set"), ("pretrain", "models"), ("pretrain", "data", "options")}
PRETRAIN_PREFIX = "pretrain:"  # model.init_from: pretrain:<name> -> the pretraining run <name> of the experiment
_RESERVED = {"seed", "pipeline", "groups", "run"}  # set by the experiment or by the run itself


@dataclass
class Pretrain:
    """The ``pretrain`` section: one run per entry of ``models``, each trained once into ``OUT/pretrain/<name>``."""

    config: Path
    data_root: Path
    data_seed: int
    data_options: dict[str, Any]
    seed: int
    set: dict[str, Any]
    models: dict[str, dict[str, Any]]


@dataclass
class Experiment:
    """A validated experiment file (see the module docstring for the keys)."""

    path: Path
    student_config: Path
    teacher_config: Path | None
    methods: list[str]
    seeds: list[int]
    teacher_seed: int
    set: dict[str, Any]
    teacher_set: dict[str, Any]
    teacher_methods: list[str]  # [] = the teacher config's method; several = one teacher each (robust teachers)
    sweep: dict[str, list[Any]]
    sweep_methods: list[str]
    pairs: list[tuple[str, str]]
    synthesize_if_missing: bool
    data_seed: int
    data_options: dict[str, Any]
    data_sweep: dict[str, list[Any]]
    metric_note: str
    pretrain: Pretrain | None = None


def _check_schema(raw: dict[str, Any], src: str, schema: dict[str, Any] = EXPERIMENT_SCHEMA,
                  prefix: tuple[str, ...] = ()) -> None:
    """Keys and value types of the experiment file (inside free mappings only that they are mappings)."""
    for key, value in raw.items():
        path = (*prefix, key)
        if isinstance(schema.get(key), dict):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{src}: key '{'.'.join(path)}' must be a mapping, got {value!r}")
            if path not in _FREE and value:
                _check_schema(value, src, schema[key], path)
        else:
            validate({key: value}, schema, src, prefix)


def _names(src: str, key: str, values: Any, valid: Sequence[str], what: str) -> list[str]:
    if not isinstance(values, list) or any(not isinstance(v, str) for v in values):
        raise UserError(f"{src}: key '{key}' must be a list of {what} names, got {values!r}")
    for v in values:
        if v == "teacher":
            raise UserError(f"{src}: key '{key}': 'teacher' is not a method (the teacher run is implicit; configure "
                            f"it with teacher_config, teacher_seed, teacher_set)")
        if v not in valid:
            raise UserError(f"{src}: key '{key}': unknown {what} '{v}'; valid: {', '.join(valid)}")
    if len(set(values)) != len(values):
        raise UserError(f"{src}: key '{key}' lists a {what} twice: {values!r}")
    return list(values)


def _grid(src: str, key: str, mapping: dict[str, Any]) -> dict[str, list[Any]]:
    for k, v in mapping.items():
        if not isinstance(v, list) or not v:
            raise UserError(f"{src}: key '{key}.{k}' must be a non-empty list of values, got {v!r}")
        if len(set(map(repr, v))) != len(v):
            raise UserError(f"{src}: key '{key}.{k}' repeats a value: {v!r}")
    return {str(k): list(v) for k, v in mapping.items()}


def _overrides(src: str, key: str, mapping: dict[str, Any], reserved: set[str]) -> dict[str, Any]:
    for k in mapping:
        if str(k).split(".")[0] in reserved:
            raise UserError(f"{src}: key '{key}.{k}' is set by the experiment, not by overrides "
                            f"(use methods / seeds / teacher_seed)")
    return dict(mapping)


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment YAML; errors name the file and the key."""
    from ..methods import METHODS

    raw = load_yaml(path)
    src = str(path)
    _check_schema(raw, src)
    e = deep_merge(EXPERIMENT_SCHEMA, raw)
    for key in ("student_config", "methods"):
        if not e[key]:
            raise UserError(f"{src}: missing key '{key}'")
    methods = _names(src, "methods", e["methods"], METHODS.names(), "method")
    sweep_methods = _names(src, "sweep_methods", e["sweep_methods"] or methods, methods, "method of 'methods'")
    default_pairs = [["groupdistil", "kd"]] if {"groupdistil", "kd"} <= set(methods) else []
    pairs_raw = e["pairs"] if "pairs" in raw else default_pairs
    pairs: list[tuple[str, str]] = []
    for pair in pairs_raw:
        ab = _names(src, "pairs", pair, methods, "method of 'methods'")
        if len(ab) != 2:
            raise UserError(f"{src}: key 'pairs': each entry is [first, second] (reported as first − second), "
                            f"got {pair!r}")
        pairs.append((ab[0], ab[1]))
    seeds = e["seeds"]
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        raise UserError(f"{src}: key 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    teacher = e["teacher_config"] or None
    if teacher is None and any(METHODS.get(m).needs_teacher for m in methods):
        needy = [m for m in methods if METHODS.get(m).needs_teacher]
        raise UserError(f"{src}: missing key 'teacher_config' (methods {', '.join(needy)} distil a teacher)")
    teacher_methods = _names(src, "teacher_methods", e["teacher_methods"] or [], METHODS.names(), "method")
    for m in teacher_methods:
        if METHODS.get(m).needs_teacher:
            raise UserError(f"{src}: key 'teacher_methods': '{m}' distils a teacher itself; a teacher is trained "
                            f"from labels (e.g. erm, groupdro)")
    if teacher_methods and teacher is None:
        raise UserError(f"{src}: key 'teacher_methods' needs 'teacher_config'")
    d = e["data"]
    pretrain = _pretrain(src, e["pretrain"]) if raw.get("pretrain") else None
    return Experiment(
        path=Path(path), student_config=Path(e["student_config"]), teacher_config=Path(teacher) if teacher else None,
        methods=methods, seeds=list(seeds), teacher_seed=e["teacher_seed"],
        set=_overrides(src, "set", e["set"] or {}, _RESERVED | {"method"}),
        teacher_set=_overrides(src, "teacher_set", e["teacher_set"] or {}, _RESERVED | {"method"}),
        teacher_methods=teacher_methods,
        sweep=_grid(src, "sweep", _overrides(src, "sweep", e["sweep"] or {}, _RESERVED | {"method"})),
        sweep_methods=sweep_methods, pairs=pairs, synthesize_if_missing=d["synthesize_if_missing"],
        data_seed=d["seed"], data_options=dict(d["options"] or {}),
        data_sweep=_grid(src, "data.sweep", d["sweep"] or {}),
        metric_note=e["metric_note"], pretrain=pretrain)


def _pretrain(src: str, pre: dict[str, Any]) -> Pretrain:
    for key in ("config", "data_root", "models"):
        if not pre[key]:
            raise UserError(f"{src}: missing key 'pretrain.{key}'")
    models: dict[str, dict[str, Any]] = {}
    for name, over in pre["models"].items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"{src}: key 'pretrain.models': the name {name!r} must be letters, digits, '-' or '_'")
        if over is not None and not isinstance(over, dict):
            raise UserError(f"{src}: key 'pretrain.models.{name}' must be a mapping of overrides, got {over!r}")
        models[name] = _overrides(src, f"pretrain.models.{name}", over or {}, _RESERVED | {"method"})
    return Pretrain(config=Path(pre["config"]), data_root=Path(pre["data_root"]), data_seed=pre["data"]["seed"],
                    data_options=dict(pre["data"]["options"] or {}), seed=pre["seed"],
                    set=_overrides(src, "pretrain.set", pre["set"] or {}, _RESERVED | {"method"}), models=models)
