#!/usr/bin/env bash
# GPU checks of issues 6 and 17, for a machine with a CUDA device (run from anywhere):
#   1. the speed table on the GPU: 256/1024/4096 features, batch 1024, eager and with the
#      CUDA-graph and torch.compile variants -> $OUT/speed_cuda.{json,md}
#   2. the whole test suite with the GPU tests selected (-m "gpu or not gpu" also selects "slow").
#
#   OUT=/path/to/results PYTHON=python benchmarks/gpu_check.sh
#
# OUT defaults to docs/results. Peers (bayesian-torch, blitz, torchbnn) are used if importable
# and skipped with a note otherwise (pip install --no-deps -r requirements-bench.txt beforehand
# if the machine can reach a package index). To fold the GPU table into docs/results/speed.md,
# copy speed_cuda.json there and run: python benchmarks/speed.py --render-only
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-docs/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF' || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
EOF

"$PY" benchmarks/speed.py --device cuda --variants graph compile --out "$OUT" 2>&1 | tee "$OUT/speed_cuda.log"
bench=${PIPESTATUS[0]}

"$PY" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/ 2>&1 | tee "$OUT/pytest_gpu.log"
tests=${PIPESTATUS[0]}

echo "speed.py exit $bench, pytest exit $tests"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
