"""Waterbirds images: decoding, the reference transforms, an in-memory cache and the dataset.

Preprocessing as in the reference implementations (group DRO, JTT): resize to a square of ``image_size * 256 / 224``
(256 for the paper's 224), centre-crop ``image_size``, ImageNet mean/std. Optional training augmentation: random
resized crop (scale 0.7-1) to ``image_size`` and horizontal flip. Images are decoded and resized once ("load"
stage, uint8 ``(3, R, R)``, cacheable); crop, augmentation and normalisation run per sample ("tensor" stage).
Unlike the references, the random resized crop is taken from the resized square rather than the original image,
so that the cache serves both stages.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from groupdistil.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUG_SCALE = (0.7, 1.0)


def resize_size(image_size: int) -> int:
    """Side of the square the image is resized to before cropping: 256 for 224."""
    return round(image_size * 256 / 224)


def decode_image(path: Path, size: int, where: str = "") -> torch.Tensor:
    """RGB uint8 ``(3, size, size)``: ``path`` decoded and resized (bilinear, antialiased) to a square."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        suffix = f" ({where})" if where else ""
        raise UserError(f"{path}: cannot read image{suffix}: {e}") from None
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def tensor_transform(image_size: int, augment: bool) -> v2.Compose:
    """uint8 ``(3, R, R)`` -> normalised float ``(3, image_size, image_size)``."""
    crop = (v2.Compose([v2.RandomResizedCrop(image_size, scale=AUG_SCALE, antialias=True), v2.RandomHorizontalFlip()])
            if augment else v2.CenterCrop(image_size))
    return v2.Compose([crop, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ImageStore:
    """Decoded, resized uint8 images ``(3, R, R)`` by position; all decoded up front when ``cache`` is true.

    ``where[i]`` describes image ``i`` for error messages (csv line and img_id).
    """

    def __init__(self, paths: Sequence[Path], where: Sequence[str], size: int, cache: bool,
                 num_threads: int = 4) -> None:
        self.paths, self.where, self.size = list(paths), list(where), size
        self._cache: torch.Tensor | None = None
        if cache:
            with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
                images = list(pool.map(self._decode, range(len(self.paths))))
            self._cache = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)

    def _decode(self, i: int) -> torch.Tensor:
        return decode_image(self.paths[i], self.size, self.where[i])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._cache[i] if self._cache is not None else self._decode(i)


class WaterbirdsDataset(Dataset):
    """One split. Items: ``x`` float ``(3, S, S)``, ``cls`` (y), ``group`` and ``index`` long scalars.

    Keys are ``(index, seed)`` (training: augmentation randomness derives from ``seed`` only) or a plain ``index``
    (evaluation, deterministic transform).
    """

    def __init__(self, images: ImageStore, y: np.ndarray, group: np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor], random: bool) -> None:
        self.images, self.transform, self.random = images, transform, random
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.group = torch.as_tensor(group, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.images[index]
        if self.random:
            if seed is None:
                raise ValueError("a randomly augmented dataset must be indexed by (index, seed)")
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(seed))
                x = self.transform(image)
        else:
            x = self.transform(image)
        return {"x": x, "cls": self.y[index], "group": self.group[index],
                "index": torch.as_tensor(index, dtype=torch.long)}
