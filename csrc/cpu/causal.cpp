// Causal efficient TaylorShift on the CPU (causal-and-order spec §2), linear
// in the number of tokens. Each (batch, head) runs its chunks of C tokens in
// order, with the state of the chunks before, S_{<c} = sum_{j before c}
// psi(k_j) u_j^T, u_j = m_j [1 | v_j]:
//   z_i = phi(q_i)^T S_{<c} + sum_{j in c, j <= i} f(x_ij) u_j,
//   y_i = sigma_i z_i[1:] / z_i[0],   sigma_i = sqrt(N_i / d),
// N_i the unpadded keys up to i. Every product is a BLAS GEMM over a chunk:
// the feature tiles of feature_tiles.h (F x C) against the state, and the
// chunk's own C x C triangle of the direct form.
//
// Backward, with dz_i = [-(gY_i . y_i) / z_i[0] | sigma_i gY_i / z_i[0]]:
// - queries see S_{<c}: dq_i gets J_phi(q_i)^T (S_{<c} dz_i);
// - keys of chunk c reach the queries of every later chunk through the
//   state: with D_{>c} = sum_{later chunks} sum_i phi(q_i) dz_i^T (a suffix
//   sum, built by running the chunks in reverse), du_j = D_{>c}^T psi(k_j)
//   and dk_j = J_psi(k_j)^T (D_{>c} u_j);
// - inside the chunk, the direct backward on the triangle: with
//   dW_ij = dz_i . u_j and dX_ij = f'(x_ij) dW_ij (j <= i),
//   dq_i += sum_j dX_ij k_j, dk_j += sum_i dX_ij q_i, du_j += sum_i W_ij dz_i.
// The forward returns S_{<c} of every chunk, (B, H, chunks, F, e + 1), so
// the backward reads them instead of rebuilding them. The running sums S
// and D are kept in float64 and rounded once per chunk, as ChunkSum does
// for the non-causal state.
#include <torch/library.h>

#include <vector>

#include "../kernel_checks.h"
#include "common.h"
#include "feature_tiles.h"
#include "pair_kernels.h"

namespace taylorshift::cpu {
namespace {

constexpr int64_t kChunk = kCausalChunk;

template <typename T>
struct CausalWorkspace {
  // Columns of the tiles, C: a chunk, or fewer tokens (a decoding step).
  // Declared first: the buffers' sizes are read from it.
  int64_t ld;
  std::vector<T> qt, kt;            // d x C: the chunk's q, k transposed
  std::vector<T> query_tile;        // F x C: phi of the chunk's queries
  std::vector<T> key_tile;          // F x C: psi of the chunk's keys
  std::vector<T> gradient_tile;     // F x C: S dz or D u, feature-major
  std::vector<T> u, dz, du;         // C x (e + 1)
  std::vector<T> z;                 // C x (e + 1)
  std::vector<T> x, w, dw;          // C x C: logits, weights, their gradient
  std::vector<T> valid;             // C: m_j
  std::vector<T> column;            // C: one column of z or dz
  std::vector<T> dots;              // F: a chunk's share of a column 0
  std::vector<T> grad_qt, grad_kt;  // d x C
  std::vector<T> key_side_t;        // d x C
  std::vector<T> product;           // F x (e + 1): one chunk's share
  // The running S or D: `rounded` (F x (e + 1)), which the products read,
  // rounded once per chunk from the float64 `sum`. start() points it at the
  // workspace's own buffer, zeroed; start_from(state) at a decoding step's
  // output state, updated in place, where a step of one chunk or less keeps
  // no float64 sum: its one addition in T rounds as the float64 sum would.
  std::vector<double> sum;
  std::vector<T> own;
  T* rounded = nullptr;

  // own_state: the forward and backward ops (start); a decoding step
  // (start_from) has its output state instead.
  CausalWorkspace(int64_t d, int64_t e, int64_t F, int64_t tokens,
                  bool own_state = true)
      : ld(std::max<int64_t>(1, std::min(kChunk, tokens))),
        qt(d * ld),
        kt(d * ld),
        query_tile(F * ld),
        key_tile(F * ld),
        gradient_tile(F * ld),
        u(ld * (e + 1)),
        dz(ld * (e + 1)),
        du(ld * (e + 1)),
        z(ld * (e + 1)),
        x(ld * ld),
        w(ld * ld),
        dw(ld * ld),
        valid(ld),
        column(ld),
        dots(F),
        grad_qt(d * ld),
        grad_kt(d * ld),
        key_side_t(d * ld),
        product(F * (e + 1)),
        sum(own_state || tokens > kChunk ? F * (e + 1) : 0),
        own(own_state ? F * (e + 1) : 0) {}

