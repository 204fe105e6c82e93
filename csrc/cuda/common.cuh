// CUDA-only building blocks shared by direct.cu and efficient.cu.
//
// Two kinds of kernel. The register-resident ones (the *_mma_kernel of
// direct.cu and efficient.cu, 16-bit inputs) keep every product's operands
// and accumulators in registers as mma.sync fragments (warp.cuh) and use
// shared memory only for cp.async staged tiles (load_rows). The others
// (float32/float64, and the efficient algorithm's other head dims) have this
// shape: a block of kThreads threads stages tiles of its operands in shared
// memory, multiplies them with `block_mma` into float (double for float64)
// accumulators that also live in shared memory, and applies the
// TaylorShift-specific elementwise steps (masking, the polynomial, feature
// expansion, contractions) between the products. Dimensions (head dims, tile
// sizes) are run-time values padded to multiples of 16, so one instantiation
// per dtype covers every head dim up to kMaxHeadDim, and the host picks the
// largest tile whose shared memory fits the device.
//
// Operand types. Products run on tensor cores for half, bfloat16 and TF32
// operands (wmma, float accumulation, sm_80+); float and double operands take
// an FMA path with the same semantics. The forward products take their
// operands in the input dtype: Q K^T and W [V | 1] (direct), psi(K)^T [1 | V]
// and phi(Q) state (efficient, the state scaled by a power of two so that it
// fits fp16). Backward operands whose range depends on N or on the loss scale
// (dz, dS, dX, W / den) need the float exponent range: for bfloat16 inputs
// they stay bfloat16, for fp16 inputs the backward products of these kernels
// run in TF32, whose 10-bit mantissa matches fp16's, so fp16 gradients keep
// fp16 accuracy without overflowing or flushing to zero. (The mma kernels
// keep fp16: the direct backward bounds P and dX independently of N, see
// direct.cu; the efficient backward scales dz, the state and dS per head by
// powers of two, see float16_operand_scale in efficient.cu.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <optional>
#include <type_traits>

#include "../kernel_blocks.h"
#include "warp.cuh"

namespace taylorshift::cuda_kernels {

constexpr int kThreads = 128;  // 4 warps per block, every kernel
constexpr int kMaxHeadDim = 128;

TS_HOST_DEVICE int round16(int x) { return (x + 15) / 16 * 16; }

// Leading dimensions of shared-memory tiles with `cols` (a multiple of 16)
// logical columns. The padding keeps the rows of a 16x16 wmma tile in
// different banks, and keeps every 16-row / 16-column tile start 32-byte
// aligned as wmma requires (8 elements of 2 bytes; 4 floats).
TS_HOST_DEVICE int operand_ld(int cols) { return cols + 8; }
TS_HOST_DEVICE int accum_ld(int cols) { return cols + 4; }

// c10 scalar types to the CUDA builtin types the intrinsics take.
template <typename S>
struct Native {
  using type = S;
};
template <>
struct Native<c10::Half> {
  using type = __half;
};
template <>
struct Native<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Per-type arithmetic: the accumulation type, the operand type of derived
// (range-sensitive) products, and the conversions.
template <typename T>
struct Num {
  using acc = T;      // float -> float, double -> double
  using derived = T;  // operand type for range-sensitive derived values
  // Accumulators of sums over thousands of features (efficient algorithm):
  // double for float32, so its error stays that of the inputs' rounding.
  using wide = std::conditional_t<std::is_same_v<T, float>, double, T>;
  static __device__ __forceinline__ acc widen(T x) { return x; }
  static __device__ __forceinline__ T narrow(acc x) { return x; }
};
// A float rounded to TF32 (float exponent, 10-bit mantissa like fp16): the
// operand type of fp16 backward products, see the header comment.
struct Tf32 {
  float value;
};

__device__ __forceinline__ float round_to_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return nvcuda::wmma::__float_to_tf32(x);
#else
  return x;
#endif
}

template <>
struct Num<Tf32> {
  using acc = float;
  using derived = Tf32;
  using wide = float;
  static __device__ __forceinline__ float widen(Tf32 x) { return x.value; }
  static __device__ __forceinline__ Tf32 narrow(float x) {
    return {round_to_tf32(x)};
  }
};

