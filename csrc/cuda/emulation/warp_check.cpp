// Checks the host emulation of csrc/cuda/warp.cuh against an independent
// definition of the PTX fragment layouts, CuTe's MMA_Traits / Copy_Traits
// (nvidia-cutlass headers), and the emulated primitives against plain
// arithmetic. Built and run by tests/test_warp_primitives.py; prints one
// "check <name> <cases> <mismatches>" line per check.
#include <atomic>
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "host_shim.h"
// After the shim: warp.cuh then takes the emulated primitives.
#include "../warp.cuh"

using namespace cute;
namespace warp = taylorshift::cuda_kernels::warp;

namespace {

int failures = 0;

void report(const char* name, long cases, long mismatches) {
  std::printf("check %s %ld %ld\n", name, cases, mismatches);
  failures += mismatches > 0 || cases == 0;
}

// CuTe's (thread, value) -> column-major index in the M x K, N x K, M x N
// operand, against the layout the emulation implements.
template <typename Traits>
void mma_layouts(const char* name) {
  using MNK = typename Traits::Shape_MNK;
  constexpr int M = size<0>(MNK{}), N = size<1>(MNK{});
  long cases = 0, bad = 0;
  for (int t = 0; t < 32; ++t) {
    for (int v = 0; v < 8; ++v, ++cases) {
      const int idx = typename Traits::ALayout{}(t, v);
      const auto e = warp::layout::a(t, v);
      bad += idx != e.row + M * e.col;
    }
    for (int v = 0; v < 4; ++v, ++cases) {
      const int idx = typename Traits::BLayout{}(t, v);
      const auto e = warp::layout::b(t, v);  // (k, n); CuTe indexes N x K
      bad += idx != e.col + N * e.row;
    }
    for (int v = 0; v < 4; ++v, ++cases) {
      const int idx = typename Traits::CLayout{}(t, v);
      const auto e = warp::layout::c(t, v);
      bad += idx != e.row + M * e.col;
    }
  }
  report(name, cases, bad);
}

// wgmma's register fragments: CuTe's RS traits (A from registers, 128
// threads) against layout::wgmma_a and layout::wgmma_d.
template <typename Traits>
void wgmma_layouts(const char* name) {
  using MNK = typename Traits::Shape_MNK;
  constexpr int M = size<0>(MNK{}), N = size<1>(MNK{});
  long cases = 0, bad = 0;
  for (int t = 0; t < 128; ++t) {
    for (int v = 0; v < 8; ++v, ++cases) {
      const int idx = typename Traits::ALayout{}(t, v);
      const auto e = warp::layout::wgmma_a(t, v);
      bad += idx != e.row + M * e.col;
    }
    for (int v = 0; v < N / 2; ++v, ++cases) {
      const int idx = typename Traits::CLayout{}(t, v);
      const auto e = warp::layout::wgmma_d(t, v);
      bad += idx != e.row + M * e.col;
    }
  }
  report(name, cases, bad);
}

// A no-swizzle B operand (N x 16 in CuTe's (n, k) order, n or k contiguous
// as kMajor says) at the start of shared memory: CuTe's make_gmma_desc of it
// against matrix_descriptor(0, lbo, sbo), and every element's address as
// layout::descriptor_offset decodes CuTe's descriptor against CuTe's layout.
// (On the host CuTe cannot convert a shared pointer and takes start 0.)
template <warp::Major kMajor, typename Layout>
void descriptor(const char* name, Layout layout, uint32_t lbo, uint32_t sbo) {
  using bf16 = cutlass::bfloat16_t;
  constexpr bool kMN = kMajor == warp::Major::kMN;
  const auto tensor = make_tensor(
      make_smem_ptr(reinterpret_cast<const bf16*>(emu::smem)), layout);
  const uint64_t desc =
      SM90::GMMA::make_gmma_desc<kMN ? SM90::GMMA::Major::MN
                                     : SM90::GMMA::Major::K>(tensor);
  long cases = 1, bad = desc != warp::matrix_descriptor(0, lbo, sbo);
  for (int n = 0; n < size<0>(layout); ++n)
    for (int k = 0; k < 16; ++k, ++cases)
      bad += warp::layout::descriptor_offset(desc, kMN, k, n) !=
             2 * uint32_t(layout(n, k));
  report(name, cases, bad);
}

// One warp of 32 emulated lanes running `body(lane)`.
template <typename Body>
void run_warp(Body body) {
  emu::launch([&] { body(int(emu::threadIdx_.x)); }, 1, 32)();
}

// ldmatrix on a reference of 32 rows x 8 16-bit elements whose element e has
// the value e; row r lives at a scattered address (slot (7 r + 3) % 32, 32
// bytes apart), so that every lane's address matters. Source lane s points at
// the reference row holding bit SrcLayout(s, 0); lane t's destination bit v
// must hold reference bit DstLayout(t, v).
template <typename Op, int kCount, bool kTrans>
void ldmatrix_layout(const char* name) {
  using Traits = Copy_Traits<Op>;
  uint16_t* base = reinterpret_cast<uint16_t*>(emu::smem);
  uint32_t out[32][4] = {};
  run_warp([&](int lane) {
    if (lane == 0) {
      std::memset(emu::smem, 0, 32 * 32);
      for (int r = 0; r < 32; ++r)
        for (int c = 0; c < 8; ++c) base[(7 * r + 3) % 32 * 16 + c] = r * 8 + c;
    }
    emu::sync();
    const int ref_row = int(typename Traits::SrcLayout{}(lane, 0)) / 128;
    uint32_t r[kCount];
    warp::ldmatrix<kCount, kTrans>(r, base + (7 * ref_row + 3) % 32 * 16);
    for (int m = 0; m < kCount; ++m) out[lane][m] = r[m];
  });
  long cases = 0, bad = 0;
  for (int t = 0; t < 32; ++t)
    for (int v = 0; v < 32 * kCount; v += 16, ++cases) {
      const int ref_bit = typename Traits::DstLayout{}(t, v);
      const uint32_t got = warp::detail::half_of(out[t][v / 32], v / 16 % 2);
      bad += int(got) != ref_bit / 16;
    }
  report(name, cases, bad);
}

// D = A B + C through the kernels' load pattern: A row-major 16 x 16 by
// ldmatrix.x4, B row-major 16 x 8 (k x n) by ldmatrix.x2.trans, C and D in
// the accumulator layout; against a double-precision product.
template <typename T>
void mma_product(const char* name) {
  float A[16][16], B[16][8], C[16][8];
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k)
      A[i][k] = warp::detail::to_float<T>(
          warp::detail::from_float<T>(float((i * 7 + k * 3) % 11) / 8 - 0.6f));
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 8; ++j)
      B[k][j] = warp::detail::to_float<T>(
          warp::detail::from_float<T>(float((k * 5 + j * 9) % 13) / 4 - 1.4f));
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) C[i][j] = float(i - j) / 3;
  float D[16][8] = {};
  uint16_t* a_tile = reinterpret_cast<uint16_t*>(emu::smem);  // ld 24
  uint16_t* b_tile = a_tile + 16 * 24;                        // ld 16
  run_warp([&](int lane) {
    if (lane == 0) {
      for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 16; ++k)
          a_tile[i * 24 + k] = warp::detail::from_float<T>(A[i][k]);
      for (int k = 0; k < 16; ++k)
        for (int j = 0; j < 8; ++j)
          b_tile[k * 16 + j] = warp::detail::from_float<T>(B[k][j]);
    }
    emu::sync();
    uint32_t a[4], b[2];
    warp::ldmatrix<4>(a, a_tile + (lane % 16) * 24 + lane / 16 * 8);
    warp::ldmatrix<2, true>(b, b_tile + (lane % 16) * 16);
    float d[4];
    for (int i = 0; i < 4; ++i) {
      const auto e = warp::layout::c(lane, i);
      d[i] = C[e.row][e.col];
    }
    warp::mma_16816<T>(d, a, b);
    for (int i = 0; i < 4; ++i) {
      const auto e = warp::layout::c(lane, i);
      D[e.row][e.col] = d[i];
    }
  });
  long cases = 0, bad = 0;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j, ++cases) {
      double ref = C[i][j];
      for (int k = 0; k < 16; ++k) ref += double(A[i][k]) * B[k][j];
      bad += std::fabs(D[i][j] - ref) > 1e-5 * (1 + std::fabs(ref));
    }
  report(name, cases, bad);
}

