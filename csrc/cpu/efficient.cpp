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

// Token chunk of the feature tiles: 64 tokens keep a tile (64 x F,
// F = 2145 at d = 64) at 550 KB in float32, inside L2 with the state.
constexpr int64_t kFeatureChunk = 64;

// One (batch, head): rows of q, k, v read in place through their strides.
template <typename T>
struct HeadTensors {
  const T *q, *k, *v;
  int64_t q_stride, k_stride, v_stride;
  int64_t queries, keys, head_dim, value_dim;

  const T* q_row(int64_t i) const { return q + i * q_stride; }
  const T* k_row(int64_t j) const { return k + j * k_stride; }
  const T* v_row(int64_t j) const { return v + j * v_stride; }
};

template <typename T>
HeadTensors<T> head(const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, int64_t batch, int64_t head_index) {
  const TokenRows<T> qr = token_rows<T>(q), kr = token_rows<T>(k),
                     vr = token_rows<T>(v);
  return {qr.head(batch, head_index),
          kr.head(batch, head_index),
          vr.head(batch, head_index),
          qr.row_stride,
          kr.row_stride,
          vr.row_stride,
          q.size(2),
          k.size(2),
          q.size(3),
          v.size(3)};
}

// m_j [1 | v_j] rows of keys [j0, j0 + rows), the value side of the state's
// outer product; masked rows are zero by selection (see write_key_features).
template <typename T>
void write_augmented_values(const HeadTensors<T>& t, int64_t j0, int64_t rows,
                            const Mask& mask, int64_t batch, T* out) {
  const int64_t e = t.value_dim;
  for (int64_t r = 0; r < rows; ++r) {
    T* row = out + r * (e + 1);
    if (!mask.key_valid(batch, j0 + r)) {
      std::fill(row, row + e + 1, T(0));
      continue;
    }
    row[0] = T(1);
    std::copy(t.v_row(j0 + r), t.v_row(j0 + r) + e, row + 1);
  }
}

// The state and its gradient have e + 1 columns: column 0 carries the
// denominator (the ones column of [1 | v]), columns 1..e the values. Every
// product below keeps column 0 apart, so that the large products have exactly
// e columns: BLAS kernels block the columns in multiples of 16, and
// e + 1 = 33 or 65 would spend a whole block on one column.

// A reduction over token chunks, sum_chunks X_chunk^T Y_chunk. BLAS adds
// kChunksPerFold chunks into a block sum in T (beta = 1, no extra pass over
// the state per chunk); block sums are added in float64: a float32 running
// sum over all N / kFeatureChunk chunks would lose about log2 of that many
// bits, one over kChunksPerFold chunks loses only log2(kChunksPerFold).
template <typename T>
class ChunkSum {
 public:
  static constexpr int64_t kChunksPerFold = 16;

  ChunkSum(int64_t rows, int64_t cols)
      : rows_(rows), cols_(cols), sum_(rows * cols, 0.0), block_(rows * cols) {}

  // sum += x^T y, with x (tokens x rows) and y (tokens x cols), both with
  // leading dimensions rows and cols: columns 1.. in one product, column 0
  // in a matrix-vector product.
  void add(const T* x, const T* y, int64_t tokens) {
    const T beta = pending_ == 0 ? T(0) : T(1);
    gemm<T>(true, false, rows_, cols_ - 1, tokens, T(1), x, rows_, y + 1, cols_,
            beta, block_.data() + 1, cols_);
    gemm<T>(true, false, rows_, 1, tokens, T(1), x, rows_, y, cols_, beta,
            block_.data(), cols_);
    if (++pending_ == kChunksPerFold) fold();
  }

  void copy_to(T* out) {
    fold();
    std::copy(sum_.begin(), sum_.end(), out);
  }

 private:
  void fold() {
    if (pending_ == 0) return;
    for (size_t i = 0; i < sum_.size(); ++i) sum_[i] += block_[i];
    pending_ = 0;
  }

  int64_t rows_, cols_, pending_ = 0;
  std::vector<double> sum_;
  std::vector<T> block_;
};

