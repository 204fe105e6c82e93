// taylorshift::attention, the user-facing operator: checks every argument
// with an error that names the problem, turns (normalize, scale,
// temperature) into the logit factors q_hat, k_hat with x = q_hat . k_hat,
// picks the algorithm, and calls it. It is CompositeImplicitAutograd:
// autograd differentiates the normalisation, and the algorithm operators
// carry their own backward.
#include <torch/library.h>

#include <cmath>

#include "kernel_checks.h"
#include "taylorshift.h"

namespace taylorshift {
namespace {

// Sizes are read as SymInts and compared with expect_true (a runtime
// assertion, not a guard), so that torch.compile(dynamic=True) and
// torch.export with a dynamic Dim trace one graph for every size.
void check_tensors(const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v) {
  const std::pair<const at::Tensor*, const char*> named[] = {
      {&q, "q (B, H, M, d)"}, {&k, "k (B, H, N, d)"}, {&v, "v (B, H, N, e)"}};
  for (const auto& [t, name] : named) {
    TORCH_CHECK_VALUE(t->dim() == 4, "taylorshift: ", name,
                      " must have 4 dimensions, got shape ", shape_string(*t));
    const auto dtype = t->scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 ||
                         dtype == at::kFloat || dtype == at::kDouble,
                     "taylorshift: ", name,
                     " must be float16, bfloat16, float32 or float64, got ",
                     dtype_string(dtype));
  }
  TORCH_CHECK_TYPE(
      q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
      "taylorshift: q, k, v must have the same dtype, got ",
      dtype_string(q.scalar_type()), ", ", dtype_string(k.scalar_type()), ", ",
      dtype_string(v.scalar_type()));
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(),
                    "taylorshift: q, k, v must be on the same device, got ",
                    q.device(), ", ", k.device(), ", ", v.device());
  const std::string shapes =
      shape_string(q) + ", " + shape_string(k) + ", " + shape_string(v);
  TS_SYM_CHECK_VALUE(
      q.sym_size(0).sym_eq(k.sym_size(0)) & q.sym_size(0).sym_eq(v.sym_size(0)),
      "taylorshift: q, k, v must have the same batch size, got shapes ",
      shapes);
  TS_SYM_CHECK_VALUE(
      q.sym_size(1).sym_eq(k.sym_size(1)) & q.sym_size(1).sym_eq(v.sym_size(1)),
      "taylorshift: q, k, v must have the same number of heads, got shapes ",
      shapes);
  TS_SYM_CHECK_VALUE(k.sym_size(2).sym_eq(v.sym_size(2)),
                     "taylorshift: k and v must have the same number of keys "
                     "N, got shapes ",
                     shape_string(k), ", ", shape_string(v));
  TS_SYM_CHECK_VALUE(q.sym_size(3).sym_eq(k.sym_size(3)),
                     "taylorshift: q and k must have the same head dim d, got "
                     "shapes ",
                     shape_string(q), ", ", shape_string(k));
  TS_SYM_CHECK_VALUE(k.sym_size(2).sym_gt(0),
                     "taylorshift: there must be at least one key (N = 0)");
  TS_SYM_CHECK_VALUE(q.sym_size(3).sym_gt(0) & v.sym_size(3).sym_gt(0),
                     "taylorshift: head dims must be positive, got d = ",
                     q.sym_size(3), ", e = ", v.sym_size(3));
}

void check_temperature(const at::Tensor& temperature, const at::Tensor& q) {
  TS_SYM_CHECK_VALUE(temperature.dim() == 1
                         ? temperature.sym_size(0).sym_eq(q.sym_size(1))
                         : c10::SymBool(false),
                     "taylorshift: temperature must have shape (H,) = (",
                     q.sym_size(1), ",), got ", shape_string(temperature));
  TORCH_CHECK_TYPE(at::isFloatingType(temperature.scalar_type()),
                   "taylorshift: temperature must be floating, got ",
                   dtype_string(temperature.scalar_type()));
  TORCH_CHECK_VALUE(temperature.device() == q.device(),
                    "taylorshift: temperature is on ", temperature.device(),
                    " but q is on ", q.device());
}

