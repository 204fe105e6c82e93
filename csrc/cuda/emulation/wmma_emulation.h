// nvcuda::wmma on the host, with the documented semantics of the calls
// csrc/cuda makes (16x16x16 half/bf16 and 16x16x8 TF32 operands, row- or
// column-major, float accumulators) and their alignment rules checked
// (256-bit pointers, leading dimensions a multiple of 16 bytes). Lane 0 of
// each warp does the whole product; the other lanes skip it.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16][16];
};

// Rounds to 10 mantissa bits, to nearest (ties away from zero), as
// __float_to_tf32 does.
inline float __float_to_tf32(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x1000u;
  bits &= 0xffffe000u;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline bool lane0() { return emu::threadIdx_.x % 32 == 0; }

template <typename E>
float element(E v) {
  if constexpr (std::is_same_v<E, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<E, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

inline void check(const void* p, unsigned ld, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ld * bytes) % 16 != 0) {
    std::fprintf(stderr, "wmma: misaligned pointer or leading dimension\n");
    std::abort();
  }
}

// Operand tiles: matrix_a is 16 x K, matrix_b is K x 16.
template <typename Use, int K, typename T, typename L, typename E>
void load_matrix_sync(fragment<Use, 16, 16, K, T, L>& f, const E* p,
                      unsigned ld) {
  if (!lane0()) return;
  check(p, ld, sizeof(E));
  constexpr bool a = std::is_same_v<Use, matrix_a>;
  const int rows = a ? 16 : K, cols = a ? K : 16;
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j)
      f.x[i][j] =
          element(std::is_same_v<L, row_major> ? p[i * ld + j] : p[i + j * ld]);
}

template <int K>
void load_matrix_sync(fragment<accumulator, 16, 16, K, float>& f,
                      const float* p, unsigned ld, layout_t layout) {
  if (!lane0()) return;
  check(p, ld, 4);
  if (layout != mem_row_major) std::abort();
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i][j] = p[i * ld + j];
}

template <int K>
void store_matrix_sync(float* p,
                       const fragment<accumulator, 16, 16, K, float>& f,
                       unsigned ld, layout_t layout) {
  if (!lane0()) return;
  check(p, ld, 4);
  if (layout != mem_row_major) std::abort();
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ld + j] = f.x[i][j];
}

template <int K>
void fill_fragment(fragment<accumulator, 16, 16, K, float>& f, float v) {
  for (auto& row : f.x)
    for (auto& e : row) e = v;
}

template <int K, typename A, typename B>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const A& a,
              const B& b, const fragment<accumulator, 16, 16, K, float>& c) {
  if (!lane0()) return;
  float r[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < K; ++k) s += a.x[i][k] * b.x[k][j];
      r[i][j] = s;
    }
  std::memcpy(d.x, r, sizeof(r));
}
}  // namespace nvcuda::wmma
