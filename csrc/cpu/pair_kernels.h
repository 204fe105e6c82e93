// Register-blocked AVX-512 kernels for the efficient algorithm's feature
// products at order 1 and 2, with no feature tile in memory.
//
// The features of order <= 2 are the pairs of the augmented vector
// x~ = [m | x] (m = 1 for a query, the key's mask m_j for a key): pair
// (l, m), l <= m < D = d + 1, is x~_l x~_m, and in lexicographic order
// the pairs are exactly the feature order of features.h: (0, 0) the
// constant, (0, m) the linear features x_(m-1), then the products of two
// coordinates. Order 1 keeps row l = 0 only. So the three products of the
// efficient algorithm factor by the first index of the pair:
//   reduction  sum_r pairs(x~_r) y_r^T:  row (l, m) = sum_r x~_rm (x~_rl y_r)
//              (the state over keys, dS over queries);
//   application pairs(x~_r)^T S:  z_r = sum_l x~_rl (sum_(m >= l) x~_rm S_lm)
//              (the output over queries, dv over keys);
//   contraction, the gradient of pairs(x~_r) . (S dz_r) with respect to x~_r:
//              G_lm = S_lm . dz_r adds G_lm x~_rm to coordinate l and
//              G_lm x~_rl to m (dq over queries, dk over keys).
// The reduction forms w_r = x~_rl y_r once per token and first index, then
// adds x~_rm w_r into a block of rows (l, m0..m0 + NP) held in registers
// over a block of tokens; the application holds u = sum_m x~_rm S_lm for a
// few tokens in registers and adds x~_rl u per first index; the contraction
// holds G for 12 features and 2 vectors of tokens (tokens in the lanes).
// Every multiply-add is one vector FMA with a broadcast or a vector operand,
// the tile the BLAS path builds (F x tokens, one write and one read per
// feature and token) does not exist, and the state rows stream from L1/L2.
//
// The state's column 0 (the denominator's) is a scalar per feature: the
// reduction adds it as one more vector, lanes p = rows (l, m0 + p), from
// x~_r[m0 .. m0 + lanes) times x~_rl s_r; the application computes it with
// the tokens in the lanes, from the chunk transposed (pair_denominators).
//
// Weights: these kernels compute the unweighted monomials. The query side's
// feature weights (c_0, c_1, c_2 omega) scale the state's rows before an
// application and the reduced rows after a reduction (pair_weight).
//
// Vectors are GCC vector extensions of 64 bytes in functions compiled for
// x86-64-v4 (AVX-512), used only when the CPU has it (pair_kernels_fit);
// elsewhere, and for order 3 or a value width that is not a whole number of
// vectors, the efficient kernels build feature tiles and call BLAS.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../features.h"
#include "common.h"

#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && \
    !defined(__clang__)
#define TS_PAIR_KERNELS 1
#define TS_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define TS_PAIR_KERNELS 0
#endif

