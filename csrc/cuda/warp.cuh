// Warp-level primitives of the tensor-core kernels: ldmatrix, mma.sync
// m16n8k16 with float accumulators, 16-byte cp.async with commit/wait, the
// paired 16-bit multiplies (mul2, mul2_half) that build feature fragments in
// registers, and byte_signs (prmt) that turns mask bits into byte masks.
//
// Register fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), per lane
// with g = lane / 4 and q = lane % 4, each 32-bit register holding two 16-bit
// elements (the lower-indexed one in the low half):
//   A, 16 x 16 (row-major m x k), 4 registers, element i in 0..7:
//       row g + 8 ((i / 2) % 2),  col 2 q + i % 2 + 8 (i / 4)
//   B, 16 x 8 (k x n), 2 registers, element i in 0..3:
//       row 2 q + i % 2 + 8 (i / 2),  col g
//   C/D, 16 x 8 floats, 4 registers, element i in 0..3:
//       row g + 8 (i / 2),  col 2 q + i % 2
// ldmatrix .x1/.x2/.x4 loads 1, 2 or 4 8x8 matrices of 16-bit elements;
// lanes 8 m .. 8 m + 7 give the addresses of the rows of matrix m (16-byte
// aligned shared memory) and register m of every lane receives, of matrix m,
//   row g, cols 2 q and 2 q + 1        (no .trans)
//   rows 2 q and 2 q + 1, col g        (.trans)
// so an x4 load whose lanes point at rows (lane % 16) and column half
// (lane / 16) of a row-major 16x16 tile yields the A fragment, and the same
// load with .trans of a row-major k x n tile yields two B fragments.
//
// wgmma (sm_90a, PTX ISA "Asynchronous Warpgroup Level Matrix Multiply"):
// the 4 warps of a warpgroup (128 threads) issue one m64nNk16 product
// together, A from registers and B from shared memory through a matrix
// descriptor. Warp w holds rows 16 w .. 16 w + 15 of A and D, in exactly the
// A and C fragments above (D's n8 tiles in order), so a warp's mma.sync code
// keeps its fragments. B (k x n) lies in 8x8 core matrices of 128 contiguous
// bytes, no swizzle, element (k, n) at
//   n contiguous (MN-major):  start + (k / 8) LBO + (n / 8) SBO
//                                   + 16 (k % 8) + 2 (n % 8)  bytes,
//   k contiguous (K-major):   start + (k / 8) LBO + (n / 8) SBO
//                                   + 16 (n % 8) + 2 (k % 8)  bytes,
// the descriptor holding start, LBO and SBO in 16-byte units
// (bits 0-13, 16-29, 32-45; layout type 0 in bits 62-63).
// The product runs asynchronously: D and the registers of A belong to it
// from its issue to the wgmma_wait that covers its commit group, and B's
// shared memory must not change in that time; wgmma_fence orders the
// registers written before it (A, D) for the products issued after it.
// kWgmma says whether this compilation has them: the sm_90a pass of nvcc,
// and the emulation built with TAYLORSHIFT_EMULATE_WGMMA.
//
// On the host (csrc/cuda/emulation, which defines TAYLORSHIFT_EMULATION) the
// same functions are collectives over the 32 emulated lanes of a warp that
// move exactly these elements: emulation/warp_emulation.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "matrix_descriptor.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(TAYLORSHIFT_EMULATE_WGMMA)
#define TAYLORSHIFT_WGMMA 1
#endif

namespace taylorshift::cuda_kernels::warp {
#ifdef TAYLORSHIFT_WGMMA
inline constexpr bool kWgmma = true;
#else
inline constexpr bool kWgmma = false;
#endif
}  // namespace taylorshift::cuda_kernels::warp

#ifndef TAYLORSHIFT_EMULATION
namespace taylorshift::cuda_kernels::warp {

// Two floats as one register of 16-bit operands, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    bits = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    bits = *reinterpret_cast<const uint32_t*>(&v);
  }
  return bits;
}