  void start() {
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(own.begin(), own.end(), T(0));
    rounded = own.data();
  }

  void start_from(T* state) {
    rounded = state;
    for (size_t i = 0; i < sum.size(); ++i) sum[i] = double(state[i]);
  }

  // The running state += product.
  void accumulate() {
    if (sum.empty()) {
      for (size_t i = 0; i < product.size(); ++i) rounded[i] += product[i];
      return;
    }
    for (size_t i = 0; i < product.size(); ++i) {
      sum[i] += product[i];
      rounded[i] = T(sum[i]);
    }
  }
};

// One (batch, head), its tokens' rows read in place through their strides.
template <typename T>
struct CausalHead {
  const T *q, *k, *v;
  int64_t q_stride, k_stride, v_stride;
  int64_t tokens, d, e, F;
  Polynomial<T> f;
  bool output_scale;
  const bool* key_padding;  // (tokens,) or nullptr
  int64_t key_padding_stride;
};

// The triangle's element-wise passes, vectorised (TS_VECTOR_CLONES) with
// the polynomial's order a constant (with_order): W = f(X) and, in place,
// dX = f'(X) dW, both 0 above the diagonal (j > i).
template <typename T, typename Order>
TS_VECTOR_CLONES void triangle_weights(const T* x, T* w, int64_t rows,
                                       int64_t ld, const Polynomial<T>& f,
                                       Order order) {
  for (int64_t i = 0; i < rows; ++i, x += ld, w += ld) {
#pragma omp simd
    for (int64_t j = 0; j < rows; ++j)
      w[j] = j <= i ? taylor_weight(x[j], f, order) : T(0);
  }
}

template <typename T, typename Order>
TS_VECTOR_CLONES void triangle_score_gradient(const T* x, T* dw, int64_t rows,
                                              int64_t ld,
                                              const Polynomial<T>& f,
                                              Order order) {
  for (int64_t i = 0; i < rows; ++i, x += ld, dw += ld) {
#pragma omp simd
    for (int64_t j = 0; j < rows; ++j)
      dw[j] = j <= i ? taylor_weight_grad(x[j], f, order) * dw[j] : T(0);
  }
}

// The tokens [i0, i0 + rows) loaded into w: q and k transposed (a padded
// key's column zero: its row may hold NaN), m_j, u_j, the logits
// X = q_hat k_hat^T and the weights W of the triangle (a padded key's
// column is finite and meets u_j = 0 and dW_ij = 0).
template <typename T>
void load_tokens(const CausalHead<T>& t, int64_t i0, int64_t rows,
                 CausalWorkspace<T>& w) {
  const int64_t d = t.d, e = t.e;
  for (int64_t r = 0; r < rows; ++r)
    w.valid[r] = t.key_padding == nullptr ||
                         !t.key_padding[(i0 + r) * t.key_padding_stride]
                     ? T(1)
                     : T(0);
  const T* keep = t.key_padding != nullptr ? w.valid.data() : nullptr;
  transpose_chunk(t.q + i0 * t.q_stride, t.q_stride, rows, d,
                  static_cast<const T*>(nullptr), w.qt.data(), w.ld);
  transpose_chunk(t.k + i0 * t.k_stride, t.k_stride, rows, d, keep, w.kt.data(),
                  w.ld);
  write_augmented_values(t.v + i0 * t.v_stride, t.v_stride, rows, e,
                         w.valid.data(), w.u.data());
  gemm<T>(true, false, rows, rows, d, T(1), w.qt.data(), w.ld, w.kt.data(),
          w.ld, T(0), w.x.data(), w.ld);
  with_order(t.f.order, [&](auto order) {
    triangle_weights(w.x.data(), w.w.data(), rows, w.ld, t.f, order);
  });
}

// The state's column 0 (the denominators) stays out of the GEMMs, so that
// they have e columns, not e + 1 (BLAS blocks columns in 16s: 33 take about
// as long as 48); the tile builds compute it from each feature row
// (RowExtras), as efficient.cpp does.

// sigma_i of the chunk's rows from the count of unpadded keys before it.
template <typename T>
T row_scale(const CausalHead<T>& t, int64_t seen) {
  return output_scale_factor<T>(t.output_scale, seen, t.d);
}

// The forward of one head after `seen` unpadded keys and the state in w
// (w.rounded), which it leaves holding the state after the last token;
// states, where not nullptr, receives the state before each chunk.
// Returns the count of unpadded keys after the last token.
template <typename T>
int64_t forward_head(const CausalHead<T>& t, int64_t seen, T* out, T* den,
                     T* states, CausalWorkspace<T>& w) {
  const int64_t e = t.e, FE = t.F * (e + 1);
  const auto query_weights = FeatureWeights<T>::queries(t.f);
  for (int64_t i0 = 0, c = 0; i0 < t.tokens; i0 += kChunk, ++c) {
    const int64_t rows = std::min(kChunk, t.tokens - i0);
    if (states != nullptr)
      std::copy(w.rounded, w.rounded + FE, states + c * FE);
    load_tokens(t, i0, rows, w);
    // z = phi(Q)^T S_{<c} + W U; phi's constant feature c_0 (row 0) last,
    // so that its dominant term does not round the others.
    const T* state = w.rounded;
    const T c0 = query_weights.constant;
    std::fill(w.column.begin(), w.column.begin() + rows, T(0));
    query_feature_tile(
        w.qt.data(), t.d, rows, w.ld, query_weights, w.query_tile.data(),
        RowExtras<T>{nullptr, nullptr, state, e + 1, w.column.data()});
    gemm<T>(true, false, rows, e, t.F - 1, T(1), w.query_tile.data() + w.ld,
            w.ld, state + (e + 1) + 1, e + 1, T(0), w.z.data() + 1, e + 1);
    for (int64_t r = 0; r < rows; ++r) {
      T* z = w.z.data() + r * (e + 1);
      z[0] = w.column[r] + c0 * state[0];
      for (int64_t col = 1; col <= e; ++col) z[col] += c0 * state[col];
    }
    gemm<T>(false, false, rows, e + 1, rows, T(1), w.w.data(), w.ld, w.u.data(),
            e + 1, T(1), w.z.data(), e + 1);
    for (int64_t r = 0; r < rows; ++r) {
      seen += w.valid[r] != T(0);
      const T* z = w.z.data() + r * (e + 1);
      den[i0 + r] = z[0];
      const T factor = row_scale(t, seen) * safe_reciprocal(z[0]);
      for (int64_t col = 0; col < e; ++col)
        out[(i0 + r) * e + col] = factor * z[1 + col];
    }
    // S_{<c+1} = S_{<c} + psi(K)^T U, column 0 (psi(K)^T m) from the build.
    key_feature_tile(w.kt.data(), w.valid.data(), t.d, rows, w.ld,
                     w.key_tile.data(),
                     RowExtras<T>{w.valid.data(), w.dots.data()}, t.f.order);
    gemm<T>(false, false, t.F, e, rows, T(1), w.key_tile.data(), w.ld,
            w.u.data() + 1, e + 1, T(0), w.product.data() + 1, e + 1);
    for (int64_t f = 0; f < t.F; ++f) w.product[f * (e + 1)] = w.dots[f];
    w.accumulate();
  }
  return seen;
}

template <typename T>
void backward_head(const CausalHead<T>& t, const T* grad_out,
                   int64_t grad_stride, const T* out, const T* den,
                   const T* states, T* grad_q, T* grad_k, T* grad_v,
                   CausalWorkspace<T>& w) {
  const int64_t d = t.d, e = t.e, F = t.F, FE = F * (e + 1);
  const int64_t chunks = blocks_of(t.tokens, kChunk);
  // Unpadded keys before each chunk, for sigma_i.
  std::vector<int64_t> seen_before(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t seen = seen_before[c];
    for (int64_t j = c * kChunk; j < std::min((c + 1) * kChunk, t.tokens); ++j)
      seen +=
          t.key_padding == nullptr || !t.key_padding[j * t.key_padding_stride];
    seen_before[c + 1] = seen;
  }
  const auto query_weights = FeatureWeights<T>::queries(t.f);
  const auto key_weights = FeatureWeights<T>::keys(t.f.order);
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t i0 = c * kChunk, rows = std::min(kChunk, t.tokens - i0);
    const T* state = states + c * FE;
    load_tokens(t, i0, rows, w);
    int64_t seen = seen_before[c];
    for (int64_t r = 0; r < rows; ++r) {
      seen += w.valid[r] != T(0);
      const int64_t i = i0 + r;
      const T inv_den = safe_reciprocal(den[i]);
      const T sigma = row_scale(t, seen);
      const T* g = grad_out + i * grad_stride;
      const T* y = out + i * e;
      T* dz = w.dz.data() + r * (e + 1);
      T dot = 0;
      for (int64_t col = 0; col < e; ++col) {
        dot += g[col] * y[col];
        dz[1 + col] = sigma * g[col] * inv_den;
      }
      dz[0] = -dot * inv_den;
      w.column[r] = dz[0];
    }
    // phi(Q), and its column-0 share of D: phi(Q)^T dz[:, 0].
    query_feature_tile(w.qt.data(), d, rows, w.ld, query_weights,
                       w.query_tile.data(),
                       RowExtras<T>{w.column.data(), w.dots.data()});
    // Queries through the state: (S_{<c} dz_i)_f for f >= 1, feature-major,
    // then through phi's Jacobian.
    gemm<T>(false, true, F - 1, rows, e + 1, T(1), state + (e + 1), e + 1,
            w.dz.data(), e + 1, T(0), w.gradient_tile.data() + w.ld, w.ld);
    feature_gradient_tile(w.gradient_tile.data() + w.ld, w.qt.data(), d, rows,
                          w.ld, query_weights, w.grad_qt.data());
    // The triangle: dW = dZ U^T, dX = f'(X) dW below the diagonal.
    gemm<T>(false, true, rows, rows, e + 1, T(1), w.dz.data(), e + 1,
            w.u.data(), e + 1, T(0), w.dw.data(), w.ld);
    with_order(t.f.order, [&](auto order) {
      triangle_score_gradient(w.x.data(), w.dw.data(), rows, w.ld, t.f, order);
    });
    // dq^T += K^T dX^T, dk^T = Q^T dX, dv = (W^T dZ)[:, 1:] (the column of
    // ones has no gradient to pass on).
    gemm<T>(false, true, d, rows, rows, T(1), w.kt.data(), w.ld, w.dw.data(),
            w.ld, T(1), w.grad_qt.data(), w.ld);
    gemm<T>(false, false, d, rows, rows, T(1), w.qt.data(), w.ld, w.dw.data(),
            w.ld, T(0), w.grad_kt.data(), w.ld);
    gemm<T>(true, false, rows, e, rows, T(1), w.w.data(), w.ld, w.dz.data() + 1,
            e + 1, T(0), w.du.data() + 1, e + 1);
    // Keys through the later chunks' queries (w.rounded = D_{>c}):
    // dv += (psi(K)^T D)[:, 1:], and (D u_j)_f for f >= 1 through psi's
    // Jacobian.
    key_feature_tile(w.kt.data(), w.valid.data(), d, rows, w.ld,
                     w.key_tile.data(), RowExtras<T>{}, t.f.order);
    gemm<T>(true, false, rows, e, F, T(1), w.key_tile.data(), w.ld,
            w.rounded + 1, e + 1, T(1), w.du.data() + 1, e + 1);
    gemm<T>(false, true, F - 1, rows, e + 1, T(1), w.rounded + (e + 1), e + 1,
            w.u.data(), e + 1, T(0), w.gradient_tile.data() + w.ld, w.ld);
    feature_gradient_tile(w.gradient_tile.data() + w.ld, w.kt.data(), d, rows,
                          w.ld, key_weights, w.key_side_t.data());
    for (int64_t l = 0; l < d; ++l)
      for (int64_t r = 0; r < rows; ++r)
        w.grad_kt[l * w.ld + r] += w.key_side_t[l * w.ld + r];
    // D_{>c-1} = D_{>c} + phi(Q)^T dZ, column 0 from the build.
    gemm<T>(false, false, F, e, rows, T(1), w.query_tile.data(), w.ld,
            w.dz.data() + 1, e + 1, T(0), w.product.data() + 1, e + 1);
    for (int64_t f = 0; f < F; ++f) w.product[f * (e + 1)] = w.dots[f];
    w.accumulate();

    transpose_chunk(w.grad_qt.data(), w.ld, d, rows,
                    static_cast<const T*>(nullptr), grad_q + i0 * d, d);
    // A padded key has u_j = 0 and a zero column in kt: its dk and dv are 0
    // by construction, and by selection for dv's column of ones.
    transpose_chunk(w.grad_kt.data(), w.ld, d, rows,
                    static_cast<const T*>(nullptr), grad_k + i0 * d, d);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t col = 0; col < e; ++col)
        grad_v[(i0 + r) * e + col] =
            w.valid[r] != T(0) ? w.du[r * (e + 1) + 1 + col] : T(0);
  }
}

