"""The golden file of the regression suite (``tests/golden.json``): read and write one section, and compare a
measured tree with the pinned one within bands. Shared by ``test_golden.py`` and ``test_regression_*.py``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).with_name("golden.json")


def load_section(section: str) -> dict[str, Any] | None:
    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    return data.get(section)


def write_section(section: str, values: dict[str, Any]) -> None:
    data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    data[section] = values
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def tree_diffs(got: Any, want: Any, rel: float, abs_: float, path: str = "") -> list[str]:
    """Differences between two JSON-like trees: floats within ``rel``/``abs_`` (NaN equals NaN), everything else
    exact. Keys of ``got`` that the golden tree does not have are ignored (a new logged value is not a regression)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path}: {got!r} is not a mapping"]
        missing = [f"{path}/{k}: missing (golden {want[k]!r})" for k in want if k not in got]
        return missing + [d for k in want if k in got for d in tree_diffs(got[k], want[k], rel, abs_, f"{path}/{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: {got!r} != {want!r}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in tree_diffs(g, w, rel, abs_, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        ok = math.isclose(got, want, rel_tol=rel, abs_tol=abs_) or (math.isnan(got) and math.isnan(want))
        return [] if ok else [f"{path}: golden {want!r}, now {got!r}"]
    return [] if got == want else [f"{path}: golden {want!r}, now {got!r}"]