// The elementwise product of two registers of 16-bit operands, each half
// rounded once (the product of two bf16 or two fp16 values is exact in float,
// so this equals rounding the float product): the outer-product feature
// fragments of the efficient kernels.
template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t x, uint32_t y) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v =
        __hmul2_rn(*reinterpret_cast<const __nv_bfloat162*>(&x),
                   *reinterpret_cast<const __nv_bfloat162*>(&y));
    bits = *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __hmul2_rn(*reinterpret_cast<const __half2*>(&x),
                                 *reinterpret_cast<const __half2*>(&y));
    bits = *reinterpret_cast<const uint32_t*>(&v);
  }
  return bits;
}

// x times one 16-bit half of y (the high one if `high`) in both halves, each
// rounded once as in mul2: HMUL2 with a .H0_H0 / .H1_H1 operand, so the
// scalar factor of an outer-product fragment needs no splat instruction and
// one 32-bit load of a pair of values gives two scalars.
template <typename T>
__device__ __forceinline__ uint32_t mul2_half(uint32_t x, uint32_t y,
                                              bool high) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(&y);
    const __nv_bfloat162 r =
        __hmul2_rn(*reinterpret_cast<const __nv_bfloat162*>(&x),
                   high ? __high2bfloat162(v) : __low2bfloat162(v));
    bits = *reinterpret_cast<const uint32_t*>(&r);
  } else {
    const __half2 v = *reinterpret_cast<const __half2*>(&y);
    const __half2 r = __hmul2_rn(*reinterpret_cast<const __half2*>(&x),
                                 high ? __high2half2(v) : __low2half2(v));
    bits = *reinterpret_cast<const uint32_t*>(&r);
  }
  return bits;
}

// Byte k of the result is 0xff if the sign bit (bit 7) of byte
// (kBytes >> 4 k) & 3 of x is set, else 0 (prmt.b32 with every selector
// nibble's sign-replicate bit set): one instruction that spreads chosen bits
// of a mask word over whole bytes, e.g. the 16-bit halves of a packed pair.
template <uint32_t kBytes>
__device__ __forceinline__ uint32_t byte_signs(uint32_t x) {
  static_assert((kBytes & 0xcccc) == 0, "byte indices 0..3");
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(r) : "r"(x), "n"(kBytes | 0x8888));
  return r;
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// kCount 8x8 matrices; `row` is this lane's row address (see above).
template <int kCount, bool kTrans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kCount],
                                         const void* row) {
  const uint32_t a = shared_address(row);
  if constexpr (kCount == 1 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(a));
  } else if constexpr (kCount == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(a));
  } else if constexpr (kCount == 2 && !kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
  } else if constexpr (kCount == 2) {
    asm volatile(
        "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
        : "=r"(r[0]), "=r"(r[1])
        : "r"(a));
  } else if constexpr (!kTrans) {
    static_assert(kCount == 4);
    asm volatile(
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
        : "r"(a));
  } else {
    static_assert(kCount == 4);
    asm volatile(
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, "
        "[%4];\n"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
        : "r"(a));
  }
}

// d += a b for one 16x8x16 tile, T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __half>);
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// 16 bytes global -> shared, asynchronously (both 16-byte aligned); with
// `valid` false the destination is zero-filled and `src` is not read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src,
                                            bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0));
}

// Closes the group of cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most kPending committed groups are still in flight; the
// block then still needs a barrier before other threads read the data.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// wgmma.fence: registers written before it are ready for the products
// issued after it (every warp of the warpgroup).
__device__ __forceinline__ void wgmma_fence() {
#ifdef TAYLORSHIFT_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#ifdef TAYLORSHIFT_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most kPending committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef TAYLORSHIFT_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending)
               : "memory");
#endif
}

// The warpgroup's D (64 x kN) += A (64 x 16, registers) B (16 x kN, shared,
// laid out as kMajor says, `desc`); this warp's part of D is the first kN / 8
// n8 tiles of d, its part of A is a. The shapes the kernels use: kN in
// {16, 24, 32, 40, 64, 72, 128, 136}.
#define TS_WGMMA_D8(n) \
  "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])