template <typename T>
CausalHead<T> causal_head(const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v,
                          const std::optional<at::Tensor>& key_padding_mask,
                          const KernelOptions& options, int64_t bh) {
  const int64_t H = q.size(1), b = bh / H, h = bh % H;
  const TokenRows<T> qr = token_rows<T>(q), kr = token_rows<T>(k),
                     vr = token_rows<T>(v);
  CausalHead<T> t{qr.head(b, h),
                  kr.head(b, h),
                  vr.head(b, h),
                  qr.row_stride,
                  kr.row_stride,
                  vr.row_stride,
                  q.size(2),
                  q.size(3),
                  v.size(3),
                  feature_count(q.size(3), options.coefficients.order),
                  options.coefficients.template cast<T>(),
                  options.output_scale,
                  nullptr,
                  0};
  if (key_padding_mask) {
    t.key_padding = key_padding_mask->const_data_ptr<bool>() +
                    b * key_padding_mask->stride(0);
    t.key_padding_stride = key_padding_mask->stride(1);
  }
  return t;
}

// A forward's arguments checked, read in the accumulation dtype (q, k, v),
// with their sizes.
struct CausalInputs {
  KernelOptions options;
  at::Tensor q, k, v;
  int64_t B, H, L, d, e, F;
  at::TensorOptions compute;
};

