// The C++ kernels, called through the dispatcher as a C++ user would, against
// the float64 ATen reference; and the feature maps of the CPU kernels.
#include <cmath>
#include <vector>

#include "../../csrc/cpu/feature_tiles.h"
#include "../../csrc/features.h"
#include "../../csrc/taylorshift.h"
#include "catch.h"

using taylorshift::testing::allowed_by_padding;
using taylorshift::testing::max_abs_diff;
using taylorshift::testing::reference_attention;

namespace {

at::Tensor randn(std::vector<int64_t> shape) {
  return at::randn(shape, at::TensorOptions().dtype(at::kDouble));
}

// float64 sums of a few hundred O(1) terms: 1e-12 leaves three orders of
// magnitude above the rounding error while any formula error is O(1e-2).
constexpr double kTolerance = 1e-12;

}  // namespace

TEST_CASE("pair indices enumerate l <= m row by row") {
  const int64_t d = 7;
  int64_t expected = 0;
  for (int64_t l = 0; l < d; ++l)
    for (int64_t m = l; m < d; ++m)
      REQUIRE(taylorshift::pair_index(l, m, d) == expected++);
  REQUIRE(expected == taylorshift::pair_count(d));
  REQUIRE(taylorshift::feature_count(d) == 1 + d + d * (d + 1) / 2);
}

TEST_CASE("feature counts are C(d + k, k)") {
  for (int64_t d : {1, 5, 16, 32}) {
    REQUIRE(taylorshift::feature_count(d, 1) == 1 + d);
    REQUIRE(taylorshift::feature_count(d, 2) == taylorshift::feature_count(d));
    REQUIRE(taylorshift::feature_count(d, 3) ==
            (d + 3) * (d + 2) * (d + 1) / 6);
  }
  REQUIRE(taylorshift::feature_count<int64_t>(32, 3) == 6545);
}

TEST_CASE("Horner's f and f' equal the polynomial and its derivative") {
  const std::vector<double> coefficients = {0.3, -0.2, 0.7, 1.1, -0.5, 2.0};
  const taylorshift::Coefficients f = taylorshift::polynomial_of(coefficients);
  REQUIRE(f.order == 5);
  for (double x : {-1.7, -0.3, 0.0, 0.9, 2.5}) {
    double value = 0, slope = 0;
    for (int n = 0; n <= 5; ++n) {
      value += f.of_degree(n) * std::pow(x, n);
      if (n > 0) slope += n * f.of_degree(n) * std::pow(x, n - 1);
    }
    REQUIRE(std::abs(taylorshift::taylor_weight(x, f) - value) < 1e-12);
    REQUIRE(std::abs(taylorshift::taylor_weight_grad(x, f) - slope) < 1e-12);
  }
}

TEST_CASE("phi(q) . psi(k) equals the weight polynomial of q . k") {
  // Feature tiles of two tokens each (columns): q_0 . k_0 and q_1 . k_1.
  const std::vector<double> coefficients = {0.2, 0.7, -0.4, 1.3};
  const int order = GENERATE(1, 2, 3);
  const taylorshift::Coefficients f = taylorshift::polynomial_of(
      {coefficients.data() + 3 - order, size_t(order) + 1});
  const int64_t d = 5, tokens = 2, F = taylorshift::feature_count(d, order);
  const at::Tensor q = randn({tokens, d}), k = randn({tokens, d});
  const at::Tensor qt = q.t().contiguous(), kt = k.t().contiguous();
  const std::vector<double> valid(tokens, 1.0);
  std::vector<double> phi(F * tokens), psi(F * tokens);
  taylorshift::cpu::query_feature_tile(
      qt.data_ptr<double>(), d, tokens, tokens,
      taylorshift::cpu::FeatureWeights<double>::queries(f), phi.data(), {});
  taylorshift::cpu::key_feature_tile(kt.data_ptr<double>(), valid.data(), d,
                                     tokens, tokens, psi.data(), {}, order);
  for (int64_t r = 0; r < tokens; ++r) {
    double dot = 0;
    for (int64_t i = 0; i < F; ++i)
      dot += phi[i * tokens + r] * psi[i * tokens + r];
    const double x = q[r].dot(k[r]).item<double>();
    REQUIRE(std::abs(dot - taylorshift::taylor_weight(x, f)) < 1e-12);
  }
}

