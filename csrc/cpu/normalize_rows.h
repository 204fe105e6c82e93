// The cosine-logit factors of normalize_rows, y = f x / |x| for one row x
// of length d, and their backward: the row functions that normalize.cpp
// (taylorshift::normalize_rows) and the efficient kernels (which normalise
// q and k chunk by chunk, efficient.cpp) both run: one implementation of the
// formula. (The two may still differ in the last bit: the compiler may sum
// |z|^2 in a different order for each x86 level it compiles them for.)
//
// Forward, per row (docs: the comment of normalize_rows in csrc/ops.cpp):
//   s = 2^(k-1) for max_l |x_l| in [2^(k-1), 2^k)     (1 for a zero row)
//   z = x / s        exact (a power-of-two scaling only moves exponents);
//                    max |z_l| lies in [1, 2), so |z|^2 in [1, 4d] can
//                    neither overflow nor underflow
//   n = max(|z|, 1)  = |z|; 1 for a zero row, whose y is then 0
//   y = z (f / n)    = f x / |x|, rounded to x's dtype once
// |x|^2 itself overflows for |x| above ~1e19 in float32 (256 in float16),
// and a clamp like 1e-12 underflows in float16. 1 / s is a power of two too,
// so z = x (1 / s) is the same exact value wherever 1 / s is finite; below
// s = 2^-127 (float32) it is not, and z is formed by division.
//
// Backward: with u = z / n = x / |x| and y = f u,
//   dy / dx = (f / |x|) (I - u u^T),   dy / df = u
// so dx = (f / n) (g - u (u . g)) / s and df = sum over rows of u . g. At a
// zero row n = 1 and u = 0, which gives dx = f g: the identity gradient of the
// composite it replaced (amax, divide, clamped norm, divide).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"

namespace taylorshift::cpu {

// The row of d elements at `src` (element step `step`) in the accumulation
// dtype A.
template <typename T, typename A, typename Dim>
TS_INLINE void load_row(const T* src, int64_t step, Dim d, A* row) {
  if (step == 1) {
    for (int64_t l = 0; l < d; ++l) row[l] = static_cast<A>(src[l]);
  } else {
    for (int64_t l = 0; l < d; ++l) row[l] = static_cast<A>(src[l * step]);
  }
}

// fn(d) with d as a compile-time constant for the common head dims, so that
// the per-row loops below unroll completely (no vector-loop prologue and
// remainder per row, reductions as fixed trees: about 3 times faster at
// d = 32); other lengths at run time.
template <typename Fn>
void with_row_length(int64_t d, Fn&& fn) {
  switch (d) {
    case 16:
      return fn(std::integral_constant<int64_t, 16>{});
    case 32:
      return fn(std::integral_constant<int64_t, 32>{});
    case 64:
      return fn(std::integral_constant<int64_t, 64>{});
    case 128:
      return fn(std::integral_constant<int64_t, 128>{});
    default:
      return fn(d);
  }
}

// The per-row steps are plain loops that the compiler vectorises, inlined
// into their callers' loops over rows (normalize.cpp's tasks, compiled per
// x86 level with TS_VECTOR_CLONES, and efficient.cpp's chunk loads). The
// rows are short (d = 32, 64): per-row calls, and at::vec (its scalar
// default in an extension built without -mavx2), cost more than the
// arithmetic.

// 2^(k-1) for x in [2^(k-1), 2^k), x > 0 and finite: for a normal x, x with
// its mantissa bits cleared; frexp for a subnormal one.
template <typename A>
TS_INLINE A power_of_two_floor(A x) {
  using Bits = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  if (x < std::numeric_limits<A>::min()) {
    int k;
    std::frexp(x, &k);
    return std::ldexp(A(1), k - 1);
  }
  constexpr Bits kExponent =
      sizeof(A) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits bits;
  std::memcpy(&bits, &x, sizeof(A));
  bits &= kExponent;
  std::memcpy(&x, &bits, sizeof(A));
  return x;
}

// Scales the row to z = x / s in place and returns s (see above).
template <typename A, typename Dim>
TS_INLINE A scale_to_unit_range(A* row, Dim d) {
  A largest = 0;
#pragma omp simd reduction(max : largest)
  for (int64_t l = 0; l < d; ++l) largest = std::max(largest, std::abs(row[l]));
  if (!(largest > A(0) && std::isfinite(largest))) return A(1);
  const A s = power_of_two_floor(largest);
  // Exact either way: a power of two only moves exponents. Below s = 2^-127
  // (float32) 1 / s is not finite, and z is formed by division.
  const A inverse = A(1) / s;
  if (std::isfinite(inverse)) {
#pragma omp simd
    for (int64_t l = 0; l < d; ++l) row[l] *= inverse;
  } else {
#pragma omp simd
    for (int64_t l = 0; l < d; ++l) row[l] /= s;
  }
  return s;
}

// a . b. For a row length known at compile time and a whole number of
// 64-byte vectors, the products add into one vector of partial sums,
// summed by a pairwise tree at the end; a running sum over the row would
// compile to d dependent additions, the row's longest chain.
template <typename A, typename Dim>
TS_INLINE A row_dot(const A* a, const A* b, Dim d) {
  constexpr int kLanes = 64 / int(sizeof(A));
  if constexpr (!std::is_same_v<Dim, int64_t>) {
    if constexpr (Dim::value % kLanes == 0) {
      typedef A Vector __attribute__((vector_size(64)));
      Vector sums = {};
      for (int64_t l = 0; l < d; l += kLanes) {
        Vector x, y;
        std::memcpy(&x, a + l, sizeof(Vector));
        std::memcpy(&y, b + l, sizeof(Vector));
        sums += x * y;
      }
      A lanes[kLanes];
      std::memcpy(lanes, &sums, sizeof(Vector));
      for (int width = kLanes / 2; width >= 1; width /= 2)
        for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
      return lanes[0];
    }
  }
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t l = 0; l < d; ++l) sum += a[l] * b[l];
  return sum;
}

