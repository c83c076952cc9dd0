"""``groupdistil export``: the exported model gives the same predictions as its checkpoint (TorchScript always,
ONNX with onnxruntime when the ``[onnx]`` extra is installed); ``export.json`` keeps one entry per format."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from groupdistil.cli import main
from groupdistil.export import load_selected, model_role
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
    (run_dir / "export").mkdir(exist_ok=True)  # an entry exported from another checkpoint is stale: left out
    (run_dir / "export" / "export.json").write_text(json.dumps(
        {"formats": {"onnx": {"file": "model.onnx", "selected_step": -1, "run_hash": "old"}}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    jit = [str(w.message) for w in caught if "torch.jit" in str(w.message)]
    assert not jit, f"torch.jit deprecation warnings leaked from the export: {jit}"
    assert "model.pt" in capsys.readouterr().out
    info = json.loads((run_dir / "export" / "export.json").read_text())
    assert info["outputs"] == ["cls"] and info["input"]["shape"] == ["batch", 3, 32, 32]
    assert "mean" in json.dumps(info["preprocessing"]).lower()
    assert info["role"] == "model" and info["method"] == "erm" and info["distilled_from"] is None
    assert list(info["formats"]) == ["torchscript"] and info["formats"]["torchscript"]["file"] == "model.pt"
    assert not (run_dir / "export" / "student.pt").exists()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        exported = torch.jit.load(str(run_dir / "export" / "model.pt"))
    model, _ = load_selected(run_dir)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], model(x)["cls"], rtol=1e-4, atol=1e-5)


def test_onnx_export_matches_checkpoint_and_keeps_the_torchscript_entry(run_dir):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    deprecations = [str(w.message) for w in caught if any(
        m in str(w.message) for m in ("torch.jit", "TorchScript-based ONNX export", "feature will be removed"))]
    assert not deprecations, f"torch's exporter deprecation warnings leaked from the export: {deprecations}"
    info = json.loads((run_dir / "export" / "export.json").read_text())
    assert sorted(info["formats"]) == ["onnx", "torchscript"]  # merged, not overwritten
    assert info["formats"]["onnx"]["file"] == "model.onnx" and info["formats"]["torchscript"]["file"] == "model.pt"
    sess = ort.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == info["outputs"] == ["cls"]
    model, _ = load_selected(run_dir)
    x = torch.randn(5, 3, 32, 32)  # a batch size other than the example's: the batch axis is dynamic
    (got,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x)["cls"], rtol=1e-4, atol=1e-4)


def test_export_of_a_folder_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "checkpoints/best.pt" in capsys.readouterr().err


def test_export_of_a_comparison_folder_points_to_its_runs(tmp_path, capsys):
    cmp = tmp_path / "cmp"
    names = ["teacher", "runs/erm__seed=0", "runs/groupdistil__seed=0", "runs/kd__seed=0", "runs/kd__seed=1",
             "runs/kd__seed=2"]
    for name in names:
        (cmp / name / "checkpoints").mkdir(parents=True)
        (cmp / name / "checkpoints" / "best.pt").write_bytes(b"")
    assert main(["export", str(cmp)]) == 2
    err = capsys.readouterr().err
    assert "comparison folder" in err and "teacher/" in err and "runs/erm__seed=0/" in err
    assert "(and 2 more)" in err and "Traceback" not in err
    assert f"groupdistil export {(cmp / 'runs' / 'erm__seed=0').as_posix()}" in err  # a student as the example
    levels = tmp_path / "sweep"  # a data sweep: each level holds its own teacher/ and runs/
    for name in ["frac=0.5/teacher", "frac=0.5/runs/kd__seed=0"]:
        (levels / name / "checkpoints").mkdir(parents=True)
    assert main(["export", str(levels)]) == 2
    err = capsys.readouterr().err
    assert "frac=0.5/teacher/" in err and "frac=0.5/runs/kd__seed=0/" in err


def test_role_of_the_exported_model(tmp_path):
    assert model_role(tmp_path / "runs" / "kd__seed=0", {"method": "kd"}) == "student"
    assert model_role(tmp_path / "runs" / "erm__seed=0", {"method": "erm"}) == "model"
    (tmp_path / "runs").mkdir()
    (tmp_path / "teacher").mkdir()
    assert model_role(tmp_path / "teacher", {"method": "erm"}) == "teacher"
    assert model_role(tmp_path / "wb_teacher", {"method": "erm"}) == "model"
