"""``groupdistil export RUN_DIR --format torchscript|onnx``: the selected student as a standalone model.

Writes ``RUN_DIR/export/student.pt`` (TorchScript) or ``student.onnx`` and ``export.json``: the outputs (one tensor
per head, in the listed order), the input shape and the preprocessing the model expects (from the pipeline).
The export runs on the CPU in float32.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint, load_model_from_checkpoint, resolve_checkpoint
from .errors import UserError
from .io import atomic_path, atomic_write_json
from .pipeline import get_pipeline


class HeadsAsTuple(nn.Module):
    """Wraps a ``{head: logits}`` model into one returning a tuple in a fixed head order (for tracing)."""

    def __init__(self, model: nn.Module, heads: list[str]) -> None:
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.model(x)
        return tuple(out[h] for h in self.heads)


def load_selected(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    ck = load_checkpoint(resolve_checkpoint(run_dir, "student"))
    model, ck = load_model_from_checkpoint(run_dir, get_pipeline(ck["config"]["pipeline"]), "student")
    return model.eval(), ck


def export(run_dir: Path, fmt: str) -> Path:
    run_dir = Path(run_dir)
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
    if fmt == "torchscript":
        path = out_dir / "student.pt"
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, example)
        with atomic_path(path) as tmp:
            traced.save(str(tmp))
    elif fmt == "onnx":
        if importlib.util.find_spec("onnx") is None:
            raise UserError("ONNX export needs the onnx package: pip install -e '.[onnx]'")
        path = out_dir / "student.onnx"
        with atomic_path(path) as tmp:
            torch.onnx.export(wrapped, (example,), str(tmp), input_names=["x"], output_names=heads,
                              dynamic_axes={"x": {0: "batch"}, **{h: {0: "batch"} for h in heads}}, dynamo=False)
    else:
        raise UserError(f"unknown export format '{fmt}'; valid: onnx, torchscript")
    atomic_write_json(out_dir / "export.json", {
        "file": path.name, "format": fmt, "pipeline": cfg["pipeline"], "selected_step": ck["step"],
        "outputs": heads, "input": {"shape": ["batch", *shape], "dtype": "float32"}, "preprocessing": prep,
        "groups": cfg.get("groups")})
    return path


def cmd_export(args: argparse.Namespace) -> int:
    path = export(Path(args.run_dir), args.format)
    print(f"exported {path} (see export.json beside it for inputs, outputs and preprocessing)")
    return 0
