// Host helpers and the small per-row kernels shared by both algorithms: the
// output scaling sigma_i = sqrt(N_i / d) and the backward's row scalars.
#include "common.cuh"

namespace taylorshift::cuda_kernels {

namespace {

// N_i for an explicit attn_mask: one warp per query row counts the allowed
// keys. The mask is read through its strides; the O(M N) reads are the same
// reads the direct kernel does anyway.
__global__ void count_allowed_keys_kernel(Mask mask, int64_t heads,
                                          int64_t queries, int64_t keys,
                                          int64_t rows, float* counts) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t bh = row / queries;
  const int64_t i = row % queries;
  const int64_t b = bh / heads;
  const int64_t h = bh % heads;
  int count = 0;
  for (int64_t j = lane; j < keys; j += 32) {
    count += mask.allowed(b, h, i, j) ? 1 : 0;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    count += __shfl_xor_sync(0xffffffffu, count, offset);
  }
  if (lane == 0) counts[row] = static_cast<float>(count);
}

// rs_i = sigma_i / den_i and dl_i = (gY_i . y_i) / den_i, one warp per row.
// grad_out and out are read through their strides.
template <typename T, typename Acc>
__global__ void row_scalars_kernel(TokenRows<T> grad_out, TokenRows<T> out,
                                   const Acc* den, RowValues<Acc> sigma,
                                   int64_t heads, int64_t queries, int64_t rows,
                                   Acc* scalars) {
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t bh = row / queries, b = bh / heads, h = bh % heads,
                i = row % queries;
  const T* g = grad_out.row(b, h, i);
  const T* y = out.row(b, h, i);
  Acc dot = 0;
  for (int c = lane; c < out.cols; c += 32) {
    dot += Num<T>::widen(g[c * grad_out.stride_c]) *
           Num<T>::widen(y[c * out.stride_c]);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  }
  if (lane == 0) {
    const Acc inv = safe_reciprocal(den[row]);
    scalars[2 * row] = sigma.at(b, h, i) * inv;
    scalars[2 * row + 1] = dot * inv;
  }
}

constexpr int kRowsPerBlock = kThreads / 32;

}  // namespace

at::Tensor output_scales(const at::Tensor& q, int64_t keys,
                         const std::optional<at::Tensor>& key_padding_mask,
                         const std::optional<at::Tensor>& attn_mask,
                         bool causal, bool output_scale) {
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2);
  const auto acc_dtype =
      q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = q.options().dtype(acc_dtype);
  if (!output_scale) {
    return at::ones({1, 1, 1}, options).expand({batch, heads, queries});
  }
  at::Tensor counts;  // N_i, (B, H or 1, M or 1)
  if (keys == 0) {
    counts = at::zeros({batch, 1, 1}, options);
  } else if (attn_mask) {
    counts = at::empty({batch, heads, queries}, q.options().dtype(at::kFloat));
    const int64_t rows = counts.numel();
    if (rows > 0) {
      const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
      const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
      count_allowed_keys_kernel<<<blocks, kThreads, 0,
                                  at::cuda::getCurrentCUDAStream()>>>(
          mask, heads, queries, keys, rows, counts.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    at::Tensor valid =
        key_padding_mask
            ? key_padding_mask->logical_not().to(at::kLong)
            : at::ones({batch, keys}, q.options().dtype(at::kLong));
    if (causal) {
      // Row i sees keys j <= min(i, N - 1): a prefix count of valid keys.
      const at::Tensor last =
          at::arange(queries, q.options().dtype(at::kLong)).clamp_max(keys - 1);
      counts = valid.cumsum(1).index_select(1, last).unsqueeze(1);
    } else {
      counts = valid.sum(1).view({batch, 1, 1});
    }
  }
  const at::Tensor sigma =
      (counts.to(acc_dtype) / static_cast<double>(q.size(3))).sqrt();
  return sigma.expand({batch, heads, queries});
}

at::Tensor backward_row_scalars(const at::Tensor& grad_out,
                                const at::Tensor& out, const at::Tensor& den,
                                const at::Tensor& sigma) {
  const int64_t heads = out.size(1), queries = out.size(2);
  const at::Tensor den_rows = den.contiguous();  // no copy: ours, contiguous
  at::Tensor scalars =
      at::empty({out.size(0), heads, queries, 2}, den.options());
  const int64_t rows = den.numel();
  if (rows == 0) return scalars;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "backward_row_scalars", [&] {
        using T = typename Native<scalar_t>::type;
        using Acc = typename Num<T>::acc;
        row_scalars_kernel<T, Acc>
            <<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                token_rows<T>(grad_out, out.size(3)),
                token_rows<T>(out, out.size(3)), den_rows.data_ptr<Acc>(),
                row_values<Acc>(sigma), heads, queries, rows,
                scalars.data_ptr<Acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return scalars;
}

void check_cuda_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v,
                       std::initializer_list<const at::Tensor*> others,
                       const std::optional<at::Tensor>& key_padding_mask,
                       const std::optional<at::Tensor>& attn_mask) {
  std::vector<const at::Tensor*> tensors = {&k, &v};
  tensors.insert(tensors.end(), others.begin(), others.end());
  if (key_padding_mask) tensors.push_back(&*key_padding_mask);
  if (attn_mask) tensors.push_back(&*attn_mask);
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device() == q.device(), op,
                ": all tensors must be on the same CUDA device, got ",
                q.device(), " and ", t->device());
  }
  TORCH_CHECK_NOT_IMPLEMENTED(
      q.size(3) >= 1 && q.size(3) <= kMaxHeadDim && v.size(3) >= 1 &&
          v.size(3) <= kMaxHeadDim,
      op, ": the CUDA kernels support head dims 1..", kMaxHeadDim,
      " (16, 32, 64 and 128 are the tuned ones), got d = ", q.size(3),
      ", e = ", v.size(3));
  const bool tensor_cores =
      q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  TORCH_CHECK_NOT_IMPLEMENTED(
      !tensor_cores ||
          at::cuda::getDeviceProperties(q.get_device())->major >= 8,
      op,
      ": float16 and bfloat16 need a GPU of compute capability 8.0 or "
      "newer (tensor-core bfloat16 and TF32); use float32 or float64 here");
  TORCH_CHECK_NOT_IMPLEMENTED(q.size(0) * q.size(1) <= 65535, op,
                              ": batch * heads must be at most 65535, got ",
                              q.size(0) * q.size(1));
}

size_t max_shared_memory() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

}  // namespace taylorshift::cuda_kernels
