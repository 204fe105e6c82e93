// Index arithmetic and scalar formulas shared by the CPU and CUDA kernels.
//
// The efficient algorithm (docs/math.md §3) works with a feature map of size
// F = 1 + d + d(d+1)/2 per token for the order-2 polynomial. On the key side
// the features are
//     psi(k) = [ 1 | k_0 .. k_{d-1} | k_l k_m for l <= m ]
// and on the query side, with the Taylor coefficients and the symmetric-pair
// weight omega (1 on the diagonal, 2 off it) folded in,
//     phi(q) = [ c | b q_0 .. b q_{d-1} | a omega_lm q_l q_m for l <= m ]
// so that phi(q) . psi(k) = a (q.k)^2 + b (q.k) + c = f(q.k). The pairs are
// ordered row by row: (0,0) (0,1) .. (0,d-1) (1,1) .. (d-1,d-1). Order k in
// general (causal-and-order spec §1) has the monomials of degree <= k with
// sorted indices, C(d + k, k) of them, in blocks by degree: order 1 stops
// after the linear block, order 3 appends the triples l <= m <= n with
// query weight c_3 multinomial(3; lmn). The CPU kernels build these maps for
// a chunk of tokens at once (cpu/feature_tiles.h); the CUDA kernels, order 2
// only, for a tile of features.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TS_HOST_DEVICE __host__ __device__ __forceinline__
#define TS_UNROLL _Pragma("unroll")
#else
#define TS_HOST_DEVICE inline
#define TS_UNROLL
#endif

// Placed before a host-device template that the host also instantiates with
// host-only types (c10::SymInt): nvcc would warn about the device code of
// those instantiations, which it never emits.
#if defined(__CUDACC__)
#define TS_HOST_ONLY_TYPES_OK _Pragma("nv_exec_check_disable")
#else
#define TS_HOST_ONLY_TYPES_OK
#endif

namespace taylorshift {

// Number of symmetric pairs (l, m) with l <= m.
// Templates so that the Meta kernels count with symbolic sizes (c10::SymInt).
TS_HOST_ONLY_TYPES_OK
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
TS_HOST_ONLY_TYPES_OK
template <typename Int>
TS_HOST_DEVICE Int feature_count(Int d) {
  return pair_count(d) + d + 1;
}

// Features of order k (causal-and-order spec §1): the monomials of degree
// <= k in d variables with sorted indices, C(d + k, k) of them. Built as
// C(d + i, i) = C(d + i - 1, i - 1) (d + i) / i, exact at every step.
TS_HOST_ONLY_TYPES_OK
template <typename Int>
TS_HOST_DEVICE Int feature_count(Int d, int order) {
  Int count = Int(1);
  for (int i = 1; i <= order; ++i) count = count * (d + i) / i;
  return count;
}

// Position of the first feature of degree 3 (order 3): after the constant,
// linear and pair features.
TS_HOST_DEVICE int64_t triple_feature_offset(int64_t d) {
  return feature_count(d);
}

// The weight polynomial f(x) = c_k x^k + ... + c_1 x + c_0 of order k that
// replaces exp: by default the Taylor polynomial of exp of order 2,
// 1 + x + x^2 / 2 (the paper's (a, b, c) = (c_2, c_1, c_0)). Coefficients
// are stored highest degree first, coefficient[0] = c_k, ...,
// coefficient[k] = c_0, the order Horner's rule reads them in. A fixed
// capacity keeps the struct trivially copyable, so a CUDA kernel takes it by
// value in its arguments.
constexpr int kMaxOrder = 8;

template <typename T>
struct Polynomial {
  int order = 2;
  T coefficient[kMaxOrder + 1] = {T(0.5), T(1), T(1)};

  // c_n, the coefficient of x^n.
  TS_HOST_DEVICE T of_degree(int n) const { return coefficient[order - n]; }

  template <typename U>
  TS_HOST_DEVICE Polynomial<U> cast() const {
    Polynomial<U> out;
    out.order = order;
    for (int n = 0; n <= kMaxOrder; ++n) out.coefficient[n] = U(coefficient[n]);
    return out;
  }

  // The same polynomial as one of order `to` >= order: leading zero
  // coefficients, which Horner's rule passes exactly for finite x (0 x + 0 =
  // 0, then 0 x + c_k = c_k), so a loop of `to` steps without exits gives
  // the same value.
  TS_HOST_DEVICE Polynomial padded(int to) const {
    Polynomial out;
    out.order = to;
    for (int n = 0; n <= kMaxOrder; ++n)
      out.coefficient[n] =
          n < to - order || n > to ? T(0) : coefficient[n - (to - order)];
    return out;
  }
};

// f(x) by Horner's rule, f = (..(c_k x + c_{k-1}) x + ..) x + c_0: k
// multiply-adds. `order` is f.order, or the same value as a compile-time
// constant (std::integral_constant) where a caller dispatches on it, so that
// the loop unrolls inside a vectorised loop. The loop runs to kMaxOrder with
// an exit, not to `order`, so that CUDA unrolls it and reads the
// coefficients from the kernel's argument space rather than from a local
// copy indexed at run time.
template <typename T, typename Order = int>
TS_HOST_DEVICE T taylor_weight(T x, const Polynomial<T>& f, Order order) {
  T w = f.coefficient[0];
  TS_UNROLL
  for (int n = 1; n <= kMaxOrder; ++n) {
    if (n > int(order)) break;
    w = w * x + f.coefficient[n];
  }
  return w;
}
template <typename T>
TS_HOST_DEVICE T taylor_weight(T x, const Polynomial<T>& f) {
  return taylor_weight(x, f, f.order);
}

// f'(x) = sum_n n c_n x^(n-1) by Horner's rule on the derivative's
// coefficients (k - i) coefficient[i], i = 0 .. k - 1: k - 1 multiply-adds.
template <typename T, typename Order = int>
TS_HOST_DEVICE T taylor_weight_grad(T x, const Polynomial<T>& f, Order order) {
  T g = T(int(order)) * f.coefficient[0];
  TS_UNROLL
  for (int n = 1; n < kMaxOrder; ++n) {
    if (n >= int(order)) break;
    g = g * x + T(int(order) - n) * f.coefficient[n];
  }
  return g;
}
template <typename T>
TS_HOST_DEVICE T taylor_weight_grad(T x, const Polynomial<T>& f) {
  return taylor_weight_grad(x, f, f.order);
}

// Blocked token loops: [begin, end) of block `block` of size `block_size`.
TS_HOST_DEVICE int64_t block_end(int64_t begin, int64_t block_size,
                                 int64_t total) {
  return begin + block_size < total ? begin + block_size : total;
}

}  // namespace taylorshift
