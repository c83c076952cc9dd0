"""torchrun with 2 CPU processes (gloo): identical group weights on both ranks, equal to one process on the same
global batches, and a complete gathered evaluation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
SCRIPT = HERE / "ddp_toy_run.py"


def launch(out: Path, nproc: int, teacher: Path | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), str(SCRIPT), str(out)]
    if teacher is not None:
        cmd.append(str(teacher))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_rank_run_matches_single_process(tmp_path):
    launch(tmp_path / "teacher", 1)
    launch(tmp_path / "single", 1, tmp_path / "teacher")
    launch(tmp_path / "ddp", 2, tmp_path / "teacher")
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    assert r0["world"] == 2 and r1["world"] == 2
    assert torch.equal(r0["q"], r1["q"])  # identical on both ranks
    torch.testing.assert_close(r0["q"], single["q"], rtol=1e-5, atol=1e-6)
    # the per-step weights and group statistics of the global batch equal the single-process ones
    log_d = [json.loads(x) for x in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    log_s = [json.loads(x) for x in (tmp_path / "single" / "train_log.jsonl").read_text().splitlines()]
    assert len(log_d) == len(log_s) == 8
    for a, b in zip(log_d, log_s):
        assert a["group_count"] == b["group_count"]
        torch.testing.assert_close(torch.tensor(a["group_weight"]), torch.tensor(b["group_weight"]), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)
    # complete gathered evaluation (the toy pipeline asserts every case came back), same metrics on both ranks
    assert r0["metrics"]["test"] == r1["metrics"]["test"]
    torch.testing.assert_close(r0["metrics"]["test"]["average_metric"], single["metrics"]["test"]["average_metric"])
    assert (tmp_path / "ddp" / "metrics.json").exists() and not (tmp_path / "ddp" / "rank1").exists()
