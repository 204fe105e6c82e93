// Efficient TaylorShift attention (docs/math.md §3) on CUDA, O(N d^3), with the
// symmetric feature maps of features.h,
//   psi(k) = [1 | k | k_l k_m (l <= m)]
//   phi(q) = [c | b q | a w_lm q_l q_m]
// so that phi(q) . psi(k) = f(q . k). Neither feature map is ever written to
// global memory.
//
// float16/bfloat16 with d = e in {16, 32, 64, 128}, forward and backward, runs
// on the register-resident kernels of the second half of this file, which
// build feature fragments in registers; see there. Every other case runs on the
// shared-memory kernels of the first half, which expand the features of one
// tile of tokens and one tile of the feature axis in shared memory, straight
// from the q or k tile, right before the tensor-core product that consumes
// them.
//
// Three kinds of shared-memory kernel cover forward and backward.
// * reduce: R = sum_t feat(x_t) y_t^T over tokens, F x (e+1).
//     forward:  state = sum_j psi(k_j) m_j [1 | v_j]^T
//     backward: dS = sum_i phi(q_i) dz_i^T, dz_i = [-dl_i | rs_i gY_i]
//   Grid: feature tiles x token splits x (batch, head). Each split writes
//   its own partial sum and a second kernel adds the splits in a fixed
//   order: deterministic, no atomics.
// * apply: z_i = phi(q_i)^T state, den_i = z_i[0],
//   y_i = sigma_i z_i[1:] / den_i.
//   Grid: query tiles x (batch, head), looping over feature tiles; a head's
//   state is read by every query tile and stays in L2.
// * contract: with g_i = state dz_i and h_j = dS [1 | v_j] (F values each),
//     dq_i = b g_lin + 2a Sym(g_pairs) q_i
//     dk_j = m_j (h_lin + 2 Half(h_pairs) k_j)
//     dv_j = m_j (psi(k_j)^T dS)[1:]
//   The products dz state^T and [1 | v] dS^T give one value per (token,
//   feature); multiplying by the matching q (or k) entries and summing per
//   coordinate finishes the gradient inside the same feature-tile loop.
// rs_i = sigma_i / den_i and dl_i = (gY_i . y_i) / den_i (common.cu).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "../kernel_checks.h"
#include "../taylorshift.h"
#include "common.cuh"

namespace taylorshift::cuda_kernels {

namespace {

// Features per tile of the feature axis. Larger tiles amortise the token
// loads and barriers of each step over more tensor-core work: 128 with 2-byte
// operands from d = 48 on (below, the padding past F = 1 + d + d(d+1)/2
// would cost more), 32 with double operands so that d = 128 fits the 163 KB
// of shared memory an sm_80 block can have.
int feature_tile(int d, size_t operand_bytes) {
  if (operand_bytes == 8) return 32;
  return d >= 48 && operand_bytes == 2 ? 128 : 64;
}

template <typename T, typename Acc>
struct EfficientArgs {
  TokenRows<T> x;      // tokens whose features are expanded: k or q
  TokenRows<T> y;      // v (key side) or grad_out (query side)
  const Acc* scalars;  // backward: (B, H, M, 2) = (rs, dl)
  // apply / contract: the state or dS as product operand (prepare_state).
  const void* state_operand;
  int64_t padded_features;
  Acc state_scale;  // apply: 2^-ceil(log2 N), see efficient_apply_kernel
  int64_t heads, tokens, features;
  int d, e, tile, feature_tile;  // feature_tile: features per step
  Mask mask;                     // key padding only
  RowValues<Acc> sigma;
  Acc a, b, c;
};

// Feature f is coef_f * u_l * u_m with u = [x | 1] (u_d = 1): the constant
// feature is (d, d), the linear ones (l, d), the pairs (l, m) with l <= m.
// Features past the end get coef 0. Key-side features have coef 1; the
// query side folds in the Taylor coefficients and the pair weight omega.
template <typename Acc>
__device__ void feature_table(int64_t f0, int ft, int d, int64_t features,
                              bool query_side, Acc a, Acc b, Acc c, int* ls,
                              int* ms, Acc* coef) {
  for (int local = threadIdx.x; local < ft; local += blockDim.x) {
    const int64_t f = f0 + local;
    int l = d, m = d;
    Acc w = 0;
    if (f < linear_feature_offset()) {
      w = query_side ? c : Acc(1);
    } else if (f < pair_feature_offset(d)) {
      l = static_cast<int>(f - linear_feature_offset());
      w = query_side ? b : Acc(1);
    } else if (f < features) {
      const int64_t pair = f - pair_feature_offset(d);
      l = 0;
      while (pair_row_start(l + 1, d) <= pair) ++l;
      m = l + static_cast<int>(pair - pair_row_start(l, d));
      w = query_side ? (l == m ? a : 2 * a) : Acc(1);
    }
    ls[local] = l;
    ms[local] = m;
    coef[local] = w;
  }
}

// Rows [t0, t0 + rows) of head (b, h) of x, read through its strides, in
// the accumulation type with the constant 1 appended (ld = d + 1), zeros
// past `end`.
template <typename T, typename Acc>
__device__ void load_feature_source(Acc* xs, const TokenRows<T>& x, int64_t b,
                                    int64_t h, int64_t end, int d, int64_t t0,
                                    int rows) {
  for (int idx = threadIdx.x; idx < rows * (d + 1); idx += blockDim.x) {
    const int r = idx / (d + 1), col = idx % (d + 1);
    const int64_t t = t0 + r;
    xs[idx] = col == d
                  ? Acc(1)
                  : (t < end ? Num<T>::widen(x.row(b, h, t)[col * x.stride_c])
                             : Acc(0));
  }
}

template <typename Acc>
__device__ __forceinline__ Acc feature_value(const Acc* xs, int d, int t,
                                             const int* ls, const int* ms,
                                             const Acc* coef, int f) {
  const Acc* row = xs + t * (d + 1);
  return coef[f] * row[ls[f]] * row[ms[f]];
}

// One row of [1 | v_t] (key side) or dz_t = [-dl_t | rs_t gY_t] (query side),
// zero for invalid tokens and padding columns.
template <typename T, typename Acc, bool kQuery>
__device__ Acc value_row_entry(const EfficientArgs<T, Acc>& p, int64_t bh,
                               int64_t t, int col) {
  if (col > p.e) return 0;
  const auto y = [&] {
    return Num<T>::widen(
        p.y.row(bh / p.heads, bh % p.heads, t)[(col - 1) * p.y.stride_c]);
  };
  if constexpr (kQuery) {
    const Acc* s = p.scalars + 2 * (bh * p.tokens + t);
    return col == 0 ? -s[1] : s[0] * y();
  } else {
    return col == 0 ? Acc(1) : y();
  }
}

// The forward's products take their operands in the input dtype (psi(k), v
// and phi(q) are bounded by the inputs; the state is scaled, see the apply
// kernel), so fp16 keeps its 11-bit mantissa there. dz and dS in the
// backward scale with 1/den and the loss: Num<T>::derived (common.cuh).
template <typename T, bool kQuery>
using ReduceOperand = std::conditional_t<kQuery, typename Num<T>::derived, T>;

struct ReduceSmem {
  size_t x, feat, y, r, ls, ms, coef, total;
  TS_HOST_DEVICE ReduceSmem(int tile, int ft, int d, int e, int op_bytes,
                            int acc_bytes, int wide_bytes) {
    const int e1p = round16(e + 1);
    SmemCarver carver;
    x = carver.take(size_t(tile) * (d + 1) * acc_bytes);
    feat = carver.take(size_t(ft) * operand_ld(tile) * op_bytes);
    y = carver.take(size_t(tile) * operand_ld(e1p) * op_bytes);
    r = carver.take(size_t(ft) * accum_ld(e1p) * wide_bytes);
    ls = carver.take(ft * sizeof(int));
    ms = carver.take(ft * sizeof(int));
    coef = carver.take(size_t(ft) * acc_bytes);
    total = carver.size;
  }
};

// out[split, bh, f, c] = sum over this split's tokens t of
//     feat_f(x_t) * y_t[c]      for the block's tile of features f.
template <typename T, typename Acc, bool kQuery>
__global__ void __launch_bounds__(kThreads)
    feature_reduce_kernel(EfficientArgs<T, Acc> p, int64_t chunk, Acc* out) {
  using Op = ReduceOperand<T, kQuery>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tile = p.tile, ft = p.feature_tile, d = p.d, e1 = p.e + 1,
            e1p = round16(p.e + 1);
  using Wide = typename Num<T>::wide;
  const ReduceSmem plan(tile, ft, d, p.e, sizeof(Op), sizeof(Acc),
                        sizeof(Wide));
  Acc* xs = reinterpret_cast<Acc*>(smem + plan.x);
  Op* fs = reinterpret_cast<Op*>(smem + plan.feat);
  Op* ys = reinterpret_cast<Op*>(smem + plan.y);
  Wide* rs = reinterpret_cast<Wide*>(smem + plan.r);
  int* ls = reinterpret_cast<int*>(smem + plan.ls);
  int* ms = reinterpret_cast<int*>(smem + plan.ms);
  Acc* coef = reinterpret_cast<Acc*>(smem + plan.coef);
  const int ld_f = operand_ld(tile), ld_y = operand_ld(e1p),
            ld_r = accum_ld(e1p);

  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * ft;
  const int64_t split = blockIdx.y;
  const int64_t bh = blockIdx.z, b = bh / p.heads;
  const int64_t begin = split * chunk;
  const int64_t end = min(p.tokens, begin + chunk);

  feature_table(f0, ft, d, p.features, kQuery, p.a, p.b, p.c, ls, ms, coef);
  zero_tile(rs, ld_r, ft, e1p);
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    __syncthreads();  // the previous product is done with fs, ys
    load_feature_source(xs, p.x, b, bh % p.heads, end, d, t0, tile);
    for (int idx = threadIdx.x; idx < tile * e1p; idx += blockDim.x) {
      const int r = idx / e1p, col = idx % e1p;
      const int64_t t = t0 + r;
      const bool valid = t < end && (kQuery || p.mask.key_valid(b, t));
      ys[r * ld_y + col] = Num<Op>::narrow(
          valid ? value_row_entry<T, Acc, kQuery>(p, bh, t, col) : Acc(0));
    }
    __syncthreads();
    // Masked keys' features are zero by selection: a padded key may be NaN.
    for (int idx = threadIdx.x; idx < ft * tile; idx += blockDim.x) {
      const int f = idx / tile, t = idx % tile;
      const bool valid =
          kQuery || (t0 + t < end && p.mask.key_valid(b, t0 + t));
      fs[f * ld_f + t] = Num<Op>::narrow(
          valid ? feature_value(xs, d, t, ls, ms, coef, f) : Acc(0));
    }
    __syncthreads();
    block_mma<false, false>(fs, ld_f, ys, ld_y, rs, ld_r, ft, e1p, tile, true);
  }
  __syncthreads();
  Acc* dst = out + (split * gridDim.z + bh) * p.features * e1;
  for (int idx = threadIdx.x; idx < ft * e1; idx += blockDim.x) {
    const int f = idx / e1, col = idx % e1;
    if (f0 + f < p.features) {
      dst[(f0 + f) * e1 + col] = static_cast<Acc>(rs[f * ld_r + col]);
    }
  }
}

// out[i] = sum_s partial[s, i], the splits added in a fixed order.
template <typename Acc>
__global__ void sum_splits_kernel(const Acc* partial, int64_t splits,
                                  int64_t count, Acc* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * count + i];
    out[i] = sum;
  }
}

// The state (or dS) of every head as the operand of the apply and contract
// products, (B H, padded_features, e1p): multiplied by `scale`, rounded once
// to the operand type, zero-padded to whole feature tiles and to 16 columns.
// Every query or key tile then loads its state tiles as plain 16-byte copies
// instead of converting the float state again.
template <typename Acc, typename Op>
__global__ void prepare_state_kernel(const Acc* state, int64_t count,
                                     int64_t features, int e1,
                                     int64_t padded_features, int e1p,
                                     Acc scale, Op* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int col = static_cast<int>(i % e1p);
    const int64_t f = i / e1p % padded_features;
    const int64_t bh = i / (e1p * padded_features);
    out[i] = Num<Op>::narrow(f < features && col < e1
                                 ? state[(bh * features + f) * e1 + col] * scale
                                 : Acc(0));
  }
}

struct ApplySmem {
  size_t x, feat, s, z, ls, ms, coef, total;
  TS_HOST_DEVICE ApplySmem(int tile, int ft, int d, int e, int op_bytes,
                           int acc_bytes, int wide_bytes) {
    const int e1p = round16(e + 1);
    SmemCarver carver;
    x = carver.take(size_t(tile) * (d + 1) * acc_bytes);
    feat = carver.take(size_t(tile) * operand_ld(ft) * op_bytes);
    s = carver.take(size_t(ft) * operand_ld(e1p) * op_bytes);
    z = carver.take(size_t(tile) * accum_ld(e1p) * wide_bytes);
    ls = carver.take(ft * sizeof(int));
    ms = carver.take(ft * sizeof(int));
    coef = carver.take(size_t(ft) * acc_bytes);
    total = carver.size;
  }
};

