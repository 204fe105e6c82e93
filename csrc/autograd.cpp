// Autograd for the algorithm operators and normalize_rows: one
// torch::autograd::Function per operator, registered for the Autograd key so
// that gradients flow to q, k and v from Python and from C++ alike. The forward
// operators return what the backward needs (den; the state for the efficient
// algorithm), so the backward recomputes only what is cheaper to recompute than
// to store: the direct algorithm's M x N weights.
#include <torch/autograd.h>
#include <torch/library.h>

#include "taylorshift.h"

namespace taylorshift {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// KernelOptions kept in the context for the backward (saved_data holds
// IValues, not structs).
void save_options(AutogradContext* ctx, const KernelOptions& options) {
  ctx->saved_data["coefficients"] = coefficient_list(options.coefficients);
  ctx->saved_data["causal"] = options.causal;
  ctx->saved_data["output_scale"] = options.output_scale;
}

KernelOptions saved_options(AutogradContext* ctx) {
  return schema_options(ctx->saved_data["causal"].toBool(),
                        ctx->saved_data["output_scale"].toBool(),
                        ctx->saved_data["coefficients"].toDoubleVector());
}

std::optional<at::Tensor> saved_mask(AutogradContext* ctx, const char* name) {
  return ctx->saved_data[name].toOptional<at::Tensor>();
}

// Gradients for q, k, v; none for the masks and options that follow them.
variable_list with_undefined(at::Tensor grad_q, at::Tensor grad_k,
                             at::Tensor grad_v, size_t others) {
  variable_list grads = {std::move(grad_q), std::move(grad_k),
                         std::move(grad_v)};
  grads.resize(3 + others);
  return grads;
}

class DirectAttention : public torch::autograd::Function<DirectAttention> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
      const std::optional<at::Tensor>& attn_mask,
      const KernelOptions& options) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, den] =
        direct_forward(q, k, v, key_padding_mask, attn_mask, options);
    ctx->save_for_backward({q, k, v, out, den});
    save_options(ctx, options);
    ctx->saved_data["key_padding_mask"] = key_padding_mask;
    ctx->saved_data["attn_mask"] = attn_mask;
    ctx->mark_non_differentiable({den});
    return {out, den};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_q, grad_k, grad_v] =
        direct_backward(grads[0], saved[0], saved[1], saved[2], saved[3],
                        saved[4], saved_mask(ctx, "key_padding_mask"),
                        saved_mask(ctx, "attn_mask"), saved_options(ctx));
    return with_undefined(grad_q, grad_k, grad_v, 3);
  }
};

class CausalEfficientAttention
    : public torch::autograd::Function<CausalEfficientAttention> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
      const KernelOptions& options) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, den, states] =
        causal_efficient_forward(q, k, v, key_padding_mask, options);
    ctx->save_for_backward({q, k, v, out, den, states});
    save_options(ctx, options);
    ctx->saved_data["key_padding_mask"] = key_padding_mask;
    ctx->mark_non_differentiable({den, states});
    return {out, den, states};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_q, grad_k, grad_v] = causal_efficient_backward(
        grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
        saved_mask(ctx, "key_padding_mask"), saved_options(ctx));
    return with_undefined(grad_q, grad_k, grad_v, 2);
  }
};

// With normalize, the operators form q_hat and k_hat themselves: the
// context saves q and k as given (alive anyway as the caller's inputs) and
// the (H,) temperature, and the gradients are those of q, k and temperature.
class EfficientAttention
    : public torch::autograd::Function<EfficientAttention> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
      const KernelOptions& options, bool normalize,
      const std::optional<at::Tensor>& temperature) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, den, state] = efficient_forward(q, k, v, key_padding_mask,
                                               options, normalize, temperature);
    ctx->save_for_backward(
        {q, k, v, out, den, state, temperature.value_or(at::Tensor())});
    save_options(ctx, options);
    ctx->saved_data["key_padding_mask"] = key_padding_mask;
    ctx->saved_data["normalize"] = normalize;
    ctx->mark_non_differentiable({den, state});
    return {out, den, state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> temperature;
    if (saved[6].defined()) temperature = saved[6];
    auto [grad_q, grad_k, grad_v, grad_temperature] = efficient_backward(
        grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
        saved_mask(ctx, "key_padding_mask"), saved_options(ctx),
        ctx->saved_data["normalize"].toBool(), temperature);
    // After q, k, v: key_padding_mask, options, normalize, temperature.
    variable_list out = with_undefined(grad_q, grad_k, grad_v, 4);
    if (temperature) out[6] = grad_temperature;
    return out;
  }
};

// The backward operators have no derivative of their own. They are
// registered for the Autograd key all the same, so that a second derivative
// (create_graph=True, then differentiating the gradients) raises instead of
// silently treating them as constants; first derivatives with
// create_graph=True still work.
[[noreturn]] void refuse_double_backward() {
  TORCH_CHECK_NOT_IMPLEMENTED(false,
                              "taylorshift: second derivatives (double "
                              "backward) of TaylorShift attention are not "
                              "implemented");
}

class DirectBackward : public torch::autograd::Function<DirectBackward> {
 public:
  static variable_list forward(
      AutogradContext*, const at::Tensor& grad_out, const at::Tensor& q,
      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
      const at::Tensor& den, const std::optional<at::Tensor>& key_padding_mask,
      const std::optional<at::Tensor>& attn_mask,
      const KernelOptions& options) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_q, grad_k, grad_v] = direct_backward(
        grad_out, q, k, v, out, den, key_padding_mask, attn_mask, options);
    return {grad_q, grad_k, grad_v};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward();
  }
};