namespace taylorshift::cpu {

// Rows of the augmented vectors of a chunk of tokens, both ways: `rows`
// holds x~_r row by row (row stride `ld`, zero past D so that a vector read
// at any m0 < D stays inside the row; the reductions read it), `columns` its
// transpose (D x `column_stride`, row 0 the m_r, rows 1.. the chunk's x
// transposed, the layout feature_gradient_tile reads; the applications,
// contractions and denominators read it).
template <typename T>
struct AugmentedChunk {
  T* rows;
  int64_t ld;
  T* columns;
  int64_t column_stride;
};

// First indices l of the pairs of order <= `order` of D = d + 1: all D at
// order 2, only l = 0 (the constant and linear features) at order 1.
inline int64_t first_index_count(int order, int64_t D) {
  return order >= 2 ? D : 1;
}

// fn(l, m, f) for every pair (l, m) of order <= `order` of D = d + 1, with
// f its feature index, in feature order.
template <typename Fn>
void for_each_pair(int64_t d, int order, Fn&& fn) {
  const int64_t D = d + 1;
  for (int64_t l = 0, f = 0; l < first_index_count(order, D); ++l)
    for (int64_t m = l; m < D; ++m, ++f) fn(l, m, f);
}

// The weight of pair (l, m) on the query side: c_0 for (0, 0), c_1 for
// (0, m), c_2 on the diagonal and 2 c_2 off it (the multinomial of x_l x_m
// in (q . k)^2).
template <typename T>
T pair_weight(const Polynomial<T>& f, int64_t l, int64_t m) {
  if (l == 0) return f.of_degree(m == 0 ? 0 : 1);
  return (l == m ? T(1) : T(2)) * f.of_degree(2);
}

// rows x (1 + cols) in place: row (l, m) times pair_weight(l, m), over the
// pairs of order <= f.order of D = d + 1.
template <typename T>
void weight_pair_rows(const Polynomial<T>& f, int64_t d, int64_t cols, T* out) {
  for_each_pair(d, f.order, [&](int64_t l, int64_t m, int64_t index) {
    const T w = pair_weight(f, l, m);
    for (int64_t c = 0; c < cols; ++c) out[index * cols + c] *= w;
  });
}

// Whether the CPU runs the AVX-512 functions below.
inline bool avx512_available() {
#if TS_PAIR_KERNELS
  static const bool avx512 = __builtin_cpu_supports("x86-64-v4");
  return avx512;
#else
  return false;
#endif
}

// Whether the register kernels serve T, an order and a value width: a
// whole number (1, 2, 4 or 8) of 64-byte vectors per value row.
template <typename T>
bool pair_kernels_fit(int order, int64_t value_dim) {
#if TS_PAIR_KERNELS
  constexpr int64_t lanes = 64 / int64_t(sizeof(T));
  const int64_t vectors = value_dim / lanes;
  return avx512_available() && order <= 2 && value_dim % lanes == 0 &&
         (vectors == 1 || vectors == 2 || vectors == 4 || vectors == 8);
#else
  (void)order;
  (void)value_dim;
  return false;
#endif
}

// `tokens` rounded up to a multiple of `block`.
inline int64_t round_up(int64_t tokens, int64_t block) {
  return blocks_of(tokens, block) * block;
}

// Rows of x~ past a chunk's tokens that an application reads (zeros): its
// blocks of 3 to 24 tokens, and the denominators' of 4 vectors (64 float or
// 32 double tokens; a chunk is a multiple of 64 tokens, so these stay inside
// it). A chunk's buffers have room for kPairPaddedRows rows more.
constexpr int64_t kPairPaddedRows = 24;
inline int64_t pair_padded_tokens(int64_t tokens) {
  return std::max(round_up(tokens, kPairPaddedRows), round_up(tokens, 64));
}

// Features per register block of the contraction: G holds 12 features x 2
// vectors of tokens, 24 of the 32 vector registers.
constexpr int kContractFeatures = 12;

// Tokens per register pass of the reduction: the pass re-reads its tokens'
// rows of x~ and y once per block of state rows, from L1.
constexpr int64_t kPairTokenBlock = 64;

// fn(std::integral_constant<int, V>{}) for V = value_dim / lanes of T, one
// of 1, 2, 4, 8 (pair_kernels_fit).
template <typename T, typename Fn>
void with_value_vectors(int64_t value_dim, Fn&& fn) {
  switch (value_dim / (64 / int64_t(sizeof(T)))) {
    case 1:
      return fn(std::integral_constant<int, 1>{});
    case 2:
      return fn(std::integral_constant<int, 2>{});
    case 4:
      return fn(std::integral_constant<int, 4>{});
    default:
      return fn(std::integral_constant<int, 8>{});
  }
}

#if TS_PAIR_KERNELS

// 64-byte vectors aligned only to their element, so that a pointer to any
// element may be read as one (an unaligned load).
typedef float FloatVector __attribute__((vector_size(64), aligned(4)));
typedef double DoubleVector __attribute__((vector_size(64), aligned(8)));

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef FloatVector vec;
  static constexpr int lanes = 16;
};
template <>
struct Simd<double> {
  typedef DoubleVector vec;
  static constexpr int lanes = 8;
};