// z = phi(Q_I) state, one tile of queries; then den and the output.
// The state holds sums over up to N keys, beyond fp16's range for long
// sequences: its operand is multiplied by state_scale = 2^-ceil(log2 N) (a
// mean-like magnitude, exact in binary), which cancels in z[1:] / z[0] and is
// divided out of den.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    efficient_apply_kernel(EfficientArgs<T, Acc> p, T* out, Acc* den) {
  using Op = T;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tile = p.tile, ft = p.feature_tile, d = p.d, e1 = p.e + 1,
            e1p = round16(p.e + 1);
  using Wide = typename Num<T>::wide;
  const ApplySmem plan(tile, ft, d, p.e, sizeof(Op), sizeof(Acc), sizeof(Wide));
  Acc* xs = reinterpret_cast<Acc*>(smem + plan.x);
  Op* fs = reinterpret_cast<Op*>(smem + plan.feat);
  Op* ss = reinterpret_cast<Op*>(smem + plan.s);
  Wide* zs = reinterpret_cast<Wide*>(smem + plan.z);
  int* ls = reinterpret_cast<int*>(smem + plan.ls);
  int* ms = reinterpret_cast<int*>(smem + plan.ms);
  Acc* coef = reinterpret_cast<Acc*>(smem + plan.coef);
  const int ld_f = operand_ld(ft), ld_s = operand_ld(e1p), ld_z = accum_ld(e1p);

  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const Op* state =
      static_cast<const Op*>(p.state_operand) + bh * p.padded_features * e1p;
  load_feature_source(xs, p.x, bh / p.heads, bh % p.heads, p.tokens, d, i0,
                      tile);
  zero_tile(zs, ld_z, tile, e1p);
  for (int64_t f0 = 0; f0 < p.features; f0 += ft) {
    __syncthreads();  // the previous product is done with fs, ss, the table
    feature_table(f0, ft, d, p.features, true, p.a, p.b, p.c, ls, ms, coef);
    load_tile(ss, ld_s, state, p.padded_features, e1p, f0, ft, e1p);
    __syncthreads();
    for (int idx = threadIdx.x; idx < tile * ft; idx += blockDim.x) {
      const int t = idx / ft, f = idx % ft;
      fs[t * ld_f + f] =
          Num<Op>::narrow(feature_value(xs, d, t, ls, ms, coef, f));
    }
    __syncthreads();
    block_mma<false, false>(fs, ld_f, ss, ld_s, zs, ld_z, tile, e1p, ft, true);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < tile * p.e; idx += blockDim.x) {
    const int r = idx / p.e, col = idx % p.e;
    const int64_t i = i0 + r;
    if (i >= p.tokens) continue;
    const Wide row_sum = zs[r * ld_z];
    const Wide scale = p.sigma.at(b, h, i) * safe_reciprocal(row_sum);
    const int64_t row = bh * p.tokens + i;
    out[row * p.e + col] =
        Num<T>::narrow(static_cast<Acc>(zs[r * ld_z + 1 + col] * scale));
    if (col == 0) den[row] = static_cast<Acc>(row_sum / p.state_scale);
  }
}

// Shared memory of both contraction kernels. The query side (dq) holds dz
// as its product operand; the key side (dk, dv) holds [1 | v], the features
// psi(k) and the dv accumulator.
struct ContractSmem {
  size_t x, rows, feat, s, g, acc_v, grad, ls, ms, coef, total;
  TS_HOST_DEVICE ContractSmem(int tile, int ft, int d, int e, int op_bytes,
                              int acc_bytes, int wide_bytes, bool key_side) {
    const int e1p = round16(e + 1);
    SmemCarver carver;
    x = carver.take(size_t(tile) * (d + 1) * acc_bytes);
    rows = carver.take(size_t(tile) * operand_ld(e1p) * op_bytes);
    feat = key_side ? carver.take(size_t(tile) * operand_ld(ft) * op_bytes) : 0;
    s = carver.take(size_t(ft) * operand_ld(e1p) * op_bytes);
    g = carver.take(size_t(tile) * accum_ld(ft) * wide_bytes);
    acc_v =
        key_side ? carver.take(size_t(tile) * accum_ld(e1p) * wide_bytes) : 0;
    grad = carver.take(size_t(tile) * (d + 1) * wide_bytes);
    ls = carver.take(ft * sizeof(int));
    ms = carver.take(ft * sizeof(int));
    coef = carver.take(size_t(ft) * acc_bytes);
    total = carver.size;
  }
};

// grad[t] += sum_f g[t, f] d feat_f(x_t) / d x_t, for the block's tile of
// features, with feat_f = coef_f u_l u_m (u = [x | 1]):
//   linear (l, d):      coef g            -> grad_l
//   pair l < m:         coef g x_m        -> grad_l,   coef g x_l -> grad_m
//   diagonal (l, l):    2 coef g x_l      -> grad_l
// On the query side coef is a (diagonal) or 2a (off it), so both become 2a:
// dq = b g_lin + 2a Sym(g) q. On the key side coef is 1: dk = h_lin +
// 2 Half(h) k. The threads of one token split the coordinates by residue
// (l mod threads-per-token), so every grad entry has exactly one writer.
template <typename Acc, typename Wide>
__device__ void contract_features(const Wide* gs, int ld_g, const Acc* xs,
                                  Wide* grad, int d, int tile, int ft,
                                  const int* ls, const int* ms,
                                  const Acc* coef) {
  const int per_token = blockDim.x / tile;
  const int t = threadIdx.x / per_token, lane = threadIdx.x % per_token;
  if (t >= tile) return;
  const Acc* x = xs + t * (d + 1);
  Wide* out = grad + t * (d + 1);
  for (int f = 0; f < ft; ++f) {
    const int l = ls[f], m = ms[f];
    if (l == d) continue;  // constant feature, or past the end
    const Wide g = coef[f] * gs[t * ld_g + f];
    if (m == d) {
      if (l % per_token == lane) out[l] += g;
    } else if (l == m) {
      if (l % per_token == lane) out[l] += 2 * g * x[l];
    } else {
      if (l % per_token == lane) out[l] += g * x[m];
      if (m % per_token == lane) out[m] += g * x[l];
    }
  }
}

// dq_i = d(phi(q_i) . g_i)/dq_i with g_i = state dz_i (F values per query).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    efficient_backward_q_kernel(EfficientArgs<T, Acc> p, T* grad_q) {
  using Op = typename Num<T>::derived;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tile = p.tile, ft = p.feature_tile, d = p.d, e1 = p.e + 1,
            e1p = round16(p.e + 1);
  using Wide = typename Num<T>::wide;
  const ContractSmem plan(tile, ft, d, p.e, sizeof(Op), sizeof(Acc),
                          sizeof(Wide), false);
  Acc* xs = reinterpret_cast<Acc*>(smem + plan.x);
  Op* dz = reinterpret_cast<Op*>(smem + plan.rows);
  Op* ss = reinterpret_cast<Op*>(smem + plan.s);
  Wide* gs = reinterpret_cast<Wide*>(smem + plan.g);
  Wide* dq = reinterpret_cast<Wide*>(smem + plan.grad);
  int* ls = reinterpret_cast<int*>(smem + plan.ls);
  int* ms = reinterpret_cast<int*>(smem + plan.ms);
  Acc* coef = reinterpret_cast<Acc*>(smem + plan.coef);
  const int ld_z = operand_ld(e1p), ld_g = accum_ld(ft);

  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t bh = blockIdx.y;
  const Op* state =
      static_cast<const Op*>(p.state_operand) + bh * p.padded_features * e1p;
  load_feature_source(xs, p.x, bh / p.heads, bh % p.heads, p.tokens, d, i0,
                      tile);
  for (int idx = threadIdx.x; idx < tile * e1p; idx += blockDim.x) {
    const int r = idx / e1p, col = idx % e1p;
    const int64_t i = i0 + r;
    dz[r * ld_z + col] = Num<Op>::narrow(
        i < p.tokens ? value_row_entry<T, Acc, true>(p, bh, i, col) : Acc(0));
  }
  zero_tile(dq, d + 1, tile, d + 1);
  for (int64_t f0 = 0; f0 < p.features; f0 += ft) {
    __syncthreads();  // the previous contraction is done with gs, the table
    feature_table(f0, ft, d, p.features, true, p.a, p.b, p.c, ls, ms, coef);
    load_tile(ss, operand_ld(e1p), state, p.padded_features, e1p, f0, ft, e1p);
    __syncthreads();
    // g = dz state^T: (tile x e1p) times the transposed (features x e1p) tile
    block_mma<false, true>(dz, ld_z, ss, operand_ld(e1p), gs, ld_g, tile, ft,
                           e1p, false);
    __syncthreads();
    contract_features(gs, ld_g, xs, dq, d, tile, ft, ls, ms, coef);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < tile * d; idx += blockDim.x) {
    const int r = idx / d, col = idx % d;
    const int64_t i = i0 + r;
    if (i < p.tokens) {
      grad_q[(bh * p.tokens + i) * d + col] =
          Num<T>::narrow(static_cast<Acc>(dq[r * (d + 1) + col]));
    }
  }
}

// dk_j = m_j d(psi(k_j) . h_j)/dk_j with h_j = dS [1 | v_j], and
// dv_j = m_j (psi(k_j)^T dS)[1:].
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    efficient_backward_kv_kernel(EfficientArgs<T, Acc> p, T* grad_k,
                                 T* grad_v) {
  using Op = typename Num<T>::derived;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tile = p.tile, ft = p.feature_tile, d = p.d, e1 = p.e + 1,
            e1p = round16(p.e + 1);
  using Wide = typename Num<T>::wide;
  const ContractSmem plan(tile, ft, d, p.e, sizeof(Op), sizeof(Acc),
                          sizeof(Wide), true);
  Acc* xs = reinterpret_cast<Acc*>(smem + plan.x);
  Op* vs = reinterpret_cast<Op*>(smem + plan.rows);
  Op* fs = reinterpret_cast<Op*>(smem + plan.feat);
  Op* ds = reinterpret_cast<Op*>(smem + plan.s);
  Wide* hs = reinterpret_cast<Wide*>(smem + plan.g);
  Wide* dv = reinterpret_cast<Wide*>(smem + plan.acc_v);
  Wide* dk = reinterpret_cast<Wide*>(smem + plan.grad);
  int* ls = reinterpret_cast<int*>(smem + plan.ls);
  int* ms = reinterpret_cast<int*>(smem + plan.ms);
  Acc* coef = reinterpret_cast<Acc*>(smem + plan.coef);
  const int ld_v = operand_ld(e1p), ld_f = operand_ld(ft), ld_h = accum_ld(ft),
            ld_dv = accum_ld(e1p);

  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t bh = blockIdx.y, b = bh / p.heads;
  const Op* dstate =
      static_cast<const Op*>(p.state_operand) + bh * p.padded_features * e1p;
  load_feature_source(xs, p.x, bh / p.heads, bh % p.heads, p.tokens, d, j0,
                      tile);
  for (int idx = threadIdx.x; idx < tile * e1p; idx += blockDim.x) {
    const int r = idx / e1p, col = idx % e1p;
    const int64_t j = j0 + r;
    vs[r * ld_v + col] = Num<Op>::narrow(
        j < p.tokens ? value_row_entry<T, Acc, false>(p, bh, j, col) : Acc(0));
  }
  zero_tile(dv, ld_dv, tile, e1p);
  zero_tile(dk, d + 1, tile, d + 1);
  for (int64_t f0 = 0; f0 < p.features; f0 += ft) {
    __syncthreads();  // the previous products and contraction are done
    feature_table(f0, ft, d, p.features, false, p.a, p.b, p.c, ls, ms, coef);
    load_tile(ds, ld_v, dstate, p.padded_features, e1p, f0, ft, e1p);
    __syncthreads();
    for (int idx = threadIdx.x; idx < tile * ft; idx += blockDim.x) {
      const int t = idx / ft, f = idx % ft;
      fs[t * ld_f + f] =
          Num<Op>::narrow(feature_value(xs, d, t, ls, ms, coef, f));
    }
    // h = [1 | v] dS^T needs only vs and ds, so it overlaps the expansion.
    block_mma<false, true>(vs, ld_v, ds, ld_v, hs, ld_h, tile, ft, e1p, false);
    __syncthreads();
    block_mma<false, false>(fs, ld_f, ds, ld_v, dv, ld_dv, tile, e1p, ft, true);
    contract_features(hs, ld_h, xs, dk, d, tile, ft, ls, ms, coef);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < tile * d; idx += blockDim.x) {
    const int r = idx / d, col = idx % d;
    const int64_t j = j0 + r;
    if (j < p.tokens) {
      const bool valid = p.mask.key_valid(b, j);
      grad_k[(bh * p.tokens + j) * d + col] = Num<T>::narrow(
          valid ? static_cast<Acc>(dk[r * (d + 1) + col]) : Acc(0));
    }
  }
  for (int idx = threadIdx.x; idx < tile * p.e; idx += blockDim.x) {
    const int r = idx / p.e, col = idx % p.e;
    const int64_t j = j0 + r;
    if (j < p.tokens) {
      const bool valid = p.mask.key_valid(b, j);
      grad_v[(bh * p.tokens + j) * p.e + col] = Num<T>::narrow(
          valid ? static_cast<Acc>(dv[r * ld_dv + 1 + col]) : Acc(0));
    }
  }
}

template <typename T, typename Acc>
EfficientArgs<T, Acc> make_args(const at::Tensor& x, const at::Tensor& y,
                                const at::Tensor& v, const Mask& mask, double a,
                                double b, double c) {
  EfficientArgs<T, Acc> args{};
  args.x = token_rows<T>(x, x.size(3));
  args.y = token_rows<T>(y, y.size(3));
  args.heads = x.size(1);
  args.tokens = x.size(2);
  args.d = static_cast<int>(x.size(3));
  args.e = static_cast<int>(v.size(3));
  args.features = feature_count(args.d);
  args.mask = mask;
  args.a = static_cast<Acc>(a);
  args.b = static_cast<Acc>(b);
  args.c = static_cast<Acc>(c);
  return args;
}

