// Direct TaylorShift on the CPU, O(M N d) (docs/math.md §2): softmax-shaped
// attention with the polynomial f in place of exp, blocked as a CPU flash
// attention so that no M x N matrix exists. For a query block against a key
// block, one BLAS product writes the score tile X = Q_b K_b^T into a
// cache-resident buffer, one vectorised pass turns it into the weights
// W = m f(X) and their row sums, and a second product accumulates W V_b.
// f is a polynomial of bounded logits, so unlike softmax there is no running
// maximum and no rescaling: the key blocks combine by plain sums.
//
// Work is split over (batch, head, query block) in the forward and over
// (batch, head, query range) in the backward, so both cores work even for
// one head. Masks are never materialised; without key padding or attn_mask
// the per-element mask test is compiled out and causal is a per-row column
// limit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../kernel_checks.h"
#include "common.h"

namespace taylorshift::cpu {
namespace {

// Query rows per block and keys per tile. A 128 x 512 float32 score tile is
// 256 KB: with its companion tile in the backward and the Q, K, V slices of
// one step it stays in L2, and every product is large enough for BLAS to run
// near its peak. Measured at d = 32, 64 and N = 512, 1024 against 64 and 256
// query rows (fwd + bwd per SDPA's time, interleaved, CPU time of one
// thread: 64 rows 0.79-0.92, 128 rows 0.77-0.85, 256 rows 0.77-0.86).
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kKeyBlock = 512;

template <typename T>
struct DirectProblem {
  TokenRows<T> q, k, v;
  int64_t heads, queries, keys, head_dim, value_dim;
  Mask mask;
  KernelOptions options;

  // N_i without counting: all keys, or i + 1 of them when causal.
  int64_t unmasked_count(int64_t i) const {
    return mask.causal ? std::min(i + 1, keys) : keys;
  }
};

// Keys [0, limit) of a key tile starting at j0 that query i may see before
// the per-element mask: causal cuts the row at j = i.
inline int64_t causal_limit(bool causal, int64_t i, int64_t j0, int64_t cols) {
  return causal ? std::clamp<int64_t>(i - j0 + 1, 0, cols) : cols;
}

// The element-wise passes over a score tile (rows x cols, row stride ld; row
// r is query i0 + r, column c key j0 + c), one call per tile so that the
// vectorised clones (TS_VECTOR_CLONES) are entered once per tile.

// In place: w = f(x) on the keys each row may see (0 after them), and the
// row sums added to row_sums. Order is the polynomial's order as a constant
// (with_order).
template <typename T, typename Order>
TS_VECTOR_CLONES void polynomial_tile(T* tile, int64_t rows, int64_t cols,
                                      int64_t ld, bool causal, int64_t i0,
                                      int64_t j0, const Polynomial<T>& f,
                                      Order order, T* row_sums) {
  for (int64_t r = 0; r < rows; ++r) {
    T* w = tile + r * ld;
    const int64_t limit = causal_limit(causal, i0 + r, j0, cols);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t col = 0; col < limit; ++col) {
      const T y = taylor_weight(w[col], f, order);
      w[col] = y;
      sum += y;
    }
    std::fill(w + limit, w + cols, T(0));
    row_sums[r] += sum;
  }
}

// From the score tile x: probs = f(x) / den_i and, in place of x, the slope
// f'(x) / den_i, both 0 after the keys each row may see.
template <typename T, typename Order>
TS_VECTOR_CLONES void weight_and_slope_tile(T* x_tile, T* probs, int64_t rows,
                                            int64_t cols, int64_t ld,
                                            bool causal, int64_t i0, int64_t j0,
                                            const Polynomial<T>& f, Order order,
                                            const T* inv_den) {
  for (int64_t r = 0; r < rows; ++r) {
    T* x = x_tile + r * ld;
    T* w = probs + r * ld;
    const int64_t limit = causal_limit(causal, i0 + r, j0, cols);
    // f / den_i: the row's coefficients scaled once.
    Polynomial<T> fr = f;
    for (int n = 0; n <= f.order; ++n) fr.coefficient[n] *= inv_den[r];
#pragma omp simd
    for (int64_t col = 0; col < limit; ++col) {
      const T xv = x[col];
      w[col] = taylor_weight(xv, fr, order);
      x[col] = taylor_weight_grad(xv, fr, order);
    }
    std::fill(w + limit, w + cols, T(0));
    std::fill(x + limit, x + cols, T(0));
  }
}

// In place: dX = (gY V^T - (gY . y)) * slope, row by row.
template <typename T>
TS_VECTOR_CLONES void score_gradient_tile(T* dx_tile, const T* slope,
                                          int64_t rows, int64_t cols,
                                          int64_t ld, const T* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    T* dx = dx_tile + r * ld;
    const T* fprime = slope + r * ld;
    const T s = shift[r];
#pragma omp simd
    for (int64_t col = 0; col < cols; ++col)
      dx[col] = (dx[col] - s) * fprime[col];
  }
}

