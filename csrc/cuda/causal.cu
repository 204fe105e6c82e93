// Causal efficient TaylorShift on CUDA (causal-and-order spec §2), linear in
// the number of tokens, on the kernels of efficient.cu and direct.cu. The
// tokens are split into chunks of C = kCausalChunk, and with
// u_j = m_j [1 | v_j] and S_{<c} the state of the chunks before chunk c,
// row i of chunk c gets
//   z_i = phi(q_i)^T S_{<c} + sum_{j in c, j <= i} f(q_i . k_j) u_j,
//   y_i = sigma_i z_i[1:] / z_i[0],   sigma_i = sqrt(N_i / d),
// N_i the unpadded keys up to i. Every chunk of every (batch, head) becomes
// one head of its own, (B H n, 1, C, d) with n = ceil(N / C) (the last
// chunk's missing tokens are padded keys), so both sums are kernels that
// already exist:
// - the state term: the efficient kernels with chunks = n
//   (efficient_forward_rows), whose reduce gives each chunk's state, an
//   exclusive prefix sum over the chunks S_{<c}, and whose apply gives
//   A_i = phi(q_i)^T S_{<c} as a_i = A_i[0] and A_i[1:] / a_i;
// - the chunk's triangle: the causal direct kernels on each chunk alone
//   (M = N = C), T_i = sum_{j in c, j <= i} f(x_ij) u_j, as t_i = T_i[0] and
//   T_i[1:] / t_i.
// Both run with sigma = 1, and their outputs are added as z_i = A_i + T_i:
//   den_i = a_i + t_i,
//   y_i = sigma_i (a_i (A_i[1:] / a_i) + t_i (T_i[1:] / t_i)) / den_i,
// a term's output being 0 where its denominator is 0 (chunk 0 has no state
// term). Each term's output is rounded to the inputs' dtype once before the
// merge, one rounding more than one fused kernel would make (the tests hold
// the result to twice PyTorch's own error in that dtype).
//
// The backward differentiates z_i = A_i + T_i: both terms see the same
// dz_i = [-dl_i | rs_i gY_i] (backward_row_scalars of the merged out and
// den), so the efficient backward (whose dS becomes the suffix sum dS_{>c})
// and the causal direct backward on each chunk take the same scalars, and
// the gradients are their sums.
//
// Memory, beyond the inputs in chunks (copies of q, k, v, and in the backward
// of grad_out and out): per chunk, its state S_{<c} (F (e + 1) floats, which
// the forward returns for the backward, as the CPU's kernels do) and the
// apply's operand of it in the inputs' dtype; the backward's dS_{>c} and the
// gradient tiles likewise. That is N / C times a non-causal call's state:
// at d = e = 64, 0.56 MB of states per chunk, 286 MB per head at N = 65536.
#include <torch/library.h>

#include "../kernel_checks.h"
#include "../taylorshift.h"
#include "common.cuh"

