"""Synthetic M&Ms-1: phantom hearts written in exactly the real release's layout, CSV format and quirks.

What matches the real release (see REFERENCE.md section 4):

- ``Training/Labeled`` (vendors A and B), ``Training/Unlabeled`` (vendor C, image only), ``Validation`` (every
  vendor-centre: A1, B2, B3, C4, D5, A6) and ``Testing`` (every vendor); vendor D never appears in training;
- the 2021 metadata CSV name, a leading unnamed index column, all 11 named columns, gaps in Height/Weight;
- 4-D int16 NIfTI ``(x, y, slice, time)``; labels (1 LV, 2 MYO, 3 RV) only at the ED and ES frames; ED = 0 for
  Siemens but one of the last two frames for Philips;
- per-vendor matrix, in-plane and slice spacing, and raw intensity scale (volume means: Siemens 40-170, Philips
  150-400, GE 2000-3500, Canon 800-1200: GE / Siemens > 10x always);
- oblique orientations, and sheared (non-orthonormal) direction cosines with ``qform_code = 0`` in Validation and
  Testing files, so that ITK refuses them and nibabel reads them.

Phantom: an elliptical LV blood pool, a myocardial ring and an RV crescent over a base-to-apex stack (the wall
keeps its area, so it thickens as the LV contracts from ED to ES), with pathology-specific geometry (NOR, DCM:
dilated thin-walled LV with low ejection, HCM: thick wall, ARV: dilated poorly contracting RV, HHD: moderately
thick wall, Other), pathologies confounded with centre as in the real data, a textured body with bright distractor
blobs, and vendor appearance: tissue contrast, gamma, bias field, blur, Gaussian or Rician noise. Vendor B (the
labelled minority) has an inverted-ish contrast (myocardium brighter than the surrounding tissue) and a stronger
bias field and noise; C and D look like A up to scale, spacing and mild contrast changes.

Everything is a pure function of ``seed`` (each subject draws from its own child of ``SeedSequence(seed)``).
"""
from __future__ import annotations

import csv
import io
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from groupdistil.errors import UserError
from groupdistil.io import atomic_path, atomic_write_text

from .data import ALL_COLUMNS, METADATA_CSV_NAMES, VENDOR_CENTRES, VENDOR_NAMES

PATHOLOGIES = ("NOR", "DCM", "HCM", "ARV", "HHD", "Other")


@dataclass(frozen=True)
class Anatomy:
    """ED geometry in mm and ejection fractions of one pathology (jittered per subject)."""

    lv_radius: float
    wall: float
    lv_ef: float
    rv_scale: float
    rv_ef: float


ANATOMY = {
    "NOR": Anatomy(lv_radius=24.0, wall=8.0, lv_ef=0.62, rv_scale=1.0, rv_ef=0.55),
    "DCM": Anatomy(lv_radius=32.0, wall=5.5, lv_ef=0.22, rv_scale=1.05, rv_ef=0.40),
    "HCM": Anatomy(lv_radius=19.0, wall=15.0, lv_ef=0.72, rv_scale=0.9, rv_ef=0.60),
    "ARV": Anatomy(lv_radius=22.0, wall=7.0, lv_ef=0.55, rv_scale=1.6, rv_ef=0.25),
    "HHD": Anatomy(lv_radius=24.0, wall=11.5, lv_ef=0.58, rv_scale=1.0, rv_ef=0.55),
    "Other": Anatomy(lv_radius=27.0, wall=9.0, lv_ef=0.42, rv_scale=1.1, rv_ef=0.45),
}

#: pathology probabilities per centre (order of PATHOLOGIES): DCM only in centres 1, 3, 5; HHD mostly centre 4
CENTRE_PATHOLOGY = {
    1: (0.25, 0.25, 0.20, 0.10, 0.10, 0.10),
    2: (0.30, 0.00, 0.30, 0.15, 0.10, 0.15),
    3: (0.25, 0.30, 0.25, 0.10, 0.00, 0.10),
    4: (0.20, 0.00, 0.20, 0.10, 0.40, 0.10),
    5: (0.25, 0.25, 0.25, 0.15, 0.00, 0.10),
    6: (0.30, 0.00, 0.30, 0.20, 0.05, 0.15),
}