// D = A B + C on wgmma: a warpgroup holding A (64 x 16) in registers and B
// (16 x kN) in the kernels' core-matrix tiles (TileLayout::kCoreMatrices):
// MN-major, B's rows k in row groups 16 kN bytes apart; K-major, B's columns
// n as tile rows, in row groups 32 bytes apart. D unchanged until the wait,
// then against a double-precision product.
template <typename T, int kN, warp::Major kMajor>
void wgmma_product(const char* name) {
  constexpr bool kMN = kMajor == warp::Major::kMN;
  float A[64][16], B[16][kN], C[64][kN], D[64][kN];
  for (int i = 0; i < 64; ++i)
    for (int k = 0; k < 16; ++k)
      A[i][k] = warp::detail::to_float<T>(
          warp::detail::from_float<T>(float((i * 7 + k * 3) % 11) / 8 - 0.6f));
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < kN; ++j)
      B[k][j] = warp::detail::to_float<T>(
          warp::detail::from_float<T>(float((k * 5 + j * 9) % 13) / 4 - 1.4f));
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < kN; ++j) C[i][j] = float(i - j) / 3;
  uint16_t* b_tile = reinterpret_cast<uint16_t*>(emu::smem) + 64;
  std::atomic<long> early{0};
  emu::launch(
      [&] {
        const int t = emu::threadIdx_.x;
        if (t == 0)
          for (int k = 0; k < 16; ++k)
            for (int j = 0; j < kN; ++j)
              b_tile[kMN ? k / 8 * 8 * kN + j / 8 * 64 + k % 8 * 8 + j % 8
                         : j / 8 * 8 * 16 + k / 8 * 64 + j % 8 * 8 + k % 8] =
                  warp::detail::from_float<T>(B[k][j]);
        emu::sync();
        uint32_t a[4];
        for (int r = 0; r < 4; ++r) {
          const auto lo = warp::layout::wgmma_a(t, 2 * r);
          const auto hi = warp::layout::wgmma_a(t, 2 * r + 1);
          a[r] = warp::pack<T>(A[lo.row][lo.col], A[hi.row][hi.col]);
        }
        float d[kN / 8][4];
        for (int i = 0; i < kN / 2; ++i) {
          const auto e = warp::layout::wgmma_d(t, i);
          d[i / 4][i % 4] = C[e.row][e.col];
        }
        warp::wgmma_fence();
        warp::wgmma_rs<T, kN, kMajor>(
            d, a,
            kMN ? warp::matrix_descriptor(128, 16 * kN, 128)
                : warp::matrix_descriptor(128, 128, 16 * 16));
        warp::wgmma_commit();
        for (int i = 0; i < kN / 2; ++i) {
          const auto e = warp::layout::wgmma_d(t, i);
          early += d[i / 4][i % 4] != C[e.row][e.col];
        }
        warp::wgmma_wait<0>();
        for (int i = 0; i < kN / 2; ++i) {
          const auto e = warp::layout::wgmma_d(t, i);
          D[e.row][e.col] = d[i / 4][i % 4];
        }
      },
      1, 128)();
  long cases = 1, bad = early.load() != 0;
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < kN; ++j, ++cases) {
      double ref = C[i][j];
      for (int k = 0; k < 16; ++k) ref += double(A[i][k]) * B[k][j];
      bad += std::fabs(D[i][j] - ref) > 1e-5 * (1 + std::fabs(ref));
    }
  report(name, cases, bad);
}

