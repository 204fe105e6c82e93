// taylorshift::normalize_rows on the CPU: the cosine-logit factors
// y = f_h x / |x| of every row x (length d) of a (B, H, L, d) tensor, and
// their backward, one pass over each row in a d-long buffer of the
// accumulation dtype, so that no (B, H, L, d) temporary exists besides the
// result (the ATen chain it replaces kept five of them for autograd).
//
// Forward, per row (docs: the comment of normalize_rows in csrc/ops.cpp):
//   s = 2^(k-1) for max_l |x_l| in [2^(k-1), 2^k)     (1 for a zero row)
//   z = x / s        exact (a power-of-two scaling only moves exponents);
//                    max |z_l| lies in [1, 2), so |z|^2 in [1, 4d] can
//                    neither overflow nor underflow
//   n = max(|z|, 1)  = |z|; 1 for a zero row, whose y is then 0
//   y = z (f / n)    = f x / |x|, rounded to x's dtype once
// |x|^2 itself overflows for |x| above ~1e19 in float32 (256 in float16),
// and a clamp like 1e-12 underflows in float16. 1 / s is a power of two too,
// so z = x (1 / s) is the same exact value wherever 1 / s is finite; below
// s = 2^-127 (float32) it is not, and z is formed by division.
//
// Backward: with u = z / n = x / |x| and y = f u,
//   dy / dx = (f / |x|) (I - u u^T),   dy / df = u
// so dx = (f / n) (g - u (u . g)) / s and df = sum over rows of u . g. At a
// zero row n = 1 and u = 0, which gives dx = f g: the identity gradient of the
// composite it replaced (amax, divide, clamped norm, divide).
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

// Work is split into tasks of up to kRowsPerTask consecutive rows of one
// (b, h): a task's rows share the factor f_h, and the backward sums their
// u . g into one partial sum of df_h, so no per-row buffer is needed and the
// sum's order does not depend on the thread count.
constexpr int64_t kRowsPerTask = 512;

struct RowTasks {
  int64_t heads, length, per_head;

  explicit RowTasks(const at::Tensor& x)
      : heads(x.size(1)),
        length(x.size(2)),
        per_head((x.size(2) + kRowsPerTask - 1) / kRowsPerTask) {}

  int64_t count(int64_t batch) const { return batch * heads * per_head; }

  // Task -> (b, h) and its rows [first, last).
  void unpack(int64_t task, int64_t& b, int64_t& h, int64_t& first,
              int64_t& last) const {
    const int64_t bh = task / per_head;
    b = bh / heads;
    h = bh % heads;
    first = (task % per_head) * kRowsPerTask;
    last = std::min(first + kRowsPerTask, length);
  }
};

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
using Vec = at::vec::Vectorized<A>;

// row /= s in place for a power of two s (exact either way, see above).
template <typename A>
void divide_by_power_of_two(A* row, A s, int64_t d) {
  const A inverse = A(1) / s;
  if (std::isfinite(inverse)) {
    at::vec::map([inverse](Vec<A> x) { return x * Vec<A>(inverse); }, row, row,
                 d);
  } else {
    at::vec::map([s](Vec<A> x) { return x / Vec<A>(s); }, row, row, d);
  }
}

// Scales the row to z = x / s in place and returns s (see above).
template <typename A>
A scale_to_unit_range(A* row, int64_t d) {
  const A largest = at::vec::map_reduce_all(
      [](Vec<A> x) { return x.abs(); },
      [](Vec<A> a, Vec<A> b) { return at::vec::maximum(a, b); }, row, d);
  if (!(largest > A(0) && std::isfinite(largest))) return A(1);
  int k;
  std::frexp(largest, &k);
  const A s = std::ldexp(A(1), k - 1);
  divide_by_power_of_two(row, s, d);
  return s;
}

// n = max(|z|, 1).
template <typename A>
A clamped_norm(const A* z, int64_t d) {
  const A squares =
      at::vec::map_reduce_all([](Vec<A> x) { return x * x; },
                              [](Vec<A> a, Vec<A> b) { return a + b; }, z, d);
  return std::max(std::sqrt(squares), A(1));
}

