// Building blocks every algorithm kernel shares, on the CPU (csrc/cpu) and on
// the GPU (csrc/cuda, and its host emulation): which keys a query may see
// (the mask view), how many it sees (N_i) and the output scale sigma_i that
// follows from it, the accumulation dtype, and the options that arrive from
// the operator schemas. The feature maps and the polynomial are in
// features.h. One definition each; docs/math.md §1 states the semantics.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "features.h"

namespace taylorshift {

// The weight polynomial that replaces exp (features.h), in double as the
// schemas give it; kernels cast it to their accumulation dtype.
using Coefficients = Polynomial<double>;

// Everything below the schema boundary that is not a tensor: the operator
// schemas spell these out as (bool causal, bool output_scale,
// float[] coefficients) for Python users; every C++ layer under them (C++
// API, autograd, kernels) passes this struct instead.
struct KernelOptions {
  Coefficients coefficients;
  bool causal = false;       // query i sees keys j <= i (direct only)
  bool output_scale = true;  // y_i *= sigma_i = sqrt(N_i / d)
};

// Tokens per chunk of the causal efficient form (csrc/causal.cpp,
// cpu/causal.cpp): the triangle's C (d + e + 1) multiply-adds per token are
// a quarter of the state's 2 F (e + 1) at d = 32, and a CPU feature tile
// (F x C float32, 287 KB at d = 32) stays in L2 between its build and its
// products.
constexpr int64_t kCausalChunk = 128;

// The polynomial of a schema's `float[] coefficients`, highest degree first:
// k + 1 numbers for order k, 1 <= k <= kMaxOrder.
inline Coefficients polynomial_of(c10::ArrayRef<double> coefficients) {
  const int64_t order = int64_t(coefficients.size()) - 1;
  TORCH_CHECK_VALUE(
      order >= 1 && order <= kMaxOrder,
      "taylorshift: coefficients must list the k + 1 coefficients of the "
      "weight polynomial, highest degree first, for an order k from 1 to ",
      kMaxOrder, " (the kernels' limit); got ", coefficients.size(),
      " coefficients");
  Coefficients f;
  f.order = int(order);
  for (int n = 0; n <= kMaxOrder; ++n)
    f.coefficient[n] = n <= order ? coefficients[n] : 0.0;
  return f;
}

// The schema's list for a polynomial (the inverse of polynomial_of).
inline std::vector<double> coefficient_list(const Coefficients& f) {
  return std::vector<double>(f.coefficient, f.coefficient + f.order + 1);
}

// The options of a schema's flat tail (causal, output_scale, coefficients);
// the efficient operators' schemas have no causal and pass false.
inline KernelOptions schema_options(bool causal, bool output_scale,
                                    c10::ArrayRef<double> coefficients) {
  return {polynomial_of(coefficients), causal, output_scale};
}

// States, denominators and accumulators are float32 for every floating dtype
// but float64, which keeps float64 (gradcheck). float16 and bfloat16 inputs
// are therefore computed with float32 accumulation on every device.
inline at::ScalarType accumulate_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}
inline at::ScalarType accumulate_dtype(const at::Tensor& t) {
  return accumulate_dtype(t.scalar_type());
}

// normalize_rows' per-head factors f_h (H,) in x's accumulation dtype, all 1
// without a factor; the gradient for them is returned in the factor's own
// dtype (the accumulation dtype without one: the gradient at f_h = 1).
inline at::Tensor normalize_factors(const std::optional<at::Tensor>& factor,
                                    const at::Tensor& x) {
  const auto acc = x.options().dtype(accumulate_dtype(x));
  return factor ? factor->to(acc).contiguous() : at::ones({x.size(1)}, acc);
}
inline at::ScalarType factor_grad_dtype(const std::optional<at::Tensor>& factor,
                                        const at::Tensor& x) {
  return factor ? factor->scalar_type() : accumulate_dtype(x);
}

// Which keys query i of (batch b, head h) may attend to: m_ij of docs/math.md
// §1. Key padding (B, N) and the bool attn_mask (B, H, M, N) are read through
// their strides, so an expanded (stride-0) mask is never copied; causal is
// top-left aligned (j <= i), as SDPA's is_causal. Trivially copyable, so a
// CUDA kernel takes it by value.
struct Mask {
  const bool* key_padding = nullptr;  // True = padding (ignored)
  int64_t kp_stride_b = 0, kp_stride_n = 0;
  const bool* attn = nullptr;  // True = not allowed to attend
  int64_t am_stride_b = 0, am_stride_h = 0, am_stride_i = 0, am_stride_j = 0;
  bool causal = false;

  TS_HOST_DEVICE bool key_valid(int64_t b, int64_t j) const {
    return key_padding == nullptr ||
           !key_padding[b * kp_stride_b + j * kp_stride_n];
  }

  TS_HOST_DEVICE bool allowed(int64_t b, int64_t h, int64_t i,
                              int64_t j) const {
    if (causal && j > i) return false;
    if (!key_valid(b, j)) return false;
    return attn == nullptr || !attn[b * am_stride_b + h * am_stride_h +
                                    i * am_stride_i + j * am_stride_j];
  }

  // Keys at and past this index are invisible to every query before
  // `query_end`: causal tiles skip them.
  TS_HOST_DEVICE int64_t key_limit(int64_t query_end, int64_t keys) const {
    return causal && query_end < keys ? query_end : keys;
  }

  // N_i, the number of keys row i may attend to.
  TS_HOST_DEVICE int64_t count_allowed(int64_t b, int64_t h, int64_t i,
                                       int64_t keys) const {
    int64_t count = 0;
    for (int64_t j = 0; j < key_limit(i + 1, keys); ++j)
      count += allowed(b, h, i, j) ? 1 : 0;
    return count;
  }
};

// The mask view of the operator arguments; the tensors must outlive it.
inline Mask make_mask(const std::optional<at::Tensor>& key_padding_mask,
                      const std::optional<at::Tensor>& attn_mask, bool causal) {
  Mask mask;
  mask.causal = causal;
  if (key_padding_mask) {
    mask.key_padding = key_padding_mask->data_ptr<bool>();
    mask.kp_stride_b = key_padding_mask->stride(0);
    mask.kp_stride_n = key_padding_mask->stride(1);
  }
  if (attn_mask) {
    mask.attn = attn_mask->data_ptr<bool>();
    mask.am_stride_b = attn_mask->stride(0);
    mask.am_stride_h = attn_mask->stride(1);
    mask.am_stride_i = attn_mask->stride(2);
    mask.am_stride_j = attn_mask->stride(3);
  }
  return mask;
}

// sigma_i = sqrt(N_i / d): the paper's output scaling (docs/math.md §1), with
// N_i the number of keys row i may attend to. Without output scaling sigma_i
// = 1.
template <typename T>
TS_HOST_DEVICE T output_scale_factor(bool output_scale, int64_t valid_keys,
                                     int64_t head_dim) {
  return output_scale ? T(std::sqrt(double(valid_keys) / double(head_dim)))
                      : T(1);
}

// 1/den, defined as 0 for a row whose keys are all masked (den == 0): such a
// row has no defined output, and the kernels return zeros for it.
template <typename T>
TS_HOST_DEVICE T safe_reciprocal(T den) {
  return den != T(0) ? T(1) / den : T(0);
}

}  // namespace taylorshift