template <>
struct Num<__half> {
  using acc = float;
  using derived = Tf32;
  using wide = float;  // tensor-core accumulators are float
  static __device__ __forceinline__ float widen(__half x) {
    return __half2float(x);
  }
  static __device__ __forceinline__ __half narrow(float x) {
    return __float2half_rn(x);
  }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  using derived = __nv_bfloat16;  // same mantissa as the inputs, float range
  using wide = float;
  static __device__ __forceinline__ float widen(__nv_bfloat16 x) {
    return __bfloat162float(x);
  }
  static __device__ __forceinline__ __nv_bfloat16 narrow(float x) {
    return __float2bfloat16_rn(x);
  }
};

template <typename T>
constexpr bool kTensorCore =
    std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> ||
    std::is_same_v<T, Tf32>;

// Converts between any two of the four types through the accumulation type.
template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  return Num<To>::narrow(
      static_cast<typename Num<To>::acc>(Num<From>::widen(x)));
}

// Shared-memory carving, computed identically on the host (to size the launch
// and pick tiles) and on the device (to place the buffers). Every buffer
// starts 128-byte aligned.
struct SmemCarver {
  size_t size = 0;
  TS_HOST_DEVICE size_t take(size_t bytes) {
    const size_t offset = size;
    size = (size + bytes + 127) / 128 * 128;
    return offset;
  }
};

