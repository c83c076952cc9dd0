"""Reading config and experiment files: strict YAML (YAML 1.2 floats, no duplicated keys), UTF-8, one-line errors
naming the file."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class _StrictLoader(yaml.SafeLoader):
    """YAML 1.2 floats (``1e-3`` is a number, as in YAML 1.2 and JSON) and no duplicated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"{self.name}: key '{key}' appears twice in one mapping (lines {seen[key]} and "
                                f"{key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str, name: str = "<string>") -> Any:
    """Parse YAML like ``yaml.safe_load``, with the strict loader above; ``name`` appears in its errors."""
    loader = _StrictLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml_load(read_text(path), str(path))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of keys to values")
    return data


def read_text(path: Path) -> str:
    """A UTF-8 config file (a BOM is accepted); undecodable bytes are an error naming the file and the offset."""
    from .io import read_utf8_text

    return read_utf8_text(path, "config")
