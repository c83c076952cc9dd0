"""The M&Ms report renders from metrics.json-like dicts, per_case.csv and examples.npz; example slices round-trip."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mms_pipeline import examples as E
from mms_pipeline import metrics as M
from mms_pipeline import report as R
from mms_pipeline.data import VENDOR_NAMES

VENDORS = {"A": (1, 6), "B": (2, 3), "C": (4,), "D": (5,)}


def _volume(rng: np.random.Generator, shape: tuple[int, int, int], jitter: float) -> np.ndarray:
    g = np.indices(shape, dtype=np.float64)
    cx, cy = shape[0] / 2 + rng.normal(0, jitter), shape[1] / 2 + rng.normal(0, jitter)
    lab = np.zeros(shape, dtype=np.uint8)
    lab[((g[0] - cx + 6) / 4) ** 2 + ((g[1] - cy) / 6) ** 2 < 1] = 3
    lab[((g[0] - cx - 3) / 5) ** 2 + ((g[1] - cy) / 5) ** 2 < 1] = 2
    lab[((g[0] - cx - 3) / 3) ** 2 + ((g[1] - cy) / 3) ** 2 < 1] = 1
    lab[..., [0, -1]] = 0
    return lab


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with per_case.csv and examples.npz as the final test evaluation writes them."""
    run_dir = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    shape, spacing = (24, 24, 5), (1.25, 1.25, 10.0)
    rows, collector = [], E.ExampleCollector()
    for vendor, centres in VENDORS.items():
        for k in range(3):
            code = f"{vendor}{k:05d}"
            vols = {ph: (_volume(rng, shape, 0.0), _volume(rng, shape, 1.5 if vendor == "D" else 0.7))
                    for ph in ("ED", "ES")}
            if vendor == "C" and k == 0:
                vols["ES"][1][vols["ES"][1] == 3] = 0  # an empty RV prediction
            clinical = M.clinical_indices(vols["ED"][1], vols["ES"][1], vols["ED"][0], vols["ES"][0], spacing, spacing)
            for ph, (gt, pred) in vols.items():
                row = {"Name": f"{code}_sa_{ph}", "ED/ES": ph, "Vendor": vendor, "Centre": centres[k % len(centres)],
                       "Code": code, **M.case_metrics(pred, gt, spacing), "cls_correct": int(vendor != "C" or k == 1)}
                if ph == "ED":
                    row.update(clinical)
                rows.append(row)
                collector.add(row, rng.random(shape).astype(np.float32), gt, pred)
    M.write_per_case_csv(run_dir / R.PER_CASE_FILE, rows)
    collector.save(run_dir / R.EXAMPLES_FILE)
    return run_dir


def _evaluation(rows: list[dict]) -> dict:
    by_vendor = M.summarise(rows, "Vendor")
    return {"by_vendor": by_vendor, "by_centre": M.summarise(rows, "Centre"),
            "worst_group_metric": by_vendor["worst"][M.MEAN_DICE]["value"],
            "average_metric": float(np.mean([M.mean_dice(r) for r in rows])),
            "cls_acc_by_vendor": {v: by_vendor[v]["cls_correct"]["mean"] for v in VENDORS},
            "worst_vendor_cls_acc": min(by_vendor[v]["cls_correct"]["mean"] for v in VENDORS)}


def test_report_renders_tables_plots_and_examples(run: Path) -> None:
    rows = M.read_per_case_csv(run / R.PER_CASE_FILE)
    ev = _evaluation(rows)
    metrics = {"selected_step": 120, "val": ev, "test": ev, "last": {"val": ev, "test": ev}}
    info = {"method": "kd_groupdro", "seed": 3, "train_seconds": 12.5, "params": 1_234_567,
            "teacher_params": 23_456_789, "infer_seconds_per_case": 0.031, "teacher_infer_seconds_per_case": 0.2}
    R.write_mms_report(run, metrics, info)
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2  # box plots and example slices, embedded
    assert (run / R.BOXPLOT_FILE).stat().st_size > 0 and (run / R.EXAMPLES_PNG).stat().st_size > 0
    assert f"]({R.BOXPLOT_FILE})" in md and f"]({R.EXAMPLES_PNG})" in md
    for vendor in VENDORS:  # named beside the letter (A (Siemens)); the interval table counts subjects
        assert re.search(rf"^\| {vendor} \({VENDOR_NAMES[vendor]}\) \| \d+ \|", md, re.MULTILINE), vendor
        assert f"<td>{vendor} ({VENDOR_NAMES[vendor]})</td>" in page
    worst = ev["by_vendor"]["worst"][M.MEAN_DICE]["group"]
    assert f"Worst vendor by mean Dice: {worst}" in md
    assert "| worst |" in md and "cls accuracy" in md and "LV EF err (%)" in md
    assert "(1 excl.)" in md  # the empty RV prediction of vendor C, excluded from the distance means
    assert "1,234,567" in md and "23,456,789" in md and "0.0310" in md
    assert "<details>" in page and "Centre" in page
    assert "Empty predictions are scored" in md and "= -1" in md
    assert "Selected step: 120" in md


def test_report_tolerates_missing_inputs(tmp_path: Path) -> None:
    rows = [{"Name": "x_ED", "ED/ES": "ED", "Vendor": "A", "Centre": 1, "Dice LV": 0.9, "Dice MYO": 0.8,
             "Dice RV": 0.7, "Hausdorff LV": 4.0}]
    R.write_mms_report(tmp_path, {"val": {"by_vendor": M.summarise(rows, "Vendor")}}, {})
    md = (tmp_path / "report.md").read_text()
    assert "| A (Siemens) |" in md and "No per_case.csv" in md and "Validation: per vendor" in md
    assert (tmp_path / "report.html").exists() and not (tmp_path / R.BOXPLOT_FILE).exists()


