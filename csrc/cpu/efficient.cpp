// Efficient TaylorShift on the CPU, O((M + N) F e) with F = 1 + d + d(d+1)/2
// (docs/math.md §3). With the feature maps of features.h,
//   f(q . k) = phi(q) . psi(k),
// so every query sees the same state S = sum_j psi(k_j) [1 | v_j]^T and
//   z_i = phi(q_i)^T S,   den_i = z_i[0],   y_i = sigma z_i[1:] / den_i.
// Features exist only for one chunk of kFeatureChunk tokens at a time: the
// chunk's feature tile is built, multiplied into (or by) the state through
// BLAS, and overwritten by the next chunk. Parallel over (batch, head).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../kernel_checks.h"
#include "common.h"

namespace taylorshift::cpu {
namespace {

// m_j [1 | v_j] rows of the key chunk starting at key j0, the value side of
// the state's outer product; masked rows are zero by selection (see
// write_key_features).
template <typename T>
void write_augmented_values(const T* v, int64_t j0, int64_t rows, int64_t e,
                            const Mask& mask, int64_t batch, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = out + r * (e + 1);
    if (!mask.key_valid(batch, j0 + r)) {
      std::fill(row, row + e + 1, T(0));
      continue;
    }
    row[0] = T(1);
    std::copy(v + (j0 + r) * e, v + (j0 + r + 1) * e, row + 1);
  }
}

// A reduction over token chunks, sum_chunks X_chunk^T Y_chunk, kept in
// float64: it takes N / kFeatureChunk steps, and a float32 running sum would
// lose about log2 of that many bits. Each chunk's product is float32 BLAS.
template <typename T>
class ChunkSum {
 public:
  ChunkSum(int64_t rows, int64_t cols)
      : rows_(rows),
        cols_(cols),
        sum_(rows * cols, 0.0),
        product_(rows * cols) {}

  // sum += x^T y, with x (tokens x rows) and y (tokens x cols).
  void add(const T* x, const T* y, int64_t tokens) {
    matmul<T>(true, false, rows_, cols_, tokens, x, rows_, y, cols_,
              product_.data(), cols_, false);
    for (size_t i = 0; i < sum_.size(); ++i) sum_[i] += product_[i];
  }

  void copy_to(T* out) const { std::copy(sum_.begin(), sum_.end(), out); }

 private:
  int64_t rows_, cols_;
  std::vector<double> sum_;
  std::vector<T> product_;
};

// out (rows x cols) = features (rows x F) state (F x cols), with the constant
// feature 0 added last: its term (c S_0 ~ c N for queries) dominates, and
// adding it first would round every other term at its magnitude.
template <typename T>
void apply_state(const T* features, int64_t rows, int64_t F, const T* state,
                 int64_t cols, T* out) {
  matmul<T>(false, false, rows, cols, F - 1, features + 1, F, state + cols,
            cols, out, cols, false);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = 0; col < cols; ++col)
      out[r * cols + col] += features[r * F] * state[col];
}

// Phase 1 of the forward: S = sum_j m_j psi(k_j) [1 | v_j]^T, a reduction
// over key chunks. Returns the number of valid keys.
template <typename T>
int64_t accumulate_state(const HeadTensors<T>& t, const Mask& mask,
                         int64_t batch, T* state, std::vector<T>& features,
                         std::vector<T>& values) {
  const int64_t d = t.head_dim, e = t.value_dim, F = feature_count(d);
  int64_t valid = 0;
  ChunkSum<T> sum(F, e + 1);
  for (int64_t j0 = 0; j0 < t.keys; j0 += kFeatureChunk) {
    const int64_t j1 = block_end(j0, kFeatureChunk, t.keys), rows = j1 - j0;
    for (int64_t r = 0; r < rows; ++r) {
      const bool keep = mask.key_valid(batch, j0 + r);
      valid += keep;
      write_key_features<T>(t.k + (j0 + r) * d, d, keep,
                            features.data() + r * F);
    }
    write_augmented_values(t.v, j0, rows, e, mask, batch, values.data());
    sum.add(features.data(), values.data(), rows);
  }
  sum.copy_to(state);
  return valid;
}

