"""Checkpoints of this project: what they hold, and how they are read without running any code from the file.

A checkpoint is a ``dict`` saved with ``torch.save`` holding only tensors and plain Python values (dicts, lists,
tuples, str, int, float, bool, None): ``format`` (:data:`CKPT_FORMAT`), ``run_hash``, ``step``, ``config``,
``model`` (a state dict) and, in ``last.pt``, the optimizer, scheduler, method and RNG states. Every load uses
``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which rebuilds tensors and plain containers
and refuses any other object, so a crafted file is rejected before anything in it can run.

``model.init_from`` (:func:`init_from`, applied by the trainer to the model a run trains) starts a model from a run
folder, a checkpoint or a plain state dict, read the same safe way; the model's ``init_required`` part must load.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import random
import warnings
import zipfile
from collections import Counter
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
        also = " (nor a folder of saved teacher probabilities)" if what == "teacher" else ""
        raise UserError(f"{p}: {what} run folder or checkpoint not found{also}")
    return p


def safe_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain values only; any failure (a pickle
    payload, a truncated file) is a one-line UserError and nothing from the file runs."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file cannot be trusted
        first = (str(e).strip().splitlines() or [""])[0][:160]
        if isinstance(e, pickle.UnpicklingError):
            raise UserError(f"{path}: refused: not a GroupDistil checkpoint (it holds Python objects other than "
                            f"tensors and plain values, which could run code; nothing from it was run)") from None
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first})") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint of this project, safely (``weights_only=True``); anything else is a one-line error."""
    ck = safe_load(path)
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT or "model" not in ck or "config" not in ck:
        raise UserError(f"{path}: not a GroupDistil checkpoint (missing format/model/config)")
    return ck


def is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (a zip with a ``code/`` folder), as ``groupdistil export`` writes."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist()[:200])
    except (zipfile.BadZipFile, OSError):
        return False


class ScriptedTeacher(nn.Module):
    """A TorchScript model returning a tuple of logits, as a ``{head: logits}`` model (heads in export order)."""

    def __init__(self, scripted: nn.Module, heads: list[str]) -> None:
        super().__init__()
        self.scripted, self.heads = scripted, list(heads)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.scripted(x)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(self.heads, out))


def load_torchscript_teacher(path: Path, pipeline_cls: Any) -> tuple[nn.Module, dict]:
    """A teacher exported elsewhere as TorchScript, with its input contract in ``export.json`` beside it
    (``pipeline``, ``outputs``: the head of each output in order), e.g. by ``groupdistil export`` of another project.
    The archive holds a TorchScript program (no Python pickle): it is run, so use teachers you trust as programs."""
    contract = path.parent / "export.json"
    if not contract.is_file():
        raise UserError(f"{path}: a TorchScript teacher needs its input contract {contract.name} beside it "
                        f"(pipeline, outputs: the head of each output in order), as 'groupdistil export' writes")
    info = json.loads(contract.read_text())
    entry = info.get("formats", {}).get("torchscript", info) if isinstance(info, dict) else {}
    pipeline, heads = entry.get("pipeline", info.get("pipeline")), entry.get("outputs", info.get("outputs"))
    if pipeline != pipeline_cls.name:
        raise UserError(f"{contract}: the TorchScript teacher is for pipeline '{pipeline}', this run uses "
                        f"'{pipeline_cls.name}'")
    if not isinstance(heads, list) or not heads:
        raise UserError(f"{contract}: 'outputs' must list the head of each output (e.g. [cls, seg])")
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - an unreadable archive is a user error
        raise UserError(f"{path}: not a loadable TorchScript model ({type(e).__name__})") from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return ScriptedTeacher(scripted, heads).eval(), {"run_hash": f"torchscript-{digest}", "step": 0}


def load_model_from_checkpoint(path: str | Path, pipeline_cls: Any, what: str = "teacher") -> tuple[nn.Module, dict]:
    """Build the model described by the checkpoint's own config and load its weights (or, for a teacher, load a
    TorchScript archive with its ``export.json``: :func:`load_torchscript_teacher`)."""
    ck_path = resolve_checkpoint(path, what)
    if what == "teacher" and is_torchscript(ck_path):
        return load_torchscript_teacher(ck_path, pipeline_cls)
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


# --- model.init_from: start a model from the weights of a run, a checkpoint or a plain state dict -------------
def weights_identity(path: str | Path) -> str:
    """What ``model.init_from`` loads, by content: ``sha256:<16 hex>`` of the file (a run folder's selected
    checkpoint), recorded in the run's ``config.yaml`` (``run.init_from``) so that other starting weights make
    another run wherever the file lies."""
    from .io import file_digest

    return f"sha256:{file_digest(resolve_checkpoint(path, 'model.init_from'))[:16]}"


#: the first this many mismatching tensors are named in the error of :func:`init_from`
_SHOWN = 5


