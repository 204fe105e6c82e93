// wgmma's shared-memory matrix descriptor (warp.cuh), for the device and
// for the host emulation (emulation/warp_emulation.h) alike.
#pragma once

#include <cstdint>

namespace taylorshift::cuda_kernels::warp {

// Which of B's dimensions is contiguous in its core matrices' rows (warp.cuh):
// n (kMN, imm-trans-b = 1) or k (kK, imm-trans-b = 0).
enum class Major { kMN, kK };

// The descriptor of a no-swizzle B operand at byte offset `start` of shared
// memory (warp.cuh): LBO and SBO in bytes, multiples of 16.
__host__ __device__ constexpr uint64_t matrix_descriptor(uint32_t start,
                                                         uint32_t lbo,
                                                         uint32_t sbo) {
  return uint64_t(start >> 4 & 0x3fff) | uint64_t(lbo >> 4 & 0x3fff) << 16 |
         uint64_t(sbo >> 4 & 0x3fff) << 32;
}
}  // namespace taylorshift::cuda_kernels::warp