template <typename T>
void efficient_forward_head(const HeadTensors<T>& t, const Mask& mask,
                            int64_t batch, const KernelOptions& options, T* out,
                            T* den, T* state) {
  const int64_t d = t.head_dim, e = t.value_dim, F = feature_count(d);
  const T a = options.coefficients.a, b = options.coefficients.b,
          c = options.coefficients.c;
  std::vector<T> features(kFeatureChunk * F);
  std::vector<T> values(kFeatureChunk * (e + 1));
  const int64_t valid =
      accumulate_state(t, mask, batch, state, features, values);
  const T sigma = output_scale_factor<T>(options.output_scale, valid, d);
  // Phase 2: z = phi(Q_chunk) S, independent per query.
  for (int64_t i0 = 0; i0 < t.queries; i0 += kFeatureChunk) {
    const int64_t i1 = block_end(i0, kFeatureChunk, t.queries), rows = i1 - i0;
    for (int64_t r = 0; r < rows; ++r)
      write_query_features<T>(t.q + (i0 + r) * d, d, a, b, c,
                              features.data() + r * F);
    apply_state(features.data(), rows, F, state, e + 1, values.data());
    for (int64_t r = 0; r < rows; ++r) {
      const T* z = values.data() + r * (e + 1);
      den[i0 + r] = z[0];
      const T factor = sigma * safe_reciprocal(z[0]);
      for (int64_t col = 0; col < e; ++col)
        out[(i0 + r) * e + col] = factor * z[1 + col];
    }
  }
}