CausalInputs causal_inputs(const char* op, const at::Tensor& q_in,
                           const at::Tensor& k_in, const at::Tensor& v_in,
                           const std::optional<at::Tensor>& key_padding_mask,
                           bool output_scale,
                           c10::ArrayRef<double> coefficients) {
  CausalInputs in;
  in.options = schema_options(true, output_scale, coefficients);
  check_forward_arguments(op, q_in, k_in, v_in, key_padding_mask, std::nullopt,
                          in.options);
  check_causal_arguments(op, q_in, k_in, in.options, kMaxEfficientOrder);
  in.q = compute_operand(q_in);
  in.k = compute_operand(k_in);
  in.v = compute_operand(v_in);
  in.B = in.q.size(0);
  in.H = in.q.size(1);
  in.L = in.q.size(2);
  in.d = in.q.size(3);
  in.e = in.v.size(3);
  in.F = feature_count(in.d, in.options.coefficients.order);
  in.compute = in.q.options().dtype(accumulate_dtype(q_in));
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  const char* op = "taylorshift::causal_efficient_forward";
  const CausalInputs in = causal_inputs(op, q_in, k_in, v_in, key_padding_mask,
                                        output_scale, coefficients);
  const at::Tensor &q = in.q, &k = in.k, &v = in.v;
  const KernelOptions& options = in.options;
  const int64_t B = in.B, H = in.H, L = in.L, d = in.d, e = in.e, F = in.F;
  const auto compute = in.compute;
  at::Tensor out = at::empty({B, H, L, e}, compute);
  at::Tensor den = at::empty({B, H, L}, compute);
  at::Tensor states =
      at::empty({B, H, blocks_of(L, kChunk), F, e + 1}, compute);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_forward_cpu", [&] {
    using T = scalar_t;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      CausalWorkspace<T> w(d, e, F, L);
      for (int64_t bh = begin; bh < end; ++bh) {
        w.start();
        forward_head(causal_head<T>(q, k, v, key_padding_mask, options, bh), 0,
                     out.data_ptr<T>() + bh * L * e, den.data_ptr<T>() + bh * L,
                     states.data_ptr<T>() + bh * states.stride(1), w);
      }
    });
  });
  return {out.to(q_in.scalar_type()), den, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& den_in, const at::Tensor& states_in,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  const char* op = "taylorshift::causal_efficient_backward";
  const KernelOptions options =
      schema_options(true, output_scale, coefficients);
  check_backward_arguments(op, grad_out_in, q_in, k_in, v_in, out_in, den_in,
                           std::nullopt, key_padding_mask, std::nullopt,
                           options);
  check_causal_arguments(op, q_in, k_in, options, kMaxEfficientOrder);
  const at::Tensor q = compute_operand(q_in), k = compute_operand(k_in),
                   v = compute_operand(v_in),
                   grad_out = compute_operand(grad_out_in);
  const auto compute = q.options().dtype(accumulate_dtype(q_in));
  const at::Tensor out = out_in.to(compute).contiguous(),
                   den = den_in.to(compute).contiguous(),
                   states = states_in.to(compute).contiguous();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), d = q.size(3),
                e = v.size(3), F = feature_count(d, options.coefficients.order);
  check_causal_states(op, states_in, q_in, v_in, options.coefficients.order);
  at::Tensor grad_q = at::empty({B, H, L, d}, compute),
             grad_k = at::empty({B, H, L, d}, compute),
             grad_v = at::empty({B, H, L, e}, compute);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_backward_cpu", [&] {
    using T = scalar_t;
    const TokenRows<T> grad_rows = token_rows<T>(grad_out);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      CausalWorkspace<T> w(d, e, F, L);
      for (int64_t bh = begin; bh < end; ++bh) {
        w.start();
        backward_head(causal_head<T>(q, k, v, key_padding_mask, options, bh),
                      grad_rows.head(bh / H, bh % H), grad_rows.row_stride,
                      out.const_data_ptr<T>() + bh * L * e,
                      den.const_data_ptr<T>() + bh * L,
                      states.const_data_ptr<T>() + bh * states.stride(1),
                      grad_q.data_ptr<T>() + bh * L * d,
                      grad_k.data_ptr<T>() + bh * L * d,
                      grad_v.data_ptr<T>() + bh * L * e, w);
      }
    });
  });
  return {grad_q.to(q_in.scalar_type()), grad_k.to(k_in.scalar_type()),
          grad_v.to(v_in.scalar_type())};
}

