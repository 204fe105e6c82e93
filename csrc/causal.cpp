// Causal TaylorShift in linear time (causal-and-order spec §2) and its
// continuation from a state (§3, decoding), in ATen operations: it runs on
// every device, and autograd differentiates it (the backward of the prefix
// sum over chunks is the suffix sum D_{>c} of the spec, the backward of each
// chunk's products the direct backward on its triangle). The CPU has its own
// kernels of the same form (cpu/causal.cpp) for training and for decoding
// without gradients; this one serves the other devices, and decoding steps
// that autograd must follow.
//
// Tokens are split into chunks of C. With u_j = m_j [1 | v_j] and the state
// S_{<c} = S_0 + sum over the chunks before c of psi(k_j) u_j^T, row i of
// chunk c gets
//   z_i = phi(q_i)^T S_{<c} + sum_{j in c, j <= i} f(q_i . k_j) u_j,
//   y_i = sigma_i z_i[1:] / z_i[0],   sigma_i = sqrt(N_i / d),
// N_i the unpadded keys up to i (those before the call included). The
// chunks' states are summed by a prefix sum over chunks (never by
// subtracting from a total, which loses low-precision accuracy), so every
// chunk's products run at once: per token 2 F (e + 1) multiply-adds for the
// state and its application, C (d + e + 1) for the triangle.
#include <ATen/ATen.h>

#include <vector>

#include "kernel_checks.h"
#include "taylorshift.h"