// Loads and stores at any element, through the typedefs themselves (their
// reduced alignment does not survive as a template's dependent type).
TS_AVX512 TS_INLINE FloatVector load_vector(const float* p) {
  return *reinterpret_cast<const FloatVector*>(p);
}
TS_AVX512 TS_INLINE DoubleVector load_vector(const double* p) {
  return *reinterpret_cast<const DoubleVector*>(p);
}
TS_AVX512 TS_INLINE void store_vector(float* p, FloatVector x) {
  *reinterpret_cast<FloatVector*>(p) = x;
}
TS_AVX512 TS_INLINE void store_vector(double* p, DoubleVector x) {
  *reinterpret_cast<DoubleVector*>(p) = x;
}
template <typename T>
TS_AVX512 TS_INLINE void add_vector(T* p, typename Simd<T>::vec x) {
  store_vector(p, load_vector(p) + x);
}

// The L x L transpose of a square of vectors (L = lanes), in place: at
// level B (8, 4, 2, 1 for float), rows i and i + B (i & B == 0) swap the
// B-wide blocks at lanes [B, 2B) of row i and [0, B) of row i + B: the 2 x 2
// block transpose [[A, C], [D, E]] -> [[A, D], [C, E]] of every 2B x 2B
// square. After the levels down to 1, every element sits at its mirror.
// Each swap is two two-source permutes (vpermt2ps / vpermt2pd).
template <typename T, int B>
TS_AVX512 TS_INLINE void transpose_level(typename Simd<T>::vec* rows) {
  using vec = typename Simd<T>::vec;
  using index = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef index mask __attribute__((vector_size(64)));
  constexpr int L = Simd<T>::lanes;
  mask low, high;
  for (int j = 0; j < L; ++j) {
    low[j] = (j & B) == 0 ? j : L + j - B;
    high[j] = (j & B) == 0 ? j + B : L + j;
  }
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) {
    if (i & B) continue;
    const vec top = rows[i], bottom = rows[i + B];
    rows[i] = __builtin_shuffle(top, bottom, low);
    rows[i + B] = __builtin_shuffle(top, bottom, high);
  }
  if constexpr (B > 1) transpose_level<T, B / 2>(rows);
}

// dst[c dst_stride + r] = src[r src_stride + c] for r < rows, c < cols,
// zero by selection in the rows r where keep[r] == 0 (keep = nullptr keeps
// every row; a masked key's row may hold NaN): whole L x L squares through
// registers, the edges element by element.
template <typename T>
TS_AVX512 void transpose_tokens(const T* src, int64_t src_stride, int64_t rows,
                                int64_t cols, const T* keep, T* dst,
                                int64_t dst_stride) {
  using vec = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes;
  const int64_t whole_rows = rows / L * L, whole_cols = cols / L * L;
  for (int64_t r0 = 0; r0 < whole_rows; r0 += L)
    for (int64_t c0 = 0; c0 < whole_cols; c0 += L) {
      vec square[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i)
        square[i] = keep != nullptr && keep[r0 + i] == T(0)
                        ? vec{}
                        : load_vector(src + (r0 + i) * src_stride + c0);
      transpose_level<T, L / 2>(square);
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i)
        store_vector(dst + (c0 + i) * dst_stride + r0, square[i]);
    }
  auto element = [&](int64_t r, int64_t c) {
    dst[c * dst_stride + r] =
        keep != nullptr && keep[r] == T(0) ? T(0) : src[r * src_stride + c];
  };
  for (int64_t r = 0; r < whole_rows; ++r)
    for (int64_t c = whole_cols; c < cols; ++c) element(r, c);
  for (int64_t r = whole_rows; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) element(r, c);
}

