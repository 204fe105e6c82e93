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

// The weight of each feature of the tiles, by degree, for polynomials of
// order 1 to 3 (causal-and-order spec §1): phi(q) . psi(k) = f(q . k) when
// the query side's monomial q^alpha of degree n carries c_n times the
// multinomial coefficient of alpha (pairs l < m: 2; triples with 2 or 3
// distinct indices: 3 or 6) and the key side's carries 1.
template <typename T>
struct FeatureWeights {
  int order = 2;
  T constant = 1, linear = 1;
  T pair[2] = {1, 1};       // l = m, l < m
  T triple[3] = {1, 1, 1};  // 1, 2, 3 distinct indices

  static FeatureWeights keys(int order) {
    FeatureWeights w;
    w.order = order;
    return w;
  }
  static FeatureWeights queries(const Polynomial<T>& f) {
    FeatureWeights w;
    w.order = f.order;
    w.constant = f.of_degree(0);
    w.linear = f.of_degree(1);
    if (f.order >= 2) {
      const T c2 = f.of_degree(2);
      w.pair[0] = c2;
      w.pair[1] = T(2) * c2;
    }
    if (f.order >= 3) {
      const T c3 = f.of_degree(3);
      w.triple[0] = c3;
      w.triple[1] = T(3) * c3;
      w.triple[2] = T(6) * c3;
    }
    return w;
  }
  T of_triple(int64_t l, int64_t m, int64_t n) const {
    return triple[(l != m) + (m != n)];
  }
};

// The degree-3 rows (order 3), triples l <= m <= n in lexicographic order
// after the pairs: row value weight x_l x_m x_n.
template <typename T>
inline void triple_feature_rows(const T* xt, int64_t d, int64_t rows,
                                int64_t ld, const FeatureWeights<T>& weights,
                                bool weighted, T* tile, int64_t& f,
                                const RowExtras<T>& extras) {
  for (int64_t l = 0; l < d; ++l) {
    const T* x = xt + l * ld;
    for (int64_t m = l; m < d; ++m) {
      const T* y = xt + m * ld;
      for (int64_t n = m; n < d; ++n, ++f) {
        const T* z = xt + n * ld;
        const T weight = weighted ? weights.of_triple(l, m, n) : T(1);
        write_feature_row(tile + f * ld, rows, f, extras, [&](int64_t r) {
          return weight * x[r] * y[r] * z[r];
        });
      }
    }
  }
}

// psi of a chunk of keys: row 0 m_j (the key's mask, 1 or 0), rows 1..d k_l,
// then for order >= 2 the pair rows k_l k_m and for order 3 the triple rows.
// xt holds zeros for masked keys, so their columns are zero throughout.
template <typename T>
TS_VECTOR_CLONES void key_feature_tile(const T* xt, const T* valid, int64_t d,
                                       int64_t rows, int64_t ld, T* tile,
                                       RowExtras<T> extras, int order) {
  int64_t f = 0;
  write_feature_row(tile, rows, f++, extras,
                    [&](int64_t r) { return valid[r]; });
  for (int64_t l = 0; l < d; ++l, ++f) {
    const T* x = xt + l * ld;
    write_feature_row(tile + f * ld, rows, f, extras,
                      [&](int64_t r) { return x[r]; });
  }
  if (order < 2) return;
  for (int64_t l = 0; l < d; ++l) {
    const T* x = xt + l * ld;
    for (int64_t m = l; m < d; ++m, ++f) {
      const T* y = xt + m * ld;
      write_feature_row(tile + f * ld, rows, f, extras,
                        [&](int64_t r) { return x[r] * y[r]; });
    }
  }
  if (order < 3) return;
  triple_feature_rows(xt, d, rows, ld, FeatureWeights<T>::keys(order), false,
                      tile, f, extras);
}

