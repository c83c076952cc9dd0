import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def toy_cfg():
    """A resolved config for the toy pipeline (tiny, CPU)."""
    from toy_pipeline import ToyPipeline

    from groupdistil.config import ENGINE_DEFAULTS, deep_merge

    cfg = deep_merge(ENGINE_DEFAULTS, {"method_args": {}, **ToyPipeline.defaults})
    return deep_merge(cfg, {"pipeline": "toy", "train": {"max_steps": 12, "batch_size": 32, "lr": 0.05,
                                                          "eval_every": 6, "checkpoint_every": 6, "log_every": 4,
                                                          "device": "cpu"}})


@pytest.fixture
def teacher_dir(toy_cfg, tmp_path):
    """A finished toy ERM run to distil from."""
    from toy_pipeline import train_toy

    train_toy(toy_cfg, tmp_path / "teacher")
    return tmp_path / "teacher"
