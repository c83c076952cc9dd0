"""Run configuration: YAML files checked against declared defaults (hparams-registry style).

Every key a run reads is declared once here (engine sections) or in the pipeline's ``defaults`` (``data``,
``model``, ``eval``) or in a method's ``defaults`` (``method_args``). A config may only set declared keys, with a
value of the declared type; anything else is an error that names the key and lists the valid ones.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError
from .yamlfile import load_yaml, yaml_load

ENGINE_DEFAULTS: dict[str, Any] = {
    "pipeline": None,
    "groups": None,  # written by the run: group names in index order (ignored on input)
    "run": None,  # written by the run: data fingerprint, teacher (ignored on input)
    "method": "erm",
    "seed": 0,
    "method_args": {},  # filled from the methods' defaults
    "loss": {
        "alpha": 0.5,  # classification: alpha * CE + (1 - alpha) * KD
        "tau": 4.0,  # KD temperature
        "lambda_dice": 1.0,  # segmentation: lambda_dice * Dice + lambda_ce * CE + lambda_kd * KD
        "lambda_ce": 1.0,
        "lambda_kd": 1.0,
        "heads": None,  # {head: weight}; None = every head of the pipeline with weight 1
    },
    "grouping": {  # where the training groups come from (groupdistil/grouping.py); evaluation uses the true ones
        "mode": "labels",  # labels (the metadata) | error (label x teacher right/wrong) | kmeans (teacher features)
        "k": 2,  # kmeans: clusters (within each class for a classification task)
        "seed": 0,  # kmeans initialisation
    },
    "train": {
        "max_steps": 500,
        "batch_size": 32,
        "optimizer": "sgd",  # sgd | adamw
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1.0e-4,
        "schedule": "cosine",  # constant | cosine | linear
        "warmup_steps": 0,
        "grad_clip": 0.0,  # max gradient norm; 0 disables
        "eval_every": 100,  # validate (and select the model) every N steps, and at the end
        "checkpoint_every": 100,  # write checkpoints/last.pt every N steps
        "log_every": 20,  # flush train_log.jsonl every N steps (one line per step)
        "balanced_sampling": False,  # every batch holds batch_size / G samples of each of the G training groups
        "num_workers": 0,
        "num_threads": 0,  # torch CPU threads; 0 = torch's default (one per core). Fewer when cores are shared
        "device": "auto",  # auto | cpu | cuda
        "amp": True,  # bf16 autocast on CUDA (ignored on CPU)
        "channels_last": True,  # on CUDA
        # model selection on validation: worst_group | average | worst_class (the last two need no group labels)
        "selection": "worst_group",
        "tensorboard": False,  # TensorBoard event files in RUN_DIR/tensorboard (pip install -e '.[tracking]')
        "teacher_cache": "auto",  # auto: cache teacher outputs when training inputs are deterministic | off
    },
}

# keys whose value may be any mapping (not checked key by key)
_FREE_MAPPINGS = {("loss", "heads"), ("data", "splits"), ("data", "class_map")}


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.1", "data.splits={train: ...}"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value (e.g. train.lr=0.01)")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw, f"--set {item}")
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def validate(cfg: dict[str, Any], schema: dict[str, Any], source: str, prefix: tuple[str, ...] = ()) -> None:
    """Check that ``cfg`` only uses keys of ``schema`` with values of the declared types."""
    for key, value in cfg.items():
        path = (*prefix, key)
        dotted = ".".join(path)
        if key not in schema:
            valid = ", ".join(sorted(schema)) or "(none)"
            where = ".".join(prefix) or "top level"
            raise UserError(f"{source}: unknown config key '{dotted}'; valid keys at {where}: {valid}")
        default = schema[key]
        if path in _FREE_MAPPINGS:
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{source}: config key '{dotted}' must be a mapping, got {value!r}")
            continue
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise UserError(f"{source}: config key '{dotted}' must be a mapping, got {value!r}")
            validate(value, default, source, path)
        elif not _type_ok(default, value):
            raise UserError(f"{source}: config key '{dotted}' must be of type {type(default).__name__} "
                            f"(default {default!r}), got {value!r}")


#: ``train.selection``: what model selection maximises on the validation split
SELECTIONS = ("worst_group", "average", "worst_class")


#: keys a pipeline added to its defaults after runs of it existed, with the default that reproduces the older
#: behaviour: left out of :func:`config_hash` while at that value, so finished runs (whose configs lack the key) are
#: still recognised. ``{pipeline: {dotted key: default}}``, filled by :func:`hash_neutral_at_default`
_HASH_NEUTRAL: dict[str, dict[str, Any]] = {}


def hash_neutral_at_default(pipeline: str, keys: dict[str, Any]) -> None:
    """Declare keys added to ``pipeline``'s defaults (dotted, e.g. ``model.head_kernel``) with the default that
    behaves as before they existed: a config at that value hashes as one without the key."""
    _HASH_NEUTRAL.setdefault(pipeline, {}).update(keys)


def config_hash(cfg: dict[str, Any], exclude: tuple[str, ...] = ("run",)) -> str:
    """Hash of the parts of a resolved config that define the results (keys declared with
    :func:`hash_neutral_at_default` left out while at their default)."""
    core = {k: v for k, v in cfg.items() if k not in exclude}
    neutral = _HASH_NEUTRAL.get(str(cfg.get("pipeline")), {})
    if neutral:
        core = copy.deepcopy(core)
        for dotted, default in neutral.items():
            *parents, leaf = dotted.split(".")
            section = core
            for key in parents:
                section = section.get(key) if isinstance(section, dict) else None
            if isinstance(section, dict) and leaf in section and section[leaf] == default:
                del section[leaf]
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (mappings flattened, other values as they are)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``"train.lr: 0.1 -> 0.01; seed: 0 -> 1"``: the keys whose values differ (at most ``limit``, then a count)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "(absent)") != b.get(k, "(absent)"))
    names = {"run.data_fingerprint": "the data (content fingerprint)", "run.teacher": "the teacher (run@step)"}
    parts = [f"{names.get(k, k)}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


# --- resolution: a config file + overrides -> the full, checked config of one run ---------------------------------
def config_schema(pipeline_cls: Any) -> dict[str, Any]:
    """Every key a run config of this pipeline may set, with its default (``method_args``: every method's keys)."""
    from .methods import method_arg_defaults

    return deep_merge(ENGINE_DEFAULTS, {"method_args": method_arg_defaults(), **pipeline_cls.defaults})


def resolve_config(path: str | Path, overrides: dict[str, Any] | None = None, pipeline_cls: Any = None,
                   source: str = "command line", notes: list[str] | None = None,
                   strict_method_args: bool = True) -> dict[str, Any]:
    """Load a run config, check it against the declared defaults, apply overrides, fill every default, check ranges.

    ``pipeline_cls`` (tests, experiments) must match the config's ``pipeline``; by default it is looked up by name.
    ``method_args`` keys in ``overrides`` must belong to the selected method (unless ``strict_method_args`` is
    false: an experiment's ``set`` applies to every method); keys the selected method does not use are otherwise
    left out of the run's config and named in ``notes`` (when a list is given).
    """
    from .pipeline import get_pipeline, pipeline_names

    user = load_yaml(path)
    name = user.get("pipeline")
    if not name:
        raise UserError(f"{path}: missing key 'pipeline' (valid: {', '.join(pipeline_names())})")
    if pipeline_cls is None:
        pipeline_cls = get_pipeline(name)
    elif name != pipeline_cls.name:
        raise UserError(f"{path}: pipeline '{name}' but this run uses '{pipeline_cls.name}'")
    schema = config_schema(pipeline_cls)
    overrides = overrides or {}
    file_args, over_args = _method_args_of(user, str(path)), _method_args_of(overrides, source)
    validate({k: v for k, v in user.items() if k != "method_args"}, schema, str(path))
    validate({k: v for k, v in overrides.items() if k != "method_args"}, schema, source)
    cfg = deep_merge(deep_merge(schema, user), overrides)
    cfg["method_args"] = {**file_args, **over_args}
    known = set(schema["method_args"])  # a key no method has is a typo, wherever it is
    for src, args in ((str(path), file_args), (source, over_args)):
        select_method_args({"method": cfg["method"], "method_args": {}},
                           {k: v for k, v in args.items() if k not in known}, src)
    explicit = over_args if strict_method_args else {}
    dropped = select_method_args(cfg, explicit=explicit, source=source)
    if notes is not None:
        notes += [f"{path}: method_args.{k} is not a hyperparameter of method '{cfg['method']}' (left out of this "
                  f"run's config)" for k in dropped]
    check_ranges(cfg, source, pipeline_cls)
    return cfg


def _method_args_of(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    args = cfg.get("method_args") or {}
    if not isinstance(args, dict):
        raise UserError(f"{source}: config key 'method_args' must be a mapping, got {args!r}")
    return dict(args)


def select_method_args(cfg: dict[str, Any], explicit: dict[str, Any], source: str) -> list[str]:
    """Make ``cfg["method_args"]`` exactly the selected method's hyperparameters (defaults filled, ranges checked).

    A key in ``explicit`` that the method does not have is an error listing its valid keys; other unknown keys are
    removed and returned (so the run hash covers what the method uses and nothing else).
    """
    from .methods import METHODS

    try:
        method_cls = METHODS.get(cfg["method"])
    except KeyError as e:
        raise UserError(f"{source}: {str(e).strip(chr(34) + chr(39))}") from None
    spec = method_cls.hparams_spec
    valid = ", ".join(sorted(spec)) or "(none)"
    for k in explicit:
        if k not in spec:
            raise UserError(f"{source}: method_args.{k} is not a hyperparameter of method '{cfg['method']}'; "
                            f"valid: {valid}")
    given = cfg.get("method_args") or {}
    dropped = sorted(k for k in given if k not in spec)
    args = {**method_cls.defaults(), **{k: v for k, v in given.items() if k in spec}}
    for k, v in args.items():
        why = spec[k].problem(v)
        if why:
            raise UserError(f"{source}: method_args.{k} {why} (got {v!r})")
    why = method_cls.hparams_problem(args)
    if why:
        raise UserError(f"{source}: method '{cfg['method']}': {why}")
    cfg["method_args"] = args
    return dropped


def _positive(v: Any) -> bool:
    return v > 0


@dataclass(frozen=True)
class Rule:
    """One allowed-values rule of a config key, declared once where the key is (engine: :data:`RANGES`; a
    pipeline: its ``rules``) and checked by :func:`check_rules` before anything is built or written.

    ``ok`` receives the key's value, or the whole config when ``whole`` (rules that tie two keys together);
    ``allowed`` says what is allowed, in words that complete "it must be ...".
    """

    key: str
    ok: Callable[[Any], bool]
    allowed: str
    whole: bool = False


def one_of(*values: Any) -> Callable[[Any], bool]:
    """A test for ``Rule``: the value is one of ``values``."""
    return lambda v: v in values


#: allowed values of engine keys
RANGES: tuple[Rule, ...] = (
    Rule("seed", lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    Rule("loss.alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
    Rule("loss.tau", _positive, "> 0"),
    Rule("loss.lambda_dice", lambda v: v >= 0, ">= 0"),
    Rule("loss.lambda_ce", lambda v: v >= 0, ">= 0"),
    Rule("loss.lambda_kd", lambda v: v >= 0, ">= 0"),
    Rule("train.max_steps", lambda v: v >= 1, ">= 1"),
    Rule("train.batch_size", lambda v: v >= 1, ">= 1"),
    Rule("train.optimizer", one_of("sgd", "adamw"), "sgd or adamw"),
    Rule("train.lr", _positive, "> 0"),
    Rule("train.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    Rule("train.weight_decay", lambda v: v >= 0, ">= 0"),
    Rule("train.schedule", one_of("constant", "cosine", "linear"), "constant, cosine or linear"),
    Rule("train.warmup_steps", lambda v: v >= 0, ">= 0"),
    Rule("train.grad_clip", lambda v: v >= 0, ">= 0 (0 disables)"),
    Rule("train.eval_every", lambda v: v >= 1, ">= 1"),
    Rule("train.checkpoint_every", lambda v: v >= 1, ">= 1"),
    Rule("train.log_every", lambda v: v >= 1, ">= 1"),
    Rule("train.num_workers", lambda v: v >= 0, ">= 0"),
    Rule("train.num_threads", lambda v: v >= 0, ">= 0 (0: torch's default)"),
    Rule("train.device", one_of("auto", "cpu", "cuda"), "auto, cpu or cuda"),
    Rule("train.teacher_cache", one_of("auto", "off"), "auto or off"),
    Rule("train.selection", one_of(*SELECTIONS), "worst_group, average or worst_class"),
    Rule("grouping.mode", one_of("labels", "error", "kmeans"), "labels, error or kmeans"),
    Rule("grouping.k", lambda v: v >= 2, ">= 2"),
    Rule("grouping.seed", lambda v: v >= 0, ">= 0"),
)


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, with its type and length when cut (a value in an error message
    can be any size)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f", length {len(value)}" if hasattr(value, "__len__") else ""
    return f"{text[:limit]}... ({type(value).__name__}{size})"


def lookup(cfg: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key (``"train.lr"``; a section name gives the section), None where it is absent."""
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_rules(cfg: dict[str, Any], source: str, rules: tuple[Rule, ...] | list[Rule] = RANGES) -> None:
    """Every rule holds (types were checked by :func:`validate`); else one error naming the key and what is
    allowed. A key absent from ``cfg`` or set to None is not checked."""
    import math

    for rule in rules:
        v = lookup(cfg, rule.key)
        if v is None and not rule.whole:
            continue
        try:
            good = rule.ok(cfg if rule.whole else v)
        except (TypeError, ValueError, KeyError, IndexError):
            good = False
        if good and isinstance(v, float) and not math.isfinite(v):
            good = False
        if not good:
            raise UserError(f"{source}: {rule.key} = {short_repr(v)} is not allowed; it must be {rule.allowed}")


def check_ranges(cfg: dict[str, Any], source: str, pipeline_cls: Any = None) -> None:
    """The engine's :data:`RANGES` and, given a pipeline class, its ``rules``."""
    check_rules(cfg, source, RANGES + tuple(getattr(pipeline_cls, "rules", ()) or ()))
