// taylorshift::normalize_rows on the CPU: the cosine-logit factors
// y = f_h x / |x| of every row x (length d) of a (B, H, L, d) tensor, and
// their backward, one pass over each row in a d-long buffer of the
// accumulation dtype, so that no (B, H, L, d) temporary exists besides the
// result (the ATen chain it replaces kept five of them for autograd).
//
// Forward, per row (docs: the comment of normalize_rows in csrc/ops.cpp):
//   s = max_l |x_l|             (1 for a zero row)
//   z = x / s                   max |z_l| = 1, so |z| lies in [1, sqrt(d)]
//   n = max(|z|, 1)             = |z|; 1 for a zero row, whose y is then 0
//   y = (f / n) z               = f x / |x|, rounded to x's dtype once
// |x|^2 itself would overflow for |x| above ~1e19 in float32 (256 in
// float16), and 1 / s overflows for subnormal s, so z is formed by division.
//
// Backward: with u = z / n = x / |x| and y = f u,
//   dy / dx = (f / |x|) (I - u u^T),   dy / df = u
// so dx = (f / n) (g - u (u . g)) / s and df = sum over rows of u . g. At a
// zero row n = 1 and u = 0, which gives dx = f g: the identity gradient of the
// composite it replaces (amax, divide, clamped norm, divide).
//
// Rows are read through x's strides (the module passes (B, L, H, d) memory
// viewed as (B, H, L, d)); y and dx are contiguous (B, H, L, d). Rows are
// split over threads with at::parallel_for; the per-row loops use at::vec.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernel_checks.h"

namespace taylorshift::cpu {
namespace {

// Visits the rows [begin, end) of a (B, H, L, d) tensor in (b, h, l) order:
// visit(row, b, h, l), row = (b H + h) L + l.
template <typename F>
void for_rows(int64_t begin, int64_t end, int64_t heads, int64_t length,
              F&& visit) {
  int64_t bh = begin / length, l = begin % length;
  for (int64_t row = begin; row < end; ++row) {
    visit(row, bh / heads, bh % heads, l);
    if (++l == length) l = 0, ++bh;
  }
}

// Where row (b, h, l) of a (B, H, L, d) tensor starts, and the step between
// its elements.
template <typename T>
struct StridedRows {
  const T* data;
  int64_t stride_b, stride_h, stride_l, step;

  explicit StridedRows(const at::Tensor& t)
      : data(t.const_data_ptr<T>()),
        stride_b(t.stride(0)),
        stride_h(t.stride(1)),
        stride_l(t.stride(2)),
        step(t.stride(3)) {}