// C (+)= op(A) op(B) on shared-memory tiles, by the whole block.
//   op(A) is m x k: A[i * lda + kk], or with kATrans A[kk * lda + i];
//   op(B) is k x n: B[kk * ldb + j], or with kBTrans B[j * ldb + kk];
//   C is m x n, row-major, in the accumulation type.
// m, n, k are multiples of 16 (tiles are zero-padded). Callers synchronise
// the block before and after: the product reads and writes shared memory.
template <bool kATrans, bool kBTrans, typename Op, typename Acc>
__device__ void block_mma(const Op* A, int lda, const Op* B, int ldb, Acc* C,
                          int ldc, int m, int n, int k, bool accumulate) {
  if constexpr (kTensorCore<Op>) {
    static_assert(std::is_same_v<Acc, float>);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    namespace wmma = nvcuda::wmma;
    // TF32 products are 16x16x8 on float storage; half/bf16 are 16x16x16.
    constexpr bool kTf32 = std::is_same_v<Op, Tf32>;
    constexpr int kK = kTf32 ? 8 : 16;
    using Precision = std::conditional_t<kTf32, wmma::precision::tf32, Op>;
    using Element = std::conditional_t<kTf32, float, Op>;
    using ALayout =
        std::conditional_t<kATrans, wmma::col_major, wmma::row_major>;
    using BLayout =
        std::conditional_t<kBTrans, wmma::col_major, wmma::row_major>;
    const Element* a = reinterpret_cast<const Element*>(A);
    const Element* b = reinterpret_cast<const Element*>(B);
    const int warp = threadIdx.x / 32;
    const int warps = blockDim.x / 32;
    const int tiles_n = n / 16;
    const int tiles = (m / 16) * tiles_n;
    for (int t = warp; t < tiles; t += warps) {
      const int i0 = t / tiles_n * 16;
      const int j0 = t % tiles_n * 16;
      wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc;
      if (accumulate) {
        wmma::load_matrix_sync(acc, C + i0 * ldc + j0, ldc,
                               wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.f);
      }
      for (int kk = 0; kk < k; kk += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, Precision, ALayout> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, kK, Precision, BLayout> fb;
        wmma::load_matrix_sync(
            fa, kATrans ? a + kk * lda + i0 : a + i0 * lda + kk, lda);
        wmma::load_matrix_sync(
            fb, kBTrans ? b + j0 * ldb + kk : b + kk * ldb + j0, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(C + i0 * ldc + j0, acc, ldc, wmma::mem_row_major);
    }
#else
    __trap();  // tensor-core kernels are built for sm_80+ only
#endif
  } else {
    // FMA path: each thread owns a 4 x 4 block of C, so every shared-memory
    // load feeds four multiply-adds. float32 operands are summed in double
    // within a call: the call's k terms then cost one float rounding, not k,
    // which keeps the long state sums of the efficient algorithm within the
    // error of PyTorch's blocked float32 matrix products.
    using Sum = std::conditional_t<std::is_same_v<Op, float>, double, Acc>;
    const int tiles_n = n / 4;
    const int tiles = (m / 4) * tiles_n;
    for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
      const int i0 = t / tiles_n * 4;
      const int j0 = t % tiles_n * 4;
      Sum s[4][4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
          s[ii][jj] = accumulate ? Sum(C[(i0 + ii) * ldc + j0 + jj]) : Sum(0);
      for (int kk = 0; kk < k; ++kk) {
        Sum av[4], bv[4];
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
          av[ii] = Num<Op>::widen(kATrans ? A[kk * lda + i0 + ii]
                                          : A[(i0 + ii) * lda + kk]);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
          bv[jj] = Num<Op>::widen(kBTrans ? B[(j0 + jj) * ldb + kk]
                                          : B[kk * ldb + j0 + jj]);
#pragma unroll
        for (int ii = 0; ii < 4; ++ii)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) s[ii][jj] += av[ii] * bv[jj];
      }
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
          C[(i0 + ii) * ldc + j0 + jj] = static_cast<Acc>(s[ii][jj]);
    }
  }
}

// A (B, H, L, cols) tensor read through its four strides: the
// (B, L, H, d)-transposed views of a model's projections, sliced value dims,
// gradients of any layout are read in place. A contiguous (rows, cols)
// matrix is the view with b = h = 0, stride_t = cols, stride_c = 1.
template <typename T>
struct TokenRows {
  const T* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_t = 0, stride_c = 1;
  int cols = 0;
  __device__ __forceinline__ const T* row(int64_t b, int64_t h,
                                          int64_t t) const {
    return data + b * stride_b + h * stride_h + t * stride_t;
  }
};

template <typename T>
TokenRows<T> token_rows(const at::Tensor& t, int64_t cols) {
  TokenRows<T> rows;
  rows.data = reinterpret_cast<const T*>(t.data_ptr());
  rows.stride_b = t.stride(0);
  rows.stride_h = t.stride(1);
  rows.stride_t = t.stride(2);
  rows.stride_c = t.stride(3);
  rows.cols = static_cast<int>(cols);
  return rows;
}

// Copies rows [row0, row0 + rows) of head (b, h) of `src` into a
// (rows x padded_cols) shared tile, converting the type and writing zeros
// past the tensor (tail rows, padding columns) and, with `padding`, for the
// rows of padded keys: zeros, not garbage, because those entries are
// multiplied by masked zeros and 0 * NaN = NaN.
template <typename Dst, typename Src>
__device__ void load_tile(Dst* dst, int ld, const TokenRows<Src>& src,
                          int64_t b, int64_t h, int64_t total_rows,
                          int64_t row0, int rows, int padded_cols,
                          const Mask* padding = nullptr) {
  const auto row_valid = [&](int r) {
    return row0 + r < total_rows &&
           (padding == nullptr || padding->key_valid(b, row0 + r));
  };
  const Src* base = src.row(b, h, row0);
  const int cols = src.cols;
  // Same type, no padding columns, unit column stride and every row a whole
  // number of 16-byte vectors from a 16-byte aligned start (a view may start
  // anywhere): copy 16 bytes per access (2-byte inputs with head dims 16,
  // 32, 64, 128; the prepared states; transposed (B, L, H, d) views).
  constexpr int kVector = 16 / sizeof(Src);
  if constexpr (std::is_same_v<Dst, Src> &&
                (sizeof(Src) == 2 || sizeof(Src) == 4)) {
    if (cols == padded_cols && cols % kVector == 0 && src.stride_c == 1 &&
        src.stride_t % kVector == 0 &&
        reinterpret_cast<uintptr_t>(base) % 16 == 0) {
      const int vectors = cols / kVector;
      for (int idx = threadIdx.x; idx < rows * vectors; idx += blockDim.x) {
        const int r = idx / vectors, col = idx % vectors * kVector;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (row_valid(r)) {
          value =
              *reinterpret_cast<const uint4*>(base + r * src.stride_t + col);
        }
        *reinterpret_cast<uint4*>(dst + r * ld + col) = value;
      }
      return;
    }
  }
  for (int idx = threadIdx.x; idx < rows * padded_cols; idx += blockDim.x) {
    const int r = idx / padded_cols;
    const int col = idx % padded_cols;
    Dst value = Num<Dst>::narrow(typename Num<Dst>::acc(0));
    if (col < cols && row_valid(r)) {
      value = convert<Dst>(base[r * src.stride_t + col * src.stride_c]);
    }
    dst[r * ld + col] = value;
  }
}

// The same for a contiguous row-major (total_rows x cols) matrix.
template <typename Dst, typename Src>
__device__ void load_tile(Dst* dst, int ld, const Src* src, int64_t total_rows,
                          int cols, int64_t row0, int rows, int padded_cols) {
  TokenRows<Src> matrix;
  matrix.data = src;
  matrix.stride_t = cols;
  matrix.cols = cols;
  load_tile(dst, ld, matrix, 0, 0, total_rows, row0, rows, padded_cols);
}

template <typename T>
__device__ void zero_tile(T* dst, int ld, int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    dst[idx / cols * ld + idx % cols] = Num<T>::narrow(typename Num<T>::acc(0));
  }
}