#define TS_WGMMA_RS_TYPE(N, TYPE, TRANS, REGS, A, DESC, ...)          \
  asm volatile(                                                       \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                      \
      "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE \
      " {" REGS "}, {" A "}, " DESC ", p, 1, 1, " TRANS ";\n}\n"      \
      : __VA_ARGS__                                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
#define TS_WGMMA_RS(N, REGS, A, DESC, ...)                        \
  if constexpr (kBf16 && kMajor == Major::kMN) {                  \
    TS_WGMMA_RS_TYPE(N, "bf16", "1", REGS, A, DESC, __VA_ARGS__); \
  } else if constexpr (kBf16) {                                   \
    TS_WGMMA_RS_TYPE(N, "bf16", "0", REGS, A, DESC, __VA_ARGS__); \
  } else if constexpr (kMajor == Major::kMN) {                    \
    TS_WGMMA_RS_TYPE(N, "f16", "1", REGS, A, DESC, __VA_ARGS__);  \
  } else {                                                        \
    TS_WGMMA_RS_TYPE(N, "f16", "0", REGS, A, DESC, __VA_ARGS__);  \
  }
template <typename T, int kN, Major kMajor, int kTiles>
__device__ __forceinline__ void wgmma_rs(float (&d)[kTiles][4],
                                         const uint32_t (&a)[4],
                                         uint64_t desc) {
  static_assert(kTiles >= kN / 8, "D: the first kN / 8 n8 tiles of d");
#ifdef TAYLORSHIFT_WGMMA
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>);
  if constexpr (kN == 16) {
    TS_WGMMA_RS(16, "%0, %1, %2, %3, %4, %5, %6, %7", "%8, %9, %10, %11", "%12",
                TS_WGMMA_D8(0), TS_WGMMA_D8(1))
  } else if constexpr (kN == 24) {
    TS_WGMMA_RS(24, "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11",
                "%12, %13, %14, %15", "%16", TS_WGMMA_D8(0), TS_WGMMA_D8(1),
                TS_WGMMA_D8(2))
  } else if constexpr (kN == 32) {
    TS_WGMMA_RS(
        32,
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15",
        "%16, %17, %18, %19", "%20", TS_WGMMA_D8(0), TS_WGMMA_D8(1),
        TS_WGMMA_D8(2), TS_WGMMA_D8(3))
  } else if constexpr (kN == 40) {
    TS_WGMMA_RS(40,
                "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, "
                "%14, %15, %16, %17, %18, %19",
                "%20, %21, %22, %23", "%24", TS_WGMMA_D8(0), TS_WGMMA_D8(1),
                TS_WGMMA_D8(2), TS_WGMMA_D8(3), TS_WGMMA_D8(4))
  } else if constexpr (kN == 64) {
    TS_WGMMA_RS(64,
                "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, "
                "%14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, "
                "%26, %27, %28, %29, %30, %31",
                "%32, %33, %34, %35", "%36", TS_WGMMA_D8(0), TS_WGMMA_D8(1),
                TS_WGMMA_D8(2), TS_WGMMA_D8(3), TS_WGMMA_D8(4), TS_WGMMA_D8(5),
                TS_WGMMA_D8(6), TS_WGMMA_D8(7))
  } else if constexpr (kN == 72) {
    TS_WGMMA_RS(72,
                "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, "
                "%14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, "
                "%26, %27, %28, %29, %30, %31, %32, %33, %34, %35",
                "%36, %37, %38, %39", "%40", TS_WGMMA_D8(0), TS_WGMMA_D8(1),
                TS_WGMMA_D8(2), TS_WGMMA_D8(3), TS_WGMMA_D8(4), TS_WGMMA_D8(5),
                TS_WGMMA_D8(6), TS_WGMMA_D8(7), TS_WGMMA_D8(8))
  } else if constexpr (kN == 128) {
    TS_WGMMA_RS(
        128,
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
        "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
        "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
        "%58, %59, %60, %61, %62, %63",
        "%64, %65, %66, %67", "%68", TS_WGMMA_D8(0), TS_WGMMA_D8(1),
        TS_WGMMA_D8(2), TS_WGMMA_D8(3), TS_WGMMA_D8(4), TS_WGMMA_D8(5),
        TS_WGMMA_D8(6), TS_WGMMA_D8(7), TS_WGMMA_D8(8), TS_WGMMA_D8(9),
        TS_WGMMA_D8(10), TS_WGMMA_D8(11), TS_WGMMA_D8(12), TS_WGMMA_D8(13),
        TS_WGMMA_D8(14), TS_WGMMA_D8(15))
  } else if constexpr (kN == 136) {
    TS_WGMMA_RS(
        136,
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, "
        "%30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "
        "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, "
        "%58, %59, %60, %61, %62, %63, %64, %65, %66, %67",
        "%68, %69, %70, %71", "%72", TS_WGMMA_D8(0), TS_WGMMA_D8(1),
        TS_WGMMA_D8(2), TS_WGMMA_D8(3), TS_WGMMA_D8(4), TS_WGMMA_D8(5),
        TS_WGMMA_D8(6), TS_WGMMA_D8(7), TS_WGMMA_D8(8), TS_WGMMA_D8(9),
        TS_WGMMA_D8(10), TS_WGMMA_D8(11), TS_WGMMA_D8(12), TS_WGMMA_D8(13),
        TS_WGMMA_D8(14), TS_WGMMA_D8(15), TS_WGMMA_D8(16))
  } else {
    static_assert(kN == 16, "a shape the kernels use");
  }