// ---------------------------------------------------------------------------
// float16/bfloat16 with d = e = kDim in {16, 32, 64, 128}: register-resident
// kernels on mma.sync (warp.cuh), in place of the shared-memory ones above.
//
// Pair features in 16 x 16 blocks. With slices x[L] = x[16 L .. 16 L + 16),
// the pair features (l, m), l <= m, are grouped by block pair (L, M), L <= M
// (nb = kDim / 16 slices, nb (nb + 1) / 2 block pairs, numbered as the pairs
// of features.h: pair_index(L, M, nb)). A block pair's 256 features
// x_l x_m (l in L, m in M) are, for fixed l, the slice x[M] times the scalar
// x_l: for 16 tokens an mma operand fragment is the fragment of the slice
// x[M] (from ldmatrix) times x_l of each fragment row's token, one mul2 per
// register. Features never exist outside registers. A diagonal block (L = M)
// is used whole: (l, m) and (m, l) both appear, the state's l > m entries
// mirror l < m, and the query side weights every entry by a (pairs l != m
// then get a + a = 2a, as phi requires).
//
// On sm_90a (kWgmmaProducts) the same kernels issue their big products as
// wgmma, A still the feature fragments each warp builds in registers (the
// warpgroup's 64 rows are the 4 warps' 16), B straight from the staged tile,
// which is why every such tile lies in core matrices
// (TileLayout::kCoreMatrices): the reduce's values (B MN-major, N = the value
// tile), the apply's operand rows (MN-major, N = kDim + 8: values and z in
// one product; kDim for dv) and the dx kernel's gradient tiles (K-major,
// N = kDim). The small per-warp products (the reduce's z pairs, linear and
// constant rows, z column) stay on mma.sync. A product's A registers are
// free once the next one is issued (wgmma_wait<1>), a stage's buffer once its
// products land (wgmma_wait<0> before the barrier that precedes its refill).
//
// Forward.
// * state_reduce_mma_kernel, one CTA per (block pair, value tile of
//   kValueTile columns, token split, head): for each 16 tokens t,
//       S[(l, m), :] += sum_t k_tl k_tm v_t        (mma, A = k_l k[M], B = v)
//   warp w owning l = 16 L + 4 w .. 16 L + 4 w + 3. The denominator column
//   is not a ones column of v but separate small products of the same
//   fragments: z[(l, m)] = sum_t k_tl k_tm = (K[M]^T K[L])_ml (warps 0, 1, one
//   n8 tile each), and on diagonal block pairs the linear features
//   S[l, :] = sum_t k_tl [1 | v_t] (warp 2, A = k[L]^T) and on block pair
//   (0, 0) the constant one S[0, :] = sum_t m_t [1 | v_t] (warp 3, A = the
//   mask m as one row). Masked keys are zero rows of the staged K, V tiles
//   (cp.async zero fill), so they add nothing.
//   Token splits write partial states; finalize_state_mma_kernel adds them in
//   a fixed order (deterministic) into the (B, H, F, e + 1) float state and
//   writes the apply's operand.
// * The operand, per head, rows of kDim + 8 columns, [S_f[1:] | S_f[0] | 0]:
//   256 rows per block pair (row 16 l' + m' for l = 16 L + l',
//   m = 16 M + m'), then d linear rows, then the constant row, zero-padded
//   to whole stages of kStageRows rows. Each row is multiplied by its query
//   coefficient (c, b, a on diagonal blocks, 2a off them) and by
//   state_scale (see efficient_apply_kernel) and rounded to T once.
// * efficient_apply_mma_kernel, one CTA per 128 queries (64 at d = 128) and
//   head, 32 (16) queries per warp as two (one) A fragments: for each 16
//   operand rows, A = q_l q[M] (mul2_half of the query slice fragment and
//   q_l of the fragment's rows, 8 consecutive l per stage read by one 16-byte
//   load per row), B = the rows' kDim value columns and the z column as one
//   more n8 tile, each B fragment feeding both A fragments:
//       o += A B_values,  den += A B_z
//   then y = sigma o / den. Operand rows are staged by cp.async in two
//   buffers of kStageRows rows, one stage ahead of the products
//   (OperandStream); the pair rows run as one flat loop over stages, so
//   nothing but the stage's own work repeats per stage.

// Whether the kernels of head dim kDim issue their big products as wgmma: on
// sm_90a from d = 32 on. At d = 16 a product is 16 or 24 columns wide, too
// narrow to amortise the fence, commit and wait around it: its main loops
// issue more instructions per tensor-core op than on mma.sync
// (benchmarks/results/sass_wgmma.md).
template <int kDim>
constexpr bool kWgmmaProducts = warp::kWgmma && kDim >= 32;

// Tokens per staged tile of the reduce: 128 at d = 16, where a tile of 64
// holds too few products (48 HMMA) to amortise its copies and barrier.
template <int kDim>
constexpr int kTokenTile = kDim == 16 ? 128 : 64;
constexpr int kStageRows = 128;  // operand rows per stage: 8 l of a block pair

template <int kDim>
struct PairBlocks {
  static constexpr int kSlices = kDim / 16;
  static constexpr int kPairs = kSlices * (kSlices + 1) / 2;
  // Accumulator columns per reduce CTA: 4 x kValueTile / 8 n8 tiles per warp
  // must stay in registers, so d = 128 splits its values in two.
  static constexpr int kValueTile = kDim < 64 ? kDim : 64;
  static constexpr int kValueTiles = kDim / kValueTile;
  static constexpr int kWidth = kDim + 8;  // operand row: values, z, padding
  static constexpr int64_t kLinearRow = 256 * kPairs;
  static constexpr int64_t kConstantRow = kLinearRow + kDim;
  static constexpr int64_t kRows =  // the constant row's 16-row step too
      (kConstantRow + 16 + kStageRows - 1) / kStageRows * kStageRows;
};

// Block pair p's slices (L, M), in the order of pair_index(L, M, nb).
template <int kSlices>
__device__ __forceinline__ void block_pair(int p, int& L, int& M) {
  L = 0;
  while (pair_row_start(L + 1, kSlices) <= p) ++L;
  M = L + p - static_cast<int>(pair_row_start(L, kSlices));
}

// Key side (forward state): x = k, y = v, masked keys are zero rows.
// Query side (backward dS): x = q, y = rs gY with the z-column weights
// w = -dl (dz = [-dl | rs gY], dz_rows_kernel).
template <typename T>
struct StateMmaArgs {
  TokenRows<T> x, y;
  const T* w;        // query side: (B H, w_stride) weights, zero-padded
  int64_t w_stride;  // a multiple of 8 tokens
  int64_t heads, tokens, features, chunk;  // chunk: tokens per split
  Mask mask;
  float* partial;  // (splits, B H, F, e + 1)
};

// A reduce warp's products beside its pair rows (state_reduce_mma_kernel);
// kAny: whichever its role is, decided per step.
enum class ExtraProducts { kNone, kZPairs, kLinear, kConstant, kAny };

template <typename T, int kDim, bool kQuery, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    state_reduce_mma_kernel(StateMmaArgs<T> p) {
  using Blocks = PairBlocks<kDim>;
  constexpr int kEv = Blocks::kValueTile, kN = kEv / 8;
  constexpr int kTokens = kTokenTile<kDim>;
  // K and V tiles in core matrices (TileLayout::kCoreMatrices): the values
  // are wgmma's B operand as they land.
  constexpr TileLayout kLayout = TileLayout::kCoreMatrices;
  constexpr int kTile = kTokens * kDim;
  const auto at = [](int r, int c) { return tile_offset<kDim, kLayout>(r, c); };
  extern __shared__ __align__(128) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);  // two stages each: x, y, flags, w
  T* vs = ks + 2 * kTile;
  T* flags = vs + 2 * kTile;  // 1 for the valid tokens of the chunk, else 0
  T* ws = flags + 2 * kTokens;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, quad = lane % 4;
  const int value_tile = blockIdx.x % Blocks::kValueTiles;
  // The lanes' ldmatrix rows (.trans, 16 x 16 per load; whole core matrices,
  // so that a 16-aligned block's offset adds to them): matrices {tokens +0,
  // +8} x {columns +0, +8} in the order A (km) or B (kl, the values) wants.
  const int km_lane = at(lane % 8 + lane / 16 * 8, lane / 8 % 2 * 8);
  const int kl_lane = at(lane % 8 + lane / 8 % 2 * 8, lane / 16 * 8);
  int L, M;
  block_pair<Blocks::kSlices>(blockIdx.x / Blocks::kValueTiles, L, M);
  const int64_t split = blockIdx.y, bh = blockIdx.z;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t begin = split * p.chunk;
  const int64_t end = min(p.tokens, begin + p.chunk);
  const int tiles =
      end > begin ? static_cast<int>((end - begin + kTokens - 1) / kTokens) : 0;
  // The warps' extra products (see above), uniform per warp and CTA.
  const bool z_pairs = !kQuery && value_tile == 0 && warp < 2;
  const bool linear = L == M && warp == 2;
  const bool constant = L == 0 && M == 0 && warp == 3;
  const ExtraProducts role = z_pairs    ? ExtraProducts::kZPairs
                             : linear   ? ExtraProducts::kLinear
                             : constant ? ExtraProducts::kConstant
                                        : ExtraProducts::kNone;
  // The query side's z column (acc_z), on the first value tile.
  [[maybe_unused]] const bool z_column = kQuery && value_tile == 0;
  const int col0 = value_tile * kEv;

  float acc[4][kN][4] = {};     // S rows (4 w + j, m) x kEv values
  float extra[kN + 1][4] = {};  // z pairs, or a linear / constant row block
  float acc_z[kQuery ? 4 : 1][4] = {};  // query side: z of rows (4 w + j, m)
  // B = ones in column 0: the z column of the key side's linear and
  // constant rows.
  const uint32_t ones_b = g == 0 ? warp::pack<T>(1.f, 1.f) : 0u;
  KeyCopies<kDim, kTokens, T, kLayout> rows(p.x, p.y, b, h, begin, end,
                                            kMasked ? &p.mask : nullptr);
  const auto load_tile = [&](int stage, int64_t t0) {  // the next tile, at t0
    // The flags are read by the next tile's products, after the barrier
    // that follows its copies; the previous reads of this stage ended at a
    // barrier.
    rows.copy(ks + stage * kTile, vs + stage * kTile, flags + stage * kTokens);
    rows.advance();
    if constexpr (kQuery) {  // w of the tile's tokens, 8 per 16 bytes
      if (threadIdx.x < kTokens / 8) {
        const int64_t t = t0 + 8 * threadIdx.x;
        const bool valid = t < p.w_stride;
        warp::cp_async_16(ws + stage * kTokens + 8 * threadIdx.x,
                          valid ? p.w + bh * p.w_stride + t : p.w, valid);
      }
    }
  };
  if (tiles > 0) load_tile(0, begin);
  warp::cp_async_commit();
  for (int tile = 0; tile < tiles; ++tile) {
    const int64_t t0 = begin + static_cast<int64_t>(tile) * kTokens;
    if (tile + 1 < tiles) {  // prefetch the next tile into the other stage
      load_tile((tile + 1) % 2, t0 + kTokens);
      warp::cp_async_commit();
      warp::cp_async_wait<1>();
    } else {
      warp::cp_async_wait<0>();
    }
    __syncthreads();
    // kt carries km's lane offset: with both offsets added per load instead,
    // ptxas schedules the d = 16 reduce's loop at 5.1 instr/HMMA, not 4.7.
    const T* kt = ks + tile % 2 * kTile + km_lane;
    const T* vt = vs + tile % 2 * kTile;
    // wgmma's B operand: the stage's values from column col0 on.
    [[maybe_unused]] const uint64_t values = warp::matrix_descriptor(
        warp::shared_address(vt + at(0, col0)), 16 * kDim, 128);
    // The tile's products, for this warp's extra products and z column as
    // compile-time constants: one copy of the loop per role, no branch in it
    // (kAny: the role is read per step, so that every warp runs the same
    // copy, as wgmma needs).
    const auto products = [&](auto extra_products, auto with_z_column) {
      constexpr ExtraProducts kExtra = decltype(extra_products)::value;
      constexpr bool kZColumn = decltype(with_z_column)::value;
#pragma unroll
      for (int kk = 0; kk < kTokens / 16; ++kk) {
        // A of K[M]^T (16 m x 16 tokens): .trans of the token-major tile.
        uint32_t km[4];
        warp::ldmatrix<4, true>(km, kt + at(kk * 16, M * 16));
        // B of K[L] (16 tokens x 16 l), two n8 tiles: {0, 1} l < 8, {2, 3}.
        uint32_t kl[4];
        warp::ldmatrix<4, true>(kl,
                                kt - km_lane + kl_lane + at(kk * 16, L * 16));
        // B of the tile's values, kN n8 tiles.
        const auto value_fragments = [&](uint32_t (&vb)[kN][2]) {
#pragma unroll
          for (int n = 0; n < kN / 2; ++n) {
            uint32_t f[4];
            warp::ldmatrix<4, true>(f,
                                    vt + kl_lane + at(kk * 16, col0 + n * 16));
            vb[2 * n][0] = f[0];
            vb[2 * n][1] = f[1];
            vb[2 * n + 1][0] = f[2];
            vb[2 * n + 1][1] = f[3];
          }
        };
        // k_l of tokens 2 quad, 2 quad + 1 (lo) and + 8 (hi) for this warp's
        // l = 4 warp + j: B register of lane 4 (l % 8) + quad in n8 tile l / 8.
        const uint32_t kl_lo = warp < 2 ? kl[0] : kl[2];
        const uint32_t kl_hi = warp < 2 ? kl[1] : kl[3];
        // The z column as B: query side w (rows 2 quad + {0, 1}, + 8 of
        // column 0), key side ones.
        uint32_t zb[2] = {ones_b, ones_b};
        if constexpr (kQuery) {
          const uint32_t* w = reinterpret_cast<const uint32_t*>(
              ws + tile % 2 * kTokens + kk * 16 + 2 * quad);
          zb[0] = g == 0 ? w[0] : 0u;
          zb[1] = g == 0 ? w[4] : 0u;
        }
        // A of rows (l = 4 warp + j, m in M): K[M]^T times k_l of its
        // tokens, one mul2 per register.
        const auto feature_a = [&](int j, uint32_t (&a)[4]) {
          const int source = (4 * warp + j) % 8 * 4 + quad;
          const uint32_t lo = __shfl_sync(0xffffffffu, kl_lo, source);
          const uint32_t hi = __shfl_sync(0xffffffffu, kl_hi, source);
          a[0] = warp::mul2<T>(km[0], lo);
          a[1] = warp::mul2<T>(km[1], lo);
          a[2] = warp::mul2<T>(km[2], hi);
          a[3] = warp::mul2<T>(km[3], hi);
        };
        const auto z_column_product = [&](int j, const uint32_t (&a)[4]) {
          if constexpr (kZColumn) {
            warp::mma_16816<T>(acc_z[j], a, zb);
          } else if constexpr (kQuery) {  // two value tiles: the first
            if (z_column) warp::mma_16816<T>(acc_z[j], a, zb);
          }
        };
        uint32_t vb[kN][2];
        if constexpr (kWgmmaProducts<kDim>) {
          // The warpgroup's 64 rows (4 warp + j, m) at once per j, B the
          // values straight from the staged tile: 16 tokens further on is
          // two row groups, 32 kDim bytes.
          uint32_t a[4][4];
#pragma unroll
          for (int j = 0; j < 4; ++j) feature_a(j, a[j]);
          warp::wgmma_fence();
#pragma unroll
          for (int j = 0; j < 4; ++j)
            warp::wgmma_rs<T, kEv, warp::Major::kMN>(acc[j], a[j],
                                                     values + kk * 2 * kDim);
          warp::wgmma_commit();
#pragma unroll
          for (int j = 0; j < 4; ++j) z_column_product(j, a[j]);
        } else {
          value_fragments(vb);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t a[4];
            feature_a(j, a);
#pragma unroll
            for (int n = 0; n < kN; ++n)
              warp::mma_16816<T>(acc[j][n], a, vb[n]);
            z_column_product(j, a);
          }
        }
        const auto extra_step = [&](auto role_of_warp) {
          constexpr ExtraProducts kRole = decltype(role_of_warp)::value;
          if constexpr (kRole == ExtraProducts::kZPairs) {
            // z (m, l) += sum_t k_tm k_tl, l in n8 tile `warp`
            const uint32_t kb[2] = {warp == 0 ? kl[0] : kl[2],
                                    warp == 0 ? kl[1] : kl[3]};
            warp::mma_16816<T>(extra[0], km, kb);
          } else if constexpr (kRole != ExtraProducts::kNone) {
            // Linear: A = K[L]^T (= km, L = M). Constant: A = the token
            // flags as row 0 (tokens 2 quad + {0, 1}, + 8), so z counts the
            // valid keys.
            uint32_t ea[4] = {km[0], km[1], km[2], km[3]};
            if constexpr (kRole == ExtraProducts::kConstant) {
              const uint32_t* m = reinterpret_cast<const uint32_t*>(
                  flags + tile % 2 * kTokens + kk * 16 + 2 * quad);
              ea[0] = g == 0 ? m[0] : 0u;
              ea[2] = g == 0 ? m[4] : 0u;
              ea[1] = ea[3] = 0u;
            }
            if constexpr (kWgmmaProducts<kDim>) value_fragments(vb);
#pragma unroll
            for (int n = 0; n < kN; ++n)
              warp::mma_16816<T>(extra[n], ea, vb[n]);
            warp::mma_16816<T>(extra[kN], ea, zb);
          }
        };
        using Extra = ExtraProducts;
        if constexpr (kExtra == Extra::kAny) {
          switch (role) {
            case Extra::kZPairs:
              if constexpr (!kQuery)
                extra_step(std::integral_constant<Extra, Extra::kZPairs>());
              break;
            case Extra::kLinear:
              extra_step(std::integral_constant<Extra, Extra::kLinear>());
              break;
            case Extra::kConstant:
              extra_step(std::integral_constant<Extra, Extra::kConstant>());
              break;
            default:
              break;
          }
        } else {
          extra_step(extra_products);
        }
        // At most this step's products in flight: the previous step's A
        // registers are free again.
        if constexpr (kWgmmaProducts<kDim>) warp::wgmma_wait<1>();
      }
      // The stage's values are read until its last products land.
      if constexpr (kWgmmaProducts<kDim>) warp::wgmma_wait<0>();
    };
    // The query side's z column is a constant where there is one value tile.
    using Extra = ExtraProducts;
    using ZColumn = std::bool_constant<kQuery && Blocks::kValueTiles == 1>;
    if constexpr (kWgmmaProducts<kDim>) {
      products(std::integral_constant<Extra, Extra::kAny>(), ZColumn());
    } else {
      switch (role) {
        case Extra::kZPairs:
          if constexpr (!kQuery)
            products(std::integral_constant<Extra, Extra::kZPairs>(),
                     ZColumn());
          break;
        case Extra::kLinear:
          products(std::integral_constant<Extra, Extra::kLinear>(), ZColumn());
          break;
        case Extra::kConstant:
          products(std::integral_constant<Extra, Extra::kConstant>(),
                   ZColumn());
          break;
        default:
          products(std::integral_constant<Extra, Extra::kNone>(), ZColumn());
          break;
      }
    }
    __syncthreads();  // every warp is done with this stage before its refill
  }
  warp::cp_async_wait<0>();  // no copy outlives the block (empty splits)

  // Partial state rows: feature f, columns [z | values] = [0 | 1 + c].
  const int d = kDim, e1 = kDim + 1;
  float* dst = p.partial + (split * gridDim.z + bh) * p.features * e1;
  const auto pair_row = [&](int l, int m) {
    return dst + (pair_feature_offset(d) + pair_index(l, m, d)) * e1;
  };
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = M * 16 + g + 8 * (i / 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int l = L * 16 + 4 * warp + j;
      if (l > m) continue;  // the mirrored half of a diagonal block
#pragma unroll
      for (int n = 0; n < kN; ++n)
        pair_row(l, m)[1 + col0 + n * 8 + 2 * quad + i % 2] = acc[j][n][i];
      if constexpr (kQuery) {
        if (value_tile == 0 && quad == 0 && i % 2 == 0)
          pair_row(l, m)[0] = acc_z[j][i];
      }
    }
    if (z_pairs) {
      const int l = L * 16 + 8 * warp + 2 * quad + i % 2;
      if (l <= m) pair_row(l, m)[0] = extra[0][i];
    } else if (linear || (constant && g == 0 && i < 2)) {
      // Linear feature 1 + m, or the constant feature 0 (row 0 only).
      float* row = dst + (linear ? linear_feature_offset() + m : 0) * e1;
#pragma unroll
      for (int n = 0; n < kN; ++n)
        row[1 + col0 + n * 8 + 2 * quad + i % 2] = extra[n][i];
      if (value_tile == 0 && quad == 0 && i % 2 == 0) row[0] = extra[kN][i];
    }
  }
}