def _plain_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain state-dict file: a dict of tensors, possibly under ``state_dict`` or ``model``, with
    a DDP ``module.`` prefix dropped; non-tensor entries are ignored."""
    while isinstance(obj, dict):
        nested = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise UserError(f"{path}: model.init_from: no tensors in this file (expected a run folder, a checkpoint of "
                        f"this project, or a state dict: a dict of tensors, possibly under 'state_dict' or 'model')")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def init_state_dict(path: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights ``model.init_from`` names: a run folder (its ``checkpoints/best.pt``), a checkpoint of this
    project (its ``model``), or a plain state-dict file (torchvision, timm, smp encoder weights). Read with
    ``weights_only=True``: a file holding code is refused and nothing in it runs."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise UserError(f"model.init_from = {path!r}: expected the path of a run folder or a weights file")
    file = resolve_checkpoint(path, "model.init_from")
    obj = safe_load(file)
    if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    return file, _plain_state_dict(obj, file)


def _fit(own: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``v`` as a value of ``own``: itself when the shapes match; an RGB first convolution ``(O, 3, kh, kw)`` summed
    over its input channels for a grey-scale model ``(O, 1, kh, kw)`` (as smp and timm adapt pretrained weights);
    else ``None``."""
    if own.shape == v.shape:
        return v
    if own.dim() == 4 and v.dim() == 4 and own.shape[1] == 1 and v.shape[1] == 3 and \
            own.shape[0] == v.shape[0] and own.shape[2:] == v.shape[2:]:
        return v.sum(1, keepdim=True)
    return None


def _matches(model_sd: dict[str, torch.Tensor], source: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(1 for k, v in source.items() if (m := model_sd.get(prefix + k)) is not None and _fit(m, v) is not None)


def _wrappers(source: dict[str, torch.Tensor]) -> list[str]:
    """Name prefixes the file's tensors may sit under in the model that wrote it: ``""`` and the first name component
    shared by at least half of them (``backbone.`` of a Waterbirds run, ``encoder.`` of an smp model), so that
    another project's model or another pipeline's run (a Waterbirds ResNet-18 for an M&Ms ResNet-18 encoder) fits."""
    heads = Counter(k.split(".", 1)[0] + "." for k in source if "." in k).most_common(1)
    return [""] + [common for common, n in heads if n * 2 >= len(source)]


def _drop(source: dict[str, torch.Tensor], wrapper: str) -> dict[str, torch.Tensor]:
    """``source`` with the names under ``wrapper`` stripped of it (the others dropped); ``source`` for ``""``."""
    return {k[len(wrapper):]: v for k, v in source.items() if k.startswith(wrapper)} if wrapper else source


def init_from(model: nn.Module, path: str | Path, required: tuple[str, ...] | None = None,
              optional: tuple[str, ...] | None = None, prefixes: tuple[str, ...] | None = None) -> str:
    """Load into ``model`` every tensor of ``path`` (see :func:`init_state_dict`) that matches by name and shape;
    return the one-line summary ``init_from PATH: loaded N tensors, M missing, K unexpected``.

    ``prefixes``: where the file's names may sit in the model (``""`` for a file of the same model, e.g.
    ``"backbone."`` for plain torchvision weights in a wrapper); the prefix that matches the most tensors is used.
    A grey-scale model's first convolution takes RGB weights summed over their channels (see :func:`_fit`).
    Every model tensor whose name starts with one of ``required`` and with none of ``optional`` (the required part,
    e.g. the encoder without its classification head) must be loaded, or nothing is loaded and a UserError lists the
    first mismatching names and shapes. Other tensors (decoder, heads) keep their initialisation when absent.
    Each of the three defaults to the model's attribute ``init_required`` / ``init_optional`` / ``init_prefixes``
    (how a pipeline's model says which part is required), else ``()`` / ``()`` / ``("",)``.
    """
    required = tuple(getattr(model, "init_required", ())) if required is None else tuple(required)
    optional = tuple(getattr(model, "init_optional", ())) if optional is None else tuple(optional)
    prefixes = tuple(getattr(model, "init_prefixes", ("",))) if prefixes is None else tuple(prefixes)
    file, source = init_state_dict(path)
    own = model.state_dict()
    # (wrapper the file's names drop, prefix they take in the model): the most matches; the first of equals
    strip, prefix = max(((w, p) for w in _wrappers(source) for p in prefixes),
                        key=lambda wp: _matches(own, _drop(source, wp[0]), wp[1]))
    mapped = {prefix + k: v for k, v in _drop(source, strip).items()}
    fitted = {k: _fit(own[k], v) for k, v in mapped.items() if k in own}
    loaded = {k: v for k, v in fitted.items() if v is not None}
    adapted = [k for k in loaded if loaded[k] is not mapped[k]]
    need = [k for k in own if k.startswith(required) and not k.startswith(optional)] if required else []
    bad = [k for k in need if k not in loaded]
    if bad:
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""

        def shapes(k: str) -> str:
            return f"{k}: model {tuple(own[k].shape)}, file {tuple(mapped[k].shape) if k in mapped else 'absent'}"
        dropped = f", the file's prefix '{strip}' dropped" if strip else ""
        raise UserError(
            f"{file}: model.init_from does not fit this model: {len(bad)} of the {len(need)} tensors of its required "
            f"part ({', '.join(required)}) are absent or of another shape (names matched under prefix '{prefix}'"
            f"{dropped}): "
            f"{'; '.join(shapes(k) for k in bad[:_SHOWN])}{more}")
    model.load_state_dict(loaded, strict=False)
    return (f"init_from {path}: loaded {len(loaded)} tensors, {len(own) - len(loaded)} missing, "
            f"{len(mapped) - len(loaded)} unexpected"
            + (f" ({', '.join(adapted)}: RGB weights summed for 1 input channel)" if adapted else ""))


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
