"""metadata.csv: root resolution, parsing, groups, and a UserError naming the row or file for each bad input."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from groupdistil.errors import UserError
from waterbirds_pipeline import metadata
from waterbirds_pipeline.pipeline import WaterbirdsPipeline


def _copy(src: Path, dst: Path, n_rows: int = 4) -> list[dict[str, str]]:
    """Copy the first ``n_rows`` rows of ``src`` (metadata and images) into ``dst``; return the rows."""
    with open(src / metadata.METADATA, newline="") as fh:
        rows = list(csv.DictReader(fh))[:n_rows]
    for row in rows:
        (dst / row["img_filename"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / row["img_filename"], dst / row["img_filename"])
    _write(dst, rows)
    return rows


def _write(dst: Path, rows: list[dict[str, str]], columns: tuple[str, ...] = metadata.COLUMNS) -> None:
    with open(dst / metadata.METADATA, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_group_is_2y_plus_place() -> None:
    y, place = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    np.testing.assert_array_equal(metadata.group_of(y, place), [0, 1, 2, 3])
    assert metadata.GROUP_NAMES == ("landbird_land", "landbird_water", "waterbird_land", "waterbird_water")


def test_read_metadata(synth_root: Path, synth_counts: dict[str, list[int]]) -> None:
    meta = metadata.read_metadata(synth_root)
    for code, split in enumerate(metadata.SPLITS):
        rows = meta.where(split)
        assert (meta.split[rows] == code).all()
        np.testing.assert_array_equal(np.bincount(meta.group[rows], minlength=4), synth_counts[split])
    assert meta.line[0] == 2 and meta.line[-1] == len(meta.img_id) + 1
    assert all(p.is_file() and p.is_relative_to(synth_root) for p in meta.path)
    np.testing.assert_array_equal(meta.group, 2 * meta.y + meta.place)


def test_root_may_be_the_parent_of_the_release_folder(synth_root: Path) -> None:
    assert metadata.resolve_root(synth_root) == synth_root
    assert metadata.resolve_root(synth_root.parent) == synth_root


def test_missing_root_or_metadata(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        metadata.resolve_root(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"no metadata\.csv"):
        WaterbirdsPipeline({}, tmp_path)


def test_missing_column(synth_root: Path, tmp_path: Path) -> None:
    rows = _copy(synth_root, tmp_path)
    _write(tmp_path, rows, tuple(c for c in metadata.COLUMNS if c != "place"))
    with pytest.raises(UserError, match=r"metadata\.csv: missing column\(s\) place"):
        WaterbirdsPipeline({}, tmp_path)


@pytest.mark.parametrize("column, value", [("split", "3"), ("y", "2"), ("place", "-1"), ("y", "bird"), ("split", "")])
def test_bad_value_names_line_and_img_id(synth_root: Path, tmp_path: Path, column: str, value: str) -> None:
    rows = _copy(synth_root, tmp_path)
    rows[1][column] = value
    _write(tmp_path, rows)
    with pytest.raises(UserError) as err:
        metadata.read_metadata(tmp_path)
    msg = str(err.value)
    assert f"metadata.csv:3 (img_id {rows[1]['img_id']})" in msg and f"'{column}'" in msg and f"'{value}'" in msg


def test_float_coded_values_are_accepted(synth_root: Path, tmp_path: Path) -> None:
    rows = _copy(synth_root, tmp_path)
    rows[0]["y"] = f"{rows[0]['y']}.0"
    _write(tmp_path, rows)
    assert metadata.read_metadata(tmp_path).y[0] == int(rows[0]["y"][0])


def test_duplicate_img_id(synth_root: Path, tmp_path: Path) -> None:
    rows = _copy(synth_root, tmp_path)
    rows[2]["img_id"] = rows[0]["img_id"]
    _write(tmp_path, rows)
    with pytest.raises(UserError, match=r"metadata\.csv:4 .*duplicate img_id \(first at line 2\)"):
        metadata.read_metadata(tmp_path)


def test_missing_image_file(synth_root: Path, tmp_path: Path) -> None:
    rows = _copy(synth_root, tmp_path)
    (tmp_path / rows[3]["img_filename"]).unlink()
    with pytest.raises(UserError) as err:
        WaterbirdsPipeline({}, tmp_path)
    assert f"metadata.csv:5 (img_id {rows[3]['img_id']})" in str(err.value)
    assert "image file not found" in str(err.value) and rows[3]["img_filename"] in str(err.value)


def test_fingerprint_follows_metadata(synth_root: Path, tmp_path: Path) -> None:
    rows = _copy(synth_root, tmp_path)
    before = metadata.fingerprint(tmp_path)
    assert before == metadata.fingerprint(tmp_path) and len(before) == 12
    rows[0]["split"] = "1" if rows[0]["split"] != "1" else "2"
    _write(tmp_path, rows)
    assert metadata.fingerprint(tmp_path) != before


# --- encoding, paths and the content fingerprint --------------------------------------------------------------------
def test_byte_order_mark_is_accepted(synth_root: Path, tmp_path: Path) -> None:
    rows = _copy(synth_root, tmp_path)
    plain = metadata.read_metadata(tmp_path)
    path = tmp_path / metadata.METADATA
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    meta = metadata.read_metadata(tmp_path)
    np.testing.assert_array_equal(meta.img_id, [int(r["img_id"]) for r in rows])
    assert meta.path == plain.path and (meta.line == plain.line).all()


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_non_utf8_metadata_names_the_byte_offset_and_line(synth_root: Path, tmp_path: Path, bom: bytes) -> None:
    rows = _copy(synth_root, tmp_path)
    rows[2]["place_filename"] = "/b/bamboo_forest/caf\udce9.jpg"  # a latin-1 byte 0xe9, as surrogateescape keeps it
    path = tmp_path / metadata.METADATA
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.DictWriter(fh, metadata.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    raw = bom + path.read_bytes()
    path.write_bytes(raw)
    with pytest.raises(UserError) as err:
        WaterbirdsPipeline({}, tmp_path)
    assert str(err.value) == (f"{path}: the metadata CSV is not UTF-8 text: byte 0xe9 at offset "
                              f"{raw.index(b'caf') + 3} (line 4) cannot be decoded; save the file as UTF-8")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "dotdot inside", "windows drive"])
def test_img_filename_outside_the_data_folder_is_refused(synth_root: Path, tmp_path: Path, kind: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    rows = _copy(synth_root, root)
    outside = tmp_path / "elsewhere.jpg"  # an existing image outside the data folder
    shutil.copy(root / rows[1]["img_filename"], outside)
    value = {"absolute": str(outside), "dotdot": "../elsewhere.jpg",
             "dotdot inside": f"{Path(rows[0]['img_filename']).parent}/../{rows[0]['img_filename']}",
             "windows drive": "C:\\birds\\x.jpg"}[kind]
    rows[1]["img_filename"] = value
    _write(root, rows)
    with pytest.raises(UserError) as err:
        metadata.read_metadata(root)
    assert str(err.value) == (f"{root / metadata.METADATA}:3 (img_id {rows[1]['img_id']}): img_filename '{value}' "
                              f"must be a relative path inside the data folder {root} (absolute paths and '..' "
                              f"are refused)")


def test_fingerprint_follows_image_content_not_only_size(synth_root: Path, tmp_path: Path) -> None:
    rows = _copy(synth_root, tmp_path)
    pipeline = WaterbirdsPipeline({}, tmp_path)
    before = pipeline.fingerprint()
    assert before == metadata.fingerprint(tmp_path) and len(before) == 12
    image = tmp_path / rows[2]["img_filename"]
    raw = bytearray(image.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same name, same size, other bytes
    image.write_bytes(bytes(raw))
    assert metadata.fingerprint(tmp_path) != before
    assert WaterbirdsPipeline({}, tmp_path).fingerprint() != before


def test_fingerprint_is_the_documented_hash(synth_root: Path) -> None:
    """The fast string-based loop hashes exactly what its docstring says (and what run folders recorded before it):
    sha256 of metadata.csv's digest, then per image, in path-component order, ``relpath:size:sha256``."""
    import hashlib

    from groupdistil.io import file_digest

    meta = metadata.read_metadata(synth_root)
    digest = hashlib.sha256(file_digest(synth_root / metadata.METADATA).encode())
    for path in sorted(set(meta.path)):
        digest.update(f"{path.relative_to(synth_root).as_posix()}:{path.stat().st_size}:{file_digest(path)}\n".encode())
    assert metadata.fingerprint(synth_root, meta) == digest.hexdigest()[:12]


@pytest.mark.parametrize("size", [0, 1, 4, 5, 8, 9, 4096])
def test_the_fingerprint_reads_every_byte_of_files_of_any_size(tmp_path: Path, size: int) -> None:
    """``_read_file`` (``os.read`` until end of file) returns the whole file also when it spans several chunks, ends
    exactly on a chunk boundary, or is empty (chunk 4 here, 1 MiB in use)."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "f.bin").write_bytes(data)
    assert metadata._read_file(str(tmp_path / "f.bin"), chunk=4) == data
    assert metadata._read_file(str(tmp_path / "f.bin")) == data