// `t` itself when its rows are 16-byte vectors (unit last stride, other
// strides, start and the row length multiples of 16 bytes); otherwise (odd
// head dims, unaligned or column-strided views) a contiguous copy whose rows
// are zero-padded to a multiple of 8 elements.
inline at::Tensor cp_async_rows(const at::Tensor& t) {
  constexpr int64_t kVector = 8;  // 2-byte elements per 16 bytes
  const bool vectors = t.stride(3) == 1 && t.size(3) % kVector == 0 &&
                       t.stride(0) % kVector == 0 &&
                       t.stride(1) % kVector == 0 &&
                       t.stride(2) % kVector == 0 &&
                       reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (vectors) return t;
  const int64_t pad = (kVector - t.size(3) % kVector) % kVector;
  return at::constant_pad_nd(t, {0, pad}).contiguous();
}

// Where element (r, c) of a shared tile of kDim columns lives.
// * kPadded: rows of kDim + 8 elements. The padding puts the 8 rows an
//   ldmatrix reads in 8 different 16-byte bank groups.
// * kCoreMatrices: 8x8 core matrices of 128 contiguous bytes, the kDim / 8 of
//   each group of 8 rows one after another: the no-swizzle operand layout of
//   wgmma (warp.cuh; LBO = 16 kDim bytes from one row group to the next, SBO
//   = 128 bytes from one column group to the next), and just as free of bank
//   conflicts for ldmatrix, whose 8 row addresses then cover one core matrix.
enum class TileLayout { kPadded, kCoreMatrices };

template <int kDim, TileLayout kLayout>
__host__ __device__ constexpr int tile_offset(int r, int c) {
  if constexpr (kLayout == TileLayout::kPadded) {
    return r * (kDim + 8) + c;
  } else {
    return r / 8 * 8 * kDim + c / 8 * 64 + r % 8 * 8 + c % 8;
  }
}

// One thread's share of the 16-byte cp.async copies of kRows x kDim tiles of
// `src` (b, h), rows [t0, t0 + kRows) then, after each advance(), the next
// kRows rows, into shared tiles laid out as kLayout: thread t copies column
// chunk c of row r + s kThreads / kChunks (s < kCopies), with
//   kPadded:        c = t % kChunks,      r = t / kChunks
//   kCoreMatrices:  c = t / 8 % kChunks,  r = t % 8 + 8 (t / (8 kChunks))
// so that 8 consecutive threads write 8 different bank groups either way (a
// padded row, or one core matrix). The source of copy s is one pointer plus s
// row steps, moved by kRows rows per tile, so a streamed tile costs each copy
// an add and a compare instead of its 64-bit address arithmetic. Rows past
// `total` and columns past src.cols land as zeros, not garbage, because padded
// entries meet masked zeros in the products and 0 * NaN = NaN.
template <int kDim, int kRows, typename T,
          TileLayout kLayout = TileLayout::kPadded>
struct RowCopies {
  static constexpr int kChunks = kDim / 8;          // 16-byte chunks per row
  static constexpr int kStep = kThreads / kChunks;  // rows between copies
  static constexpr int kCopies = kRows / kStep;
  static_assert(kThreads % kChunks == 0 && kRows % kStep == 0 &&
                kStep % 8 == 0);
  const T* src;       // copy 0's source in the current tile
  const T* fallback;  // a valid address for the copies that read nothing
  int64_t step;       // kStep rows, in elements
  int64_t left;       // rows from copy 0's row of the current tile to `total`
  int offset;         // copy 0's place in the shared tile
  bool col_valid;