// The weight of each feature in an operand (see above): the query side's
// coefficients {c, b, a, a, 2a} (forward apply, dq), the key side's
// {1, 1, 1, 1/2, 1} (dk, dv from dS: a diagonal block counts its pairs
// l != m twice).
struct FeatureWeights {
  float constant, linear, square, same_block, other_block;
};

inline FeatureWeights query_weights(double a, double b, double c) {
  return {float(c), float(b), float(a), float(a), float(2 * a)};
}
inline FeatureWeights key_weights() { return {1.f, 1.f, 1.f, 0.5f, 1.f}; }

// The sum of `splits` partial states, in split order, into `state` (unless
// null), and the operand of its products: weight * scale * head_scales[bh] *
// sum (head_scales may be null: 1), rounded to T once. Every operand element
// is written once (a pair l != m of a diagonal block twice, as (l, m) and
// (m, l)); padding stays zero.
template <typename T, int kDim>
__global__ void finalize_state_mma_kernel(const float* partial, int64_t splits,
                                          int64_t count, float* state,
                                          T* operand, FeatureWeights w,
                                          float scale,
                                          const float* head_scales) {
  using Blocks = PairBlocks<kDim>;
  constexpr int d = kDim, e1 = kDim + 1, width = Blocks::kWidth;
  constexpr int64_t features = 1 + d + d * (d + 1) / 2;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * count + i];
    if (state != nullptr) state[i] = sum;
    const int col = static_cast<int>(i % e1);
    const int64_t f = i / e1 % features, bh = i / (e1 * features);
    if (head_scales != nullptr) sum *= head_scales[bh];
    // Column col - 1 of row r, z (col 0) in column d; in core matrices.
    T* head = operand + bh * Blocks::kRows * width;
    const int column = col == 0 ? d : col - 1;
    const auto op = [&](int64_t r) -> T& {
      return head[tile_offset<width, TileLayout::kCoreMatrices>(
          static_cast<int>(r), column)];
    };
    if (f < linear_feature_offset()) {
      op(Blocks::kConstantRow) = Num<T>::narrow(w.constant * scale * sum);
    } else if (f < pair_feature_offset(d)) {
      op(Blocks::kLinearRow + f - linear_feature_offset()) =
          Num<T>::narrow(w.linear * scale * sum);
    } else {
      const int64_t pair = f - pair_feature_offset(d);
      int l = 0;
      while (pair_row_start(l + 1, d) <= pair) ++l;
      const int m = l + static_cast<int>(pair - pair_row_start(l, d));
      const int64_t block = pair_index(l / 16, m / 16, Blocks::kSlices) * 256;
      const float weight = l == m             ? w.square
                           : l / 16 == m / 16 ? w.same_block
                                              : w.other_block;
      const T value = Num<T>::narrow(weight * scale * sum);
      op(block + l % 16 * 16 + m % 16) = value;
      if (l != m && l / 16 == m / 16) op(block + m % 16 * 16 + l % 16) = value;
    }
  }
}

// A head's operand, kStages stages of kStage elements, streamed through two
// shared buffers by 16-byte cp.async. next() waits for stage s, the only copy
// group in flight (with the first stage, whatever the block staged before
// start()), and for this thread's wgmma products (the ones reading stage
// s - 1), and after the barrier, which also tells that every warp is done
// with stage s - 1, refills that stage's buffer with stage s + 1: its copy
// overlaps the products of stage s, at one barrier per stage. No copy is in
// flight after the last stage.
template <typename T, int kStage, int kStages>
struct StageStream {
  static constexpr int kChunks = kStage / 8;  // 16-byte copies per stage
  const T* src;  // this thread's first chunk of the next stage to load
  T* buffers;    // 2 kStage elements of shared memory
  int stage = 0;

  // head: the head's operand; shared: the two buffers.
  __device__ __forceinline__ StageStream(const T* head, T* shared)
      : src(head + threadIdx.x * 8), buffers(shared) {}
  // The next stage into buffer s % 2: the thread's chunks are kThreads
  // chunks apart, constant offsets from two pointers.
  __device__ __forceinline__ void load(int s) {
    T* dst = buffers + s % 2 * kStage + threadIdx.x * 8;
#pragma unroll
    for (int step = 0; step < (kChunks + kThreads - 1) / kThreads; ++step) {
      if (kChunks % kThreads == 0 || threadIdx.x + step * kThreads < kChunks)
        warp::cp_async_16(dst + step * kThreads * 8, src + step * kThreads * 8,
                          true);
    }
    src += kStage;
  }
  __device__ __forceinline__ void start() {
    load(0);
    warp::cp_async_commit();
  }
  __device__ __forceinline__ const T* next() {
    warp::cp_async_wait<0>();
    warp::wgmma_wait<0>();
    __syncthreads();
    if (stage + 1 < kStages) {
      load(stage + 1);
      warp::cp_async_commit();
    }
    return buffers + stage++ % 2 * kStage;
  }
};

// The operand rows of the apply kernel, kStageRows a stage.
template <typename T, int kDim>
using OperandStream = StageStream<T, kStageRows * PairBlocks<kDim>::kWidth,
                                  PairBlocks<kDim>::kRows / kStageRows>;

// The pair stages of a head's operand in row order: block pair (L, M) in the
// order of pair_index, 8 l per stage (l0 = 0, 8); step() moves to the next.
template <int kSlices>
struct PairStage {
  static constexpr int kCount = kSlices * (kSlices + 1) / 2 * 256 / kStageRows;
  int L = 0, M = 0, l0 = 0;
  __device__ __forceinline__ void step() {
    l0 += kStageRows / 16;
    if (l0 == 16) {
      l0 = 0;
      if (++M == kSlices) M = ++L;
    }
  }
};

// Half `high` of a register of 16-bit operands, widened to float (bfloat16:
// the bits moved to the top, one instruction).
template <typename T>
__device__ __forceinline__ float widen_half(uint32_t reg, bool high) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t bits = high ? reg & 0xffff0000u : reg << 16;
    float x;
    memcpy(&x, &bits, 4);
    return x;
  } else {
    const uint16_t bits = static_cast<uint16_t>(high ? reg >> 16 : reg);
    return Num<T>::widen(*reinterpret_cast<const T*>(&bits));
  }
}

// One 16-byte load: 8 consecutive 16-bit values as 4 registers of pairs.
template <typename T>
__device__ __forceinline__ void load_pairs(uint32_t (&r)[4], const T* src) {
  const uint4 v = *reinterpret_cast<const uint4*>(src);
  r[0] = v.x;
  r[1] = v.y;
  r[2] = v.z;
  r[3] = v.w;
}

// What efficient_apply_mma_kernel computes from the feature rows x of its
// tokens and an operand: the forward's output y = sigma (phi(q) S) / den
// (x = q, the state's operand), or the key side's value gradient dv =
// phi(k) dS over the value columns (x = k, the operand of dS with key
// weights; docs/math.md §3), zero for padded keys.
enum class ApplyOutput { kAttention, kValueGradient };

template <typename T>
struct ApplyMmaArgs {
  TokenRows<T> q;    // the tokens' rows: q, or k for kValueGradient
  const T* operand;  // (B H, rows, kDim + 8)
  int64_t heads, tokens;
  int e;
  RowValues<float> sigma;  // kAttention
  float state_scale;       // kAttention
  // kValueGradient: key padding, and float16's (B H) gradient scales (null:
  // 1; see DxTilesArgs::grad_scale).
  Mask mask;
  const float* grad_scale;
};

// A fragments (16 queries each) per warp of the apply kernel: two up to
// d = 64, so that every B fragment loaded from an operand stage feeds two
// mma; one at d = 128, where two 16 x 128 accumulators would not fit in
// registers.
template <int kDim>
struct ApplyTile {
  static constexpr int kFragments = kDim <= 64 ? 2 : 1;
  static constexpr int kQueries = 16 * (kThreads / 32) * kFragments;  // a CTA's
};

template <int kDim>
constexpr size_t apply_mma_smem() {
  return size_t(ApplyTile<kDim>::kQueries + 2 * kStageRows) * (kDim + 8) * 2;
}

// Two stages of the x and y tiles, of the token flags and of the query
// side's w.
template <int kDim, bool kQuery>
constexpr size_t reduce_mma_smem() {
  constexpr size_t tokens = kTokenTile<kDim>;
  return (4 * tokens * kDim + (kQuery ? 4 : 2) * tokens) * 2;
}