@dataclass(frozen=True)
class VendorStyle:
    """Acquisition and appearance of one vendor (ranges are drawn uniformly per subject)."""

    matrix: tuple[int, int]
    spacing: tuple[float, float]
    slice_spacing: tuple[float, float]
    slices: tuple[int, int]
    frames: tuple[int, int]
    ed_at_end: bool
    mean_intensity: tuple[float, float]
    blood: float
    myo: float
    tissue: float
    air: float
    gamma: float
    bias: float
    blur: float
    noise: float
    rician: bool


VENDOR_STYLES = {
    "A": VendorStyle((128, 144), (1.30, 1.50), (10.0, 10.0), (7, 9), (8, 10), False, (40.0, 170.0), blood=1.00,
                     myo=0.25, tissue=0.45, air=0.03, gamma=1.0, bias=0.10, blur=0.6, noise=0.03, rician=True),
    "B": VendorStyle((128, 144), (1.20, 1.40), (8.0, 10.0), (7, 9), (8, 10), True, (150.0, 400.0), blood=0.80,
                     myo=0.60, tissue=0.30, air=0.05, gamma=0.7, bias=0.55, blur=1.0, noise=0.08, rician=False),
    "C": VendorStyle((112, 128), (1.45, 1.60), (9.0, 10.0), (6, 8), (8, 10), False, (2000.0, 3500.0), blood=0.90,
                     myo=0.32, tissue=0.50, air=0.02, gamma=1.2, bias=0.20, blur=0.8, noise=0.04, rician=True),
    "D": VendorStyle((144, 160), (1.15, 1.25), (8.0, 10.0), (6, 8), (8, 10), False, (800.0, 1200.0), blood=0.95,
                     myo=0.35, tissue=0.40, air=0.02, gamma=0.85, bias=0.25, blur=0.5, noise=0.05, rician=True),
}

DEFAULT_TRAIN_COUNTS = {"A": 30, "B": 6}
DEFAULT_UNLABELED_COUNTS = {"C": 4}
TINY_SHAPE = dict(matrix=64, slices=4, frames=4, anatomy=0.5)
OPTIONS = ("tiny", "train_counts", "minority_share", "unlabeled_counts", "val_per_centre", "test_per_vendor")


class Plan(NamedTuple):
    """One subject to write: its release folder, vendor and centre."""

    folder: str
    vendor: str
    centre: int

    @property
    def labelled(self) -> bool:
        """Every folder but ``Training/Unlabeled`` has label files."""
        return self.folder != "Training/Unlabeled"

    @property
    def sheared(self) -> bool:
        """Validation and Testing files have non-orthonormal direction cosines, as in the real release."""
        return self.folder in ("Validation", "Testing")


# --- phantom geometry ----------------------------------------------------------------------------------------
def contraction(frames: int, ed: int, es: int) -> np.ndarray:
    """Contraction ``c(t)`` in [0, 1] per frame: 0 at ED, 1 at ES, smooth and cyclic. Shape ``(T,)``."""
    phase = ((np.arange(frames) - ed) % frames) / frames
    p_es = ((es - ed) % frames) / frames
    rise = np.sin(0.5 * np.pi * phase / p_es) ** 2
    fall = np.cos(0.5 * np.pi * (phase - p_es) / (1.0 - p_es)) ** 2
    return np.where(phase <= p_es, rise, fall)


