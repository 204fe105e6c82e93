// Helpers of the CPU kernels: row-major matrix products straight into BLAS,
// (B, H, tokens, dim) operands read through their strides, work splitting.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include "../kernel_blocks.h"

// The Fortran BLAS that torch itself links (MKL in the x86 wheels, OpenBLAS
// elsewhere) exports sgemm_ / dgemm_, but torch exports no C++ entry to it
// (at::native::cpublas::gemm is internal). The symbols are declared weak: on
// a torch without them they resolve to null and products go through
// at::mm_out instead. LP64 interface (32-bit sizes), as torch calls it.
#if defined(__ELF__)
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
#endif

// The element-wise loops of the CPU kernels (feature tiles, contractions,
// the polynomial) are compiled once per x86 level and picked when the library
// loads (GCC function multi-versioning, an ifunc): the extension is built
// without -march, and at the x86-64 baseline (SSE2) these loops run at a
// quarter of AVX-512's width. Each such function does a whole tile's work per
// call, so the indirect call costs nothing measurable. Elsewhere (other
// compilers or architectures) one plain build.
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && \
    !defined(__clang__)
#define TS_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TS_VECTOR_CLONES
#endif

// A helper of a TS_VECTOR_CLONES function, compiled into each of its clones
// (an outlined copy would be built for the baseline only).
#if defined(__GNUC__)
#define TS_INLINE inline __attribute__((always_inline))
#else
#define TS_INLINE inline
#endif

namespace taylorshift::cpu {

// fn(std::integral_constant<int, K>{}) for K = order, 1 <= order <=
// kMaxOrder: the polynomial's order as a compile-time constant, so that
// Horner's loop (features.h) unrolls inside the vectorised loops of the
// element-wise passes instead of looping per element.
template <int K = 1, typename Fn>
void with_order(int order, Fn&& fn) {
  if constexpr (K < kMaxOrder) {
    if (order != K) return with_order<K + 1>(order, std::forward<Fn>(fn));
  }
  fn(std::integral_constant<int, K>{});
}

namespace detail {

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*,
                             const int*, const T*, const T*, const int*,
                             const T*, const int*, const T*, T*, const int*);

template <typename T>
FortranGemm<T> fortran_gemm() {
#if defined(__ELF__)
  if constexpr (std::is_same_v<T, float>) return &::sgemm_;
  if constexpr (std::is_same_v<T, double>) return &::dgemm_;
#endif
  return nullptr;
}

// The same product through ATen: the buffers wrapped (not copied) as
// tensors, C^T = op(B)^T op(A)^T in column-major terms.
template <typename T>
void aten_gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n,
               int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto options =
      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto wrap = [&](const T* data, int64_t rows, int64_t cols, int64_t ld,
                  bool transpose) {
    at::Tensor t = at::from_blob(
        const_cast<T*>(data),
        {transpose ? cols : rows, transpose ? rows : cols}, {ld, 1}, options);
    return transpose ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::Tensor product =
      at::mm(wrap(a, m, k, lda, transpose_a), wrap(b, k, n, ldb, transpose_b));
  if (beta == T(0))
    out.copy_(product.mul_(alpha));
  else
    out.mul_(beta).add_(product, alpha);
}

}  // namespace detail

// C = alpha op(A) op(B) + beta C on raw row-major buffers: op(A) is m x k,
// op(B) is k x n, leading dimensions lda, ldb, ldc (a row stride, so a
// (B, L, H, d) tensor seen as (B, H, L, d) is read in place with ld = H d).
// BLAS is column-major: a row-major X is a column-major X^T, and
// C^T = op(B)^T op(A)^T, so the operands swap places and keep their
// transpose flags. Called inside at::parallel_for, BLAS runs on the calling
// thread, as in PyTorch's own CPU flash attention; calling BLAS directly
// spares the per-tile tensor wrapping and dispatch of at::mm_out (several
// microseconds a call, thousands of calls per attention).
template <typename T>
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
          T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta,
          T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto blas = detail::fortran_gemm<T>();
  const int64_t largest = std::max({m, n, k, lda, ldb, ldc});
  if (blas == nullptr || largest > std::numeric_limits<int>::max()) {
    detail::aten_gemm(transpose_a, transpose_b, m, n, k, alpha, a, lda, b, ldb,
                      beta, c, ldc);
    return;
  }
  const char ta = transpose_a ? 'T' : 'N', tb = transpose_b ? 'T' : 'N';
  const int mi = int(m), ni = int(n), ki = int(k), lda_i = int(lda),
            ldb_i = int(ldb), ldc_i = int(ldc);
  blas(&tb, &ta, &ni, &mi, &ki, &alpha, b, &ldb_i, a, &lda_i, &beta, c, &ldc_i);
}