TEST_CASE("direct (any order) and efficient (orders 1-3) match the reference") {
  const int64_t B = 1, H = 2, M = 70, N = 90, d = 5, e = 3;
  const int order = GENERATE(1, 2, 3, 4, 5);
  std::vector<double> coefficients;
  for (int n = order; n >= 0; --n)
    coefficients.push_back(1.0 / std::tgamma(n + 1));
  const at::Tensor q = randn({B, H, M, d}) * 0.3, k = randn({B, H, N, d}) * 0.3,
                   v = randn({B, H, N, e});
  at::Tensor padding = at::rand({B, N}).lt(0.3);
  padding.select(1, 0).fill_(false);
  const at::Tensor expected = reference_attention(
      q, k, v, allowed_by_padding(padding), true, coefficients);
  taylorshift::KernelOptions options;
  options.coefficients = taylorshift::polynomial_of(coefficients);
  auto [direct, den] =
      taylorshift::direct_forward(q, k, v, padding, std::nullopt, options);
  REQUIRE(max_abs_diff(direct, expected) < kTolerance);
  if (order <= 3) {
    auto [efficient, den_efficient, state] =
        taylorshift::efficient_forward(q, k, v, padding, options);
    REQUIRE(max_abs_diff(efficient, expected) < kTolerance);
    REQUIRE(state.size(2) == taylorshift::feature_count(d, order));
  } else {
    REQUIRE_THROWS_AS(taylorshift::efficient_forward(q, k, v, padding, options),
                      c10::NotImplementedError);
  }
}

TEST_CASE("direct and efficient forward match the reference") {
  const int64_t B = 2, H = 3, d = 6, e = 4;
  // Sizes straddle the CPU block sizes (64 queries, 256 keys, 64-token chunks).
  const int64_t M = GENERATE(1, 65, 130);
  const int64_t N = GENERATE(1, 64, 300);
  const at::Tensor q = randn({B, H, M, d}) * 0.3, k = randn({B, H, N, d}) * 0.3,
                   v = randn({B, H, N, e});
  at::Tensor padding = at::rand({B, N}).lt(0.3);
  padding.select(1, 0).fill_(false);  // at least one valid key per batch
  const at::Tensor allowed = allowed_by_padding(padding);
  const at::Tensor expected =
      reference_attention(q, k, v, allowed, true, {0.5, 1.0, 1.0});

  auto [direct, den] =
      taylorshift::direct_forward(q, k, v, padding, std::nullopt, {});
  auto [efficient, den_efficient, state] =
      taylorshift::efficient_forward(q, k, v, padding, {});
  REQUIRE(max_abs_diff(direct, expected) < kTolerance);
  REQUIRE(max_abs_diff(efficient, expected) < kTolerance);
  REQUIRE(max_abs_diff(den, den_efficient) < kTolerance * N);
  REQUIRE(state.sizes() ==
          at::IntArrayRef({B, H, taylorshift::feature_count(d), e + 1}));
}

TEST_CASE("direct forward with attn_mask and causal matches the reference") {
  const int64_t B = 2, H = 2, M = 70, N = 90, d = 8, e = 8;
  const at::Tensor q = randn({B, H, M, d}), k = randn({B, H, N, d}),
                   v = randn({B, H, N, e});
  const at::Tensor attn_mask = at::rand({M, N}).lt(0.2);
  const at::Tensor causal = at::ones({M, N}, at::kBool).tril();
  const at::Tensor allowed = (~attn_mask) & causal;
  taylorshift::KernelOptions options;
  options.causal = true;
  auto [out, den] = taylorshift::direct_forward(
      q, k, v, std::nullopt, attn_mask.expand({B, H, M, N}), options);
  REQUIRE(max_abs_diff(out, reference_attention(q, k, v, allowed, true,
                                                {0.5, 1.0, 1.0})) < kTolerance);
}

