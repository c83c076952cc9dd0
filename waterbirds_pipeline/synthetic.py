"""A synthetic Waterbirds in the release's layout: ``metadata.csv`` and JPEGs of varied sizes in species folders.

What the images show (the bird's silhouette as core feature, the background as spurious one) is
:mod:`waterbirds_pipeline.bird_images`; this module decides how many images of each group each split gets, draws them
and writes the data set:

- group proportions: training counts of the real release (3498 / 184 / 56 / 1057, so 95% of each class on its
  matching background) times ``scale``; validation counts of the real release times ``scale``, test twice the
  validation (the real test is about five times the validation; halved to keep CPU evaluation cheap). In val and
  test exactly half of each class lies on each background. Every group gets at least ``min_per_group`` images.
- every image is drawn from its own generator, seeded by ``(seed, img_id)``, so the data set is a function of the
  seed and the options.

Measured learnability (ResNet-18 from scratch, 48 px as in ``configs/waterbirds.yaml``, SGD lr 0.01, momentum 0.9,
weight decay 1e-4, batch 64, 300 steps, one CPU thread; default ``scale`` 0.2, seed 0, evaluated on its balanced
test split):

- background-balanced training (batches sampled group-balanced from the val + test images of a seed-1 copy, so
  background carries no class information): test accuracy 0.85 / 0.88 / 0.90 after 100 / 200 / 300 steps (per
  group at 300: landbird_land 0.94, landbird_water 0.96, waterbird_land 0.65, waterbird_water 0.83): the core
  feature is learnable within the budget.
- ERM on the 95%-correlated training split: test accuracy 0.73, per group 1.00 / 0.60 / 0.00 / 1.00 after 300
  steps: the background is learned first and the minority groups fail, as in the real Waterbirds.
- at 32 px the core is harder (balanced training about 0.82-0.84 after 300 steps).

The pretraining corpus (``corpus="pretrain"``; ``groupdistil synth waterbirds --option corpus=pretrain``): the
offline stand-in for ImageNet pretraining, written in the same layout so that the pipeline trains on it unchanged;
its images (14 shape classes on six background styles) are :mod:`waterbirds_pipeline.shape_images`:

- label: ``y`` = shape class mod 2 (7 classes each), so the task needs telling 14 shapes apart; the shape class is
  the image's folder (``001.Triangle``) and the extra column ``shape`` of ``metadata.csv`` (readers ignore it).
- balance: every split has the same number of images per group ``2 * y + place`` (``y`` and ``place`` independent,
  and the style and the shape class uniform within them), about ``scale`` times the size of the Waterbirds splits
  (train ``sum(REAL_TRAIN) / 4``, val ``sum(REAL_VAL) / 4``, test twice val per group, times ``scale``).

Usage: ``python -m waterbirds_pipeline.synthetic --out DIR [--seed N] [--scale 0.2] [--corpus pretrain]``.
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np

from groupdistil.errors import UserError
from groupdistil.io import atomic_write_bytes, atomic_write_text

from .bird_images import PALETTES, render
from .metadata import COLUMNS, GROUP_NAMES, METADATA, PLACE_NAMES, SPLITS
from .shape_images import SHAPE_NAMES, STYLES, render_shape

__all__ = ["CORPORA", "REAL_TRAIN", "REAL_VAL", "SHAPE_NAMES", "corpus_counts", "group_counts", "species_folder",
           "synthesize", "synthesize_corpus"]

REAL_TRAIN = (3498, 184, 56, 1057)  # per group, index 2 * y + place
REAL_VAL = (467, 466, 133, 133)
TEST_OVER_VAL = 2


def group_counts(scale: float, min_per_group: int = 4) -> dict[str, list[int]]:
    """Images per group of each split; val and test put exactly half of each class on each background."""
    train = [max(min_per_group, round(n * scale)) for n in REAL_TRAIN]
    val: list[int] = []
    for y in (0, 1):
        half = max(min_per_group, round((REAL_VAL[2 * y] + REAL_VAL[2 * y + 1]) * scale / 2))
        val += [half, half]
    return {"train": train, "val": val, "test": [TEST_OVER_VAL * n for n in val]}


def species_folder(y: int, palette: int) -> str:
    """``001.Landbird_brown`` ... ``008.Waterbird_vivid``, like the release's ``001.Black_footed_Albatross``."""
    kind = ("Landbird", "Waterbird")[y]
    return f"{1 + palette + len(PALETTES) * y:03d}.{kind}_{PALETTES[palette]}"


def corpus_counts(scale: float, min_per_group: int = 4) -> dict[str, list[int]]:
    """Images per group of each split of the pretraining corpus: the same number for every group."""
    per = {"train": sum(REAL_TRAIN) / 4, "val": sum(REAL_VAL) / 4, "test": TEST_OVER_VAL * sum(REAL_VAL) / 4}
    return {split: [max(min_per_group, round(n * scale))] * 4 for split, n in per.items()}


