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
#include <vector>

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

// The weights w = f(x) must be positive wherever the logits can be: a
// denominator sum_j f(x_ij) that can reach 0 or turn negative has no
// meaning. The rule (README, "Taylor order"):
//  - even orders: f > 0 on all of R, i.e. a positive leading coefficient and
//    a positive minimum (for order 2: a > 0 and c > b^2 / (4a)); the Taylor
//    polynomials of exp of even order are;
//  - odd orders tend to -inf on one side, so they are valid only on bounded
//    logits: normalize=True, where |x| <= |tau_h|, and f >= 0 on
//    [-max |tau|, max |tau|] (> 0 inside). The algorithm operators do not
//    see the range; `attention` checks it (check_logit_range).
// Both are checked on the coefficients rounded to the dtype the kernels
// compute in, with f evaluated in it, because a minimum that is positive
// only in double (c = 0.5 + 1e-9 with a = 0.5, b = 1) is zero in float32,
// and every key at the minimising logit then gets weight 0, as if masked.
// Non-finite coefficients (or ones that overflow the dtype, a = 1e300 in
// float32) make every weight inf or NaN.
template <typename T>
bool representable(double x) {
  return std::isfinite(x) &&
         std::abs(x) <= double(std::numeric_limits<T>::max());
}

// "(a, b, c)" for order 2, the paper's names; "(c_k, ..., c_0)" otherwise.
inline std::string coefficient_names(int order) {
  return order == 2 ? "(a, b, c)"
                    : "(c_" + std::to_string(order) + ", ..., c_0)";
}

inline std::string coefficient_values(const Coefficients& f) {
  std::ostringstream out;
  out << "(";
  for (int n = 0; n <= f.order; ++n) out << (n ? ", " : "") << f.coefficient[n];
  out << ")";
  return out.str();
}

// The real roots in (lo, hi) of the polynomial p (highest degree first, a
// non-zero leading coefficient), ascending. Between two consecutive real
// roots of p' (found the same way), p is monotone and has at most one root:
// bisection finds it. Enough for the degrees <= kMaxOrder checked here.
inline std::vector<double> real_roots(const std::vector<double>& p, double lo,
                                      double hi) {
  const int degree = int(p.size()) - 1;
  if (degree < 1) return {};
  auto value = [&](double x) {
    double y = 0;
    for (const double c : p) y = y * x + c;
    return y;
  };
  std::vector<double> derivative(degree);
  for (int i = 0; i < degree; ++i) derivative[i] = (degree - i) * p[i];
  std::vector<double> points = {lo};
  for (const double x : real_roots(derivative, lo, hi)) points.push_back(x);
  points.push_back(hi);
  std::vector<double> roots;
  for (size_t i = 0; i + 1 < points.size(); ++i) {
    double u = points[i], w = points[i + 1];
    if (i > 0 && value(u) == 0) roots.push_back(u);
    if ((value(u) < 0) == (value(w) < 0) || value(u) == 0 || value(w) == 0)
      continue;
    const bool rising = value(u) < 0;
    for (int step = 0; step < 200; ++step) {
      const double mid = 0.5 * (u + w);
      if (mid <= u || mid >= w) break;
      if (value(mid) == 0) {  // an exact root: keep it exact
        u = w = mid;
        break;
      }
      ((value(mid) < 0) == rising ? u : w) = mid;
    }
    roots.push_back(0.5 * (u + w));
  }
  return roots;
}

// The critical points of f (the real roots of f') in (lo, hi), with f's
// leading zeros dropped.
inline std::vector<double> critical_points(const Coefficients& f, double lo,
                                           double hi) {
  std::vector<double> p(f.coefficient, f.coefficient + f.order + 1);
  while (p.size() > 1 && p.front() == 0) p.erase(p.begin());
  const int degree = int(p.size()) - 1;
  std::vector<double> derivative(std::max(degree, 0));
  for (int i = 0; i < degree; ++i) derivative[i] = (degree - i) * p[i];
  return real_roots(derivative, lo, hi);
}

// Cauchy's bound: every root of f' (and of f) has |x| < 1 + max_n |c_n / c_k|.
inline double root_bound(const Coefficients& f) {
  double largest = 0;
  for (int n = 1; n <= f.order; ++n)
    largest = std::max(largest, std::abs(f.coefficient[n] / f.coefficient[0]));
  return 1 + largest;
}

