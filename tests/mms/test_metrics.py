"""mms_pipeline.metrics against independent computations: SimpleITK (Dice, Jaccard, max Hausdorff) and a brute-force
numpy reference (surface by 6-neighbour test, all pairwise distances) for HD95 and ASSD."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from mms_pipeline import metrics as M

sitk = pytest.importorskip("SimpleITK")


# --- synthetic volumes --------------------------------------------------------------------------------------------
def ellipsoid(shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    g = np.indices(shape, dtype=np.float64)
    return sum(((g[i] - centre[i]) / radii[i]) ** 2 for i in range(len(shape))) <= 1


def heart(shape: tuple[int, int, int], shift: tuple[float, float, float], scale: float) -> np.ndarray:
    """RV blob, MYO ring around the LV blood pool; labels 1 LV, 2 MYO, 3 RV."""
    cx, cy, cz = 18 + shift[0], 16 + shift[1], 3 + shift[2]
    lab = np.zeros(shape, dtype=np.uint8)
    lab[ellipsoid(shape, (cx - 5, cy, cz), (6 * scale, 8 * scale, 2.5))] = 3
    lab[ellipsoid(shape, (cx + 3, cy, cz), (7 * scale, 6 * scale, 2.5))] = 2
    lab[ellipsoid(shape, (cx + 3.5, cy, cz), (4.5 * scale, 3.5 * scale, 2.0))] = 1
    return lab


SHAPE = (36, 32, 7)
PAIRS = {
    "shifted": (heart(SHAPE, (0, 0, 0), 1.0), heart(SHAPE, (1.3, -0.8, 0.4), 0.9)),
    "larger": (heart(SHAPE, (0.4, 0.6, -0.3), 1.15), heart(SHAPE, (0, 0, 0), 1.0)),
    # cut by the array's faces at x = 0 and z = 0: voxels beyond the array count as background
    "at_border": (heart(SHAPE, (-10.5, 0.5, -2.2), 1.0), heart(SHAPE, (-10, 0, -2), 0.95)),
}
SPACINGS = [(1.0, 1.0, 1.0), (1.3, 0.9, 6.0)]


# --- independent references ---------------------------------------------------------------------------------------
def sitk_image(mask: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8).transpose(2, 1, 0))  # sitk wants (z, y, x)
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def brute_surface(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Coordinates (mm) of foreground voxels with a background face neighbour (outside counts as background)."""
    p = np.pad(mask, 1)
    inner = np.ones_like(mask, dtype=bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inner) * np.asarray(spacing)


def brute_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    sa, sb = brute_surface(a, spacing), brute_surface(b, spacing)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


# --- case_metrics -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_case_metrics_match_independent_references(pair: str, spacing: tuple[float, float, float]) -> None:
    pred, gt = PAIRS[pair]
    got = M.case_metrics(pred, gt, spacing)
    assert set(got) == {f"{m} {s}" for s in M.STRUCTURES for m in ("Dice", "Jaccard", "Hausdorff", "HD95", "ASSD")}
    for name, label in M.STRUCTURES.items():
        p, g = pred == label, gt == label
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.Execute(sitk_image(g, spacing), sitk_image(p, spacing))
        hausdorff = sitk.HausdorffDistanceImageFilter()
        hausdorff.Execute(sitk_image(g, spacing), sitk_image(p, spacing))
        d_pg, d_gp = brute_distances(p, g, spacing)
        assert_allclose(got[f"Dice {name}"], overlap.GetDiceCoefficient(), rtol=1e-12)
        assert_allclose(got[f"Jaccard {name}"], overlap.GetJaccardCoefficient(), rtol=1e-12)
        assert_allclose(got[f"Hausdorff {name}"], hausdorff.GetHausdorffDistance(), rtol=1e-6)
        assert_allclose(got[f"Hausdorff {name}"], max(d_pg.max(), d_gp.max()), rtol=1e-6)
        assert_allclose(got[f"HD95 {name}"], np.percentile(np.concatenate([d_pg, d_gp]), 95), rtol=1e-6)
        assert_allclose(got[f"ASSD {name}"], (d_pg.mean() + d_gp.mean()) / 2, rtol=1e-6)


