#!/usr/bin/env bash
# One device-machine session (issue 17): the GPU benchmark, the host-sync check of the real training step, and the
# trainer's CUDA path end to end (bf16 autocast, channels_last, teacher cache / teacher in the loop) on both
# pipelines. Everything it prints goes to $OUT/session.log; one line per stage to $OUT/summary.txt; the benchmark's
# JSON line to $OUT/gpu_bench.json and the sync checks' to $OUT/syncs.jsonl.
#
#   bash benchmarks/gpu_session.sh        # on a CUDA machine with the project importable
#
# On this workplace's device machine (no network, no MONAI / nibabel / smp): build the wheels here first,
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1 nibabel==5.4.2 segmentation_models_pytorch==0.6.0
#   pip wheel --no-deps --no-build-isolation -w .whl .
# and start the command with: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
W=${WORK:-/tmp/gpu_session_work}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/session.log"

stage() {  # stage NAME TIMEOUT_S command...: run, log, and record rc and seconds
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" >>"$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt" >>"$LOG"
    return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nproc; } >>"$LOG" 2>&1

[ "${ONLY:-}" = mms ] || {
stage gpu_bench 300 $PY benchmarks/gpu.py
grep '^{' "$LOG" | tail -1 >"$OUT/gpu_bench.json"

stage synth_waterbirds 120 $PY -m groupdistil synth waterbirds --out "$W/wb"
stage wb_teacher 180 $PY -m groupdistil --debug run configs/waterbirds_teacher.yaml --data-root "$W/wb" --out "$W/wb_teacher" \
    --max-steps 100 --set train.eval_every=50
stage wb_groupdistil 180 $PY -m groupdistil --debug run configs/waterbirds.yaml --method groupdistil --teacher "$W/wb_teacher" \
    --data-root "$W/wb" --out "$W/wb_gd" --max-steps 100 --set train.eval_every=50
stage wb_syncs 120 $PY benchmarks/gpu_trainer_syncs.py configs/waterbirds.yaml --method groupdistil \
    --teacher "$W/wb_teacher" --data-root "$W/wb" --out "$W/wb_sync"
grep '^{"config"' "$LOG" | tail -1 >>"$OUT/syncs.jsonl"
}

stage synth_mms 120 $PY -m groupdistil synth mms --out "$W/mms"
stage mms_teacher 240 $PY -m groupdistil --debug run configs/mms_teacher.yaml --data-root "$W/mms" --out "$W/mms_teacher" \
    --max-steps 100 --set train.eval_every=50
stage mms_groupdistil 240 $PY -m groupdistil --debug run configs/mms.yaml --method groupdistil --teacher "$W/mms_teacher" \
    --data-root "$W/mms" --out "$W/mms_gd" --max-steps 100 --set train.eval_every=50
stage mms_syncs 120 $PY benchmarks/gpu_trainer_syncs.py configs/mms.yaml --method groupdistil \
    --teacher "$W/mms_teacher" --data-root "$W/mms" --out "$W/mms_sync"
grep '^{"config"' "$LOG" | tail -1 >>"$OUT/syncs.jsonl"
stage mms_syncs_heldout 120 $PY benchmarks/gpu_trainer_syncs.py configs/mms.yaml --method groupdistil \
    --teacher "$W/mms_teacher" --data-root "$W/mms" --out "$W/mms_sync_heldout" --set method_args.signal=heldout \
    --set method_args.heldout_every=4
grep '^{"config"' "$LOG" | tail -1 >>"$OUT/syncs.jsonl"

for r in wb_teacher wb_gd mms_teacher mms_gd; do
    [ -f "$W/$r/metrics.json" ] && { echo "== $r"; cat "$W/$r/timing.json"; $PY - "$W/$r/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print({k: m["test"][k] for k in ("worst_group_metric", "average_metric")}, "selected", m["selected_step"])
EOF
    }
done >>"$OUT/runs.txt" 2>&1
exit 0