// Backward of one head (docs/math.md §3). With z_i = phi(q_i)^T S:
//   dz_i = [ -(gY_i . y_i) / den_i | sigma gY_i / den_i ]
//   dS   = sum_i phi(q_i) dz_i^T                 (reduction over queries)
//   dq_i = d/dq [phi(q_i)]^T (S dz_i)            (pair gradient, features.h)
// and with S = sum_j psi(k_j) v'_j^T, v'_j = m_j [1 | v_j]:
//   dk_j = d/dk [psi(k_j)]^T (dS v'_j),   dv_j = m_j (psi(k_j)^T dS)[1:].
template <typename T>
void efficient_backward_head(const HeadTensors<T>& t, const T* grad_out,
                             const T* out, const T* den, const T* state,
                             const Mask& mask, int64_t batch,
                             const KernelOptions& options, T* grad_q, T* grad_k,
                             T* grad_v) {
  const T a = options.coefficients.a, b = options.coefficients.b,
          c = options.coefficients.c;
  const int64_t d = t.head_dim, e = t.value_dim, F = feature_count(d);
  const int64_t pairs = pair_feature_offset(d);
  std::vector<T> features(kFeatureChunk * F);
  std::vector<T> feature_grad(kFeatureChunk * F);
  std::vector<T> rows_e1(kFeatureChunk * (e + 1));
  ChunkSum<T> grad_state_sum(F, e + 1);
  int64_t valid = 0;
  for (int64_t j = 0; j < t.keys; ++j) valid += mask.key_valid(batch, j);
  const T sigma = output_scale_factor<T>(options.output_scale, valid, d);

  for (int64_t i0 = 0; i0 < t.queries; i0 += kFeatureChunk) {
    const int64_t i1 = block_end(i0, kFeatureChunk, t.queries), rows = i1 - i0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      write_query_features<T>(t.q + i * d, d, a, b, c, features.data() + r * F);
      const T inv_den = safe_reciprocal(den[i]);
      T* dz = rows_e1.data() + r * (e + 1);
      T dot = 0;
      for (int64_t col = 0; col < e; ++col) {
        dot += grad_out[i * e + col] * out[i * e + col];
        dz[1 + col] = sigma * grad_out[i * e + col] * inv_den;
      }
      dz[0] = -dot * inv_den;
    }
    grad_state_sum.add(features.data(), rows_e1.data(), rows);
    // feature_grad = dZ S^T: row i holds S dz_i, one value per feature.
    matmul<T>(false, true, rows, F, e + 1, rows_e1.data(), e + 1, state, e + 1,
              feature_grad.data(), F, false);
    for (int64_t r = 0; r < rows; ++r) {
      const T* g = feature_grad.data() + r * F;
      T* dq = grad_q + (i0 + r) * d;
      for (int64_t l = 0; l < d; ++l)
        dq[l] = b * g[linear_feature_offset() + l];
      add_pair_gradient<T>(g + pairs, t.q + (i0 + r) * d, d, a, T(2) * a, dq);
    }
  }

  std::vector<T> grad_state(F * (e + 1));
  grad_state_sum.copy_to(grad_state.data());
  for (int64_t j0 = 0; j0 < t.keys; j0 += kFeatureChunk) {
    const int64_t j1 = block_end(j0, kFeatureChunk, t.keys), rows = j1 - j0;
    for (int64_t r = 0; r < rows; ++r) {
      const bool keep = mask.key_valid(batch, j0 + r);
      write_key_features<T>(t.k + (j0 + r) * d, d, keep,
                            features.data() + r * F);
    }
    write_augmented_values(t.v, j0, rows, e, mask, batch, rows_e1.data());
    // feature_grad = V' dS^T: row j holds dS v'_j.
    matmul<T>(false, true, rows, F, e + 1, rows_e1.data(), e + 1,
              grad_state.data(), e + 1, feature_grad.data(), F, false);
    for (int64_t r = 0; r < rows; ++r) {
      T* dk = grad_k + (j0 + r) * d;
      if (!mask.key_valid(batch, j0 + r)) continue;  // stays zero
      const T* h = feature_grad.data() + r * F;
      for (int64_t l = 0; l < d; ++l) dk[l] = h[linear_feature_offset() + l];
      add_pair_gradient<T>(h + pairs, t.k + (j0 + r) * d, d, T(1), T(1), dk);
    }
    // dV' = psi(K_chunk) dS; masked keys have psi = 0, hence dv = 0.
    apply_state(features.data(), rows, F, grad_state.data(), e + 1,
                rows_e1.data());
    for (int64_t r = 0; r < rows; ++r)
      std::copy(rows_e1.data() + r * (e + 1) + 1,
                rows_e1.data() + (r + 1) * (e + 1), grad_v + (j0 + r) * e);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    double a, double b, double c) {
  check_forward_arguments("taylorshift::efficient_forward", q_in, k_in, v_in,
                          key_padding_mask, std::nullopt,
                          schema_options(false, output_scale, a, b, c));
  const at::Tensor q = to_compute(q_in), k = to_compute(k_in),
                   v = to_compute(v_in);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), d = q.size(3),
                e = v.size(3), F = feature_count(d);
  at::Tensor out = at::empty({B, H, M, e}, q.options());
  at::Tensor den = at::empty({B, H, M}, q.options());
  at::Tensor state = at::empty({B, H, F, e + 1}, q.options());
  const Mask mask = make_mask(key_padding_mask, std::nullopt, false);
  const KernelOptions options = schema_options(false, output_scale, a, b, c);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "efficient_forward_cpu", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        efficient_forward_head<scalar_t>(
            head<scalar_t>(q, k, v, bh), mask, bh / H, options,
            out.data_ptr<scalar_t>() + bh * M * e,
            den.data_ptr<scalar_t>() + bh * M,
            state.data_ptr<scalar_t>() + bh * F * (e + 1));
      }
    });
  });
  return {out.to(q_in.scalar_type()), den, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& den_in, const at::Tensor& state_in,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    double a, double b, double c) {
  check_backward_arguments("taylorshift::efficient_backward", grad_out_in, q_in,
                           k_in, v_in, out_in, den_in, state_in,
                           key_padding_mask, std::nullopt,
                           schema_options(false, output_scale, a, b, c));
  const at::Tensor q = to_compute(q_in), k = to_compute(k_in),
                   v = to_compute(v_in), grad_out = to_compute(grad_out_in),
                   out = to_compute(out_in), den = to_compute(den_in),
                   state = to_compute(state_in);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), N = k.size(2),
                d = q.size(3), e = v.size(3), F = feature_count(d);
  at::Tensor grad_q = at::empty_like(q), grad_k = at::zeros_like(k),
             grad_v = at::empty_like(v);
  const Mask mask = make_mask(key_padding_mask, std::nullopt, false);
  const KernelOptions options = schema_options(false, output_scale, a, b, c);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "efficient_backward_cpu", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        efficient_backward_head<scalar_t>(
            head<scalar_t>(q, k, v, bh),
            grad_out.data_ptr<scalar_t>() + bh * M * e,
            out.data_ptr<scalar_t>() + bh * M * e,
            den.data_ptr<scalar_t>() + bh * M,
            state.data_ptr<scalar_t>() + bh * F * (e + 1), mask, bh / H,
            options, grad_q.data_ptr<scalar_t>() + bh * M * d,
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
  m.impl("efficient_forward", TORCH_FN(efficient_forward_cpu));
  m.impl("efficient_backward", TORCH_FN(efficient_backward_cpu));
}

}  // namespace taylorshift::cpu
