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
template <typename T, typename A, typename Dim>
TS_INLINE void load_row(const T* src, int64_t step, Dim d, A* row) {
  if (step == 1) {
    for (int64_t l = 0; l < d; ++l) row[l] = static_cast<A>(src[l]);
  } else {
    for (int64_t l = 0; l < d; ++l) row[l] = static_cast<A>(src[l * step]);
  }
}

// fn(d) with d as a compile-time constant for the common head dims, so that
// the per-row loops below unroll completely (no vector-loop prologue and
// remainder per row, reductions as fixed trees: about 3 times faster at
// d = 32); other lengths at run time.
template <typename Fn>
void with_row_length(int64_t d, Fn&& fn) {
  switch (d) {
    case 16:
      return fn(std::integral_constant<int64_t, 16>{});
    case 32:
      return fn(std::integral_constant<int64_t, 32>{});
    case 64:
      return fn(std::integral_constant<int64_t, 64>{});
    case 128:
      return fn(std::integral_constant<int64_t, 128>{});
    default:
      return fn(d);
  }
}

// The per-row steps are plain loops that the compiler vectorises, inlined
// into the two loops over a task's rows below, which are compiled per x86
// level (TS_VECTOR_CLONES). The rows are short (d = 32, 64): per-row calls,
// and at::vec (its scalar default in an extension built without -mavx2),
// cost more than the arithmetic.

// 2^(k-1) for x in [2^(k-1), 2^k), x > 0 and finite: for a normal x, x with
// its mantissa bits cleared; frexp for a subnormal one.
template <typename A>
TS_INLINE A power_of_two_floor(A x) {
  using Bits = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  if (x < std::numeric_limits<A>::min()) {
    int k;
    std::frexp(x, &k);
    return std::ldexp(A(1), k - 1);
  }
  constexpr Bits kExponent =
      sizeof(A) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits bits;
  std::memcpy(&bits, &x, sizeof(A));
  bits &= kExponent;
  std::memcpy(&x, &bits, sizeof(A));
  return x;
}

// Scales the row to z = x / s in place and returns s (see above).
template <typename A, typename Dim>
TS_INLINE A scale_to_unit_range(A* row, Dim d) {
  A largest = 0;
#pragma omp simd reduction(max : largest)
  for (int64_t l = 0; l < d; ++l) largest = std::max(largest, std::abs(row[l]));
  if (!(largest > A(0) && std::isfinite(largest))) return A(1);
  const A s = power_of_two_floor(largest);
  // Exact either way: a power of two only moves exponents. Below s = 2^-127
  // (float32) 1 / s is not finite, and z is formed by division.
  const A inverse = A(1) / s;
  if (std::isfinite(inverse)) {
#pragma omp simd
    for (int64_t l = 0; l < d; ++l) row[l] *= inverse;
  } else {
#pragma omp simd
    for (int64_t l = 0; l < d; ++l) row[l] /= s;
  }
  return s;
}

// n = max(|z|, 1).
template <typename A, typename Dim>
TS_INLINE A clamped_norm(const A* z, Dim d) {
  A squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t l = 0; l < d; ++l) squares += z[l] * z[l];
  return std::max(std::sqrt(squares), A(1));
}

// Rows [first, last) of head (b, h): y = f x / |x|, written contiguously
// from `out`.
template <typename T, typename A, typename Dim>
TS_VECTOR_CLONES void normalize_task(const StridedRows<T>& x, int64_t b,
                                     int64_t h, int64_t first, int64_t last,
                                     Dim d, A factor, A* row, T* out) {
  for (int64_t l = first; l < last; ++l, out += d) {
    load_row(x.row(b, h, l), x.step, d, row);
    scale_to_unit_range(row, d);
    const A r = factor / clamped_norm(row, d);
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) out[c] = static_cast<T>(row[c] * r);
  }
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
    load_row(x.row(b, h, l), x.step, d, u);
    load_row(grad.row(b, h, l), grad.step, d, g);
    const A s = scale_to_unit_range(u, d);
    const A n = clamped_norm(u, d);
    // u = z / n (times 1 / n: n is in [1, 2 sqrt(d)]), and dot = u . g.
    const A inverse_n = A(1) / n;
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < d; ++c) {
      u[c] *= inverse_n;
      dot += u[c] * g[c];
    }
    sum += dot;
    // dx = (f / n) (g - u dot) / s; the division by the power of two s is
    // exact (see scale_to_unit_range).
    const A r = factor / n;
    const A inverse_s = A(1) / s;
    if (std::isfinite(inverse_s)) {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c)
        out[c] = static_cast<T>((g[c] - u[c] * dot) * r * inverse_s);
    } else {
      for (int64_t c = 0; c < d; ++c)
        out[c] = static_cast<T>((g[c] - u[c] * dot) * r / s);
    }
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
