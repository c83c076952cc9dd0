"""Images of the synthetic pretraining corpus (:func:`waterbirds_pipeline.synthetic.synthesize_corpus`): one filled
shape on one of six background styles, the offline stand-in for ImageNet pretraining.

- objects: one filled shape per image out of ``len(SHAPES)`` (14) shape classes (regular polygons, stars, circle,
  ellipse, cross, arrow, L, T, ...), each with a random colour, a dark outline, any rotation, a random stretch
  (aspect up to 1.6 either way, so elongation carries no class information) and a size of 40-80% of the image.
  No bird is drawn: nothing of the downstream task's core feature is a label here.
- backgrounds: six styles, three per ``place`` value (0: land foliage, checkerboard, smooth colour noise; 1: water
  waves, stripes at any angle, gradient), the downstream task's land and water among them.
- image size, noise and JPEG quality as the Waterbirds images (:mod:`waterbirds_pipeline.bird_images`).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .bird_images import background, canvas_size, ellipse, encode_jpeg, smooth_noise
from .metadata import N_SHAPES


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
    "Circle": ellipse(0, 0, 1, 1, n=40), "HalfDisc": np.concatenate([ellipse(0, 0, 1, 1, n=40)[:21], [(0, 0)]]),
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
        return background(rng, h, w, place)
    a, b = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if name == "checkerboard":
        cell = rng.uniform(4, 16)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    elif name == "colour_noise":
        t = smooth_noise(rng, h, w, int(rng.integers(3, 12)))
    elif name == "stripes":
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * along / rng.uniform(4, 16)))
    else:  # gradient
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    return a + t[..., None] * (b - a)


def render_shape(rng: np.random.Generator, shape: int, place: int, style: int,
                 size_range: tuple[int, int]) -> bytes:
    """JPEG bytes of one corpus image: shape class ``shape`` on a background of ``STYLES[place][style]``."""
    w, h = canvas_size(rng, size_range)
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
    return encode_jpeg(rng, img)
