#!/usr/bin/env bash
# One-command GPU check, for a fresh GPU machine that has torch and nvcc but no
# internet: builds the extension for this GPU only, runs the test suite (CUDA
# tests first), runs the benchmark sweep, and leaves everything under
# benchmarks/results/ (build and test logs, the benchmark CSV and markdown
# table with GPU name, torch and CUDA versions and date). Sized for about
# 8 minutes on an H200: the benchmark gets whatever the build and the tests
# left of TOTAL_S (default 450 s), at least 60 s.
#
#   bash benchmarks/gpu_check.sh            # OUT=dir also copies the results there
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
total_s=${TOTAL_S:-450}
python=${PYTHON:-python3}
results=benchmarks/results
mkdir -p "$results"
elapsed() { echo $(($(date +%s) - start)); }
finish() {
  [ -n "${OUT:-}" ] && cp -r "$results"/. "$OUT"/ 2>/dev/null
  echo "gpu_check: $1 after $(elapsed) s"
  exit "$2"
}

# Build for exactly this GPU: one architecture compiles in a fraction of the
# time of the default list, and runs natively (no PTX JIT at start).
arch=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") ||
  finish "no CUDA GPU visible to torch" 1
# Hopper's wgmma kernels need the architecture-specific target.
[ "$arch" = "9.0" ] && arch=9.0a
export TORCH_CUDA_ARCH_LIST="$arch" TAYLORSHIFT_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "gpu_check: building for sm_${arch/./} with $(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")"
if ! $python setup.py build_ext --inplace >"$results/gpu_build.log" 2>&1; then
  tail -n 40 "$results/gpu_build.log"
  finish "build failed (log: $results/gpu_build.log)" 1
fi
$python - <<'EOF' || finish "the built extension has no CUDA kernels" 1
import torch, taylorshift
q = torch.randn(1, 1, 8, 16, device="cuda")
out, den = torch.ops.taylorshift.direct_forward(q, q, q, None, None, False, True, [0.5, 1.0, 1.0])
torch.cuda.synchronize()
print("gpu_check: extension loaded,", torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda)
EOF
echo "gpu_check: built in $(elapsed) s"

# Tests: the CUDA-only file first (fail fast on a kernel bug), then the suite,
# whose device-parametrised tests run on CUDA too.
tests_ok=1
PYTHONUNBUFFERED=1 timeout 240 $python -m pytest tests/test_cuda.py tests -x -q -p no:cacheprovider \
  2>&1 | tee "$results/gpu_tests.log" | tail -n 30
[ "${PIPESTATUS[0]}" = 0 ] || tests_ok=0
echo "gpu_check: tests done in $(elapsed) s (ok=$tests_ok)"

budget=$((total_s - $(elapsed)))
[ "$budget" -lt 60 ] && budget=60
PYTHONUNBUFFERED=1 $python benchmarks/bench_gpu.py --out "$results" --budget-s "$budget" \
  2>&1 | tee "$results/gpu_bench.log" | tail -n 60
bench_rc=${PIPESTATUS[0]}
[ "$tests_ok" = 1 ] && [ "$bench_rc" = 0 ] && finish "all done" 0
finish "tests ok=$tests_ok, benchmark exit $bench_rc" 1