at::Tensor normalize_rows_cpu(const at::Tensor& x,
                              const std::optional<at::Tensor>& factor) {
  check_normalize_arguments("taylorshift::normalize_rows", x, factor);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  const at::Tensor f = normalize_factors(factor, x);
  const int64_t d = x.size(3);
  const RowTasks tasks(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_rows_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        const StridedRows<scalar_t> x_rows(x);
        const A* f_data = f.const_data_ptr<A>();
        at::parallel_for(
            0, tasks.count(x.size(0)), 1, [&](int64_t begin, int64_t end) {
              std::vector<A> row(d);
              for (int64_t task = begin; task < end; ++task) {
                int64_t b, h, first, last;
                tasks.unpack(task, b, h, first, last);
                scalar_t* out =
                    y.mutable_data_ptr<scalar_t>() +
                    ((b * tasks.heads + h) * tasks.length + first) * d;
                for (int64_t l = first; l < last; ++l, out += d) {
                  load_row(x_rows.row(b, h, l), x_rows.step, d, row.data());
                  scale_to_unit_range(row.data(), d);
                  const A r = f_data[h] / clamped_norm(row.data(), d);
                  for (int64_t c = 0; c < d; ++c)
                    out[c] = static_cast<scalar_t>(row[c] * r);
                }
              }
            });
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor> normalize_rows_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& factor) {
  check_normalize_backward_arguments("taylorshift::normalize_rows_backward",
                                     grad_y, x, factor);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const RowTasks tasks(x);
  // Per task: the sum of u . g over its rows, in double.
  std::vector<double> partial(tasks.count(x.size(0)), 0.0);
  if (x.numel() > 0) {
    const at::Tensor f = normalize_factors(factor, x);
    const int64_t d = x.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(),
        "normalize_rows_backward_cpu", [&] {
          using A = at::opmath_type<scalar_t>;
          const StridedRows<scalar_t> x_rows(x), g_rows(grad_y);
          const A* f_data = f.const_data_ptr<A>();
          at::parallel_for(
              0, int64_t(partial.size()), 1, [&](int64_t begin, int64_t end) {
                std::vector<A> u(d), g(d);
                for (int64_t task = begin; task < end; ++task) {
                  int64_t b, h, first, last;
                  tasks.unpack(task, b, h, first, last);
                  scalar_t* out =
                      grad_x.mutable_data_ptr<scalar_t>() +
                      ((b * tasks.heads + h) * tasks.length + first) * d;
                  double task_sum = 0;
                  for (int64_t l = first; l < last; ++l, out += d) {
                    load_row(x_rows.row(b, h, l), x_rows.step, d, u.data());
                    load_row(g_rows.row(b, h, l), g_rows.step, d, g.data());
                    const A s = scale_to_unit_range(u.data(), d);
                    const A n = clamped_norm(u.data(), d);
                    // u = z / n (times 1 / n: n is in [1, 2 sqrt(d)]), and
                    // dot = u . g.
                    const A inverse_n = A(1) / n;
                    at::vec::map(
                        [inverse_n](Vec<A> z) { return z * Vec<A>(inverse_n); },
                        u.data(), u.data(), d);
                    const A dot = at::vec::map2_reduce_all(
                        [](Vec<A> p, Vec<A> q) { return p * q; },
                        [](Vec<A> p, Vec<A> q) { return p + q; }, u.data(),
                        g.data(), d);
                    task_sum += dot;
                    // dx = (f / n) (g - u dot) / s, formed in u.
                    const A r = f_data[h] / n;
                    at::vec::map2(
                        [dot, r](Vec<A> u_c, Vec<A> g_c) {
                          return (g_c - u_c * Vec<A>(dot)) * Vec<A>(r);
                        },
                        u.data(), u.data(), g.data(), d);
                    divide_by_power_of_two(u.data(), s, d);
                    for (int64_t c = 0; c < d; ++c)
                      out[c] = static_cast<scalar_t>(u[c]);
                  }
                  partial[task] = task_sum;
                }
              });
        });
  }
  // df_h: the partial sums of head h, in task order.
  const int64_t H = x.size(1);
  at::Tensor grad_factor = at::zeros({H}, x.options().dtype(at::kDouble));
  double* df = grad_factor.mutable_data_ptr<double>();
  for (int64_t task = 0; task < int64_t(partial.size()); ++task)
    df[(task / tasks.per_head) % H] += partial[task];
  return {grad_x, grad_factor.to(factor_grad_dtype(factor, x))};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CPU, m) {
  m.impl("normalize_rows", TORCH_FN(normalize_rows_cpu));
  m.impl("normalize_rows_backward", TORCH_FN(normalize_rows_backward_cpu));
}

}  // namespace taylorshift::cpu