TEST_CASE(
    "causal efficient forward (chunked, with a state) matches the reference") {
  // 300 tokens: two whole chunks of 128 and a partial one.
  const int64_t B = 2, H = 2, L = 300, d = 8, e = 6;
  const at::Tensor q = randn({B, H, L, d}), k = randn({B, H, L, d}),
                   v = randn({B, H, L, e});
  const at::Tensor padding = at::rand({B, L}).lt(0.2);
  const at::Tensor allowed =
      at::ones({L, L}, at::kBool).tril() & (~padding).view({B, 1, 1, L});
  const at::Tensor expected =
      reference_attention(q, k, v, allowed, true, {0.5, 1.0, 1.0});
  taylorshift::KernelOptions options;
  options.causal = true;
  auto [out, den, states] =
      taylorshift::causal_efficient_forward(q, k, v, padding, options);
  REQUIRE(states.sizes() == at::IntArrayRef({B, H, 3, 45, e + 1}));
  REQUIRE(max_abs_diff(out, expected) < kTolerance);
  // The ATen form, continuing from a state: the first 200 tokens, then 100.
  auto [first, state, valid] = taylorshift::causal_continue(
      q.narrow(2, 0, 200), k.narrow(2, 0, 200), v.narrow(2, 0, 200),
      padding.narrow(1, 0, 200), options);
  auto [second, state2, valid2] = taylorshift::causal_continue(
      q.narrow(2, 200, 100), k.narrow(2, 200, 100), v.narrow(2, 200, 100),
      padding.narrow(1, 200, 100), options, state, valid);
  REQUIRE(max_abs_diff(at::cat({first, second}, 2), expected) < kTolerance);
  REQUIRE(at::equal(valid2, (~padding).sum(1)));
  // The CPU kernels' step from the same state: the 100 tokens as one step
  // (one chunk, added to the state in place), then token by token, and the
  // first 200 from an empty state (two chunks, a float64 running sum).
  auto [stepped, state3, valid3] = taylorshift::causal_efficient_step(
      q.narrow(2, 200, 100), k.narrow(2, 200, 100), v.narrow(2, 200, 100),
      state, valid, padding.narrow(1, 200, 100), options);
  REQUIRE(max_abs_diff(stepped, second) < kTolerance);
  const double state_scale = state2.abs().max().item<double>();
  REQUIRE(max_abs_diff(state3, state2) < kTolerance * state_scale);
  REQUIRE(at::equal(valid3, valid2));
  at::Tensor running = at::zeros_like(state), seen = at::zeros({B}, at::kLong);
  std::vector<at::Tensor> outputs;
  auto [head, after, count] = taylorshift::causal_efficient_step(
      q.narrow(2, 0, 200), k.narrow(2, 0, 200), v.narrow(2, 0, 200), running,
      seen, padding.narrow(1, 0, 200), options);
  outputs.push_back(head);
  for (int64_t i = 200; i < L; ++i) {
    auto [one, next, next_count] = taylorshift::causal_efficient_step(
        q.narrow(2, i, 1), k.narrow(2, i, 1), v.narrow(2, i, 1), after, count,
        padding.narrow(1, i, 1), options);
    outputs.push_back(one);
    after = next;
    count = next_count;
  }
  REQUIRE(max_abs_diff(at::cat(outputs, 2), expected) < kTolerance);
  REQUIRE(max_abs_diff(after, state2) < kTolerance * state_scale);
  REQUIRE(at::all(running == 0).item<bool>());  // the input is not written
}

