"""A synthetic Waterbirds in the release's layout: ``metadata.csv`` and JPEGs of varied sizes in species folders.

The design is fixed before any method is compared and is never tuned to favour one:

- core feature (decides the class, no label noise): the bird's silhouette. A latent elongation (landbirds 0-0.3,
  waterbirds 0.7-1, uniform; a gap, so no image is ambiguous) sets body slimness and posture, neck, leg and beak
  length and the width of the webbed feet, each with its own jitter: waterbirds are heron-like (slim horizontal
  body, long neck, long legs, wide flat feet), landbirds compact (round upright body, head on the body, short legs).
  Everything else is drawn from the same distribution for both classes: neck angle, head and tail, colours (four
  palettes, the "species", shared by both classes), rotation (+-20 degrees), mirroring, position, noise, JPEG
  quality. The bird's bounding box fills 60-80% of the image whatever its class (size is no cue), parts are thick
  enough to survive a 48 px resize, and they have a dark outline.
- spurious feature (easy): the background. Water is blue to teal, with horizontal waves of random wavelength and
  ripple; land is green, olive or brown foliage made of multi-scale blotches. Both get an optional sky band.
- image size: the longer side uniform in ``[min_size, max_size]``, aspect ratio between 1 and 4:3 either way (the
  square resize of the pipeline then distorts shapes by at most 4:3, less than the class difference).
- group proportions: training counts of the real release (3498 / 184 / 56 / 1057, so 95% of each class on its
  matching background) times ``scale``; validation counts of the real release times ``scale``, test twice the
  validation (the real test is about five times the validation; halved to keep CPU evaluation cheap). In val and
  test exactly half of each class lies on each background. Every group gets at least ``min_per_group`` images.

Measured learnability (ResNet-18 from scratch, 48 px as in ``configs/waterbirds.yaml``, SGD lr 0.01, momentum 0.9,
weight decay 1e-4, batch 64, 300 steps, one CPU thread, about 0.47 s per step; default ``scale`` 0.2, seed 0,
evaluated on its balanced test split):

- background-balanced training (batches sampled group-balanced from the val + test images of a seed-1 copy, so
  background carries no class information): test accuracy 0.85 / 0.88 / 0.90 after 100 / 200 / 300 steps (per
  group at 300: landbird_land 0.94, landbird_water 0.96, waterbird_land 0.65, waterbird_water 0.83): the core
  feature is learnable within the budget.
- ERM on the 95%-correlated training split: test accuracy 0.73, per group 1.00 / 0.60 / 0.00 / 1.00 after 300
  steps: the background is learned first and the minority groups fail, as in the real Waterbirds.
- at 32 px the core is harder (balanced training about 0.82-0.84 after 300 steps, 0.24 s per step).

The pretraining corpus (``corpus="pretrain"``; ``groupdistil synth waterbirds --option corpus=pretrain``): the
offline stand-in for ImageNet pretraining, written in the same layout so that the pipeline trains on it unchanged:

- objects: one filled shape per image out of ``len(SHAPES)`` (14) shape classes (regular polygons, stars, circle,
  ellipse, cross, arrow, L, T, ...), each with a random colour, a dark outline, any rotation, a random stretch
  (aspect up to 1.6 either way, so elongation carries no class information) and a size of 40-80% of the image.
  No bird is drawn: nothing of the downstream task's core feature is a label here.
- label: ``y`` = shape class mod 2 (7 classes each), so the task needs telling 14 shapes apart; the shape class is
  the image's folder (``001.Triangle``) and the extra column ``shape`` of ``metadata.csv`` (readers ignore it).
- backgrounds: six styles, three per ``place`` value (0: land foliage, checkerboard, smooth colour noise; 1: water
  waves, stripes at any angle, gradient), the downstream task's land and water among them.
- balance: every split has the same number of images per group ``2 * y + place`` (``y`` and ``place`` independent,
  and the style and the shape class uniform within them), about ``scale`` times the size of the Waterbirds splits
  (train ``sum(REAL_TRAIN) / 4``, val ``sum(REAL_VAL) / 4``, test twice val per group, times ``scale``).

Usage: ``python -m waterbirds_pipeline.synthetic --out DIR [--seed N] [--scale 0.2] [--corpus pretrain]``.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from groupdistil.errors import UserError
from groupdistil.io import atomic_write_bytes, atomic_write_text

from .metadata import COLUMNS, GROUP_NAMES, METADATA, N_SHAPES, PLACE_NAMES, SPLITS

REAL_TRAIN = (3498, 184, 56, 1057)  # per group, index 2 * y + place
REAL_VAL = (467, 466, 133, 133)
TEST_OVER_VAL = 2
PALETTES = ("brown", "grey", "dark", "vivid")
LAND_COLOURS = (((0.08, 0.22, 0.06), (0.42, 0.62, 0.22)),  # green
                ((0.20, 0.24, 0.08), (0.55, 0.55, 0.25)),  # olive
                ((0.25, 0.16, 0.08), (0.58, 0.45, 0.28)))  # brown
WATER_COLOURS = (((0.04, 0.16, 0.38), (0.36, 0.58, 0.82)),  # blue
                 ((0.03, 0.25, 0.30), (0.30, 0.66, 0.66)))  # teal
ELONGATION = ((0.0, 0.3), (0.7, 1.0))  # by y: the latent that sets the bird's build (see _bird)
BIRD_FILL = (0.6, 0.8)  # the bird's bounding box, as a fraction of the image (its tighter side)


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


# --- backgrounds ----------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Values in [0, 1] of shape ``(h, w)``: a random ``cells``-wide grid, bicubically upsampled."""
    grid = rng.random((max(2, round(cells * h / w)), cells)).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)), 0, 1)


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.uniform(-amount, amount, 3), 0, 1)