// cp.async: the destination is untouched until the wait for its group, then
// holds the source (or zeros for an invalid source).
void cp_async() {
  alignas(16) static uint32_t src[32][4];
  for (int t = 0; t < 32; ++t)
    for (int w = 0; w < 4; ++w) src[t][w] = 1000 * t + w;
  long cases = 0, bad = 0;
  run_warp([&](int lane) {
    uint32_t* dst = reinterpret_cast<uint32_t*>(emu::smem) + 4 * lane;
    std::memset(dst, 0xff, 16);
    warp::cp_async_16(dst, src[lane], lane % 3 != 0);
    warp::cp_async_commit();
    const bool untouched = dst[0] == 0xffffffffu;
    warp::cp_async_wait<0>();
    bool ok = untouched;
    for (int w = 0; w < 4; ++w)
      ok = ok && dst[w] == (lane % 3 != 0 ? src[lane][w] : 0u);
    static std::atomic<long> wrong{0};
    if (!ok) ++wrong;
    emu::sync();
    if (lane == 0) {
      cases = 32;
      bad = wrong.exchange(0);
    }
  });
  report("cp_async", cases, bad);
}

// mul2 against the toolkit's own host __hmul2_rn on the packed pair types:
// every product of 2^16 pseudo-random pairs of finite 16-bit values, and
// mul2_half against the product with either half of y in both halves.
// The toolkit's host functions putting one half of a pair in both halves.
template <typename Pair>
struct Halves;
template <>
struct Halves<__nv_bfloat162> {
  static __nv_bfloat162 low(__nv_bfloat162 v) { return __low2bfloat162(v); }
  static __nv_bfloat162 high(__nv_bfloat162 v) { return __high2bfloat162(v); }
};
template <>
struct Halves<__half2> {
  static __half2 low(__half2 v) { return __low2half2(v); }
  static __half2 high(__half2 v) { return __high2half2(v); }
};

