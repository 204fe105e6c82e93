// Invariants every algorithm kernel (CPU, CUDA, Meta) relies on. The
// user-facing checks with friendlier messages are in attention.cpp; these
// guard the operators when they are called directly.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "kernel_blocks.h"

namespace taylorshift {

inline void check_kernel_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "taylorshift: q, k, v must be 4-d (B, H, tokens, dim)");
  for (int64_t dim : {0, 1}) {
    TORCH_SYM_CHECK(q.sym_size(dim).sym_eq(k.sym_size(dim)),
                    "taylorshift: q and k differ in batch or heads");
    TORCH_SYM_CHECK(k.sym_size(dim).sym_eq(v.sym_size(dim)),
                    "taylorshift: k and v differ in batch or heads");
  }
  TORCH_SYM_CHECK(k.sym_size(2).sym_eq(v.sym_size(2)),
                  "taylorshift: k and v must have the same number of tokens");
  TORCH_SYM_CHECK(q.sym_size(3).sym_eq(k.sym_size(3)),
                  "taylorshift: q and k must have the same head dim");
  TORCH_CHECK_TYPE(
      q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
      "taylorshift: q, k, v must have the same dtype");
  if (key_padding_mask) {
    TORCH_CHECK_TYPE(key_padding_mask->scalar_type() == at::kBool,
                     "taylorshift: key_padding_mask must be bool");
    TORCH_CHECK_VALUE(key_padding_mask->dim() == 2,
                      "taylorshift: key_padding_mask must be (B, N)");
    TORCH_SYM_CHECK(key_padding_mask->sym_size(0).sym_eq(k.sym_size(0)),
                    "taylorshift: key_padding_mask must be (B, N)");
    TORCH_SYM_CHECK(key_padding_mask->sym_size(1).sym_eq(k.sym_size(2)),
                    "taylorshift: key_padding_mask must be (B, N)");
  }
  if (attn_mask) {
    TORCH_CHECK_TYPE(attn_mask->scalar_type() == at::kBool,
                     "taylorshift: attn_mask must be bool");
    TORCH_CHECK_VALUE(attn_mask->dim() == 4,
                      "taylorshift: attn_mask must be (B, H, M, N)");
    for (int64_t dim : {0, 1, 2}) {
      TORCH_SYM_CHECK(attn_mask->sym_size(dim).sym_eq(q.sym_size(dim)),
                      "taylorshift: attn_mask must be (B, H, M, N)");
    }
    TORCH_SYM_CHECK(attn_mask->sym_size(3).sym_eq(k.sym_size(2)),
                    "taylorshift: attn_mask must be (B, H, M, N)");
  }
}

}  // namespace taylorshift
