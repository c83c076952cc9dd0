"""Regression suite: tiny deterministic runs of each pipeline and method, key metrics pinned in
``tests/golden.json``. A change that alters results fails here until the golden file is regenerated on purpose:

    GROUPDISTIL_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

and the reason is given in the commit. Runs use one thread so float sums do not depend on the core count.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from groupdistil.cli import main
from mms_pipeline.pipeline import MMSPipeline
from waterbirds_pipeline.pipeline import WaterbirdsPipeline

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden.json")
UPDATE = os.environ.get("GROUPDISTIL_UPDATE_GOLDEN") == "1"
METHODS = ["erm", "kd", "groupdro", "groupdistil"]
COMMON = ["--max-steps", "6", "--set", "train.eval_every=3", "--set", "train.log_every=3",
          "--set", "train.num_threads=1"]
SETTINGS = {
    "waterbirds": COMMON + ["--set", "model.arch=resnet18", "--set", "data.image_size=32",
                            "--set", "train.batch_size=16"],
    "mms": COMMON + ["--set", "data.roi=[64, 64]", "--set", "train.batch_size=8",
                     "--set", "model.encoder=resnet18", "--set", "model.decoder_channels=[16, 16, 8, 8, 8]"],
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("golden")
    WaterbirdsPipeline.synthesize(base / "wb", seed=0, scale=0.02, min_size=40, max_size=56)
    MMSPipeline.synthesize(base / "mms", seed=0, tiny=True)
    return {"waterbirds": base / "wb", "mms": base / "mms"}


def key_metrics(run_dir: Path) -> dict[str, float]:
    m = json.loads((run_dir / "metrics.json").read_text())
    out = {"selected_step": m["selected_step"]}
    for split in ("val", "test"):
        out[f"{split}.worst_group_metric"] = m[split]["worst_group_metric"]
        out[f"{split}.average_metric"] = m[split]["average_metric"]
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    out["final_loss"] = log[-1]["loss"]
    if "group_weight" in log[-1]:
        out.update({f"final_q{g}": q for g, q in enumerate(log[-1]["group_weight"])})
    return out


def run_all(roots: dict[str, Path], out: Path) -> dict[str, dict[str, float]]:
    results = {}
    for pipeline, extra in SETTINGS.items():
        data = ["--data-root", str(roots[pipeline])]
        teacher = out / f"{pipeline}_teacher"
        assert main(["run", str(ROOT / f"configs/{pipeline}_teacher.yaml"), *data, "--out", str(teacher),
                     *extra]) == 0
        results[f"{pipeline}/teacher"] = key_metrics(teacher)
        for method in METHODS:
            run = out / f"{pipeline}_{method}"
            assert main(["run", str(ROOT / f"configs/{pipeline}.yaml"), *data, "--out", str(run), "--method", method,
                         "--teacher", str(teacher), *extra]) == 0
            results[f"{pipeline}/{method}"] = key_metrics(run)
    return results


def test_results_match_golden_file(roots, tmp_path):
    results = run_all(roots, tmp_path)
    if UPDATE or not GOLDEN.exists():
        GOLDEN.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        if not UPDATE:
            pytest.fail(f"{GOLDEN} did not exist; it was written now: review and commit it")
        return
    golden = json.loads(GOLDEN.read_text())
    assert sorted(results) == sorted(golden)
    diffs = []
    for run, values in golden.items():
        for key, want in values.items():
            got = results[run].get(key)
            if got is None or not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5):
                diffs.append(f"{run} {key}: golden {want}, now {got}")
    assert not diffs, "results changed (regenerate tests/golden.json on purpose):\n" + "\n".join(diffs)
