// The `taylorshift::` operator schemas, their Meta kernels (shapes only, for
// torch.compile and export) and the C++ API entry points that call them
// through the dispatcher. Kernels live in cpu/ and cuda/, autograd in
// autograd.cpp, the user-facing composite in attention.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "kernel_checks.h"
#include "taylorshift.h"

namespace taylorshift {

TORCH_LIBRARY(taylorshift, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? temperature=None, "
      "Tensor? key_padding_mask=None, Tensor? attn_mask=None, "
      "bool causal=False, str mode=\"auto\", bool normalize=True, "
      "bool output_scale=True, float? scale=None, "
      "float[] coefficients=[0.5, 1.0, 1.0]) -> Tensor");
  // Decoding: the next T tokens of causal attention after `state`
  // (B, H, F, e + 1) and `valid_keys` (B,), the unpadded keys before them;
  // returns their outputs and the state and count after them.
  m.def(
      "causal_step(Tensor q, Tensor k, Tensor v, Tensor state, "
      "Tensor valid_keys, Tensor? temperature=None, "
      "Tensor? key_padding_mask=None, bool normalize=True, "
      "bool output_scale=True, float? scale=None, "
      "float[] coefficients=[0.5, 1.0, 1.0]) -> "
      "(Tensor out, Tensor state, Tensor valid_keys)");
  m.def(
      "direct_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor? attn_mask, bool causal, bool output_scale, "
      "float[] coefficients) -> (Tensor out, Tensor den)");
  m.def(
      "direct_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor den, Tensor? key_padding_mask, Tensor? attn_mask, "
      "bool causal, bool output_scale, float[] coefficients) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Causal, M = N, in linear time: states holds the state before each chunk
  // of 128 tokens, (B, H, chunks, F, e + 1), for the backward.
  m.def(
      "causal_efficient_forward(Tensor q, Tensor k, Tensor v, "
      "Tensor? key_padding_mask, bool output_scale, float[] coefficients) -> "
      "(Tensor out, Tensor den, Tensor states)");
  // Decoding without autograd (the CPU's and CUDA's kernels; causal_step picks
  // it when no gradient is needed): the forward above after a state and a
  // count.
  m.def(
      "causal_efficient_step(Tensor q, Tensor k, Tensor v, Tensor state, "
      "Tensor valid_keys, Tensor? key_padding_mask, bool output_scale, "
      "float[] coefficients) -> (Tensor out, Tensor state, Tensor valid_keys)");
  m.def(
      "causal_efficient_backward(Tensor grad_out, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor den, Tensor states, "
      "Tensor? key_padding_mask, bool output_scale, float[] coefficients) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // normalize=True: the logits' factors are formed inside, chunk by chunk,
  // as normalize_rows forms them: temperature_h q / |q| and k / |k|.
  // grad_temperature is (H,) in temperature's dtype, or (0,) without one.
  m.def(
      "efficient_forward(Tensor q, Tensor k, Tensor v, "
      "Tensor? key_padding_mask, bool output_scale, "
      "float[] coefficients, bool normalize=False, "
      "Tensor? temperature=None) -> (Tensor out, Tensor den, Tensor state)");
  m.def(
      "efficient_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor den, Tensor state, Tensor? key_padding_mask, "
      "bool output_scale, float[] coefficients, bool normalize=False, "
      "Tensor? temperature=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, "
      "Tensor grad_temperature)");
  // y = factor_h x / |x| along the last dimension of x (B, H, L, d), in x's
  // dtype, computed in the accumulation dtype and rounded once; exact for
  // every finite x, a zero row gives zeros (identity gradient). Without a
  // factor, factor_h = 1.
  m.def("normalize_rows(Tensor x, Tensor? factor=None) -> Tensor");
  m.def(
      "normalize_rows_backward(Tensor grad_y, Tensor x, Tensor? factor) -> "
      "(Tensor grad_x, Tensor grad_factor)");
}

namespace {

// Meta kernels: the output shapes of docs/math.md, in symbolic sizes so that
// torch.compile with dynamic shapes can trace through them.
at::Tensor empty_output(const at::Tensor& q, const at::Tensor& v) {
  return at::empty_symint(
      {q.sym_size(0), q.sym_size(1), q.sym_size(2), v.sym_size(3)},
      q.options());
}

at::Tensor empty_den(const at::Tensor& q) {
  return at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)},
                          q.options().dtype(accumulate_dtype(q)));
}