namespace taylorshift::cuda_kernels {

namespace {

constexpr int64_t kChunk = kCausalChunk;

int64_t chunk_count(int64_t tokens) { return (tokens + kChunk - 1) / kChunk; }

// (B, H, N, x) -> (B H n, 1, C, x): zeros after the last token, each chunk a
// head of its own.
at::Tensor to_chunks(const at::Tensor& t, int64_t chunks) {
  return at::constant_pad_nd(t, {0, 0, 0, chunks * kChunk - t.size(2)})
      .contiguous()
      .view({-1, 1, kChunk, t.size(3)});
}

// (B H n, 1, C, ...) -> (B, H, N, ...): the first N rows of each (b, h).
at::Tensor from_chunks(const at::Tensor& t, const at::Tensor& like) {
  std::vector<int64_t> shape = {like.size(0), like.size(1), -1};
  if (t.dim() == 4) shape.push_back(t.size(3));
  return t.reshape(shape).narrow(2, 0, like.size(2)).contiguous();
}

// The rows' values (B, H, N) as the heads of to_chunks, (B H n, 1, C).
at::Tensor row_chunks(const at::Tensor& rows, int64_t chunks) {
  return at::constant_pad_nd(rows, {0, chunks * kChunk - rows.size(2)})
      .contiguous()
      .view({-1, 1, kChunk});
}

// What both passes read: the chunks' key padding, the last chunk's missing
// tokens counted as padding (nullopt where no key is padded), and sigma_i of
// N_i, the unpadded keys up to i, those before a decoding step (keys_before,
// (B,)) included.
struct ChunkRows {
  std::optional<at::Tensor> key_padding;  // (B H n, C)
  at::Tensor sigma;  // (B H n, 1, C), row_chunks's layout, accumulation dtype
};

ChunkRows chunk_rows(const at::Tensor& q,
                     const std::optional<at::Tensor>& key_padding_mask,
                     bool output_scale, int64_t chunks,
                     const at::Tensor& keys_before = {}) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const auto acc = q.options().dtype(accumulate_dtype(q));
  const at::Tensor valid = key_padding_mask
                               ? key_padding_mask->logical_not()
                               : at::ones({B, N}, q.options().dtype(at::kBool));
  ChunkRows rows;
  if (key_padding_mask || N % kChunk != 0) {
    rows.key_padding = at::constant_pad_nd(valid, {0, chunks * kChunk - N})
                           .logical_not()
                           .view({B, 1, chunks * kChunk})
                           .expand({B, H, chunks * kChunk})
                           .reshape({-1, kChunk});
  }
  if (!output_scale) {
    rows.sigma = at::ones({1, 1, 1}, acc).expand({B * H * chunks, 1, kChunk});
    return rows;
  }
  at::Tensor seen = valid.to(acc.dtype()).cumsum(1);
  if (keys_before.defined())
    seen = seen + keys_before.to(acc.dtype()).unsqueeze(1);
  rows.sigma = row_chunks((seen / static_cast<double>(q.size(3)))
                              .sqrt()
                              .unsqueeze(1)
                              .expand({B, H, N}),
                          chunks);
  return rows;
}

// The forward of the header on q, k, v (B, H, N, d / e) with rows as
// chunk_rows makes them and chunks.count = n: out, den (B, H, N) and the
// state each chunk's queries read, (B H n, 1, F, e + 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunked_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const ChunkRows& rows, const Coefficients& f, const CausalChunks& chunks) {
  const int64_t n = chunks.count;
  const at::Tensor qc = to_chunks(q, n), kc = to_chunks(k, n),
                   vc = to_chunks(v, n);
  const at::Tensor ones =
      at::ones({1, 1, 1}, rows.sigma.options()).expand({qc.size(0), 1, kChunk});
  auto [state_out, state_den, states] =
      efficient_forward_rows(qc, kc, vc, rows.key_padding, ones, f, chunks);
  auto [chunk_out, chunk_den] = direct_forward_rows(
      qc, kc, vc, rows.key_padding, std::nullopt, true, ones, f);
  // z = A + T (header); a row that sees no key has den = 0 and outputs 0.
  const at::Tensor den = state_den + chunk_den;
  const at::Tensor numerator =
      state_out.to(den.scalar_type()) * state_den.unsqueeze(-1) +
      chunk_out.to(den.scalar_type()) * chunk_den.unsqueeze(-1);
  const at::Tensor factor =
      at::where(den != 0, den.reciprocal(), at::zeros_like(den)) * rows.sigma;
  const at::Tensor out = (numerator * factor.unsqueeze(-1)).to(q.scalar_type());
  return {from_chunks(out, q), from_chunks(den, q), states};
}

// The forward's and the step's checks (`others`: the step's state and
// count); returns the options.
KernelOptions check_forward_inputs(
    const char* op, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, std::initializer_list<const at::Tensor*> others,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  const KernelOptions options =
      schema_options(true, output_scale, coefficients);
  check_forward_arguments(op, q, k, v, key_padding_mask, std::nullopt, options);
  check_causal_arguments(op, q, k, options, kMaxEfficientOrderCuda);
  check_cuda_inputs(op, q, k, v, others, key_padding_mask, std::nullopt);
  return options;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  const KernelOptions options =
      check_forward_inputs("taylorshift::causal_efficient_forward", q, k, v, {},
                           key_padding_mask, output_scale, coefficients);
  const Coefficients& f = options.coefficients;
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const int64_t n = chunk_count(N);
  if (q.numel() == 0 || v.numel() == 0)
    return {
        at::zeros({B, H, N, v.size(3)}, q.options()),
        at::zeros({B, H, N}, q.options().dtype(accumulate_dtype(q))),
        at::zeros({B, H, n, feature_count(q.size(3), f.order), v.size(3) + 1},
                  q.options().dtype(accumulate_dtype(q)))};
  const ChunkRows rows = chunk_rows(q, key_padding_mask, output_scale, n);
  auto [out, den, states] = chunked_forward(q, k, v, rows, f, CausalChunks{n});
  return {out, den, states.view({B, H, n, states.size(2), states.size(3)})};
}