namespace taylorshift {
namespace {

// The symmetric features of features.h for Taylor order k, built degree by
// degree: a monomial of degree n extends one of degree n - 1 by an index t
// no smaller than its last index (sorted multi-indices, the order of
// features.h). With the feature dimension outermost, every token's
// feature p of degree n - 1 and coordinate t are two rows, and the block of
// degree n is two row gathers and a product (and its backward two row
// scatters: index_add over whole rows). The query weight is
// c_n multinomial(n; alpha), and multinomial(n; alpha) =
// multinomial(n - 1; alpha') n / r with r the multiplicity of t in alpha.
struct FeatureMap {
  // Degrees 2..k: the row of degree n - 1 and the row of x that each row of
  // degree n multiplies, (P_n,) int64.
  std::vector<std::pair<at::Tensor, at::Tensor>> extension;
  at::Tensor query_weight;  // (F,) in the accumulation dtype
};

FeatureMap feature_map(int64_t d, const Coefficients& f,
                       const at::TensorOptions& acc) {
  // Degree 1: the monomials x_t, each its own last index, multiplicity 1.
  std::vector<int64_t> last(d), run(d, 1);
  std::vector<double> multinomial(d, 1.0);
  for (int64_t t = 0; t < d; ++t) last[t] = t;
  std::vector<double> weight = {f.of_degree(0)};
  for (int64_t t = 0; t < d; ++t) weight.push_back(f.of_degree(1));
  FeatureMap map;
  for (int n = 2; n <= f.order; ++n) {
    std::vector<int64_t> previous, next_last, next_run;
    std::vector<double> next_multinomial;
    for (int64_t p = 0; p < int64_t(last.size()); ++p) {
      for (int64_t t = last[p]; t < d; ++t) {
        const int64_t r = t == last[p] ? run[p] + 1 : 1;
        previous.push_back(p);
        next_last.push_back(t);
        next_run.push_back(r);
        next_multinomial.push_back(multinomial[p] * n / double(r));
        weight.push_back(f.of_degree(n) * next_multinomial.back());
      }
    }
    map.extension.emplace_back(
        at::tensor(previous, at::kLong).to(acc.device()),
        at::tensor(next_last, at::kLong).to(acc.device()));
    last = std::move(next_last);
    run = std::move(next_run);
    multinomial = std::move(next_multinomial);
  }
  TORCH_INTERNAL_ASSERT(int64_t(weight.size()) == feature_count(d, f.order));
  map.query_weight = at::tensor(weight, at::kDouble).to(acc);
  return map;
}

// psi = [x^alpha]_{|alpha| <= k} of xt (d, ...), as (F, ...).
at::Tensor key_features(const at::Tensor& xt, const FeatureMap& map) {
  std::vector<at::Tensor> blocks = {at::ones_like(xt.narrow(0, 0, 1)), xt};
  at::Tensor degree = xt;
  for (const auto& [previous, column] : map.extension) {
    degree = degree.index_select(0, previous) * xt.index_select(0, column);
    blocks.push_back(degree);
  }
  return at::cat(blocks, 0);
}

// f(x) by Horner's rule, highest degree first (features.h).
at::Tensor taylor_weights(const at::Tensor& x, const Coefficients& f) {
  at::Tensor w = x * f.coefficient[0] + f.coefficient[1];
  for (int n = 2; n <= f.order; ++n) w = w * x + f.coefficient[n];
  return w;
}

// z (B, H, L, e + 1) of the header comment for logits' factors x, y
// (B, H, L, d) and u (B, H, L, e + 1), all in the accumulation dtype, and
// the state after the last token; state0 (B, H, F, e + 1) is the state
// before the first (undefined: zero).
std::tuple<at::Tensor, at::Tensor> chunked_numerators(const at::Tensor& x,
                                                      const at::Tensor& y,
                                                      const at::Tensor& u,
                                                      const at::Tensor& state0,
                                                      const Coefficients& f) {
  const c10::SymInt B = x.sym_size(0), H = x.sym_size(1), L = x.sym_size(2);
  const int64_t d = x.size(3);
  // Fewer tokens than a chunk (a decoding step) make one chunk of their own.
  const std::optional<int64_t> known = L.maybe_as_int();
  const int64_t C = known ? std::max<int64_t>(1, std::min(*known, kCausalChunk))
                          : kCausalChunk;
  const c10::SymInt chunks = (L + C - 1) / C, padding = chunks * C - L;
  // Padded tokens are keys with u = 0 and queries whose rows are dropped.
  const auto in_chunks = [&](const at::Tensor& t) {
    return at::constant_pad_nd_symint(t, {0, 0, 0, padding})
        .view_symint({B, H, chunks, C, t.sym_size(3)});
  };
  const at::Tensor xc = in_chunks(x), yc = in_chunks(y), uc = in_chunks(u);

  // Features (F, B, H, chunks, C), as products read them: psi^T per chunk
  // (F x C, rows BHcC apart), phi per chunk (C x F).
  const FeatureMap map = feature_map(d, f, x.options());
  const auto feature_rows = [&](const at::Tensor& tokens) {
    return key_features(tokens.permute({4, 0, 1, 2, 3}).contiguous(), map);
  };
  const at::Tensor psi = feature_rows(yc).permute({1, 2, 3, 0, 4});
  const auto phi = [&] {
    return (feature_rows(xc) * map.query_weight.view({-1, 1, 1, 1, 1}))
        .permute({1, 2, 3, 4, 0});
  };
  // S_{<c}: the exclusive prefix sum of the chunks' states, after state0.
  // One chunk (a decoding step) needs no sum: its state is state0.
  const bool one_chunk = known && *known <= C;
  at::Tensor through = at::matmul(psi, uc);
  if (!one_chunk) through = through.cumsum(2);
  if (state0.defined()) through = through + state0.unsqueeze(2);
  const at::Tensor state = through.select(2, -1);
  at::Tensor inter;
  if (!one_chunk) {
    const at::Tensor before = state0.defined()
                                  ? state0.unsqueeze(2)
                                  : at::zeros_like(through.narrow(2, 0, 1));
    inter = at::matmul(
        phi(), at::cat({before, through.narrow_symint(2, 0, chunks - 1)}, 2));
  } else if (state0.defined()) {
    inter = at::matmul(phi(), state0.unsqueeze(2));
  }

  // Inside a chunk, the direct form on its lower triangle (j <= i).
  const at::Tensor later =
      at::ones({C, C}, x.options().dtype(at::kBool)).triu(1);
  const at::Tensor w = taylor_weights(at::matmul(xc, yc.transpose(-1, -2)), f)
                           .masked_fill(later, 0);
  at::Tensor z = at::matmul(w, uc);
  if (inter.defined()) z = z + inter;
  return {
      z.view_symint({B, H, chunks * C, u.sym_size(3)}).narrow_symint(2, 0, L),
      state};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_continue(
    const at::Tensor& q_hat, const at::Tensor& k_hat, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options, const std::optional<at::Tensor>& state,
    const std::optional<at::Tensor>& valid_keys) {
  const auto acc = q_hat.options().dtype(accumulate_dtype(q_hat));
  const c10::SymInt B = q_hat.sym_size(0), L = q_hat.sym_size(2);
  // m_j = 0 for a padded key: its u_j and its count vanish.
  const at::Tensor valid = key_padding_mask
                               ? key_padding_mask->logical_not()
                               : at::ones_symint({B, L}, acc.dtype(at::kBool));
  // A padded key's own values are never read (they may be NaN or inf).
  const at::Tensor rows = valid.unsqueeze(1).unsqueeze(-1);
  const at::Tensor u = at::where(
      rows, at::cat({at::ones_like(v.narrow(-1, 0, 1), acc), v.to(acc)}, -1),
      0);
  const at::Tensor k_valid = at::where(rows, k_hat.to(acc), 0);
  auto [z, new_state] =
      chunked_numerators(q_hat.to(acc), k_valid, u,
                         state.value_or(at::Tensor()), options.coefficients);

  // N_i counts the unpadded keys up to i, those of earlier calls included.
  at::Tensor seen = valid.to(at::kLong).cumsum(1);
  if (valid_keys) seen = seen + valid_keys->unsqueeze(1);
  const at::Tensor den = z.narrow(-1, 0, 1);
  // 1/den, and 0 for a row that sees no key (its output is zeros); the inner
  // where keeps the gradient of 1/den finite there.
  const at::Tensor sees_keys = den != 0;
  at::Tensor factor = at::where(
      sees_keys, at::reciprocal(at::where(sees_keys, den, at::ones_like(den))),
      at::zeros_like(den));
  if (options.output_scale)
    factor = factor * (seen.to(acc) / double(q_hat.size(3)))
                          .sqrt()
                          .unsqueeze(1)
                          .unsqueeze(-1);
  at::Tensor out = (z.narrow(-1, 1, v.size(3)) * factor).to(v.scalar_type());
  return {out, new_state, seen.select(1, -1)};
}

}  // namespace taylorshift