// Decoding without autograd: T tokens after state (B, H, F, e + 1) and
// valid_keys (B,), the forward above started from them. Returns the tokens'
// outputs and the state and count after them (new tensors; the inputs are
// not written). The output state starts as a copy of the input and the
// chunks add to it in place (CausalWorkspace::start_from): a one-token step
// makes one pass over the state to copy it and one to add to it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_step_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& state_in, const at::Tensor& valid_keys,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  const char* op = "taylorshift::causal_efficient_step";
  const CausalInputs in = causal_inputs(op, q_in, k_in, v_in, key_padding_mask,
                                        output_scale, coefficients);
  const at::Tensor &q = in.q, &k = in.k, &v = in.v;
  const KernelOptions& options = in.options;
  const int64_t B = in.B, H = in.H, L = in.L, d = in.d, e = in.e, F = in.F;
  const auto compute = in.compute;
  check_operand(op, "state", state_in, {B, H, F, e + 1},
                compute.dtype().toScalarType(), q_in);
  check_operand(op, "valid_keys", valid_keys, {B}, at::kLong, q_in);
  const at::Tensor before = valid_keys.contiguous();
  at::Tensor out = at::empty({B, H, L, e}, compute);
  at::Tensor den = at::empty({B, H, L}, compute);
  at::Tensor after = state_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor seen = at::empty({B}, before.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_step_cpu", [&] {
    using T = scalar_t;
    const int64_t FE = F * (e + 1);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      CausalWorkspace<T> w(d, e, F, L, /*own_state=*/false);
      for (int64_t bh = begin; bh < end; ++bh) {
        w.start_from(after.data_ptr<T>() + bh * FE);
        const int64_t count = forward_head(
            causal_head<T>(q, k, v, key_padding_mask, options, bh),
            before.const_data_ptr<int64_t>()[bh / H],
            out.data_ptr<T>() + bh * L * e, den.data_ptr<T>() + bh * L,
            static_cast<T*>(nullptr), w);
        if (bh % H == 0) seen.data_ptr<int64_t>()[bh / H] = count;
      }
    });
  });
  return {out.to(q_in.scalar_type()), after, seen};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CPU, m) {
  m.impl("causal_efficient_step", TORCH_FN(causal_step_cpu));
  m.impl("causal_efficient_forward", TORCH_FN(causal_forward_cpu));
  m.impl("causal_efficient_backward", TORCH_FN(causal_backward_cpu));
}

}  // namespace taylorshift::cpu
