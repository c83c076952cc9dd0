"""The command line as a user meets it: the run contract, resume after SIGKILL, reproducibility, and the bad-input
catalogue (non-zero exit, one line on stderr naming the file/row/key, no metrics.json or report)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from groupdistil.cli import main
from waterbirds_pipeline.pipeline import WaterbirdsPipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.arch=resnet18", "--set", "data.image_size=32", "--set", "train.batch_size=16",
        "--set", "train.eval_every=10", "--set", "eval.batch_size=64", "--max-steps", "20"]


@pytest.fixture(scope="module")
def wb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb_cli") / "data"
    WaterbirdsPipeline.synthesize(root, seed=0, scale=0.02, min_size=40, max_size=56)
    return root


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "groupdistil", *args]


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def wb_teacher(wb_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("wb_teacher") / "teacher"
    assert main(["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(wb_root), "--out", str(out),
                 *TINY]) == 0
    return out


def test_run_contract_and_eg_identity_via_cli(wb_root, wb_teacher, tmp_path):
    out = tmp_path / "gd"
    code = main(["run", str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--out", str(out),
                 "--teacher", str(wb_teacher), "--method", "groupdistil", "--seed", "3", *TINY])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        assert 0.0 <= m[split]["worst_group_acc"] <= 1.0
        assert set(m[split]["group_acc"]) == {"landbird_land", "landbird_water", "waterbird_land", "waterbird_water"}
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(len(r["group_weight"]) == 4 for r in rows)
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["seed"] == 3 and cfg["groups"][0] == "landbird_land" and cfg["method"] == "groupdistil"
    assert (out / "report.html").exists() and (out / "predictions.csv").exists()
    machine = json.loads((out / "timing.json").read_text())["machine"]
    assert machine["torch_threads"] >= 1 and machine["cpu_cores"] >= 1 and "indicative" in machine["note"]
    assert "Timings are indicative: measured with" in (out / "report.md").read_text()


def test_sigkill_mid_training_then_rerun_gives_the_uninterrupted_metrics(wb_root, wb_teacher, tmp_path):
    args = ["run", str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--teacher", str(wb_teacher),
            "--method", "groupdistil", *TINY, "--max-steps", "40", "--checkpoint-every", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count for every run: same float sums
    full = tmp_path / "full"
    assert subprocess.run(cli(*args, "--out", str(full)), capture_output=True, env=env).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(*args, "--out", str(killed)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a checkpoint exists and training has gone past it
        if (killed / "checkpoints" / "last.pt").exists() and log.exists() and len(log.read_text().splitlines()) >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    r = subprocess.run(cli(*args, "--out", str(killed)), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((full / "metrics.json").read_text())
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, 41))
    # a finished run is not retrained
    r = subprocess.run(cli(*args, "--out", str(killed)), capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "already finished" in r.stderr


def test_same_seed_gives_identical_metrics(wb_root, tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(wb_root), "--out",
                     str(tmp_path / name), *TINY, "--max-steps", "10"]) == 0
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()


def _bad(capsys, tmp_path, *args: str, match: str) -> None:
    out = tmp_path / f"bad_run_{len(list(tmp_path.iterdir()))}"
    code, err = run_main(capsys, "run", *args, "--out", str(out))
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and match in lines[-1], err
    assert "Traceback" not in err
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()


def test_bad_config_key_type_method_and_paths(wb_root, wb_teacher, tmp_path, capsys):
    cfg = str(ROOT / "configs/waterbirds.yaml")
    d = ["--data-root", str(wb_root)]
    _bad(capsys, tmp_path, cfg, *d, "--set", "train.lrr=0.1", match="unknown config key 'train.lrr'")
    _bad(capsys, tmp_path, cfg, *d, "--set", "train.max_steps=lots", match="'train.max_steps' must be of type int")
    _bad(capsys, tmp_path, cfg, *d, "--method", "dro", match="unknown method 'dro'; valid: erm, groupdistil")
    _bad(capsys, tmp_path, cfg, *d, "--method", "kd", match="--teacher")
    _bad(capsys, tmp_path, cfg, "--data-root", str(tmp_path / "nowhere"), match="data root does not exist")
    _bad(capsys, tmp_path, cfg, *d, "--teacher", str(tmp_path / "no_teacher"), match="not found")
    _bad(capsys, tmp_path, str(tmp_path / "missing.yaml"), *d, match="config file not found")


def test_teacher_of_wrong_architecture(wb_root, wb_teacher, tmp_path, capsys):
    import torch

    ck = torch.load(wb_teacher / "checkpoints" / "best.pt", weights_only=True)
    ck["config"]["model"]["arch"] = "resnet50"
    torch.save(ck, tmp_path / "wrong.pt")
    _bad(capsys, tmp_path, str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--teacher",
         str(tmp_path / "wrong.pt"), match="do not fit the architecture")
    (tmp_path / "trunc.pt").write_bytes((wb_teacher / "checkpoints" / "best.pt").read_bytes()[:1000])
    _bad(capsys, tmp_path, str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--teacher",
         str(tmp_path / "trunc.pt"), match="unreadable checkpoint")


def test_bad_metadata_via_cli(wb_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(wb_root, root)
    meta = root / "metadata.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0].replace(",place,", ",plaice,")] + lines[1:]) + "\n")
    _bad(capsys, tmp_path, str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(root),
         match="metadata.csv")


def test_debug_shows_traceback(wb_root, tmp_path):
    r = subprocess.run(cli("run", str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--out",
                           str(tmp_path / "x"), "--method", "dro", "--debug"), capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_debug_before_the_command_shows_traceback(wb_root, tmp_path):
    r = subprocess.run(cli("--debug", "run", str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root),
                           "--out", str(tmp_path / "x"), "--method", "dro"), capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_config_that_is_not_utf8(wb_root, tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("pipeline: waterbirds\n# Zürich\n".encode("latin-1"))
    _bad(capsys, tmp_path, str(cfg), "--data-root", str(wb_root), match=f"{cfg}: the config is not UTF-8 text: byte "
                                                                       f"0xfc at offset 24 (line 2) cannot be decoded")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoints_run_nothing_and_exit_2(wb_root, wb_teacher, tmp_path, capsys):
    """A crafted pickle, a torch.save'd payload, and a real best.pt with one extra payload entry: as --teacher, and
    in a run folder given to export. Nothing runs (the marker file never appears); each is exit 2 with one line."""
    import pickle
    import shutil

    import torch

    marker = tmp_path / "PWNED"
    plain, saved, extra = tmp_path / "plain.pt", tmp_path / "saved.pt", tmp_path / "extra.pt"
    plain.write_bytes(pickle.dumps(_Payload(marker)))
    torch.save({"model": _Payload(marker)}, saved)
    ck = torch.load(wb_teacher / "checkpoints" / "best.pt", weights_only=True)
    ck["extra"] = _Payload(marker)
    torch.save(ck, extra)
    for f in (plain, saved, extra):
        _bad(capsys, tmp_path, str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--method", "kd",
             "--teacher", str(f), match=f"{f}: refused: not a GroupDistil checkpoint")
        run_dir = tmp_path / f"run_{f.stem}"
        shutil.copytree(wb_teacher, run_dir)
        shutil.copy(f, run_dir / "checkpoints" / "best.pt")
        code, err = run_main(capsys, "export", str(run_dir))
        assert code == 2 and "refused" in err and "Traceback" not in err, err
    assert not marker.exists()


def test_synth_never_writes_into_a_folder_with_other_content(tmp_path, capsys):
    real = tmp_path / "waterbird_complete95_forest2water2"
    real.mkdir()
    (real / "metadata.csv").write_text("img_id,img_filename,y,split,place,place_filename\n")
    before = (real / "metadata.csv").read_bytes()
    for extra in ([], ["--force"]):
        code, err = run_main(capsys, "synth", "waterbirds", "--out", str(real), "--option", "scale=0.01", *extra)
        assert code == 2 and str(real) in err, err
        assert sorted(p.name for p in real.iterdir()) == ["metadata.csv"]
        assert (real / "metadata.csv").read_bytes() == before
    # a synthetic data set written earlier is replaced with --force, and only then
    out = tmp_path / "synth"
    opts = ["--option", "scale=0.01", "--option", "min_size=40", "--option", "max_size=48"]
    assert run_main(capsys, "synth", "waterbirds", "--out", str(out), *opts)[0] == 0
    code, err = run_main(capsys, "synth", "waterbirds", "--out", str(out), *opts, "--seed", "1")
    assert code == 2 and "not empty" in err
    (out / "stale.txt").write_text("x")
    assert run_main(capsys, "synth", "waterbirds", "--out", str(out), *opts, "--seed", "1", "--force")[0] == 0
    assert not (out / "stale.txt").exists() and json.loads((out / "SYNTHETIC_DATA.json").read_text())["complete"]
    code, err = run_main(capsys, "synth", "mms", "--out", str(real))
    assert code == 2 and "not empty" in err


def test_method_args_belong_to_the_selected_method(wb_root, wb_teacher, tmp_path, capsys):
    cfg = str(ROOT / "configs/waterbirds.yaml")
    d = ["--data-root", str(wb_root), "--teacher", str(wb_teacher)]
    _bad(capsys, tmp_path, cfg, *d, "--method", "kd", "--set", "method_args.eta=0.1",
         match="method_args.eta is not a hyperparameter of method 'kd'; valid: (none)")
    _bad(capsys, tmp_path, cfg, *d, "--method", "groupdistil", "--set", "method_args.etaa=0.1",
         match="method_args.etaa is not a hyperparameter of method 'groupdistil'; valid: adj_c, eta, heldout_every, "
               "heldout_fraction, normalize_loss, signal")
    _bad(capsys, tmp_path, cfg, *d, "--method", "groupdistil", "--set", "method_args.eta=-1",
         match="method_args.eta must be >= 0.0 (got -1)")


@pytest.mark.parametrize("args, match", [
    (["--set", "train.batch_size=0"], "train.batch_size = 0 is not allowed; it must be >= 1"),
    (["--set", "train.batch_size=100000"], "train.batch_size = 100000 is larger than the training set"),
    (["--set", "train.eval_every=0"], "train.eval_every = 0 is not allowed; it must be >= 1"),
    (["--set", "train.log_every=0"], "train.log_every = 0 is not allowed"),
    (["--checkpoint-every", "0"], "train.checkpoint_every = 0 is not allowed"),
    (["--max-steps", "0"], "train.max_steps = 0 is not allowed; it must be >= 1"),
    (["--seed", "99999999999999999999"], "seed = 99999999999999999999 is not allowed"),
    (["--seed", "-1"], "seed = -1 is not allowed"),
    (["--set", "train=5"], "config key 'train' must be a mapping, got 5"),
    (["--set", "train.lr=0"], "train.lr = 0 is not allowed; it must be > 0"),
    (["--set", "train.lr=.inf"], "train.lr = inf is not allowed"),
    (["--set", "train.optimizer=adam"], "train.optimizer = 'adam' is not allowed; it must be sgd or adamw"),
    (["--set", "loss.alpha=1.5"], "loss.alpha = 1.5 is not allowed; it must be in [0, 1]"),
    (["--set", "loss.tau=0"], "loss.tau = 0 is not allowed"),
])
def test_invalid_values_exit_2_before_anything_is_written(wb_root, tmp_path, capsys, args, match):
    out = tmp_path / "r"
    code, err = run_main(capsys, "run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(wb_root),
                         "--out", str(out), *args)
    assert code == 2 and err.startswith("error: ") and match in err, err
    assert not out.exists()


def test_scientific_notation_and_duplicate_keys(wb_root, tmp_path, capsys):
    out = tmp_path / "sci"
    assert main(["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(wb_root), "--out", str(out),
                 *TINY, "--max-steps", "2", "--set", "train.lr=1e-3", "--set", "train.weight_decay=5E-4"]) == 0
    import yaml

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 0.001 and cfg["train"]["weight_decay"] == 0.0005
    dup = tmp_path / "dup.yaml"
    dup.write_text("pipeline: waterbirds\ntrain:\n  lr: 0.1\n  lr: 0.2\n")
    code, err = run_main(capsys, "run", str(dup), "--data-root", str(wb_root), "--out", str(tmp_path / "d"))
    assert code == 2 and f"{dup}: key 'lr' appears twice in one mapping (lines 3 and 4)" in err, err
    assert not (tmp_path / "d").exists()


def test_rerun_with_a_changed_value_names_the_key(wb_root, tmp_path, capsys):
    out = tmp_path / "r"
    base = ["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(wb_root), "--out", str(out),
            *TINY, "--max-steps", "2"]
    assert main(base) == 0
    code, err = run_main(capsys, *base, "--set", "train.lr=0.5")
    assert code == 2 and "made with other settings (train.lr: 0.01 -> 0.5)" in err, err


def test_changed_image_content_is_detected(wb_root, tmp_path, capsys):
    """The data fingerprint reads file content: one image's bytes changed (same size) and a finished run is no
    longer 'already finished' but refused, naming the data."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(wb_root, root)
    out = tmp_path / "r"
    base = ["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(root), "--out", str(out),
            *TINY, "--max-steps", "2"]
    assert main(base) == 0
    img = sorted(root.rglob("*.jpg"))[0]
    raw = bytearray(img.read_bytes())
    raw[-3] ^= 0xFF  # inside the JPEG data, before the end marker: same size, other content
    img.write_bytes(bytes(raw))
    code, err = run_main(capsys, *base)
    assert code == 2 and "made with other settings (the data (content fingerprint):" in err, err