def _write_metadata(out: Path, rows: list[tuple], extra: tuple[str, ...] = ()) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS + extra)
    writer.writerows(rows)
    atomic_write_text(out / METADATA, buf.getvalue())


def synthesize_corpus(out: Path, seed: int = 0, scale: float = 0.2, min_size: int = 96, max_size: int = 192,
                      min_per_group: int = 4) -> Path:
    """Write the balanced pretraining corpus (see the module docstring) into ``out``; return ``out``."""
    counts = corpus_counts(scale, min_per_group)
    specs = [(split, g, i) for split in SPLITS for g, n in enumerate(counts[split]) for i in range(n)]
    order = np.random.default_rng([seed, 2]).permutation(len(specs))
    per_y = len(SHAPE_NAMES) // 2
    rows = []
    for img_id, k in enumerate(order, start=1):
        split, g, i = specs[k]
        y, place = divmod(g, 2)
        rng = np.random.default_rng([seed, 3, img_id])
        shape = 2 * (i % per_y) + y  # the classes of y in turn: balanced within every group
        style = int(rng.integers(len(STYLES[place])))
        folder = f"{shape + 1:03d}.{SHAPE_NAMES[shape]}"
        filename = f"{folder}/{SHAPE_NAMES[shape]}_{img_id:05d}.jpg"
        atomic_write_bytes(out / filename, render_shape(rng, shape, place, style, (min_size, max_size)))
        rows.append((img_id, filename, y, SPLITS.index(split), place, f"/{STYLES[place][style]}/{img_id:08d}.jpg",
                     shape))
    _write_metadata(out, rows, ("shape",))
    return out


# --- the dataset ----------------------------------------------------------------------------------------------
CORPORA = ("waterbirds", "pretrain")


def synthesize(out: Path, seed: int = 0, scale: float = 0.2, min_size: int = 96, max_size: int = 192,
               min_per_group: int = 4, corpus: str = "waterbirds") -> Path:
    """Write the synthetic dataset into ``out`` (``metadata.csv`` last, so a partial run has none); return ``out``.

    Deterministic given ``seed`` and the options; ``scale`` 0.2 gives about 960 train, 240 val and 480 test images.
    ``corpus="pretrain"`` writes the balanced pretraining corpus instead (:func:`synthesize_corpus`).
    """
    if scale <= 0 or not 8 <= min_size <= max_size or min_per_group < 1:
        raise UserError("synthesize needs scale > 0, 8 <= min_size <= max_size and min_per_group >= 1")
    if corpus not in CORPORA:
        raise UserError(f"unknown Waterbirds synthesis corpus '{corpus}'; valid: {', '.join(CORPORA)}")
    out = Path(out)
    if corpus == "pretrain":
        return synthesize_corpus(out, seed, scale, min_size, max_size, min_per_group)
    counts = group_counts(scale, min_per_group)
    specs = [(split, g) for split in SPLITS for g, n in enumerate(counts[split]) for _ in range(n)]
    order = np.random.default_rng([seed, 0]).permutation(len(specs))
    rows = []
    for img_id, k in enumerate(order, start=1):
        split, g = specs[k]
        y, place = divmod(g, 2)
        rng = np.random.default_rng([seed, 1, img_id])
        palette = int(rng.integers(len(PALETTES)))
        folder = species_folder(y, palette)
        filename = f"{folder}/{folder.split('.', 1)[1]}_{img_id:05d}.jpg"
        atomic_write_bytes(out / filename, render(rng, y, place, palette, (min_size, max_size)))
        place_file = f"/{PLACE_NAMES[place][0]}/{PLACE_NAMES[place]}/{img_id:08d}.jpg"
        rows.append((img_id, filename, y, SPLITS.index(split), place, place_file))
    _write_metadata(out, rows)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic Waterbirds dataset.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=0.2, help="fraction of the real train/val group counts")
    parser.add_argument("--min-size", type=int, default=96)
    parser.add_argument("--max-size", type=int, default=192)
    parser.add_argument("--corpus", choices=CORPORA, default="waterbirds")
    args = parser.parse_args(argv)
    synthesize(args.out, args.seed, args.scale, args.min_size, args.max_size, corpus=args.corpus)
    counts = (corpus_counts if args.corpus == "pretrain" else group_counts)(args.scale)
    print(f"wrote {sum(map(sum, counts.values()))} images to {args.out}: "
          + "; ".join(f"{s} {dict(zip(GROUP_NAMES, counts[s]))}" for s in SPLITS))


if __name__ == "__main__":
    main()