  // This thread's row of copy 0.
  // (threadIdx.x unsigned: the divisions are shifts.)
  static __device__ __forceinline__ int first_row() {
    const unsigned t = threadIdx.x;
    return kLayout == TileLayout::kPadded ? t / kChunks
                                          : t % 8 + 8 * (t / (8 * kChunks));
  }

  __device__ __forceinline__ RowCopies(const TokenRows<T>& rows, int64_t b,
                                       int64_t h, int64_t t0, int64_t total) {
    const unsigned t = threadIdx.x;
    const int row = first_row();
    const int col =
        (kLayout == TileLayout::kPadded ? t % kChunks : t / 8 % kChunks) * 8;
    src = rows.row(b, h, t0) + row * rows.stride_t + col;
    fallback = rows.data;
    step = kStep * rows.stride_t;
    left = total - t0 - row;
    offset = tile_offset<kDim, kLayout>(row, col);
    col_valid = col < rows.cols;
  }
  // Whether copy s of the current tile reads a row that exists.
  __device__ __forceinline__ bool row_valid(int s) const {
    return s * kStep < left;
  }
  // Copy s of the current tile into `tile`, reading only if `valid`.
  __device__ __forceinline__ void copy(T* tile, int s, bool valid) const {
    valid = valid && col_valid;
    warp::cp_async_16(tile + offset + tile_offset<kDim, kLayout>(s * kStep, 0),
                      valid ? src + s * step : fallback, valid);
  }
  // The current tile into `tile`.
  __device__ __forceinline__ void copy(T* tile) const {
#pragma unroll
    for (int s = 0; s < kCopies; ++s) copy(tile, s, row_valid(s));
  }
  __device__ __forceinline__ void advance() {
    src += kCopies * step;
    left -= kRows;
  }
};

// Rows [t0, t0 + kRows) of `src` (b, h) into a kRows x kDim shared tile, as
// RowCopies, landing at the caller's cp_async_wait.
template <int kDim, int kRows, typename T>
__device__ __forceinline__ void load_rows(T* dst, const TokenRows<T>& src,
                                          int64_t b, int64_t h, int64_t t0,
                                          int64_t total) {
  RowCopies<kDim, kRows, T>(src, b, h, t0, total).copy(dst);
}

// Tiles of keys of K and V (both kDim wide after padding), streamed as
// RowCopies, and with `padding` zero rows for padded keys too: a zero K and V
// row is how the 16-bit kernels drop a key from every product without a
// per-element test, and without reading its values (which may be NaN or
// inf). With `weights`, thread r < kRows also writes the key weight m_j =
// [key j = t0 + r exists and is not padding] there. With `padding`, each
// key's flag is read once per warp: lane l reads keys t0 + 32 w + l and a
// ballot per w gives every lane the tile's validity bits (64 per word), so
// every 16-byte copy tests a bit instead of loading a flag. Both tiles are
// laid out as kLayout.
template <int kDim, int kRows, typename T,
          TileLayout kLayout = TileLayout::kPadded>
struct KeyCopies {
  static_assert(kRows <= 128 && kRows <= kThreads);
  using Copies = RowCopies<kDim, kRows, T, kLayout>;
  Copies k, v;
  const Mask* padding;
  int64_t b, t0, total;

  __device__ __forceinline__ KeyCopies(const TokenRows<T>& k_rows,
                                       const TokenRows<T>& v_rows, int64_t b,
                                       int64_t h, int64_t t0, int64_t total,
                                       const Mask* padding)
      : k(k_rows, b, h, t0, total),
        v(v_rows, b, h, t0, total),
        padding(padding),
        b(b),
        t0(t0),
        total(total) {}

  // The current tile into k_dst, v_dst (and m into `weights`).
  __device__ __forceinline__ void copy(T* k_dst, T* v_dst, T* weights) const {
    copy_rows<true>(k_dst, v_dst, weights);
  }
  // The current tile of K alone into k_dst.
  __device__ __forceinline__ void copy_keys(T* k_dst) const {
    copy_rows<false>(k_dst, nullptr, nullptr);
  }
  __device__ __forceinline__ void advance() {
    k.advance();
    v.advance();
    t0 += kRows;
  }