void check_key_padding_mask(const at::Tensor& mask, const at::Tensor& k) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool,
                   "taylorshift: key_padding_mask must be a bool tensor "
                   "(True = padding, ignored), got ",
                   dtype_string(mask.scalar_type()));
  TS_SYM_CHECK_VALUE(
      mask.dim() == 2 ? mask.sym_size(0).sym_eq(k.sym_size(0)) &
                            mask.sym_size(1).sym_eq(k.sym_size(2))
                      : c10::SymBool(false),
      "taylorshift: key_padding_mask must have shape (B, N) = (", k.sym_size(0),
      ", ", k.sym_size(2), "), got ", shape_string(mask));
  TORCH_CHECK_VALUE(mask.device() == k.device(),
                    "taylorshift: key_padding_mask is on ", mask.device(),
                    " but k is on ", k.device());
}

// Returns the mask expanded (without copying) to (B, H, M, N).
at::Tensor expand_attn_mask(const at::Tensor& mask, const at::Tensor& q,
                            const at::Tensor& k) {
  TORCH_CHECK_TYPE(
      mask.scalar_type() == at::kBool,
      "taylorshift: attn_mask must be a bool tensor (True = not allowed to "
      "attend), got ",
      dtype_string(mask.scalar_type()),
      ". Additive float masks do not apply to TaylorShift: its weights are "
      "the polynomial a x^2 + b x + c of the logits, not exp(x), so adding "
      "-inf to a logit makes its weight +inf instead of 0.");
  const std::vector<c10::SymInt> target = {q.sym_size(0), q.sym_size(1),
                                           q.sym_size(2), k.sym_size(2)};
  // A dimension broadcasts if it is 1 (size-oblivious: a dynamic size is
  // taken as not 1, no guard) or equals the target.
  c10::SymBool broadcastable = mask.dim() <= 4;
  for (int64_t i = 1; i <= std::min<int64_t>(mask.dim(), 4); ++i) {
    const c10::SymInt size = mask.sym_size(-i);
    if (!TORCH_GUARD_SIZE_OBLIVIOUS(size.sym_eq(1)))
      broadcastable = broadcastable & size.sym_eq(target[4 - i]);
  }
  TS_SYM_CHECK_VALUE(broadcastable,
                     "taylorshift: attn_mask must be broadcastable to (B, H, "
                     "M, N) = ",
                     c10::SymIntArrayRef(target), ", got ", shape_string(mask));
  TORCH_CHECK_VALUE(mask.device() == q.device(),
                    "taylorshift: attn_mask is on ", mask.device(),
                    " but q is on ", q.device());
  return mask.expand_symint(target);
}

// mode="auto" without masks: the cost model's choice (crossover.cpp). Under
// torch.compile(dynamic=True) or torch.export with a dynamic Dim the sizes
// are symbols, and a choice read from their current values would either
// specialise the graph to them (a recompile per length, an export error) or
// guard on the crossover. Instead the choice must hold for every value the
// symbols may take: the efficient algorithm when the symbols' known ranges
// prove it cheaper (e.g. Dim("N", min=...) above the crossover), the direct
// one otherwise. Pass mode="efficient" to pin it for long dynamic lengths.
bool auto_picks_efficient(const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, int order) {
  const auto M = q.sym_size(2).maybe_as_int(), N = k.sym_size(2).maybe_as_int(),
             d = q.sym_size(3).maybe_as_int(), e = v.sym_size(3).maybe_as_int();
  const c10::DeviceType device = q.device().type();
  if (!d || !e || !efficient_supports(order, device)) return false;
  if (M && N) return prefer_efficient(*M, *N, *d, *e, device, order);
  const int64_t from = crossover(*d, *e, device, order);
  return TORCH_STATICALLY_KNOWN_TRUE(q.sym_size(2).sym_ge(from)) &&
         TORCH_STATICALLY_KNOWN_TRUE(k.sym_size(2).sym_ge(from));
}

// mode="auto" with causal=True (M = N): the cost model's choice between
// causal direct and the chunked causal form, or direct where the length is
// a symbol (see auto_picks_efficient).
bool auto_picks_causal_efficient(const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, int order) {
  const auto M = q.sym_size(2).maybe_as_int(), N = k.sym_size(2).maybe_as_int(),
             d = q.sym_size(3).maybe_as_int(), e = v.sym_size(3).maybe_as_int();
  const c10::DeviceType device = q.device().type();
  return M && N && *M == *N && d && e && efficient_supports(order, device) &&
         prefer_efficient_causal(*N, *d, *e, device, order);
}

void check_normalization(const at::Tensor& q, bool normalize,
                         std::optional<double> scale,
                         const std::optional<at::Tensor>& temperature) {
  TORCH_CHECK_VALUE(
      !(normalize && scale),
      "taylorshift: scale applies only with normalize=False (with "
      "normalize=True the logits are cosine similarities times temperature)");
  if (temperature) check_temperature(*temperature, q);
}

