// The FLOP counts of both algorithms (docs/math.md §4), the one definition
// that the cost model, the Python API (taylorshift.flops) and every benchmark
// use. When is the efficient algorithm cheaper than the direct one? A cost
// model of this implementation: forward FLOPs of each algorithm, weighted by
// how fast each of our kernels runs per FLOP on a device type, as measured by
// benchmarks/crossover.py.
#include <algorithm>

#include "kernel_checks.h"
#include "taylorshift.h"

namespace taylorshift {
namespace {

// Time per FLOP of the efficient kernels over time per FLOP of the direct
// kernels, forward + backward, float32, at the crossover, from
// `python benchmarks/crossover.py` (table in benchmarks/README.md). On the
// CPU it falls with the head dim (the register kernels' work per token grows
// as d^2 e, their fixed costs per token as d), so it is a + b / d, fitted to
// the measured ratios at the crossovers of d = 16, 32, 64 (1.09, 0.99, 0.88
// with 2 threads), and held at its d = 16 value below (not measured there).
// CUDA has not been measured yet: until it is, FLOP parity (1.0).
double efficient_flop_cost(c10::DeviceType device, int64_t head_dim) {
  constexpr double kCpuBase = 0.83, kCpuPerDim = 4.3;
  constexpr int64_t kSmallestMeasured = 16;
  return device == c10::DeviceType::CPU
             ? kCpuBase +
                   kCpuPerDim / double(std::max(head_dim, kSmallestMeasured))
             : 1.0;
}

}  // namespace

bool efficient_supports(int order, c10::DeviceType device) {
  return order >= 1 &&
         order <= (device == c10::DeviceType::CUDA ? kMaxEfficientOrderCuda
                                                   : kMaxEfficientOrder);
}

double flops(bool efficient, int64_t queries, int64_t keys, int64_t head_dim,
             int64_t value_dim, bool backward, int order) {
  const double M = double(queries), N = double(keys), d = double(head_dim),
               e = double(value_dim);
  if (!efficient) {
    // Forward: Q K^T and W V, 2 (d + e) per (query, key) pair. Backward:
    // scores recomputed (d), dV (e), gY V^T (e), dQ (d), dK (d). The
    // polynomial (k multiply-adds per weight by Horner's rule, k - 1 more
    // for f' in the backward) runs on the vector units beside the products
    // and is left out, as for order 2.
    return 2.0 * M * N * (backward ? 4 * d + 3 * e : d + e);
  }
  // Forward: the state build over keys and its apply over queries,
  // 2 F (e + 1) per token each. Backward: dS over queries, S dz per query,
  // dS u and psi^T dS per key: twice the forward again. Order k has
  // F = C(d + k, k) features.
  const double F = double(feature_count(head_dim, order));
  return 2.0 * (M + N) * F * (e + 1) * (backward ? 3.0 : 1.0);
}

bool prefer_efficient(int64_t queries, int64_t keys, int64_t head_dim,
                      int64_t value_dim, c10::DeviceType device, int order) {
  if (!efficient_supports(order, device)) return false;
  // CUDA runs order 1 through the order-2 kernels (quadratic coefficient 0),
  // at order 2's cost.
  const int kernel_order =
      device == c10::DeviceType::CUDA ? std::max(order, 2) : order;
  // The forward counts: efficient_flop_cost was measured against them.
  return flops(true, queries, keys, head_dim, value_dim, false, kernel_order) *
             efficient_flop_cost(device, head_dim) <
         flops(false, queries, keys, head_dim, value_dim, false);
}

// Causal: the direct kernels compute the lower triangle only, half the
// pairs; the chunked form (cpu/causal.cpp) the efficient algorithm's state
// and application plus, per token, its chunk's C x C square of the direct
// form, forward counts of each. Per FLOP its BLAS products over feature
// tiles cost about 1.35 times the direct kernels': the crossovers measured by
// benchmarks/bench_causal.py (N = 512-1024 at d = 16, 2048 at d = 32,
// 4096-8192 at d = 64; 2 threads) give 1.2-1.45, and 1.35 puts them at 797,
// 1913 and 6230. CUDA (cuda/causal.cu: the efficient and direct kernels on
// the chunks, order 1 at order 2's cost as above) and the ATen form of other
// devices are not measured: FLOP parity.
bool prefer_efficient_causal(int64_t tokens, int64_t head_dim,
                             int64_t value_dim, c10::DeviceType device,
                             int order) {
  if (!efficient_supports(order, device)) return false;
  const double cost = device == c10::DeviceType::CPU ? 1.35 : 1.0;
  const int kernel_order =
      device == c10::DeviceType::CUDA ? std::max(order, 2) : order;
  const double chunked =
      flops(true, tokens, tokens, head_dim, value_dim, false, kernel_order) +
      2.0 * double(tokens) * double(kCausalChunk) *
          double(head_dim + value_dim + 1);
  return chunked * cost <
         flops(false, tokens, tokens, head_dim, value_dim, false) / 2;
}

int64_t crossover(int64_t head_dim, int64_t value_dim, c10::DeviceType device,
                  int order) {
  TORCH_CHECK_VALUE(head_dim > 0 && value_dim > 0,
                    "taylorshift: head_dim must be positive");
  TORCH_CHECK_VALUE(efficient_supports(order, device),
                    "taylorshift: the efficient algorithm has no order ", order,
                    " on ", device, " (orders 1 to ", kMaxEfficientOrder,
                    " on the CPU, 1 to ", kMaxEfficientOrderCuda,
                    " on CUDA), so there is no crossover: mode=\"auto\" "
                    "always picks \"direct\"");
  // prefer_efficient is monotone in the sequence length: bisect for the
  // first length at which it holds.
  int64_t low = 1, high = int64_t(1) << 40;
  while (low < high) {
    const int64_t mid = low + (high - low) / 2;
    if (prefer_efficient(mid, mid, head_dim, value_dim, device, order))
      high = mid;
    else
      low = mid + 1;
  }
  return low;
}

int64_t crossover(int64_t head_dim, c10::DeviceType device, int order) {
  return crossover(head_dim, head_dim, device, order);
}

}  // namespace taylorshift
