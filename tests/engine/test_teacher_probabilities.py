"""A teacher given as saved probabilities (engine side): log-probabilities as logits, what tau means for them, the
checks of a probability array, how ``--teacher`` tells such a source from a model, its identity, and the refusals
of what a teacher without a model cannot do. The pipelines' readers: tests/waterbirds and tests/mms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from toy_pipeline import ToyPipeline

from groupdistil.errors import UserError
from groupdistil.losses import kd_term
from groupdistil.pipeline import Pipeline
from groupdistil.teacher import (PROB_FLOOR, Teacher, is_probabilities_source, probabilities_identity,
                                 probabilities_problem)
from groupdistil.trainer import Trainer


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_log_probabilities_distil_as_the_logits_they_came_from(tau):
    """softmax(log p / tau) = softmax(z / tau) for p = softmax(z): tau means what it means with logits."""
    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(5, 3, 4, 4, generator=g) * 3, torch.randn(5, 3, 4, 4, generator=g)
    teacher = Teacher.from_probabilities({"seg": torch.softmax(z_t, 1)}, torch.device("cpu"), torch.float32)
    cached = teacher({"index": torch.arange(5), "x": torch.zeros(5)})["seg"]
    assert_allclose(cached, torch.log_softmax(z_t, 1).clamp_min(math.log(PROB_FLOOR)), rtol=1e-5, atol=1e-5)
    assert_allclose(kd_term(z_s, cached, tau), kd_term(z_s, z_t, tau), rtol=1e-4, atol=1e-5)
    # p^(1/tau) renormalised, by hand for one position
    p = torch.softmax(z_t[0, :, 0, 0], 0)
    assert_allclose(torch.softmax(cached[0, :, 0, 0] / tau, 0), p ** (1 / tau) / (p ** (1 / tau)).sum(), rtol=1e-4)


def test_one_hot_probabilities_give_finite_targets():
    teacher = Teacher.from_probabilities({"cls": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}, torch.device("cpu"))
    out = teacher({"index": torch.tensor([1, 0])})["cls"]
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert_allclose(out, [[math.log(PROB_FLOOR), 0.0], [0.0, math.log(PROB_FLOOR)]], atol=1e-2)  # float16 cache
    assert torch.isfinite(kd_term(torch.zeros(2, 2), out, 2.0)).all()
    with pytest.raises(RuntimeError, match="no model"):
        teacher._forward(torch.zeros(1))


def test_probabilities_problem_names_the_first_bad_position():
    good = np.array([[0.2, 1.0], [0.8, 0.0]])
    assert probabilities_problem(good) == ""
    nan = good.copy()
    nan[1, 1] = np.nan
    assert probabilities_problem(nan, "(class, x)") == \
        "1 non-finite probabilities (NaN/Inf), the first at (class, x) (1, 1)"
    assert "outside [0, 1]" in probabilities_problem(np.array([[1.5, -0.5]]).T)
    msg = probabilities_problem(np.array([[0.5, 0.5], [0.5, 0.4]]))  # classes x positions: sums 1.0, 0.9
    assert "do not sum to 1" in msg and "off by up to 0.1" in msg and "(1,)" in msg
    assert probabilities_problem(np.array([0.5, 0.495])) == ""  # within the tolerance


def test_what_teacher_paths_are_probabilities(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    probs = tmp_path / "probs"
    probs.mkdir()
    (probs / "a.npz").write_bytes(b"1")
    (tmp_path / "t.csv").write_text("img_id,p0,p1\n")
    (tmp_path / "best.pt").write_bytes(b"")
    assert is_probabilities_source(probs) and is_probabilities_source(tmp_path / "t.csv")
    assert not is_probabilities_source(run) and not is_probabilities_source(tmp_path / "best.pt")
    assert not is_probabilities_source(tmp_path / "missing")
    first = probabilities_identity(probs)
    assert first.startswith("probabilities-") and len(first) == len("probabilities-") + 16
    (probs / ".hidden").write_text("x")
    assert probabilities_identity(probs) == first  # hidden files do not count
    (probs / "a.npz").write_bytes(b"2")
    assert probabilities_identity(probs) != first  # the content does


def test_a_pipeline_without_the_hook_refuses(tmp_path, toy_cfg):
    with pytest.raises(UserError, match="this pipeline cannot read teacher probabilities"):
        Pipeline.teacher_targets(ToyPipeline(toy_cfg, tmp_path), tmp_path)


@pytest.mark.parametrize("over, match", [
    ({"method": "kd"}, "this pipeline cannot read teacher probabilities"),
    ({"method": "erm", "grouping": {"mode": "kmeans"}},
     "grouping.mode 'kmeans' infers the groups from a teacher model"),
    ({"method": "kd", "train": {"teacher_cache": "off"}}, "train.teacher_cache: off cannot be used"),
])
def test_what_a_teacher_without_a_model_cannot_do(tmp_path, toy_cfg, over, match):
    """Refused with one line naming the folder; a failed setup leaves nothing in the run folder."""
    probs = tmp_path / "probs"
    probs.mkdir()
    cfg = {**toy_cfg, **{k: ({**toy_cfg[k], **v} if isinstance(v, dict) else v) for k, v in over.items()}}
    with pytest.raises(UserError, match=match) as err:
        Trainer(cfg, ToyPipeline, tmp_path, tmp_path / "run", str(probs)).run()
    assert str(probs) in str(err.value) and not (tmp_path / "run").exists()