// Rows (l, m0 + p), p < NP, of `out` (row stride ldo: column 0, then the
// values), for the tokens [r0, r1), over V vectors of value columns from
// `y` and `out_values` (a slice of the columns):
//   out[p][0]       += sum_r x~_rl x~_r(m0+p) s_r   (if kColumn0)
//   out_values[p][:] += sum_r x~_r(m0+p) (x~_rl y_r)
template <typename T, int V, int NP, bool kColumn0>
TS_AVX512 TS_INLINE void reduce_pair_block(const AugmentedChunk<T>& x,
                                           const T* s, const T* y, int64_t ldy,
                                           int64_t r0, int64_t r1, int64_t l,
                                           int64_t m0, T* out, T* out_values,
                                           int64_t ldo) {
  using vec = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes;
  static_assert(NP <= L, "column 0 of a block is one vector");
  vec acc[NP][V];
  vec acc0 = {};
#pragma GCC unroll 32
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[p][v] = vec{};
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x.rows + r * x.ld;
    const T* yr = y + r * ldy;
    const T xl = xr[l];
    vec w[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) w[v] = xl * load_vector(yr + v * L);
    const T* xm = xr + m0;
    if constexpr (kColumn0) acc0 += (xl * s[r]) * load_vector(xm);
#pragma GCC unroll 32
    for (int p = 0; p < NP; ++p) {
      const T xmp = xm[p];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[p][v] += xmp * w[v];
    }
  }
#pragma GCC unroll 32
  for (int p = 0; p < NP; ++p) {
    if constexpr (kColumn0) out[p * ldo] += acc0[p];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      add_vector(out_values + p * ldo + v * L, acc[p][v]);
  }
}

// The rows (l, m) for m in [l, D) of the first index l, in blocks of NP
// and a last block of n < NP rows with n as a template argument, so that
// its loops unroll like a whole block's.
template <typename T, int V, int NP, bool kColumn0, int N = NP - 1>
TS_AVX512 TS_INLINE void reduce_pair_row(const AugmentedChunk<T>& x, const T* s,
                                         const T* y, int64_t ldy, int64_t r0,
                                         int64_t r1, int64_t l, int64_t m0,
                                         int64_t D, T* out, T* out_values,
                                         int64_t ldo) {
  if constexpr (N == NP - 1) {
    for (; m0 + NP <= D; m0 += NP, out += NP * ldo, out_values += NP * ldo)
      reduce_pair_block<T, V, NP, kColumn0>(x, s, y, ldy, r0, r1, l, m0, out,
                                            out_values, ldo);
  }
  if constexpr (N > 0) {
    if (D - m0 == N)
      return reduce_pair_block<T, V, N, kColumn0>(x, s, y, ldy, r0, r1, l, m0,
                                                  out, out_values, ldo);
    reduce_pair_row<T, V, NP, kColumn0, N - 1>(x, s, y, ldy, r0, r1, l, m0, D,
                                               out, out_values, ldo);
  }
}

// out (F x (1 + e), e = VE lanes, F the pairs of order <= `order` of D) +=
// sum_r pairs(x~_r) [s_r | y_r] over the chunk's `tokens` tokens. The value
// columns go in slices of at most 2 vectors, so that w_r (the multiplies
// that are not multiply-adds) serves 12 rows of a block.
template <typename T, int VE>
TS_AVX512 void reduce_pairs(const AugmentedChunk<T>& x, const T* s, const T* y,
                            int64_t ldy, int64_t tokens, int64_t D, int order,
                            T* out) {
  constexpr int L = Simd<T>::lanes, V = std::min(VE, 2);
  constexpr int NP = std::min(24 / V, L);
  const int64_t ldo = 1 + VE * L;
  const int64_t last_l = first_index_count(order, D);
  for (int64_t r0 = 0; r0 < tokens; r0 += kPairTokenBlock) {
    const int64_t r1 = std::min(tokens, r0 + kPairTokenBlock);
    for (int64_t l = 0; l < last_l; ++l) {
      T* row_l = out + pair_row_start(l, D) * ldo;  // row (l, l)
      reduce_pair_row<T, V, NP, true>(x, s, y, ldy, r0, r1, l, l, D, row_l,
                                      row_l + 1, ldo);
      for (int64_t c0 = V * L; c0 < VE * L; c0 += V * L)
        reduce_pair_row<T, V, NP, false>(x, s, y + c0, ldy, r0, r1, l, l, D,
                                         row_l, row_l + 1 + c0, ldo);
    }
  }
}