// An odd order is valid only on bounded logits, |x| <= max_h |tau_h| with
// normalize=True: that maximum is read on the host (a device sync on CUDA;
// no value to read while torch.compile traces).
void check_odd_order_range(const Coefficients& f, const at::Tensor& q,
                           bool normalize,
                           const std::optional<at::Tensor>& temperature) {
  if (f.order % 2 == 0) return;
  const double radius = temperature && normalize
                            ? temperature->detach().abs().max().item<double>()
                            : 1.0;
  check_logit_range(f, q.scalar_type(), normalize, radius);
}

// Logits x_ij = q_hat_i . k_hat_j: tau cos(q_i, k_j) when normalising,
// tau scale q_i . k_j otherwise; formed in the accumulation dtype and
// rounded to the input dtype once. normalize_rows (cpu/normalize.cpp) does
// it in one pass with its own backward, which saves no (B, H, L, d)
// temporary.
std::pair<at::Tensor, at::Tensor> logit_factors(
    const at::Tensor& q, const at::Tensor& k,
    const std::optional<at::Tensor>& temperature, bool normalize,
    std::optional<double> scale) {
  if (normalize) return {normalize_rows(q, temperature), normalize_rows(k)};
  const auto acc = accumulate_dtype(q);
  const c10::SymFloat default_scale =
      c10::SymFloat(1.0) / c10::SymFloat(q.sym_size(3)).sqrt();
  const c10::Scalar logit_scale =
      scale ? c10::Scalar(*scale) : c10::Scalar(default_scale);
  // One product with the per-head factor scale tau_h: autograd saves q
  // (the caller's) and the (H,) factor, not a scaled copy of q.
  const at::Tensor q_hat =
      temperature
          ? q.to(acc) * (temperature->to(acc) * logit_scale).view({1, -1, 1, 1})
          : q.to(acc) * logit_scale;
  return {q_hat.to(q.scalar_type()), k};
}

at::Tensor attention_composite(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal,
    c10::string_view mode, bool normalize, bool output_scale,
    std::optional<double> scale, c10::ArrayRef<double> coefficients) {
  check_tensors(q, k, v);
  const Coefficients f = polynomial_of(coefficients);
  check_coefficients(f, q.scalar_type());
  TORCH_CHECK_VALUE(mode == "auto" || mode == "direct" || mode == "efficient",
                    "taylorshift: mode must be \"auto\", \"direct\" or "
                    "\"efficient\", got \"",
                    std::string(mode), "\"");
  check_normalization(q, normalize, scale, temperature);
  if (key_padding_mask) check_key_padding_mask(*key_padding_mask, k);
  std::optional<at::Tensor> full_attn_mask;
  if (attn_mask) full_attn_mask = expand_attn_mask(*attn_mask, q, k);
  check_odd_order_range(f, q, normalize, temperature);

  TORCH_CHECK_NOT_IMPLEMENTED(
      !(mode == "efficient" && full_attn_mask),
      "taylorshift: mode=\"efficient\" supports key_padding_mask and causal "
      "only; attn_mask needs mode=\"direct\" (or \"auto\", which picks it)");
  // The causal efficient form continues each query's own chunk: query i and
  // key i are the same token.
  TORCH_CHECK_VALUE(
      !(mode == "efficient" && causal &&
        !q.sym_size(2).sym_eq(k.sym_size(2)).guard_bool(__FILE__, __LINE__)),
      "taylorshift: causal=True with mode=\"efficient\" requires as many "
      "queries as keys (M = N), got M = ",
      q.sym_size(2), ", N = ", k.sym_size(2),
      "; mode=\"direct\" takes causal with M != N (top-left aligned)");

  const bool efficient =
      mode == "efficient" ||
      (mode == "auto" && !full_attn_mask &&
       (causal ? auto_picks_causal_efficient(q, k, v, f.order)
               : auto_picks_efficient(q, k, v, f.order)));
  const KernelOptions options{f, causal, output_scale};
  if (efficient && causal) {
    check_efficient_order(
        "taylorshift", f.order,
        q.is_cuda() ? kMaxEfficientOrderCuda : kMaxEfficientOrder);
    auto [q_hat, k_hat] = logit_factors(q, k, temperature, normalize, scale);
    // The CPU and CUDA have kernels (cpu/causal.cpp, cuda/causal.cu); other
    // devices run the ATen form.
    if (q.device().is_cpu() || q.device().is_cuda())
      return std::get<0>(
          causal_efficient_forward(q_hat, k_hat, v, key_padding_mask, options));
    return std::get<0>(
        causal_continue(q_hat, k_hat, v, key_padding_mask, options));
  }
  // The efficient operators normalise q and k themselves, chunk by chunk.
  if (efficient && normalize)
    return std::get<0>(efficient_forward(q, k, v, key_padding_mask, options,
                                         true, temperature));
  auto [q_hat, k_hat] = logit_factors(q, k, temperature, normalize, scale);
  if (efficient)
    return std::get<0>(
        efficient_forward(q_hat, k_hat, v, key_padding_mask, options));
  return std::get<0>(direct_forward(q_hat, k_hat, v, key_padding_mask,
                                    full_attn_mask, options));
}

