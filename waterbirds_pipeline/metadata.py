"""Waterbirds ``metadata.csv``: locating the data root, parsing and validating the table, groups.

Columns ``img_id, img_filename, y, split, place, place_filename``; ``split`` 0/1/2 = train/val/test, ``y`` 1 =
waterbird, ``place`` 1 = water. Group = 2 * y + place. The file must be UTF-8 (a byte-order mark is fine);
``img_filename`` must be a relative path inside the data folder (no absolute path, no ``..``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from groupdistil.errors import UserError
from groupdistil.io import file_digest, read_utf8_text

RELEASE_DIR = "waterbird_complete95_forest2water2"
METADATA = "metadata.csv"
COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")
SPLITS = ("train", "val", "test")  # codes 0, 1, 2
CLASS_NAMES = ("landbird", "waterbird")  # y
SHAPE_COLUMN = "shape"  # optional: the pretraining corpus's object class (data.label: shape)
N_SHAPES = 14  # its classes (waterbirds_pipeline.shape_images.SHAPE_NAMES)
PLACE_NAMES = ("land", "water")  # place
GROUP_NAMES = tuple(f"{c}_{p}" for c in CLASS_NAMES for p in PLACE_NAMES)  # index 2 * y + place


def group_of(y: np.ndarray, place: np.ndarray) -> np.ndarray:
    """Group index ``2 * y + place`` (landbird_land, landbird_water, waterbird_land, waterbird_water)."""
    return 2 * np.asarray(y, dtype=np.int64) + np.asarray(place, dtype=np.int64)


def resolve_root(data_root: Path) -> Path:
    """The folder holding ``metadata.csv``: ``data_root`` itself or its ``waterbird_complete95_forest2water2/``."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise UserError(f"{data_root}: Waterbirds data root does not exist (expected a folder with {METADATA})")
    for candidate in (data_root, data_root / RELEASE_DIR):
        if (candidate / METADATA).is_file():
            return candidate
    raise UserError(f"{data_root}: no {METADATA} here nor in {data_root / RELEASE_DIR}")


def fingerprint(root: Path, meta: Metadata | None = None) -> str:
    """Short hash (12 hex) of the content of ``metadata.csv`` and, for every image it lists, the image's relative
    path, size and content hash (so a replaced image changes it even when its name and size do not)."""
    root = Path(root)
    meta = read_metadata(root) if meta is None else meta
    digest = hashlib.sha256(file_digest(root / METADATA).encode())
    # One loop step per image, so the loop keeps to plain strings: each relative name is cut from the absolute path
    # by the root's prefix, and the names are sorted by their components, which is the order and the text that
    # sorting Path objects and Path.relative_to would give, without building two Path objects per image.
    prefix = os.path.join(root, "")  # every meta.path is root / its img_filename
    rel = {str(path)[len(prefix):].replace(os.sep, "/") for path in meta.path}
    for parts in sorted(r.split("/") for r in rel):
        name = "/".join(parts)
        content = _read_file(prefix + name)
        digest.update(f"{name}:{len(content)}:{hashlib.sha256(content).hexdigest()}\n".encode())
    return digest.hexdigest()[:12]