// z (R rows from r0, row stride e = V lanes) += x~_rl u_r per first index
// l in [l_lo, l_hi], u_r = sum_(m >= l) x~_rm S_(l,m), S the state's value
// columns (row stride e): the R x V accumulators of u are a GEMM
// micro-kernel's (V loads and R broadcasts per m); z, added to once per l,
// stays in memory (L1). Both indices run down, so that l = 0 (the linear
// features, then the constant, the largest terms) comes last.
// x~ is read from the chunk's columns (x~_rm at xc[m stride + r]), so that
// the R broadcasts of a coordinate are at constant offsets from one pointer.
template <typename T, int V, int R>
TS_AVX512 TS_INLINE void apply_pair_block(const AugmentedChunk<T>& x,
                                          int64_t r0, const T* S, int64_t D,
                                          int64_t l_lo, int64_t l_hi,
                                          T* z_out) {
  using vec = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes, e = V * L;
  const int64_t stride = x.column_stride;
  const T* xc = x.columns + r0;
  for (int64_t l = l_hi; l >= l_lo; --l) {
    vec u[R][V];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) u[r][v] = vec{};
    const T* srow = S + pair_index(l, D - 1, D) * e;
    const T* xm_row = xc + (D - 1) * stride;
    for (int64_t m = D - 1; m >= l; --m, srow -= e, xm_row -= stride) {
      vec sv[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) sv[v] = load_vector(srow + v * L);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) {
        const T xm = xm_row[r];
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) u[r][v] += xm * sv[v];
      }
    }
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const T xl = xc[l * stride + r];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v)
        add_vector(z_out + r * e + v * L, xl * u[r][v]);
    }
  }
}

// Tokens per application block: R x V = 24 accumulators (12 tokens at one
// vector, where 24 would make the broadcasts outnumber the loads twice).
template <int V>
constexpr int kApplyTokens = V == 1 ? 12 : 24 / V;

// State rows per pass of an application: a pass over the chunk's tokens
// reads the rows of a group of first indices, which stay in L1 (24 KB).
constexpr int64_t kApplyBytes = 24 * 1024;

// z rows (row stride e = V lanes) for `tokens` tokens, a multiple of
// kApplyTokens<V>, of the pairs of order <= `order`; S the state's value
// columns (row stride e). A row of z depends on its token's column of x~
// only: the rows past the chunk's tokens, which read whatever lies past
// them in x.columns, are not used.
template <typename T, int V>
TS_AVX512 void apply_pairs(const AugmentedChunk<T>& x, int64_t tokens,
                           const T* S, int64_t D, int order, T* z) {
  constexpr int R = kApplyTokens<V>;
  constexpr int64_t e = V * Simd<T>::lanes;
  constexpr int64_t group_rows = kApplyBytes / int64_t(e * sizeof(T));
  const int64_t last_l = first_index_count(order, D);
  std::fill(z, z + tokens * e, T(0));
  for (int64_t l_hi = last_l - 1; l_hi >= 0;) {
    int64_t l_lo = l_hi, rows = D - l_hi;
    while (l_lo > 0 && rows + D - (l_lo - 1) <= group_rows) rows += D - --l_lo;
    for (int64_t r0 = 0; r0 < tokens; r0 += R)
      apply_pair_block<T, V, R>(x, r0, S, D, l_lo, l_hi, z + r0 * e);
    l_hi = l_lo - 1;
  }
}

