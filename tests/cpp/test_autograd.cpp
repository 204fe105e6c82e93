// C++ autograd: gradients of taylorshift::attention with respect to q, k, v
// and the temperature, from C++, against autograd through the ATen
// reference in float64.
#include <torch/autograd.h>

#include "../../csrc/taylorshift.h"
#include "catch.h"

using taylorshift::testing::allowed_by_padding;
using taylorshift::testing::max_abs_diff;
using taylorshift::testing::reference_attention;

namespace {

at::Tensor leaf(std::vector<int64_t> shape) {
  return at::randn(shape, at::TensorOptions().dtype(at::kDouble))
      .requires_grad_(true);
}

// The whole user-facing function (normalisation, temperature) in ATen.
at::Tensor reference(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& temperature,
                     const at::Tensor& allowed) {
  const at::Tensor q_hat =
      q / q.norm(2, -1, true) * temperature.view({1, -1, 1, 1});
  const at::Tensor k_hat = k / k.norm(2, -1, true);
  return reference_attention(q_hat, k_hat, v, allowed, true, {0.5, 1.0, 1.0});
}

// out and its gradients (of out.sum()) against expected's, for inputs.
void require_same_gradients(const at::Tensor& out, const at::Tensor& expected,
                            const std::vector<at::Tensor>& inputs) {
  REQUIRE(max_abs_diff(out, expected) < 1e-12);
  const auto grads = torch::autograd::grad({out.sum()}, inputs);
  const auto expected_grads = torch::autograd::grad({expected.sum()}, inputs);
  for (size_t i = 0; i < inputs.size(); ++i)
    REQUIRE(max_abs_diff(grads[i], expected_grads[i]) < 1e-10);
}

}  // namespace

TEST_CASE("C++ autograd gradients match the reference") {
  const std::string mode = GENERATE("direct", "efficient");
  const int64_t B = 2, H = 2, M = 9, N = 70, d = 4, e = 3;
  const at::Tensor q = leaf({B, H, M, d}), k = leaf({B, H, N, d}),
                   v = leaf({B, H, N, e});
  const at::Tensor temperature =
      (at::rand({H}, at::kDouble) + 0.5).requires_grad_(true);
  at::Tensor padding = at::rand({B, N}).lt(0.3);
  padding.select(1, 0).fill_(false);
  const at::Tensor grad_out = at::randn({B, H, M, e}, at::kDouble);

  const at::Tensor out =
      taylorshift::attention(q, k, v, temperature, padding, {}, false, mode);
  const at::Tensor expected =
      reference(q, k, v, temperature, allowed_by_padding(padding));
  REQUIRE(max_abs_diff(out, expected) < 1e-12);

  const auto inputs = std::vector<at::Tensor>{q, k, v, temperature};
  const auto grads = torch::autograd::grad({out}, inputs, {grad_out});
  const auto expected_grads =
      torch::autograd::grad({expected}, inputs, {grad_out});
  for (size_t i = 0; i < inputs.size(); ++i) {
    INFO("input " << i);
    REQUIRE(max_abs_diff(grads[i], expected_grads[i]) < 1e-10);
  }
}

TEST_CASE("C++ autograd through attn_mask and causal (direct)") {
  const int64_t B = 1, H = 2, M = 20, N = 20, d = 5;
  const at::Tensor q = leaf({B, H, M, d}), k = leaf({B, H, N, d}),
                   v = leaf({B, H, N, d});
  const at::Tensor temperature =
      at::ones({H}, at::kDouble).requires_grad_(true);
  const at::Tensor attn_mask = at::rand({M, N}).lt(0.3);
  const at::Tensor allowed = (~attn_mask) & at::ones({M, N}, at::kBool).tril();
  require_same_gradients(
      taylorshift::attention(q, k, v, temperature, {}, attn_mask, true, "auto"),
      reference(q, k, v, temperature, allowed), {q, k, v, temperature});
}

TEST_CASE("C++ autograd through causal efficient (CPU kernels)") {
  const int64_t B = 1, H = 2, L = 150, d = 5;
  const at::Tensor q = leaf({B, H, L, d}), k = leaf({B, H, L, d}),
                   v = leaf({B, H, L, d});
  const at::Tensor temperature =
      at::ones({H}, at::kDouble).requires_grad_(true);
  const at::Tensor allowed = at::ones({L, L}, at::kBool).tril();
  require_same_gradients(
      taylorshift::attention(q, k, v, temperature, {}, {}, true, "efficient"),
      reference(q, k, v, temperature, allowed), {q, k, v, temperature});
}
