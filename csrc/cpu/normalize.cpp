// taylorshift::normalize_rows on the CPU: the cosine-logit factors
// y = f_h x / |x| of every row x (length d) of a (B, H, L, d) tensor, and
// their backward (the row functions and their derivation: normalize_rows.h),
// one pass over each row in a d-long buffer of the accumulation dtype, so
// that no (B, H, L, d) temporary exists besides the result (the ATen chain
// it replaces kept five of them for autograd).
//
// Rows are read through x's strides (the module passes (B, L, H, d) memory
// viewed as (B, H, L, d)); y and dx are contiguous (B, H, L, d). Rows are
// split over threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../kernel_checks.h"
#include "common.h"
#include "normalize_rows.h"

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

// Rows [first, last) of head (b, h): y = f x / |x|, written contiguously
// from `out`.
template <typename T, typename A, typename Dim>
TS_VECTOR_CLONES void normalize_task(const StridedRows<T>& x, int64_t b,
                                     int64_t h, int64_t first, int64_t last,
                                     Dim d, A factor, A* row, T* out) {
  for (int64_t l = first; l < last; ++l, out += d)
    normalize_row(x.row(b, h, l), x.step, d, factor, row, out);
}

// The backward of normalize_task for the gradient rows g: dx written
// contiguously from `out`; returns the sum of u . g over the rows (df's
// share of these rows).
template <typename T, typename A, typename Dim>
TS_VECTOR_CLONES double normalize_backward_task(
    const StridedRows<T>& x, const StridedRows<T>& grad, int64_t b, int64_t h,
    int64_t first, int64_t last, Dim d, A factor, A* u, A* g, T* out) {
  double sum = 0;
  for (int64_t l = first; l < last; ++l, out += d) {
    load_row(grad.row(b, h, l), grad.step, d, g);
    sum += normalize_row_backward(x.row(b, h, l), x.step, g, d, factor, u, out);
  }
  return sum;
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
                with_row_length(d, [&](auto length) {
                  normalize_task(x_rows, b, h, first, last, length, f_data[h],
                                 row.data(), out);
                });
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
                  with_row_length(d, [&](auto length) {
                    partial[task] = normalize_backward_task(
                        x_rows, g_rows, b, h, first, last, length, f_data[h],
                        u.data(), g.data(), out);
                  });
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