def phantom_labels(shape: tuple[int, int, int], spacing: tuple[float, float], anatomy: Anatomy, c: np.ndarray,
                   rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Label maps ``(X, Y, Z, T)`` (uint8: 1 LV, 2 MYO, 3 RV) of a heart contracting by ``c`` ``(T,)``."""
    nx, ny, nz = shape

    def jitter() -> float:
        return float(rng.uniform(0.9, 1.1))

    r_in_ed, wall = anatomy.lv_radius * scale * jitter(), anatomy.wall * scale * jitter()
    lv_ef = float(np.clip(anatomy.lv_ef * jitter(), 0.05, 0.85))
    rv_ef = float(np.clip(anatomy.rv_ef * jitter(), 0.05, 0.85))
    ecc, tilt = rng.uniform(0.0, 0.12), rng.uniform(0, np.pi)
    rv_angle = np.pi + rng.uniform(-0.35, 0.35)
    dx, dy = np.cos(rv_angle), np.sin(rv_angle)
    # LV centre: random offset, shifted away from the RV so that the whole heart sits near the image centre
    centre = rng.uniform(-8, 8, size=2) * scale - 0.3 * (r_in_ed + wall) * np.array([dx, dy])
    x = (np.arange(nx) - nx / 2) * spacing[0] - centre[0]
    y = (np.arange(ny) - ny / 2) * spacing[1] - centre[1]
    X, Y = np.meshgrid(x, y, indexing="ij")
    u = X * np.cos(tilt) + Y * np.sin(tilt)
    v = -X * np.sin(tilt) + Y * np.cos(tilt)
    r = np.sqrt((u / (1 + ecc)) ** 2 + (v / (1 - ecc)) ** 2)[..., None, None]  # (X, Y, 1, 1)

    n_heart = nz - (1 if nz > 4 and rng.random() < 0.5 else 0)  # sometimes one empty slice beyond the apex
    depth = (np.arange(nz) + 0.5) / max(n_heart, 1)  # 0 base .. 1 apex
    taper = np.sqrt(np.clip(np.cos(0.5 * np.pi * np.clip(depth, 0, 1)), 0, 1)) * (depth < 1)  # (Z,)
    r_out_ed = (r_in_ed + wall) * taper  # (Z,)
    r_in_ed_z = np.clip(r_out_ed - wall, 0, None)
    r_in = r_in_ed_z[:, None] * np.sqrt(1 - lv_ef * c)[None, :]  # (Z, T): blood area scales with volume
    r_out = np.sqrt(r_in**2 + (r_out_ed**2 - r_in_ed_z**2)[:, None])  # wall area is conserved

    labels = np.zeros((nx, ny, nz, len(c)), np.uint8)
    labels[r < r_out] = 2
    labels[r < r_in] = 1
    # RV: a crescent hugging the septum: an ellipse overlapping the LV minus the epicardial disk; shorter than the
    # LV towards the apex; ``s`` (Z, T) its relative size, shrinking with the RV ejection
    s = anatomy.rv_scale * np.sqrt(1 - rv_ef * c)[None, :] * (depth < 0.8)[:, None]
    along_r, across_r = r_out * (0.5 + 0.6 * s), r_out * (0.9 + 0.35 * s)
    a = X[..., None, None] - 0.5 * r_out * dx
    b = Y[..., None, None] - 0.5 * r_out * dy
    along, across = a * dx + b * dy, -a * dy + b * dx
    inside_rv = (along / (along_r + 1e-6)) ** 2 + (across / (across_r + 1e-6)) ** 2 < 1
    labels[inside_rv & (s > 0) & (r > r_out + 0.5 * scale)] = 3
    return labels


def smooth_field(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    f = gaussian_filter(rng.standard_normal(shape), sigma)
    return (f - f.mean()) / (f.std() + 1e-8)


def render(labels: np.ndarray, style: VendorStyle, rng: np.random.Generator) -> np.ndarray:
    """Vendor-specific MR-like image ``(X, Y, Z, T)`` float of the label maps ``(X, Y, Z, T)``."""
    nx, ny, nz, nt = labels.shape
    gx, gy = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    body = ((gx / rng.uniform(0.8, 0.95)) ** 2 + (gy / rng.uniform(0.65, 0.85)) ** 2) < 1
    texture = smooth_field((nx, ny, nz), 2.0, rng)
    tissue = np.where(body[..., None], style.tissue * (1 + 0.15 * texture), style.air)
    for _ in range(3):  # bright distractors (vessels, fat), away from the centre
        bx, by = rng.uniform(-0.7, 0.7, size=2)
        if bx**2 + by**2 < 0.25:
            bx, by = bx * 2.2, by * 2.2
        blob = ((gx - bx) ** 2 + (gy - by) ** 2) < rng.uniform(0.003, 0.01)
        tissue = np.where((blob & body)[..., None], style.blood * rng.uniform(0.7, 1.0), tissue)
    img = np.repeat(tissue[..., None], nt, axis=3)
    img[(labels == 1) | (labels == 3)] = style.blood
    img[labels == 2] = style.myo
    img = gaussian_filter(img, sigma=(style.blur, style.blur, 0, 0))
    img = np.clip(img, 0, None) ** style.gamma
    poly = sum(rng.uniform(-1, 1) * term for term in (gx, gy, gx * gy, gx**2, gy**2))
    img = img * np.exp(style.bias * poly)[..., None, None]
    n1 = rng.normal(0, style.noise, img.shape)
    if style.rician:
        img = np.sqrt((img + n1) ** 2 + rng.normal(0, style.noise, img.shape) ** 2)
    else:
        img = np.clip(img + n1, 0, None)
    return img


def random_rotation(rng: np.random.Generator, max_angle: float = 0.6) -> np.ndarray:
    """A random 3x3 rotation up to ``max_angle`` rad (oblique short-axis orientations)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def affine_for(spacing: tuple[float, float, float], rng: np.random.Generator, shear: bool) -> np.ndarray:
    """Voxel-to-world 4x4; with ``shear`` the slice direction is tilted in-plane (non-orthonormal cosines)."""
    rot = random_rotation(rng)
    directions = rot.copy()
    if shear:
        directions[:, 2] = rot[:, 2] + rng.uniform(0.01, 0.03) * rot[:, 0]  # no longer orthogonal nor unit
    affine = np.eye(4)
    affine[:3, :3] = directions * np.asarray(spacing)[None, :]
    affine[:3, 3] = rng.uniform(-120, 120, size=3)
    return affine


# --- subjects ------------------------------------------------------------------------------------------------
def subject_code(rng: np.random.Generator) -> str:
    """A 6-character external code like ``A0S9V9``."""
    letters, digits = string.ascii_uppercase, string.digits
    return "".join(rng.choice(list(letters if i % 2 == 0 else digits)) for i in range(6))


def synth_subject(plan: Plan, rng: np.random.Generator, tiny: bool) -> tuple[dict[str, Any], np.ndarray,
                                                                                np.ndarray, np.ndarray]:
    """Metadata row, image ``(X, Y, Z, T)`` int16, labels ``(X, Y, Z, T)`` uint8 and affine of one subject."""
    style = VENDOR_STYLES[plan.vendor]
    pathology = PATHOLOGIES[rng.choice(len(PATHOLOGIES), p=CENTRE_PATHOLOGY[plan.centre])]
    if tiny:
        nx = ny = TINY_SHAPE["matrix"]
        nz, nt, scale = TINY_SHAPE["slices"], TINY_SHAPE["frames"], TINY_SHAPE["anatomy"]
    else:
        nx = ny = int(rng.integers(style.matrix[0], style.matrix[1] + 1)) // 16 * 16
        nz = int(rng.integers(style.slices[0], style.slices[1] + 1))
        nt = int(rng.integers(style.frames[0], style.frames[1] + 1))
        scale = 1.0
    sxy = float(rng.uniform(*style.spacing))
    sz = float(rng.uniform(*style.slice_spacing))
    ed = nt - 1 - int(rng.integers(0, 2)) if style.ed_at_end else 0
    es = (ed + int(round(rng.uniform(0.33, 0.42) * nt))) % nt
    labels = phantom_labels((nx, ny, nz), (sxy, sxy), ANATOMY[pathology], contraction(nt, ed, es), rng, scale)
    img = render(labels, style, rng)
    img = img * (rng.uniform(*style.mean_intensity) / img.mean())
    gt = np.zeros_like(labels)
    gt[..., [ed, es]] = labels[..., [ed, es]]
    height = "" if rng.random() < 0.15 else f"{rng.normal(170, 9):.1f}"
    weight = "" if rng.random() < 0.15 else f"{rng.normal(78, 13):.1f}"
    row = {
        "VendorName": VENDOR_NAMES[plan.vendor], "Vendor": plan.vendor, "Centre": plan.centre, "ED": ed, "ES": es,
        "Age": int(rng.integers(18, 85)), "Pathology": pathology, "Sex": "MF"[int(rng.integers(0, 2))],
        "Height": height, "Weight": weight,
    }
    affine = affine_for((sxy, sxy, sz), rng, shear=plan.sheared)
    return row, np.clip(np.round(img), 0, 32767).astype(np.int16), gt, affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, sheared: bool) -> None:
    """Write atomically; sheared affines go to the sform only (qform_code 0), as in the real val/test files."""
    img = nib.Nifti1Image(data, affine)
    if sheared:
        img.set_qform(None, code=0)
        img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def plan_release(train_counts: Mapping[str, int], unlabeled_counts: Mapping[str, int], val_per_centre: int,
                 test_per_vendor: int) -> list[Plan]:
    """Subjects per release folder; centres of a vendor are filled round-robin."""
    plans = []
    for folder, counts in (("Training/Labeled", train_counts), ("Training/Unlabeled", unlabeled_counts)):
        for vendor, n in counts.items():
            plans += [Plan(folder, vendor, VENDOR_CENTRES[vendor][0 if vendor == "A" else i % len(
                VENDOR_CENTRES[vendor])]) for i in range(int(n))]
    for vendor, centres in VENDOR_CENTRES.items():
        plans += [Plan("Validation", vendor, c) for c in centres for _ in range(val_per_centre)]
        plans += [Plan("Testing", vendor, centres[i % len(centres)]) for i in range(test_per_vendor)]
    return plans


