"""Run folders: one writer at a time, --force starts truly over, resume cuts logs back, nothing blocks a rerun, and
checkpoints are read without running anything from them."""
import copy
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_pipeline import ToyPipeline, train_toy

from groupdistil.checkpoint import load_checkpoint, rng_state, set_rng_state
from groupdistil.config import deep_merge
from groupdistil.errors import UserError
from groupdistil.rundir import LOCK_NAME, FolderLock, read_jsonl
from groupdistil.trainer import Trainer


def run(cfg, out, **kw):
    return train_toy(cfg, out, **kw).result


def steps(path):
    return [r["step"] for r in read_jsonl(path)]


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


# --- one writer per run folder -----------------------------------------------------------------------------------
def test_second_writer_is_refused_naming_folder_and_pid(toy_cfg, tmp_path):
    out = tmp_path / "r"
    with FolderLock(out, "run"):
        with pytest.raises(UserError, match=rf"{out}: this run folder is in use by another groupdistil process "
                                            rf"\(PID {os.getpid()}\)"):
            run(toy_cfg, out)
    assert not (out / "config.yaml").exists()
    run(toy_cfg, out)  # released: the run goes ahead
    assert steps(out / "train_log.jsonl") == list(range(1, 13))


def test_lock_of_a_killed_process_does_not_block(toy_cfg, tmp_path):
    out = tmp_path / "r"
    code = (f"import fcntl, os, sys; f = open(r'{out / LOCK_NAME}', 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            f"f.write(str(os.getpid())); f.flush(); os.kill(os.getpid(), 9)")
    out.mkdir()
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert (out / LOCK_NAME).read_text().strip().isdigit()  # the stale lock file is still there
    run(toy_cfg, out)
    assert (out / "metrics.json").exists()


def test_two_concurrent_runs_one_fails_and_the_log_stays_clean(toy_cfg, tmp_path):
    """Two processes on one folder: exactly one trains; its log has every step once."""
    out = tmp_path / "r"
    cfg = deep_merge(toy_cfg, {"train": {"max_steps": 300, "eval_every": 300, "checkpoint_every": 300}})
    script = tmp_path / "go.py"
    script.write_text(
        "import sys, json\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from toy_pipeline import ToyPipeline\n"
        "from groupdistil.errors import UserError\n"
        "from groupdistil.trainer import Trainer\n"
        f"cfg = json.loads({json.dumps(json.dumps(cfg))})\n"
        "try:\n"
        f"    Trainer(cfg, ToyPipeline, {str(out)!r}, {str(out)!r}).run()\n"
        "except UserError as e:\n"
        "    print('error:', e, file=sys.stderr); sys.exit(2)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    results = [(p.returncode, e) for p, e in zip(procs, errs)]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2)
    assert "in use by another groupdistil process (PID" in err and str(out) in err
    assert steps(out / "train_log.jsonl") == list(range(1, 301))


# --- --force, restarts and resumes -------------------------------------------------------------------------------
def test_every_file_a_run_writes_is_declared(toy_cfg, tmp_path):
    out = tmp_path / "r"
    run(toy_cfg, out)
    t = Trainer(copy.deepcopy(toy_cfg), ToyPipeline, out, out)
    patterns = t.outputs()
    undeclared = [n for n in entries(out) if n != LOCK_NAME and not any((out / n).match(p) for p in patterns)]
    assert not undeclared, f"written but not in ENGINE_OUTPUTS or the pipeline's run_outputs: {undeclared}"


def test_force_starts_truly_over_and_keeps_what_is_not_the_runs(toy_cfg, tmp_path):
    out = tmp_path / "r"
    run(toy_cfg, out)
    (out / "export").mkdir()
    (out / "export" / "student.pt").write_bytes(b"old model")
    (out / "toy_stale.json").write_text("{}")  # a pipeline output an earlier version wrote
    (out / "notes.txt").write_text("mine")
    fresh = tmp_path / "fresh"
    other = deep_merge(toy_cfg, {"train": {"lr": 0.01}})
    run(other, fresh)
    run(other, out, force=True)
    assert entries(out) == sorted(entries(fresh) + ["notes.txt"])
    assert (out / "notes.txt").read_text() == "mine"
    assert steps(out / "train_log.jsonl") == list(range(1, 13))
    assert (out / "train_log.jsonl").read_text() == (fresh / "train_log.jsonl").read_text()


def test_folder_that_is_not_a_run_is_refused(toy_cfg, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match=r"not empty and not a run folder \(no config.yaml; holds thesis.tex\)"):
        run(toy_cfg, out)
    assert entries(out) == sorted(["thesis.tex", LOCK_NAME])


def test_kill_before_first_checkpoint_starts_over_with_clean_logs(toy_cfg, tmp_path):
    """What a kill before the first checkpoint leaves: config.yaml, logs of a few steps, no last.pt."""
    out, ref = tmp_path / "r", tmp_path / "ref"
    run(toy_cfg, ref)
    out.mkdir()
    (out / "config.yaml").write_bytes((ref / "config.yaml").read_bytes())
    (out / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    (out / "eval_log.jsonl").write_text(json.dumps({"step": 2, "worst_group_metric": 0.1}) + "\n")
    run(toy_cfg, out)
    assert (out / "train_log.jsonl").read_text() == (ref / "train_log.jsonl").read_text()
    assert (out / "eval_log.jsonl").read_text() == (ref / "eval_log.jsonl").read_text()


def test_resume_drops_a_torn_line_and_orphan_temporaries(toy_cfg, tmp_path):
    out, ref = tmp_path / "r", tmp_path / "ref"
    run(toy_cfg, ref)
    run(toy_cfg, out)
    # a kill in the middle of writing a log line and of writing a checkpoint, after the last checkpoint
    (out / "metrics.json").unlink()
    with open(out / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 13, "loss": 0.9')
    orphan = out / "checkpoints" / ".last.pt.k2j3h.gdtmp.pt"
    orphan.write_bytes(b"half a checkpoint")
    run(toy_cfg, out)
    assert not orphan.exists()
    assert (out / "train_log.jsonl").read_text() == (ref / "train_log.jsonl").read_text()
    assert json.loads((out / "metrics.json").read_text())["test"] == json.loads((ref / "metrics.json").read_text())[
        "test"]


def test_failed_setup_leaves_nothing_that_blocks_the_corrected_rerun(toy_cfg, tmp_path):
    out = tmp_path / "r"
    bad = deep_merge(toy_cfg, {"loss": {"heads": {"seg": 1.0, "depth": 1.0}}})
    with pytest.raises(UserError, match="loss.heads names"):
        run(bad, out)
    assert not out.exists()
    run(toy_cfg, out)
    assert (out / "metrics.json").exists()


def test_teacher_with_other_classes_is_refused_before_anything_is_written(toy_cfg, tmp_path):
    run(deep_merge(toy_cfg, {"model": {"n_cls": 3}}), tmp_path / "t3")
    out = tmp_path / "kd"
    with pytest.raises(UserError, match=r"the teacher's heads \{'seg': 3, 'cls': 3\} do not match this run's "
                                        r"\{'seg': 3, 'cls': 2\} \(head 'cls': 3 vs 2 classes"):
        run(deep_merge(toy_cfg, {"method": "kd"}), out, teacher_path=str(tmp_path / "t3"))
    assert not out.exists()


# --- checkpoints are data, never code ----------------------------------------------------------------------------
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_files(tmp_path, real_best):
    marker = tmp_path / "PWNED"
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(Payload(marker)))
    saved = tmp_path / "saved.pt"
    torch.save({"format": "x", "payload": Payload(marker)}, saved)
    extra = tmp_path / "extra.pt"
    ck = torch.load(real_best, weights_only=True)
    ck["extra"] = Payload(marker)
    torch.save(ck, extra)
    return marker, [plain, saved, extra]


def test_malicious_checkpoints_run_nothing(toy_cfg, tmp_path):
    run(toy_cfg, tmp_path / "t")
    marker, files = malicious_files(tmp_path, tmp_path / "t" / "checkpoints" / "best.pt")
    for f in files:
        with pytest.raises(UserError, match=rf"{f}: refused: not a GroupDistil checkpoint"):
            load_checkpoint(f)
        with pytest.raises(UserError, match="refused"):
            run(deep_merge(toy_cfg, {"method": "kd"}), tmp_path / f"kd_{f.stem}", teacher_path=str(f))
    assert not marker.exists()


def test_resume_from_a_tampered_last_checkpoint_is_refused(toy_cfg, tmp_path):
    out = tmp_path / "r"
    run(toy_cfg, out)
    marker, (_, _, extra) = malicious_files(tmp_path, out / "checkpoints" / "last.pt")
    os.replace(extra, out / "checkpoints" / "last.pt")
    (out / "metrics.json").unlink()
    with pytest.raises(UserError, match="last.pt: refused"):
        run(toy_cfg, out)
    assert not marker.exists()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    want = (torch.rand(3), np.random.standard_normal(3), random.random())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]
