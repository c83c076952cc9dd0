"""The M&Ms U-Net's architecture options (``model.decoder_channels`` length, ``head_kernel``, ``separable_stages``):
what each builds, that the defaults build smp's model unchanged (old checkpoints load), and clear errors."""
import pytest
import segmentation_models_pytorch as smp
import torch

from groupdistil.config import config_hash
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


def test_four_stages_stop_the_encoder_at_stride_16_with_a_1x1_head_and_a_separable_last_stage():
    torch.manual_seed(0)
    net = build_unet(ENCODER, (32, 16, 16, 16), {"seg": 4}, head_kernel=1, separable_stages=1)
    full = build_unet(ENCODER, (32, 16, 16, 16, 16), {"seg": 4})
    assert len(net.net.decoder.blocks) == 4 and net.net.encoder._depth == 4
    head = net.net.segmentation_head[0]
    assert head.kernel_size == (1, 1) and head.padding == (0, 0)
    last, before = net.net.decoder.blocks[-1], net.net.decoder.blocks[-2]
    depthwise = [m for m in last.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert [m.groups for m in depthwise] == [16, 16]  # conv1 and conv2 of the last stage
    assert not any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in before.modules())
    assert sum(p.numel() for p in net.parameters()) < 0.8 * sum(p.numel() for p in full.parameters())
    x = torch.randn(2, 1, 64, 96)
    out = net.eval()(x)["seg"]
    assert out.shape == (2, 4, 64, 96) and torch.isfinite(out).all()
    out.sum().backward()  # every parameter is used
    assert all(p.grad is not None for p in net.parameters())


def test_the_separable_head_keeps_a_3x3_view_in_two_convolutions():
    torch.manual_seed(0)
    net = build_unet(ENCODER, (32, 16, 16, 16, 16), {"seg": 4}, separable_head=True)
    depthwise, bn, pointwise = net.net.segmentation_head[0]
    assert depthwise.groups == 16 and depthwise.kernel_size == (3, 3) and isinstance(bn, torch.nn.BatchNorm2d)
    assert pointwise.kernel_size == (1, 1) and pointwise.out_channels == 4
    grad = torch.autograd.functional.jacobian(lambda t: net.eval().net.segmentation_head(t)[0, 0, 32, 32],
                                              torch.randn(1, 16, 64, 64))
    touched = grad.abs().sum(1)[0].nonzero()  # the head's output pixel depends on a 3 x 3 neighbourhood
    assert touched[:, 0].unique().tolist() == [31, 32, 33] and touched[:, 1].unique().tolist() == [31, 32, 33]
    with pytest.raises(UserError, match="model.separable_head: needs model.head_kernel 3, got 1"):
        build_unet(ENCODER, (32, 16, 16, 16, 16), {"seg": 4}, head_kernel=1, separable_head=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"decoder_channels": (16, 16)}, r"model.decoder_channels: one entry per decoder stage, 3 to 5 .*\[16, 16\]"),
    ({"head_kernel": 5}, r"model.head_kernel: 1 or 3, got 5"),
    ({"separable_stages": 6}, r"model.separable_stages: 0 to 5 \(the decoder stages\), got 6"),
])
def test_bad_architecture_options_are_named(kwargs, message):
    args = {"decoder_channels": (32, 16, 16, 16, 16), **kwargs}
    with pytest.raises(UserError, match=message):
        build_unet(ENCODER, args.pop("decoder_channels"), {"seg": 4}, **args)


def test_the_new_keys_at_their_defaults_keep_the_config_hash_of_older_runs():
    """A run written before ``head_kernel`` / ``separable_stages`` existed (its config lacks them) hashes as the same
    config resolved now, so ``--reuse`` and ``run`` still recognise it; another value is another run."""
    now = MMSPipeline.with_defaults({"pipeline": "mms", "model": {}})
    new_keys = ("head_kernel", "separable_stages", "separable_head")
    assert [now["model"][k] for k in new_keys] == [3, 0, False]
    older = {**now, "model": {k: v for k, v in now["model"].items() if k not in new_keys}}
    assert config_hash(older, exclude=()) == config_hash(now, exclude=())
    for key, value in (("head_kernel", 1), ("separable_stages", 1), ("separable_head", True)):
        other = {**now, "model": {**now["model"], key: value}}
        assert config_hash(other, exclude=()) != config_hash(now, exclude=()), key
    # another pipeline's keys of the same name are not touched
    toy = {"pipeline": "toy", "model": {"head_kernel": 3}}
    assert config_hash(toy, exclude=()) != config_hash({"pipeline": "toy", "model": {}}, exclude=())
