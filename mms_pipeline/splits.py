"""Splits and groups of the M&Ms-1 subjects (:func:`mms_pipeline.data.read_subjects`).

Splits (``data.splits``):

- ``null`` (default): as distributed: ``Training/Labeled`` = train, ``Validation`` = val, ``Testing`` = test.
- a mapping ``{train: SEL, val: SEL | "holdout", test: SEL}`` where ``SEL`` is ``{vendors: [..], centres: [..]}``
  (either or both; both = intersection) selecting from *all labelled* subjects (Training/Labeled, Validation,
  Testing). ``val`` omitted or ``"holdout"``: a seeded (``data.split_seed``), per-group stratified fraction
  ``data.val_fraction`` of the train selection. Example::

      splits: {train: {vendors: [A, B]}, test: {vendors: [C, D]}}          # val = 20% of A+B held out

  Selections must not overlap and none may be empty.

Groups (``data.group_by``): ``vendor`` (``A``..``D``) or ``centre`` (``1``..``6``); the group names are those
present in train, val or test, sorted, so a vendor that only appears in test (D) is still a group (its training
count is 0).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from groupdistil.errors import UserError

from .data import SPLITS, VENDOR_CENTRES, VENDOR_NAMES, Subject


def _select(subjects: Sequence[Subject], sel: Mapping[str, Any], name: str) -> list[Subject]:
    if not isinstance(sel, Mapping) or not sel or set(sel) - {"vendors", "centres"}:
        raise UserError(f"data.splits.{name}: expected {{vendors: [..], centres: [..]}}, got {sel!r}")
    vendors = {str(v) for v in sel.get("vendors", VENDOR_NAMES)}
    unknown = vendors - set(VENDOR_NAMES)
    if unknown:
        raise UserError(f"data.splits.{name}: unknown vendor(s) {sorted(unknown)} (valid: {', '.join(VENDOR_NAMES)})")
    centres = {int(c) for c in sel["centres"]} if "centres" in sel else None
    return [s for s in subjects if s.vendor in vendors and (centres is None or s.centre in centres)]


def _holdout(subjects: list[Subject], fraction: float, seed: int, group_by: str) -> set[str]:
    """Codes of a seeded, per-group stratified ``fraction`` of ``subjects``."""
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for group in sorted({s.group(group_by) for s in subjects}):
        codes = sorted(s.code for s in subjects if s.group(group_by) == group)
        n = int(round(fraction * len(codes)))
        held.update(rng.permutation(codes)[:n].tolist())
    return held


def assign_splits(subjects: Sequence[Subject], spec: Mapping[str, Any] | None, val_fraction: float = 0.2,
                  seed: int = 0, group_by: str = "vendor") -> dict[str, list[Subject]]:
    """``{"train": [...], "val": [...], "test": [...]}`` by ``spec`` (see the module docstring)."""
    if spec is None:
        return {split: [s for s in subjects if s.split == split] for split in SPLITS}
    if not isinstance(spec, Mapping) or set(spec) - set(SPLITS) or not {"train", "test"} <= set(spec):
        raise UserError(f"data.splits: expected keys train, test and optionally val; got {spec!r}")
    labelled = [s for s in subjects if s.label is not None]
    chosen = {name: _select(labelled, spec[name], name) for name in ("train", "test")}
    val_spec = spec.get("val", "holdout")
    if val_spec == "holdout":
        held = _holdout(chosen["train"], val_fraction, seed, group_by)
        chosen["val"] = [s for s in chosen["train"] if s.code in held]
        chosen["train"] = [s for s in chosen["train"] if s.code not in held]
    else:
        chosen["val"] = _select(labelled, val_spec, "val")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = {s.code for s in chosen[a]} & {s.code for s in chosen[b]}
        if both:
            raise UserError(f"data.splits: {a} and {b} overlap ({len(both)} subjects, e.g. {sorted(both)[0]})")
    for name in SPLITS:
        if not chosen[name]:
            raise UserError(f"data.splits.{name}: selects no labelled subject")
    return {name: [dataclasses.replace(s, split=name) for s in chosen[name]] for name in SPLITS}


def group_names(splits: Mapping[str, Sequence[Subject]], group_by: str) -> list[str]:
    """Sorted names of the groups present in any split (vendors A..D, or centres numerically)."""
    names = {s.group(group_by) for subs in splits.values() for s in subs}
    return sorted(names, key=lambda g: (len(g), g))


def group_column(group_by: str) -> str:
    """The per-case column of the groups of ``data.group_by``: ``Vendor`` or ``Centre``."""
    return "Vendor" if group_by == "vendor" else "Centre"


def group_name(g: str, column: str) -> str:
    """How reports show group ``g`` of the per-case ``column``: ``B (Philips)`` for a vendor letter, ``3 (B,
    Philips)`` for a centre (its vendor); others as they are."""
    if column == "Vendor" and g in VENDOR_NAMES:
        return f"{g} ({VENDOR_NAMES[g]})"
    vendor = next((v for v, centres in VENDOR_CENTRES.items() if str(g) in map(str, centres)), None)
    return f"{g} ({vendor}, {VENDOR_NAMES[vendor]})" if column == "Centre" and vendor else str(g)


def group_title(group: str, group_by: str) -> str:
    """How reports show a group of ``data.group_by`` (``vendor`` or ``centre``): ``A (Siemens)``, ``1 (A, Siemens)``."""
    return group_name(str(group), group_column(group_by))