// den_r = sum_l x~_rl sum_(m >= l) x~_rm s0_(l,m) with the tokens in the
// lanes (x.columns), four vectors of tokens at once so that four chains of
// multiply-adds overlap; `tokens` a multiple of 4 lanes (columns past the
// chunk's are zero).
template <typename T>
TS_AVX512 void pair_denominators(const AugmentedChunk<T>& x, int64_t tokens,
                                 const T* s0, int64_t D, int order, T* den) {
  using vec = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes, kChains = 4;
  const int64_t last_l = first_index_count(order, D);
  for (int64_t r0 = 0; r0 < tokens; r0 += kChains * L) {
    vec total[kChains] = {};
    for (int64_t l = last_l - 1; l >= 0; --l) {
      vec t[kChains] = {};
      const T* s = s0 + pair_index(l, D - 1, D);
      for (int64_t m = D - 1; m >= l; --m, --s) {
        const T* xm = x.columns + m * x.column_stride + r0;
#pragma GCC unroll 4
        for (int c = 0; c < kChains; ++c) t[c] += *s * load_vector(xm + c * L);
      }
      const T* xl = x.columns + l * x.column_stride + r0;
#pragma GCC unroll 4
      for (int c = 0; c < kChains; ++c)
        total[c] += load_vector(xl + c * L) * t[c];
    }
#pragma GCC unroll 4
    for (int c = 0; c < kChains; ++c) store_vector(den + r0 + c * L, total[c]);
  }
}

// The gradient through the pairs for the tokens of one block of 2 vectors
// from r0, features [f0, f0 + NF): with G_f(r) = S'_f . dz_r over all e + 1
// columns (S' the state weighted as its side's features are, column 0
// apart), the product rule of G_f x~_l x~_m adds G_f x~_m to coordinate l
// and G_f x~_l to coordinate m (both, so twice, on the diagonal):
//   dx~_l(r) += G_f(r) x~_m(r),   dx~_m(r) += G_f(r) x~_l(r).
// G holds NF x 2 vectors in registers, a GEMM micro-kernel's accumulators
// (per column c: 2 loads of dz^T and NF broadcasts of S'_(f, c)), and goes
// straight into the coordinates' gradients: no G in memory. The block's
// values are column by column (`block`: e x kContractFeatures, see
// PairState), so that the NF broadcasts of a column are at constant offsets
// from one pointer. Tokens are in the lanes: dzt is dz^T ((e + 1) x
// tokens), xt x~^T and dxt the gradient of x~ transposed (D x tokens), all
// with row stride ld.
template <typename T, int NF>
TS_AVX512 TS_INLINE void contract_pair_block(const T* dzt, const T* column0,
                                             const T* block, int64_t e,
                                             int64_t f0, const int32_t* first,
                                             const int32_t* second, const T* xt,
                                             T* dxt, int64_t ld, int64_t r0) {
  using vec = typename Simd<T>::vec;
  constexpr int L = Simd<T>::lanes;
  vec g[NF][2];
  {
    const vec z0 = load_vector(dzt + r0), z1 = load_vector(dzt + r0 + L);
#pragma GCC unroll 32
    for (int p = 0; p < NF; ++p) {
      const T s = column0[f0 + p];
      g[p][0] = s * z0;
      g[p][1] = s * z1;
    }
  }
  for (int64_t c = 0; c < e; ++c, block += kContractFeatures) {
    const T* z = dzt + (1 + c) * ld + r0;
    const vec z0 = load_vector(z), z1 = load_vector(z + L);
#pragma GCC unroll 32
    for (int p = 0; p < NF; ++p) {
      const T s = block[p];
      g[p][0] += s * z0;
      g[p][1] += s * z1;
    }
  }
  // Consecutive features mostly share their first index l: their terms for
  // coordinate l are summed in registers and added to dxt once per run of
  // l, not as a chain of dependent read-modify-writes of one row.
  vec run[2] = {};
  int64_t run_l = first[f0];
#pragma GCC unroll 32
  for (int p = 0; p < NF; ++p) {
    const int64_t l = first[f0 + p], m = second[f0 + p];
    if (l != run_l) {
      add_vector(dxt + run_l * ld + r0, run[0]);
      add_vector(dxt + run_l * ld + r0 + L, run[1]);
      run[0] = run[1] = vec{};
      run_l = l;
    }
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const int64_t at = r0 + h * L;
      run[h] += g[p][h] * load_vector(xt + m * ld + at);
      add_vector(dxt + m * ld + at, g[p][h] * load_vector(xt + l * ld + at));
    }
  }
  add_vector(dxt + run_l * ld + r0, run[0]);
  add_vector(dxt + run_l * ld + r0 + L, run[1]);
}

