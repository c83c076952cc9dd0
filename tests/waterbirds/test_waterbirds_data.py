"""Dataset items, seeded augmentation, the image cache, and unreadable images."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from groupdistil.errors import UserError
from waterbirds_pipeline.data import resize_size
from waterbirds_pipeline.pipeline import WaterbirdsPipeline


def test_resize_follows_the_reference_ratio() -> None:
    assert resize_size(224) == 256 and resize_size(64) == 73


def test_item_shapes_and_dtypes(pipeline: WaterbirdsPipeline) -> None:
    ds = pipeline.train_dataset()
    item = ds[(5, 123)]
    assert item["x"].shape == (3, 32, 32) and item["x"].dtype == torch.float32
    for key in ("cls", "group", "index"):
        assert item[key].shape == () and item[key].dtype == torch.long
    assert int(item["index"]) == 5
    assert int(item["group"]) == int(pipeline.train_groups()[5])
    assert int(item["group"]) // 2 == int(item["cls"])
    assert -3 < float(item["x"].mean()) < 3  # ImageNet-normalised


def test_augmentation_is_a_function_of_the_key(pipeline: WaterbirdsPipeline) -> None:
    ds = pipeline.train_dataset()
    assert pipeline.train_is_random()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = ds[(3, 7)]["x"]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.rand(5)
    assert torch.equal(a, ds[(3, 7)]["x"])
    assert any(not torch.equal(a, ds[(3, s)]["x"]) for s in range(8, 12))


def test_cache_matches_decoding(synth_root: Path) -> None:
    cached, uncached = (WaterbirdsPipeline({"data": {"image_size": 32, "cache_images": c}}, synth_root).train_dataset()
                        for c in (True, False))
    for key in ((0, 0), (7, 1)):
        assert torch.equal(cached[key]["x"], uncached[key]["x"])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_image_names_the_file(synth_root: Path, tmp_path: Path, damage: str) -> None:
    shutil.copytree(synth_root, tmp_path / "data")
    with open(tmp_path / "data" / "metadata.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "0")
    path = tmp_path / "data" / row["img_filename"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a jpeg")
    p = WaterbirdsPipeline({"data": {"image_size": 32}}, tmp_path / "data")  # cheap checks pass
    with pytest.raises(UserError) as err:
        p.train_dataset()
    assert str(path) in str(err.value) and f"img_id {row['img_id']}" in str(err.value)
