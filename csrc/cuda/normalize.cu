// taylorshift::normalize_rows on CUDA: y = f_h x / |x| for every row x of a
// (B, H, L, d) tensor, and its backward; the math (scaling by s ~ max |x_l|
// so that nothing overflows, the zero-row convention, the gradient) is
// derived in csrc/cpu/normalize.cpp, and the steps and their roundings are
// the same here (s = 2^(k-1) for max |x_l| in [2^(k-1), 2^k), so that z is
// exact; 1 / s where it is finite, a division where it is not):
//   z = x / s,  n = max(|z|, 1),  y = z (f / n)
//   u = z (1 / n),  dx = ((g - u (u . g)) (f / n)) / s,  df = sum_rows u . g
// One warp per row at a time: lane t reads elements t, t + 32, ... through x's
// strides (the passes after the first re-read the row from L1/L2), and the
// row's max, squared norm and dot are warp reductions.
#include <torch/library.h>

#include "../kernel_checks.h"
#include "common.cuh"

namespace taylorshift::cuda_kernels {

namespace {

// Each warp takes kRowsPerWarp consecutive rows, one after the other: still
// thousands of warps for the lengths where the kernel's time matters
// (131072 rows of (1, 8, 16384, d): 8192 warps), and 16 times fewer threads
// for the small test shapes, which the host emulation runs as OS threads.
constexpr int kRowsPerWarp = 16;
constexpr int kRowsPerBlock = kThreads / 32 * kRowsPerWarp;

// The rows [first, last) of this warp.
__device__ __forceinline__ void warp_rows(int64_t rows, int64_t& first,
                                          int64_t& last) {
  first =
      (static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32) *
      kRowsPerWarp;
  last = first + kRowsPerWarp < rows ? first + kRowsPerWarp : rows;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_max(Acc value) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const Acc other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc value) {
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Rows of a (B, H, L, d) tensor read through its strides.
template <typename T>
struct StridedRows {
  const T* data;
  int64_t stride_b, stride_h, stride_l, step;
  int64_t heads, length;

  __device__ __forceinline__ const T* row(int64_t index) const {
    const int64_t bh = index / length, l = index % length;
    return data + (bh / heads) * stride_b + (bh % heads) * stride_h +
           l * stride_l;
  }
  __device__ __forceinline__ int64_t head(int64_t index) const {
    return (index / length) % heads;
  }
};

template <typename T>
StridedRows<T> strided_rows(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.const_data_ptr()),
          t.stride(0),
          t.stride(1),
          t.stride(2),
          t.stride(3),
          t.size(1),
          t.size(2)};
}

// x - x is NaN exactly for infinite and NaN x (a test that reads the same in
// device code and under the host emulation, which have no common isfinite).
template <typename Acc>
__device__ __forceinline__ bool finite(Acc x) {
  return x - x == Acc(0);
}

// The power of two s of a row (1 for a zero row) and 1 / s, or 0 where 1 / s
// is not finite (then z = x / s by division).
template <typename Acc>
struct RowScale {
  Acc s, inverse;

