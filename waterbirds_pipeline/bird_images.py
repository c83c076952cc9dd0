"""Images of the synthetic Waterbirds (:mod:`waterbirds_pipeline.synthetic`): a bird on a land or water background.

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
- image size: the longer side uniform in ``size_range``, aspect ratio between 1 and 4:3 either way (the square
  resize of the pipeline then distorts shapes by at most 4:3, less than the class difference).
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTES = ("brown", "grey", "dark", "vivid")
LAND_COLOURS = (((0.08, 0.22, 0.06), (0.42, 0.62, 0.22)),  # green
                ((0.20, 0.24, 0.08), (0.55, 0.55, 0.25)),  # olive
                ((0.25, 0.16, 0.08), (0.58, 0.45, 0.28)))  # brown
WATER_COLOURS = (((0.04, 0.16, 0.38), (0.36, 0.58, 0.82)),  # blue
                 ((0.03, 0.25, 0.30), (0.30, 0.66, 0.66)))  # teal
ELONGATION = ((0.0, 0.3), (0.7, 1.0))  # by y: the latent that sets the bird's build (see _bird)
BIRD_FILL = (0.6, 0.8)  # the bird's bounding box, as a fraction of the image (its tighter side)


# --- canvas and encoding (shared with the pretraining corpus's images) ----------------------------------------
def canvas_size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    """``(w, h)``: the longer side uniform in ``size_range``, aspect ratio 1 to 4:3, either way."""
    long_side = int(rng.integers(size_range[0], size_range[1] + 1))
    w, h = long_side, round(long_side * rng.uniform(0.75, 1.0))
    if rng.random() < 0.5:
        w, h = h, w
    return w, h


def encode_jpeg(rng: np.random.Generator, img: Image.Image) -> bytes:
    """JPEG bytes of ``img`` with Gaussian pixel noise (sigma 2-8) and a random quality (75-95)."""
    w, h = img.size
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


# --- backgrounds ----------------------------------------------------------------------------------------------
def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Values in [0, 1] of shape ``(h, w)``: a random ``cells``-wide grid, bicubically upsampled."""
    grid = rng.random((max(2, round(cells * h / w)), cells)).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)), 0, 1)


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(colour) + rng.uniform(-amount, amount, 3), 0, 1)


def background(rng: np.random.Generator, h: int, w: int, place: int) -> np.ndarray:
    """Float ``(h, w, 3)`` in [0, 1]: water waves (place 1) or land foliage (place 0), with an optional sky band."""
    if place == 1:
        dark, light = WATER_COLOURS[rng.integers(len(WATER_COLOURS))]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wavelength, ripple = rng.uniform(3, 10), rng.uniform(8, 40)
        phase = 2 * np.pi * yy / wavelength + rng.uniform(0.5, 2.0) * np.sin(2 * np.pi * xx / ripple
                                                                             + rng.uniform(0, 2 * np.pi))
        t = 0.65 * (0.5 + 0.5 * np.sin(phase + 3 * smooth_noise(rng, h, w, 6))) + 0.35 * smooth_noise(rng, h, w, 5)
    else:
        dark, light = LAND_COLOURS[rng.integers(len(LAND_COLOURS))]
        t = 0.55 * smooth_noise(rng, h, w, int(rng.integers(4, 9))) \
            + 0.45 * smooth_noise(rng, h, w, int(rng.integers(14, 30)))
    dark, light = _jitter(rng, dark), _jitter(rng, light)
    img = dark + t[..., None] * (light - dark)
    if rng.random() < 0.5:
        horizon = int(h * rng.uniform(0.1, 0.35))
        sky = _jitter(rng, (0.70, 0.80, 0.90), 0.1)
        img[:horizon] = sky * np.linspace(0.9, 1.05, horizon)[:, None, None]
    return img


# --- birds ----------------------------------------------------------------------------------------------------
def ellipse(cx: float, cy: float, a: float, b: float, angle: float = 0.0, n: int = 28) -> np.ndarray:
    """``n`` points ``(n, 2)`` of the ellipse with centre ``(cx, cy)``, half-axes ``a``, ``b``, turned by ``angle``."""
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
        (ellipse(0, 0, 1, b) @ rot, body),
        (ellipse(-0.15, 0.1 * b, rng.uniform(0.5, 0.75), 0.55 * b, rng.uniform(-0.2, 0.2)) @ rot, wing),
        (np.stack([beak_root + (0, beak_w / 2), beak_tip, beak_root - (0, beak_w / 2)]), beak_colour),
        (ellipse(*head, head_r, head_r), head_colour),
        (ellipse(*(head + head_r * np.array([0.35, 0.25])), 0.07, 0.07), np.full(3, 0.05)),
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
    """JPEG bytes of one image: a bird of class ``y`` and colour palette ``palette`` on a background of ``place``
    (size: :func:`canvas_size`)."""
    w, h = canvas_size(rng, size_range)
    bg = background(rng, h, w, place) * rng.uniform(0.8, 1.15)
    img = Image.fromarray((np.clip(bg, 0, 1) * 255).astype(np.uint8))
    _draw_bird(rng, img, y, palette)
    return encode_jpeg(rng, img)
