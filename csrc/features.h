// Index arithmetic and scalar formulas shared by the CPU and CUDA kernels.
//
// The efficient algorithm (docs/math.md §3) works with a feature map of size
// F = 1 + d + d(d+1)/2 per token. On the key side the features are
//     psi(k) = [ 1 | k_0 .. k_{d-1} | k_l k_m for l <= m ]
// and on the query side, with the Taylor coefficients and the symmetric-pair
// weight omega (1 on the diagonal, 2 off it) folded in,
//     phi(q) = [ c | b q_0 .. b q_{d-1} | a omega_lm q_l q_m for l <= m ]
// so that phi(q) . psi(k) = a (q.k)^2 + b (q.k) + c = f(q.k). The pairs are
// ordered row by row: (0,0) (0,1) .. (0,d-1) (1,1) .. (d-1,d-1).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TS_HOST_DEVICE inline
#endif

namespace taylorshift {

// Number of symmetric pairs (l, m) with l <= m.
// Templates so that the Meta kernels count with symbolic sizes (c10::SymInt).
template <typename Int>
TS_HOST_DEVICE Int pair_count(Int d) {
  return d * (d + 1) / 2;
}

// Position of pair (l, l): row l starts after the d + (d-1) + ... + (d-l+1)
// pairs of the rows before it.
TS_HOST_DEVICE int64_t pair_row_start(int64_t l, int64_t d) {
  return l * d - l * (l - 1) / 2;
}

TS_HOST_DEVICE int64_t pair_index(int64_t l, int64_t m, int64_t d) {
  return pair_row_start(l, d) + (m - l);
}

// Offsets of the three blocks inside a feature vector of size feature_count.
TS_HOST_DEVICE int64_t linear_feature_offset() { return 1; }
TS_HOST_DEVICE int64_t pair_feature_offset(int64_t d) { return 1 + d; }
template <typename Int>
TS_HOST_DEVICE Int feature_count(Int d) {
  return pair_count(d) + d + 1;
}

// f(x) = a x^2 + b x + c, the 2nd-order Taylor polynomial of exp by default.
template <typename T>
TS_HOST_DEVICE T taylor_weight(T x, T a, T b, T c) {
  return (a * x + b) * x + c;
}

// f'(x) = 2 a x + b.
template <typename T>
TS_HOST_DEVICE T taylor_weight_grad(T x, T a, T b) {
  return T(2) * a * x + b;
}

// Blocked token loops: [begin, end) of block `block` of size `block_size`.
TS_HOST_DEVICE int64_t block_end(int64_t begin, int64_t block_size,
                                 int64_t total) {
  return begin + block_size < total ? begin + block_size : total;
}

// m_j psi(k_j) for the key's mask m_j: psi(k) if the key is valid, zeros if
// it is masked: out[0 .. F). Zero by selection, not by multiplying with m_j,
// because a masked key may hold anything (padding is often uninitialised,
// NaN or inf) and 0 * NaN = NaN would spread it into the whole state.
template <typename T>
TS_HOST_DEVICE void write_key_features(const T* k, int64_t d, bool valid,
                                       T* out) {
  if (!valid) {
    for (int64_t f = 0; f < feature_count(d); ++f) out[f] = T(0);
    return;
  }
  out[0] = T(1);
  for (int64_t l = 0; l < d; ++l) out[linear_feature_offset() + l] = k[l];
  T* pairs = out + pair_feature_offset(d);
  for (int64_t l = 0; l < d; ++l)
    for (int64_t m = l; m < d; ++m) *pairs++ = k[l] * k[m];
}

// phi(q) with the Taylor coefficients and omega folded in: out[0 .. F).
template <typename T>
TS_HOST_DEVICE void write_query_features(const T* q, int64_t d, T a, T b, T c,
                                         T* out) {
  out[0] = c;
  for (int64_t l = 0; l < d; ++l) out[linear_feature_offset() + l] = b * q[l];
  T* pairs = out + pair_feature_offset(d);
  for (int64_t l = 0; l < d; ++l) {
    *pairs++ = a * q[l] * q[l];
    const T two_a_q = T(2) * a * q[l];
    for (int64_t m = l + 1; m < d; ++m) *pairs++ = two_a_q * q[m];
  }
}

// Gradient of sum_(l<=m) g_lm * s_lm * x_l x_m with respect to x, where the
// pair weight s_lm is `diagonal` for l = m and `off_diagonal` otherwise:
//   d/dx_l = 2 diagonal g_ll x_l + off_diagonal sum_(m != l) g_(min,max) x_m.
// Queries use s = a omega (diagonal a, off-diagonal 2a), keys s = 1.
template <typename T>
TS_HOST_DEVICE void add_pair_gradient(const T* g_pairs, const T* x, int64_t d,
                                      T diagonal, T off_diagonal, T* grad_x) {
  for (int64_t l = 0; l < d; ++l) {
    T grad_l = T(2) * diagonal * (*g_pairs++) * x[l];
    const T off_x_l = off_diagonal * x[l];
    for (int64_t m = l + 1; m < d; ++m) {
      const T g = *g_pairs++;
      grad_l += off_diagonal * g * x[m];
      grad_x[m] += g * off_x_l;
    }
    grad_x[l] += grad_l;
  }
}

}  // namespace taylorshift