// The last block of features, of n < NF: n as a template argument.
template <typename T, int NF>
TS_AVX512 TS_INLINE void contract_pair_tail(int n, const T* dzt,
                                            const T* column0, const T* block,
                                            int64_t e, int64_t f0,
                                            const int32_t* first,
                                            const int32_t* second, const T* xt,
                                            T* dxt, int64_t ld, int64_t r0) {
  if constexpr (NF > 0) {
    if (n == NF)
      return contract_pair_block<T, NF>(dzt, column0, block, e, f0, first,
                                        second, xt, dxt, ld, r0);
    contract_pair_tail<T, NF - 1>(n, dzt, column0, block, e, f0, first, second,
                                  xt, dxt, ld, r0);
  }
}

// dxt (D x tokens, zeroed here) = the gradient of x~ for `tokens` tokens, a
// multiple of 2 vectors, through F features; `blocks` the state's value
// columns in blocks of kContractFeatures features (PairState::blocks).
template <typename T>
TS_AVX512 void contract_pairs(const T* dzt, const T* column0, const T* blocks,
                              int64_t e, int64_t F, const int32_t* first,
                              const int32_t* second, const T* xt, T* dxt,
                              int64_t D, int64_t ld, int64_t tokens) {
  constexpr int NF = kContractFeatures, L = Simd<T>::lanes;
  for (int64_t l = 0; l < D; ++l)
    std::fill(dxt + l * ld, dxt + l * ld + tokens, T(0));
  for (int64_t r0 = 0; r0 < tokens; r0 += 2 * L) {
    int64_t f0 = 0;
    const T* block = blocks;
    for (; f0 + NF <= F; f0 += NF, block += e * NF)
      contract_pair_block<T, NF>(dzt, column0, block, e, f0, first, second, xt,
                                 dxt, ld, r0);
    contract_pair_tail<T, NF - 1>(int(F - f0), dzt, column0, block, e, f0,
                                  first, second, xt, dxt, ld, r0);
  }
}

#endif  // TS_PAIR_KERNELS

// The entry points, for a value width that pair_kernels_fit accepts (e =
// V lanes; not reached elsewhere).

// out (the pairs of order <= `order` of 1 + d, e + 1 columns) +=
// sum_r pairs(x~_r) [s_r | y_r] over the chunk's `tokens` tokens.
template <typename T>
void reduce_chunk_pairs(const AugmentedChunk<T>& x, const T* s, const T* y,
                        int64_t ldy, int64_t tokens, int64_t d, int64_t e,
                        int order, T* out) {
#if TS_PAIR_KERNELS
  with_value_vectors<T>(e, [&](auto V) {
    reduce_pairs<T, V>(x, s, y, ldy, tokens, d + 1, order, out);
  });
#endif
}

// dst[c dst_stride + r] = src[r src_stride + c] for r < rows, c < cols,
// zero by selection where keep[r] == 0 (keep = nullptr keeps every row; a
// masked key's row may hold NaN): the efficient kernels' chunk transposes,
// through registers with AVX-512 (transpose_tokens), element by element
// elsewhere.
template <typename T>
void transpose_chunk(const T* src, int64_t src_stride, int64_t rows,
                     int64_t cols, const T* keep, T* dst, int64_t dst_stride) {
#if TS_PAIR_KERNELS
  if (avx512_available())
    return transpose_tokens(src, src_stride, rows, cols, keep, dst, dst_stride);
#endif
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r)
      dst[c * dst_stride + r] =
          keep != nullptr && keep[r] == T(0) ? T(0) : src[r * src_stride + c];
}

