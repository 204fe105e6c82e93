#!/usr/bin/env bash
# Sets up a fresh Debian machine (Python 3.11, pip) for taylorshift and builds it:
# system packages, torch, the Python dependencies, and the extension itself,
# compiled against the installed torch. Sourced by scripts/test.sh and
# scripts/main_job.sh; safe to run again (each step is a no-op when done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Catch2 (version 2 on Debian 12, 3 on Debian 13) and CMake for the C++ tests.
if ! dpkg -s catch2 cmake >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root apt-get install -y -qq catch2 cmake >/dev/null
fi

# torch: the version pinned here lies on disk for Python 3.11 (a CUDA 13 build);
# elsewhere pip downloads it. Never let a build pull a second torch: the
# extension is built with --no-build-isolation against this one.
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -r requirements-dev.txt
# Client libraries whose models tests/test_clients.py runs TaylorShift inside (random init, no
# downloads). torchvision must be the build for the installed torch (its minor version is
# torch's plus 15), and the constraint keeps pip from replacing torch while it resolves the
# rest (open_clip_torch asks for any torchvision, whose newest wants a newer torch).
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
torchvision_spec=$(python -c "v = '$torch_version'.split('.'); print(f'torchvision==0.{int(v[1]) + 15}.*')")
client_constraints=$(mktemp)
echo "torch==$torch_version" >"$client_constraints"
python -m pip install -q -c "$client_constraints" "$torchvision_spec" open_clip_torch torch_geometric
rm -f "$client_constraints"
python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version')"
if [ -f experiments/requirements.txt ]; then
  python -m pip install -q -r experiments/requirements.txt
fi

# nvcc: torch guesses the CUDA home from the nvcc on PATH, which may be a
# wrapper script outside the toolkit; point it at the toolkit itself.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-2}"
# Editable, so that the compiled taylorshift/_C lies next to the sources and
# `import taylorshift` finds it from the checkout as well.
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import taylorshift, sys; sys.exit(0 if taylorshift.extension_available else 1)"
