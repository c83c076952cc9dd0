"""Run folders (a run's RUN_DIR, a comparison's OUT): one writer at a time, and nothing stale left behind.

- :class:`FolderLock`: an exclusive ``fcntl.flock`` on ``<folder>/.groupdistil.lock`` held for the whole command.
  The kernel releases it when the process ends, however it ends, so a killed run never blocks its rerun; a second
  process asking for it gets a one-line error naming the folder and the PID that holds it.
- :func:`remove_outputs`: what ``--force`` (and a restart before the first checkpoint) removes: the files the run
  writes, named by the engine and the pipeline, and nothing else.
- :func:`truncate_jsonl` and :func:`remove_orphan_temporaries`: a resumed run's logs end at its checkpoint, a
  torn last line is dropped, and temporary files of an interrupted atomic write are deleted.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable

from .errors import UserError
from .io import TMP_MARK, atomic_write_text

LOCK_NAME = ".groupdistil.lock"


class FolderLock:
    """``with FolderLock(folder, "run"):`` holds an exclusive lock on ``folder`` (created if missing).

    ``created`` tells whether this lock made the folder (so a failed setup can remove what it made).
    """

    def __init__(self, folder: Path, what: str = "run") -> None:
        self.folder, self.what = Path(folder), what
        self.fh = None
        self.created = False

    def __enter__(self) -> "FolderLock":
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.folder}: cannot create the {self.what} folder ({e.strerror})") from None
        path = self.folder / LOCK_NAME
        self.fh = open(path, "a+")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "unknown"
            self.fh.close()
            self.fh = None
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"{self.folder}: this {self.what} folder is in use by another groupdistil process "
                                f"(PID {holder}); wait for it to finish or use another --out") from None
            raise
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def release(self) -> None:
        # the lock file stays: unlinking it would let a process that opened it just before lock a deleted inode
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None

    def __exit__(self, *exc: object) -> None:
        self.release()

    def remove_if_empty(self) -> None:
        """After a failed setup: remove the folder if this lock created it and nothing else is in it."""
        if self.created and self.folder.is_dir() and not [p for p in self.folder.iterdir() if p.name != LOCK_NAME]:
            self.release()
            shutil.rmtree(self.folder, ignore_errors=True)


def remove_outputs(folder: Path, patterns: Iterable[str], keep: Iterable[str] = ()) -> list[str]:
    """Delete the entries of ``folder`` matching ``patterns`` (glob, top level only), except the names in ``keep``.

    Returns the removed names. Entries the run does not write (a user's notes, the lock) are never touched.
    """
    keep = set(keep) | {LOCK_NAME}
    removed = []
    for pattern in patterns:
        for p in sorted(folder.glob(pattern)):
            if p.name in keep or p.parent != folder:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def remove_orphan_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files that an atomic write killed midway left in ``folder`` and its subfolders."""
    found = [p for p in folder.rglob(f".*{TMP_MARK}*") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log; a torn (unparseable) line, as a kill during a write leaves, is skipped."""
    if not path.exists():
        return []
    out = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Keep the records of steps <= ``after_step`` (those written up to the checkpoint a run resumes from)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl(path) if r["step"] <= after_step]
    if keep:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    else:
        path.unlink()


# --- recognising finished work without starting it: a key of what was asked, checked before any heavy import ----
REQUEST_NAME = ".request.json"


def tree_signature(root: Path) -> str:
    """A hash of the relative path, size and modification time of every file under ``root`` (a stat, no reads)."""
    h = hashlib.sha256()
    root = Path(root)
    if root.is_file():
        st = root.stat()
        h.update(f"{root.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def request_key(parts: dict) -> str:
    """The key of a request: ``parts`` (JSON-able: file contents as hashes, options, tree signatures) and the
    package version, so that new code never takes an old key for its own."""
    from . import __version__

    blob = json.dumps({"version": __version__, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def finished_with(folder: Path, key: str, marker: str) -> bool:
    """True when ``folder`` holds ``marker`` (the file a finished run or comparison writes last) and the request
    that finished it had this ``key``."""
    folder = Path(folder)
    try:
        return (folder / marker).is_file() and json.loads((folder / REQUEST_NAME).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def record_request(folder: Path, key: str) -> None:
    atomic_write_text(Path(folder) / REQUEST_NAME, json.dumps({"key": key}) + "\n")


def prepare_run_dir(run_dir: Path, cfg: dict, outputs: Iterable[str], force: bool) -> str:
    """What to do with a locked RUN_DIR for this resolved ``cfg``: 'new', 'resume' or 'done'.

    A folder with other content and no ``config.yaml`` is refused, and so is a run folder made with other settings
    (naming the keys that differ), unless ``force``, which removes the run's ``outputs`` (and nothing else) first. A
    run interrupted before its first checkpoint starts over from nothing; orphan temporaries are removed."""
    import yaml

    from .config import config_diff, config_hash

    outputs = tuple(outputs)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)
        if others and not force:
            raise UserError(f"{run_dir}: not empty and not a run folder (no config.yaml; holds "
                            f"{', '.join(others[:4])}{', ...' if len(others) > 4 else ''}); use a new --out")
        remove_outputs(run_dir, outputs)
        return "new"
    try:
        old = yaml.safe_load(cfg_path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        if not force:
            raise UserError(f"{cfg_path}: unreadable ({type(e).__name__}); use --force to start the run over") from None
        old = {}
    if force or config_hash(old, exclude=()) != config_hash(cfg, exclude=()):
        if not force:
            raise UserError(f"{run_dir}: this run folder was made with other settings ({config_diff(old, cfg)}); "
                            f"use another --out, or --force to start it over")
        removed = remove_outputs(run_dir, outputs)
        print(f"--force: removed {', '.join(removed) or 'nothing'} from {run_dir}", file=sys.stderr, flush=True)
        return "new"
    if (run_dir / "metrics.json").exists():
        return "done"
    remove_orphan_temporaries(run_dir)
    if (run_dir / "checkpoints" / "last.pt").exists():
        return "resume"
    # killed before its first checkpoint: nothing to resume from, so nothing it wrote is kept
    remove_outputs(run_dir, outputs, keep=("config.yaml",))
    return "new"
