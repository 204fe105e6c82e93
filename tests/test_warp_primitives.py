"""The host emulation of the warp-level primitives (csrc/cuda/warp.cuh) against an independent
definition of their per-lane layouts: CuTe's MMA_Traits and Copy_Traits from the nvidia-cutlass
headers (mma.sync m16n8k16 A/B/C fragments for bf16 and fp16; ldmatrix x1/x2/x4 with and without
.trans), plus the emulated mma against a float64 product, cp.async's deferred landing, and the paired
16-bit multiply (mul2) against the toolkit's host __hmul2_rn, and the byte-sign spread (byte_signs,
prmt) against the PTX ISA's definition. For sm_90a's wgmma: CuTe's GMMA traits for its A and D
fragments (A from registers), CuTe's make_gmma_desc for the shared-memory descriptor of a
no-swizzle B operand (and every element's address decoded from it against CuTe's layout), and the
emulated product (deferred to its wait) against a float64 product.

csrc/cuda/emulation/warp_check.cpp does the comparisons on the host and prints one line per check;
every CUDA kernel test under `-p emulate` relies on these layouts being the hardware's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

EMULATION = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "emulation"
CHECKS = {
    "layout_SM80_16x8x16_F32BF16BF16F32_TN": 512,
    "layout_SM80_16x8x16_F32F16F16F32_TN": 512,
    "ldmatrix_SM75_U32x1_LDSM_N": 64,
    "ldmatrix_SM75_U32x2_LDSM_N": 128,
    "ldmatrix_SM75_U32x4_LDSM_N": 256,
    "ldmatrix_SM75_U16x2_LDSM_T": 64,
    "ldmatrix_SM75_U16x4_LDSM_T": 128,
    "ldmatrix_SM75_U16x8_LDSM_T": 256,
    "mma_16816_bf16": 128,
    "mma_16816_f16": 128,
    "cp_async": 32,
    "mul2_bf16": 65536,
    "mul2_f16": 65536,
    "byte_signs": 6 * (32 + 4096),
    # wgmma (sm_90a): register fragments, the shared-memory descriptor, the product.
    "layout_SM90_64x16x16_F32BF16BF16_RS": 128 * (8 + 8),
    "layout_SM90_64x32x16_F32F16F16_RS": 128 * (8 + 16),
    "layout_SM90_64x64x16_F32BF16BF16_RS": 128 * (8 + 32),
    "descriptor_MN_INTER_atom_64x16": 1 + 64 * 16,
    "descriptor_K_INTER_atom_64x16": 1 + 64 * 16,
    "descriptor_gradient_tile_64": 1 + 64 * 16,
    "descriptor_value_tile_16": 1 + 16 * 16,
    "descriptor_value_tile_64": 1 + 64 * 16,
    "wgmma_64x16x16_bf16": 1 + 64 * 16,
    "wgmma_64x32x16_f16": 1 + 64 * 32,
    "wgmma_64x64x16_bf16": 1 + 64 * 64,
    "wgmma_64x72x16_bf16": 1 + 64 * 72,
    "wgmma_64x64x16_f16_kmajor": 1 + 64 * 64,
    "wgmma_64x136x16_bf16_kmajor": 1 + 64 * 136,
}


@pytest.fixture(scope="module")
def check_output(tmp_path_factory) -> dict[str, tuple[int, int]]:
    import cutlass_library  # the nvidia-cutlass wheel (requirements-dev.txt)

    cute_include = Path(cutlass_library.__file__).parent / "source" / "include"
    cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    binary = tmp_path_factory.mktemp("warp") / "warp_check"
    subprocess.run(
        [
            os.environ.get("CXX", "g++"),
            "-std=c++20",
            "-O1",
            "-w",
            "-pthread",
            f"-I{cute_include}",
            f"-I{cuda_include}",
            f"-I{cuda_include / 'cccl'}",  # cuda/std, which CuTe includes
            str(EMULATION / "warp_check.cpp"),
            "-o",
            str(binary),
        ],
        check=True,
    )
    # A nonzero status means mismatches, which the lines name; the test reports them.
    result = subprocess.run([str(binary)], check=False, capture_output=True, text=True)
    checks = {}
    # Other lines are CuTe's: on the host it cannot convert shared pointers, says so, and
    # takes 0 as the descriptor's start address.
    for line in result.stdout.splitlines():
        if not line.startswith("check "):
            continue
        _, name, cases, mismatches = line.split()
        checks[name] = (int(cases), int(mismatches))
    return checks


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_emulated_primitive_matches_cute(check_output, name):
    cases, mismatches = check_output[name]
    assert cases == CHECKS[name]
    assert mismatches == 0, f"{name}: {mismatches} of {cases} lane elements differ from CuTe"