// One operand (q, k, v, out or grad_out) of shape (B, H, tokens, dim) whose
// last dimension is contiguous: rows of a head are `row_stride` apart.
template <typename T>
struct TokenRows {
  const T* data;
  int64_t batch_stride, head_stride, row_stride;

  const T* head(int64_t b, int64_t h) const {
    return data + b * batch_stride + h * head_stride;
  }
};

// The kernels compute in accumulate_dtype (kernel_blocks.h) and read an
// operand in place when BLAS can: that dtype, a contiguous last dimension and
// rows at least a row apart. The (B, H, L, d) view the module makes of a
// (B, L, H, d) projection, q.transpose(1, 2), qualifies; anything else (a
// float16 input, a stride-0 token axis) is converted once.
inline at::Tensor compute_operand(const at::Tensor& t) {
  const bool readable = t.scalar_type() == accumulate_dtype(t) &&
                        (t.size(3) == 1 || t.stride(3) == 1) &&
                        (t.size(2) == 1 || t.stride(2) >= t.size(3));
  return readable ? t : t.to(accumulate_dtype(t)).contiguous();
}

// k or v with the rows of padded keys zeroed (key_padding_mask (B, N), True
// = padding), as compute_operand: a padded key's values are never read, yet
// a product that multiplies its row by a zero weight still spreads a NaN or
// inf in it (0 * inf = NaN). Without padding, or with none padded, x itself.
inline at::Tensor key_operand(const at::Tensor& x,
                              const std::optional<at::Tensor>& padding) {
  const at::Tensor t = compute_operand(x);
  if (!padding || !padding->any().item<bool>()) return t;
  return t.masked_fill(padding->view({t.size(0), 1, t.size(2), 1}), 0);
}

// m_r [1 | v_r] rows (row stride e + 1) of `rows` tokens whose value rows
// start at v, `stride` apart: the value side of the state's outer product
// (efficient.cpp, causal.cpp), zero by selection where valid[r] == 0, so
// that a padded key's values (which may be NaN or inf) are never read.
template <typename T>
void write_augmented_values(const T* v, int64_t stride, int64_t rows, int64_t e,
                            const T* valid, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = out + r * (e + 1);
    if (valid[r] == T(0)) {
      std::fill(row, row + e + 1, T(0));
      continue;
    }
    row[0] = T(1);
    std::copy(v + r * stride, v + r * stride + e, row + 1);
  }
}

template <typename T>
TokenRows<T> token_rows(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1),
          t.size(2) == 1 ? t.size(3) : t.stride(2)};
}

// Split each of `heads` heads into this many contiguous token ranges so that
// every thread has work even when B H is smaller than the thread count.
inline int64_t splits_per_head(int64_t heads, int64_t blocks) {
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = (threads + heads - 1) / heads;
  return std::max<int64_t>(1, std::min(wanted, blocks));
}

// Ceil division for block counts.
inline int64_t blocks_of(int64_t total, int64_t block) {
  return (total + block - 1) / block;
}

// Tokens [begin, end) of range `split` of `splits` over `tokens` tokens, in
// whole blocks of `block` (the last range takes the tail).
struct TokenRange {
  int64_t begin, end;
};

inline TokenRange split_range(int64_t tokens, int64_t block, int64_t split,
                              int64_t splits) {
  const int64_t blocks = blocks_of(tokens, block);
  return {std::min(tokens, split * blocks / splits * block),
          std::min(tokens, (split + 1) * blocks / splits * block)};
}

}  // namespace taylorshift::cpu