template <typename T>
void check_coefficients_in(const Coefficients& f) {
  const std::string dtype = dtype_string(c10::CppTypeToScalarType<T>::value);
  const std::string names = coefficient_names(f.order);
  bool finite = true;
  for (int n = 0; n <= f.order; ++n)
    finite = finite && representable<T>(f.coefficient[n]);
  TORCH_CHECK_VALUE(
      finite, "taylorshift: coefficients ", names, " must be finite in ", dtype,
      ", the dtype the kernels compute in; got ", coefficient_values(f));
  if (f.order % 2 == 1) return;  // bounded logits only: check_logit_range
  const Polynomial<T> f_t = f.template cast<T>();
  TORCH_CHECK_VALUE(f_t.coefficient[0] > 0, "taylorshift: coefficients ", names,
                    f.order == 2 ? " need a > 0, got a = "
                                 : " of an even order need a positive leading "
                                   "coefficient c_k > 0, got c_k = ",
                    f.coefficient[0]);
  // f > 0 on R iff f > 0 at its minimum, a critical point.
  const double bound = root_bound(f);
  bool positive = true;
  for (const double x : critical_points(f, -bound, bound))
    positive = positive && taylor_weight(T(x), f_t) > 0;
  TORCH_CHECK_VALUE(
      positive, "taylorshift: coefficients ", names,
      f.order == 2 ? " need c > b^2 / (4a) so that the weights a x^2 + b x + c "
                     "are positive for every x"
                   : " give weights f(x) that are not positive for every x, "
                     "as an even order's must be",
      " (checked in ", dtype, ", the dtype the kernels compute in); got ",
      coefficient_values(f));
}

inline void check_coefficients(const Coefficients& f, at::ScalarType input) {
  if (accumulate_dtype(input) == at::kDouble)
    check_coefficients_in<double>(f);
  else
    check_coefficients_in<float>(f);
}

// The range rule of an odd order (attention only, where the range is known):
// with normalize=True the logits lie in [-radius, radius], radius = max_h
// |tau_h| (1 without a temperature), and f must be >= 0 at its ends and > 0
// at every critical point inside (so f > 0 inside); with normalize=False
// they are unbounded and an odd order is rejected.
template <typename T>
void check_logit_range_in(const Coefficients& f, bool normalize,
                          double radius) {
  const std::string dtype = dtype_string(c10::CppTypeToScalarType<T>::value);
  TORCH_CHECK_VALUE(
      normalize, "taylorshift: order ", f.order,
      " is odd: its weights f(x) turn negative for large |x|, and with "
      "normalize=False the logits are unbounded; use normalize=True (logits "
      "in [-|temperature|, |temperature|]) or an even order");
  const Polynomial<T> f_t = f.template cast<T>();
  bool positive =
      taylor_weight(T(radius), f_t) >= 0 && taylor_weight(T(-radius), f_t) >= 0;
  for (const double x : critical_points(f, -radius, radius))
    positive = positive && taylor_weight(T(x), f_t) > 0;
  TORCH_CHECK_VALUE(
      positive, "taylorshift: the weights of order ", f.order,
      " (odd) must be positive on the logits' range [-", radius, ", ", radius,
      "] (max |temperature| with normalize=True; checked in ", dtype,
      ", the dtype the kernels compute in), but f(x) with coefficients ",
      coefficient_names(f.order), " = ", coefficient_values(f),
      " is not; lower the temperature or use an even order");
}

inline void check_logit_range(const Coefficients& f, at::ScalarType input,
                              bool normalize, double radius) {
  if (f.order % 2 == 0) return;
  if (accumulate_dtype(input) == at::kDouble)
    check_logit_range_in<double>(f, normalize, radius);
  else
    check_logit_range_in<float>(f, normalize, radius);
}

// The efficient algorithm's symmetric features exist for orders 1 to
// kMaxEfficientOrder on the CPU and to kMaxEfficientOrderCuda on CUDA
// (F = C(d + k, k) features: order 4 would be 58905 at d = 32); direct mode
// takes any order up to kMaxOrder.
constexpr int kMaxEfficientOrder = 3;
constexpr int kMaxEfficientOrderCuda = 2;