def _read_file(path: str, chunk: int = 1 << 20) -> bytes:
    """The whole file, with ``os.open`` / ``os.read``: a data set is thousands of few-KB images, so each is read
    without a buffered Python file object, whose per-file set-up weighs next to reading a few KB."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        parts = []
        while more := os.read(fd, chunk):  # until end of file (a read may return less than asked before it)
            parts.append(more)
    finally:
        os.close(fd)
    return b"".join(parts)


@dataclass(frozen=True)
class Metadata:
    """The parsed table, one entry per image, in file order (arrays of equal length N)."""

    root: Path
    img_id: np.ndarray  # int64 (N,)
    path: list[Path]  # absolute image paths
    y: np.ndarray  # int64 (N,)
    split: np.ndarray  # int64 (N,), 0 train, 1 val, 2 test
    place: np.ndarray  # int64 (N,)
    line: np.ndarray  # int64 (N,), line of the row in metadata.csv (the header is line 1)
    #: int64 (N,), the pretraining corpus's shape class (its extra column ``shape``); None without that column
    shape: np.ndarray | None = None

    @property
    def group(self) -> np.ndarray:
        return group_of(self.y, self.place)

    def where(self, split: str) -> np.ndarray:
        """Row indices of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise UserError(f"unknown Waterbirds split '{split}'; valid: {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == SPLITS.index(split))

    def describe(self, row: int) -> str:
        """``metadata.csv:LINE (img_id N)``, for error messages."""
        return f"{self.root / METADATA}:{self.line[row]} (img_id {self.img_id[row]})"


def _int_field(row: dict[str, str], column: str, n_values: int, where: str) -> int:
    """The integer in ``row[column]`` (``1`` or ``1.0``), which must lie in ``[0, n_values)``."""
    raw = (row.get(column) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or not 0 <= value < n_values:
        allowed = ", ".join(str(v) for v in range(n_values))
        raise UserError(f"{where}: column '{column}' has value '{raw}'; expected one of {allowed}")
    return int(value)


def read_metadata(root: Path) -> Metadata:
    """Parse and validate ``root/metadata.csv`` (columns, values, image files exist); images are not decoded."""
    root = Path(root)
    csv_path = root / METADATA
    reader = csv.DictReader(io.StringIO(read_utf8_text(csv_path, "metadata CSV"), newline=""))
    header = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UserError(f"{csv_path}: missing column(s) {', '.join(missing)}; found: {', '.join(header)}")
    reader.fieldnames = header
    rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise UserError(f"{csv_path}: no rows")

    columns: dict[str, list] = {"img_id": [], "path": [], "y": [], "split": [], "place": [], "line": []}
    first_line: dict[int, int] = {}
    for line, row in rows:
        img_id, path, y, split, place = _parse_row(root, f"{csv_path}:{line}", row)
        if img_id in first_line:
            raise UserError(f"{csv_path}:{line} (img_id {img_id}): duplicate img_id "
                            f"(first at line {first_line[img_id]})")
        first_line[img_id] = line
        for key, value in zip(columns, (img_id, path, y, split, place, line)):
            columns[key].append(value)
    ints = {k: np.asarray(v, dtype=np.int64) for k, v in columns.items() if k != "path"}
    if SHAPE_COLUMN in header:  # the pretraining corpus (synthetic.synthesize_corpus): a 14-class target
        ints[SHAPE_COLUMN] = np.asarray([_int_field(row, SHAPE_COLUMN, N_SHAPES, f"{csv_path}:{line}")
                                         for line, row in rows], dtype=np.int64)
    return Metadata(root=root, path=columns["path"], **ints)


def _parse_row(root: Path, line: str, row: dict[str, str]) -> tuple[int, Path, int, int, int]:
    """``(img_id, image path, y, split, place)`` of one row; ``line`` is ``metadata.csv:LINE`` for messages."""
    raw_id = (row.get("img_id") or "").strip()
    where = f"{line} (img_id {raw_id or '?'})"
    if not raw_id.isdigit():
        raise UserError(f"{where}: column 'img_id' must be a non-negative integer, got '{raw_id}'")
    y = _int_field(row, "y", len(CLASS_NAMES), where)
    split = _int_field(row, "split", len(SPLITS), where)
    place = _int_field(row, "place", len(PLACE_NAMES), where)
    rel = (row.get("img_filename") or "").strip()
    if rel and not _inside(rel):
        raise UserError(f"{where}: img_filename '{rel}' must be a relative path inside the data folder {root} "
                        f"(absolute paths and '..' are refused)")
    path = root / rel
    if not rel or not path.is_file():
        raise UserError(f"{where}: image file not found: {path}")
    return int(raw_id), path, y, split, place


def _inside(rel: str) -> bool:
    """Whether ``rel`` is a relative path that stays inside the folder it is joined to (POSIX or Windows style)."""
    for pure in (PurePosixPath(rel), PureWindowsPath(rel)):
        if pure.is_absolute() or pure.drive or pure.root or ".." in pure.parts:
            return False
    return True
