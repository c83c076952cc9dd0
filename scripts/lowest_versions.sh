#!/usr/bin/env bash
# Test GroupDistil at the lowest versions its dependency ranges (pyproject.toml) allow.
#
#   scripts/lowest_versions.sh [pytest args...]     (default: a representative subset, see TESTS below)
#   WITH_ONNX=1 scripts/lowest_versions.sh tests/test_export.py     (the [onnx] extra at its floors too)
#
# Creates a venv (default /tmp/gd-lowest, reused when there; VENV=... to change), installs every dependency at its
# floor, installs this project with --no-deps (so pip cannot silently upgrade a floor), prints the versions installed
# and runs the tests on one CPU core. Exit status: pytest's.
#
# Exceptions to "the floor", because the floor cannot be installed on this kind of machine:
#   * torch / torchvision: the floor pair (torch 2.4 / torchvision 0.19) exists on PyPI only as CUDA builds that pull
#     several GB of nvidia-* wheels of other CUDA releases, and the CPU index (download.pytorch.org) is not
#     reachable here. The lowest pair that installs and works here is torch 2.13.0 / torchvision 0.28.0, both the
#     PyPI (CUDA 13) builds: most of their nvidia-* wheels lie on this machine's disk (about 1.2 GB is downloaded).
#     The local CPU wheel torch 2.13.0+cpu is excluded on purpose: PyPI's torchvision 0.28.0 is built against the
#     CUDA torch and fails to import with it ("operator torchvision::nms does not exist").
#     Override with TORCH=..., TORCHVISION=... where the floor pair is installable (TORCH=2.4.0 TORCHVISION=0.19.0).
#   * pillow: 9.0/9.1 have no wheels for Python 3.11 (this script's interpreter); 9.2.0 is the lowest with one.
#     On Python 3.10 the declared floor 9.0 applies.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-/tmp/gd-lowest}"
PYTHON="${PYTHON:-python3.11}"
TORCH="${TORCH:-2.13.0}"
TORCHVISION="${TORCHVISION:-0.28.0}"
PILLOW="${PILLOW:-9.2.0}"
# WITH_ONNX=1 adds the [onnx] extra's floors (onnx 1.15.0, onnxruntime 1.17.0); onnxruntime 1.17.0 needs
# numpy>=1.24.2, so that run uses numpy 1.24.2 instead of the floor 1.24.0.
WITH_ONNX="${WITH_ONNX:-0}"
if [[ "$WITH_ONNX" == 1 ]]; then NUMPY="${NUMPY:-1.24.2}"; else NUMPY="${NUMPY:-1.24.0}"; fi

# Floors of pyproject.toml's [project] dependencies and the [test] extra (keep in step with pyproject.toml).
TORCH_SPEC="torch==${TORCH}"
[[ "$TORCH" == *+* ]] || TORCH_SPEC+=",!=${TORCH}+cpu"  # the CUDA build that PyPI's torchvision is built against
FLOORS=(
    "$TORCH_SPEC"
    "torchvision==${TORCHVISION}"
    "monai==1.4.0"
    "segmentation-models-pytorch==0.5.0"
    "nibabel==5.0.0"
    "timm==0.9.0"
    "huggingface_hub==0.25.0"
    "safetensors==0.4.0"
    "numpy==${NUMPY}"
    "scipy==1.10.0"
    "pyyaml==6.0"
    "tqdm==4.60.0"
    "matplotlib==3.7.0"
    "pillow==${PILLOW}"
    "pytest==7.4.0"
    "SimpleITK==2.3.0"
)

[[ "$WITH_ONNX" == 1 ]] && FLOORS+=("onnx==1.15.0" "onnxruntime==1.17.0")

TESTS=(
    tests/engine
    tests/mms/test_metrics.py
    tests/mms/test_geometry.py
    tests/waterbirds/test_waterbirds_metrics.py
    tests/waterbirds/test_waterbirds_models.py
    tests/test_init_from.py
    tests/test_export.py
)

# one core: BLAS/OpenMP pools of one thread, pinned to CPU 0 where taskset exists
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
PIN=()
command -v taskset >/dev/null && PIN=(taskset -c 0)

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# --prefer-binary: wheels where the pinned release has one (efficientnet-pytorch and pretrainedmodels, pulled in by
# segmentation-models-pytorch, are source-only)
pip install --quiet --prefer-binary "${FLOORS[@]}"
[[ "$WITH_ONNX" == 1 ]] || pip uninstall --quiet --yes onnx onnxruntime 2>/dev/null || true  # from a WITH_ONNX run
pip install --quiet --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
    || pip install --quiet --no-deps -e "$ROOT"
pip check || echo "(pip check reports the conflicts above; the run continues)"

echo "== versions installed"
python - <<'PY'
import importlib.metadata as md
for name in ["torch", "torchvision", "monai", "segmentation-models-pytorch", "nibabel", "timm", "numpy", "scipy",
             "huggingface_hub", "safetensors", "PyYAML", "tqdm", "matplotlib", "pillow", "pytest", "SimpleITK",
             "onnx", "onnxruntime"]:
    try:
        print(f"  {name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: not installed")
PY

echo "== pytest"
cd "$ROOT"
if [[ $# -gt 0 ]]; then
    exec "${PIN[@]}" python -m pytest -q -p no:cacheprovider "$@"
fi
exec "${PIN[@]}" python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
