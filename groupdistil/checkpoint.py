"""Checkpoints of this project: what they hold, and how they are read without running any code from the file.

A checkpoint is a ``dict`` saved with ``torch.save`` holding only tensors and plain Python values (dicts, lists,
tuples, str, int, float, bool, None): ``format`` (:data:`CKPT_FORMAT`), ``run_hash``, ``step``, ``config``,
``model`` (a state dict) and, in ``last.pt``, the optimizer, scheduler, method and RNG states. Every load uses
``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which rebuilds tensors and plain containers
and refuses any other object, so a crafted file is rejected before anything in it can run.
"""
from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError

CKPT_FORMAT = "groupdistil-checkpoint-v1"


def resolve_checkpoint(path: str | Path, what: str = "teacher") -> Path:
    """A run folder -> its selected checkpoint; a file -> itself."""
    p = Path(path)
    if p.is_dir():
        ck = p / "checkpoints" / "best.pt"
        if not ck.is_file():
            raise UserError(f"{p}: no checkpoints/best.pt in this {what} run folder (did its run finish?)")
        return ck
    if not p.is_file():
        raise UserError(f"{p}: {what} run folder or checkpoint not found")
    return p


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint of this project, safely (``weights_only=True``); anything else is a one-line error."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says what matters
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file cannot be trusted
        first = (str(e).strip().splitlines() or [""])[0][:160]
        if isinstance(e, pickle.UnpicklingError):
            raise UserError(f"{path}: refused: not a GroupDistil checkpoint (it holds Python objects other than "
                            f"tensors and plain values, which could run code; nothing from it was run)") from None
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or "model" not in ck or "config" not in ck:
        raise UserError(f"{path}: not a GroupDistil checkpoint (missing format/model/config)")
    return ck


def load_model_from_checkpoint(path: str | Path, pipeline_cls: Any, what: str = "teacher") -> tuple[nn.Module, dict]:
    """Build the model described by the checkpoint's own config and load its weights."""
    ck_path = resolve_checkpoint(path, what)
    ck = load_checkpoint(ck_path)
    cfg = ck["config"]
    if cfg.get("pipeline") != pipeline_cls.name:
        raise UserError(f"{ck_path}: the {what} was trained with pipeline '{cfg.get('pipeline')}', "
                        f"this run uses '{pipeline_cls.name}'")
    model = pipeline_cls.model_for(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "state dict mismatch"
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"{ck_path}: the {what}'s weights do not fit the architecture of its config "
                        f"({cfg['model']}): {first} {detail}") from None
    return model, ck


# --- random number generator states as tensors and plain values (so that weights_only loading can read them) ---
def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python generator states, as tensors and tuples of ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