TEST_CASE("a row whose keys are all masked gives zeros") {
  const int64_t B = 2, H = 1, M = 5, N = 7, d = 4;
  const at::Tensor q = randn({B, H, M, d}), k = randn({B, H, N, d}),
                   v = randn({B, H, N, d});
  at::Tensor padding = at::zeros({B, N}, at::kBool);
  padding.select(0, 1).fill_(true);
  auto [direct, den] =
      taylorshift::direct_forward(q, k, v, padding, std::nullopt, {});
  auto [efficient, den2, state] =
      taylorshift::efficient_forward(q, k, v, padding, {});
  for (const at::Tensor& out : {direct, efficient}) {
    REQUIRE(out.select(0, 1).abs().max().item<double>() == 0.0);
    REQUIRE(out.isfinite().all().item<bool>());
  }
}

TEST_CASE("float32 and bfloat16 compute with float32 accumulation") {
  const int64_t B = 1, H = 2, M = 40, N = 600, d = 16, e = 16;
  const at::Tensor q = randn({B, H, M, d}), k = randn({B, H, N, d}),
                   v = randn({B, H, N, e});
  const at::Tensor allowed = at::ones({1, 1, 1, N}, at::kBool);
  const at::Tensor expected =
      reference_attention(q / q.norm(2, -1, true), k / k.norm(2, -1, true), v,
                          allowed, true, {0.5, 1.0, 1.0});
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    // The inputs' own rounding dominates: 2^-24 (float32) or 2^-8 (bfloat16)
    // relative per element, a few units of it in y of norm ~sqrt(N/d).
    const double tolerance = dtype == at::kFloat ? 1e-5 : 0.1;
    for (const auto& algorithm : {"direct", "efficient"}) {
      const at::Tensor out = taylorshift::attention(
          q.to(dtype), k.to(dtype), v.to(dtype), {}, {}, {}, false, algorithm);
      REQUIRE(out.scalar_type() == dtype);
      REQUIRE(max_abs_diff(out.to(at::kDouble), expected) < tolerance);
    }
  }
}

TEST_CASE("bad input raises a ValueError naming the problem") {
  const at::Tensor q = randn({1, 2, 3, 4}), k = randn({1, 2, 5, 4}),
                   v = randn({1, 2, 5, 4});
  REQUIRE_THROWS_AS(taylorshift::attention(q, k, v.narrow(2, 0, 4)),
                    c10::ValueError);
  REQUIRE_THROWS_AS(taylorshift::attention(q, k, v, {}, {}, {}, false, "fast"),
                    c10::ValueError);
  REQUIRE_THROWS_AS(
      taylorshift::attention(q, k, v, {}, {}, {}, false, "auto", true, true, {},
                             taylorshift::polynomial_of({0.5, 1.0, 0.4})),
      c10::ValueError);
  // Causal efficient continues each query's own chunk: M must equal N.
  REQUIRE_THROWS_AS(
      taylorshift::attention(q, k, v, {}, {}, {}, true, "efficient"),
      c10::ValueError);
  // Order 1 needs bounded logits (normalize=True) ...
  REQUIRE_THROWS_AS(
      taylorshift::attention(q, k, v, {}, {}, {}, false, "direct", false, true,
                             {}, taylorshift::polynomial_of({1.0, 1.0})),
      c10::ValueError);
  // ... on which 1 + x >= 0: not with a temperature of 2.
  REQUIRE_THROWS_AS(
      taylorshift::attention(q, k, v, at::full({2}, 2.0, q.options()), {}, {},
                             false, "direct", true, true, {},
                             taylorshift::polynomial_of({1.0, 1.0})),
      c10::ValueError);
  REQUIRE_THROWS_AS(taylorshift::polynomial_of({1.0}), c10::ValueError);
  REQUIRE_THROWS_AS(taylorshift::attention(q, k, v, {}, {}, at::zeros({3, 5})),
                    c10::TypeError);
}

TEST_CASE("the crossover is where the cost model switches") {
  for (int64_t d : {16, 32, 64}) {
    const int64_t n = taylorshift::crossover(d, c10::DeviceType::CPU);
    REQUIRE(taylorshift::prefer_efficient(n, n, d, d, c10::DeviceType::CPU));
    REQUIRE_FALSE(taylorshift::prefer_efficient(n - 1, n - 1, d, d,
                                                c10::DeviceType::CPU));
  }
}