class EfficientBackward : public torch::autograd::Function<EfficientBackward> {
 public:
  static variable_list forward(
      AutogradContext*, const at::Tensor& grad_out, const at::Tensor& q,
      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
      const at::Tensor& den, const at::Tensor& state,
      const std::optional<at::Tensor>& key_padding_mask,
      const KernelOptions& options, bool normalize,
      const std::optional<at::Tensor>& temperature) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_q, grad_k, grad_v, grad_temperature] =
        efficient_backward(grad_out, q, k, v, out, den, state, key_padding_mask,
                           options, normalize, temperature);
    return {grad_q, grad_k, grad_v, grad_temperature};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward();
  }
};

class CausalEfficientBackward
    : public torch::autograd::Function<CausalEfficientBackward> {
 public:
  static variable_list forward(
      AutogradContext*, const at::Tensor& grad_out, const at::Tensor& q,
      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
      const at::Tensor& den, const at::Tensor& states,
      const std::optional<at::Tensor>& key_padding_mask,
      const KernelOptions& options) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_q, grad_k, grad_v] = causal_efficient_backward(
        grad_out, q, k, v, out, den, states, key_padding_mask, options);
    return {grad_q, grad_k, grad_v};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward();
  }
};

// y = factor_h x / |x|: saves x (alive anyway as the caller's input) and the
// (H,) factor, never a (B, H, L, d) temporary; the backward kernel recomputes
// each row's norm from x, one pass over a row it reads anyway.
class NormalizeRows : public torch::autograd::Function<NormalizeRows> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& factor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = normalize_rows(x, factor);
    ctx->save_for_backward({x, factor.value_or(at::Tensor())});
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> factor;
    if (saved[1].defined()) factor = saved[1];
    auto [grad_x, grad_factor] =
        normalize_rows_backward(grads[0], saved[0], factor);
    if (!factor) grad_factor = at::Tensor();
    return {grad_x, grad_factor};
  }
};

class NormalizeRowsBackward
    : public torch::autograd::Function<NormalizeRowsBackward> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_y,
                               const at::Tensor& x,
                               const std::optional<at::Tensor>& factor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_x, grad_factor] = normalize_rows_backward(grad_y, x, factor);
    return {grad_x, grad_factor};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    refuse_double_backward();
  }
};

// The Autograd-key kernels: the schemas' flat options gathered once.
std::tuple<at::Tensor, at::Tensor> direct_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  auto outs = DirectAttention::apply(
      q, k, v, key_padding_mask, attn_mask,
      schema_options(causal, output_scale, coefficients));
  return {outs[0], outs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  auto grads = DirectBackward::apply(
      grad_out, q, k, v, out, den, key_padding_mask, attn_mask,
      schema_options(causal, output_scale, coefficients));
  return {grads[0], grads[1], grads[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients, bool normalize,
    const std::optional<at::Tensor>& temperature) {
  auto outs = EfficientAttention::apply(
      q, k, v, key_padding_mask,
      schema_options(false, output_scale, coefficients), normalize,
      temperature);
  return {outs[0], outs[1], outs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
efficient_backward_autograd(const at::Tensor& grad_out, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& den,
                            const at::Tensor& state,
                            const std::optional<at::Tensor>& key_padding_mask,
                            bool output_scale,
                            c10::ArrayRef<double> coefficients, bool normalize,
                            const std::optional<at::Tensor>& temperature) {
  auto grads = EfficientBackward::apply(
      grad_out, q, k, v, out, den, state, key_padding_mask,
      schema_options(false, output_scale, coefficients), normalize,
      temperature);
  return {grads[0], grads[1], grads[2], grads[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
causal_efficient_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  auto outs = CausalEfficientAttention::apply(
      q, k, v, key_padding_mask,
      schema_options(true, output_scale, coefficients));
  return {outs[0], outs[1], outs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
causal_efficient_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const at::Tensor& states, const std::optional<at::Tensor>& key_padding_mask,
    bool output_scale, c10::ArrayRef<double> coefficients) {
  auto grads = CausalEfficientBackward::apply(
      grad_out, q, k, v, out, den, states, key_padding_mask,
      schema_options(true, output_scale, coefficients));
  return {grads[0], grads[1], grads[2]};
}

at::Tensor normalize_rows_autograd(const at::Tensor& x,
                                   const std::optional<at::Tensor>& factor) {
  return NormalizeRows::apply(x, factor)[0];
}

std::tuple<at::Tensor, at::Tensor> normalize_rows_backward_autograd(
    const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& factor) {
  auto grads = NormalizeRowsBackward::apply(grad_y, x, factor);
  return {grads[0], grads[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, Autograd, m) {
  m.impl("direct_forward", TORCH_FN(direct_forward_autograd));
  m.impl("efficient_forward", TORCH_FN(efficient_forward_autograd));
  m.impl("direct_backward", TORCH_FN(direct_backward_autograd));
  m.impl("efficient_backward", TORCH_FN(efficient_backward_autograd));
  m.impl("causal_efficient_forward",
         TORCH_FN(causal_efficient_forward_autograd));
  m.impl("causal_efficient_backward",
         TORCH_FN(causal_efficient_backward_autograd));
  m.impl("normalize_rows", TORCH_FN(normalize_rows_autograd));
  m.impl("normalize_rows_backward", TORCH_FN(normalize_rows_backward_autograd));
}

}  // namespace taylorshift