 private:
  template <bool kValues>
  __device__ __forceinline__ void copy_rows(T* k_dst, T* v_dst,
                                            T* weights) const {
    // Bit r of low (r < 64), or r - 64 of high: key t0 + r exists and is
    // not padding (two words, not an array, which a run-time index would put
    // in local memory).
    uint64_t low = 0, high = 0;
    if (padding != nullptr) {
      const int lane = threadIdx.x % 32;
#pragma unroll
      for (int w = 0; w < (kRows + 31) / 32; ++w) {
        const int64_t j = t0 + 32 * w + lane;
        const bool key =
            32 * w + lane < kRows && j < total && padding->key_valid(b, j);
        (w < 2 ? low : high) |= uint64_t(__ballot_sync(0xffffffffu, key))
                                << (32 * (w % 2));
      }
    }
    const auto valid = [&](int r) {
      if constexpr (kRows <= 64) {
        return (low >> r & 1) != 0;
      } else {
        return ((r < 64 ? low : high) >> (r % 64) & 1) != 0;
      }
    };
#pragma unroll
    for (int s = 0; s < Copies::kCopies; ++s) {
      const bool key = padding == nullptr
                           ? k.row_valid(s)
                           : valid(Copies::first_row() + s * Copies::kStep);
      k.copy(k_dst, s, key);
      if constexpr (kValues) v.copy(v_dst, s, key);
    }
    if (weights != nullptr && threadIdx.x < kRows) {
      const bool key =
          padding == nullptr ? t0 + threadIdx.x < total : valid(threadIdx.x);
      weights[threadIdx.x] = Num<T>::narrow(key ? 1.f : 0.f);
    }
  }
};

// Keys [t0, t0 + kRows) of K and V into two tiles (and m into `weights`), as
// KeyCopies.
template <int kDim, int kRows, typename T>
__device__ __forceinline__ void load_key_rows(T* k_dst, T* v_dst, T* weights,
                                              const TokenRows<T>& k,
                                              const TokenRows<T>& v, int64_t b,
                                              int64_t h, int64_t t0,
                                              int64_t total,
                                              const Mask* padding) {
  KeyCopies<kDim, kRows, T>(k, v, b, h, t0, total, padding)
      .copy(k_dst, v_dst, weights);
}

// Rows row0 + g, row0 + g + 8 of a warp's 16 x kDim accumulator (C layout;
// the first kDim / 8 of its n8 tiles), times scale[0] / scale[1], into the
// first `cols` columns of the contiguous (rows, cols) matrix `dst`.
template <typename T, int kDim, int kTiles>
__device__ __forceinline__ void store_rows(T* dst,
                                           const float (&acc)[kTiles][4],
                                           int64_t row0, int64_t rows, int cols,
                                           const float (&scale)[2], int lane) {
  static_assert(kTiles >= kDim / 8);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + lane / 4 + 8 * r;
    if (row >= rows) continue;
#pragma unroll
    for (int n = 0; n < kDim / 8; ++n) {
      const int col = n * 8 + 2 * (lane % 4);
      if (col < cols)
        dst[row * cols + col] = Num<T>::narrow(acc[n][2 * r] * scale[r]);
      if (col + 1 < cols)
        dst[row * cols + col + 1] =
            Num<T>::narrow(acc[n][2 * r + 1] * scale[r]);
    }
  }
}

// Blocks of 256 threads for the grid-stride elementwise kernels: eight per
// multiprocessor keep the memory system busy.
inline int64_t grid_stride_blocks() {
  return 8 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// The backward's dz rows from gY (read through its strides) and the row
// scalars (rs, dl) (B H, M, 2), times `factor` and the head's dz_scale (null:
// 1): y = factor dz_scale rs gY into the first cols of rows of y_ld elements
// (B H, M, y_ld), and, unless w is null, w = -dz_scale dl (B H, w_stride).
// Each rounded to T once. count = B H M cols.
template <typename T>
__global__ void dz_rows_kernel(TokenRows<T> grad_out, const float* scalars,
                               float factor, const float* dz_scale,
                               int64_t heads, int64_t tokens, int64_t y_ld,
                               int64_t w_stride, int64_t count, T* y, T* w) {
  const int cols = grad_out.cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>(i % cols);
    const int64_t row = i / cols, t = row % tokens, bh = row / tokens;
    const float* s = scalars + 2 * row;
    const float scale = dz_scale != nullptr ? dz_scale[bh] : 1.f;
    y[row * y_ld + col] =
        Num<T>::narrow(factor * scale * s[0] *
                       Num<T>::widen(grad_out.row(bh / heads, bh % heads,
                                                  t)[col * grad_out.stride_c]));
    if (w != nullptr && col == 0)
      w[bh * w_stride + t] = Num<T>::narrow(-scale * s[1]);
  }
}

