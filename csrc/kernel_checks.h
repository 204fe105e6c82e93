// Checks of every argument of the algorithm operators (direct_forward,
// direct_backward, efficient_forward, efficient_backward), called by each of
// their kernels (CPU, CUDA, Meta): the operators are public
// (torch.ops.taylorshift.*), so a wrongly shaped tensor must raise here, not
// be read out of bounds by a kernel. The user-facing operator `attention`
// (attention.cpp) checks its own arguments with messages in its terms and
// shares check_coefficients.
//
// Sizes are compared as SymInts (expect_true: a runtime assertion, never a
// guard), so the Meta kernels keep dynamic shapes symbolic.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

#include "kernel_blocks.h"

// TORCH_CHECK_VALUE for a c10::SymBool condition.
#define TS_SYM_CHECK_VALUE(cond, ...) \
  TORCH_CHECK_VALUE((cond).expect_true(__FILE__, __LINE__), __VA_ARGS__)

namespace taylorshift {

inline std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sym_sizes();
  return out.str();
}

// The dtype as Python spells it ("torch.float32"), so that the messages of
// the compiled operators and of the pure-PyTorch fallback are the same.
inline std::string dtype_string(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// The kernels evaluate f(x) = (a x + b) x + c in the accumulation dtype
// (float32 for float16, bfloat16 and float32 inputs). f is positive for
// every x iff a > 0 and its minimum c - b^2 / (4a) is positive; both are
// checked on the coefficients rounded to that dtype and the minimum is
// computed in it, because a minimum that is positive only in double (c =
// 0.5 + 1e-9 with a = 0.5, b = 1) is zero in float32, and every key at the
// minimising logit then gets weight 0, as if masked. Non-finite coefficients
// (or ones that overflow the dtype, a = 1e300 in float32) make every weight
// inf or NaN.
template <typename T>
bool representable(double x) {
  return std::isfinite(x) &&
         std::abs(x) <= double(std::numeric_limits<T>::max());
}

template <typename T>
void check_coefficients_in(double a, double b, double c) {
  TORCH_CHECK_VALUE(
      representable<T>(a) && representable<T>(b) && representable<T>(c),
      "taylorshift: coefficients (a, b, c) must be finite in ",
      dtype_string(c10::CppTypeToScalarType<T>::value),
      ", the dtype the kernels compute in; got a = ", a, ", b = ", b,
      ", c = ", c);
  const T a_t = T(a), b_t = T(b), c_t = T(c);
  TORCH_CHECK_VALUE(
      a_t > 0, "taylorshift: coefficients (a, b, c) need a > 0, got a = ", a);
  const T minimum = c_t - b_t * b_t / (T(4) * a_t);
  TORCH_CHECK_VALUE(
      minimum > 0,
      "taylorshift: coefficients (a, b, c) need c > b^2 / (4a) so that the "
      "weights a x^2 + b x + c are positive for every x (checked in ",
      dtype_string(c10::CppTypeToScalarType<T>::value),
      ", the dtype the kernels compute in); got a = ", a, ", b = ", b,
      ", c = ", c);
}

inline void check_coefficients(const Coefficients& f, at::ScalarType input) {
  if (accumulate_dtype(input) == at::kDouble)
    check_coefficients_in<double>(f.a, f.b, f.c);
  else
    check_coefficients_in<float>(f.a, f.b, f.c);
}

// `t` has the given sizes, dtype and q's device.
inline void check_operand(const char* op, const char* name, const at::Tensor& t,
                          c10::SymIntArrayRef sizes, at::ScalarType dtype,
                          const at::Tensor& q) {
  bool same = t.dim() == int64_t(sizes.size());
  for (size_t i = 0; same && i < sizes.size(); ++i)
    same =
        t.sym_size(int64_t(i)).sym_eq(sizes[i]).expect_true(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(same, op, ": ", name, " must have shape ", sizes, ", got ",
                    shape_string(t));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ",
                   dtype_string(dtype), ", got ",
                   dtype_string(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ",
                    t.device(), " but q is on ", q.device());
}

// q (B, H, M, d), k (B, H, N, d), v (B, H, N, e) of one floating dtype on
// one device; key_padding_mask (B, N) and attn_mask (B, H, M, N) bool on it.
inline void check_kernel_inputs(
    const char* op, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be 4-d (B, H, tokens, dim), got shapes ",
                    shape_string(q), ", ", shape_string(k), ", ",
                    shape_string(v));
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kFloat || dtype == at::kDouble,
                   op,
                   ": q must be float16, bfloat16, float32 or float64, got ",
                   dtype_string(dtype));
  const c10::SymInt B = q.sym_size(0), H = q.sym_size(1), M = q.sym_size(2),
                    N = k.sym_size(2), d = q.sym_size(3), e = v.sym_size(3);
  check_operand(op, "k", k, {B, H, N, d}, dtype, q);
  check_operand(op, "v", v, {B, H, N, e}, dtype, q);
  if (key_padding_mask)
    check_operand(op, "key_padding_mask", *key_padding_mask, {B, N}, at::kBool,
                  q);
  if (attn_mask)
    check_operand(op, "attn_mask", *attn_mask, {B, H, M, N}, at::kBool, q);
}