template <typename T, typename Pair>
void mul2_product(const char* name) {
  long cases = 0, bad = 0;
  uint32_t state = 12345;
  const auto next = [&] {
    state = state * 1664525u + 1013904223u;
    return state;
  };
  for (int n = 0; n < 1 << 16; ++n, ++cases) {
    // Exponents kept in range so that products stay finite in both types.
    const uint32_t x = next() & 0xbfffbfffu, y = next() & 0xbfffbfffu;
    Pair px, py;
    std::memcpy(&px, &x, 4);
    std::memcpy(&py, &y, 4);
    const Pair want = __hmul2_rn(px, py);
    uint32_t want_bits;
    std::memcpy(&want_bits, &want, 4);
    bad += warp::mul2<T>(x, y) != want_bits;
    for (bool high : {false, true}) {
      const Pair half =
          __hmul2_rn(px, high ? Halves<Pair>::high(py) : Halves<Pair>::low(py));
      std::memcpy(&want_bits, &half, 4);
      bad += warp::mul2_half<T>(x, y, high) != want_bits;
    }
  }
  report(name, cases, bad);
}

// byte_signs against the PTX ISA's words for prmt.b32 with a selector nibble
// whose msb is set: "the sign (msb of the byte) should be replicated over all
// 8 bits of the target position", of source byte (nibble & 7) of {b, a} = {0,
// x}: every byte choice of the selectors the kernels use and others, on
// pseudo-random words and every single set bit.
template <uint32_t kBytes>
long byte_signs_of(uint32_t x) {
  uint32_t want = 0;
  for (int k = 0; k < 4; ++k) {
    const int source = (kBytes >> 4 * k) & 7;
    const bool sign = (x >> (8 * source + 7)) & 1;
    if (sign) want |= 0xffu << 8 * k;
  }
  return warp::byte_signs<kBytes>(x) != want;
}

void byte_signs() {
  long cases = 0, bad = 0;
  uint32_t state = 777;
  std::vector<uint32_t> words;
  for (int bit = 0; bit < 32; ++bit) words.push_back(1u << bit);
  for (int n = 0; n < 4096; ++n) {
    state = state * 1664525u + 1013904223u;
    words.push_back(state);
  }
  for (const uint32_t x : words) {
    bad += byte_signs_of<0x1100>(x) + byte_signs_of<0x3322>(x) +
           byte_signs_of<0x3210>(x) + byte_signs_of<0x0123>(x) +
           byte_signs_of<0x0000>(x) + byte_signs_of<0x3333>(x);
    cases += 6;
  }
  report("byte_signs", cases, bad);
}

}  // namespace