def test_example_slice_is_mid_ventricular() -> None:
    gt = np.zeros((8, 8, 9), dtype=np.uint8)
    fg = [0, 40, 30, 10, 12, 20, 11, 5, 0]  # slices 1..7 hold the heart; middle third 3..5; basal slice 1 largest
    for z, n in enumerate(fg):
        gt.reshape(64, 9)[:n, z] = 1
    assert E.example_slice(gt, np.zeros_like(gt)) == 5
    assert E.example_slice(np.zeros_like(gt), gt) == 5  # falls back to the prediction
    assert E.example_slice(np.zeros_like(gt), np.zeros_like(gt)) == 4


def test_collector_keeps_best_and_worst_per_vendor_and_npz_round_trips(tmp_path: Path) -> None:
    collector = E.ExampleCollector()
    z = np.zeros((6, 5, 3))
    for name, vendor, dice in [("a", "A", 0.5), ("b", "A", 0.9), ("c", "A", 0.7), ("d", "B", 0.6)]:
        row = {"Name": name, "ED/ES": "ES", "Vendor": vendor, "Dice LV": dice, "Dice MYO": dice, "Dice RV": dice}
        collector.add(row, z + dice, (z + 1).astype(np.uint8), (z + 2).astype(np.uint8))
    examples = collector.examples()
    assert [(e["vendor"], e["kind"], e["name"]) for e in examples] == [("A", "best", "b"), ("A", "worst", "a"),
                                                                        ("B", "best", "d")]
    E.save_examples(tmp_path / "ex.npz", examples)
    back = E.load_examples(tmp_path / "ex.npz")
    assert len(back) == 3
    for e, b in zip(examples, back):
        assert b["image"].shape == (6, 5) and b["image"].dtype == np.float32 and b["gt"].dtype == np.uint8
        np.testing.assert_array_equal(b["pred"], e["pred"])
        assert {k: b[k] for k in ("caption", "vendor", "kind", "name", "phase", "slice")} == \
               {k: e[k] for k in ("caption", "vendor", "kind", "name", "phase", "slice")}
        assert b["dice"] == pytest.approx(e["dice"])
    with pytest.raises(ValueError, match="2-D"):
        E.save_examples(tmp_path / "bad.npz", [{"image": z, "gt": z, "pred": z, "caption": ""}])


def test_report_grouped_by_centre_is_per_centre_throughout(run: Path, tmp_path: Path) -> None:
    """With data.group_by: centre the headline, tables, intervals, box plots and examples are per centre, each centre
    named with its vendor; the vendors are folded."""
    rows = M.read_per_case_csv(run / R.PER_CASE_FILE)
    M.write_per_case_csv(tmp_path / R.PER_CASE_FILE, rows)
    collector = E.ExampleCollector("Centre")
    rng = np.random.default_rng(1)
    for r in rows:
        lab = _volume(rng, (24, 24, 5), 0.0)
        collector.add(r, rng.random(lab.shape).astype(np.float32), lab, lab)
    collector.save(tmp_path / R.EXAMPLES_FILE)
    by_centre = M.summarise(rows, "Centre")
    means = {g: by_centre[g][M.MEAN_DICE]["mean"] for g in by_centre if g != "worst"}
    ev = {**_evaluation(rows), "group_metric": means}
    ev["worst_group_metric"] = min(ev["group_metric"].values())
    R.write_mms_report(tmp_path, {"selected_step": 1, "test": ev}, {"method": "kd", "group_by": "centre"})
    md = (tmp_path / "report.md").read_text()
    worst = by_centre["worst"][M.MEAN_DICE]["group"]
    vendor = next(v for v, cs in VENDORS.items() if int(worst) in cs)
    assert f"Worst centre by mean Dice: {worst} ({vendor}, " in md
    assert f"worst_group_metric = {ev['worst_group_metric']:.3f} (centre {worst} ({vendor}, " in md
    for heading in ("## Test: per centre", "## Test: mean Dice per centre with 95% bootstrap intervals",
                    "## Test: Dice per centre and phase", "## Dice per centre",
                    "## Examples: best and worst case per centre", "## Test: per vendor"):
        assert heading in md, heading
    assert "| Centre | volumes (subjects) |" in md and "| 1 (A, Siemens) |" in md and "| worst centre |" in md
    assert "Worst vendor" not in md and "**Dice and Hausdorff per vendor (this run is grouped by centre)**" in md
    examples = E.load_examples(tmp_path / R.EXAMPLES_FILE)
    assert {e["group"] for e in examples} == {str(c) for cs in VENDORS.values() for c in cs}
    assert examples[0]["caption"].startswith("centre 1 (A, Siemens), best: ")
    # an examples.npz written before the group field existed still loads
    legacy = dict(np.load(tmp_path / R.EXAMPLES_FILE))
    del legacy["group"]
    np.savez(tmp_path / "old.npz", **legacy)
    assert E.load_examples(tmp_path / "old.npz")[0]["group"] == ""


def test_pipeline_grouped_by_centre_collects_examples_per_centre(mms_root: Path, make_pipeline, tmp_path: Path) -> None:
    pipe = make_pipeline(mms_root, data={"group_by": "centre"})
    model = pipe.model_for({"model": {}}).eval()
    res = pipe.evaluate(model, "test", out_dir=tmp_path)
    centres = {str(s.centre) for s in pipe.splits["test"]}
    assert set(res["group_metric"]) == centres
    assert {e["group"] for e in E.load_examples(tmp_path / R.EXAMPLES_FILE)} == centres
    pipe.write_report(tmp_path, {"selected_step": 1, "test": res}, {"method": "erm"})
    assert "## Test: per centre" in (tmp_path / "report.md").read_text()