template <typename T, int kDim, ApplyOutput kOut>
__global__ void __launch_bounds__(kThreads)
    efficient_apply_mma_kernel(ApplyMmaArgs<T> p, T* out, float* den) {
  constexpr bool kGradient = kOut == ApplyOutput::kValueGradient;
  using Blocks = PairBlocks<kDim>;
  constexpr int width = Blocks::kWidth, kSlices = Blocks::kSlices;
  constexpr int kFrags = ApplyTile<kDim>::kFragments;
  constexpr int kQueries = ApplyTile<kDim>::kQueries;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  const int lane = threadIdx.x % 32, warp_row = threadIdx.x / 32 * 16 * kFrags;
  const int g = lane / 4, quad = lane % 4;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kQueries;
  OperandStream<T, kDim> stream(p.operand + bh * Blocks::kRows * width,
                                qs + kQueries * width);
  if constexpr (kGradient) {  // padded keys as zero rows
    KeyCopies<kDim, kQueries, T>(
        p.q, p.q, b, h, i0, p.tokens,
        p.mask.key_padding != nullptr ? &p.mask : nullptr)
        .copy_keys(qs);
  } else {
    load_rows<kDim, kQueries>(qs, p.q, b, h, i0, p.tokens);
  }
  stream.start();  // the rows land with stage 0

  // o (the kDim / 8 value tiles) and z (the last tile: the denominator in
  // its column 0; a gradient has none) side by side, as one wgmma product
  // of N = width fills them.
  float acc[kFrags][kDim / 8 + 1][4] = {};
  // This lane's ldmatrix rows: A fragments of the warp's queries, B (.trans)
  // of 16 operand rows and of their z column (the operand in core matrices,
  // TileLayout::kCoreMatrices).
  const T* q_a = qs + (warp_row + lane % 16) * width + lane / 16 * 8;
  // (col a multiple of 8: whole core matrices, so offsets add.)
  const int b_lane = tile_offset<width, TileLayout::kCoreMatrices>(
      lane % 8 + lane / 8 % 2 * 8, lane / 16 * 8);
  const auto b_at = [&](int col) {
    return b_lane + tile_offset<width, TileLayout::kCoreMatrices>(0, col);
  };
  // 16 operand rows times the A fragments: o += A values, z += A z-column.
  const auto product = [&](const uint32_t (&a)[kFrags][4], const T* rows) {
    if constexpr (kWgmmaProducts<kDim>) {
      // The warpgroup's 64 rows per fragment; B straight from the stage.
      const uint64_t desc =
          warp::matrix_descriptor(warp::shared_address(rows), 16 * width, 128);
      warp::wgmma_fence();
#pragma unroll
      for (int fr = 0; fr < kFrags; ++fr)
        warp::wgmma_rs<T, kGradient ? kDim : width, warp::Major::kMN>(
            acc[fr], a[fr], desc);
      warp::wgmma_commit();
      // The previous product's A registers are free again.
      warp::wgmma_wait<1>();
    } else {
#pragma unroll
      for (int n = 0; n < kDim / 16; ++n) {
        uint32_t f[4];
        warp::ldmatrix<4, true>(f, rows + b_at(n * 16));
        const uint32_t lo[2] = {f[0], f[1]}, hi[2] = {f[2], f[3]};
#pragma unroll
        for (int fr = 0; fr < kFrags; ++fr) {
          warp::mma_16816<T>(acc[fr][2 * n], a[fr], lo);
          warp::mma_16816<T>(acc[fr][2 * n + 1], a[fr], hi);
        }
      }
      if constexpr (!kGradient) {
        uint32_t f[2];
        warp::ldmatrix<2, true>(f, rows + b_at(kDim));
#pragma unroll
        for (int fr = 0; fr < kFrags; ++fr)
          warp::mma_16816<T>(acc[fr][kDim / 8], a[fr], f);
      }
    }
  };

  // Pair rows: stage (L, M, l0) holds l = 16 L + l0 + j, j < 8, 16 rows each.
  PairStage<kSlices> at;
  for (int s = 0; s < PairStage<kSlices>::kCount; ++s) {
    const T* st = stream.next();
    uint32_t qm[kFrags][4];     // A fragments of q[M]
    uint32_t ql[kFrags][2][4];  // q_l of rows g and g + 8: pairs (l, l + 1)
#pragma unroll
    for (int fr = 0; fr < kFrags; ++fr) {
      warp::ldmatrix<4>(qm[fr], q_a + 16 * fr * width + 16 * at.M);
#pragma unroll
      for (int r = 0; r < 2; ++r)
        load_pairs(ql[fr][r], qs + (warp_row + 16 * fr + g + 8 * r) * width +
                                  16 * at.L + at.l0);
    }
#pragma unroll
    for (int j = 0; j < kStageRows / 16; ++j) {
      uint32_t a[kFrags][4];
#pragma unroll
      for (int fr = 0; fr < kFrags; ++fr) {
        // A rows g (registers 0, 2) and g + 8 (1, 3) times their q_l.
        const uint32_t x_g = ql[fr][0][j / 2], x_g8 = ql[fr][1][j / 2];
        const bool high = j % 2 == 1;
        a[fr][0] = warp::mul2_half<T>(qm[fr][0], x_g, high);
        a[fr][1] = warp::mul2_half<T>(qm[fr][1], x_g8, high);
        a[fr][2] = warp::mul2_half<T>(qm[fr][2], x_g, high);
        a[fr][3] = warp::mul2_half<T>(qm[fr][3], x_g8, high);
      }
      product(a, st + j * 16 * width);
    }
    at.step();
  }
  // The linear rows (A = q[u]) and the constant row (A = ones in column 0).
  constexpr int kUnits = kSlices + 1;
#pragma unroll
  for (int u0 = 0; u0 < kUnits; u0 += kStageRows / 16) {
    const T* st = stream.next();
#pragma unroll
    for (int j = 0; j < kStageRows / 16; ++j) {
      const int u = u0 + j;
      uint32_t a[kFrags][4];
      if (u < kSlices) {
#pragma unroll
        for (int fr = 0; fr < kFrags; ++fr)
          warp::ldmatrix<4>(a[fr], q_a + 16 * fr * width + 16 * u);
        product(a, st + j * 16 * width);
      } else if (u == kSlices) {
        const uint32_t one = quad == 0 ? warp::pack<T>(1.f, 0.f) : 0u;
#pragma unroll
        for (int fr = 0; fr < kFrags; ++fr) {
          a[fr][0] = a[fr][1] = one;
          a[fr][2] = a[fr][3] = 0u;
        }
        product(a, st + j * 16 * width);
      }
    }
  }
  warp::wgmma_wait<0>();  // the last products, before the epilogue reads them
  const float grad_scale =
      kGradient && p.grad_scale != nullptr ? p.grad_scale[bh] : 1.f;
#pragma unroll
  for (int fr = 0; fr < kFrags; ++fr) {
    const int64_t row0 = i0 + warp_row + 16 * fr;
    float scale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row0 + g + 8 * r;
      if constexpr (kGradient) {
        scale[r] =
            row < p.tokens && p.mask.key_valid(b, row) ? grad_scale : 0.f;
      } else {
        // den of rows g, g + 8 sits in column 0 of z: lane 4 g.
        const float row_sum =
            __shfl_sync(0xffffffffu, acc[fr][kDim / 8][2 * r], g * 4);
        scale[r] = row < p.tokens
                       ? p.sigma.at(b, h, row) * safe_reciprocal(row_sum)
                       : 0.f;
        if (quad == 0 && row < p.tokens)
          den[bh * p.tokens + row] = row_sum / p.state_scale;
      }
    }
    store_rows<T, kDim>(out + bh * p.tokens * p.e, acc[fr], row0, p.tokens, p.e,
                        scale, lane);
  }
}

// The backward's feature gradients dq (query side, from the state) and dk
// (key side, from dS): efficient_dx_tiles_kernel. (The key side's dv is the
// apply kernel's product with the dS operand, ApplyOutput::kValueGradient.)
template <typename T>
struct DxTilesArgs {
  TokenRows<T> x;  // q (query side) or k (key side)
  TokenRows<T> y;  // query side: rs gY (dz_rows_kernel); key side: v
  // The z column of y' = [y | w]: query side -dl, (B H, w_stride); key side
  // null, the ones of [v | 1].
  const T* w;
  int64_t w_stride;
  // float16: (B H) powers of two by which the gradients are multiplied, the
  // inverse of the scales in the tiles and y (mma_backward); null: 1.
  const float* grad_scale;
  int64_t heads, tokens;
  Mask mask;  // key side: key padding (padded keys get zero gradients)
};

// The feature gradients through the tensor cores (docs/math.md §3). With a
// state S (B H, F, e + 1) whose pair (l, m) term is w_lm x_l x_m S_lm . y'
// for a token's rows x and y' = [y | w], the gradient of every pair and
// linear term is
//   dx_t[p] = sum_{q, c} x_t[q] y'_t[c] W[p][q][c] + sum_c y'_t[c] Wl[p][c]
// with W[p][q][c] = (p == q ? w_pp 2 : w_pq) S_{min(p, q), max(p, q)}[c]:
// * query side, dq from the state (weights a on squares, 2a off them):
//   W[p][p] = W[p][q] = 2a S, Wl = b S_linear, y' = dz = [rs gY | -dl];
// * key side, dk from dS (weights 1): W[p][p] = 2 dS_pp, W[p][q] = dS_pq,
//   Wl = dS_linear, y' = [v | 1].
// A product with A_t[(q, c)] = x_t[q] y'_t[c], built per c as the x fragment
// times y'_t[c] of its rows (one mul2 per register, as the reduce builds its
// features), and B the tiles W[.][.][c]: g = S y' and its contraction with x
// in one product, with no per-element work beside the tensor cores and the z
// column one more tile (c = e).
// A tile is kDim x kDim in core matrices (TileLayout::kCoreMatrices): rows p
// are B's columns n, so B is K-major for wgmma, and ldmatrix reads it without
// bank conflicts.
template <int kDim>
struct GradientTiles {
  static constexpr int kTile = kDim * kDim;  // elements of one tile
  TS_HOST_DEVICE static constexpr int at(int p, int q) {
    return tile_offset<kDim, TileLayout::kCoreMatrices>(p, q);
  }
  // e + 1 pair tiles (c = 0 .. e - 1 the values, c = e the z column), then
  // the linear tile Wl[p][c], c < e
  static constexpr int kTiles = kDim + 2;
  // Tiles per stage: 6 to 34 KB a stage (the smaller tiles share a stage's
  // barrier and copies), and whole stages of zero tiles after kTiles.
  static constexpr int kStageTiles = 128 / kDim;
  static constexpr int kStages = (kTiles + kStageTiles - 1) / kStageTiles;
  static constexpr int kStoredTiles = kStages * kStageTiles;
};

// The tiles (B H, kStoredTiles, kDim x kDim) of a state (B H, F, e + 1): the
// pair tiles W[p][q][c] = (p == q ? diagonal : other) S_pq[c], the linear tile
// linear S_linear[p][c], times head_scales[bh] (null: 1), rounded to T; the
// linear z column S_linear[p][z] likewise into linear_z (B H, kDim), float.
// Padding columns stay as allocated (zeros).
template <typename T, int kDim>
__global__ void gradient_tiles_kernel(const float* state, int64_t count,
                                      T* tiles, float* linear_z, float diagonal,
                                      float other, float linear,
                                      const float* head_scales) {
  using Tiles = GradientTiles<kDim>;
  constexpr int d = kDim, e1 = kDim + 1;
  constexpr int64_t features = 1 + d + d * (d + 1) / 2;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int q = static_cast<int>(i % d), p = static_cast<int>(i / d % d);
    const int t = static_cast<int>(i / (d * d) % Tiles::kTiles);
    const int64_t bh = i / (int64_t(d) * d * Tiles::kTiles);
    const float factor = head_scales != nullptr ? head_scales[bh] : 1.f;
    const float* S = state + bh * features * e1;
    float value;
    if (t <= d) {  // pair tile c = t; state column 0 is z
      const int col = t < d ? t + 1 : 0, l = min(p, q), m = max(p, q);
      value = (p == q ? diagonal : other) *
              S[(pair_feature_offset(d) + pair_index(l, m, d)) * e1 + col];
    } else {  // linear tile, column c = q
      const float* row = S + (linear_feature_offset() + p) * e1;
      value = linear * row[q + 1];
      if (q == 0) linear_z[bh * d + p] = linear * factor * row[0];
    }
    tiles[(bh * Tiles::kStoredTiles + t) * Tiles::kTile + Tiles::at(p, q)] =
        Num<T>::narrow(factor * value);
  }
}

// dq or dk: kFrags fragments of 16 tokens per warp (2 at d <= 32, where a
// tile's B fragments would feed too few HMMA, else 1), the head's tiles
// streamed through two shared buffers of kStageTiles tiles by cp.async.
template <int kDim>
TS_HOST_DEVICE constexpr int dx_fragments() {
  return kDim <= 32 ? 2 : 1;
}

template <int kDim>
constexpr size_t dx_tiles_smem() {
  constexpr size_t tokens = 64 * dx_fragments<kDim>();
  return (2 * tokens * (kDim + 8) + tokens +
          2 * GradientTiles<kDim>::kStageTiles * GradientTiles<kDim>::kTile) *
         2;
}

