"""``groupdistil export``: the exported student gives the same predictions as its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from groupdistil.cli import main
from groupdistil.export import load_selected
from waterbirds_pipeline.pipeline import WaterbirdsPipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    WaterbirdsPipeline.synthesize(base / "data", seed=0, scale=0.02, min_size=40, max_size=56)
    out = base / "run"
    assert main(["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(base / "data"),
                 "--out", str(out), "--max-steps", "4", "--set", "model.arch=resnet18", "--set", "data.image_size=32",
                 "--set", "train.batch_size=16", "--set", "train.eval_every=2"]) == 0
    return out


def test_torchscript_export_matches_checkpoint(run_dir, capsys):
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    info = json.loads((run_dir / "export" / "export.json").read_text())
    assert info["outputs"] == ["cls"] and info["input"]["shape"] == ["batch", 3, 32, 32]
    assert "mean" in json.dumps(info["preprocessing"]).lower()
    exported = torch.jit.load(str(run_dir / "export" / "student.pt"))
    model, _ = load_selected(run_dir)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], model(x)["cls"], rtol=1e-4, atol=1e-5)


def test_export_of_a_folder_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "checkpoints/best.pt" in capsys.readouterr().err