inline void check_forward_arguments(
    const char* op, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, const KernelOptions& options) {
  check_kernel_inputs(op, q, k, v, key_padding_mask, attn_mask);
  check_coefficients(options.coefficients, q.scalar_type());
}

// The forward's inputs plus what the backward reads: grad_out and out
// (B, H, M, e) in the input dtype, den (B, H, M) and, for the efficient
// algorithm, state (B, H, F, e + 1) in the accumulation dtype.
inline void check_backward_arguments(
    const char* op, const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& den, const std::optional<at::Tensor>& state,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, const KernelOptions& options) {
  check_forward_arguments(op, q, k, v, key_padding_mask, attn_mask, options);
  const c10::SymInt B = q.sym_size(0), H = q.sym_size(1), M = q.sym_size(2),
                    d = q.sym_size(3), e = v.sym_size(3);
  const auto acc = accumulate_dtype(q);
  check_operand(op, "grad_out", grad_out, {B, H, M, e}, q.scalar_type(), q);
  check_operand(op, "out", out, {B, H, M, e}, q.scalar_type(), q);
  check_operand(op, "den", den, {B, H, M}, acc, q);
  if (state)
    check_operand(op, "state", *state, {B, H, feature_count(d), e + 1}, acc, q);
}

// normalize_rows: x (B, H, L, d) of a floating dtype; factor, if given,
// (H,) floating on x's device (its dtype may differ: it is read in the
// accumulation dtype, and its gradient is returned in its own dtype).
inline void check_normalize_arguments(const char* op, const at::Tensor& x,
                                      const std::optional<at::Tensor>& factor) {
  TORCH_CHECK_VALUE(x.dim() == 4, op,
                    ": x must be 4-d (B, H, L, d), got shape ",
                    shape_string(x));
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kFloat || dtype == at::kDouble,
                   op,
                   ": x must be float16, bfloat16, float32 or float64, got ",
                   dtype_string(dtype));
  if (!factor) return;
  TORCH_CHECK_VALUE(
      (factor->dim() == 1 ? factor->sym_size(0).sym_eq(x.sym_size(1))
                          : c10::SymBool(false))
          .expect_true(__FILE__, __LINE__),
      op, ": factor must have shape (H,) = (", x.sym_size(1), ",), got ",
      shape_string(*factor));
  TORCH_CHECK_TYPE(at::isFloatingType(factor->scalar_type()), op,
                   ": factor must be floating, got ",
                   dtype_string(factor->scalar_type()));
  TORCH_CHECK_VALUE(factor->device() == x.device(), op, ": factor is on ",
                    factor->device(), " but x is on ", x.device());
}

// normalize_rows_backward: the forward's arguments and grad_y shaped as x.
inline void check_normalize_backward_arguments(
    const char* op, const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& factor) {
  check_normalize_arguments(op, x, factor);
  check_operand(op, "grad_y", grad_y, x.sym_sizes(), x.scalar_type(), x);
}

}  // namespace taylorshift
