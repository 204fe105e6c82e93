// csrc/cuda/warp.cuh on the host: each primitive is a collective over the 32
// emulated lanes of a warp (std::threads of host_shim.h). Every lane posts
// its operands (row addresses, fragment registers) to its slot, the warp
// meets at a barrier, and every lane computes its own result registers from
// the other lanes' slots through the per-lane fragment layouts of the PTX
// ISA, stated once below (`layout`) and tested against CuTe's MMA_Traits /
// Copy_Traits (tests/test_warp_primitives.py). Misuse the hardware would
// punish aborts: unaligned or non-shared ldmatrix rows, unaligned cp.async,
// reading a cp.async destination before its wait (the copy lands at the wait,
// so an early read sees the 0xff fill of shared memory: NaN). A wgmma lands
// in its accumulators at the wgmma_wait that covers it, as late as the
// hardware may; changing its B operand's shared memory or its accumulators
// before then (a cp.async into that memory is refused at its issue, as it
// may land at once), or issuing it without a wgmma_fence since the last
// commit, aborts.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../matrix_descriptor.cuh"

namespace taylorshift::cuda_kernels::warp {

namespace layout {
// mma.m16n8k16 fragments; g = lane / 4, q = lane % 4 (see warp.cuh).
struct Coord {
  int row, col;
};
inline Coord a(int lane, int i) {  // A 16x16, element i in 0..7
  return {lane / 4 + 8 * ((i / 2) % 2), 2 * (lane % 4) + i % 2 + 8 * (i / 4)};
}
inline Coord b(int lane, int i) {  // B 16x8 (k x n), element i in 0..3
  return {2 * (lane % 4) + i % 2 + 8 * (i / 2), lane / 4};
}
inline Coord c(int lane, int i) {  // C/D 16x8, element i in 0..3
  return {lane / 4 + 8 * (i / 2), 2 * (lane % 4) + i % 2};
}
// ldmatrix: half h (0 low, 1 high) of a lane's register m is this element of
// matrix m (whose rows lanes 8 m .. 8 m + 7 address).
inline Coord ldmatrix(int lane, int h, bool trans) {
  return trans ? Coord{2 * (lane % 4) + h, lane / 4}
               : Coord{lane / 4, 2 * (lane % 4) + h};
}
// wgmma m64nNk16 (thread t of the warpgroup, warp t / 32): A 64 x 16,
// element i in 0..7, and D 64 x N, element i in 0..N/2-1 (n8 tile i / 4).
inline Coord wgmma_a(int t, int i) {
  const Coord e = a(t % 32, i);
  return {e.row + 16 * (t / 32 % 4), e.col};
}
inline Coord wgmma_d(int t, int i) {
  const Coord e = c(t % 32, i % 4);
  return {e.row + 16 * (t / 32 % 4), e.col + 8 * (i / 4)};
}
// Byte offset from shared memory's start of element (k, n) of a B operand
// described by `desc` (no swizzle; 16-bit elements): n contiguous
// (MN-major) or k contiguous (K-major), in 8x8 core matrices of 16-byte
// rows, LBO apart along k (MN-major) or along k's 8-element halves
// (K-major), SBO apart along n.
inline uint32_t descriptor_offset(uint64_t desc, bool mn_major, int k, int n) {
  const uint32_t start = uint32_t(desc & 0x3fff) << 4;
  const uint32_t lbo = uint32_t(desc >> 16 & 0x3fff) << 4;
  const uint32_t sbo = uint32_t(desc >> 32 & 0x3fff) << 4;
  return mn_major
             ? start + k / 8 * lbo + n / 8 * sbo + 16 * (k % 8) + 2 * (n % 8)
             : start + k / 8 * lbo + n / 8 * sbo + 16 * (n % 8) + 2 * (k % 8);
}
}  // namespace layout

namespace detail {
// One slot per emulated thread; a collective writes, meets, reads, meets.
struct alignas(16) Slot {
  unsigned char bytes[64];
};
inline Slot slots[1024];

template <typename V>
std::array<V, 32> gather(const V& mine) {
  static_assert(sizeof(V) <= sizeof(Slot) && std::is_trivially_copyable_v<V>);
  const unsigned t = emu::threadIdx_.x, base = t / 32 * 32;
  std::memcpy(slots[t].bytes, &mine, sizeof(V));
  emu::warp_barriers[t / 32]->arrive_and_wait();
  std::array<V, 32> all;
  for (int lane = 0; lane < 32; ++lane)
    std::memcpy(&all[lane], slots[base + lane].bytes, sizeof(V));
  emu::warp_barriers[t / 32]->arrive_and_wait();
  return all;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "warp emulation: %s\n", what);
  std::abort();
}

inline bool in_shared(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= emu::smem && c + bytes <= emu::smem + sizeof(emu::smem);
}

template <typename T>
float to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t wide = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  } else {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
}

template <typename T>
uint16_t from_float(float x) {
  uint16_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat16 v = __float2bfloat16_rn(x);
    std::memcpy(&bits, &v, 2);
  } else {
    const __half v = __float2half_rn(x);
    std::memcpy(&bits, &v, 2);
  }
  return bits;
}