// Per-row values as a (B, H, M) view with arbitrary (possibly zero) strides.
template <typename Acc>
struct RowValues {
  const Acc* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_i = 0;
  __device__ __forceinline__ Acc at(int64_t b, int64_t h, int64_t i) const {
    return data[b * stride_b + h * stride_h + i * stride_i];
  }
};

template <typename Acc>
RowValues<Acc> row_values(const at::Tensor& t) {
  return {t.data_ptr<Acc>(), t.stride(0), t.stride(1), t.stride(2)};
}

// sigma_i of docs/math.md for every query row, (B, H, M) in the accumulation
// dtype, expanded (stride 0) over the axes it does not depend on.
at::Tensor output_scales(const at::Tensor& q, int64_t keys,
                         const std::optional<at::Tensor>& key_padding_mask,
                         const std::optional<at::Tensor>& attn_mask,
                         bool causal, bool output_scale);

// The per-row scalars of both backwards (docs/math.md §2, §3), contiguous
// (B, H, M, 2) in the accumulation dtype:
//   [..., 0] = rs_i = sigma_i / den_i,  [..., 1] = dl_i = (gY_i . y_i) / den_i
// with 1/den = 0 for all-masked rows, so their gradients vanish.
at::Tensor backward_row_scalars(const at::Tensor& grad_out,
                                const at::Tensor& out, const at::Tensor& den,
                                const at::Tensor& sigma);

// causal.cu's chunks as the efficient kernels' heads (efficient.cu,
// states_before_chunks): `count` heads in a row per sequence (0: not
// causal); `before`, where not null, the state before a sequence's first
// chunk (sequences, F, e + 1) with order 2's F rows; `after`, where not null,
// receives the state after its last chunk, the same way.
// keys_before bounds the keys `before` sums (float16's operand scale).
struct CausalChunks {
  int64_t count = 0;
  const at::Tensor* before = nullptr;
  at::Tensor* after = nullptr;
  int64_t keys_before = 0;
};

// The operators' kernels after their checks, on the logits' factors (the
// CUDA device current), for causal.cu as well as the operators:
// - sigma: the output scales of the rows (B, H, M), as output_scales;
// - scalars: backward_row_scalars of the rows;
// - chunks (efficient): causal.cu's chunks, above; the state the forward
//   returns is then the state each chunk's queries read, and the backward's
//   chunks the forward's count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_rows(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& sigma,
    const Coefficients& f, const CausalChunks& chunks = {});
std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_backward_rows(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& state, const at::Tensor& scalars,
    const std::optional<at::Tensor>& key_padding_mask, const Coefficients& f,
    int64_t chunks);
std::tuple<at::Tensor, at::Tensor> direct_forward_rows(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal,
    const at::Tensor& sigma, const Coefficients& f);
std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_rows(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& scalars,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal,
    const Coefficients& f);

// Checks shared by every CUDA operator: device placement, supported sizes.
void check_cuda_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v,
                       std::initializer_list<const at::Tensor*> others,
                       const std::optional<at::Tensor>& key_padding_mask,
                       const std::optional<at::Tensor>& attn_mask);

// Raises the kernel's dynamic shared-memory limit to `bytes` (above the
// 48 KB default) or fails with a message naming the sizes.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)));
}

size_t max_shared_memory();

// The largest tile in {64, 32, 16} whose shared memory (`bytes(tile)`) fits
// the device; fails with the sizes when even 16 does not.
template <typename Bytes>
int pick_tile(const char* op, Bytes bytes) {
  const size_t limit = max_shared_memory();
  for (int tile : {64, 32, 16}) {
    if (bytes(tile) <= limit) return tile;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": needs ", bytes(16),
                              " bytes of shared memory per block, the device "
                              "allows ",
                              limit);
  return 0;
}

}  // namespace taylorshift::cuda_kernels