def test_a_finished_run_is_recognised_without_importing_torch(wb_root, tmp_path):
    """The rerun of a finished run checks the request (config, overrides, teacher and data files by stat) before
    importing torch or a pipeline; a touched data file sends it through the full check again."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(wb_root, root)
    out = tmp_path / "r"
    args = ["run", str(ROOT / "configs/waterbirds_teacher.yaml"), "--data-root", str(root), "--out", str(out),
            *TINY, "--max-steps", "2"]
    assert main(args) == 0 and (out / ".request.json").is_file()
    code = ("import sys; from groupdistil.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.stdout.split() == ["NO-TORCH", "0"] and "already finished" in r.stderr, (r.stdout, r.stderr)
    img = sorted(root.rglob("*.jpg"))[0]
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))  # same bytes, new time
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert r.stdout.split() == ["TORCH", "0"] and "already finished" in r.stderr, (r.stdout, r.stderr)


def test_a_torchscript_teacher_distils_a_student(wb_root, wb_teacher, tmp_path, capsys):
    """--teacher takes a TorchScript file with its export.json beside it (here: groupdistil export of a teacher)."""
    import shutil

    import yaml

    src = tmp_path / "t"
    shutil.copytree(wb_teacher, src)
    assert main(["export", str(src), "--format", "torchscript"]) == 0
    (scripted,) = [p for p in (src / "export").glob("*.pt")]
    out = tmp_path / "kd"
    assert main(["run", str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--out", str(out),
                 "--method", "kd", "--teacher", str(scripted), *TINY, "--max-steps", "2"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["teacher"].startswith("torchscript-")
    (src / "export" / "export.json").unlink()
    code, err = run_main(capsys, "run", str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--out",
                         str(tmp_path / "kd2"), "--method", "kd", "--teacher", str(scripted), *TINY)
    assert code == 2 and "a TorchScript teacher needs its input contract export.json beside it" in err


def test_gpu_trainer_sync_check_runs_its_steps_on_cpu(wb_root, wb_teacher, tmp_path):
    """``benchmarks/gpu_trainer_syncs.py`` (the GPU host-sync check of the real training step) cannot rot: its
    ``--cpu-dry-run`` builds the same Trainer and runs the same steps without the CUDA check."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_trainer_syncs.py"),
                        str(ROOT / "configs/waterbirds.yaml"), "--data-root", str(wb_root), "--out",
                        str(tmp_path / "run"), "--teacher", str(wb_teacher), "--method", "groupdistil", "--steps", "2",
                        "--cpu-dry-run", *[a for a in TINY[:-2] if a != "--max-steps"]],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["host_syncs"] is None and out["steps"] == 2 and out["seconds_per_step"] > 0