#endif
}
#undef TS_WGMMA_RS
#undef TS_WGMMA_RS_TYPE
#undef TS_WGMMA_D8

}  // namespace taylorshift::cuda_kernels::warp
#endif

namespace taylorshift::cuda_kernels::warp {

// Warp tiles on the primitives, shared by the register-resident kernels.
// A warp owns kM fragments of 16 rows (rows 16 m .. 16 m + 15 of its rows in
// fragment m); shared tiles are row-major with leading dimension ld
// (elements). Every B fragment loaded from shared memory feeds the kM
// fragments' products, so a warp holding more rows loads less per HMMA.
// `lane` is threadIdx.x % 32.

// The A fragments of kM x 16 rows x kDim columns at `rows`: ldmatrix.x4 with
// lane l addressing row l % 16, column half l / 16 of each 16-column step.
template <int kDim, int ld, int kM, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[kM][kDim / 16][4],
                                       const T* rows, int lane) {
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk)
      ldmatrix<4>(a[m][kk],
                  rows + (16 * m + lane % 16) * ld + kk * 16 + lane / 16 * 8);
  }
}

// acc (kM x 16 x kN) += A (kM x 16 x kDim) R^T for a shared tile R of kN rows
// x kDim (so B[k][n] = R[n][k]): plain ldmatrix.x4 gives the B fragments of
// two n8 tiles (matrices: rows +0/+8 x columns +0/+8, registers {0, 1} one
// tile, {2, 3} the other).
template <typename T, int kDim, int kN, int ld, int kM>
__device__ __forceinline__ void mma_abt(float (&acc)[kM][kN / 8][4],
                                        const uint32_t (&a)[kM][kDim / 16][4],
                                        const T* r, int lane) {
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
#pragma unroll
    for (int n = 0; n < kN / 16; ++n) {
      uint32_t f[4];
      ldmatrix<4>(f, r + (n * 16 + lane % 8 + lane / 16 * 8) * ld + kk * 16 +
                         lane / 8 % 2 * 8);
      const uint32_t lo[2] = {f[0], f[1]}, hi[2] = {f[2], f[3]};
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma_16816<T>(acc[m][2 * n], a[m][kk], lo);
        mma_16816<T>(acc[m][2 * n + 1], a[m][kk], hi);
      }
    }
  }
}