// taylorshift::causal_step: the decoding step of csrc/causal.cpp after the
// checks `attention` makes, plus those of the state.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_step_composite(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& valid_keys,
    const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& key_padding_mask, bool normalize,
    bool output_scale, std::optional<double> scale,
    c10::ArrayRef<double> coefficients) {
  check_tensors(q, k, v);
  TS_SYM_CHECK_VALUE(q.sym_size(2).sym_eq(k.sym_size(2)),
                     "taylorshift.causal_step: q and k must hold the same "
                     "tokens (T queries, T keys), got shapes ",
                     shape_string(q), ", ", shape_string(k));
  const Coefficients f = polynomial_of(coefficients);
  check_coefficients(f, q.scalar_type());
  check_efficient_order(
      "taylorshift.causal_step", f.order,
      q.is_cuda() ? kMaxEfficientOrderCuda : kMaxEfficientOrder);
  check_normalization(q, normalize, scale, temperature);
  check_odd_order_range(f, q, normalize, temperature);
  if (key_padding_mask) check_key_padding_mask(*key_padding_mask, k);
  const c10::SymInt B = q.sym_size(0), H = q.sym_size(1), d = q.sym_size(3),
                    e = v.sym_size(3);
  check_operand("taylorshift.causal_step", "state", state,
                {B, H, feature_count(d, f.order), e + 1}, accumulate_dtype(q),
                q);
  check_operand("taylorshift.causal_step", "valid_keys", valid_keys, {B},
                at::kLong, q);
  auto [q_hat, k_hat] = logit_factors(q, k, temperature, normalize, scale);
  // Without gradients, the CPU's and CUDA's kernels (cpu/causal.cpp,
  // cuda/causal.cu) continue from the state; with them, or on other devices,
  // the ATen form, which autograd follows.
  const bool differentiable =
      at::GradMode::is_enabled() &&
      (q.requires_grad() || k.requires_grad() || v.requires_grad() ||
       state.requires_grad() || (temperature && temperature->requires_grad()));
  const KernelOptions options{f, true, output_scale};
  if ((q.device().is_cpu() || q.device().is_cuda()) && !differentiable)
    return causal_efficient_step(q_hat, k_hat, v, state, valid_keys,
                                 key_padding_mask, options);
  return causal_continue(q_hat, k_hat, v, key_padding_mask, options, state,
                         valid_keys);
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CompositeImplicitAutograd, m) {
  m.impl("attention", TORCH_FN(attention_composite));
  m.impl("causal_step", TORCH_FN(causal_step_composite));
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v,
                     const std::optional<at::Tensor>& temperature,
                     const std::optional<at::Tensor>& key_padding_mask,
                     const std::optional<at::Tensor>& attn_mask, bool causal,
                     const std::string& mode, bool normalize, bool output_scale,
                     std::optional<double> scale, Coefficients coefficients) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taylorshift::attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, bool,
                            c10::string_view, bool, bool, std::optional<double>,
                            c10::ArrayRef<double>)>();
  return op.call(q, k, v, temperature, key_padding_mask, attn_mask, causal,
                 mode, normalize, output_scale, scale,
                 coefficient_list(coefficients));
}

}  // namespace taylorshift

namespace taylorshift {

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_step(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& valid_keys,
    const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& key_padding_mask, bool normalize,
    bool output_scale, std::optional<double> scale, Coefficients coefficients) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("taylorshift::causal_step", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool, bool,
                           std::optional<double>, c10::ArrayRef<double>)>();
  return op.call(q, k, v, state, valid_keys, temperature, key_padding_mask,
                 normalize, output_scale, scale,
                 coefficient_list(coefficients));
}

}  // namespace taylorshift