// phi of a chunk of queries: row 0 c_0, rows 1..d c_1 q_l, the pair rows
// c_2 omega_lm q_l q_m (omega 1 on the diagonal, 2 off it), the triple rows
// c_3 multinomial(3; lmn) q_l q_m q_n, as far as the weights' order goes.
template <typename T>
TS_VECTOR_CLONES void query_feature_tile(const T* xt, int64_t d, int64_t rows,
                                         int64_t ld,
                                         const FeatureWeights<T>& weights,
                                         T* tile, RowExtras<T> extras) {
  int64_t f = 0;
  const T c = weights.constant, b = weights.linear;
  write_feature_row(tile, rows, f++, extras, [&](int64_t) { return c; });
  for (int64_t l = 0; l < d; ++l, ++f) {
    const T* x = xt + l * ld;
    write_feature_row(tile + f * ld, rows, f, extras,
                      [&](int64_t r) { return b * x[r]; });
  }
  if (weights.order < 2) return;
  for (int64_t l = 0; l < d; ++l) {
    const T* x = xt + l * ld;
    for (int64_t m = l; m < d; ++m, ++f) {
      const T weight = weights.pair[m != l];
      const T* y = xt + m * ld;
      write_feature_row(tile + f * ld, rows, f, extras,
                        [&](int64_t r) { return weight * x[r] * y[r]; });
    }
  }
  if (weights.order < 3) return;
  triple_feature_rows(xt, d, rows, ld, weights, true, tile, f, extras);
}

// The gradient through the features of a chunk, feature-major. g holds one
// gradient row per feature from row 1 on (g_lin = rows 1..d, then the pair
// rows, then the triple rows); for each token, with the weights s of
// FeatureWeights (queries: the c_n and multinomials; keys: 1), the product
// rule of each monomial gives
//   grad_l = s_lin g_l + sum_(pairs lm) s_lm g_lm d(x_l x_m)/dx_l
//            + sum_(triples lmn) s_lmn g_lmn d(x_l x_m x_n)/dx_l,
// which for a pair is 2 s_ll g_ll x_l on the diagonal and s_lm g_lm x_m off
// it, and for a triple (l <= m <= n) adds x_m x_n to l, x_l x_n to m and
// x_l x_m to n (repeated indices collect their terms).
// Tokens go in blocks of kGradientBlock, so that the block's slices of xt and
// grad_t (d x 64 each) stay in L1 while every feature row streams past once.
template <typename T>
TS_VECTOR_CLONES void feature_gradient_tile(const T* g, const T* xt, int64_t d,
                                            int64_t rows, int64_t ld,
                                            const FeatureWeights<T>& weights,
                                            T* grad_t) {
  constexpr int64_t kGradientBlock = 64;
  const T linear = weights.linear, off_diagonal = weights.pair[1];
  const T two_diagonal = T(2) * weights.pair[0];
  for (int64_t r0 = 0; r0 < rows; r0 += kGradientBlock) {
    const int64_t n = std::min(kGradientBlock, rows - r0);
    for (int64_t l = 0; l < d; ++l) {
      const T* gl = g + l * ld + r0;
      T* out = grad_t + l * ld + r0;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) out[r] = linear * gl[r];
    }
    if (weights.order < 2) continue;
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
    if (weights.order < 3) continue;
    for (int64_t l = 0; l < d; ++l) {
      const T* xl = xt + l * ld + r0;
      T* out_l = grad_t + l * ld + r0;
      for (int64_t m = l; m < d; ++m) {
        const T* xm = xt + m * ld + r0;
        T* out_m = grad_t + m * ld + r0;
        for (int64_t k = m; k < d; ++k, gp += ld) {
          const T* xk = xt + k * ld + r0;
          T* out_k = grad_t + k * ld + r0;
          const T weight = weights.of_triple(l, m, k);
#pragma omp simd
          for (int64_t r = 0; r < n; ++r) {
            const T scaled = weight * gp[r];
            out_l[r] += scaled * xm[r] * xk[r];
            out_m[r] += scaled * xl[r] * xk[r];
            out_k[r] += scaled * xl[r] * xm[r];
          }
        }
      }
    }
  }
}

}  // namespace taylorshift::cpu