// As mma_abt, with A read from its kM x 16 rows in shared memory (`a`) one
// 16-column k-step at a time: 4 kM registers of A live instead of kDim kM / 4,
// for 16 ldmatrix.x4 per 16 kM x kDim of A and every product.
template <typename T, int kDim, int kN, int ld, int kM>
__device__ __forceinline__ void mma_abt_rows(float (&acc)[kM][kN / 8][4],
                                             const T* a, const T* r, int lane) {
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
    uint32_t step[kM][1][4];
    load_a<16, ld>(step, a + 16 * kk, lane);
    mma_abt<T, 16, kN, ld>(acc, step, r + 16 * kk, lane);
  }
}

// acc (kM x 16 x kN) += A (kM x 16 x kK) R for a shared tile R of kK rows x
// kN (B = R): ldmatrix.x4.trans gives two n8 tiles (matrices: rows +0/+8 x
// columns +0/+8).
template <typename T, int kK, int kN, int ld, int kM>
__device__ __forceinline__ void mma_ab(float (&acc)[kM][kN / 8][4],
                                       const uint32_t (&a)[kM][kK / 16][4],
                                       const T* r, int lane) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int n = 0; n < kN / 16; ++n) {
      uint32_t f[4];
      ldmatrix<4, true>(f, r + (kk * 16 + lane % 8 + lane / 8 % 2 * 8) * ld +
                               n * 16 + lane / 16 * 8);
      const uint32_t lo[2] = {f[0], f[1]}, hi[2] = {f[2], f[3]};
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        mma_16816<T>(acc[m][2 * n], a[m][kk], lo);
        mma_16816<T>(acc[m][2 * n + 1], a[m][kk], hi);
      }
    }
  }
}

// acc (kM x 16 x 8) += A (kM x 16 x kK) M where every column of M is the
// vector m of kK 16-bit values at `m` (shared memory): every column of acc
// receives the m-weighted row sums of A, so each lane holds the sums of its
// own two rows and no shuffle is needed. As every column of M is the same,
// lane l's B registers of step kk are the pairs m[16 kk + 2 q, +1] and
// m[16 kk + 8 + 2 q, +1] (q = l % 4) whatever its column g.
template <typename T, int kK, int kM>
__device__ __forceinline__ void mma_row_sums(
    float (&acc)[kM][4], const uint32_t (&a)[kM][kK / 16][4], const T* m,
    int lane) {
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(m);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    const uint32_t b[2] = {pairs[8 * kk + lane % 4],
                           pairs[8 * kk + 4 + lane % 4]};
#pragma unroll
    for (int f = 0; f < kM; ++f) mma_16816<T>(acc[f], a[f][kk], b);
  }
}

// acc (kM x 16 x 8) += A (kM x 16 x kK) 1: mma_row_sums with m = 1, its B
// registers the constant pair (1, 1), so no shared memory is read.
template <typename T, int kK, int kM>
__device__ __forceinline__ void mma_row_sums_ones(
    float (&acc)[kM][4], const uint32_t (&a)[kM][kK / 16][4]) {
  const uint32_t one = pack<T>(1.f, 1.f);
  const uint32_t b[2] = {one, one};
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int f = 0; f < kM; ++f) mma_16816<T>(acc[f], a[f][kk], b);
  }
}

// A 16 x kN accumulator (C layout) rounded to T as the A operand of the next
// product: the C elements of n8 tiles 2 kk and 2 kk + 1 sit exactly where the
// A layout wants columns 16 kk .. 16 kk + 15 (rows g / g + 8, columns 2 q +
// {0, 1} and 8 + 2 q + {0, 1}), so no data moves between lanes.
template <typename T, int kN>
__device__ __forceinline__ void to_a(uint32_t (&a)[kN / 16][4],
                                     const float (&c)[kN / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    a[kk][0] = pack<T>(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = pack<T>(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = pack<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = pack<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

}  // namespace taylorshift::cuda_kernels::warp