def test_anisotropic_spacing_scales_distances_per_axis() -> None:
    gt = np.zeros((12, 12, 8), dtype=np.uint8)
    gt[3:7, 3:7, 2:4] = 1
    pred = np.roll(gt, 2, axis=2)  # two slices further along z
    got = M.case_metrics(pred, gt, (0.5, 0.5, 7.0))
    assert got["Hausdorff LV"] == pytest.approx(14.0, rel=1e-6)
    assert M.case_metrics(pred, gt, (7.0, 7.0, 0.5))["Hausdorff LV"] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_monai_max_hausdorff_agrees_but_its_pooled_assd_differs() -> None:
    """Why ASSD and HD95 are not taken from MONAI: its symmetric ASD pools both directions into one mean."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    pred, gt = PAIRS["larger"]
    spacing = (1.3, 0.9, 6.0)
    p = torch.from_numpy(np.stack([pred == v for v in M.STRUCTURES.values()])[None]).float()
    g = torch.from_numpy(np.stack([gt == v for v in M.STRUCTURES.values()])[None]).float()
    hd = compute_hausdorff_distance(p, g, include_background=True, spacing=spacing)[0]
    pooled = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=spacing)[0]
    got = M.case_metrics(pred, gt, spacing)
    for i, name in enumerate(M.STRUCTURES):
        assert_allclose(got[f"Hausdorff {name}"], float(hd[i]), rtol=1e-6)
        d_pg, d_gp = brute_distances(pred == i + 1, gt == i + 1, spacing)
        assert_allclose(float(pooled[i]), np.concatenate([d_pg, d_gp]).mean(), rtol=1e-5)
    d_pg, d_gp = brute_distances(pred == 3, gt == 3, spacing)
    assert len(d_pg) != len(d_gp) and abs(float(pooled[2]) - got["ASSD RV"]) > 1e-4


@pytest.mark.parametrize(
    ("pred_has", "gt_has", "overlap", "distance"),
    [(False, True, 0.0, M.EMPTY_DISTANCE), (True, False, 0.0, M.EMPTY_DISTANCE),
     (False, False, M.BOTH_EMPTY["Dice"], M.BOTH_EMPTY["Hausdorff"])],
)
def test_empty_structures(pred_has: bool, gt_has: bool, overlap: float, distance: float) -> None:
    pred, gt = (a.copy() for a in PAIRS["shifted"])
    if not pred_has:
        pred[pred == 3] = 0
    if not gt_has:
        gt[gt == 3] = 0
    got = M.case_metrics(pred, gt, (1.2, 1.2, 8.0))
    assert got["Dice RV"] == overlap and got["Jaccard RV"] == overlap
    assert got["Hausdorff RV"] == got["HD95 RV"] == got["ASSD RV"] == distance
    assert got["Hausdorff LV"] > 0 and 0 < got["Dice LV"] < 1  # other structures unaffected
    assert M.BOTH_EMPTY == {"Dice": 1.0, "Jaccard": 1.0, "Hausdorff": 0.0, "HD95": 0.0, "ASSD": 0.0}


def test_identical_volumes_are_perfect() -> None:
    gt = PAIRS["shifted"][1]
    got = M.case_metrics(gt.copy(), gt, (1.5, 1.5, 10.0))
    for s in M.STRUCTURES:
        assert got[f"Dice {s}"] == 1.0 and got[f"Jaccard {s}"] == 1.0
        assert got[f"Hausdorff {s}"] == got[f"HD95 {s}"] == got[f"ASSD {s}"] == 0.0


@pytest.mark.parametrize(
    ("pred_shape", "spacing", "match"),
    [((36, 32, 6), (1.0, 1.0, 1.0), "shape"), (SHAPE, (1.0, 1.0), "entries"), (SHAPE, (1.0, 0.0, 1.0), "positive")],
)
def test_case_metrics_rejects_bad_input(pred_shape: tuple[int, ...], spacing: tuple[float, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        M.case_metrics(np.zeros(pred_shape, np.uint8), PAIRS["shifted"][1], spacing)


def test_mean_dice() -> None:
    assert M.mean_dice({"Dice LV": 0.9, "Dice MYO": 0.6, "Dice RV": 0.3}) == pytest.approx(0.6)


# --- clinical indices ---------------------------------------------------------------------------------------------
def test_clinical_volumes_of_ellipsoid() -> None:
    shape, spacing = (80, 80, 24), (1.25, 1.25, 2.0)
    lab = np.zeros(shape, dtype=np.uint8)
    lab[ellipsoid(shape, (40, 40, 12), (24, 20, 9))] = 2  # MYO shell ...
    blood = ellipsoid(shape, (40, 40, 12), (16, 12, 6))
    lab[blood] = 1  # ... around the LV blood pool
    lab[ellipsoid(shape, (12, 40, 12), (6, 8, 5))] = 3
    vols = M.clinical_volumes(lab, spacing)
    ml = 1.25 * 1.25 * 2.0 / 1000
    # radii in mm: LV 20 x 15 x 12 mm -> 4/3 pi abc = 15.08 ml
    assert vols["LV volume"] == pytest.approx(4 / 3 * math.pi * 20 * 15 * 12 / 1000, rel=0.02)
    assert vols["LV volume"] == pytest.approx(np.count_nonzero(blood) * ml, rel=1e-12)
    assert vols["MYO volume"] == pytest.approx(4 / 3 * math.pi * (30 * 25 * 18 - 20 * 15 * 12) / 1000, rel=0.02)
    assert vols["RV volume"] == pytest.approx(np.count_nonzero(lab == 3) * ml, rel=1e-12)
    assert vols["LV mass"] == pytest.approx(vols["MYO volume"] * 1.05, rel=1e-12)


def test_clinical_indices_known_values() -> None:
    def vol(n_lv: int, n_myo: int, n_rv: int) -> np.ndarray:
        flat = np.zeros(1000, dtype=np.uint8)
        flat[:n_lv], flat[n_lv:n_lv + n_myo], flat[n_lv + n_myo:n_lv + n_myo + n_rv] = 1, 2, 3
        return flat.reshape(10, 10, 10)

    sp_ed, sp_es = (2.0, 2.0, 10.0), (2.0, 2.0, 5.0)  # 0.04 ml and 0.02 ml per voxel
    got = M.clinical_indices(vol(300, 100, 250), vol(150, 120, 100), vol(250, 120, 200), vol(100, 140, 100),
                             sp_ed, sp_es)
    assert set(got) == set(M.CLINICAL_COLUMNS)
    expect = {"LV EDV": 12.0, "LV ESV": 3.0, "LV EF": 75.0, "RV EDV": 10.0, "RV ESV": 2.0, "RV EF": 80.0,
              "LV mass": 4.0 * 1.05}
    true = {"LV EDV": 10.0, "LV ESV": 2.0, "LV EF": 80.0, "RV EDV": 8.0, "RV ESV": 2.0, "RV EF": 75.0,
            "LV mass": 4.8 * 1.05}
    for k in M.CLINICAL_INDICES:
        assert got[k] == pytest.approx(expect[k])
        assert got[f"{k} true"] == pytest.approx(true[k])
        assert got[f"{k} err"] == pytest.approx(expect[k] - true[k])


def test_ejection_fraction_undefined_without_lv() -> None:
    empty = np.zeros((4, 4, 4), dtype=np.uint8)
    got = M.clinical_indices(empty, empty, empty, empty, (1, 1, 1), (1, 1, 1))
    assert math.isnan(got["LV EF"]) and math.isnan(got["LV EF err"]) and got["LV EDV"] == 0.0


# --- summarise ----------------------------------------------------------------------------------------------------
def _rows() -> list[dict]:
    return [
        {"Name": "a1", "ED/ES": "ED", "Vendor": "A", "Centre": 1, "Dice LV": 0.9, "Dice MYO": 0.8, "Dice RV": 0.7,
         "Hausdorff LV": 5.0, "cls_correct": 1, "LV EF err": -4.0},
        {"Name": "a2", "ED/ES": "ES", "Vendor": "A", "Centre": 6, "Dice LV": 0.7, "Dice MYO": 0.6, "Dice RV": 0.5,
         "Hausdorff LV": M.EMPTY_DISTANCE, "cls_correct": 0},
        {"Name": "a3", "ED/ES": "ED", "Vendor": "A", "Centre": 6, "Dice LV": 0.8, "Dice MYO": 0.7, "Dice RV": 0.9,
         "Hausdorff LV": 9.0, "cls_correct": 1, "LV EF err": 2.0},
        {"Name": "b1", "ED/ES": "ED", "Vendor": "B", "Centre": 2, "Dice LV": 0.95, "Dice MYO": 0.85,
         "Dice RV": 0.9, "Hausdorff LV": 4.0, "cls_correct": 1, "LV EF err": float("nan")},
    ]


def test_summarise_against_hand_computation() -> None:
    s = M.summarise(_rows(), "Vendor")
    assert set(s) == {"A", "B", "worst"}
    a = s["A"]
    assert a["Dice LV"] == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1), "n": 3,
                            "median": pytest.approx(0.8), "n_excluded": 0}
    # the -1 of the empty prediction is excluded, not averaged in
    assert a["Hausdorff LV"]["mean"] == pytest.approx(7.0) and a["Hausdorff LV"]["n"] == 2
    assert a["Hausdorff LV"]["n_excluded"] == 1 and a["Hausdorff LV"]["median"] == pytest.approx(7.0)
    assert a["Hausdorff LV"]["std"] == pytest.approx(math.sqrt(8.0))
    assert a["cls_correct"]["mean"] == pytest.approx(2 / 3)
    assert a[M.MEAN_DICE]["mean"] == pytest.approx(np.mean([0.8, 0.6, 0.8]))
    assert a["LV EF err"]["mean"] == pytest.approx(-1.0) and a["LV EF abs err"]["mean"] == pytest.approx(3.0)
    b = s["B"]
    assert b["Dice LV"]["n"] == 1 and b["Dice LV"]["std"] is None and b["Dice LV"]["median"] == 0.95
    assert b["LV EF err"] == {"mean": None, "std": None, "n": 0, "median": None, "n_excluded": 0}
    assert "Centre" not in a and "Name" not in a
    worst = s["worst"]
    assert worst["Dice LV"] == {"group": "A", "value": pytest.approx(0.8)}
    assert worst["Hausdorff LV"] == {"group": "A", "value": pytest.approx(7.0)}
    assert worst["cls_correct"]["group"] == "A"
    assert worst["LV EF abs err"]["group"] == "A"  # B has no value
    assert "LV EF err" not in worst  # signed error: no direction


def test_summarise_median_even_count_and_pooled_group() -> None:
    rows = [{"Vendor": "A", "Dice LV": v, "Dice MYO": 1.0, "Dice RV": 1.0} for v in (0.1, 0.4, 0.2, 0.9)]
    s = M.summarise(rows, None)
    assert set(s) == {"all", "worst"}
    assert s["all"]["Dice LV"]["median"] == pytest.approx(0.3)
    assert s["all"]["Dice LV"]["std"] == pytest.approx(np.std([0.1, 0.4, 0.2, 0.9], ddof=1))


def test_summarise_groups_by_centre_as_strings() -> None:
    s = M.summarise(_rows(), "Centre")
    assert set(s) == {"1", "2", "6", "worst"} and s["6"]["Dice LV"]["n"] == 2


@pytest.mark.parametrize(("name", "direction"), [("Dice LV", 1), ("Jaccard RV", 1), ("cls_correct", 1),
                                                 ("Dice mean", 1), ("Hausdorff MYO", -1), ("HD95 LV", -1),
                                                 ("ASSD RV", -1), ("LV EF abs err", -1), ("LV EF err", 0),
                                                 ("LV EDV", 0)])
def test_metric_direction(name: str, direction: int) -> None:
    assert M.metric_direction(name) == direction


# --- per-case CSV -------------------------------------------------------------------------------------------------
def test_per_case_csv_header_order_and_round_trip(tmp_path) -> None:
    pred, gt = PAIRS["shifted"]
    row = {"Name": "A0S9V9_sa_ED", "ED/ES": "ED", "Vendor": "A", "Centre": 1, "Code": "A0S9V9",
           "zz_extra": 3, "cls_correct": 1, **M.case_metrics(pred, gt, (1.25, 1.25, 10.0))}
    row.update(M.clinical_indices(pred, pred, gt, gt, (1.25, 1.25, 10.0), (1.25, 1.25, 10.0)))
    es = {"Name": "A0S9V9_sa_ES", "ED/ES": "ES", "Vendor": "A", "Centre": 1, "Dice LV": float("nan")}
    path = tmp_path / "per_case.csv"
    M.write_per_case_csv(path, [row, es])
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:16] == ["Name", "ED/ES", "Vendor", "Centre", "Dice LV", "Jaccard LV", "Hausdorff LV", "ASSD LV",
                           "Dice MYO", "Jaccard MYO", "Hausdorff MYO", "ASSD MYO", "Dice RV", "Jaccard RV",
                           "Hausdorff RV", "ASSD RV"]
    assert header == [*M.PER_CASE_COLUMNS, "zz_extra"]
    assert header[16:20] == ["HD95 LV", "HD95 MYO", "HD95 RV", "Code"]
    back = M.read_per_case_csv(path)
    assert back[0]["Centre"] == "1" and back[0]["Code"] == "A0S9V9"
    for k, v in row.items():
        if k not in M.ID_COLUMNS:
            assert back[0][k] == v or (math.isnan(back[0][k]) and math.isnan(v)), k
    assert math.isnan(back[1]["Dice LV"]) and math.isnan(back[1]["HD95 RV"])
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file