inline uint16_t half_of(uint32_t reg, int h) {
  return static_cast<uint16_t>(h ? reg >> 16 : reg & 0xffffu);
}

// cp.async groups of this emulated thread: the copies land at the wait.
struct Copy {
  void* dst;
  const void* src;
  bool valid;
};
inline thread_local std::vector<Copy> open_group;
inline thread_local std::vector<std::vector<Copy>> committed;

// wgmma issued by this emulated thread, landing at the wait: its lane's two
// rows of A, the B operand as read at the issue, and its accumulators.
struct Product {
  float* d;
  int count;     // accumulator registers, N / 2
  bool chained;  // d also belongs to an earlier product still in flight
  std::vector<float> d_at_issue;
  float a[2][16];  // rows g and g + 8 of the warp's 16 rows
  uint64_t desc;
  bool mn_major;
  uint32_t b_first, b_last;  // the bytes B spans in shared memory
  std::vector<uint16_t> b;   // k x N, as read at the issue
  float (*value)(uint16_t);  // to_float of the operand type
};
inline thread_local std::vector<Product> open_products;
inline thread_local std::vector<std::vector<Product>> committed_products;
inline thread_local bool fenced = false;

// B (16 x n) read through the descriptor.
inline std::vector<uint16_t> read_b(uint64_t desc, bool mn_major, int n) {
  std::vector<uint16_t> b(16 * n);
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < n; ++c) {
      const unsigned char* e =
          emu::smem + layout::descriptor_offset(desc, mn_major, k, c);
      if (!in_shared(e, 2)) fail("wgmma B operand outside shared memory");
      std::memcpy(&b[k * n + c], e, 2);
    }
  return b;
}
}  // namespace detail

// A shared address as the hardware's shared window sees it: the offset from
// the start of shared memory.
inline uint32_t shared_address(const void* p) {
  if (!detail::in_shared(p, 1)) detail::fail("not a shared address");
  return uint32_t(static_cast<const unsigned char*>(p) - emu::smem);
}

template <typename T>
uint32_t pack(float lo, float hi) {
  return uint32_t(detail::from_float<T>(lo)) |
         uint32_t(detail::from_float<T>(hi)) << 16;
}

// Both halves multiplied in float (exact for two 16-bit values) and rounded
// once to T, as the hardware's HMUL2 does.
template <typename T>
uint32_t mul2(uint32_t x, uint32_t y) {
  return pack<T>(detail::to_float<T>(detail::half_of(x, 0)) *
                     detail::to_float<T>(detail::half_of(y, 0)),
                 detail::to_float<T>(detail::half_of(x, 1)) *
                     detail::to_float<T>(detail::half_of(y, 1)));
}

// prmt.b32 with sign replication: byte k of the result is byte
// (kBytes >> 4 k) & 3 of x shifted arithmetically right by 7.
template <uint32_t kBytes>
uint32_t byte_signs(uint32_t x) {
  static_assert((kBytes & 0xcccc) == 0, "byte indices 0..3");
  uint32_t r = 0;
  for (int k = 0; k < 4; ++k) {
    const int8_t byte = static_cast<int8_t>(x >> 8 * ((kBytes >> 4 * k) & 3));
    r |= uint32_t(static_cast<uint8_t>(byte >> 7)) << 8 * k;
  }
  return r;
}

// mul2 by the chosen half of y in both halves.
template <typename T>
uint32_t mul2_half(uint32_t x, uint32_t y, bool high) {
  return mul2<T>(x, uint32_t(detail::half_of(y, high ? 1 : 0)) * 0x10001u);
}

template <int kCount, bool kTrans = false>
void ldmatrix(uint32_t (&r)[kCount], const void* row) {
  static_assert(kCount == 1 || kCount == 2 || kCount == 4);
  const unsigned lane = emu::threadIdx_.x % 32;
  // Lanes past 8 kCount give no address; the hardware ignores theirs.
  if (lane < 8 * kCount) {
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0 ||
        !detail::in_shared(row, 16))
      detail::fail("ldmatrix row address not 16-byte aligned shared memory");
  }
  const auto rows = detail::gather(row);
  for (int m = 0; m < kCount; ++m) {
    uint32_t reg = 0;
    for (int h = 0; h < 2; ++h) {
      const layout::Coord e = layout::ldmatrix(lane, h, kTrans);
      uint16_t bits;
      std::memcpy(
          &bits,
          static_cast<const unsigned char*>(rows[8 * m + e.row]) + 2 * e.col,
          2);
      reg |= uint32_t(bits) << (16 * h);
    }
    r[m] = reg;
  }
}