template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads)
    efficient_dx_tiles_kernel(DxTilesArgs<T> p, const T* tiles,
                              const float* linear_z, T* grad_x) {
  using Tiles = GradientTiles<kDim>;
  constexpr int width = kDim + 8, kSlices = kDim / 16, kN = kDim / 8;
  constexpr int kFrags = dx_fragments<kDim>(), kTokens = 64 * kFrags;
  constexpr int kStage = Tiles::kStageTiles * Tiles::kTile;
  extern __shared__ __align__(128) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);
  T* ys = xs + kTokens * width;
  T* ws = ys + kTokens * width;
  T* buffers = ws + kTokens;  // two stages
  const int lane = threadIdx.x % 32, warp_row = threadIdx.x / 32 * 16 * kFrags;
  const int g = lane / 4, quad = lane % 4;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTokens;
  const T* head_tiles = tiles + bh * Tiles::kStoredTiles * Tiles::kTile;
  StageStream<T, kStage, Tiles::kStages> stream(head_tiles, buffers);
  // Padded keys as zero rows of x and y: no term of theirs reaches the
  // products, whatever their values.
  const Mask* padding = p.mask.key_padding != nullptr ? &p.mask : nullptr;
  load_key_rows<kDim, kTokens>(xs, ys, static_cast<T*>(nullptr), p.x, p.y, b, h,
                               i0, p.tokens, padding);
  if (p.w == nullptr) {
    if (threadIdx.x < kTokens) ws[threadIdx.x] = Num<T>::narrow(1.f);
  } else if (threadIdx.x < kTokens / 8) {
    const int64_t t = i0 + 8 * threadIdx.x;
    const bool valid = t < p.w_stride;
    warp::cp_async_16(ws + 8 * threadIdx.x,
                      valid ? p.w + bh * p.w_stride + t : p.w, valid);
  }
  stream.start();  // x, y, w land with stage 0
  warp::cp_async_wait<0>();
  __syncthreads();
  uint32_t xf[kFrags][kSlices][4], yf[kFrags][kSlices][4];
  warp::load_a<kDim, width>(xf, xs + warp_row * width, lane);
  warp::load_a<kDim, width>(yf, ys + warp_row * width, lane);
  const uint16_t* w_bits = reinterpret_cast<const uint16_t*>(ws);
  const int row_g = warp_row + g;  // fragment fr: + 16 fr, and + 8
  // ldmatrix rows of B (rows p, 16 columns from a tile's column 16 k):
  // matrices {rows +0, +8} x {columns +0, +8}, registers {0, 1} n8 tile
  // p0 .. p0 + 7, {2, 3} the next (p0, q0 multiples of 8: whole core
  // matrices, so offsets add).
  const int b_lane = Tiles::at(lane % 8 + lane / 16 * 8, lane / 8 % 2 * 8);
  const auto b_at = [&](int p0, int q0) { return b_lane + Tiles::at(p0, q0); };
  float dx[kFrags][kN][4] = {};
  // dx += A B^T for one tile, A of kSlices k-steps per fragment: every B
  // fragment feeds all fragments.
  const auto tile_product = [&](const uint32_t (&a)[kFrags][kSlices][4],
                                const T* tile) {
    if constexpr (kWgmmaProducts<kDim>) {
      // The warpgroup's 64 tokens per fragment, all kDim columns p at once;
      // k-step k starts 2 core matrices (256 bytes) further on.
      const uint64_t desc =
          warp::matrix_descriptor(warp::shared_address(tile), 128, 16 * kDim);
      warp::wgmma_fence();
#pragma unroll
      for (int k = 0; k < kSlices; ++k)
#pragma unroll
        for (int fr = 0; fr < kFrags; ++fr)
          warp::wgmma_rs<T, kDim, warp::Major::kK>(dx[fr], a[fr][k],
                                                   desc + 16 * k);
      warp::wgmma_commit();
      // The previous tile's A registers are free again.
      warp::wgmma_wait<1>();
    } else {
#pragma unroll
      for (int k = 0; k < kSlices; ++k)
#pragma unroll
        for (int n = 0; n < kDim / 16; ++n) {
          uint32_t f[4];
          warp::ldmatrix<4>(f, tile + b_at(n * 16, 16 * k));
          const uint32_t lo[2] = {f[0], f[1]}, hi[2] = {f[2], f[3]};
#pragma unroll
          for (int fr = 0; fr < kFrags; ++fr) {
            warp::mma_16816<T>(dx[fr][2 * n], a[fr][k], lo);
            warp::mma_16816<T>(dx[fr][2 * n + 1], a[fr][k], hi);
          }
        }
    }
  };
  // Pair tile c with A = x times y'_t[c] of its rows: half `high` of
  // pairs[fr][r] holds y'_t[c] of row 16 fr + g + 8 r (mul2_half multiplies
  // by it in place).
  const auto pair_tile = [&](const uint32_t (&pairs)[kFrags][2], bool high,
                             const T* tile) {
    uint32_t a[kFrags][kSlices][4];
#pragma unroll
    for (int fr = 0; fr < kFrags; ++fr)
#pragma unroll
      for (int k = 0; k < kSlices; ++k)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          a[fr][k][r] =
              warp::mul2_half<T>(xf[fr][k][r], pairs[fr][r % 2], high);
    tile_product(a, tile);
  };
  // The value tiles c < e, kStageTiles a stage: y'_t[c] of the fragments'
  // rows from y, the stage's c in one load per row (kWords 32-bit words).
  constexpr int kValueStages = kDim / Tiles::kStageTiles;
  constexpr int kWords = Tiles::kStageTiles > 1 ? Tiles::kStageTiles / 2 : 1;
  using Words =
      std::conditional_t<kWords == 4, uint4,
                         std::conditional_t<kWords == 2, uint2, uint32_t>>;
  const T* y_rows = ys + row_g * width;
  for (int s = 0; s < kValueStages; ++s) {
    const T* st = stream.next();
    const int c0 = s * Tiles::kStageTiles;
    uint32_t words[kFrags][2][kWords];
#pragma unroll
    for (int fr = 0; fr < kFrags; ++fr)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const Words w = *reinterpret_cast<const Words*>(
            y_rows + (16 * fr + 8 * r) * width + c0 / 2 * 2);
        memcpy(words[fr][r], &w, sizeof(w));
      }
#pragma unroll
    for (int tt = 0; tt < Tiles::kStageTiles; ++tt) {
      const int c = c0 + tt, word = (c - c0 / 2 * 2) / 2;
      uint32_t pairs[kFrags][2];
#pragma unroll
      for (int fr = 0; fr < kFrags; ++fr)
#pragma unroll
        for (int r = 0; r < 2; ++r) pairs[fr][r] = words[fr][r][word];
      pair_tile(pairs, c % 2 == 1, st + tt * Tiles::kTile);
    }
  }
  // Then the z tile (c = e, y'_t[e] = w_t) and the linear tile (A = y).
#pragma unroll
  for (int t = kDim; t < Tiles::kTiles; ++t) {
    const int s = t / Tiles::kStageTiles;
    const T* st =
        t % Tiles::kStageTiles == 0 ? stream.next() : buffers + s % 2 * kStage;
    const T* tile = st + t % Tiles::kStageTiles * Tiles::kTile;
    if (t == kDim) {
      uint32_t pairs[kFrags][2];
#pragma unroll
      for (int fr = 0; fr < kFrags; ++fr)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          pairs[fr][r] = w_bits[row_g + 16 * fr + 8 * r];
      pair_tile(pairs, false, tile);
    } else {
      tile_product(yf, tile);
    }
  }
  warp::wgmma_wait<0>();  // the last products, before the epilogue reads them
  // The linear z column: dx[p] += w_t linear_z[p]; then the gradients'
  // scale (float16) on the rows that exist (zero for padded keys).
  const float* lz = linear_z + bh * kDim;
  const float grad_scale = p.grad_scale != nullptr ? p.grad_scale[bh] : 1.f;
#pragma unroll
  for (int fr = 0; fr < kFrags; ++fr) {
    float z[2], scale[2];
    const int64_t row0 = i0 + warp_row + 16 * fr;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      z[r] = widen_half<T>(w_bits[row_g + 16 * fr + 8 * r], false);
      const int64_t row = row0 + g + 8 * r;
      scale[r] = row < p.tokens && p.mask.key_valid(b, row) ? grad_scale : 0.f;
    }
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        dx[fr][n][i] += z[i / 2] * lz[8 * n + 2 * quad + i % 2];
    store_rows<T, kDim>(grad_x + bh * p.tokens * kDim, dx[fr], row0, p.tokens,
                        kDim, scale, lane);
  }
}

// dS = the splits' sums times the query features' coefficients (c, b, and a
// on the diagonal pairs, 2a off it): the reduce summed the plain q_l q_m.
template <int kDim>
__global__ void finalize_dstate_mma_kernel(const float* partial, int64_t splits,
                                           int64_t count, float* dstate,
                                           float a, float b, float c) {
  constexpr int d = kDim, e1 = kDim + 1;
  constexpr int64_t features = 1 + d + d * (d + 1) / 2;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < count; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * count + i];
    const int64_t f = i / e1 % features;
    float coef = 2 * a;
    if (f < linear_feature_offset()) {
      coef = c;
    } else if (f < pair_feature_offset(d)) {
      coef = b;
    } else {
      const int64_t pair = f - pair_feature_offset(d);
      for (int l = 0; l < d && pair_row_start(l, d) <= pair; ++l)
        if (pair_row_start(l, d) == pair) coef = a;  // pair (l, l)
    }
    dstate[i] = coef * sum;
  }
}

// Runs state_reduce_mma_kernel over `tokens`; returns the partial sums
// (`out` itself when there is one split, as `one_split` asks) and the number
// of splits.
template <typename T, int kDim, bool kQuery>
std::pair<at::Tensor, int64_t> mma_state_reduce(StateMmaArgs<T> args,
                                                bool masked, int64_t bh,
                                                at::Tensor& out,
                                                bool one_split = false) {
  using Blocks = PairBlocks<kDim>;
  args.features = feature_count<int64_t>(kDim);
  const auto reduce = kQuery ? state_reduce_mma_kernel<T, kDim, kQuery, false>
                      : masked
                          ? state_reduce_mma_kernel<T, kDim, kQuery, true>
                          : state_reduce_mma_kernel<T, kDim, kQuery, false>;
  constexpr size_t bytes = reduce_mma_smem<kDim, kQuery>();
  allow_shared_memory(reduce, bytes);
  // Token splits: as many as fill the resident CTAs of one whole wave.
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, reduce, kThreads, bytes));
  const int64_t capacity =
      std::max(1, per_sm) *
      static_cast<int64_t>(
          at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t base = Blocks::kPairs * Blocks::kValueTiles * bh;
  const int64_t token_tiles =
      (args.tokens + kTokenTile<kDim> - 1) / kTokenTile<kDim>;
  int64_t splits = one_split
                       ? 1
                       : std::clamp<int64_t>(capacity / base, 1,
                                             std::max<int64_t>(1, token_tiles));
  const int64_t chunk_tiles =
      std::max<int64_t>(1, (token_tiles + splits - 1) / splits);
  splits = std::max<int64_t>(1, (token_tiles + chunk_tiles - 1) / chunk_tiles);
  args.chunk = chunk_tiles * kTokenTile<kDim>;
  at::Tensor partial =
      splits == 1 ? out : at::empty({splits, out.numel()}, out.options());
  args.partial = partial.data_ptr<float>();
  reduce<<<dim3(Blocks::kPairs * Blocks::kValueTiles, splits, bh), kThreads,
           bytes, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partial, splits};
}

// finalize_state_mma_kernel: the operand (B H, rows, kDim + 8) of the
// `splits` partial states in `partial` (B, H, F, kDim + 1 each), whose sum
// goes to `state` too unless it is null; head_scales as there.
template <typename T, int kDim>
at::Tensor state_operand(const at::Tensor& partial, int64_t splits,
                         at::Tensor* state, FeatureWeights weights, float scale,
                         const at::TensorOptions& options,
                         const float* head_scales = nullptr) {
  using Blocks = PairBlocks<kDim>;
  const int64_t count = partial.numel() / splits;
  const int64_t bh = count / (feature_count<int64_t>(kDim) * (kDim + 1));
  at::Tensor operand = at::zeros({bh, Blocks::kRows, Blocks::kWidth}, options);
  finalize_state_mma_kernel<T, kDim>
      <<<std::min<int64_t>((count + 255) / 256, grid_stride_blocks()), 256, 0,
         at::cuda::getCurrentCUDAStream()>>>(
          partial.data_ptr<float>(), splits, count,
          state != nullptr ? state->data_ptr<float>() : nullptr,
          reinterpret_cast<T*>(operand.data_ptr()), weights, scale,
          head_scales);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return operand;
}

