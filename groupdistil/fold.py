"""Inference-time folding of BatchNorm into the convolution that feeds it (CPU predictors, issue 17).

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` is one convolution with scaled weights and
a shifted bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). On the CPU a small student's BatchNorm kernels over
its full-resolution, few-channel maps are a measurable share of its forward pass (``benchmarks/README.md``); folded,
they do not run at all.

Which BatchNorm follows which convolution is read from the data flow of one forward pass (the BatchNorm's input *is*
the convolution's output tensor), not from module names or registration order; a pair is folded only when both
modules run exactly once in that pass. The folded copy is then checked against the original on the same input and
used only if every output agrees to float32 rounding: any structure this cannot see (a convolution's output also
used elsewhere, a BatchNorm subclass that does more than normalise) falls back to the unfolded model.
:func:`fold_for_inference` does both on a small synthetic input, so a predictor is folded when it is made, before
anything is timed.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: outputs of the folded model must match the original's within this, relative to each output's largest magnitude
FOLD_RTOL = 1e-4


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What stays of ``bn`` once its normalisation is folded away: nothing for a plain ``BatchNorm2d``, the dropout
    and activation of timm's ``BatchNormAct2d``; ``None`` for any other subclass (not folded)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and isinstance(getattr(bn, "act", None), nn.Module):
        return nn.Sequential(getattr(bn, "drop", nn.Identity()), bn.act)
    return None


def conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` of every BatchNorm2d fed directly by a Conv2d in one forward pass of ``model``
    on ``example``, both called once (:func:`fold_batchnorm` checks that they are in eval mode)."""
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    # id(conv output) -> (weak reference to it, conv name): the outputs are not kept alive (a large first batch would
    # otherwise hold every activation of the pass), and a reused id cannot match a dead reference
    produced: dict[int, tuple[weakref.ref, str]] = {}
    fed: list[tuple[str, str]] = []

    def conv_hook(module: nn.Module, args: Any, out: Any) -> None:
        calls[names[module]] = calls.get(names[module], 0) + 1
        if isinstance(out, Tensor):
            produced[id(out)] = (weakref.ref(out), names[module])

    def bn_hook(module: nn.Module, args: Any) -> None:
        calls[names[module]] = calls.get(names[module], 0) + 1
        x = args[0] if args else None
        hit = produced.get(id(x))
        if hit is not None and hit[0]() is x:
            fed.append((hit[1], names[module]))

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return [(c, b) for c, b in fed if calls[c] == 1 and calls[b] == 1]


def _outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [v for v in out.values() if isinstance(v, Tensor)]
    if isinstance(out, (list, tuple)):
        return [v for v in out if isinstance(v, Tensor)]
    return []


def _agree(a: Any, b: Any) -> bool:
    xs, ys = _outputs(a), _outputs(b)
    if not xs or len(xs) != len(ys):
        return False
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            return False
        scale = float(y.abs().max()) if y.numel() else 0.0
        if not torch.allclose(x.float(), y.float(), rtol=0.0, atol=FOLD_RTOL * max(scale, 1e-6)):
            return False
    return True


def fold_batchnorm(model: nn.Module, example: Tensor) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with each BatchNorm2d folded into the Conv2d that feeds it, and the number of
    pairs folded; ``(model, 0)`` itself when there is nothing to fold or the folded copy's outputs on ``example``
    do not agree with ``model``'s (see the module docstring). ``model`` must be in eval mode."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (BatchNorm uses its running statistics)")
    pairs = conv_bn_pairs(model, example)
    folded = copy.deepcopy(model)
    done = 0
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        rest = _after_norm(bn)
        if rest is None or bn.running_mean is None or bn.running_var is None or bn.training or conv.training:
            continue
        folded.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        folded.set_submodule(bn_name, rest)
        done += 1
    if not done:
        return model, 0
    with torch.inference_mode():
        if not _agree(folded(example), model(example)):
            return model, 0
    return folded, done


#: the synthetic input :func:`fold_for_inference` checks the fold on: 2 images of this size
EXAMPLE_SIZE = 64


def fold_for_inference(model: nn.Module) -> nn.Module:
    """:func:`fold_batchnorm` of an eval-mode ``model`` on a synthetic input (2 random images of
    ``EXAMPLE_SIZE`` x ``EXAMPLE_SIZE`` with the channels of its first convolution, in the layout of its weights; a
    local random generator, so the global one is untouched); ``model`` itself when it has no convolution or the fold
    cannot run (e.g. a model that needs another input size), i.e. never an error."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return model
    x = torch.randn(2, conv.in_channels, EXAMPLE_SIZE, EXAMPLE_SIZE, generator=torch.Generator().manual_seed(0),
                    dtype=conv.weight.dtype).to(conv.weight.device)
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        return fold_batchnorm(model.eval(), x)[0]
    except Exception:  # noqa: BLE001 - folding is an optimisation: a model it cannot run on this input stays as is
        return model