std::tuple<at::Tensor, at::Tensor> direct_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  check_forward_arguments("taylorshift::direct_forward", q, k, v,
                          key_padding_mask, attn_mask,
                          schema_options(causal, output_scale, coefficients));
  return {empty_output(q, v), empty_den(q)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients, bool normalize,
    const std::optional<at::Tensor>& temperature) {
  check_forward_arguments("taylorshift::efficient_forward", q, k, v,
                          key_padding_mask, std::nullopt,
                          schema_options(false, output_scale, coefficients));
  check_efficient_normalization("taylorshift::efficient_forward", q, normalize,
                                temperature);
  const int order = polynomial_of(coefficients).order;
  check_efficient_order("taylorshift::efficient_forward", order,
                        kMaxEfficientOrder);
  at::Tensor state =
      at::empty_symint({q.sym_size(0), q.sym_size(1),
                        feature_count(q.sym_size(3), order), v.sym_size(3) + 1},
                       q.options().dtype(accumulate_dtype(q)));
  return {empty_output(q, v), empty_den(q), state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_forward_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  check_forward_arguments("taylorshift::causal_efficient_forward", q, k, v,
                          key_padding_mask, std::nullopt,
                          schema_options(true, output_scale, coefficients));
  const int order = polynomial_of(coefficients).order;
  check_efficient_order("taylorshift::causal_efficient_forward", order,
                        kMaxEfficientOrder);
  at::Tensor states =
      at::empty_symint({q.sym_size(0), q.sym_size(1),
                        (q.sym_size(2) + kCausalChunk - 1) / kCausalChunk,
                        feature_count(q.sym_size(3), order), v.sym_size(3) + 1},
                       q.options().dtype(accumulate_dtype(q)));
  return {empty_output(q, v), empty_den(q), states};
}

// Gradients are contiguous, whatever the inputs' strides, on every backend.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_gradients(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  check_backward_arguments("taylorshift::direct_backward", grad_out, q, k, v,
                           out, den, std::nullopt, key_padding_mask, attn_mask,
                           schema_options(causal, output_scale, coefficients));
  return empty_gradients(q, k, v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_step_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& valid_keys,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  check_forward_arguments("taylorshift::causal_efficient_step", q, k, v,
                          key_padding_mask, std::nullopt,
                          schema_options(true, output_scale, coefficients));
  return {empty_output(q, v),
          at::empty_symint(state.sym_sizes(), state.options()),
          at::empty_symint(valid_keys.sym_sizes(), valid_keys.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const at::Tensor& states, const std::optional<at::Tensor>& key_padding_mask,
    bool output_scale, c10::ArrayRef<double> coefficients) {
  check_backward_arguments("taylorshift::causal_efficient_backward", grad_out,
                           q, k, v, out, den, std::nullopt, key_padding_mask,
                           std::nullopt,
                           schema_options(true, output_scale, coefficients));
  return empty_gradients(q, k, v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
efficient_backward_meta(const at::Tensor& grad_out, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& den,
                        const at::Tensor& state,
                        const std::optional<at::Tensor>& key_padding_mask,
                        bool output_scale, c10::ArrayRef<double> coefficients,
                        bool normalize,
                        const std::optional<at::Tensor>& temperature) {
  check_backward_arguments("taylorshift::efficient_backward", grad_out, q, k, v,
                           out, den, state, key_padding_mask, std::nullopt,
                           schema_options(false, output_scale, coefficients));
  check_efficient_normalization("taylorshift::efficient_backward", q, normalize,
                                temperature);
  check_efficient_order("taylorshift::efficient_backward",
                        polynomial_of(coefficients).order, kMaxEfficientOrder);
  auto [grad_q, grad_k, grad_v] = empty_gradients(q, k, v);
  return {grad_q, grad_k, grad_v, empty_temperature_gradient(q, temperature)};
}

// y and grad_x are contiguous on every backend; grad_factor is (H,) in
// factor's dtype (the accumulation dtype without a factor: the gradient for
// factor_h = 1).
at::Tensor normalize_rows_meta(const at::Tensor& x,
                               const std::optional<at::Tensor>& factor) {
  check_normalize_arguments("taylorshift::normalize_rows", x, factor);
  return at::empty_symint(x.sym_sizes(), x.options());
}

std::tuple<at::Tensor, at::Tensor> normalize_rows_backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& factor) {
  check_normalize_backward_arguments("taylorshift::normalize_rows_backward",
                                     grad_y, x, factor);
  return {at::empty_symint(x.sym_sizes(), x.options()),
          at::empty_symint({x.sym_size(1)},
                           x.options().dtype(factor_grad_dtype(factor, x)))};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, Meta, m) {
  m.impl("direct_forward", TORCH_FN(direct_forward_meta));
  m.impl("direct_backward", TORCH_FN(direct_backward_meta));
  m.impl("efficient_forward", TORCH_FN(efficient_forward_meta));
  m.impl("efficient_backward", TORCH_FN(efficient_backward_meta));
  m.impl("causal_efficient_forward", TORCH_FN(causal_efficient_forward_meta));
  m.impl("causal_efficient_backward", TORCH_FN(causal_efficient_backward_meta));
  m.impl("causal_efficient_step", TORCH_FN(causal_efficient_step_meta));
  m.impl("normalize_rows", TORCH_FN(normalize_rows_meta));
  m.impl("normalize_rows_backward", TORCH_FN(normalize_rows_backward_meta));
}

// The C++ API: options unpacked into the schemas' flat argument lists.
std::tuple<at::Tensor, at::Tensor> direct_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, const KernelOptions& options) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("taylorshift::direct_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool, bool,
                           c10::ArrayRef<double>)>();
  return op.call(q, k, v, key_padding_mask, attn_mask, options.causal,
                 options.output_scale, coefficient_list(options.coefficients));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, const KernelOptions& options) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taylorshift::direct_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, bool, bool,
              c10::ArrayRef<double>)>();
  return op.call(grad_out, q, k, v, out, den, key_padding_mask, attn_mask,
                 options.causal, options.output_scale,
                 coefficient_list(options.coefficients));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options, bool normalize,
    const std::optional<at::Tensor>& temperature) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !options.causal, "taylorshift: efficient_forward has no causal form");
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taylorshift::efficient_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, bool, c10::ArrayRef<double>,
              bool, const std::optional<at::Tensor>&)>();
  return op.call(q, k, v, key_padding_mask, options.output_scale,
                 coefficient_list(options.coefficients), normalize,
                 temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> efficient_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const at::Tensor& state, const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options, bool normalize,
    const std::optional<at::Tensor>& temperature) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !options.causal, "taylorshift: efficient_backward has no causal form");
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taylorshift::efficient_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, bool,
              c10::ArrayRef<double>, bool, const std::optional<at::Tensor>&)>();
  return op.call(grad_out, q, k, v, out, den, state, key_padding_mask,
                 options.output_scale, coefficient_list(options.coefficients),
                 normalize, temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taylorshift::causal_efficient_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, bool, c10::ArrayRef<double>)>();
  return op.call(q, k, v, key_padding_mask, options.output_scale,
                 coefficient_list(options.coefficients));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const at::Tensor& states, const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taylorshift::causal_efficient_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const std::optional<at::Tensor>&, bool,
              c10::ArrayRef<double>)>();
  return op.call(grad_out, q, k, v, out, den, states, key_padding_mask,
                 options.output_scale, coefficient_list(options.coefficients));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_step(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& valid_keys,
    const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taylorshift::causal_efficient_step", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, bool, c10::ArrayRef<double>)>();
  return op.call(q, k, v, state, valid_keys, key_padding_mask,
                 options.output_scale, coefficient_list(options.coefficients));
}

}  // namespace taylorshift
