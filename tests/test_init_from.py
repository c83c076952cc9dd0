"""``model.init_from`` (a run folder, a checkpoint or a plain state dict; the required part must load fully, a file
holding code is refused unrun) and M&Ms ``model.pretrained`` from the local caches only."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import safetensors.torch
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision

from groupdistil.checkpoint import init_from, resolve_checkpoint
from groupdistil.cli import main
from groupdistil.errors import UserError
from mms_pipeline import models as mms_models
from mms_pipeline.models import build_unet
from waterbirds_pipeline.pipeline import WaterbirdsPipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.arch=resnet18", "--set", "data.image_size=32", "--set", "train.batch_size=16",
        "--max-steps", "2"]
SUMMARY = re.compile(r"init_from (\S+): loaded (\d+) tensors, (\d+) missing, (\d+) unexpected")


@pytest.fixture(scope="module")
def wb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wb_init") / "data"
    WaterbirdsPipeline.synthesize(root, seed=0, scale=0.02, min_size=40, max_size=56)
    return root


@pytest.fixture(scope="module")
def wb_run(wb_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wb_init_run") / "teacher"
    assert main(["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(wb_root),
                 "--out", str(out), *TINY]) == 0
    return out


def _run(wb_root: Path, out: Path, init: str | Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(["run", str(ROOT / "configs/waterbirds.yaml"), "--method", "erm", "--data-root", str(wb_root),
                 "--out", str(out), *TINY, "--set", f"model.init_from={init}"])
    return code, capsys.readouterr().err


def _waterbirds_model() -> torch.nn.Module:
    return WaterbirdsPipeline.model_for({"model": {"arch": "resnet18"}})


def _assert_params_equal(model: torch.nn.Module, reference: dict[str, torch.Tensor], prefix: str = "",
                         skip: tuple[str, ...] = ()) -> int:
    n = 0
    for name, p in model.named_parameters():
        if name.startswith(prefix) and not name.startswith(skip):
            assert torch.equal(p, reference[name[len(prefix):]]), name
            n += 1
    return n


def test_init_from_run_folder_and_checkpoint(wb_run: Path) -> None:
    best = torch.load(resolve_checkpoint(wb_run), weights_only=True)["model"]
    for path in (wb_run, wb_run / "checkpoints" / "best.pt"):
        model = _waterbirds_model()
        line = init_from(model, path)
        n = len(model.state_dict())
        assert line == f"init_from {path}: loaded {n} tensors, 0 missing, 0 unexpected"
        assert _assert_params_equal(model, best) == len(list(model.parameters()))
        assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())  # buffers too


def test_init_from_plain_state_dicts(tmp_path: Path) -> None:
    """torchvision weights (1000-class fc: the head stays random) under the wrapper's ``backbone.``; nested under
    ``state_dict`` with a DDP ``module.`` prefix; an smp encoder state dict under ``net.encoder.``."""
    reference = torchvision.models.resnet18().state_dict()
    plain, nested = tmp_path / "resnet18.pth", tmp_path / "nested.pth"
    torch.save(reference, plain)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.items()}}, nested)
    for path in (plain, nested):
        model = _waterbirds_model()
        fc_before = model.backbone.fc.weight.clone()
        m = SUMMARY.fullmatch(init_from(model, path))
        assert m and (int(m[2]), int(m[3]), int(m[4])) == (len(reference) - 2, 2, 2)
        assert _assert_params_equal(model, reference, "backbone.", skip=("backbone.fc.",)) > 50
        assert torch.equal(model.backbone.fc.weight, fc_before) and model.backbone.fc.out_features == 2

    encoder = smp.encoders.get_encoder("resnet18", in_channels=1)
    enc_file = tmp_path / "encoder.pth"
    torch.save(encoder.state_dict(), enc_file)
    net = build_unet("resnet18", (32, 16, 16, 8, 8), {"seg": 4, "cls": 4})
    m = SUMMARY.fullmatch(init_from(net, enc_file))
    assert m and int(m[2]) == len(encoder.state_dict()) and int(m[4]) == 0
    assert _assert_params_equal(net, encoder.state_dict(), "net.encoder.") == len(list(encoder.parameters()))


def test_init_from_rgb_timm_weights_into_a_grey_scale_encoder(tmp_path: Path) -> None:
    """A timm state dict (RGB stem, ImageNet head) into an M&Ms ``tu-`` encoder: the stem is summed over RGB."""
    reference = timm.create_model("tf_mobilenetv3_small_minimal_100").state_dict()
    path = tmp_path / "timm.pth"
    torch.save(reference, path)
    net = build_unet("tu-tf_mobilenetv3_small_minimal_100", (32, 16, 16, 8, 8), {"seg": 4, "cls": 4})
    line = init_from(net, path)
    assert "net.encoder.model.conv_stem.weight: RGB weights summed for 1 input channel" in line
    stem = net.state_dict()["net.encoder.model.conv_stem.weight"]
    assert torch.allclose(stem, reference["conv_stem.weight"].sum(1, keepdim=True))


def test_a_waterbirds_run_initialises_an_mms_encoder(tmp_path: Path) -> None:
    """Another pipeline's run: a Waterbirds ResNet-18 (names under ``backbone.``) into the ResNet-18 encoder of an
    M&Ms U-Net (``net.encoder.``): the wrapper is dropped, the RGB stem summed, the 2-class fc left out."""
    wb = _waterbirds_model()
    path = tmp_path / "wb_resnet18.pt"
    torch.save(wb.state_dict(), path)
    net = build_unet("resnet18", (32, 16, 16, 8, 8), {"seg": 4})
    m = SUMMARY.match(init_from(net, path))
    encoder = {k: v for k, v in net.state_dict().items() if k.startswith("net.encoder.")}
    assert m and int(m[2]) == len(encoder) and int(m[4]) == 2  # backbone.fc.weight / .bias unexpected
    source = {k[len("backbone."):]: v for k, v in wb.state_dict().items()}
    for name, value in encoder.items():
        ref = source[name[len("net.encoder."):]]
        assert torch.equal(value, ref.sum(1, keepdim=True) if name == "net.encoder.conv1.weight" else ref), name


def test_trainer_applies_init_from(wb_root: Path, wb_run: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    code, err = _run(wb_root, tmp_path / "student", wb_run, capsys)
    assert code == 0, err
    assert re.search(rf"init_from {re.escape(str(wb_run))}: loaded \d+ tensors, 0 missing, 0 unexpected", err)
    assert f"init_from: {wb_run}" in (tmp_path / "student" / "config.yaml").read_text()


def test_mismatching_file_exits_2_with_the_names(wb_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), wrong)
    out = tmp_path / "student"
    code, err = _run(wb_root, out, wrong, capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {wrong}: model.init_from does not fit this model: ")
    assert "required part (backbone.)" in line and "names matched under prefix 'backbone.'" in line
    assert "backbone.layer1.0.conv1.weight: model (64, 64, 3, 3), file (64, 64, 1, 1)" in line
    assert not (out / "config.yaml").exists()  # nothing written: the corrected rerun starts cleanly
    with pytest.raises(UserError, match="does not fit this model"):
        init_from(build_unet("resnet18", (32, 16, 16, 8, 8), {"seg": 4}), wrong)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_file_runs_nothing_and_exits_2(wb_root: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "PWNED"
    plain, saved = tmp_path / "plain.pkl", tmp_path / "saved.pt"
    plain.write_bytes(pickle.dumps(_Payload(marker)))
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Payload(marker)}, saved)
    for i, path in enumerate((plain, saved)):
        code, err = _run(wb_root, tmp_path / f"run{i}", path, capsys)
        assert code == 2
        assert err.strip().splitlines()[-1].startswith(f"error: {path}: refused: not a GroupDistil checkpoint")
    assert not marker.exists()


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.init_from run folder or checkpoint not found"):
        init_from(_waterbirds_model(), tmp_path / "nowhere")


# --- M&Ms model.pretrained: the local caches only -------------------------------------------------------------------
def test_mms_pretrained_from_the_caches_or_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(mms_models.hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_network)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for encoder in ("resnet18", "tu-tf_mobilenetv3_small_minimal_100"):
        with pytest.raises(UserError) as err:
            build_unet(encoder, (32, 16, 16, 8, 8), {"seg": 4}, pretrained=True)
        assert "cannot be downloaded offline" in str(err.value) and "model.init_from" in str(err.value)
    # timm: the legacy file of its URL in the torch hub cache
    reference = timm.create_model("tf_mobilenetv3_small_minimal_100").state_dict()
    _, where = mms_models.cached_encoder_weights("tu-tf_mobilenetv3_small_minimal_100")
    legacy = Path(where.split(" ")[0])
    legacy.parent.mkdir(parents=True)
    torch.save(reference, legacy)
    net = build_unet("tu-tf_mobilenetv3_small_minimal_100", (32, 16, 16, 8, 8), {"seg": 4}, pretrained=True)
    assert torch.allclose(net.state_dict()["net.encoder.model.conv_stem.weight"],
                          reference["conv_stem.weight"].sum(1, keepdim=True))
    # smp: model.safetensors of its smp-hub repository at the pinned revision, in the hub cache
    _, where = mms_models.cached_encoder_weights("resnet18")
    assert where.startswith(str(tmp_path / "hf" / "models--smp-hub--resnet18.imagenet" / "snapshots"))
    encoder = smp.encoders.get_encoder("resnet18")
    Path(where).parent.mkdir(parents=True)
    safetensors.torch.save_file(encoder.state_dict(), where)
    net = build_unet("resnet18", (32, 16, 16, 8, 8), {"seg": 4}, pretrained=True)
    sd = net.state_dict()
    assert torch.allclose(sd["net.encoder.conv1.weight"], encoder.state_dict()["conv1.weight"].sum(1, True))
    assert torch.equal(sd["net.encoder.layer4.1.bn2.weight"], encoder.state_dict()["layer4.1.bn2.weight"])
