#!/usr/bin/env bash
# The whole test suite from a fresh machine: set up and build, then pytest
# (Python API, kernels through the ops, experiments), ctest (Catch2 tests of
# the C++ kernels and C++ autograd, built by CMake against LibTorch) and, on a
# machine without a GPU, the CUDA kernels under CPU emulation.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh

python -m pytest tests -q -p no:cacheprovider

torch_cmake=$(python -c "import torch; print(torch.utils.cmake_prefix_path)")
cmake_args=(-DCMAKE_PREFIX_PATH="$torch_cmake" -DCMAKE_BUILD_TYPE=Release)
if python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
  # A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit
  # and NVRTC, although this build compiles no CUDA. The pip wheels carry
  # NVRTC next to torch; a system toolkit may lack it.
  nvrtc=$(python -c "import glob, os, torch; print((glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', 'cu*', 'lib', 'libnvrtc.so*')) + [''])[0])")
  [ -n "${CUDA_HOME:-}" ] && cmake_args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME")
  [ -n "$nvrtc" ] && cmake_args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi
cmake -S . -B build-cmake "${cmake_args[@]}" >/dev/null
cmake --build build-cmake -j "$MAX_JOBS"
ctest --test-dir build-cmake --output-on-failure

# The CUDA kernels' logic on the CPU: csrc/cuda/emulation rewrites the .cu
# files as host C++ and registers them in place of the CPU kernels, so the
# forward, mask and gradient tests run the CUDA code paths. Without a GPU it
# is the only check of those paths; with one, tests/test_cuda.py runs them.
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  PYTHONPATH=csrc/cuda/emulation python -m pytest -p emulate -q -p no:cacheprovider \
    tests/test_forward.py tests/test_masks.py tests/test_gradients.py tests/test_cuda.py \
    tests/test_numerics_edge.py
  # Causal efficient on CUDA (csrc/cuda/causal.cu; test_cuda.py above runs its operators)
  # through the functional and CausalState: autograd, gradcheck, opcheck, torch.compile, NaN in
  # padded keys, the states, the errors, decoding steps against the ATen form (about 3 minutes).
  PYTHONPATH=csrc/cuda/emulation python -m pytest -p emulate -q -p no:cacheprovider \
    tests/test_causal.py tests/test_decoding.py -k "gradcheck_operator or \
    (opcheck and float32-key_padding_mask-transposed) or (compile and dynamic) or \
    (non_finite and nan-efficient) or states_are or test_errors or kernels_and_aten_form_agree \
    or step_operator_opcheck"
  # Hopper's wgmma kernels: the kernels as nvcc's sm_90a pass builds them (warp.cuh), under the
  # tests that reach their wgmma products: the efficient 16-bit kernels (causal too), the direct
  # forward from d = 64 on without an attn_mask (about 5 minutes).
  TS_EMULATION_WGMMA=1 PYTHONPATH=csrc/cuda/emulation python -m pytest -p emulate -q \
    -p no:cacheprovider tests/test_cuda.py -k "(efficient and (bfloat16 or float16) and not coefficients) or \
    (direct_operator and (64 or 128) and not attn_mask and not all) or (direct_causal and 128)"
  # Taylor orders: direct mode's any-order kernels, and CUDA's order 1 through the order-2
  # efficient kernels (small shapes: about a minute).
  PYTHONPATH=csrc/cuda/emulation python -m pytest -p emulate -q -p no:cacheprovider \
    tests/test_order.py -k "direct or efficient_small"
fi