// One query block of one head: out = sigma W V / den, den = rowsum(W).
template <typename T, bool kGeneralMask, typename Order>
void forward_block(const DirectProblem<T>& p, Order order, int64_t batch,
                   int64_t head, int64_t i0, T* scores, T* acc, int64_t* valid,
                   T* unmasked_sums, T* out, T* den) {
  const int64_t d = p.head_dim, e = p.value_dim;
  const Polynomial<T> f = p.options.coefficients.template cast<T>();
  const T* q = p.q.head(batch, head);
  const T* k = p.k.head(batch, head);
  const T* v = p.v.head(batch, head);
  const int64_t i1 = block_end(i0, kQueryBlock, p.queries), rows = i1 - i0;
  std::fill(den + i0, den + i1, T(0));
  std::fill(valid, valid + rows, int64_t(0));
  const int64_t key_limit = p.mask.key_limit(i1, p.keys);
  for (int64_t j0 = 0; j0 < key_limit; j0 += kKeyBlock) {
    const int64_t cols = block_end(j0, kKeyBlock, key_limit) - j0;
    gemm<T>(false, true, rows, cols, d, T(1), q + i0 * p.q.row_stride,
            p.q.row_stride, k + j0 * p.k.row_stride, p.k.row_stride, T(0),
            scores, kKeyBlock);
    if constexpr (kGeneralMask) {
      // Key padding and attn_mask: the weights, then zero what query i may
      // not see, and sum what is left.
      polynomial_tile(scores, rows, cols, kKeyBlock, p.mask.causal, i0, j0, f,
                      order, unmasked_sums);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        T* w = scores + r * kKeyBlock;
        const int64_t limit = causal_limit(p.mask.causal, i, j0, cols);
        T kept_sum = 0;
        for (int64_t col = 0; col < limit; ++col) {
          const bool allowed = p.mask.allowed(batch, head, i, j0 + col);
          w[col] = allowed ? w[col] : T(0);
          kept_sum += w[col];
          valid[r] += allowed;
        }
        den[i] += kept_sum;
      }
    } else {
      polynomial_tile(scores, rows, cols, kKeyBlock, p.mask.causal, i0, j0, f,
                      order, den + i0);
    }
    gemm<T>(false, false, rows, e, cols, T(1), scores, kKeyBlock,
            v + j0 * p.v.row_stride, p.v.row_stride, j0 == 0 ? T(0) : T(1), acc,
            e);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const int64_t count = kGeneralMask ? valid[r] : p.unmasked_count(i);
    const T factor = output_scale_factor<T>(p.options.output_scale, count, d) *
                     safe_reciprocal(den[i]);
    for (int64_t col = 0; col < e; ++col)
      out[i * e + col] = factor * acc[r * e + col];
  }
}

