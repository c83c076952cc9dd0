"""Every shipped experiment file is valid: its schema, its run configs and overrides resolve, and its grid plans."""
from pathlib import Path

import pytest

from groupdistil.config import load_yaml
from groupdistil.experiments.plan import plan_runs
from groupdistil.experiments.schema import load_experiment
from groupdistil.pipeline import get_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiment_plans(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in experiment files resolve against the working directory
    exp = load_experiment(path)
    pipeline_cls = get_pipeline(load_yaml(exp.student_config)["pipeline"])
    specs = plan_runs(exp, tmp_path / "data", tmp_path / "out", pipeline_cls)
    assert specs and len({s.run_dir for s in specs}) == len(specs)


def test_there_are_shipped_experiments():
    assert {p.stem for p in EXPERIMENTS} >= {"quickstart", "waterbirds_paper", "mms_segmentation",
                                            "mms_classification", "eta_sweep", "imbalance_sweep"}
