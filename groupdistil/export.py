"""``groupdistil export RUN_DIR --format torchscript|onnx``: a run's selected model as a standalone model.

Writes ``RUN_DIR/export/model.pt`` (TorchScript) or ``model.onnx`` and ``export.json``: ``formats``, one entry per
format exported from the same selected checkpoint (merged across calls: the file, the selected step, the run hash);
the outputs (one tensor per head, in the listed order), the input shape and the preprocessing the model expects
(from the pipeline); and the model's ``role``: ``student`` (its method distils a teacher), ``teacher`` (a
comparison's ``teacher/`` run) or ``model`` (any other run trained without a teacher, e.g. one of
``configs/*_teacher.yaml``). The export runs on the CPU in float32.

A comparison folder has no checkpoint of its own: export one of its ``runs/<name>/`` or ``teacher/`` folders.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint, load_model_from_checkpoint, resolve_checkpoint
from .errors import UserError
from .io import atomic_path, atomic_write_json
from .methods import METHODS
from .pipeline import get_pipeline

FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx"}


class HeadsAsTuple(nn.Module):
    """Wraps a ``{head: logits}`` model into one returning a tuple in a fixed head order (for tracing)."""

    def __init__(self, model: nn.Module, heads: list[str]) -> None:
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.model(x)
        return tuple(out[h] for h in self.heads)


def _run_folders_inside(folder: Path) -> list[Path]:
    """The run folders of a comparison folder (its ``teacher*/`` and ``runs/*/``, also one data level down)."""
    found: list[Path] = []
    for base in [folder, *sorted(d for d in folder.iterdir() if d.is_dir())]:
        cands = sorted(base.glob("teacher*")) + (sorted((base / "runs").iterdir()) if (base / "runs").is_dir() else [])
        found += [d for d in cands if d.is_dir() and (d / "checkpoints").is_dir()]
    return found


def _check_is_run(run_dir: Path) -> None:
    """A comparison folder (no checkpoint of its own, run folders inside) -> an error naming a few of its runs."""
    if not run_dir.is_dir() or (run_dir / "checkpoints" / "best.pt").is_file():
        return
    runs = _run_folders_inside(run_dir)
    if not runs:
        return  # resolve_checkpoint says what is missing
    shown = [f"{d.relative_to(run_dir).as_posix()}/" for d in runs[:4]]
    more = f" (and {len(runs) - len(shown)} more)" if len(runs) > len(shown) else ""
    example = next((d for d in runs if d.parent.name == "runs"), runs[0])  # a student rather than the teacher
    raise UserError(f"{run_dir} is a comparison folder, not a run: export one of its run folders, e.g. "
                    f"groupdistil export {example.as_posix()}; its runs: {', '.join(shown)}{more}")


def load_selected(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The selected (``checkpoints/best.pt``) model of a run folder, in eval mode, and its checkpoint."""
    run_dir = Path(run_dir)
    _check_is_run(run_dir)
    ck = load_checkpoint(resolve_checkpoint(run_dir, "model"))
    model, ck = load_model_from_checkpoint(run_dir, get_pipeline(ck["config"]["pipeline"]), "model")
    return model.eval(), ck


def model_role(run_dir: Path, cfg: dict[str, Any]) -> str:
    """``student`` (its method distils a teacher), ``teacher`` (a comparison's ``teacher*/`` run) or ``model``."""
    try:
        if METHODS.get(cfg["method"]).needs_teacher:
            return "student"
    except KeyError:
        pass
    if run_dir.resolve().name.startswith("teacher") and (run_dir.resolve().parent / "runs").is_dir():
        return "teacher"
    return "model"


@contextmanager
def _quiet_export_deprecations() -> Iterator[None]:
    """Recent torch marks ``torch.jit.trace``/``trace_method``/``load`` deprecated on every call (a FutureWarning
    since torch 2.14, a DeprecationWarning before) and the TorchScript-based ONNX exporter (``dynamo=False``) too
    (DeprecationWarnings); they are still the exporters this command uses (the torch.export-based ONNX exporter
    needs the onnxscript package), so exactly those warnings are silenced here; any other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning,
                                module=r"torch\.onnx\.")
        yield


def _read_export_json(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"formats": {}}
    return info if isinstance(info, dict) and isinstance(info.get("formats"), dict) else {"formats": {}}


def export(run_dir: Path, fmt: str) -> Path:
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; valid: {', '.join(sorted(FORMATS))}")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UserError("ONNX export needs the onnx package: pip install -e '.[onnx]'")
    model, ck = load_selected(run_dir)
    cfg = ck["config"]
    pipeline_cls = get_pipeline(cfg["pipeline"])
    prep = pipeline_cls.preprocessing(cfg)
    shape = prep.get("input_shape")
    if not shape:
        raise UserError(f"pipeline '{cfg['pipeline']}' does not declare its input shape; cannot export")
    example = torch.randn(1, *shape)
    with torch.no_grad():
        heads = sorted(model(example))
    wrapped = HeadsAsTuple(model, heads).eval()
    out_dir = run_dir / "export"
    path = out_dir / FORMATS[fmt]
    if fmt == "torchscript":
        with torch.no_grad(), _quiet_export_deprecations():
            traced = torch.jit.trace(wrapped, example)
            with atomic_path(path) as tmp:
                traced.save(str(tmp))
    else:
        with atomic_path(path) as tmp, _quiet_export_deprecations():
            torch.onnx.export(wrapped, (example,), str(tmp), input_names=["x"], output_names=heads,
                              dynamic_axes={"x": {0: "batch"}, **{h: {0: "batch"} for h in heads}}, dynamo=False)
    info_path = out_dir / "export.json"
    entry = {"file": path.name, "selected_step": ck["step"], "run_hash": ck.get("run_hash")}
    # keep the other formats' entries that were exported from this same checkpoint (a run continued since then
    # selects another one: those files are stale and are left out of export.json)
    formats = {k: v for k, v in _read_export_json(info_path)["formats"].items() if k != fmt and isinstance(v, dict)
               and (v.get("selected_step"), v.get("run_hash")) == (entry["selected_step"], entry["run_hash"])}
    formats[fmt] = entry
    run = cfg.get("run") or {}
    atomic_write_json(info_path, {
        "role": model_role(run_dir, cfg), "method": cfg.get("method"), "distilled_from": run.get("teacher"),
        "pipeline": cfg["pipeline"], "outputs": heads, "input": {"shape": ["batch", *shape], "dtype": "float32"},
        "preprocessing": prep, "groups": cfg.get("groups"),
        "formats": {k: formats[k] for k in sorted(formats)}})
    return path


def cmd_export(args: argparse.Namespace) -> int:
    path = export(Path(args.run_dir), args.format)
    print(f"exported {path} (see export.json beside it for inputs, outputs and preprocessing)")
    return 0