int main() {
  mma_layouts<MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>>(
      "layout_SM80_16x8x16_F32BF16BF16F32_TN");
  mma_layouts<MMA_Traits<SM80_16x8x16_F32F16F16F32_TN>>(
      "layout_SM80_16x8x16_F32F16F16F32_TN");
  ldmatrix_layout<SM75_U32x1_LDSM_N, 1, false>("ldmatrix_SM75_U32x1_LDSM_N");
  ldmatrix_layout<SM75_U32x2_LDSM_N, 2, false>("ldmatrix_SM75_U32x2_LDSM_N");
  ldmatrix_layout<SM75_U32x4_LDSM_N, 4, false>("ldmatrix_SM75_U32x4_LDSM_N");
  ldmatrix_layout<SM75_U16x2_LDSM_T, 1, true>("ldmatrix_SM75_U16x2_LDSM_T");
  ldmatrix_layout<SM75_U16x4_LDSM_T, 2, true>("ldmatrix_SM75_U16x4_LDSM_T");
  ldmatrix_layout<SM75_U16x8_LDSM_T, 4, true>("ldmatrix_SM75_U16x8_LDSM_T");
  mma_product<__nv_bfloat16>("mma_16816_bf16");
  mma_product<__half>("mma_16816_f16");
  cp_async();
  mul2_product<__nv_bfloat16, __nv_bfloat162>("mul2_bf16");
  mul2_product<__half, __half2>("mul2_f16");
  byte_signs();
  using namespace SM90::GMMA;
  wgmma_layouts<MMA_Traits<MMA_64x16x16_F32BF16BF16_RS<Major::K, Major::MN>>>(
      "layout_SM90_64x16x16_F32BF16BF16_RS");
  wgmma_layouts<MMA_Traits<MMA_64x32x16_F32F16F16_RS<Major::K, Major::MN>>>(
      "layout_SM90_64x32x16_F32F16F16_RS");
  wgmma_layouts<MMA_Traits<MMA_64x64x16_F32BF16BF16_RS<Major::K, Major::MN>>>(
      "layout_SM90_64x64x16_F32BF16BF16_RS");
  // CuTe's canonical atoms tiled to the operand, and the kernels' tiles in
  // core matrices: the reduce's value tiles (MN-major, token groups 16 N
  // bytes apart) and the dx kernel's gradient tiles (K-major, their rows n in
  // groups 16 kDim bytes apart).
  using bf16 = cutlass::bfloat16_t;
  descriptor<warp::Major::kMN>(
      "descriptor_MN_INTER_atom_64x16",
      tile_to_shape(Layout_MN_INTER_Atom<bf16>{}, Shape<_64, _16>{}), 1024,
      128);
  descriptor<warp::Major::kK>(
      "descriptor_K_INTER_atom_64x16",
      tile_to_shape(Layout_K_INTER_Atom<bf16>{}, Shape<_64, _16>{}), 1024, 128);
  descriptor<warp::Major::kMN>(
      "descriptor_value_tile_16",
      make_layout(Shape<Shape<_8, _2>, Shape<_8, _2>>{},
                  Stride<Stride<_1, _64>, Stride<_8, _128>>{}),
      256, 128);
  descriptor<warp::Major::kMN>(
      "descriptor_value_tile_64",
      make_layout(Shape<Shape<_8, _8>, Shape<_8, _2>>{},
                  Stride<Stride<_1, _64>, Stride<_8, _512>>{}),
      1024, 128);
  descriptor<warp::Major::kK>(
      "descriptor_gradient_tile_64",
      make_layout(Shape<Shape<_8, _8>, Shape<_8, _2>>{},
                  Stride<Stride<_8, _512>, Stride<_1, _64>>{}),
      128, 1024);
  wgmma_product<__nv_bfloat16, 16, warp::Major::kMN>("wgmma_64x16x16_bf16");
  wgmma_product<__half, 32, warp::Major::kMN>("wgmma_64x32x16_f16");
  wgmma_product<__nv_bfloat16, 64, warp::Major::kMN>("wgmma_64x64x16_bf16");
  wgmma_product<__nv_bfloat16, 72, warp::Major::kMN>("wgmma_64x72x16_bf16");
  wgmma_product<__half, 64, warp::Major::kK>("wgmma_64x64x16_f16_kmajor");
  wgmma_product<__nv_bfloat16, 136, warp::Major::kK>(
      "wgmma_64x136x16_bf16_kmajor");
  return failures;
}