// Runs efficient_apply_mma_kernel over p.tokens rows of B H = gridDim.y heads.
template <typename T, int kDim, ApplyOutput kOut>
void mma_apply(const ApplyMmaArgs<T>& p, int64_t bh, T* out, float* den) {
  const auto apply = efficient_apply_mma_kernel<T, kDim, kOut>;
  constexpr size_t bytes = apply_mma_smem<kDim>();
  allow_shared_memory(apply, bytes);
  constexpr int rows = ApplyTile<kDim>::kQueries;
  apply<<<dim3((p.tokens + rows - 1) / rows, bh), kThreads, bytes,
          at::cuda::getCurrentCUDAStream()>>>(p, out, den);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs efficient_dx_tiles_kernel over p.tokens rows: the gradient tiles of
// `state` (B, H, F, kDim + 1; weights as gradient_tiles_kernel's, times
// head_scales, null: 1), then their products into grad_x.
template <typename T, int kDim>
void mma_dx_tiles(const DxTilesArgs<T>& p, const at::Tensor& state,
                  double diagonal, double other, double linear,
                  const float* head_scales, at::Tensor& grad_x) {
  using Tiles = GradientTiles<kDim>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t bh = state.size(0) * state.size(1);
  const auto options = grad_x.options();
  at::Tensor tiles =
      at::zeros({bh, Tiles::kStoredTiles, Tiles::kTile}, options);
  at::Tensor linear_z = at::empty({bh, kDim}, options.dtype(at::kFloat));
  const int64_t count = bh * Tiles::kTiles * kDim * kDim;
  gradient_tiles_kernel<T, kDim>
      <<<std::min<int64_t>((count + 255) / 256, grid_stride_blocks()), 256, 0,
         stream>>>(state.data_ptr<float>(), count,
                   reinterpret_cast<T*>(tiles.data_ptr()),
                   linear_z.data_ptr<float>(), static_cast<float>(diagonal),
                   static_cast<float>(other), static_cast<float>(linear),
                   head_scales);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto kernel = efficient_dx_tiles_kernel<T, kDim>;
  constexpr size_t bytes = dx_tiles_smem<kDim>();
  allow_shared_memory(kernel, bytes);
  constexpr int rows = 64 * dx_fragments<kDim>();
  kernel<<<dim3((p.tokens + rows - 1) / rows, bh), kThreads, bytes, stream>>>(
      p, reinterpret_cast<const T*>(tiles.data_ptr()),
      linear_z.data_ptr<float>(), reinterpret_cast<T*>(grad_x.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Causal (causal.cu): with chunks > 0, the heads here are the chunks of C
// tokens of causal.cu's sequences, `chunks` heads in a row per sequence. The
// queries of chunk c read the state of the chunks before it, S_{<c}: the
// exclusive prefix sum of the chunks' states. The keys of chunk c reach the
// queries of every later chunk, so their gradients read dS_{>c}: the
// exclusive suffix sum of the chunks' dS. Both sums run over whole chunks in
// order, never a total minus a part (which loses low-precision accuracy),
// in place on (heads, 1, F, e + 1). A decoding step starts from the state
// of the tokens before it (chunks.before) and returns the state after its
// last chunk (chunks.after).
void states_before_chunks(at::Tensor& state, const CausalChunks& chunks) {
  const int64_t n = chunks.count;
  const at::Tensor rows = state.view({-1, n, state.size(2) * state.size(3)});
  const at::Tensor through = rows.cumsum(1);  // S_{<= c}
  if (chunks.after != nullptr) {
    *chunks.after =
        through.select(1, n - 1).view({-1, state.size(2), state.size(3)});
    if (chunks.before != nullptr) chunks.after->add_(*chunks.before);
  }
  if (n > 1) rows.narrow(1, 1, n - 1).copy_(through.narrow(1, 0, n - 1));
  rows.select(1, 0).zero_();
  if (chunks.before != nullptr)
    rows.add_(chunks.before->reshape({-1, 1, rows.size(2)}));
}

void states_after_chunks(at::Tensor& dstate, int64_t chunks) {
  const at::Tensor rows =
      dstate.view({-1, chunks, dstate.size(2) * dstate.size(3)});
  if (chunks > 1)
    rows.narrow(1, 0, chunks - 1)
        .copy_(rows.narrow(1, 1, chunks - 1).flip(1).cumsum(1).flip(1));
  rows.select(1, chunks - 1).zero_();
}

// Runs the register-resident forward for d = e = kDim (see above); chunks as
// states_before_chunks.
template <typename T, int kDim>
void mma_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const Mask& mask, bool masked, const at::Tensor& sigma,
                 double a, double b, double c, float state_scale,
                 const CausalChunks& chunks, at::Tensor& out, at::Tensor& den,
                 at::Tensor& state) {
  using Blocks = PairBlocks<kDim>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t bh = q.size(0) * q.size(1);
  // Kept alive until the launches: the arguments point into them.
  const at::Tensor qr = cp_async_rows(q), kr = cp_async_rows(k),
                   vr = cp_async_rows(v);
  StateMmaArgs<T> args{};
  args.x = token_rows<T>(kr, kDim);
  args.y = token_rows<T>(vr, kDim);
  args.heads = q.size(1);
  args.tokens = k.size(2);
  args.mask = mask;
  // Causal: one split, so that the chunks' states are whole before their
  // prefix sum (a chunk is one or two token tiles).
  const std::pair<at::Tensor, int64_t> reduced =
      mma_state_reduce<T, kDim, false>(args, masked, bh, state,
                                       chunks.count > 0);
  const at::Tensor& partial = reduced.first;
  const int64_t splits = reduced.second;
  if (chunks.count > 0) states_before_chunks(state, chunks);

  const at::Tensor operand =
      state_operand<T, kDim>(partial, splits, &state, query_weights(a, b, c),
                             state_scale, q.options());
  if (q.size(2) == 0) return;

  ApplyMmaArgs<T> apply_args{};
  apply_args.q = token_rows<T>(qr, kDim);
  apply_args.operand = reinterpret_cast<const T*>(operand.data_ptr());
  apply_args.heads = q.size(1);
  apply_args.tokens = q.size(2);
  apply_args.e = kDim;
  apply_args.sigma = row_values<float>(sigma);
  apply_args.state_scale = state_scale;
  mma_apply<T, kDim, ApplyOutput::kAttention>(
      apply_args, bh, reinterpret_cast<T*>(out.data_ptr()),
      den.data_ptr<float>());
}

// float16's exponents span 2^-14 (smallest normal) to 65504. The backward's
// 16-bit operands are dz = [-dl | rs gY], whose size is |gY| sigma / den
// (about |gY| / sqrt(N d): it falls with N, and gY carries the loss scale),
// and the state and dS, sums over N tokens. No fixed scale fits all three,
// so each is scaled per head by a power of two taken from its largest
// magnitude m = f 2^p (frexp: f in [1/2, 1)): 2^(15 - p) brings m to
// [2^14, 2^15), below 65504, and keeps values down to 2^-29 m normal. A
// power of two changes no mantissa, so the products are those of the
// unscaled values rounded to float16's 11 bits, and scaling gY by 2^j
// scales every gradient by exactly 2^j. The gradient kernels multiply the
// gradients by the inverse scales (DxTilesArgs::grad_scale,
// ApplyMmaArgs::grad_scale) before rounding them. All on the device (no host
// synchronisation), as integer exponents: float16_scale_exponent gives 15 - p
// for the per-head maxima (B, H), p clamped to +-45 so that the sum of two
// exponents, negated, stays a normal float's; power_of_two makes the floats (B
// H) bit by bit.
at::Tensor float16_scale_exponent(const at::Tensor& largest) {
  return 15 - at::clamp(std::get<1>(at::frexp(largest)), -45, 45)
                  .reshape(-1)
                  .to(at::kInt);
}

at::Tensor power_of_two(const at::Tensor& exponent) {
  return at::bitwise_left_shift(exponent + 127, 23).view(at::kFloat);
}

// The largest magnitude per head of a (B, H, ...) tensor, as float (B, H).
at::Tensor largest_per_head(const at::Tensor& x) {
  return at::linalg_vector_norm(x.flatten(2),
                                std::numeric_limits<double>::infinity(), {2},
                                false, at::kFloat);
}

// The backward for d = e = kDim: dS on the query-side reduce, then dq and dk
// on efficient_dx_tiles_kernel from the gradient tiles of the state and of
// dS, and dv on the apply kernel from the operand of dS (key weights).
// bfloat16 has float's range: nothing is scaled. float16: dz, the state's
// tiles and dS's tiles and operand are scaled as float16_scale_exponent says
// (dS is then the scaled dz's: dz_scale dS).
template <typename T, int kDim>
void mma_backward(const at::Tensor& grad_out, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& state, const at::Tensor& scalars,
                  const Mask& mask, bool masked, double a, double b, double c,
                  int64_t chunks, at::Tensor& dstate, at::Tensor& grad_q,
                  at::Tensor& grad_k, at::Tensor& grad_v) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t bh = q.size(0) * q.size(1), queries = q.size(2),
                keys = k.size(2);
  const at::Tensor qr = cp_async_rows(q), kr = cp_async_rows(k),
                   vr = cp_async_rows(v);
  constexpr bool kScaled = std::is_same_v<T, __half>;
  at::Tensor dz_exponent, state_exponent;  // (B H), float16 only
  at::Tensor dz_scale, state_scale;
  if constexpr (kScaled) {
    // |dz| per head: max over rows of |rs| max|gY_row| and of |dl|. (The
    // row maxima are exact in float16; converting them, not gY, copies no
    // (B, H, M, e) tensor.)
    const at::Tensor gy_largest =
        at::linalg_vector_norm(grad_out,
                               std::numeric_limits<double>::infinity(), {-1})
            .to(at::kFloat);
    dz_exponent = float16_scale_exponent(
        at::maximum((scalars.select(-1, 0).abs() * gy_largest).amax(-1),
                    scalars.select(-1, 1).abs().amax(-1)));
    // Causal chunks: dS_{>c} sums the chunks' dS, so every chunk of a
    // sequence takes the scale of its largest dz.
    if (chunks > 0)
      dz_exponent = dz_exponent.view({-1, chunks})
                        .amin(1, true)
                        .expand({-1, chunks})
                        .reshape(-1);
    dz_scale = power_of_two(dz_exponent);
    // The state operand is the state times query weights up to max(|c|,
    // |b|, 2|a|).
    state_exponent = float16_scale_exponent(
        largest_per_head(state) *
        std::max({std::abs(c), std::abs(b), 2 * std::abs(a)}));
    state_scale = power_of_two(state_exponent);
  }
  const auto data = [](const at::Tensor& t) {
    return t.defined() ? t.data_ptr<float>() : nullptr;
  };
  // dz rows: y = rs gY and w = -dl.
  at::Tensor y = at::empty({q.size(0), q.size(1), queries, kDim}, q.options());
  const int64_t w_stride = (queries + 7) / 8 * 8;
  at::Tensor w = at::zeros({bh, w_stride}, q.options());
  const int64_t count = y.numel();
  dz_rows_kernel<T>
      <<<std::min<int64_t>((count + 255) / 256, grid_stride_blocks()), 256, 0,
         stream>>>(token_rows<T>(grad_out, kDim), scalars.data_ptr<float>(),
                   1.f, data(dz_scale), q.size(1), queries, kDim, w_stride,
                   count, reinterpret_cast<T*>(y.data_ptr()),
                   reinterpret_cast<T*>(w.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  StateMmaArgs<T> args{};
  args.x = token_rows<T>(qr, kDim);
  args.y = token_rows<T>(y, kDim);
  args.w = reinterpret_cast<const T*>(w.data_ptr());
  args.w_stride = w_stride;
  args.heads = q.size(1);
  args.tokens = queries;
  const std::pair<at::Tensor, int64_t> reduced =
      mma_state_reduce<T, kDim, true>(args, false, bh, dstate);
  const int64_t total = dstate.numel();
  finalize_dstate_mma_kernel<kDim>
      <<<std::min<int64_t>((total + 255) / 256, grid_stride_blocks()), 256, 0,
         stream>>>(reduced.first.data_ptr<float>(), reduced.second, total,
                   dstate.data_ptr<float>(), static_cast<float>(a),
                   static_cast<float>(b), static_cast<float>(c));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 0) states_after_chunks(dstate, chunks);
  // The gradients' scales: dq is a product of dz and the state's tiles; dk
  // and dv of v and k with dS's tiles and operand.
  at::Tensor dstate_scale, grad_q_scale, grad_kv_scale;
  if constexpr (kScaled) {
    // dS's tiles hold up to 2 |dS| (the squares' 2 dS_pp).
    const at::Tensor dstate_exponent =
        float16_scale_exponent(2 * largest_per_head(dstate));
    dstate_scale = power_of_two(dstate_exponent);
    grad_q_scale = power_of_two(-(state_exponent + dz_exponent));
    grad_kv_scale = power_of_two(-(dstate_exponent + dz_exponent));
  }

  // dq from the state's gradient tiles (query weights), with y' = dz.
  DxTilesArgs<T> query{};
  query.grad_scale = data(grad_q_scale);
  query.x = token_rows<T>(qr, kDim);
  query.y = token_rows<T>(y, kDim);
  query.w = reinterpret_cast<const T*>(w.data_ptr());
  query.w_stride = w_stride;
  query.heads = q.size(1);
  query.tokens = queries;
  mma_dx_tiles<T, kDim>(query, state, 2 * a, 2 * a, b, data(state_scale),
                        grad_q);
  // dk from dS's gradient tiles (key weights), with y' = [v | 1].
  DxTilesArgs<T> key{};
  key.grad_scale = data(grad_kv_scale);
  key.x = token_rows<T>(kr, kDim);
  key.y = token_rows<T>(vr, kDim);
  key.heads = q.size(1);
  key.tokens = keys;
  key.mask = mask;
  mma_dx_tiles<T, kDim>(key, dstate, 2, 1, 1, data(dstate_scale), grad_k);
  // dv = phi(k) dS on the apply kernel, from the dS operand (key weights).
  const at::Tensor operand = state_operand<T, kDim>(
      dstate, 1, nullptr, key_weights(), 1.f, q.options(), data(dstate_scale));
  ApplyMmaArgs<T> value{};
  value.q = token_rows<T>(kr, kDim);
  value.operand = reinterpret_cast<const T*>(operand.data_ptr());
  value.heads = q.size(1);
  value.tokens = keys;
  value.e = kDim;
  value.mask = mask;
  value.grad_scale = data(grad_kv_scale);
  mma_apply<T, kDim, ApplyOutput::kValueGradient>(
      value, bh, reinterpret_cast<T*>(grad_v.data_ptr()), nullptr);
}

// Calls run(std::integral_constant<int, kDim>) and returns true where the
// register-resident kernels take d = e = kDim; false for other head dims.
template <typename Run>
bool with_mma_dim(int64_t d, int64_t e, Run run) {
  if (d != e) return false;
  switch (d) {
    case 16:
      run(std::integral_constant<int, 16>{});
      return true;
    case 32:
      run(std::integral_constant<int, 32>{});
      return true;
    case 64:
      run(std::integral_constant<int, 64>{});
      return true;
    case 128:
      run(std::integral_constant<int, 128>{});
      return true;
    default:
      return false;
  }
}

// The forward on the register-resident kernels where they apply (16-bit
// inputs, d = e in 16, 32, 64, 128); false where the caller must run the
// shared-memory kernels.
template <typename T>
bool try_mma_forward(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const Mask& mask, bool masked,
                     const at::Tensor& sigma, double a, double b, double c,
                     float state_scale, const CausalChunks& chunks,
                     at::Tensor& out, at::Tensor& den, at::Tensor& state) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    return with_mma_dim(q.size(3), v.size(3), [&](auto dim) {
      mma_forward<T, decltype(dim)::value>(q, k, v, mask, masked, sigma, a, b,
                                           c, state_scale, chunks, out, den,
                                           state);
    });
  } else {
    return false;
  }
}

// The backward on the register-resident kernels where they apply: 16-bit
// inputs (float16's operands scaled, see float16_scale_exponent), d = e in
// 16, 32, 64, 128.
template <typename T>
bool try_mma_backward(const at::Tensor& grad_out, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& state, const at::Tensor& scalars,
                      const Mask& mask, bool masked, double a, double b,
                      double c, int64_t chunks, at::Tensor& dstate,
                      at::Tensor& grad_q, at::Tensor& grad_k,
                      at::Tensor& grad_v) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    return with_mma_dim(q.size(3), v.size(3), [&](auto dim) {
      mma_backward<T, decltype(dim)::value>(grad_out, q, k, v, state, scalars,
                                            mask, masked, a, b, c, chunks,
                                            dstate, grad_q, grad_k, grad_v);
    });
  } else {
    return false;
  }
}

