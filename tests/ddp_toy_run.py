"""Run the toy pipeline under torchrun (or one process) and save each rank's final group weights.

Usage: torchrun --nproc_per_node=2 tests/ddp_toy_run.py OUT_DIR [TEACHER_DIR]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from toy_pipeline import ToyPipeline  # noqa: E402

from groupdistil import distributed as du  # noqa: E402
from groupdistil.config import ENGINE_DEFAULTS, deep_merge  # noqa: E402
from groupdistil.runtime import setup_process  # noqa: E402
from groupdistil.trainer import Trainer  # noqa: E402

out = Path(sys.argv[1])
teacher = sys.argv[2] if len(sys.argv) > 2 else None
cfg = deep_merge(ENGINE_DEFAULTS, {"method_args": {}, **ToyPipeline.defaults})
cfg = deep_merge(cfg, {"pipeline": "toy", "method": "groupdistil" if teacher else "erm", "model": {"width": 4},
                       "method_args": {"eta": 0.5} if teacher else {},
                       "train": {"max_steps": 8, "batch_size": 32, "lr": 0.05, "momentum": 0.0, "eval_every": 4,
                                 "checkpoint_every": 4, "log_every": 4, "device": "cpu"}})
setup_process(cfg["train"])
built = []  # this rank's Training, for its group weights after the run


class KeepTraining(Trainer):
    def build(self, status):
        built.append(super().build(status))
        return built[-1]


metrics = KeepTraining(cfg, ToyPipeline, out, out, teacher_path=teacher).run()
torch.save({"q": built[0].method.weights.q if teacher else None, "metrics": metrics,
            "world": du.world_size()}, out / f"rank{du.rank()}.pt")