template <typename T, bool kGeneralMask, typename Order>
void direct_forward_all(const DirectProblem<T>& p, Order order, int64_t batches,
                        T* out, T* den) {
  const int64_t query_blocks = blocks_of(p.queries, kQueryBlock);
  const int64_t units = batches * p.heads * query_blocks;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kQueryBlock * kKeyBlock);
    std::vector<T> acc(kQueryBlock * p.value_dim);
    std::vector<int64_t> valid(kQueryBlock);
    std::vector<T> unmasked_sums(kQueryBlock);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = unit / query_blocks;
      const int64_t i0 = (unit % query_blocks) * kQueryBlock;
      forward_block<T, kGeneralMask>(
          p, order, bh / p.heads, bh % p.heads, i0, scores.data(), acc.data(),
          valid.data(), unmasked_sums.data(),
          out + bh * p.queries * p.value_dim, den + bh * p.queries);
    }
  });
}

// Backward of one head over query rows [row_begin, row_end) (docs/math.md §2),
// recomputing the weights per tile:
//   P = W / den,  dV += P^T (sigma gY),
//   dW_ij = (sigma_i gY_i . v_j - gY_i . y_i) / den_i,
//   dX = dW * f'(X) * m,  dQ += dX K_b,  dK_b += dX^T Q_b.
// grad_k and grad_v are this query range's own (a partial sum when a head is
// split over threads), and written whole, so the buffers need no zeroing pass
// before: a key tile's first product overwrites its rows (beta = 0), rows a
// later, longer causal cut reaches are zeroed just before it, and rows no
// query of the range reaches are zeroed at the end.
template <typename T, bool kGeneralMask, typename Order>
void backward_range(const DirectProblem<T>& p, Order order, int64_t batch,
                    int64_t head, int64_t row_begin, int64_t row_end,
                    const T* grad_out, int64_t grad_row_stride, const T* out,
                    const T* den, T* grad_q, T* grad_k, T* grad_v, T* scores,
                    T* probs, T* scaled_grad, T* grad_dot_out, T* inv_den) {
  const int64_t d = p.head_dim, e = p.value_dim;
  const Polynomial<T> f = p.options.coefficients.template cast<T>();
  const T* q = p.q.head(batch, head);
  const T* k = p.k.head(batch, head);
  const T* v = p.v.head(batch, head);
  const int64_t qs = p.q.row_stride, ks = p.k.row_stride, vs = p.v.row_stride;
  // Rows of each key tile of grad_k, grad_v written so far.
  std::vector<int64_t> written_rows(blocks_of(p.keys, kKeyBlock), 0);
  auto zero_key_rows = [&](int64_t j_begin, int64_t j_end) {
    std::fill(grad_k + j_begin * d, grad_k + j_end * d, T(0));
    std::fill(grad_v + j_begin * e, grad_v + j_end * e, T(0));
  };
  for (int64_t i0 = row_begin; i0 < row_end; i0 += kQueryBlock) {
    const int64_t i1 = block_end(i0, kQueryBlock, row_end), rows = i1 - i0;
    const int64_t key_limit = p.mask.key_limit(i1, p.keys);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const int64_t count = kGeneralMask
                                ? p.mask.count_allowed(batch, head, i, p.keys)
                                : p.unmasked_count(i);
      const T sigma = output_scale_factor<T>(p.options.output_scale, count, d);
      inv_den[r] = safe_reciprocal(den[i]);
      const T* g = grad_out + i * grad_row_stride;
      T dot = 0;
      for (int64_t col = 0; col < e; ++col) {
        scaled_grad[r * e + col] = sigma * g[col];
        dot += g[col] * out[i * e + col];
      }
      grad_dot_out[r] = dot;
    }
    for (int64_t j0 = 0; j0 < key_limit; j0 += kKeyBlock) {
      const int64_t cols = block_end(j0, kKeyBlock, key_limit) - j0;
      int64_t& written = written_rows[j0 / kKeyBlock];
      const T key_beta = written > 0 ? T(1) : T(0);
      if (written > 0 && written < cols) zero_key_rows(j0 + written, j0 + cols);
      written = std::max(written, cols);
      gemm<T>(false, true, rows, cols, d, T(1), q + i0 * qs, qs, k + j0 * ks,
              ks, T(0), scores, kKeyBlock);
      // probs = m f(x) / den_i; scores = m f'(x) / den_i, kept for dX.
      weight_and_slope_tile(scores, probs, rows, cols, kKeyBlock, p.mask.causal,
                            i0, j0, f, order, inv_den);
      if constexpr (kGeneralMask) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t limit = causal_limit(p.mask.causal, i0 + r, j0, cols);
          for (int64_t col = 0; col < limit; ++col)
            if (!p.mask.allowed(batch, head, i0 + r, j0 + col))
              probs[r * kKeyBlock + col] = scores[r * kKeyBlock + col] = T(0);
        }
      }
      gemm<T>(true, false, cols, e, rows, T(1), probs, kKeyBlock, scaled_grad,
              e, key_beta, grad_v + j0 * e, e);
      // probs is free again: sigma gY V_b^T, then dX in place.
      gemm<T>(false, true, rows, cols, e, T(1), scaled_grad, e, v + j0 * vs, vs,
              T(0), probs, kKeyBlock);
      score_gradient_tile(probs, scores, rows, cols, kKeyBlock, grad_dot_out);
      gemm<T>(false, false, rows, d, cols, T(1), probs, kKeyBlock, k + j0 * ks,
              ks, j0 == 0 ? T(0) : T(1), grad_q + i0 * d, d);
      gemm<T>(true, false, cols, d, rows, T(1), probs, kKeyBlock, q + i0 * qs,
              qs, key_beta, grad_k + j0 * d, d);
    }
  }
  for (int64_t j0 = 0; j0 < p.keys; j0 += kKeyBlock)
    zero_key_rows(j0 + written_rows[j0 / kKeyBlock],
                  block_end(j0, kKeyBlock, p.keys));
}

