// Helpers of the CPU kernels: row-major matrix products on raw buffers, the
// mask of one (batch, head), per-head views and the dtype policy.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../kernel_blocks.h"

namespace taylorshift::cpu {

// Token block sizes. A block of 64 queries against 256 keys keeps the score
// tile (64 x 256) and the operand tiles in L2 while giving BLAS products of
// useful size; efficient-path chunks of 64 tokens keep the feature tile
// (64 x F, F = 2145 at d = 64) under 1.1 MB in float64.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 256;
constexpr int64_t kFeatureChunk = 64;

// C = op(A) op(B), or C += op(A) op(B) when `accumulate`, on raw row-major
// buffers: op(A) is m x k, op(B) is k x n, leading dimensions lda, ldb, ldc.
// The buffers are wrapped (not copied) as tensors so the product runs in
// ATen's BLAS; inside at::parallel_for it runs on the calling thread.
template <typename T>
void matmul(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k,
            const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
            bool accumulate) {
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
  const at::Tensor lhs = wrap(a, m, k, lda, transpose_a);
  const at::Tensor rhs = wrap(b, k, n, ldb, transpose_b);
  if (accumulate)
    out.addmm_(lhs, rhs);
  else
    at::mm_out(out, lhs, rhs);
}

// One (batch, head) of contiguous (B, H, tokens, dim) tensors, row-major.
template <typename T>
struct HeadTensors {
  const T* q;  // (M, d)
  const T* k;  // (N, d)
  const T* v;  // (N, e)
  int64_t queries, keys, head_dim, value_dim;
};

template <typename T>
HeadTensors<T> head(const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, int64_t bh) {
  const int64_t M = q.size(2), N = k.size(2), d = q.size(3), e = v.size(3);
  return {q.data_ptr<T>() + bh * M * d,
          k.data_ptr<T>() + bh * N * d,
          v.data_ptr<T>() + bh * N * e,
          M,
          N,
          d,
          e};
}

// float32 and float64 are computed in their own type; float16 and bfloat16
// are computed in float32, so every accumulation is at least float32.
inline at::Tensor to_compute(const at::Tensor& t) {
  return t.to(accumulate_dtype(t)).contiguous();
}

}  // namespace taylorshift::cpu