// Runs the reduce phase into `out` (B, H, F, e + 1), splitting the tokens so
// that the grid holds a few waves of blocks even for small batch * heads.
template <typename T, typename Acc, bool kQuery>
void feature_reduce(EfficientArgs<T, Acc> args, at::Tensor& out) {
  using Op = ReduceOperand<T, kQuery>;
  args.feature_tile = feature_tile(args.d, sizeof(Op));
  const auto bytes = [&](int tile) {
    return ReduceSmem(tile, args.feature_tile, args.d, args.e, sizeof(Op),
                      sizeof(Acc), sizeof(typename Num<T>::wide))
        .total;
  };
  args.tile = pick_tile("taylorshift::efficient (state)", bytes);
  const int64_t bh = out.size(0) * out.size(1);
  const int64_t feature_tiles =
      (args.features + args.feature_tile - 1) / args.feature_tile;
  const int64_t token_tiles =
      std::max<int64_t>(1, (args.tokens + args.tile - 1) / args.tile);
  const int64_t wanted_blocks =
      4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t splits = std::clamp<int64_t>(
      (wanted_blocks + feature_tiles * bh - 1) / (feature_tiles * bh), 1,
      token_tiles);
  const int64_t chunk_tiles = (token_tiles + splits - 1) / splits;
  splits = (token_tiles + chunk_tiles - 1) / chunk_tiles;
  at::Tensor partial =
      splits == 1 ? out : at::empty({splits, out.numel()}, out.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto kernel = feature_reduce_kernel<T, Acc, kQuery>;
  allow_shared_memory(kernel, bytes(args.tile));
  kernel<<<dim3(feature_tiles, splits, bh), kThreads, bytes(args.tile),
           stream>>>(args, chunk_tiles * args.tile, partial.data_ptr<Acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t count = out.numel();
    const int64_t blocks =
        std::min<int64_t>((count + 255) / 256, grid_stride_blocks());
    sum_splits_kernel<Acc><<<blocks, 256, 0, stream>>>(
        partial.data_ptr<Acc>(), splits, count, out.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs prepare_state_kernel for a consumer with feature tiles of args's
// feature_tile; sets args's operand pointer and returns its storage.
template <typename Op, typename T, typename Acc>
at::Tensor prepare_state(const at::Tensor& state, EfficientArgs<T, Acc>& args,
                         Acc scale) {
  const int e1 = args.e + 1, e1p = round16(args.e + 1);
  const int64_t tiles =
      (args.features + args.feature_tile - 1) / args.feature_tile;
  args.padded_features = tiles * args.feature_tile;
  const int64_t heads = state.size(0) * state.size(1);
  const int64_t count = heads * args.padded_features * e1p;
  at::Tensor operand = at::empty({count * static_cast<int64_t>(sizeof(Op))},
                                 state.options().dtype(at::kByte));
  const int64_t blocks =
      std::min<int64_t>((count + 255) / 256, grid_stride_blocks());
  prepare_state_kernel<Acc, Op>
      <<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          state.data_ptr<Acc>(), count, args.features, e1, args.padded_features,
          e1p, scale, reinterpret_cast<Op*>(operand.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  args.state_operand = operand.data_ptr();
  return operand;
}

int64_t blocks_for(int64_t tokens, int tile) {
  return (tokens + tile - 1) / tile;
}

// The kernels compute order 2, f = a x^2 + b x + c. Order 1 runs through
// them with a = 0: exact (the pair features get weight 0), at order 2's cost
// in time and in a transient order-2 state; the state it returns and reads
// back has order 1's 1 + d feature rows. Order 3 has no CUDA kernels.
struct QuadraticCoefficients {
  double a, b, c;
};

QuadraticCoefficients quadratic_coefficients(const char* op,
                                             const Coefficients& f) {
  check_efficient_order(op, f.order, kMaxEfficientOrderCuda);
  return {f.order == 2 ? f.of_degree(2) : 0.0, f.of_degree(1), f.of_degree(0)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_rows(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& sigma,
    const Coefficients& f, const CausalChunks& chunks) {
  const QuadraticCoefficients f2 =
      quadratic_coefficients("taylorshift::efficient_forward", f);
  const double a = f2.a, b = f2.b, c = f2.c;
  const auto acc_options = q.options().dtype(accumulate_dtype(q));
  at::Tensor out =
      at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor den = at::empty({q.size(0), q.size(1), q.size(2)}, acc_options);
  at::Tensor state =
      at::empty({q.size(0), q.size(1), feature_count(q.size(3)), v.size(3) + 1},
                acc_options);
  if (state.numel() == 0)
    return {out, den, state.narrow(2, 0, feature_count(q.size(3), f.order))};
  const Mask mask = make_mask(key_padding_mask, std::nullopt, false);
  // The apply's state operand is multiplied by 2^-ceil(log2 N), see
  // efficient_apply_kernel; causal chunks' states sum the keys of all the
  // chunks before, and of the tokens before a decoding step.
  const double keys =
      static_cast<double>(k.size(2)) *
          static_cast<double>(std::max<int64_t>(1, chunks.count)) +
      static_cast<double>(chunks.keys_before);
  const double state_scale = std::ldexp(
      1.0, -static_cast<int>(std::ceil(std::log2(std::max(1.0, keys)))));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "efficient_forward_cuda", [&] {
        using T = typename Native<scalar_t>::type;
        using Acc = typename Num<T>::acc;
        if (try_mma_forward<T>(q, k, v, mask, key_padding_mask.has_value(),
                               sigma, a, b, c, static_cast<float>(state_scale),
                               chunks, out, den, state))
          return;
        // Other dtypes and head dims: the shared-memory kernels, reading
        // q, k, v through their strides.
        feature_reduce<T, Acc, false>(make_args<T, Acc>(k, v, v, mask, a, b, c),
                                      state);
        if (chunks.count > 0) states_before_chunks(state, chunks);
        if (q.size(2) == 0) return;
        auto args = make_args<T, Acc>(q, v, v, mask, a, b, c);
        args.state_scale = static_cast<Acc>(state_scale);
        args.sigma = row_values<Acc>(sigma);
        args.feature_tile = feature_tile(args.d, sizeof(T));
        const at::Tensor operand =
            prepare_state<T>(state, args, args.state_scale);
        const auto bytes = [&](int tile) {
          return ApplySmem(tile, args.feature_tile, args.d, args.e, sizeof(T),
                           sizeof(Acc), sizeof(typename Num<T>::wide))
              .total;
        };
        args.tile = pick_tile("taylorshift::efficient_forward", bytes);
        const auto kernel = efficient_apply_kernel<T, Acc>;
        allow_shared_memory(kernel, bytes(args.tile));
        kernel<<<
            dim3(blocks_for(args.tokens, args.tile), q.size(0) * q.size(1)),
            kThreads, bytes(args.tile), at::cuda::getCurrentCUDAStream()>>>(
            args, reinterpret_cast<T*>(out.data_ptr()), den.data_ptr<Acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  if (f.order == 1)
    return {out, den,
            state.narrow(2, 0, feature_count(q.size(3), f.order)).contiguous()};
  return {out, den, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_backward_rows(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& state, const at::Tensor& scalars,
    const std::optional<at::Tensor>& key_padding_mask, const Coefficients& f,
    int64_t chunks) {
  const QuadraticCoefficients f2 =
      quadratic_coefficients("taylorshift::efficient_backward", f);
  const double a = f2.a, b = f2.b, c = f2.c;
  // Order 1: the order-2 state with zero pair rows (a = 0 never reads them).
  const at::Tensor sc =
      f.order == 1
          ? at::cat({state, at::zeros({state.size(0), state.size(1),
                                       pair_count(q.size(3)), state.size(3)},
                                      state.options())},
                    2)
          : state.contiguous();
  // Contiguous gradients whatever the inputs' strides, as the Meta kernels.
  at::Tensor grad_q = at::empty(q.sizes(), q.options()),
             grad_k = at::empty(k.sizes(), k.options()),
             grad_v = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};
  }
  at::Tensor dstate = at::empty_like(sc);
  const Mask mask = make_mask(key_padding_mask, std::nullopt, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "efficient_backward_cuda",
      [&] {
        using T = typename Native<scalar_t>::type;
        using Acc = typename Num<T>::acc;
        using Op = typename Num<T>::derived;
        if (try_mma_backward<T>(grad_out, q, k, v, sc, scalars, mask,
                                key_padding_mask.has_value(), a, b, c, chunks,
                                dstate, grad_q, grad_k, grad_v))
          return;
        // Other dtypes and head dims: the shared-memory kernels, reading
        // q, k, v and grad_out through their strides.
        const auto stream = at::cuda::getCurrentCUDAStream();
        const int64_t bh = q.size(0) * q.size(1);
        // dS = sum_i phi(q_i) dz_i^T
        auto query_args = make_args<T, Acc>(q, grad_out, v, mask, a, b, c);
        query_args.scalars = scalars.data_ptr<Acc>();
        feature_reduce<T, Acc, true>(query_args, dstate);
        if (chunks > 0) states_after_chunks(dstate, chunks);
        for (bool key_side : {false, true}) {
          auto args =
              key_side ? make_args<T, Acc>(k, v, v, mask, a, b, c) : query_args;
          args.feature_tile = feature_tile(args.d, sizeof(Op));
          const at::Tensor operand =
              prepare_state<Op>(key_side ? dstate : sc, args, Acc(1));
          const auto bytes = [&](int tile) {
            return ContractSmem(tile, args.feature_tile, args.d, args.e,
                                sizeof(Op), sizeof(Acc),
                                sizeof(typename Num<T>::wide), key_side)
                .total;
          };
          args.tile = pick_tile("taylorshift::efficient_backward", bytes);
          const size_t smem = bytes(args.tile);
          const dim3 grid(blocks_for(args.tokens, args.tile), bh);
          if (key_side) {
            const auto kernel = efficient_backward_kv_kernel<T, Acc>;
            allow_shared_memory(kernel, smem);
            kernel<<<grid, kThreads, smem, stream>>>(
                args, reinterpret_cast<T*>(grad_k.data_ptr()),
                reinterpret_cast<T*>(grad_v.data_ptr()));
          } else {
            const auto kernel = efficient_backward_q_kernel<T, Acc>;
            allow_shared_memory(kernel, smem);
            kernel<<<grid, kThreads, smem, stream>>>(
                args, reinterpret_cast<T*>(grad_q.data_ptr()));
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {grad_q, grad_k, grad_v};
}

namespace {

// The forward on the logits' factors q and k as given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_factors(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  const KernelOptions options =
      schema_options(false, output_scale, coefficients);
  check_forward_arguments("taylorshift::efficient_forward", q, k, v,
                          key_padding_mask, std::nullopt, options);
  quadratic_coefficients("taylorshift::efficient_forward",
                         options.coefficients);
  check_cuda_inputs("taylorshift::efficient_forward", q, k, v, {},
                    key_padding_mask, std::nullopt);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor sigma = output_scales(q, k.size(2), key_padding_mask,
                                         std::nullopt, false, output_scale);
  return efficient_forward_rows(q, k, v, key_padding_mask, sigma,
                                options.coefficients);
}

// The backward on the logits' factors q and k as given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_backward_factors(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const at::Tensor& state, const std::optional<at::Tensor>& key_padding_mask,
    bool output_scale, c10::ArrayRef<double> coefficients) {
  const KernelOptions options =
      schema_options(false, output_scale, coefficients);
  check_backward_arguments("taylorshift::efficient_backward", grad_out, q, k, v,
                           out, den, state, key_padding_mask, std::nullopt,
                           options);
  quadratic_coefficients("taylorshift::efficient_backward",
                         options.coefficients);
  const int order = options.coefficients.order;
  check_cuda_inputs("taylorshift::efficient_backward", q, k, v,
                    {&grad_out, &out, &den, &state}, key_padding_mask,
                    std::nullopt);
  TORCH_CHECK(state.scalar_type() == accumulate_dtype(q) && state.dim() == 4 &&
                  state.size(2) == feature_count(q.size(3), order) &&
                  state.size(3) == v.size(3) + 1,
              "taylorshift::efficient_backward: state must be (B, H, F, e + 1)"
              " in the accumulation dtype");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor sigma = output_scales(q, k.size(2), key_padding_mask,
                                         std::nullopt, false, output_scale);
  const at::Tensor scalars = backward_row_scalars(grad_out, out, den, sigma);
  return efficient_backward_rows(grad_out, q, k, v, state, scalars,
                                 key_padding_mask, options.coefficients, 0);
}

// normalize=True: the kernels above read the logits' factors from memory, so
// normalize_rows forms them first (q_hat = temperature_h q / |q|,
// k_hat = k / |k|), and the backward takes their gradients back through
// normalize_rows_backward. (The CPU kernels form them chunk by chunk.)
std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients, bool normalize,
    const std::optional<at::Tensor>& temperature) {
  check_efficient_normalization("taylorshift::efficient_forward", q, normalize,
                                temperature);
  if (!normalize)
    return efficient_forward_factors(q, k, v, key_padding_mask, output_scale,
                                     coefficients);
  return efficient_forward_factors(
      normalize_rows(q, temperature), normalize_rows(k, std::nullopt), v,
      key_padding_mask, output_scale, coefficients);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
efficient_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& den,
                        const at::Tensor& state,
                        const std::optional<at::Tensor>& key_padding_mask,
                        bool output_scale, c10::ArrayRef<double> coefficients,
                        bool normalize,
                        const std::optional<at::Tensor>& temperature) {
  check_efficient_normalization("taylorshift::efficient_backward", q, normalize,
                                temperature);
  at::Tensor grad_temperature = empty_temperature_gradient(q, temperature);
  if (!normalize) {
    auto [grad_q, grad_k, grad_v] = efficient_backward_factors(
        grad_out, q, k, v, out, den, state, key_padding_mask, output_scale,
        coefficients);
    return {grad_q, grad_k, grad_v, grad_temperature};
  }
  auto [grad_q_hat, grad_k_hat, grad_v] = efficient_backward_factors(
      grad_out, normalize_rows(q, temperature), normalize_rows(k, std::nullopt),
      v, out, den, state, key_padding_mask, output_scale, coefficients);
  auto [grad_q, grad_factor] =
      normalize_rows_backward(grad_q_hat, q, temperature);
  at::Tensor grad_k =
      std::get<0>(normalize_rows_backward(grad_k_hat, k, std::nullopt));
  if (temperature) grad_temperature = grad_factor;
  return {grad_q, grad_k, grad_v, grad_temperature};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CUDA, m) {
  m.impl("efficient_forward", TORCH_FN(efficient_forward_cuda));
  m.impl("efficient_backward", TORCH_FN(efficient_backward_cuda));
}

}  // namespace taylorshift::cuda_kernels