template <typename T, bool kGeneralMask, typename Order>
void direct_backward_all(const DirectProblem<T>& p, Order order,
                         int64_t batches, const TokenRows<T>& grad_out,
                         const T* out, const T* den, T* grad_q, T* grad_k,
                         T* grad_v, T* partial_k, T* partial_v,
                         int64_t splits) {
  const int64_t M = p.queries, N = p.keys, d = p.head_dim, e = p.value_dim;
  const int64_t heads_total = batches * p.heads;
  at::parallel_for(0, heads_total * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kQueryBlock * kKeyBlock),
        probs(kQueryBlock * kKeyBlock);
    std::vector<T> scaled_grad(kQueryBlock * e), grad_dot_out(kQueryBlock),
        inv_den(kQueryBlock);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = unit / splits, split = unit % splits;
      const int64_t batch = bh / p.heads, head = bh % p.heads;
      const TokenRange rows = split_range(M, kQueryBlock, split, splits);
      T* dk = splits == 1 ? grad_k + bh * N * d
                          : partial_k + (split * heads_total + bh) * N * d;
      T* dv = splits == 1 ? grad_v + bh * N * e
                          : partial_v + (split * heads_total + bh) * N * e;
      backward_range<T, kGeneralMask>(
          p, order, batch, head, rows.begin, rows.end,
          grad_out.head(batch, head), grad_out.row_stride, out + bh * M * e,
          den + bh * M, grad_q + bh * M * d, dk, dv, scores.data(),
          probs.data(), scaled_grad.data(), grad_dot_out.data(),
          inv_den.data());
    }
  });
}

template <typename T>
DirectProblem<T> make_problem(const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const Mask& mask,
                              const KernelOptions& options) {
  return {token_rows<T>(q), token_rows<T>(k), token_rows<T>(v),
          q.size(1),        q.size(2),        k.size(2),
          q.size(3),        v.size(3),        mask,
          options};
}