// n = max(|z|, 1).
template <typename A, typename Dim>
TS_INLINE A clamped_norm(const A* z, Dim d) {
  return std::max(std::sqrt(row_dot(z, z, d)), A(1));
}

// y = f x / |x| for the row of d elements at x (element step `step`),
// through `row`, a d-long buffer of the accumulation dtype A.
template <typename T, typename A, typename Dim>
TS_INLINE void normalize_row(const T* x, int64_t step, Dim d, A factor, A* row,
                             T* out) {
  load_row(x, step, d, row);
  scale_to_unit_range(row, d);
  const A r = factor / clamped_norm(row, d);
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) out[c] = static_cast<T>(row[c] * r);
}

// The backward of normalize_row for the gradient row g (already in A): dx
// written to out; returns u . g (the row's share of df). u is a d-long
// buffer of A.
template <typename T, typename A, typename Dim>
TS_INLINE A normalize_row_backward(const T* x, int64_t step, const A* g, Dim d,
                                   A factor, A* u, T* out) {
  load_row(x, step, d, u);
  const A s = scale_to_unit_range(u, d);
  const A n = clamped_norm(u, d);
  // u = z / n (times 1 / n: n is in [1, 2 sqrt(d)]), and dot = u . g.
  const A inverse_n = A(1) / n;
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) u[c] *= inverse_n;
  const A dot = row_dot(u, g, d);
  // dx = (f / n) (g - u dot) / s; the division by the power of two s is
  // exact (see scale_to_unit_range).
  const A r = factor / n;
  const A inverse_s = A(1) / s;
  if (std::isfinite(inverse_s)) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c)
      out[c] = static_cast<T>((g[c] - u[c] * dot) * r * inverse_s);
  } else {
    for (int64_t c = 0; c < d; ++c)
      out[c] = static_cast<T>((g[c] - u[c] * dot) * r / s);
  }
  return dot;
}

}  // namespace taylorshift::cpu
