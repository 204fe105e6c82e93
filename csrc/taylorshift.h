// The C++ API of taylorshift: what a C++ user, the Python bindings and the
// Catch2 tests call. Every function goes through the PyTorch dispatcher, so
// the CPU, CUDA, Meta and Autograd kernels registered for the
// `taylorshift::` operators are picked by device and autograd state.
//
// Conventions (as F.scaled_dot_product_attention and nn.MultiheadAttention):
//   q (B, H, M, d), k (B, H, N, d), v (B, H, N, e)
//   key_padding_mask (B, N) bool,   True = padding, ignored
//   attn_mask broadcastable to (B, H, M, N) bool, True = not allowed to attend
//   causal: query i attends keys j <= i (top-left aligned, as SDPA)
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>

#include "kernel_blocks.h"

namespace taylorshift {

// TaylorShift attention with argument checks, logit normalisation,
// temperature and the choice of algorithm. `mode` is "auto", "direct" or
// "efficient". Differentiable in q, k, v and temperature.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v,
                     const std::optional<at::Tensor>& temperature = {},
                     const std::optional<at::Tensor>& key_padding_mask = {},
                     const std::optional<at::Tensor>& attn_mask = {},
                     bool causal = false, const std::string& mode = "auto",
                     bool normalize = true, bool output_scale = true,
                     std::optional<double> scale = {},
                     Coefficients coefficients = {});

// The algorithm kernels on already normalised logits' factors: logits are
// x_ij = <q_i, k_j>. They return what their backward needs.
//   den (B, H, M): sum_j w_ij, float32 (float64 for float64 inputs)
//   state (B, H, F, e + 1): sum_j psi(k_j) [1 | v_j]^T,
//     F = feature_count(d, order) = C(d + order, order)
std::tuple<at::Tensor, at::Tensor> direct_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, const KernelOptions& options);

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, const KernelOptions& options);

// The efficient operators have no attn_mask and no causal form: a `causal`
// in `options` is rejected. With normalize, they form the logits' factors
// themselves, as normalize_rows does: q_hat = temperature_h q / |q| and
// k_hat = k / |k| (temperature (H,) optional, 1 without; only with
// normalize), chunk by chunk, so that no (B, H, L, d) temporary exists; the
// backward then returns grad_temperature (H,) in temperature's dtype (shape
// (0,) without a temperature).
std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options, bool normalize = false,
    const std::optional<at::Tensor>& temperature = {});

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> efficient_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const at::Tensor& state, const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options, bool normalize = false,
    const std::optional<at::Tensor>& temperature = {});

// Causal attention in linear time on the logits' factors, M = N: the
// chunked efficient form with the CPU's kernels (cpu/causal.cpp). Returns
// out, den and the state before each chunk of kCausalChunk tokens,
// (B, H, chunks, F, e + 1), which the backward reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options);

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const at::Tensor& states, const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options);

// The forward above continued from a state (B, H, F, e + 1) and valid_keys
// (B,), the unpadded keys before q, k, v; without autograd (causal_step
// calls it when no gradient is needed). Returns out, the state and the count
// after the tokens.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_efficient_step(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& valid_keys,
    const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options);

// The same chunked form in ATen operations (csrc/causal.cpp), on every
// device, differentiable by autograd, continuing from a state: q_hat, k_hat
// (B, H, T, d) and v (B, H, T, e) are T tokens that follow state
// (B, H, F, e + 1) in the accumulation dtype and valid_keys (B,) int64, the
// unpadded keys before them (both absent: nothing before). Returns the T
// outputs, the state and the count after them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_continue(
    const at::Tensor& q_hat, const at::Tensor& k_hat, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const KernelOptions& options, const std::optional<at::Tensor>& state = {},
    const std::optional<at::Tensor>& valid_keys = {});

// Decoding: the next T >= 1 tokens of causal attention after a state, with
// the arguments of `attention` (logits formed the same way). state and
// valid_keys as above, zeros before the first token. Returns the tokens'
// outputs (B, H, T, e), the new state and the new count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_step(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& state, const at::Tensor& valid_keys,
    const std::optional<at::Tensor>& temperature = {},
    const std::optional<at::Tensor>& key_padding_mask = {},
    bool normalize = true, bool output_scale = true,
    std::optional<double> scale = {}, Coefficients coefficients = {});

// The logit factors of normalize=True: y = factor_h x / |x| along the last
// dimension of x (B, H, L, d), in x's dtype (computed in the accumulation
// dtype, rounded once), exact for every finite x; a zero row gives zeros.
// factor (H,) is optional (1). Differentiable in x and factor. The backward
// returns grad_x (x's dtype) and grad_factor (H,) in factor's dtype.
// (Defined here, inline: the CUDA efficient operators call them, also where
// csrc/cuda/emulation builds them outside this extension.)
inline at::Tensor normalize_rows(const at::Tensor& x,
                                 const std::optional<at::Tensor>& factor = {}) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("taylorshift::normalize_rows", "")
                       .typed<at::Tensor(const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  return op.call(x, factor);
}

inline std::tuple<at::Tensor, at::Tensor> normalize_rows_backward(
    const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& factor) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("taylorshift::normalize_rows_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&)>();
  return op.call(grad_y, x, factor);
}

// FLOPs of one (batch, head) of the direct or the efficient algorithm of
// Taylor order `order`, forward or forward + backward (docs/math.md §4; a
// multiply-add is 2). The efficient count has F = C(d + k, k) features.
double flops(bool efficient, int64_t queries, int64_t keys, int64_t head_dim,
             int64_t value_dim, bool backward, int order = 2);

// Whether the efficient algorithm exists for this order on this device type
// (orders 1 to 3 on the CPU, 1 and 2 on CUDA).
bool efficient_supports(int order, c10::DeviceType device);

// Cost model of this implementation (see csrc/crossover.cpp).
// True when the efficient algorithm is expected to be faster (never for an
// order it does not support).
bool prefer_efficient(int64_t queries, int64_t keys, int64_t head_dim,
                      int64_t value_dim, c10::DeviceType device, int order = 2);
// The same choice for causal attention over N tokens: causal direct (the
// lower triangle only) against the chunked causal form (csrc/causal.cpp).
bool prefer_efficient_causal(int64_t tokens, int64_t head_dim,
                             int64_t value_dim, c10::DeviceType device,
                             int order = 2);
// Sequence length (M = N, e = d) where the two algorithms cost the same.
int64_t crossover(int64_t head_dim, c10::DeviceType device, int order = 2);
// The smallest length L with prefer_efficient(L, L, d, e): the cost model is
// monotone in both lengths, so efficient is the cheaper one for all M, N >= L.
// A ValueError for an order the efficient algorithm does not support.
int64_t crossover(int64_t head_dim, int64_t value_dim, c10::DeviceType device,
                  int order = 2);

}  // namespace taylorshift