template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Operands {
    uint32_t a[4], b[2];
  };
  Operands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  const auto all = detail::gather(mine);
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const layout::Coord e = layout::a(lane, i);
      A[e.row][e.col] =
          detail::to_float<T>(detail::half_of(all[lane].a[i / 2], i % 2));
    }
    for (int i = 0; i < 4; ++i) {
      const layout::Coord e = layout::b(lane, i);
      B[e.row][e.col] =
          detail::to_float<T>(detail::half_of(all[lane].b[i / 2], i % 2));
    }
  }
  const int lane = emu::threadIdx_.x % 32;
  for (int i = 0; i < 4; ++i) {
    const layout::Coord e = layout::c(lane, i);
    // Products of 16-bit operands are exact in float; the sum is float.
    float s = d[i];
    for (int k = 0; k < 16; ++k) s += A[e.row][k] * B[k][e.col];
    d[i] = s;
  }
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
      !detail::in_shared(dst, 16) ||
      (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    detail::fail(
        "cp.async needs 16-byte aligned source and shared destination");
  // The copy may land at once: not into a B operand still being read.
  const uint32_t first = uint32_t(static_cast<unsigned char*>(dst) - emu::smem);
  const auto overlaps = [&](const detail::Product& p) {
    return first < p.b_last && first + 16 > p.b_first;
  };
  for (const auto& group : detail::committed_products)
    for (const auto& p : group)
      if (overlaps(p)) detail::fail("cp.async into a wgmma operand in flight");
  for (const auto& p : detail::open_products)
    if (overlaps(p)) detail::fail("cp.async into a wgmma operand in flight");
  detail::open_group.push_back({dst, src, valid});
}

inline void cp_async_commit() {
  detail::committed.push_back(std::move(detail::open_group));
  detail::open_group.clear();
}

template <int kPending>
void cp_async_wait() {
  while (detail::committed.size() > size_t(kPending)) {
    for (const detail::Copy& c : detail::committed.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    detail::committed.erase(detail::committed.begin());
  }
}

inline void wgmma_fence() { detail::fenced = true; }

inline void wgmma_commit() {
  detail::committed_products.push_back(std::move(detail::open_products));
  detail::open_products.clear();
  detail::fenced = false;
}

// This warp's part of the warpgroup's product: its rows of D depend on its
// rows of A and on B alone, so the warp's 32 lanes suffice to compute it.
template <typename T, int kN, Major kMajor, int kTiles>
void wgmma_rs(float (&d)[kTiles][4], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(kN % 8 == 0 && kN <= 256 && kTiles >= kN / 8);
  if (!detail::fenced)
    detail::fail("wgmma issued without a wgmma_fence since the last commit");
  if ((desc >> 62) != 0) detail::fail("wgmma descriptor with a swizzle");
  struct Operands {
    uint32_t a[4];
  };
  Operands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  const auto all = detail::gather(mine);
  float A[16][16];
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 8; ++i) {
      const layout::Coord e = layout::a(lane, i);
      A[e.row][e.col] =
          detail::to_float<T>(detail::half_of(all[lane].a[i / 2], i % 2));
    }
  const int g = emu::threadIdx_.x % 32 / 4;
  detail::Product p;
  p.d = &d[0][0];
  p.count = kN / 2;
  p.chained = false;
  for (const auto& group : detail::committed_products)
    for (const auto& q : group) p.chained = p.chained || q.d == p.d;
  for (const auto& q : detail::open_products)
    p.chained = p.chained || q.d == p.d;
  p.d_at_issue.assign(p.d, p.d + p.count);
  std::memcpy(p.a[0], A[g], sizeof(p.a[0]));
  std::memcpy(p.a[1], A[g + 8], sizeof(p.a[1]));
  p.desc = desc;
  p.mn_major = kMajor == Major::kMN;
  p.b_first = layout::descriptor_offset(desc, p.mn_major, 0, 0);
  p.b_last = layout::descriptor_offset(desc, p.mn_major, 15, kN - 1) + 1;
  p.b = detail::read_b(desc, p.mn_major, kN);
  p.value = &detail::to_float<T>;
  detail::open_products.push_back(std::move(p));
}

// The products of the groups past the kPending newest land, in issue order.
template <int kPending>
void wgmma_wait() {
  const int t = emu::threadIdx_.x, g = t % 32 / 4;
  while (detail::committed_products.size() > size_t(kPending)) {
    for (const detail::Product& p : detail::committed_products.front()) {
      const int n = 2 * p.count;
      if (detail::read_b(p.desc, p.mn_major, n) != p.b)
        detail::fail("wgmma B operand changed before its wait");
      // Bit for bit: a NaN accumulator is unchanged if its bits are.
      if (!p.chained &&
          std::memcmp(p.d, p.d_at_issue.data(), sizeof(float) * p.count) != 0)
        detail::fail("wgmma accumulators changed before its wait");
      for (int i = 0; i < p.count; ++i) {
        const layout::Coord e = layout::wgmma_d(t, i);
        const float* a = p.a[e.row % 16 == g ? 0 : 1];
        // Products of 16-bit operands are exact in float; the sum is float.
        float s = p.d[i];
        for (int k = 0; k < 16; ++k) s += a[k] * p.value(p.b[k * n + e.col]);
        p.d[i] = s;
      }
    }
    detail::committed_products.erase(detail::committed_products.begin());
  }
}

}  // namespace taylorshift::cuda_kernels::warp
