#!/usr/bin/env bash
# The GPU checks as one call on a lent GPU machine (docs/benchmarks.md, "On a GPU"), in about
# eight minutes on an H200: the `cuda` tests, `python -m bench.gpu --http --independent 8`, and a
# short training run on the tensor data path. Every output goes to $OUT (default
# bench/results/gpu/): cuda_tests.txt, gpu.json, bench_gpu.txt, train.txt, train_metrics.jsonl.
# Each step is bounded in time and runs even if an earlier one failed; the exit status is the
# first failure's. Without a GPU the same steps run small (bench.gpu's smoke sizes, 20 steps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
step() {  # step NAME SECONDS COMMAND...: run, keep the first failure's status
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S) UTC)"
  timeout "$limit" "$@" || { rc=$?; echo "== $name failed: $rc"; [ "$status" -ne 0 ] || status=$rc; }
}
cuda=$($PY -c 'import torch; print(int(torch.cuda.is_available()))')
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'

# Only the files that hold `cuda` tests: the rest import test-only tools (schemathesis, kserve, …) that a
# GPU machine without a package index may lack, and one collection error stops the whole run.
step "cuda tests" 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda $(grep -l "mark.cuda" tests/test_*.py) \
  >"$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
if [ "$cuda" = 1 ]; then
  step "bench.gpu" 330 "$PY" -m bench.gpu --http --independent 8 --out "$OUT/gpu.json" >"$OUT/bench_gpu.txt" 2>&1
  train=(--device cuda --data-path tensor --batch-size 512 --epochs 2)
else
  step "bench.gpu" 330 "$PY" -m bench.gpu --smoke --out "$OUT/gpu.json" >"$OUT/bench_gpu.txt" 2>&1
  train=(--device cpu --epochs 1 --max-steps 20)
fi
tail -40 "$OUT/bench_gpu.txt"
run=$(mktemp -d)
step "training" 150 "$PY" -m training.cli --model resnet_fmnist --exits 1 2 3 4 5 6 7 8 --exit-style light \
  --method byot --hint none --augment standard --schedule cosine --no-progress --out-dir "$run" "${train[@]}" \
  >"$OUT/train.txt" 2>&1
tail -5 "$OUT/train.txt"
cp "$run"/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null || true
rm -rf "$run"
exit "$status"