// out = features (rows x F) state[:, first_col:] (F x cols), row stride
// out_stride; first_col is 0 (all columns) or 1 (values only). The constant
// feature 0 is added last: its term (c S_0 ~ c N for queries) dominates, and
// adding it first would round every other term at its magnitude.
template <typename T>
void apply_state(const T* features, int64_t rows, int64_t F, const T* state,
                 int64_t cols, int64_t first_col, T* out, int64_t out_stride) {
  T* values = out + (1 - first_col);
  gemm<T>(false, false, rows, cols - 1, F - 1, T(1), features + 1, F,
          state + cols + 1, cols, T(0), values, out_stride);
  if (first_col == 0)
    gemm<T>(false, false, rows, 1, F - 1, T(1), features + 1, F, state + cols,
            cols, T(0), out, out_stride);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = first_col; col < cols; ++col)
      out[r * out_stride + col - first_col] += features[r * F] * state[col];
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
      write_key_features<T>(t.k_row(j0 + r), d, keep, features.data() + r * F);
    }
    write_augmented_values(t, j0, rows, mask, batch, values.data());
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
      write_query_features<T>(t.q_row(i0 + r), d, a, b, c,
                              features.data() + r * F);
    apply_state(features.data(), rows, F, state, e + 1, 0, values.data(),
                e + 1);
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
                             int64_t grad_row_stride, const T* out,
                             const T* den, const T* state, const Mask& mask,
                             int64_t batch, const KernelOptions& options,
                             T* grad_q, T* grad_k, T* grad_v) {
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
      write_query_features<T>(t.q_row(i), d, a, b, c, features.data() + r * F);
      const T inv_den = safe_reciprocal(den[i]);
      T* dz = rows_e1.data() + r * (e + 1);
      const T* g = grad_out + i * grad_row_stride;
      T dot = 0;
      for (int64_t col = 0; col < e; ++col) {
        dot += g[col] * out[i * e + col];
        dz[1 + col] = sigma * g[col] * inv_den;
      }
      dz[0] = -dot * inv_den;
    }
    grad_state_sum.add(features.data(), rows_e1.data(), rows);
    // feature_grad = dZ S^T: row i holds S dz_i, one value per feature.
    gemm<T>(false, true, rows, F, e + 1, T(1), rows_e1.data(), e + 1, state,
            e + 1, T(0), feature_grad.data(), F);
    for (int64_t r = 0; r < rows; ++r) {
      const T* g = feature_grad.data() + r * F;
      T* dq = grad_q + (i0 + r) * d;
      for (int64_t l = 0; l < d; ++l)
        dq[l] = b * g[linear_feature_offset() + l];
      add_pair_gradient<T>(g + pairs, t.q_row(i0 + r), d, a, T(2) * a, dq);
    }
  }

  std::vector<T> grad_state(F * (e + 1));
  grad_state_sum.copy_to(grad_state.data());
  for (int64_t j0 = 0; j0 < t.keys; j0 += kFeatureChunk) {
    const int64_t j1 = block_end(j0, kFeatureChunk, t.keys), rows = j1 - j0;
    for (int64_t r = 0; r < rows; ++r) {
      const bool keep = mask.key_valid(batch, j0 + r);
      write_key_features<T>(t.k_row(j0 + r), d, keep, features.data() + r * F);
    }
    write_augmented_values(t, j0, rows, mask, batch, rows_e1.data());
    // feature_grad = V' dS^T: row j holds dS v'_j.
    gemm<T>(false, true, rows, F, e + 1, T(1), rows_e1.data(), e + 1,
            grad_state.data(), e + 1, T(0), feature_grad.data(), F);
    for (int64_t r = 0; r < rows; ++r) {
      T* dk = grad_k + (j0 + r) * d;
      if (!mask.key_valid(batch, j0 + r)) continue;  // stays zero
      const T* h = feature_grad.data() + r * F;
      for (int64_t l = 0; l < d; ++l) dk[l] = h[linear_feature_offset() + l];
      add_pair_gradient<T>(h + pairs, t.k_row(j0 + r), d, T(1), T(1), dk);
    }
    // dV'[1:] = psi(K_chunk) dS[:, 1:]; masked keys have psi = 0, hence
    // dv = 0.
    apply_state(features.data(), rows, F, grad_state.data(), e + 1, 1,
                grad_v + j0 * e, e);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    double a, double b, double c) {
  check_forward_arguments("taylorshift::efficient_forward", q_in, k_in, v_in,
                          key_padding_mask, std::nullopt,
                          schema_options(false, output_scale, a, b, c));
  const at::Tensor q = compute_operand(q_in), k = compute_operand(k_in),
                   v = compute_operand(v_in);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), d = q.size(3),
                e = v.size(3), F = feature_count(d);
  const auto compute = q.options().dtype(accumulate_dtype(q_in));
  at::Tensor out = at::empty({B, H, M, e}, compute);
  at::Tensor den = at::empty({B, H, M}, compute);
  at::Tensor state = at::empty({B, H, F, e + 1}, compute);
  const Mask mask = make_mask(key_padding_mask, std::nullopt, false);
  const KernelOptions options = schema_options(false, output_scale, a, b, c);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "efficient_forward_cpu", [&] {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        efficient_forward_head<scalar_t>(
            head<scalar_t>(q, k, v, bh / H, bh % H), mask, bh / H, options,
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
  const at::Tensor q = compute_operand(q_in), k = compute_operand(k_in),
                   v = compute_operand(v_in),
                   grad_out = compute_operand(grad_out_in);
  const auto compute = q.options().dtype(accumulate_dtype(q_in));
  const at::Tensor out = out_in.to(compute).contiguous(),
                   den = den_in.to(compute).contiguous(),
                   state = state_in.to(compute).contiguous();
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), N = k.size(2),
                d = q.size(3), e = v.size(3), F = feature_count(d);
  at::Tensor grad_q = at::empty({B, H, M, d}, compute),
             grad_k = at::zeros({B, H, N, d}, compute),
             grad_v = at::empty({B, H, N, e}, compute);
  const Mask mask = make_mask(key_padding_mask, std::nullopt, false);
  const KernelOptions options = schema_options(false, output_scale, a, b, c);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "efficient_backward_cpu", [&] {
    const TokenRows<scalar_t> grad_rows = token_rows<scalar_t>(grad_out);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        efficient_backward_head<scalar_t>(
            head<scalar_t>(q, k, v, bh / H, bh % H),
            grad_rows.head(bh / H, bh % H), grad_rows.row_stride,
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
