"""BatchNorm folding for CPU inference (groupdistil.fold): which pairs fold, the folded outputs, and the fall-backs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from groupdistil import runtime
from groupdistil.fold import conv_bn_pairs, fold_batchnorm, fold_for_inference
from groupdistil.runtime import Runtime


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's layer in miniature: BatchNorm, then dropout and an activation, in one module (matched by name)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class Scaled(nn.BatchNorm2d):
    """A BatchNorm subclass that does more than normalise: never folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class Net(nn.Module):
    """conv-BN pairs in a Sequential, as named attributes, behind a timm-style BatchNormAct2d, a depthwise conv,
    plus a BatchNorm after a non-conv op (not folded) and a conv shared by two calls (not folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv_pw = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool_bn = nn.BatchNorm2d(8)  # after pooling: no conv feeds it
        self.shared = nn.Conv2d(8, 8, 3, padding=1)  # called twice: its outputs differ per call
        self.bn3 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        x = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        x = self.pool_bn(nn.functional.avg_pool2d(x, 2))
        x = self.bn3(self.shared(x)) + self.shared(x)
        return {"seg": self.head(x), "pooled": x.mean((2, 3))}


def randomise_bn(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def batchnorms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def test_pairs_come_from_the_data_flow_and_fold_to_the_same_outputs() -> None:
    torch.manual_seed(0)
    net = randomise_bn(Net())
    x = torch.randn(2, 1, 16, 16)
    assert conv_bn_pairs(net, x) == [("stem.0", "stem.1"), ("conv_dw", "bn1"), ("conv_pw", "bn2")]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded, n = fold_batchnorm(net, x)
    assert n == 3 and folded is not net
    assert batchnorms(folded) == ["pool_bn", "bn3"]  # not fed by a conv / fed by a conv called twice
    assert isinstance(folded.bn1, nn.Sequential) and isinstance(folded.bn1[1], nn.Hardswish)  # the activation stays
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the original is untouched
    with torch.inference_mode():
        want, got = net(x), folded(x)
    for head in want:
        assert torch.allclose(got[head], want[head], rtol=1e-5, atol=1e-5), head


def test_a_conv_output_used_beside_its_batchnorm_falls_back_to_the_unfolded_model() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use of y

    net = randomise_bn(Residual())
    x = torch.randn(2, 1, 8, 8)
    assert conv_bn_pairs(net, x) == [("conv", "bn")]
    assert fold_batchnorm(net, x) == (net, 0)


def test_a_batchnorm_subclass_that_does_more_is_not_folded_and_training_mode_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), Scaled(4))
    randomise_bn(net)
    assert fold_batchnorm(net, torch.randn(1, 1, 8, 8)) == (net, 0)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net.train(), torch.randn(1, 1, 8, 8))


def test_the_cpu_predictor_folds_when_made_and_matches_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = randomise_bn(Net())
    x = torch.randn(3, 1, 16, 16)
    with torch.inference_mode():
        want = net(x)
    calls = []

    def spy(model: nn.Module) -> nn.Module:
        out = fold_for_inference(model)
        calls.append(len(batchnorms(model)) - len(batchnorms(out)))
        return out

    monkeypatch.setattr(runtime, "fold_for_inference", spy)
    predict = Runtime().predictor(net)
    assert calls == [3]  # when made, before any call is timed
    first, second = predict(x), predict(x)
    assert calls == [3]
    for out in (first, second):
        for head in want:
            assert torch.allclose(out[head], want[head], rtol=1e-5, atol=1e-5), head
    assert batchnorms(net) == ["stem.1", "bn1", "bn2", "pool_bn", "bn3"]  # the trained model keeps its layers


def test_fold_for_inference_uses_its_own_random_input_and_never_fails() -> None:
    net = randomise_bn(Net())
    state = torch.get_rng_state()
    assert len(batchnorms(fold_for_inference(net))) == 2  # pool_bn and bn3 stay
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched (training reproducibility)

    class FixedSize(nn.Module):  # needs 8 x 8 inputs: the synthetic check cannot run, the model stays as it is
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(128, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(self.conv(x)).flatten(1))

    fixed = FixedSize().eval()
    assert fold_for_inference(fixed) is fixed
    linear = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    assert fold_for_inference(linear) is linear  # no convolution