def _background(rng: np.random.Generator, h: int, w: int, place: int) -> np.ndarray:
    """Float ``(h, w, 3)`` in [0, 1]: water waves (place 1) or land foliage (place 0), with an optional sky band."""
    if place == 1:
        dark, light = WATER_COLOURS[rng.integers(len(WATER_COLOURS))]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wavelength, ripple = rng.uniform(3, 10), rng.uniform(8, 40)
        phase = 2 * np.pi * yy / wavelength + rng.uniform(0.5, 2.0) * np.sin(2 * np.pi * xx / ripple
                                                                             + rng.uniform(0, 2 * np.pi))
        t = 0.65 * (0.5 + 0.5 * np.sin(phase + 3 * _smooth_noise(rng, h, w, 6))) + 0.35 * _smooth_noise(rng, h, w, 5)
    else:
        dark, light = LAND_COLOURS[rng.integers(len(LAND_COLOURS))]
        t = 0.55 * _smooth_noise(rng, h, w, int(rng.integers(4, 9))) \
            + 0.45 * _smooth_noise(rng, h, w, int(rng.integers(14, 30)))
    dark, light = _jitter(rng, dark), _jitter(rng, light)
    img = dark + t[..., None] * (light - dark)
    if rng.random() < 0.5:
        horizon = int(h * rng.uniform(0.1, 0.35))
        sky = _jitter(rng, (0.70, 0.80, 0.90), 0.1)
        img[:horizon] = sky * np.linspace(0.9, 1.05, horizon)[:, None, None]
    return img


# --- birds ----------------------------------------------------------------------------------------------------
def _ellipse(cx: float, cy: float, a: float, b: float, angle: float = 0.0, n: int = 28) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = np.stack([a * np.cos(t), b * np.sin(t)], 1)
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]]) + (cx, cy)


def _bar(p: np.ndarray, q: np.ndarray, width: float) -> np.ndarray:
    """Quadrilateral of ``width`` from point ``p`` to point ``q``."""
    d = (q - p) / max(np.linalg.norm(q - p), 1e-6)
    n = np.array([-d[1], d[0]]) * width / 2
    return np.stack([p + n, q + n, q - n, p - n])


def _palette_colours(rng: np.random.Generator, palette: int) -> tuple[np.ndarray, np.ndarray]:
    """Body and wing colours of one bird, in [0, 1]."""
    if PALETTES[palette] == "brown":
        body = _jitter(rng, (0.55, 0.38, 0.22), 0.12)
    elif PALETTES[palette] == "grey":
        body = np.full(3, rng.uniform(0.55, 0.95)) + rng.uniform(-0.04, 0.04, 3)
    elif PALETTES[palette] == "dark":
        body = np.full(3, rng.uniform(0.05, 0.3)) + rng.uniform(-0.04, 0.04, 3)
    else:
        body = rng.uniform(0.05, 1.0, 3)
    wing = body * rng.uniform(0.5, 0.85) if rng.random() < 0.5 else body + (1 - body) * rng.uniform(0.2, 0.5)
    return np.clip(body, 0, 1), np.clip(wing, 0, 1)