inline void check_efficient_order(const char* op, int order, int limit) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      order <= limit, op, ": the efficient algorithm supports orders 1 to ",
      limit, " on this device (symmetric features of degree <= k), got order ",
      order, "; use mode=\"direct\" (any order up to ", kMaxOrder, ")");
}

// `t` has the given sizes, dtype and q's device.
// The causal efficient operators (cpu/causal.cpp, cuda/causal.cu): query i
// and key i are the same token, and the order is one of the device's
// efficient kernels (up to max_order).
inline void check_causal_arguments(const char* op, const at::Tensor& q,
                                   const at::Tensor& k,
                                   const KernelOptions& options,
                                   int max_order) {
  TORCH_CHECK_VALUE(q.size(2) == k.size(2), op,
                    ": q and k must hold the same tokens (M = N), got ",
                    q.size(2), " and ", k.size(2));
  check_efficient_order(op, options.coefficients.order, max_order);
}

// Their backward's states: the forward's, (B, H, chunks, F, e + 1), the
// state before each chunk of kCausalChunk tokens.
inline void check_causal_states(const char* op, const at::Tensor& states,
                                const at::Tensor& q, const at::Tensor& v,
                                int order) {
  TORCH_CHECK_VALUE(
      states.dim() == 5 && states.size(0) == q.size(0) &&
          states.size(1) == q.size(1) &&
          states.size(2) == (q.size(2) + kCausalChunk - 1) / kCausalChunk &&
          states.size(3) == feature_count(q.size(3), order) &&
          states.size(4) == v.size(3) + 1,
      op, ": states must be the forward's, (B, H, chunks, F, e + 1), got ",
      shape_string(states));
}

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
    check_operand(op, "state", *state,
                  {B, H, feature_count(d, options.coefficients.order), e + 1},
                  acc, q);
}

// A per-head factor `name` of x (B, H, L, d): (H,), floating, on x's
// device (its dtype may differ: it is read in the accumulation dtype, and
// its gradient is returned in its own dtype).
inline void check_head_factor(const char* op, const char* name,
                              const at::Tensor& factor, const at::Tensor& x,
                              const char* x_name) {
  TORCH_CHECK_VALUE(
      (factor.dim() == 1 ? factor.sym_size(0).sym_eq(x.sym_size(1))
                         : c10::SymBool(false))
          .expect_true(__FILE__, __LINE__),
      op, ": ", name, " must have shape (H,) = (", x.sym_size(1), ",), got ",
      shape_string(factor));
  TORCH_CHECK_TYPE(at::isFloatingType(factor.scalar_type()), op, ": ", name,
                   " must be floating, got ",
                   dtype_string(factor.scalar_type()));
  TORCH_CHECK_VALUE(factor.device() == x.device(), op, ": ", name, " is on ",
                    factor.device(), " but ", x_name, " is on ", x.device());
}

// normalize_rows: x (B, H, L, d) of a floating dtype; factor, if given, a
// per-head factor (check_head_factor).
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
  if (factor) check_head_factor(op, "factor", *factor, x, "x");
}

// normalize_rows_backward: the forward's arguments and grad_y shaped as x.
inline void check_normalize_backward_arguments(
    const char* op, const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& factor) {
  check_normalize_arguments(op, x, factor);
  check_operand(op, "grad_y", grad_y, x.sym_sizes(), x.scalar_type(), x);
}

// The efficient operators' normalize and temperature: a per-head factor of
// q (check_head_factor), and only with normalize (without it, the caller
// scales q itself).
inline void check_efficient_normalization(
    const char* op, const at::Tensor& q, bool normalize,
    const std::optional<at::Tensor>& temperature) {
  if (!temperature) return;
  TORCH_CHECK_VALUE(normalize, op,
                    ": temperature applies only with normalize=True (without "
                    "it, scale q by the temperature before the call)");
  check_head_factor(op, "temperature", *temperature, q, "q");
}

// efficient_backward's grad_temperature before it is computed: (H,) in
// temperature's dtype, or (0,) without a temperature.
inline at::Tensor empty_temperature_gradient(
    const at::Tensor& q, const std::optional<at::Tensor>& temperature) {
  if (!temperature)
    return at::empty_symint({0}, q.options().dtype(accumulate_dtype(q)));
  return at::empty_symint(temperature->sym_sizes(), temperature->options());
}

}  // namespace taylorshift
