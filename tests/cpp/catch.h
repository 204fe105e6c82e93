// Catch2 version 2 or 3, whichever CMake found, and the float64 ATen
// reference that the C++ tests compare against.
#pragma once

#if TAYLORSHIFT_CATCH2_MAJOR >= 3
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#else
#include <catch2/catch.hpp>
#endif

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace taylorshift::testing {

// docs/math.md §1 on logits x = q k^T, with `allowed` (B, H, M, N) or
// broadcastable: y = sigma * (W V) / rowsum(W), W = allowed * f(x), f the
// polynomial of `coefficients` (highest degree first; any order).
inline at::Tensor reference_attention(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v,
                                      const at::Tensor& allowed,
                                      bool output_scale,
                                      const std::vector<double>& coefficients) {
  const at::Tensor x = at::matmul(q, k.transpose(-1, -2));
  at::Tensor f = at::full_like(x, coefficients[0]);
  for (size_t n = 1; n < coefficients.size(); ++n) f = f * x + coefficients[n];
  const at::Tensor weights = at::where(allowed, f, 0.0);
  const at::Tensor den = weights.sum(-1, true);
  at::Tensor out = at::matmul(weights, v) / at::where(den == 0, 1.0, den);
  if (output_scale) {
    const at::Tensor valid = allowed.expand_as(x).sum(-1, true).to(q.dtype());
    out = out * (valid / q.size(-1)).sqrt();
  }
  return out;
}

// True where key j of batch b is not padding, shaped (B, 1, 1, N).
inline at::Tensor allowed_by_padding(const at::Tensor& key_padding_mask) {
  return (~key_padding_mask).unsqueeze(1).unsqueeze(1);
}

inline double max_abs_diff(const at::Tensor& x, const at::Tensor& y) {
  return (x - y).abs().max().item<double>();
}

}  // namespace taylorshift::testing