  const T* row(int64_t b, int64_t h, int64_t l) const {
    return data + b * stride_b + h * stride_h + l * stride_l;
  }
};

// The row of d elements at `src` (element step `step`) in the accumulation
// dtype A.
template <typename T, typename A>
void load_row(const T* src, int64_t step, int64_t d, A* row) {
  if (step == 1) {
    for (int64_t l = 0; l < d; ++l) row[l] = static_cast<A>(src[l]);
  } else {
    for (int64_t l = 0; l < d; ++l) row[l] = static_cast<A>(src[l * step]);
  }
}

template <typename A>
A abs_max(const A* row, int64_t d) {
  using Vec = at::vec::Vectorized<A>;
  int64_t l = 0;
  A result = 0;
  if (d >= Vec::size()) {
    Vec m(A(0));
    for (; l + Vec::size() <= d; l += Vec::size())
      m = at::vec::maximum(m, Vec::loadu(row + l).abs());
    result = at::vec::vec_reduce_all<A>(
        [](Vec a, Vec b) { return at::vec::maximum(a, b); }, m);
  }
  for (; l < d; ++l) result = std::max(result, std::abs(row[l]));
  return result;
}

// row /= s in place; returns n = max(|row|, 1) after the division.
template <typename A>
A divide_and_norm(A* row, A s, int64_t d) {
  using Vec = at::vec::Vectorized<A>;
  int64_t l = 0;
  A squares = 0;
  if (d >= Vec::size()) {
    Vec sum(A(0));
    const Vec s_vec(s);
    for (; l + Vec::size() <= d; l += Vec::size()) {
      const Vec z = Vec::loadu(row + l) / s_vec;
      z.store(row + l);
      sum = at::vec::fmadd(z, z, sum);
    }
    squares =
        at::vec::vec_reduce_all<A>([](Vec a, Vec b) { return a + b; }, sum);
  }
  for (; l < d; ++l) {
    row[l] /= s;
    squares += row[l] * row[l];
  }
  return std::max(std::sqrt(squares), A(1));
}

// The scale s of a row: its largest magnitude, 1 for a zero row.
template <typename A>
A row_scale(const A* row, int64_t d) {
  const A s = abs_max(row, d);
  return s == A(0) ? A(1) : s;
}

at::Tensor normalize_rows_cpu(const at::Tensor& x,
                              const std::optional<at::Tensor>& factor) {
  check_normalize_arguments("taylorshift::normalize_rows", x, factor);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  const at::Tensor f = normalize_factors(factor, x);
  const int64_t H = x.size(1), L = x.size(2), d = x.size(3),
                rows = x.numel() / d;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_rows_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        const StridedRows<scalar_t> x_rows(x);
        scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
        const A* f_data = f.const_data_ptr<A>();
        at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
          std::vector<A> row(d);
          for_rows(
              begin, end, H, L,
              [&](int64_t index, int64_t b, int64_t h, int64_t token) {
                load_row(x_rows.row(b, h, token), x_rows.step, d, row.data());
                const A n =
                    divide_and_norm(row.data(), row_scale(row.data(), d), d);
                const A r = f_data[h] / n;
                scalar_t* out = y_data + index * d;
                for (int64_t l = 0; l < d; ++l)
                  out[l] = static_cast<scalar_t>(row[l] * r);
              });
        });
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor> normalize_rows_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& factor) {
  check_normalize_backward_arguments("taylorshift::normalize_rows_backward",
                                     grad_y, x, factor);
  const auto acc = x.options().dtype(accumulate_dtype(x));
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  // u . g of every row; summed over (b, l) per head into df after the
  // parallel loop, so that the sum does not depend on the thread count.
  at::Tensor dots = at::zeros({x.size(0), x.size(1), x.size(2)}, acc);
  if (x.numel() > 0) {
    const at::Tensor f = normalize_factors(factor, x);
    const int64_t H = x.size(1), L = x.size(2), d = x.size(3),
                  rows = x.numel() / d;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(),
        "normalize_rows_backward_cpu", [&] {
          using A = at::opmath_type<scalar_t>;
          using Vec = at::vec::Vectorized<A>;
          const StridedRows<scalar_t> x_rows(x), g_rows(grad_y);
          scalar_t* dx_data = grad_x.mutable_data_ptr<scalar_t>();
          A* dot_data = dots.mutable_data_ptr<A>();
          const A* f_data = f.const_data_ptr<A>();
          at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
            std::vector<A> u(d), g(d);
            for_rows(
                begin, end, H, L,
                [&](int64_t index, int64_t b, int64_t h, int64_t token) {
                  load_row(x_rows.row(b, h, token), x_rows.step, d, u.data());
                  load_row(g_rows.row(b, h, token), g_rows.step, d, g.data());
                  const A s = row_scale(u.data(), d);
                  const A n = divide_and_norm(u.data(), s, d);
                  // u = z / n, and dot = u . g.
                  int64_t l = 0;
                  A dot = 0;
                  const Vec n_vec(n);
                  if (d >= Vec::size()) {
                    Vec sum(A(0));
                    for (; l + Vec::size() <= d; l += Vec::size()) {
                      const Vec u_l = Vec::loadu(u.data() + l) / n_vec;
                      u_l.store(u.data() + l);
                      sum = at::vec::fmadd(u_l, Vec::loadu(g.data() + l), sum);
                    }
                    dot = at::vec::vec_reduce_all<A>(
                        [](Vec a, Vec b) { return a + b; }, sum);
                  }
                  for (; l < d; ++l) {
                    u[l] /= n;
                    dot += u[l] * g[l];
                  }
                  dot_data[index] = dot;
                  const A r = f_data[h] / n;
                  scalar_t* out = dx_data + index * d;
                  for (l = 0; l < d; ++l)
                    out[l] = static_cast<scalar_t>((g[l] - u[l] * dot) * r / s);
                });
          });
        });
  }
  return {grad_x, dots.sum({0, 2}).to(factor_grad_dtype(factor, x))};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CPU, m) {
  m.impl("normalize_rows", TORCH_FN(normalize_rows_cpu));
  m.impl("normalize_rows_backward", TORCH_FN(normalize_rows_backward_cpu));
}

}  // namespace taylorshift::cpu
