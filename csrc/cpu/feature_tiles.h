// The feature maps of the efficient algorithm (docs/math.md §3, features.h)
// built for a chunk of tokens at once, feature-major: the tile is F x rows
// (row stride ld), row f holding feature f of every token of the chunk, so
// that every feature row is a product of two token rows of the chunk's
// transposed q or k, a contiguous loop the compiler vectorises fully; and the
// gradient through them, written the same way. The CPU efficient kernels
// (efficient.cpp) build their tiles with these; tests/cpp checks them.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../features.h"
#include "common.h"

namespace taylorshift::cpu {

// The feature-major tiles, one loop per feature row over the chunk's tokens;
// xt is the chunk's q or k transposed (d x rows, row stride ld), the tile F x
// rows with row stride ld.

// What the build of a tile also computes from each feature row f while the
// row is in registers, instead of a second pass over the tile:
// dots[f] = sum_r row[r] dot_with[r] (the state column that BLAS leaves out,
// see ChunkSum), or weighted[r] += weights[f * weight_stride] row[r] for
// f >= 1 (a state column applied to every token).
template <typename T>
struct RowExtras {
  const T* dot_with = nullptr;
  T* dots = nullptr;
  const T* weights = nullptr;
  int64_t weight_stride = 0;
  T* weighted = nullptr;
};

// Row f of a tile: out[r] = value(r) for the chunk's tokens, and the extras.
template <typename T, typename Value>
inline void write_feature_row(T* out, int64_t rows, int64_t f,
                              const RowExtras<T>& extras, Value value) {
  if (extras.dots != nullptr) {
    const T* y = extras.dot_with;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t r = 0; r < rows; ++r) {
      const T x = value(r);
      out[r] = x;
      sum += x * y[r];
    }
    extras.dots[f] = sum;
  } else if (extras.weighted != nullptr && f > 0) {
    const T w = extras.weights[f * extras.weight_stride];
    T* acc = extras.weighted;
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) {
      const T x = value(r);
      out[r] = x;
      acc[r] += w * x;
    }
  } else {
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) out[r] = value(r);
  }
}

// psi of a chunk of keys: row 0 m_j (the key's mask, 1 or 0), rows 1..d k_l,
// the pair rows k_l k_m. xt holds zeros for masked keys, so their columns
// are zero throughout.
template <typename T>
TS_VECTOR_CLONES void key_feature_tile(const T* xt, const T* valid, int64_t d,
                                       int64_t rows, int64_t ld, T* tile,
                                       RowExtras<T> extras) {
  int64_t f = 0;
  write_feature_row(tile, rows, f++, extras,
                    [&](int64_t r) { return valid[r]; });
  for (int64_t l = 0; l < d; ++l, ++f) {
    const T* x = xt + l * ld;
    write_feature_row(tile + f * ld, rows, f, extras,
                      [&](int64_t r) { return x[r]; });
  }
  for (int64_t l = 0; l < d; ++l) {
    const T* x = xt + l * ld;
    for (int64_t m = l; m < d; ++m, ++f) {
      const T* y = xt + m * ld;
      write_feature_row(tile + f * ld, rows, f, extras,
                        [&](int64_t r) { return x[r] * y[r]; });
    }
  }
}

// phi of a chunk of queries: row 0 c, rows 1..d b q_l, the pair rows
// a omega_lm q_l q_m (omega 1 on the diagonal, 2 off it).
template <typename T>
TS_VECTOR_CLONES void query_feature_tile(const T* xt, int64_t d, int64_t rows,
                                         int64_t ld, T a, T b, T c, T* tile,
                                         RowExtras<T> extras) {
  int64_t f = 0;
  write_feature_row(tile, rows, f++, extras, [&](int64_t) { return c; });
  for (int64_t l = 0; l < d; ++l, ++f) {
    const T* x = xt + l * ld;
    write_feature_row(tile + f * ld, rows, f, extras,
                      [&](int64_t r) { return b * x[r]; });
  }
  for (int64_t l = 0; l < d; ++l) {
    const T* x = xt + l * ld;
    for (int64_t m = l; m < d; ++m, ++f) {
      const T weight = m == l ? a : T(2) * a;
      const T* y = xt + m * ld;
      write_feature_row(tile + f * ld, rows, f, extras,
                        [&](int64_t r) { return weight * x[r] * y[r]; });
    }
  }
}

// The gradient through the features of a chunk, feature-major. g holds one
// gradient row per feature from row 1 on (g_lin = rows 1..d, then the pair
// rows); for each token, with pair weights s_lm = `diagonal` on the diagonal
// and `off_diagonal` off it,
//   grad_l = linear g_l + 2 diagonal g_ll x_l + off_diagonal sum_(m != l)
//            g_(min,max) x_m.
// Queries use (linear, diagonal, off_diagonal) = (b, a, 2a), keys (1, 1, 1).
// Tokens go in blocks of kGradientBlock, so that the block's slices of xt and
// grad_t (d x 64 each) stay in L1 while every pair row streams past once.
template <typename T>
TS_VECTOR_CLONES void feature_gradient_tile(const T* g, const T* xt, int64_t d,
                                            int64_t rows, int64_t ld, T linear,
                                            T diagonal, T off_diagonal,
                                            T* grad_t) {
  constexpr int64_t kGradientBlock = 64;
  const T two_diagonal = T(2) * diagonal;
  for (int64_t r0 = 0; r0 < rows; r0 += kGradientBlock) {
    const int64_t n = std::min(kGradientBlock, rows - r0);
    for (int64_t l = 0; l < d; ++l) {
      const T* gl = g + l * ld + r0;
      T* out = grad_t + l * ld + r0;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) out[r] = linear * gl[r];
    }
    const T* gp = g + d * ld + r0;
    for (int64_t l = 0; l < d; ++l) {
      const T* xl = xt + l * ld + r0;
      T* out_l = grad_t + l * ld + r0;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) out_l[r] += two_diagonal * gp[r] * xl[r];
      gp += ld;
      for (int64_t m = l + 1; m < d; ++m, gp += ld) {
        const T* xm = xt + m * ld + r0;
        T* out_m = grad_t + m * ld + r0;
#pragma omp simd
        for (int64_t r = 0; r < n; ++r) {
          const T scaled = off_diagonal * gp[r];
          out_l[r] += scaled * xm[r];
          out_m[r] += scaled * xl[r];
        }
      }
    }
  }
}

}  // namespace taylorshift::cpu