// A state laid out for the register kernels, weighted by row or not: its
// value columns row by row (F x e, rows 64 bytes aligned) for the
// applications, the same columns in blocks of kContractFeatures features for
// the contractions (block b: e x kContractFeatures, element (c, p) feature
// b kContractFeatures + p, zero past F), and its column 0 (F).
template <typename T>
class PairState {
 public:
  // state: F x (e + 1) of the pairs of order <= `order` of 1 + d; weights:
  // the query side's polynomial (pair_weight), or nullptr for the key
  // side's (all 1).
  PairState(const T* state, int64_t d, int64_t e, int order,
            const Polynomial<T>* weights) {
    const int64_t F = feature_count(d, order), lanes = 64 / sizeof(T);
    const int64_t blocked_rows = round_up(F, kContractFeatures);
    storage_.assign(F * e + blocked_rows * e + F + lanes, T(0));
    const auto address = reinterpret_cast<uintptr_t>(storage_.data());
    values_ = storage_.data() + (64 - address % 64) % 64 / sizeof(T);
    blocks_ = values_ + F * e;
    column0_ = blocks_ + blocked_rows * e;
    for_each_pair(d, order, [&](int64_t l, int64_t m, int64_t f_index) {
      const T w = weights != nullptr ? pair_weight(*weights, l, m) : T(1);
      const T* row = state + f_index * (e + 1);
      T* block = blocks_ + f_index / kContractFeatures * e * kContractFeatures +
                 f_index % kContractFeatures;
      column0_[f_index] = w * row[0];
      for (int64_t c = 0; c < e; ++c) {
        values_[f_index * e + c] = w * row[1 + c];
        block[c * kContractFeatures] = w * row[1 + c];
      }
    });
  }

  const T* values() const { return values_; }
  const T* blocks() const { return blocks_; }
  const T* column0() const { return column0_; }

 private:
  std::vector<T> storage_;
  T* values_;
  T* blocks_;
  T* column0_;
};

// z_r = pairs(x~_r)^T S[:, 1:] (rows x e) and, unless den is nullptr,
// den_r = pairs(x~_r)^T S[:, 0] for the chunk's `tokens` tokens; z and den
// have room for pair_padded_tokens(tokens) rows, and x.columns may be read
// that far (zeros past `tokens` up to 4 vectors, for den; past the chunk, an
// application's last block reads on into the next row, or into room left
// after the last).
template <typename T>
void apply_chunk_pairs(const AugmentedChunk<T>& x, int64_t tokens,
                       const PairState<T>& S, int64_t d, int64_t e, int order,
                       T* z, T* den) {
#if TS_PAIR_KERNELS
  with_value_vectors<T>(e, [&](auto V) {
    apply_pairs<T, V>(x, round_up(tokens, kApplyTokens<V>), S.values(), d + 1,
                      order, z);
  });
  if (den != nullptr)
    pair_denominators<T>(x, round_up(tokens, 4 * Simd<T>::lanes), S.column0(),
                         d + 1, order, den);
#endif
}

// The two indices of every pair of order <= `order` of D = d + 1, in
// feature order: first[f] = l, second[f] = m.
struct PairIndices {
  std::vector<int32_t> first, second;

  PairIndices(int64_t d, int order) {
    for_each_pair(d, order, [&](int64_t l, int64_t m, int64_t) {
      first.push_back(int32_t(l));
      second.push_back(int32_t(m));
    });
  }
  int64_t size() const { return int64_t(first.size()); }
};

// dx~^T (D x ld, rows 1.. the gradient of x) of the chunk's `tokens` tokens
// from dz^T ((e + 1) x ld) and x~^T (x.columns), through the features of S
// (weighted as the side's features are); columns past `tokens`, up to
// pair_padded_tokens, are zero in dzt and x.columns.
template <typename T>
void contract_chunk_pairs(const AugmentedChunk<T>& x, const T* dzt,
                          int64_t tokens, const PairState<T>& S,
                          const PairIndices& pairs, int64_t d, int64_t e,
                          T* dxt) {
#if TS_PAIR_KERNELS
  contract_pairs<T>(dzt, S.column0(), S.blocks(), e, pairs.size(),
                    pairs.first.data(), pairs.second.data(), x.columns, dxt,
                    d + 1, x.column_stride,
                    round_up(tokens, 2 * Simd<T>::lanes));
#endif
}

}  // namespace taylorshift::cpu
