// Direct TaylorShift on the CPU, O(M N d): softmax-shaped attention with the
// polynomial f in place of exp, blocked so that no M x N matrix exists.
// Parallel over (batch, head); inside a head, query blocks of kQueryBlock
// against key blocks of kKeyBlock, products through BLAS.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../kernel_checks.h"
#include "common.h"

namespace taylorshift::cpu {
namespace {

// Forward of one head. For a query block and a key block the score tile
// X = Q_b K_b^T is overwritten in place by the weights W = m * f(X); then
// acc += W V_b and den += rowsum(W). With no running maximum to track
// (f is a polynomial of bounded logits), the blocks combine by plain sums.
template <typename T>
void direct_forward_head(const HeadTensors<T>& t, const Mask& mask,
                         int64_t batch, int64_t head_index,
                         const KernelOptions& options, T* out, T* den) {
  const int64_t d = t.head_dim, e = t.value_dim;
  const T a = options.coefficients.a, b = options.coefficients.b,
          c = options.coefficients.c;
  std::vector<T> weights(kQueryBlock * kKeyBlock);
  std::vector<T> acc(kQueryBlock * e);
  std::vector<int64_t> valid(kQueryBlock);
  for (int64_t i0 = 0; i0 < t.queries; i0 += kQueryBlock) {
    const int64_t i1 = block_end(i0, kQueryBlock, t.queries), rows = i1 - i0;
    std::fill(acc.begin(), acc.end(), T(0));
    std::fill(den + i0, den + i1, T(0));
    std::fill(valid.begin(), valid.end(), 0);
    const int64_t key_limit = mask.key_limit(i1, t.keys);
    for (int64_t j0 = 0; j0 < key_limit; j0 += kKeyBlock) {
      const int64_t j1 = block_end(j0, kKeyBlock, key_limit), cols = j1 - j0;
      matmul<T>(false, true, rows, cols, d, t.q + i0 * d, d, t.k + j0 * d, d,
                weights.data(), cols, false);
      for (int64_t r = 0; r < rows; ++r) {
        T* w = weights.data() + r * cols;
        T row_sum = 0;
        for (int64_t col = 0; col < cols; ++col) {
          const bool allowed =
              mask.allowed(batch, head_index, i0 + r, j0 + col);
          w[col] = allowed ? taylor_weight(w[col], a, b, c) : T(0);
          row_sum += w[col];
          valid[r] += allowed;
        }
        den[i0 + r] += row_sum;
      }
      matmul<T>(false, false, rows, e, cols, weights.data(), cols, t.v + j0 * e,
                e, acc.data(), e, true);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T factor =
          output_scale_factor<T>(options.output_scale, valid[r], d) *
          safe_reciprocal(den[i0 + r]);
      for (int64_t col = 0; col < e; ++col)
        out[(i0 + r) * e + col] = factor * acc[r * e + col];
    }
  }
}

// Backward of one head (docs/math.md §2), recomputing the weights per tile:
//   P = W / den,  dV += P^T (sigma gY),
//   dW_ij = (sigma_i gY_i . v_j - gY_i . y_i) / den_i,
//   dX = dW * f'(X) * m,  dQ += dX K_b,  dK_b += dX^T Q_b.
// A whole head is owned by one thread, so dK and dV need no reduction.
template <typename T>
void direct_backward_head(const HeadTensors<T>& t, const T* grad_out,
                          const T* out, const T* den, const Mask& mask,
                          int64_t batch, int64_t head_index,
                          const KernelOptions& options, T* grad_q, T* grad_k,
                          T* grad_v) {
  const int64_t d = t.head_dim, e = t.value_dim;
  const T a = options.coefficients.a, b = options.coefficients.b,
          c = options.coefficients.c;
  std::vector<T> scores(kQueryBlock * kKeyBlock);
  std::vector<T> probs(kQueryBlock * kKeyBlock);
  std::vector<T> scaled_grad(kQueryBlock * e);  // sigma_i gY_i
  std::vector<T> grad_dot_out(kQueryBlock);     // gY_i . y_i
  std::vector<T> inv_den(kQueryBlock);
  for (int64_t i0 = 0; i0 < t.queries; i0 += kQueryBlock) {
    const int64_t i1 = block_end(i0, kQueryBlock, t.queries), rows = i1 - i0;
    const int64_t key_limit = mask.key_limit(i1, t.keys);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const T sigma = output_scale_factor<T>(
          options.output_scale,
          mask.count_allowed(batch, head_index, i, t.keys), d);
      inv_den[r] = safe_reciprocal(den[i]);
      T dot = 0;
      for (int64_t col = 0; col < e; ++col) {
        scaled_grad[r * e + col] = sigma * grad_out[i * e + col];
        dot += grad_out[i * e + col] * out[i * e + col];
      }
      grad_dot_out[r] = dot;
    }
    for (int64_t j0 = 0; j0 < key_limit; j0 += kKeyBlock) {
      const int64_t j1 = block_end(j0, kKeyBlock, key_limit), cols = j1 - j0;
      matmul<T>(false, true, rows, cols, d, t.q + i0 * d, d, t.k + j0 * d, d,
                scores.data(), cols, false);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t col = 0; col < cols; ++col) {
          const T x = scores[r * cols + col];
          const bool allowed =
              mask.allowed(batch, head_index, i0 + r, j0 + col);
          probs[r * cols + col] =
              allowed ? taylor_weight(x, a, b, c) * inv_den[r] : T(0);
          // Keep f'(x)/den_i (0 where masked) for dX below.
          scores[r * cols + col] =
              allowed ? taylor_weight_grad(x, a, b) * inv_den[r] : T(0);
        }
      matmul<T>(true, false, cols, e, rows, probs.data(), cols,
                scaled_grad.data(), e, grad_v + j0 * e, e, true);
      // probs is free again: reuse it for sigma gY V_b^T, then dX.
      matmul<T>(false, true, rows, cols, e, scaled_grad.data(), e, t.v + j0 * e,
                e, probs.data(), cols, false);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t col = 0; col < cols; ++col)
          probs[r * cols + col] = (probs[r * cols + col] - grad_dot_out[r]) *
                                  scores[r * cols + col];
      matmul<T>(false, false, rows, d, cols, probs.data(), cols, t.k + j0 * d,
                d, grad_q + i0 * d, d, true);
      matmul<T>(true, false, cols, d, rows, probs.data(), cols, t.q + i0 * d, d,
                grad_k + j0 * d, d, true);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> direct_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    double a, double b, double c) {
  check_forward_arguments("taylorshift::direct_forward", q_in, k_in, v_in,
                          key_padding_mask, attn_mask,
                          schema_options(causal, output_scale, a, b, c));
  const at::Tensor q = to_compute(q_in), k = to_compute(k_in),
                   v = to_compute(v_in);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), e = v.size(3);
  at::Tensor out = at::empty({B, H, M, e}, q.options());
  at::Tensor den = at::empty({B, H, M}, q.options());
  const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
  const KernelOptions options = schema_options(causal, output_scale, a, b, c);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "direct_forward_cpu", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        direct_forward_head<scalar_t>(head<scalar_t>(q, k, v, bh), mask, bh / H,
                                      bh % H, options,
                                      out.data_ptr<scalar_t>() + bh * M * e,
                                      den.data_ptr<scalar_t>() + bh * M);
      }
    });
  });
  return {out.to(q_in.scalar_type()), den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& den_in, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    double a, double b, double c) {
  check_backward_arguments("taylorshift::direct_backward", grad_out_in, q_in,
                           k_in, v_in, out_in, den_in, std::nullopt,
                           key_padding_mask, attn_mask,
                           schema_options(causal, output_scale, a, b, c));
  const at::Tensor q = to_compute(q_in), k = to_compute(k_in),
                   v = to_compute(v_in), grad_out = to_compute(grad_out_in),
                   out = to_compute(out_in), den = to_compute(den_in);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), N = k.size(2),
                d = q.size(3), e = v.size(3);
  at::Tensor grad_q = at::zeros_like(q), grad_k = at::zeros_like(k),
             grad_v = at::zeros_like(v);
  const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
  const KernelOptions options = schema_options(causal, output_scale, a, b, c);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "direct_backward_cpu", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        direct_backward_head<scalar_t>(
            head<scalar_t>(q, k, v, bh),
            grad_out.data_ptr<scalar_t>() + bh * M * e,
            out.data_ptr<scalar_t>() + bh * M * e,
            den.data_ptr<scalar_t>() + bh * M, mask, bh / H, bh % H, options,
            grad_q.data_ptr<scalar_t>() + bh * M * d,
            grad_k.data_ptr<scalar_t>() + bh * N * d,
            grad_v.data_ptr<scalar_t>() + bh * N * e);
      }
    });
  });
  return {grad_q.to(q_in.scalar_type()), grad_k.to(k_in.scalar_type()),
          grad_v.to(v_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CPU, m) {
  m.impl("direct_forward", TORCH_FN(direct_forward_cpu));
  m.impl("direct_backward", TORCH_FN(direct_backward_cpu));
}

}  // namespace taylorshift::cpu
