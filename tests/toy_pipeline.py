"""A tiny in-memory pipeline for engine tests: 3 groups, a segmentation and a classification head.

Not a real dataset: it exists so the engine can be tested without a dataset pipeline (the engine never imports
one). Images are 1 x 16 x 16; the class is the sign of a blob's brightness, the segmentation is the blob.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from groupdistil.distributed import gather_objects, is_main, shard
from groupdistil.io import atomic_write_json, atomic_write_text
from groupdistil.pipeline import Pipeline


def make_data(n: int, seed: int, group_props=(0.7, 0.2, 0.1)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    groups = torch.multinomial(torch.tensor(group_props), n, replacement=True, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    cy = torch.randint(4, 12, (n, 1, 1), generator=g).float()
    cx = torch.randint(4, 12, (n, 1, 1), generator=g).float()
    blob = (((yy - cy) ** 2 + (xx - cx) ** 2) < 9).float()
    amp = (y.float() * 2 - 1).view(n, 1, 1) * (0.5 + groups.float().view(n, 1, 1) * 0.3)
    x = blob * amp + 0.5 * torch.randn(n, 16, 16, generator=g) + groups.float().view(n, 1, 1) * 0.5
    return {"x": x.unsqueeze(1), "seg": (blob.long() * (1 + y.view(n, 1, 1))).unsqueeze(1), "cls": y, "group": groups}


class ToyDataset(Dataset):
    def __init__(self, data: dict[str, torch.Tensor], augment: bool) -> None:
        self.data, self.augment = data, augment

    def __len__(self) -> int:
        return len(self.data["cls"])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        i, seed = key
        x = self.data["x"][i]
        if self.augment:
            x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        return {"x": x, "seg": self.data["seg"][i], "cls": self.data["cls"][i], "group": self.data["group"][i],
                "index": torch.tensor(i)}


class ToyNet(nn.Module):
    def __init__(self, width: int = 8, n_cls: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU())
        self.seg = nn.Conv2d(width, 3, 1)
        self.cls = nn.Linear(width, n_cls)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"seg": self.seg(h), "cls": self.cls(h.mean((2, 3)))}


class ToyPipeline(Pipeline):
    name = "toy"
    defaults: dict[str, dict[str, Any]] = {"data": {"n_train": 192, "augment": False,
                                                    "group_props": [0.7, 0.2, 0.1], "shuffle_groups": False},
                                           "model": {"width": 8, "n_cls": 2, "init_from": None}, "eval": {}}
    run_outputs = ("toy_*.json",)

    def __init__(self, cfg: dict[str, Any], data_root: Path) -> None:
        super().__init__(cfg, data_root)
        d = cfg["data"]
        self.train = make_data(d["n_train"], 0, tuple(d["group_props"]))
        if d["shuffle_groups"]:  # the same images with a permuted group column (inferred groups must not care)
            perm = torch.randperm(len(self.train["group"]), generator=torch.Generator().manual_seed(7))
            self.train["group"] = self.train["group"][perm]
        self.splits = {"val": make_data(96, 1, (1 / 3, 1 / 3, 1 / 3)), "test": make_data(96, 2, (1 / 3, 1 / 3, 1 / 3))}

    @property
    def group_names(self) -> list[str]:
        return ["g0", "g1", "g2"]

    @property
    def train_group_counts(self) -> list[int]:
        return torch.bincount(self.train["group"], minlength=3).tolist()

    def train_groups(self) -> torch.Tensor:
        return self.train["group"]

    def train_dataset(self) -> Dataset:
        return ToyDataset(self.train, self.cfg["data"]["augment"])

    def train_is_random(self) -> bool:
        return bool(self.cfg["data"]["augment"])

    @property
    def heads(self) -> dict[str, int]:
        return {"seg": 3, "cls": self.cfg["model"]["n_cls"]}

    @classmethod
    def build_model(cls, cfg: dict[str, Any]) -> nn.Module:
        return ToyNet(cfg["model"]["width"], cfg["model"]["n_cls"])

    @classmethod
    def preprocessing(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"input_shape": [1, 16, 16]}

    def evaluate(self, predict, split, out_dir=None) -> dict[str, Any]:
        d = self.splits[split]
        mine = torch.tensor(list(shard(len(d["cls"]))), dtype=torch.long)
        pred = predict(d["x"][mine])["cls"].argmax(1).cpu()
        rows = gather_objects(list(zip(mine.tolist(), pred.tolist())))  # (case id, prediction) from every rank
        order = torch.tensor([i for i, _ in rows])
        assert sorted(order.tolist()) == list(range(len(d["cls"]))), "gathered evaluation is incomplete"
        pred = torch.empty(len(d["cls"]), dtype=torch.long)
        pred[order] = torch.tensor([p for _, p in rows])
        correct = (pred == d["cls"]).float()
        sums = torch.zeros(3).index_add_(0, d["group"], correct)
        acc = (sums / torch.bincount(d["group"], minlength=3).clamp_min(1)).tolist()
        out = {"group_metric": dict(zip(self.group_names, acc)), "worst_group_metric": min(acc),
               "average_metric": correct.mean().item()}
        if out_dir is not None and is_main():
            atomic_write_json(Path(out_dir) / f"toy_{split}.json", out)
        return out

    def write_report(self, run_dir: Path, metrics: dict[str, Any], info: dict[str, Any]) -> None:
        atomic_write_text(Path(run_dir) / "report.md", f"# toy\n{metrics['test']}\n")

    @classmethod
    def synthesize(cls, out: Path, seed: int = 0, **options: Any) -> None:
        Path(out).mkdir(parents=True, exist_ok=True)


def train_toy(cfg: dict[str, Any], out: Path, **kw: Any) -> Any:
    """Train a toy run into ``out`` (a copy of ``cfg``); returns the Trainer (its ``run()`` result in ``.result``)."""
    import copy

    from groupdistil.trainer import Trainer

    t = Trainer(copy.deepcopy(cfg), ToyPipeline, out, out, **kw)
    t.result = t.run()
    return t
