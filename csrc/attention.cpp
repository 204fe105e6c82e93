// taylorshift::attention, the user-facing operator: checks every argument
// with an error that names the problem, turns (normalize, scale,
// temperature) into the logit factors q_hat, k_hat with x = q_hat . k_hat,
// picks the algorithm, and calls it. It is CompositeImplicitAutograd:
// autograd differentiates the normalisation, and the algorithm operators
// carry their own backward.
#include <torch/library.h>

#include <cmath>

#include "taylorshift.h"

namespace taylorshift {
namespace {

std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

void check_coefficients(double a, double b, double c) {
  TORCH_CHECK_VALUE(
      a > 0, "taylorshift: coefficients (a, b, c) need a > 0, got a = ", a);
  TORCH_CHECK_VALUE(
      c > b * b / (4 * a),
      "taylorshift: coefficients (a, b, c) need c > b^2 / (4a) so that the "
      "weights a x^2 + b x + c are positive for every x; got a = ",
      a, ", b = ", b, ", c = ", c);
}

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
                     dtype);
  }
  TORCH_CHECK_TYPE(
      q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
      "taylorshift: q, k, v must have the same dtype, got ", q.scalar_type(),
      ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(),
                    "taylorshift: q, k, v must be on the same device, got ",
                    q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(0) == v.size(0),
                    "taylorshift: q, k, v must have the same batch size, got "
                    "shapes ",
                    shape_string(q), ", ", shape_string(k), ", ",
                    shape_string(v));
  TORCH_CHECK_VALUE(q.size(1) == k.size(1) && q.size(1) == v.size(1),
                    "taylorshift: q, k, v must have the same number of heads, "
                    "got shapes ",
                    shape_string(q), ", ", shape_string(k), ", ",
                    shape_string(v));
  TORCH_CHECK_VALUE(k.size(2) == v.size(2),
                    "taylorshift: k and v must have the same number of keys "
                    "N, got shapes ",
                    shape_string(k), ", ", shape_string(v));
  TORCH_CHECK_VALUE(q.size(3) == k.size(3),
                    "taylorshift: q and k must have the same head dim d, got "
                    "shapes ",
                    shape_string(q), ", ", shape_string(k));
  TORCH_CHECK_VALUE(k.size(2) > 0,
                    "taylorshift: there must be at least one key (N = 0)");
  TORCH_CHECK_VALUE(q.size(3) > 0 && v.size(3) > 0,
                    "taylorshift: head dims must be positive, got d = ",
                    q.size(3), ", e = ", v.size(3));
}

void check_temperature(const at::Tensor& temperature, const at::Tensor& q) {
  TORCH_CHECK_VALUE(temperature.dim() == 1 && temperature.size(0) == q.size(1),
                    "taylorshift: temperature must have shape (H,) = (",
                    q.size(1), ",), got ", shape_string(temperature));
  TORCH_CHECK_TYPE(at::isFloatingType(temperature.scalar_type()),
                   "taylorshift: temperature must be floating, got ",
                   temperature.scalar_type());
  TORCH_CHECK_VALUE(temperature.device() == q.device(),
                    "taylorshift: temperature is on ", temperature.device(),
                    " but q is on ", q.device());
}

void check_key_padding_mask(const at::Tensor& mask, const at::Tensor& k) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool,
                   "taylorshift: key_padding_mask must be a bool tensor "
                   "(True = padding, ignored), got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(
      mask.dim() == 2 && mask.size(0) == k.size(0) && mask.size(1) == k.size(2),
      "taylorshift: key_padding_mask must have shape (B, N) = (", k.size(0),
      ", ", k.size(2), "), got ", shape_string(mask));
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
      mask.scalar_type(),
      ". Additive float masks do not apply to TaylorShift: its weights are "
      "the polynomial a x^2 + b x + c of the logits, not exp(x), so adding "
      "-inf to a logit makes its weight +inf instead of 0.");
  const std::vector<int64_t> target = {q.size(0), q.size(1), q.size(2),
                                       k.size(2)};
  bool broadcastable = mask.dim() <= 4;
  for (int64_t i = 1; broadcastable && i <= mask.dim(); ++i) {
    const int64_t size = mask.size(-i);
    broadcastable = size == 1 || size == target[4 - i];
  }
  TORCH_CHECK_VALUE(broadcastable,
                    "taylorshift: attn_mask must be broadcastable to (B, H, "
                    "M, N) = ",
                    c10::IntArrayRef(target), ", got ", shape_string(mask));
  TORCH_CHECK_VALUE(mask.device() == q.device(),
                    "taylorshift: attn_mask is on ", mask.device(),
                    " but q is on ", q.device());
  return mask.expand(target);
}

at::Tensor attention_composite(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& temperature,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal,
    c10::string_view mode, bool normalize, bool output_scale,
    std::optional<double> scale, double a, double b, double c) {
  check_tensors(q, k, v);
  check_coefficients(a, b, c);
  TORCH_CHECK_VALUE(mode == "auto" || mode == "direct" || mode == "efficient",
                    "taylorshift: mode must be \"auto\", \"direct\" or "
                    "\"efficient\", got \"",
                    std::string(mode), "\"");
  TORCH_CHECK_VALUE(
      !(normalize && scale),
      "taylorshift: scale applies only with normalize=False (with "
      "normalize=True the logits are cosine similarities times temperature)");
  if (temperature) check_temperature(*temperature, q);
  if (key_padding_mask) check_key_padding_mask(*key_padding_mask, k);
  std::optional<at::Tensor> full_attn_mask;
  if (attn_mask) full_attn_mask = expand_attn_mask(*attn_mask, q, k);

  const bool needs_direct = full_attn_mask.has_value() || causal;
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(mode == "efficient" && needs_direct),
      "taylorshift: mode=\"efficient\" supports key_padding_mask only; "
      "attn_mask and causal need mode=\"direct\" (or \"auto\", which picks "
      "it)");

  // Logits x_ij = q_hat_i . k_hat_j: tau cos(q_i, k_j) when normalising,
  // tau scale q_i . k_j otherwise. Norms are clamped as in F.normalize.
  const int64_t d = q.size(3);
  at::Tensor q_hat = q, k_hat = k;
  if (normalize) {
    q_hat = q / q.norm(2, -1, true).clamp_min(1e-12);
    k_hat = k / k.norm(2, -1, true).clamp_min(1e-12);
  } else {
    q_hat = q * scale.value_or(1.0 / std::sqrt(double(d)));
  }
  if (temperature)
    q_hat = q_hat * temperature->to(q.scalar_type()).view({1, -1, 1, 1});

  const bool efficient =
      mode == "efficient" ||
      (mode == "auto" && !needs_direct &&
       prefer_efficient(q.size(2), k.size(2), d, v.size(3), q.device().type()));
  const KernelOptions options = schema_options(causal, output_scale, a, b, c);
  if (efficient)
    return std::get<0>(
        efficient_forward(q_hat, k_hat, v, key_padding_mask, options));
  return std::get<0>(direct_forward(q_hat, k_hat, v, key_padding_mask,
                                    full_attn_mask, options));
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CompositeImplicitAutograd, m) {
  m.impl("attention", TORCH_FN(attention_composite));
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
                            double, double, double)>();
  return op.call(q, k, v, temperature, key_padding_mask, attn_mask, causal,
                 mode, normalize, output_scale, scale, coefficients.a,
                 coefficients.b, coefficients.c);
}

}  // namespace taylorshift
