#!/usr/bin/env bash
# rankkit's open GPU measurements as one short command for a machine with a CUDA GPU.
#
#   1. the small-transformer sweep (topics, q,v and all-linear, ranks 1-32, 3 seeds)
#      trained on the GPU, batched as `python -m rankkit sweep` does by default, timed;
#   2. benchmarks/bench_batched.py on the same runs: batched vs one run at a time,
#      10 epochs, with achieved TFLOP/s against the device's peak.
#
# Run from the repository root; needs torch with CUDA plus rankkit's dependencies
# (numpy, scipy, pandas, scikit-learn, matplotlib, safetensors, tqdm), no install:
#
#     bash benchmarks/gpu_session.sh                       # writes runs/gpu/
#     OUT=/some/dir bash benchmarks/gpu_session.sh
#
# Expected: under 10 minutes on an H200 (each step has its own timeout). A dry run of
# the plumbing on a CPU: DEVICE=cpu RANKS=1,2 SEEDS=0 EPOCHS=1 bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
RANKS=${RANKS:-1,2,4,8,16,32}
SEEDS=${SEEDS:-0,1,2}
EPOCHS=${EPOCHS:-}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
work=$(mktemp -d)

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import platform, torch; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

echo "== 1. topics sweep on $DEVICE" | tee "$OUT/sweep.txt"
start=$(date +%s)
timeout 330 "$PY" -m rankkit sweep --task topics --targets q,v all-linear --ranks "$RANKS" \
  --seeds "$SEEDS" ${EPOCHS:+--epochs "$EPOCHS"} --device "$DEVICE" --out "$work/sweep" --quiet \
  2>&1 | tee -a "$OUT/sweep.txt"
echo "sweep wall time: $(( $(date +%s) - start )) s (exit ${PIPESTATUS[0]})" | tee -a "$OUT/sweep.txt"
cp "$work/sweep/results.csv" "$OUT/sweep_results.csv" 2>/dev/null
cp "$work/sweep/rank_vs_quality.png" "$OUT/sweep_rank_vs_quality.png" 2>/dev/null

echo "== 2. batched vs sequential on $DEVICE" | tee "$OUT/bench_batched.txt"
timeout 240 "$PY" benchmarks/bench_batched.py --workload topics --device "$DEVICE" \
  --epochs "${EPOCHS:-10}" --ranks "$RANKS" --seeds "$SEEDS" --contenders batched,rankkit \
  2>&1 | tee -a "$OUT/bench_batched.txt"
echo "bench exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench_batched.txt"
rm -rf "$work"