def _check_counts(name: str, counts: Any) -> dict[str, int]:
    if not isinstance(counts, Mapping) or any(v not in VENDOR_NAMES or int(n) < 0 for v, n in counts.items()):
        raise UserError(f"synthesize option {name}: expected {{vendor: count}} with vendors "
                        f"{', '.join(VENDOR_NAMES)}, got {counts!r}")
    return {v: int(n) for v, n in counts.items()}


def synthesize(out: Path, seed: int = 0, **options: Any) -> None:
    """Write a synthetic M&Ms-1 release under ``out`` (must be empty or absent).

    Options: ``tiny`` (64x64, 4 slices, 4 frames and few subjects, for tests), ``train_counts`` (labelled training
    subjects per vendor, default A 30, B 6), ``minority_share`` (instead of ``train_counts``: the share of vendor B
    among the 36 labelled training subjects, 0.5 = balanced; for imbalance sweeps), ``unlabeled_counts`` (default C
    4), ``val_per_centre`` (default 3, tiny 1), ``test_per_vendor`` (default 6, tiny 1).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown synthesize option(s) {unknown}; valid: {', '.join(OPTIONS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: synthesize needs an empty or new folder")
    tiny = bool(options.get("tiny", False))
    if "minority_share" in options:
        share = options["minority_share"]
        if "train_counts" in options or not isinstance(share, (int, float)) or not 0 < share <= 0.5:
            raise UserError(f"minority_share must be a number in (0, 0.5] and not given with train_counts, got {share}")
        total = sum(DEFAULT_TRAIN_COUNTS.values())
        n_b = max(1, round(total * share))
        options = {**options, "train_counts": {"A": total - n_b, "B": n_b}}
    train_counts = _check_counts("train_counts", options.get("train_counts", {"A": 3, "B": 2} if tiny
                                                             else DEFAULT_TRAIN_COUNTS))
    unlabeled_counts = _check_counts("unlabeled_counts", options.get("unlabeled_counts", {"C": 1} if tiny
                                                                     else DEFAULT_UNLABELED_COUNTS))
    plans = plan_release(train_counts, unlabeled_counts, int(options.get("val_per_centre", 1 if tiny else 3)),
                         int(options.get("test_per_vendor", 1 if tiny else 6)))
    children = np.random.SeedSequence(int(seed)).spawn(len(plans) + 1)
    code_rng = np.random.default_rng(children[-1])
    codes: list[str] = []
    while len(codes) < len(plans):
        code = subject_code(code_rng)
        if code not in codes:
            codes.append(code)
    rows = []
    for plan, code, child in zip(plans, codes, children[:-1], strict=True):
        row, img, gt, affine = synth_subject(plan, np.random.default_rng(child), tiny)
        folder = out / plan.folder / code
        save_nifti(folder / f"{code}_sa.nii.gz", img, affine, plan.sheared)
        if plan.labelled:
            save_nifti(folder / f"{code}_sa_gt.nii.gz", gt, affine, plan.sheared)
        rows.append({"External code": code, **row})
    if all(r["Height"] and r["Weight"] for r in rows):
        rows[0]["Weight"] = ""  # the real CSV always has gaps
    write_metadata_csv(out / METADATA_CSV_NAMES[0], sorted(rows, key=lambda r: r["External code"]))


def write_metadata_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The real CSV format: a leading unnamed index column, then :data:`~mms_pipeline.data.ALL_COLUMNS`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["", *ALL_COLUMNS])
    for i, row in enumerate(rows):
        writer.writerow([i, *(row.get(c, "") for c in ALL_COLUMNS)])
    atomic_write_text(path, buf.getvalue())