std::tuple<at::Tensor, at::Tensor> direct_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  check_forward_arguments("taylorshift::direct_forward", q_in, k_in, v_in,
                          key_padding_mask, attn_mask,
                          schema_options(causal, output_scale, coefficients));
  const at::Tensor q = compute_operand(q_in),
                   k = key_operand(k_in, key_padding_mask),
                   v = key_operand(v_in, key_padding_mask);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), e = v.size(3);
  const auto compute = q.options().dtype(accumulate_dtype(q_in));
  at::Tensor out = at::empty({B, H, M, e}, compute);
  at::Tensor den = at::empty({B, H, M}, compute);
  const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
  const bool general_mask = key_padding_mask || attn_mask;
  const KernelOptions options =
      schema_options(causal, output_scale, coefficients);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "direct_forward_cpu", [&] {
    const auto p = make_problem<scalar_t>(q, k, v, mask, options);
    with_order(options.coefficients.order, [&](auto order) {
      auto run = general_mask
                     ? direct_forward_all<scalar_t, true, decltype(order)>
                     : direct_forward_all<scalar_t, false, decltype(order)>;
      run(p, order, B, out.data_ptr<scalar_t>(), den.data_ptr<scalar_t>());
    });
  });
  return {out.to(q_in.scalar_type()), den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& den_in, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  check_backward_arguments("taylorshift::direct_backward", grad_out_in, q_in,
                           k_in, v_in, out_in, den_in, std::nullopt,
                           key_padding_mask, attn_mask,
                           schema_options(causal, output_scale, coefficients));
  const at::Tensor q = compute_operand(q_in),
                   k = key_operand(k_in, key_padding_mask),
                   v = key_operand(v_in, key_padding_mask),
                   grad_out = compute_operand(grad_out_in);
  const auto compute = q.options().dtype(accumulate_dtype(q_in));
  const at::Tensor out = out_in.to(compute).contiguous(),
                   den = den_in.to(compute).contiguous();
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), N = k.size(2),
                d = q.size(3), e = v.size(3);
  const int64_t splits = splits_per_head(B * H, blocks_of(M, kQueryBlock));
  at::Tensor grad_q = at::empty({B, H, M, d}, compute);
  at::Tensor grad_k = at::empty({B, H, N, d}, compute);
  at::Tensor grad_v = at::empty({B, H, N, e}, compute);
  // A head split over threads sums its splits' dK, dV afterwards. Every
  // range writes its whole dK, dV (backward_range): no zeroing here.
  at::Tensor partial_k, partial_v;
  if (splits > 1) {
    partial_k = at::empty({splits, B, H, N, d}, compute);
    partial_v = at::empty({splits, B, H, N, e}, compute);
  }
  const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
  const bool general_mask = key_padding_mask || attn_mask;
  const KernelOptions options =
      schema_options(causal, output_scale, coefficients);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "direct_backward_cpu", [&] {
    const auto p = make_problem<scalar_t>(q, k, v, mask, options);
    with_order(options.coefficients.order, [&](auto order) {
      auto run = general_mask
                     ? direct_backward_all<scalar_t, true, decltype(order)>
                     : direct_backward_all<scalar_t, false, decltype(order)>;
      run(p, order, B, token_rows<scalar_t>(grad_out), out.data_ptr<scalar_t>(),
          den.data_ptr<scalar_t>(), grad_q.data_ptr<scalar_t>(),
          grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(),
          splits > 1 ? partial_k.data_ptr<scalar_t>() : nullptr,
          splits > 1 ? partial_v.data_ptr<scalar_t>() : nullptr, splits);
    });
  });
  if (splits > 1) {
    at::sum_out(grad_k, partial_k, 0);
    at::sum_out(grad_v, partial_v, 0);
  }
  return {grad_q.to(q_in.scalar_type()), grad_k.to(k_in.scalar_type()),
          grad_v.to(v_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CPU, m) {
  m.impl("direct_forward", TORCH_FN(direct_forward_cpu));
  m.impl("direct_backward", TORCH_FN(direct_backward_cpu));
}

}  // namespace taylorshift::cpu
