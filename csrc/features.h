// Index arithmetic and scalar formulas shared by the CPU and CUDA kernels.
//
// The efficient algorithm (docs/math.md §3) works with a feature map of size
// F = 1 + d + d(d+1)/2 per token. On the key side the features are
//     psi(k) = [ 1 | k_0 .. k_{d-1} | k_l k_m for l <= m ]
// and on the query side, with the Taylor coefficients and the symmetric-pair
// weight omega (1 on the diagonal, 2 off it) folded in,
//     phi(q) = [ c | b q_0 .. b q_{d-1} | a omega_lm q_l q_m for l <= m ]
// so that phi(q) . psi(k) = a (q.k)^2 + b (q.k) + c = f(q.k). The pairs are
// ordered row by row: (0,0) (0,1) .. (0,d-1) (1,1) .. (d-1,d-1). The CPU
// kernels build these maps for a chunk of tokens at once
// (cpu/feature_tiles.h); the CUDA kernels for a tile of features.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TS_HOST_DEVICE inline
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

}  // namespace taylorshift
