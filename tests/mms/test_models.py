"""The M&Ms U-Net's architecture options (``model.decoder_channels``: its length is the encoder depth): what they
build, that the defaults build smp's model unchanged (old checkpoints load), the config rules that name bad values,
and that runs written while the removed options existed are still recognised."""
import pytest
import segmentation_models_pytorch as smp
import torch

from groupdistil.config import check_rules, config_hash
from groupdistil.errors import UserError
from mms_pipeline.models import build_unet
from mms_pipeline.pipeline import MMSPipeline

ENCODER = "tu-tf_mobilenetv3_small_minimal_100"


def test_defaults_build_smps_unet_with_the_same_weights_names():
    torch.manual_seed(0)
    ours = build_unet(ENCODER, (32, 16, 16, 16, 16), {"seg": 4}).net
    ref = smp.Unet(encoder_name=ENCODER, encoder_weights=None, in_channels=1, classes=4,
                   decoder_channels=(32, 16, 16, 16, 16))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_four_stages_stop_the_encoder_at_stride_16_and_drop_the_blocks_no_stage_reads():
    torch.manual_seed(0)
    net = build_unet(ENCODER, (32, 16, 16, 16), {"seg": 4})
    full = build_unet(ENCODER, (32, 16, 16, 16, 16), {"seg": 4})
    assert len(net.net.decoder.blocks) == 4 and net.net.encoder._depth == 4
    assert len(net.net.encoder.model.blocks) < len(full.net.encoder.model.blocks)
    x = torch.randn(2, 1, 64, 96)
    out = net.eval()(x)["seg"]
    assert out.shape == (2, 4, 64, 96) and torch.isfinite(out).all()
    out.sum().backward()  # every parameter is used
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("model, message", [
    ({"decoder_channels": [16, 16]},
     r"config: model.decoder_channels = \[16, 16\] is not allowed; it must be 3 to 5 positive channel counts"),
    ({"decoder_channels": [32, 16, 0, 16, 16]}, r"model.decoder_channels = \[32, 16, 0, 16, 16\] is not allowed"),
    ({"cls_head": "pixels"},
     r"config: model.cls_head = 'pixels' is not allowed; it must be indices, encoder or morphology"),
])
def test_bad_architecture_options_are_named(model, message):
    with pytest.raises(UserError, match=message):
        MMSPipeline.model_for({"model": model})


@pytest.mark.parametrize("cfg, message", [
    ({"data": {"group_by": "site"}}, "data.group_by = 'site' is not allowed; it must be vendor or centre"),
    ({"data": {"roi": [100, 100]}}, r"data.roi = \[100, 100\] is not allowed; it must be two positive multiples of 32"),
    ({"data": {"spacing": [1.5, 0]}}, r"data.spacing = \[1.5, 0\] is not allowed; it must be two positive numbers"),
    ({"data": {"intensity_percentiles": [99, 1]}}, r"data.intensity_percentiles = \[99, 1\] is not allowed"),
    ({"data": {"val_fraction": 1.0}}, r"data.val_fraction = 1.0 is not allowed; it must be in \(0, 1\)"),
    ({"data": {"classes": ["NOR", "nor"]}}, "data.classes = .* is not allowed; it must be at least two distinct names"),
    ({"data": {"class_map": {"HHD": "HCMX"}}}, "data.class_map .* it must be a mapping of pathology codes to names in"),
    ({"eval": {"metric": "iou"}}, "eval.metric = 'iou' is not allowed; it must be dice or accuracy"),
    ({"eval": {"metric": "accuracy"}, "model": {"classify": False}},
     "eval.metric = 'accuracy' is not allowed; it must be dice when model.classify is false"),
    ({"eval": {"sw_batch_size": 0}}, "eval.sw_batch_size = 0 is not allowed; it must be >= 1"),
])
def test_bad_values_are_refused_by_the_rules(cfg, message):
    with pytest.raises(UserError, match=message):
        check_rules(MMSPipeline.with_defaults(cfg), "config", MMSPipeline.rules)


def test_the_defaults_pass_the_rules():
    check_rules(MMSPipeline.with_defaults({}), "config", MMSPipeline.rules)


def test_runs_written_while_the_removed_options_existed_keep_their_config_hash():
    """``model.head_kernel``, ``separable_stages`` and ``separable_head`` were removed: a run config written while
    they existed holds them at their defaults (which built the model as it is built now) and still hashes as the same
    config resolved now, so ``run``, ``--reuse`` and a teacher's record recognise it; another value is another run."""
    now = MMSPipeline.with_defaults({"pipeline": "mms", "model": {}})
    removed = {"head_kernel": 3, "separable_stages": 0, "separable_head": False}
    assert not set(removed) & set(now["model"])
    written = {**now, "model": {**now["model"], **removed}}
    assert config_hash(written, exclude=()) == config_hash(now, exclude=())
    for key, value in (("head_kernel", 1), ("separable_stages", 1), ("separable_head", True)):
        other = {**now, "model": {**now["model"], **removed, key: value}}
        assert config_hash(other, exclude=()) != config_hash(now, exclude=()), key
    # another pipeline's keys of the same name are not touched
    toy = {"pipeline": "toy", "model": {"head_kernel": 3}}
    assert config_hash(toy, exclude=()) != config_hash({"pipeline": "toy", "model": {}}, exclude=())