def _bird(rng: np.random.Generator, y: int, palette: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Polygons ``(points (P, 2), rgb)`` of a bird facing +x, in body half-lengths, y up, body at the origin.

    The class only acts through ``elongation`` (landbirds 0-0.3, waterbirds 0.7-1), which sets the silhouette:
    body slimness and posture (landbirds round and upright, waterbirds slim and horizontal), neck, leg and beak
    length and the width of the (webbed) feet, each with its own jitter.
    """
    e = rng.uniform(*ELONGATION[y])
    b = (0.95 - 0.6 * e) * rng.uniform(0.92, 1.08)  # body half-height (half-length 1)
    tilt = math.radians((1 - e) * rng.uniform(30, 50))  # landbirds sit upright, waterbirds lie horizontal
    neck_len = (0.05 + 1.9 * e) * rng.uniform(0.9, 1.1)
    leg_len = (0.2 + 1.2 * e) * rng.uniform(0.85, 1.15)
    beak_len = (0.25 + 0.6 * e) * rng.uniform(0.8, 1.2)
    foot_len = (0.25 + 0.55 * e) * rng.uniform(0.85, 1.15)
    body, wing = _palette_colours(rng, palette)
    head_colour = body if rng.random() < 0.6 else _palette_colours(rng, int(rng.integers(len(PALETTES))))[0]
    beak_colour = np.array([(0.95, 0.75, 0.1), (0.9, 0.45, 0.1), (0.1, 0.1, 0.1), (0.5, 0.5, 0.5)][rng.integers(4)])
    leg_colour = beak_colour * rng.uniform(0.6, 1.0)
    ct, st = math.cos(tilt), math.sin(tilt)
    rot = np.array([[ct, st], [-st, ct]])  # row vectors: p @ rot turns p by +tilt (tail down, head up)

    neck_angle = math.radians(rng.uniform(45, 75))
    neck_base = np.array([0.7, 0.35 * b]) @ rot
    head = neck_base + neck_len * np.array([math.cos(neck_angle), math.sin(neck_angle)])
    head_r = rng.uniform(0.3, 0.4)
    beak_angle = math.radians(rng.uniform(-20, 10))
    beak = np.array([math.cos(beak_angle), math.sin(beak_angle)])
    beak_root, beak_tip, beak_w = head + 0.8 * head_r * beak, head + (head_r + beak_len) * beak, 0.6 * head_r
    tail_len, tail_spread = rng.uniform(0.4, 0.8), rng.uniform(0.15, 0.35)
    tail_tip = np.array([-0.85 - tail_len, 0.0])
    tail = np.stack([(-0.7, 0.25 * b), tail_tip + (0, tail_spread), tail_tip - (0, tail_spread), (-0.7, -0.25 * b)])
    leg_w = rng.uniform(0.2, 0.28)
    parts = [(tail @ rot, body)]
    for x in (-0.25, 0.2):
        top = np.array([x, -0.7 * b]) @ rot
        foot = np.array([top[0] + rng.uniform(-0.1, 0.1), min(top[1], -b) - leg_len])
        web = np.stack([foot + (-0.1, 0.08), foot + (foot_len, 0.08 + 0.35 * foot_len * e),
                        foot + (foot_len, -0.08), foot + (-0.1, -0.08)])
        parts += [(_bar(top, foot, leg_w), leg_colour), (web, leg_colour)]
    parts += [
        (_bar(neck_base, head, rng.uniform(0.45, 0.55) + 0.2 * (1 - e)), head_colour),
        (_ellipse(0, 0, 1, b) @ rot, body),
        (_ellipse(-0.15, 0.1 * b, rng.uniform(0.5, 0.75), 0.55 * b, rng.uniform(-0.2, 0.2)) @ rot, wing),
        (np.stack([beak_root + (0, beak_w / 2), beak_tip, beak_root - (0, beak_w / 2)]), beak_colour),
        (_ellipse(*head, head_r, head_r), head_colour),
        (_ellipse(*(head + head_r * np.array([0.35, 0.25])), 0.07, 0.07), np.full(3, 0.05)),
    ]
    return parts


def _draw_bird(rng: np.random.Generator, img: Image.Image, y: int, palette: int) -> None:
    """Draw a bird at a random rotation, mirroring and position inside ``img``, its bounding box scaled to fill
    ``BIRD_FILL`` of the image (the bird's size carries no class information; only its shape does)."""
    parts = _bird(rng, y, palette)
    w, h = img.size
    fill = rng.uniform(*BIRD_FILL)
    angle = math.radians(rng.uniform(-20, 20))
    c, s = math.cos(angle), math.sin(angle)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    m = np.array([[c * mirror, -s], [s * mirror, c]]) @ np.diag([1.0, -1.0])  # y up -> image rows down
    pts = [p @ m.T for p, _ in parts]
    lo, hi = np.min([p.min(0) for p in pts], 0), np.max([p.max(0) for p in pts], 0)
    unit = fill / max((hi - lo) / (w, h))  # pixels per body half-length
    pts, lo, hi = [p * unit for p in pts], lo * unit, hi * unit
    offset = rng.uniform(0, 1, 2) * (np.array([w, h]) - (hi - lo)) - lo
    draw = ImageDraw.Draw(img)
    for p, (_, colour) in zip(pts, parts):
        draw.polygon([tuple(q) for q in p + offset], fill=tuple(int(v * 255) for v in colour), outline=(20, 20, 20),
                     width=max(1, round(0.08 * unit)))


def render(rng: np.random.Generator, y: int, place: int, palette: int, size_range: tuple[int, int]) -> bytes:
    """JPEG bytes of one synthetic image: longer side in ``size_range``, aspect ratio 1 to 4:3, either way."""
    long_side = int(rng.integers(size_range[0], size_range[1] + 1))
    w, h = long_side, round(long_side * rng.uniform(0.75, 1.0))
    if rng.random() < 0.5:
        w, h = h, w
    bg = _background(rng, h, w, place) * rng.uniform(0.8, 1.15)
    img = Image.fromarray((np.clip(bg, 0, 1) * 255).astype(np.uint8))
    _draw_bird(rng, img, y, palette)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


# --- the pretraining corpus -------------------------------------------------------------------------------------
def _regular(n: int, star: float = 1.0) -> np.ndarray:
    """A regular ``n``-gon (``star`` < 1: an ``n``-pointed star, inner radius ``star``), unit outer radius."""
    k = 2 * n if star < 1 else n
    t = np.pi / 2 + 2 * np.pi * np.arange(k) / k
    r = np.where(np.arange(k) % 2 == 1, star, 1.0) if star < 1 else np.ones(k)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _outline(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


SHAPES: dict[str, np.ndarray] = {  # class name -> polygon around the origin, about unit size (y = index % 2)
    "Triangle": _regular(3), "Square": _regular(4), "Pentagon": _regular(5), "Hexagon": _regular(6),
    "Octagon": _regular(8), "Star4": _regular(4, 0.4), "Star5": _regular(5, 0.45), "Star6": _regular(6, 0.55),
    "Circle": _ellipse(0, 0, 1, 1, n=40), "HalfDisc": np.concatenate([_ellipse(0, 0, 1, 1, n=40)[:21], [(0, 0)]]),
    "Cross": _outline((-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
                      (-1, .3), (-1, -.3), (-.3, -.3)),
    "Arrow": _outline((-1, -.25), (.2, -.25), (.2, -.7), (1, 0), (.2, .7), (.2, .25), (-1, .25)),
    "LShape": _outline((-.8, -1), (.8, -1), (.8, -.45), (-.25, -.45), (-.25, 1), (-.8, 1)),
    "TShape": _outline((-1, 1), (1, 1), (1, .45), (.28, .45), (.28, -1), (-.28, -1), (-.28, .45), (-1, .45)),
}
SHAPE_NAMES = tuple(SHAPES)
assert len(SHAPE_NAMES) == N_SHAPES
SHAPE_FILL = (0.4, 0.8)  # the shape's bounding box, as a fraction of the image (its tighter side)
STYLES = (("foliage", "checkerboard", "colour_noise"), ("waves", "stripes", "gradient"))  # by place


def _styled_background(rng: np.random.Generator, h: int, w: int, place: int, style: int) -> np.ndarray:
    """Float ``(h, w, 3)`` in [0, 1] of background style ``STYLES[place][style]``."""
    name = STYLES[place][style]
    if name in ("foliage", "waves"):
        return _background(rng, h, w, place)
    a, b = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if name == "checkerboard":
        cell = rng.uniform(4, 16)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    elif name == "colour_noise":
        t = _smooth_noise(rng, h, w, int(rng.integers(3, 12)))
    elif name == "stripes":
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * along / rng.uniform(4, 16)))
    else:  # gradient
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    return a + t[..., None] * (b - a)


def render_shape(rng: np.random.Generator, shape: int, place: int, style: int,
                 size_range: tuple[int, int]) -> bytes:
    """JPEG bytes of one corpus image: shape class ``shape`` on a background of ``STYLES[place][style]``."""
    long_side = int(rng.integers(size_range[0], size_range[1] + 1))
    w, h = long_side, round(long_side * rng.uniform(0.75, 1.0))
    if rng.random() < 0.5:
        w, h = h, w
    img = Image.fromarray((np.clip(_styled_background(rng, h, w, place, style), 0, 1) * 255).astype(np.uint8))
    stretch = rng.uniform(1.0, 1.6)
    pts = SHAPES[SHAPE_NAMES[shape]] * ((stretch, 1 / stretch) if rng.random() < 0.5 else (1 / stretch, stretch))
    angle = rng.uniform(0, 2 * np.pi)
    c, s_ = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s_], [-s_, c]])
    lo, hi = pts.min(0), pts.max(0)
    unit = rng.uniform(*SHAPE_FILL) / max((hi - lo) / (w, h))
    pts, lo, hi = pts * unit, lo * unit, hi * unit
    pts = pts + rng.uniform(0, 1, 2) * (np.array([w, h]) - (hi - lo)) - lo
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    ImageDraw.Draw(img).polygon([tuple(q) for q in pts], fill=colour, outline=(20, 20, 20),
                                width=max(1, round(0.04 * min(w, h))))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


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