// Decoding without autograd: the forward after the tokens that `state`
// (B, H, F, e + 1) and valid_keys (B,) hold, its chunks' states started from
// `state`; returns the tokens' outputs and the state and count after them
// (new tensors; the inputs are not written).
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_step_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& valid_keys,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  constexpr const char* op = "taylorshift::causal_efficient_step";
  const KernelOptions options =
      check_forward_inputs(op, q, k, v, {&state, &valid_keys}, key_padding_mask,
                           output_scale, coefficients);
  const Coefficients& f = options.coefficients;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3),
                e = v.size(3), F = feature_count(d, f.order);
  check_operand(op, "state", state, {B, H, F, e + 1}, accumulate_dtype(q), q);
  check_operand(op, "valid_keys", valid_keys, {B}, at::kLong, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor valid = key_padding_mask
                               ? key_padding_mask->logical_not()
                               : at::ones({B, N}, q.options().dtype(at::kBool));
  const at::Tensor seen = valid_keys + valid.sum(1);
  if (q.numel() == 0 || v.numel() == 0)
    return {at::zeros({B, H, N, e}, q.options()),
            state.clone(at::MemoryFormat::Contiguous), seen};
  const int64_t n = chunk_count(N);
  const ChunkRows rows =
      chunk_rows(q, key_padding_mask, output_scale, n, valid_keys);
  // The kernels' states have order 2's rows (order 1: zero pair rows).
  const at::Tensor before =
      at::constant_pad_nd(state, {0, 0, 0, feature_count(d) - F})
          .reshape({B * H, feature_count(d), e + 1});
  CausalChunks chunks{n, &before};
  at::Tensor after;
  chunks.after = &after;
  // float16's operand scale needs a bound on the keys before: one host sync.
  if (q.scalar_type() == at::kHalf)
    chunks.keys_before = valid_keys.max().item<int64_t>();
  at::Tensor out = std::get<0>(chunked_forward(q, k, v, rows, f, chunks));
  return {out, after.narrow(1, 0, F).reshape({B, H, F, e + 1}).contiguous(),
          seen};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const at::Tensor& states, const std::optional<at::Tensor>& key_padding_mask,
    bool output_scale, c10::ArrayRef<double> coefficients) {
  constexpr const char* op = "taylorshift::causal_efficient_backward";
  const KernelOptions options =
      schema_options(true, output_scale, coefficients);
  check_backward_arguments(op, grad_out, q, k, v, out, den, std::nullopt,
                           key_padding_mask, std::nullopt, options);
  check_causal_arguments(op, q, k, options, kMaxEfficientOrderCuda);
  check_cuda_inputs(op, q, k, v, {&grad_out, &out, &den, &states},
                    key_padding_mask, std::nullopt);
  const Coefficients& f = options.coefficients;
  check_causal_states(op, states, q, v, f.order);
  const c10::cuda::CUDAGuard guard(q.device());
  if (q.numel() == 0 || v.numel() == 0)
    return {at::zeros_like(q, at::MemoryFormat::Contiguous),
            at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const int64_t n = chunk_count(N);
  const ChunkRows rows = chunk_rows(q, key_padding_mask, output_scale, n);
  const at::Tensor qc = to_chunks(q, n), kc = to_chunks(k, n),
                   vc = to_chunks(v, n), gc = to_chunks(grad_out, n),
                   oc = to_chunks(out, n);
  const at::Tensor scalars =
      backward_row_scalars(gc, oc, row_chunks(den, n), rows.sigma);
  const at::Tensor chunk_states =
      states.to(accumulate_dtype(q))
          .reshape({B * H * n, 1, states.size(3), states.size(4)});
  auto [state_q, state_k, state_v] = efficient_backward_rows(
      gc, qc, kc, vc, chunk_states, scalars, rows.key_padding, f, n);
  auto [chunk_q, chunk_k, chunk_v] = direct_backward_rows(
      gc, qc, kc, vc, scalars, rows.key_padding, std::nullopt, true, f);
  return {from_chunks(state_q.add_(chunk_q), q),
          from_chunks(state_k.add_(chunk_k), k),
          from_chunks(state_v.add_(chunk_v), v)};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CUDA, m) {
  m.impl("causal_efficient_step", TORCH_FN(causal_efficient_step_cuda));
  m.impl("causal_efficient_forward", TORCH_FN(causal_efficient_forward_cuda));
  m.impl("causal_efficient_backward", TORCH_FN(causal_efficient_backward_cuda));
}

}  // namespace taylorshift::cuda_kernels