  __device__ __forceinline__ Acc scale(Acc x) const {
    return inverse != Acc(0) ? x * inverse : x / s;
  }
};

// s and n of the row at x, in every lane.
template <typename T, typename Acc>
__device__ __forceinline__ void scale_and_norm(const T* x, int64_t step,
                                               int dim, int lane,
                                               RowScale<Acc>& scale, Acc& n) {
  Acc largest = 0;
  for (int l = lane; l < dim; l += 32) {
    const Acc value = Num<T>::widen(x[l * step]);
    const Acc magnitude = value < 0 ? -value : value;
    largest = magnitude > largest ? magnitude : largest;
  }
  largest = warp_max(largest);
  scale = {Acc(1), Acc(1)};
  if (largest > Acc(0) && finite(largest)) {
    int k;
    frexp(largest, &k);
    scale.s = static_cast<Acc>(ldexp(Acc(1), k - 1));
    const Acc inverse = Acc(1) / scale.s;
    scale.inverse = finite(inverse) ? inverse : Acc(0);
  }
  Acc squares = 0;
  for (int l = lane; l < dim; l += 32) {
    const Acc z = scale.scale(Num<T>::widen(x[l * step]));
    squares += z * z;
  }
  n = sqrt(warp_sum(squares));
  n = n > Acc(1) ? n : Acc(1);
}

template <typename T, typename Acc>
__global__ void normalize_rows_kernel(StridedRows<T> x, const Acc* factor,
                                      int dim, int64_t rows, T* y) {
  const int lane = threadIdx.x % 32;
  int64_t first, last;
  warp_rows(rows, first, last);
  for (int64_t row = first; row < last; ++row) {
    const T* x_row = x.row(row);
    RowScale<Acc> scale;
    Acc n;
    scale_and_norm(x_row, x.step, dim, lane, scale, n);
    const Acc r = factor[x.head(row)] / n;
    for (int l = lane; l < dim; l += 32)
      y[row * dim + l] =
          Num<T>::narrow(scale.scale(Num<T>::widen(x_row[l * x.step])) * r);
  }
}

template <typename T, typename Acc>
__global__ void normalize_rows_backward_kernel(StridedRows<T> grad_y,
                                               StridedRows<T> x,
                                               const Acc* factor, int dim,
                                               int64_t rows, T* grad_x,
                                               Acc* dots) {
  const int lane = threadIdx.x % 32;
  int64_t first, last;
  warp_rows(rows, first, last);
  for (int64_t row = first; row < last; ++row) {
    const T* x_row = x.row(row);
    const T* g_row = grad_y.row(row);
    RowScale<Acc> scale;
    Acc n;
    scale_and_norm(x_row, x.step, dim, lane, scale, n);
    const Acc inverse_n = Acc(1) / n;
    Acc dot = 0;
    for (int l = lane; l < dim; l += 32) {
      const Acc u = scale.scale(Num<T>::widen(x_row[l * x.step])) * inverse_n;
      dot += u * Num<T>::widen(g_row[l * grad_y.step]);
    }
    dot = warp_sum(dot);
    if (lane == 0) dots[row] = dot;
    const Acc r = factor[x.head(row)] / n;
    for (int l = lane; l < dim; l += 32) {
      const Acc u = scale.scale(Num<T>::widen(x_row[l * x.step])) * inverse_n;
      const Acc g = Num<T>::widen(g_row[l * grad_y.step]);
      grad_x[row * dim + l] = Num<T>::narrow(scale.scale((g - u * dot) * r));
    }
  }
}

int64_t row_blocks(int64_t rows) {
  return (rows + kRowsPerBlock - 1) / kRowsPerBlock;
}

at::Tensor normalize_rows_cuda(const at::Tensor& x,
                               const std::optional<at::Tensor>& factor) {
  check_normalize_arguments("taylorshift::normalize_rows", x, factor);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  const at::Tensor f = normalize_factors(factor, x);
  const int dim = static_cast<int>(x.size(3));
  const int64_t rows = x.numel() / x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_rows_cuda", [&] {
        using T = typename Native<scalar_t>::type;
        using Acc = typename Num<T>::acc;
        normalize_rows_kernel<T, Acc><<<row_blocks(rows), kThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
            strided_rows<T>(x), f.const_data_ptr<Acc>(), dim, rows,
            reinterpret_cast<T*>(y.mutable_data_ptr()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor> normalize_rows_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& factor) {
  check_normalize_backward_arguments("taylorshift::normalize_rows_backward",
                                     grad_y, x, factor);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.options().dtype(accumulate_dtype(x));
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  // u . g of every row, summed per head after the kernel (deterministic).
  at::Tensor dots = at::zeros({x.size(0), x.size(1), x.size(2)}, acc);
  if (x.numel() > 0) {
    const at::Tensor f = normalize_factors(factor, x);
    const int dim = static_cast<int>(x.size(3));
    const int64_t rows = x.numel() / x.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(),
        "normalize_rows_backward_cuda", [&] {
          using T = typename Native<scalar_t>::type;
          using Acc = typename Num<T>::acc;
          normalize_rows_backward_kernel<T, Acc>
              <<<row_blocks(rows), kThreads, 0,
                 at::cuda::getCurrentCUDAStream()>>>(
                  strided_rows<T>(grad_y), strided_rows<T>(x),
                  f.const_data_ptr<Acc>(), dim, rows,
                  reinterpret_cast<T*>(grad_x.mutable_data_ptr()),
                  dots.mutable_data_ptr<Acc>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_x, dots.sum({0, 2}).to(factor_grad_dtype(factor, x))};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CUDA, m) {
  m.impl("normalize_rows", TORCH_FN(normalize_rows_cuda));
  m.impl("normalize_rows_backward", TORCH_FN(normalize_rows_backward_cuda));
}

}  // namespace taylorshift::cuda_kernels
