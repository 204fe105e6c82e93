// Direct TaylorShift attention (docs/math.md §2) on CUDA: a fused tiled kernel
// in the style of FlashAttention, and its recomputation backward.
//
// float16/bfloat16: direct_forward_mma_kernel and (f in vertex form, d, e <=
// 128) the backward's direct_backward_kv_mma_kernel and
// direct_backward_q_mma_kernel, register-resident on mma.sync (warp.cuh),
// described at the kernels. Every other case: shared-memory tiles and
// block_mma, as follows.
//
// Forward, for one (batch, head) and one tile of queries I:
//     for each key tile J:   X = Q_I K_J^T              (tensor cores)
//                            W = m ⊙ f(X)               (elementwise)
//                            O += W [V_J | 1]           (tensor cores)
//     den_I = O[:, e],  Y_I = sigma ⊙ O[:, :e] / den_I
// The ones column appended to V makes the product's last column the row sums
// of W, so the denominators need no separate reduction. f is a polynomial of
// bounded logits, so unlike softmax there is no running maximum to rescale by.
// Nothing of size M x N is ever stored: X and W exist one tile at a time.
//
// Backward. With rs_i = sigma_i / den_i, dl_i = (gY_i . y_i) / den_i:
//     dW_ij = rs_i (gY_i . v_j) - dl_i,    dX = m ⊙ dW ⊙ f'(X)
//     dV_j = sum_i w_ij rs_i gY_i
//     dK_j = sum_i dX_ij q_i,   dQ_i = sum_j dX_ij k_j
// Two kernels recompute X (and G = gY V^T) tile by tile: one per key tile
// accumulating dK, dV over query tiles, one per query tile accumulating dQ
// over key tiles. Each output element is owned by one block: deterministic,
// no atomics.
#include <torch/library.h>

#include <vector>

#include "../kernel_checks.h"
#include "common.cuh"

namespace taylorshift::cuda_kernels {

namespace {

template <typename T, typename Acc>
struct DirectArgs {
  TokenRows<T> q, k, v;
  TokenRows<T> grad_out;  // backward only
  const Acc* scalars;     // backward only: (B, H, M, 2) = (rs, dl)
  int64_t heads, queries, keys;
  int d, e, tile;
  Mask mask;
  RowValues<Acc> sigma;
  Polynomial<Acc> f;  // the weight polynomial, by value
};

struct ForwardSmem {
  size_t q, k, v, x, w, o, total;
  TS_HOST_DEVICE ForwardSmem(int tile, int d, int e, int op_bytes,
                             int acc_bytes) {
    const int dp = round16(d), ep = round16(e + 1);
    SmemCarver carver;
    q = carver.take(size_t(tile) * operand_ld(dp) * op_bytes);
    k = carver.take(size_t(tile) * operand_ld(dp) * op_bytes);
    v = carver.take(size_t(tile) * operand_ld(ep) * op_bytes);
    x = carver.take(size_t(tile) * accum_ld(tile) * acc_bytes);
    w = carver.take(size_t(tile) * operand_ld(tile) * op_bytes);
    o = carver.take(size_t(tile) * accum_ld(ep) * acc_bytes);
    total = carver.size;
  }
};

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    direct_forward_kernel(DirectArgs<T, Acc> p, T* out, Acc* den) {
  using Op = T;  // Q K^T and W V run in the input dtype
  extern __shared__ __align__(128) unsigned char smem[];
  const int tile = p.tile;
  const int dp = round16(p.d), ep = round16(p.e + 1);
  const ForwardSmem plan(tile, p.d, p.e, sizeof(Op), sizeof(Acc));
  Op* qs = reinterpret_cast<Op*>(smem + plan.q);
  Op* ks = reinterpret_cast<Op*>(smem + plan.k);
  Op* vs = reinterpret_cast<Op*>(smem + plan.v);
  Acc* xs = reinterpret_cast<Acc*>(smem + plan.x);
  Op* ws = reinterpret_cast<Op*>(smem + plan.w);
  Acc* os = reinterpret_cast<Acc*>(smem + plan.o);
  const int ld_qk = operand_ld(dp), ld_v = operand_ld(ep);
  const int ld_x = accum_ld(tile), ld_w = operand_ld(tile), ld_o = accum_ld(ep);

  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * tile;

  load_tile(qs, ld_qk, p.q, b, h, p.queries, i0, tile, dp);
  zero_tile(os, ld_o, tile, ep);
  // Causal: keys j <= i < i0 + tile only.
  const int64_t key_end = p.mask.causal ? min(p.keys, i0 + tile) : p.keys;
  for (int64_t j0 = 0; j0 < key_end; j0 += tile) {
    __syncthreads();  // the previous W V' product is done with ks, vs, ws
    load_tile(ks, ld_qk, p.k, b, h, p.keys, j0, tile, dp, &p.mask);
    for (int idx = threadIdx.x; idx < tile * ep; idx += blockDim.x) {
      const int r = idx / ep, col = idx % ep;
      const int64_t j = j0 + r;
      Acc value = 0;
      if (col < p.e) {
        const bool key = j < p.keys && p.mask.key_valid(b, j);
        value =
            key ? Num<T>::widen(p.v.row(b, h, j)[col * p.v.stride_c]) : Acc(0);
      } else if (col == p.e) {
        value = 1;  // V' = [V | 1]
      }
      vs[r * ld_v + col] = Num<Op>::narrow(value);
    }
    __syncthreads();
    block_mma<false, true>(qs, ld_qk, ks, ld_qk, xs, ld_x, tile, tile, dp,
                           false);
    __syncthreads();
    for (int idx = threadIdx.x; idx < tile * tile; idx += blockDim.x) {
      const int r = idx / tile, col = idx % tile;
      const int64_t i = i0 + r, j = j0 + col;
      Acc w = 0;
      if (i < p.queries && j < p.keys && p.mask.allowed(b, h, i, j)) {
        w = taylor_weight(xs[r * ld_x + col], p.f);
      }
      ws[r * ld_w + col] = Num<Op>::narrow(w);
    }
    __syncthreads();
    block_mma<false, false>(ws, ld_w, vs, ld_v, os, ld_o, tile, ep, tile, true);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < tile * p.e; idx += blockDim.x) {
    const int r = idx / p.e, col = idx % p.e;
    const int64_t i = i0 + r;
    if (i >= p.queries) continue;
    const Acc row_sum = os[r * ld_o + p.e];
    const Acc scale = p.sigma.at(b, h, i) * safe_reciprocal(row_sum);
    const int64_t row = bh * p.queries + i;
    out[row * p.e + col] = Num<T>::narrow(os[r * ld_o + col] * scale);
    if (col == 0) den[row] = row_sum;
  }
}

// The 16-bit forward on mma.sync, in the structure of FlashAttention-2.
// A block of 4 warps owns kRows queries, 16 kM per warp, and walks the key
// tiles of kTile (tile_rows) keys, kC keys (chunk_rows) at a time. Each warp
// keeps everything of its rows in registers: its Q fragments (loaded once), S =
// Q K^T (16 kM x kC, float), W = f(S) re-packed in place as the A operand of
// the next products (the C layout of two adjacent n8 tiles is the A layout of
// one k16 step), O += W V (16 kM x kDim, float) and the row sums W m (one
// more n8 tile, m_j = 1 for a key that exists and is not padding, else 0).
// Shared memory only stages Q and two buffers of K_J, V_J, m_J, filled by
// cp.async one tile ahead of the products. kDim is the head dim rounded up to
// 16, 32, 64 or 128 (zero-padded columns add zeros to S and produce ignored
// columns of O).
//
// kM (row_fragments) is 2 at kDim <= 32, else 1: every B fragment a warp
// loads (K, V, m) then feeds two HMMA, and the per-tile work (the next tile's
// copies, barriers) is spread over twice the HMMA; at kDim >= 64 the
// accumulators would not fit. The backward kernels hold their rows the same
// way (benchmarks/sass_report.py: sm_90, bf16, d = 32, forward 7.2 -> 4.8
// warp-instructions per HMMA). The price: half as many blocks at d <= 32 (at
// N = 1024, B H = 16, 128 blocks for 132 SMs).

// The streamed tiles' rows (key tiles of the forward and dQ, query tiles of
// dK/dV): 64, and 128 at kDim = 16, where a 64-row tile holds only 40 to 64
// HMMA against its copies, barrier and prefetch test (sass_report.py, sm_90,
// bf16, d = 16, warp-instructions per HMMA: forward 6.4 -> 5.7, dQ 6.5 ->
// 6.1, dK/dV 7.0 -> 6.7).
template <int kDim>
TS_HOST_DEVICE constexpr int tile_rows() {
  return kDim == 16 ? 128 : 64;
}

template <int kDim>
TS_HOST_DEVICE constexpr int row_fragments() {
  return kDim <= 32 ? 2 : 1;
}

// The streamed tile's rows taken at a time: all 64 with one fragment; 16 with
// two, whose S and W of 64 rows would not fit in registers beside the rest.
template <int kDim>
TS_HOST_DEVICE constexpr int chunk_rows() {
  return row_fragments<kDim>() == 1 ? 64 : 16;
}

// Rows a block owns: 4 warps of row_fragments() x 16.
template <int kDim>
TS_HOST_DEVICE constexpr int block_rows() {
  return kThreads / 32 * 16 * row_fragments<kDim>();
}

// How the 16-bit kernels apply the mask, fixed at compile time so that the
// main loop of the common cases holds no per-element test:
// - kKeyMask (no mask, key padding, causal): the key tail gets zero K and V
//   rows (RowCopies) and padded keys too: the host zeroes their rows
//   (zero_padded_keys, one elementwise pass), so that their values, NaN or
//   inf included, never reach a product (0 * NaN = NaN). The forward's row
//   sums weigh key j by the host's m_j (key_weight_rows: 0 for padded keys
//   and the tail), copied with each key tile, and the key side's stores zero
//   padded keys' gradient rows; the other products need no test, a zero key
//   row adding nothing. So no main loop reads a padding flag. A causal mask
//   needs a per-element test only on the one tile that holds the diagonal,
//   which runs outside the main loop.
// - kAttnMask: an explicit attn_mask, tested per element in the tiles that
//   mix allowed and masked elements for a warp's rows (AllowedBits, with the
//   key padding and causality folded in; tile_cover: the others run
//   unmasked, or not at all where all are masked), padded keys
//   zeroed as above, and the row sums take every key with weight 1 (the
//   masked W of a padded key or the key tail is 0).
enum class MaskMode { kKeyMask, kAttnMask };

MaskMode mask_mode(const std::optional<at::Tensor>& attn_mask) {
  return attn_mask ? MaskMode::kAttnMask : MaskMode::kKeyMask;
}

// K or V (B, H, N, d) with the rows of padded keys zeroed (MaskMode); one
// elementwise pass where the kernels' loops would test each key tile.
at::Tensor zero_padded_keys(const at::Tensor& t,
                            const std::optional<at::Tensor>& key_padding_mask) {
  if (!key_padding_mask) return t;
  return t.masked_fill(key_padding_mask->unsqueeze(1).unsqueeze(-1), 0);
}

// kAttnMask's mask as bits, so that the main loops test one bit per element
// where Mask::allowed costs a 64-bit address and a byte load per element
// (33 to 162 warp-instructions per HMMA on sm_90, sass_report.py), with the
// attn_mask, the key padding and causality folded in: bit = whether query i
// may attend key j. The mma kernels hold a 64-column tile (keys, or queries
// for the key side) of 16 rows as C fragments: lane (g, quad) has rows g and
// g + 8, columns 8 n + 2 quad + t (n = 0..7, t = 0, 1). So the table stores
// per 16 rows and 64 columns 32 words of 32 bits, word `lane` holding that
// lane's 32 elements: row g + 8 r, column 8 n + 2 quad + t at bit
// 16 r + 8 t + 7 - n. A lane loads one word per 16 rows and tile; shifted
// left by n, its four byte sign bits are the elements (r, t) of n8 tile n,
// which mask_pairs turns into masks of packed pairs. Per table the words run
// 16-row group by group and then tile by tile (tile w of group G at
// 32 (w padded_rows / 16 + G)), so a lane finds its words of every tile at
// fixed offsets from one pointer; padded_rows (the rows rounded up to
// kPaddedRows, a multiple of every block's rows, with all bits 0) spares the
// kernels a bounds test. The table broadcasts over b and h where the mask
// does (stride 0).
constexpr int kPaddedRows = 128;

struct AllowedBits {
  const uint32_t* words = nullptr;
  int64_t stride_b = 0, stride_h = 0, padded_rows = 0;
  // The word of tile 0 for lane `lane` of the 16 rows from row0 (a multiple
  // of 16); tile w's at [tile_stride() w].
  __device__ __forceinline__ const uint32_t* lane_words(int64_t b, int64_t h,
                                                        int64_t row0,
                                                        int lane) const {
    return words + b * stride_b + h * stride_h + 2 * row0 + lane;
  }
  // 32 bits (a table of 2^31 words per tile is 2^30 rows): the offset of a
  // tile is one wide multiply-add.
  __device__ __forceinline__ int tile_stride() const {
    return static_cast<int>(2 * padded_rows);
  }
};

// Words of the table built per warp: their loads issue together, and the
// emulation launches a 32nd of the blocks one word per warp would take.
constexpr int kWordsPerWarp = 8;

// Fills the (tables_b, tables_h, row_words, padded_rows / 16, 32) table of
// 32-bit words two at a time: a warp per kWordsPerWarp consecutive pairs,
// lane l testing the elements of bits l and 32 + l of the pair, whose words
// belong to lanes (slots) 2 k and 2 k + 1 of their 16 rows, __ballot_sync
// gathering the bits. `by_key`: rows are keys and columns queries (the
// key-side backward reads S^T).
__global__ void __launch_bounds__(kThreads)
    pack_allowed_kernel(Mask mask, uint64_t* pairs, int64_t tables_h,
                        int64_t rows, int64_t padded_rows, int64_t cols,
                        int64_t row_words, int64_t total_pairs, bool by_key) {
  const int lane = threadIdx.x % 32;
  const int64_t first =
      (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32 *
      kWordsPerWarp;
  uint64_t packed[kWordsPerWarp];
#pragma unroll
  for (int n = 0; n < kWordsPerWarp; ++n) {
    const int64_t w = first + n;  // warp-uniform, as __ballot_sync needs
    // pair k of 16 rows from row0, tile col_word
    const int64_t k = w % 16, row0 = w / 16 * 16 % padded_rows;
    const int64_t col_word = w / padded_rows % row_words;
    const int64_t table = w / padded_rows / row_words;
    const int64_t b = table / tables_h, h = table % tables_h;
    uint32_t half[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      // bit 16 r + 8 t + 7 - n8 of the word of slot g * 4 + quad
      const int slot = 2 * k + s, g = slot / 4, quad = slot % 4;
      const int r = lane / 16, t = lane / 8 % 2, n8 = 7 - lane % 8;
      const int64_t row = row0 + g + 8 * r;
      const int64_t col = 64 * col_word + 8 * n8 + 2 * quad + t;
      const int64_t i = by_key ? col : row, j = by_key ? row : col;
      half[s] = __ballot_sync(0xffffffffu, w < total_pairs && row < rows &&
                                               col < cols &&
                                               mask.allowed(b, h, i, j));
    }
    packed[n] = half[0] | static_cast<uint64_t>(half[1]) << 32;
  }
#pragma unroll
  for (int n = 0; n < kWordsPerWarp; ++n)
    if (lane == n && first + n < total_pairs) pairs[first + n] = packed[n];
}

// The table of `rows` x `cols` (queries x keys, or keys x queries `by_key`)
// for the mask; `storage` keeps it alive.
AllowedBits allowed_bits(const Mask& mask, const at::Tensor& q, int64_t rows,
                         int64_t cols, bool by_key, at::Tensor& storage) {
  // One table for every b (h) where neither the attn_mask nor the key
  // padding depends on it.
  const int64_t tables_b =
      mask.am_stride_b == 0 && mask.key_padding == nullptr ? 1 : q.size(0);
  const int64_t tables_h = mask.am_stride_h == 0 ? 1 : q.size(1);
  // 64-column groups, an even count: the kernels' tiles at d = 16 read two
  // (tile_rows), and the last group's missing columns are 0 bits.
  const int64_t row_words = (cols + 127) / 128 * 2;
  AllowedBits bits;
  bits.padded_rows = (rows + kPaddedRows - 1) / kPaddedRows * kPaddedRows;
  // a pair of 32-bit words per row and 64 columns
  const int64_t table_pairs = row_words * bits.padded_rows;
  bits.stride_h = tables_h == 1 ? 0 : 2 * table_pairs;
  bits.stride_b = tables_b == 1 ? 0 : 2 * tables_h * table_pairs;
  const int64_t total = tables_b * tables_h * table_pairs;
  storage = at::empty({total}, q.options().dtype(at::kLong));
  bits.words = reinterpret_cast<const uint32_t*>(storage.data_ptr<int64_t>());
  if (total == 0) return bits;
  constexpr int64_t kWordsPerBlock = kThreads / 32 * kWordsPerWarp;
  pack_allowed_kernel<<<(total + kWordsPerBlock - 1) / kWordsPerBlock, kThreads,
                        0, at::cuda::getCurrentCUDAStream()>>>(
      mask, reinterpret_cast<uint64_t*>(storage.data_ptr<int64_t>()), tables_h,
      rows, bits.padded_rows, cols, row_words, total, by_key);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bits;
}

// The weight polynomial in the mma kernels' element loops. Order 2 (the
// paper's, every default) runs in vertex form:
//   f(x)  = a x^2 + b x + c = a ((x + beta)^2 + gamma),
//   f'(x) = 2 a (x + beta),  beta = b / (2 a),  gamma = c / a - beta^2.
// The kernels start S's accumulators at beta instead of 0 (one constant C
// operand shared by every mma: no instruction), so s = x + beta comes out of
// the product, f(x) / a = s s + gamma is one multiply-add where Horner's rule
// takes two, and f'(x) / (2 a) = s takes none where Horner's takes one. The
// factor a goes where it costs nothing: the forward's output divides by its
// row sum, which cancels a (den = a * the row sum of f / a), and the
// backward folds 2 a into its per-row factors.
//
// It applies where a, beta and gamma are moderate (vertex_form): there s's
// rounding, 2^-24 |s| in float, costs f / a an absolute 2^-23 s^2, within a
// small factor of Horner's 2^-24 (|a| x^2 + |b x| + |c|) / |a|, and f / a
// stays within 2^6 of f, so it fits in float16 where f does. Other
// coefficients and orders take Horner's rule, one multiply-add per order,
// over a compile-time number of steps: f padded with leading zeros
// (Polynomial::padded) to the smallest of kHornerOrders at or above its own
// order, exact, and without the exits of a run-time order, which in these
// loops cost 2 to 2.5 times the instructions per HMMA (sm_90, bf16,
// benchmarks/sass_report.py: d = 16 39.5 -> 16.6, d = 64 14.1 -> 7.5). So
// the forward is compiled for the vertex form and each Horner order, and
// the coefficients pick one at launch; the backward mma kernels take the
// vertex form only (other polynomials run the shared-memory kernels,
// direct_backward_cuda).
struct VertexForm {
  float a, beta, gamma;
};

// The forward's compiled Horner orders: order 1 (linear attention) as is,
// 2 to 4 (Taylor orders 3 and 4, order 2 outside the vertex form) padded to
// 4, the rest to kMaxOrder. Each costs its order in multiply-adds an
// element, which at d = 16 outweigh the element's share of the products
// (sass_report.py: order 1 as the vertex form, 8 three times its
// instructions per HMMA).
constexpr int kHornerOrders[] = {1, 4, kMaxOrder};

// The smallest at or above `order` (1 to kMaxOrder: polynomial_of checks).
int horner_order(int order) {
  for (const int compiled : kHornerOrders)
    if (order <= compiled) return compiled;
  return kMaxOrder;
}

// f's vertex form where the mma kernels may take it (above), else nullopt.
inline std::optional<VertexForm> vertex_form(const Coefficients& f) {
  if (f.order != 2 || f.of_degree(2) == 0) return std::nullopt;
  const double a = f.of_degree(2), beta = f.of_degree(1) / (2 * a),
               gamma = f.of_degree(0) / a - beta * beta;
  const bool moderate = std::abs(a) >= 0x1p-6 && std::abs(a) <= 0x1p6 &&
                        std::abs(beta) <= 16 && std::abs(gamma) <= 256;
  if (!moderate) return std::nullopt;
  return VertexForm{static_cast<float>(a), static_cast<float>(beta),
                    static_cast<float>(gamma)};
}

// Element i of an n8 tile of S, where kHorner == 0 (the vertex form) starts
// it at beta: the weight f(x) / a in vertex form, else f(x) by Horner's rule
// of order kHorner (f padded to it, mma_args).
template <int kHorner>
__device__ __forceinline__ float mma_weight(float s, const VertexForm& vertex,
                                            const Polynomial<float>& f) {
  if constexpr (kHorner == 0) {
    return s * s + vertex.gamma;
  } else {
    return taylor_weight(s, f, std::integral_constant<int, kHorner>());
  }
}

// Every element of the C-layout tiles `c` set to `value` (S's start).
template <int kM, int kN>
__device__ __forceinline__ void fill(float (&c)[kM][kN][4], float value) {
#pragma unroll
  for (int f = 0; f < kM; ++f)
#pragma unroll
    for (int n = 0; n < kN; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[f][n][i] = value;
}

template <typename T>
struct MmaArgs {
  TokenRows<T> q, k, v;
  // backward only (mma_backward): gY' = a rs_i gY_i (B, H, M, e) and the
  // shifts -a dl_i (B, H, M)
  TokenRows<T> scaled_grad_out;
  const float* shifts;
  int64_t heads, queries, keys;
  int d, e;
  Mask mask;
  // kAttnMask only: queries x keys (forward, dQ) and keys x queries (dK, dV).
  AllowedBits allowed, allowed_by_key;
  RowValues<float> sigma;  // forward only
  Polynomial<float> f;  // the weight polynomial padded to kMaxOrder, by value
  VertexForm vertex;    // f's vertex form (vertex_form), else a = 0
  // kKeyMask's forward: m_j (key_weight_rows), batch b at key_weights +
  // b key_weights_batch, zeros from key_weights_stride on
  const T* key_weights;
  int64_t key_weights_stride, key_weights_batch;
};

// This lane's words of a streamed tile of the allowed table (kAttnMask),
// one per fragment f (rows 16 f .. 16 f + 15 from `words`, its
// AllowedBits::lane_words) and 64 columns w of the tile: bits[f][w].
template <int kM, int kGroups>
__device__ __forceinline__ void load_tile_bits(uint32_t (&bits)[kM][kGroups],
                                               const uint32_t* words,
                                               const AllowedBits& table,
                                               int tile) {
  const uint32_t* at =
      words + static_cast<int64_t>(tile) * kGroups * table.tile_stride();
#pragma unroll
  for (int f = 0; f < kM; ++f)
#pragma unroll
    for (int w = 0; w < kGroups; ++w)
      bits[f][w] = at[w * table.tile_stride() + 32 * f];
}

// The masks of the A fragments of columns kC c .. kC c + kC - 1 of a tile
// (warp::to_a of kC / 8 n8 tiles of C): register j of k-step kk packs the
// elements (row g + 8 (j % 2), n8 tile kC c / 8 + 2 kk + j / 2, t = 0, 1),
// whose bits 16 r + 8 t + 7 - n sit, after a left shift by n, at the sign
// bits of bytes 2 r + t: warp::byte_signs spreads them over the 16-bit halves
// (0xffff keeps an element, 0 zeroes it), and an AND masks both at once.
template <int kC, int kM, int kGroups>
__device__ __forceinline__ void pair_masks(uint32_t (&masks)[kM][kC / 16][4],
                                           const uint32_t (&bits)[kM][kGroups],
                                           int c) {
  const int group = kC * c / 64, n0 = kC * c % 64 / 8;  // of column kC c
#pragma unroll
  for (int f = 0; f < kM; ++f) {
#pragma unroll
    for (int kk = 0; kk < kC / 16; ++kk) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t shifted = bits[f][group] << (n0 + 2 * kk + j / 2);
        masks[f][kk][j] = j % 2 == 0 ? warp::byte_signs<0x1100>(shifted)
                                     : warp::byte_signs<0x3322>(shifted);
      }
    }
  }
}

template <int kC, int kM>
__device__ __forceinline__ void mask_pairs(
    uint32_t (&a)[kM][kC / 16][4], const uint32_t (&masks)[kM][kC / 16][4]) {
#pragma unroll
  for (int f = 0; f < kM; ++f)
#pragma unroll
    for (int kk = 0; kk < kC / 16; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) a[f][kk][j] &= masks[f][kk][j];
}

// How a streamed tile meets this warp's rows (kAttnMask), from the lanes'
// words of the allowed table: no element allowed (the warp skips the tile's
// products), every element allowed (the products without the per-element
// masks), or mixed. A block mask, or causality or padding passed as an
// attn_mask, leaves most tiles one of the first two. Warp-uniform (ballots).
enum class TileCover { kNone, kAll, kMixed };

template <int kM, int kGroups>
__device__ __forceinline__ TileCover
tile_cover(const uint32_t (&bits)[kM][kGroups]) {
  uint32_t any = 0, all = ~0u;
#pragma unroll
  for (int f = 0; f < kM; ++f)
#pragma unroll
    for (int w = 0; w < kGroups; ++w) {
      any |= bits[f][w];
      all &= bits[f][w];
    }
  if (__ballot_sync(0xffffffffu, any != 0) == 0) return TileCover::kNone;
  return __ballot_sync(0xffffffffu, all != ~0u) == 0 ? TileCover::kAll
                                                     : TileCover::kMixed;
}

// A tile's products, products(masked) with masked a std::bool_constant
// telling whether they mask each element by `bits`: with kAttnMask by the
// tile's cover (tile_cover; none: no products), otherwise unmasked.
template <MaskMode kMode, int kM, int kGroups, typename Products>
__device__ __forceinline__ void tile_products(
    const uint32_t (&bits)[kM][kGroups], const Products& products) {
  if constexpr (kMode == MaskMode::kAttnMask) {
    switch (tile_cover(bits)) {
      case TileCover::kNone:
        return;
      case TileCover::kAll:
        return products(std::false_type());
      case TileCover::kMixed:
        return products(std::true_type());
    }
  } else {
    products(std::false_type());
  }
}

// Runs step(tile, elementwise) over the `tiles` key tiles of the query block
// [i0, i0 + kRows), elementwise a std::bool_constant telling whether the tile
// holds the causal diagonal, tested per element (an attn_mask is tested by
// tile_products instead). With causal and no attn_mask, every key of the
// tiles before i0 precedes every query of the block, so they run without
// tests; the (at most kRows / kTile) tiles from i0 on hold the diagonal and
// run with them, unrolled, outside the main loop.
template <MaskMode kMode, int kRows, int kTile, typename T, typename Step>
__device__ __forceinline__ void walk_key_tiles(const MmaArgs<T>& p, int64_t i0,
                                               int tiles, const Step& step) {
  static_assert(kRows % kTile == 0);
  const bool diagonal = kMode != MaskMode::kAttnMask && p.mask.causal;
  const int full_tiles =
      diagonal ? min(tiles, static_cast<int>(i0 / kTile)) : tiles;
  for (int tile = 0; tile < full_tiles; ++tile) step(tile, std::false_type());
  if (diagonal) {
#pragma unroll
    for (int t = 0; t < kRows / kTile; ++t)
      if (full_tiles + t < tiles) step(full_tiles + t, std::true_type());
  }
}

template <int kDim>
constexpr size_t mma_forward_smem() {
  // Q, 2 x K, 2 x V, 2 x m
  return size_t(block_rows<kDim>() + 4 * tile_rows<kDim>()) * (kDim + 8) * 2 +
         2 * tile_rows<kDim>() * 2;
}

// kHorner: 0 for f's vertex form, else the order of Horner's rule
// (kHornerOrders).
template <typename T, int kDim, MaskMode kMode, int kHorner>
__global__ void __launch_bounds__(kThreads)
    direct_forward_mma_kernel(MmaArgs<T> p, T* out, float* den) {
  constexpr int kM = row_fragments<kDim>(), kRows = block_rows<kDim>();
  constexpr int kC = chunk_rows<kDim>(), kTile = tile_rows<kDim>();
  constexpr int ld = kDim + 8, kStage = kTile * ld;
  // On sm_90a, from d = 64 on, the products of a mask without an attn_mask
  // run on wgmma (an attn_mask's tile cover differs from warp to warp, and
  // wgmma needs the whole warpgroup), with the key tiles in core matrices: B
  // straight from them, K-major for S = Q K^T, MN-major for O += W V. Below
  // d = 64 a chunk is 16 keys: S's product is too narrow to amortise the
  // fence, commit and wait that W = f(S) needs after it.
  constexpr bool kWgmma =
      warp::kWgmma && kMode == MaskMode::kKeyMask && kDim >= 64;
  constexpr TileLayout kLayout =
      kWgmma ? TileLayout::kCoreMatrices : TileLayout::kPadded;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = qs + kRows * ld;  // two stages
  T* vs = ks + 2 * kStage;  // two stages
  T* ms = vs + 2 * kStage;  // two stages of m_j
  const int lane = threadIdx.x % 32, warp_row = threadIdx.x / 32 * 16 * kM;
  const int g = lane / 4, quad = lane % 4;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRows;
  // Causal: keys j <= i < i0 + kRows only.
  const int64_t key_end = p.mask.key_limit(i0 + kRows, p.keys);
  const int tiles = static_cast<int>((key_end + kTile - 1) / kTile);

  // Stage `stage` <- the next key tile: K, V and (kKeyMask) m.
  KeyCopies<kDim, kTile, T, kLayout> keys(p.k, p.v, b, h, 0, p.keys, nullptr);
  const auto load_keys = [&](int stage) {
    keys.copy(ks + stage * kStage, vs + stage * kStage,
              static_cast<T*>(nullptr));
    if constexpr (kMode == MaskMode::kKeyMask) {
      if (threadIdx.x < kTile / 8) {
        const int64_t j = keys.t0 + 8 * threadIdx.x;
        const bool valid = j < p.key_weights_stride;
        warp::cp_async_16(
            ms + stage * kTile + 8 * threadIdx.x,
            valid ? p.key_weights + b * p.key_weights_batch + j : p.key_weights,
            valid);
      }
    }
    keys.advance();
  };
  load_rows<kDim, kRows>(qs, p.q, b, h, i0, p.queries);
  warp::cp_async_commit();
  if (tiles > 0) load_keys(0);
  warp::cp_async_commit();
  warp::cp_async_wait<1>();  // Q has landed
  __syncthreads();
  uint32_t qf[kM][kDim / 16][4];  // A fragments of this warp's query rows
  warp::load_a<kDim, ld>(qf, qs + warp_row * ld, lane);
  // O and the row sums W m of W = f(S) (f / a in vertex form), n8 tiles in the
  // C layout; every column of W m holds the sums of rows g ([0], [1]) and
  // g + 8 ([2], [3])
  float o[kM][kDim / 8][4] = {};
  float row_sum[kM][4] = {};
  const float s_start = kHorner == 0 ? p.vertex.beta : 0.f;
  const uint32_t* mask_words =
      kMode == MaskMode::kAttnMask
          ? p.allowed.lane_words(b, h, i0 + warp_row, lane)
          : nullptr;

  // One key tile, kC keys at a time. Element i of n8 tile n of fragment f's
  // S over keys kC c .. kC c + kC - 1 is (row 16 f + g + 8 (i / 2), key
  // kC c + 8 n + 2 quad + i % 2). Without an attn_mask only kElementwise
  // tiles, the causal diagonal's, test the mask per element.
  const auto step = [&](int tile, auto elementwise) {
    constexpr bool kElementwise = decltype(elementwise)::value;
    const int stage = tile % 2;
    if (tile + 1 < tiles) {  // prefetch the next tile into the other stage
      load_keys(1 - stage);
      warp::cp_async_commit();
      warp::cp_async_wait<1>();
    } else {
      warp::cp_async_wait<0>();
    }
    __syncthreads();
    const T* kt = ks + stage * kStage;
    const T* vt = vs + stage * kStage;
    [[maybe_unused]] const T* mt = ms + stage * kTile;  // not kAttnMask
    const int64_t j0 = static_cast<int64_t>(tile) * kTile;
    [[maybe_unused]] uint32_t bits[kM][kTile / 64];
    if constexpr (kMode == MaskMode::kAttnMask)
      load_tile_bits(bits, mask_words, p.allowed, tile);
    tile_products<kMode>(bits, [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
#pragma unroll
      for (int c = 0; c < kTile / kC; ++c) {
        float s[kM][kC / 8][4];  // S = Q K^T (+ beta)
        fill(s, s_start);
        if constexpr (kWgmma) {
          // Keys kC c.. of the tile, k-step kk 2 core matrices on.
          const uint64_t keys_desc = warp::matrix_descriptor(
              warp::shared_address(kt + kC * c * kDim), 128, 16 * kDim);
          warp::wgmma_fence();
#pragma unroll
          for (int f = 0; f < kM; ++f)
#pragma unroll
            for (int kk = 0; kk < kDim / 16; ++kk)
              warp::wgmma_rs<T, kC, warp::Major::kK>(s[f], qf[f][kk],
                                                     keys_desc + 16 * kk);
          warp::wgmma_commit();
          warp::wgmma_wait<0>();  // W = f(S) needs S
        } else {
          warp::mma_abt<T, kDim, kC, ld>(s, qf, kt + kC * c * ld, lane);
        }
#pragma unroll
        for (int f = 0; f < kM; ++f) {
#pragma unroll
          for (int n = 0; n < kC / 8; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              float w = mma_weight<kHorner>(s[f][n][i], p.vertex, p.f);
              if constexpr (kMode != MaskMode::kAttnMask &&
                            kElementwise) {  // the causal diagonal
                const int64_t row = i0 + warp_row + 16 * f + g + 8 * (i / 2);
                const int64_t j = j0 + kC * c + 8 * n + 2 * quad + i % 2;
                if (j > row) w = 0.f;
              }
              s[f][n][i] = w;
            }
          }
        }
        uint32_t wf[kM][kC / 16][4];
#pragma unroll
        for (int f = 0; f < kM; ++f) warp::to_a<T, kC>(wf[f], s[f]);
        if constexpr (kMasked) {
          uint32_t masks[kM][kC / 16][4];
          pair_masks<kC>(masks, bits, c);
          mask_pairs<kC>(wf, masks);
        }
        if constexpr (kWgmma) {
          // Keys kC c + 16 kk.. of the tile: 2 kk row groups further on.
          const uint64_t values_desc = warp::matrix_descriptor(
              warp::shared_address(vt + kC * c * kDim), 16 * kDim, 128);
          warp::wgmma_fence();
#pragma unroll
          for (int f = 0; f < kM; ++f)
#pragma unroll
            for (int kk = 0; kk < kC / 16; ++kk)
              warp::wgmma_rs<T, kDim, warp::Major::kMN>(
                  o[f], wf[f][kk], values_desc + 2 * kDim * kk);
          warp::wgmma_commit();  // lands by the next S's wait
        } else {
          warp::mma_ab<T, kC, kDim, ld>(o, wf, vt + kC * c * ld, lane);
        }
        if constexpr (kMode == MaskMode::kAttnMask) {
          warp::mma_row_sums_ones<T, kC>(row_sum, wf);
        } else {
          warp::mma_row_sums<T, kC>(row_sum, wf, mt + kC * c, lane);
        }
      }
    });
    if constexpr (kWgmma) warp::wgmma_wait<0>();  // the stage's last products
    __syncthreads();  // every warp is done with this stage before its refill
  };
  walk_key_tiles<kMode, kRows, kTile>(p, i0, tiles, step);
  warp::cp_async_wait<0>();  // no copy outlives the block (keys == 0)

#pragma unroll
  for (int f = 0; f < kM; ++f) {
    const int64_t row0 = i0 + warp_row + 16 * f;
    float scale[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row0 + g + 8 * r;
      const float sum = row_sum[f][2 * r];  // den / a in vertex form
      scale[r] =
          row < p.queries ? p.sigma.at(b, h, row) * safe_reciprocal(sum) : 0.f;
      if (quad == 0 && row < p.queries)
        den[bh * p.queries + row] = kHorner == 0 ? p.vertex.a * sum : sum;
    }
    store_rows<T, kDim>(out + bh * p.queries * p.e, o[f], row0, p.queries, p.e,
                        scale, lane);
  }
}

template <typename T>
MmaArgs<T> mma_args(const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, int64_t d, int64_t e, const Mask& mask,
                    const Coefficients& f) {
  MmaArgs<T> args{};
  args.q = token_rows<T>(q, d);
  args.k = token_rows<T>(k, d);
  args.v = token_rows<T>(v, e);
  args.heads = q.size(1);
  args.queries = q.size(2);
  args.keys = k.size(2);
  args.d = static_cast<int>(d);
  args.e = static_cast<int>(e);
  args.mask = mask;
  args.f = f.cast<float>().padded(horner_order(f.order));
  if (const auto vertex = vertex_form(f)) args.vertex = *vertex;
  return args;
}

// Launches the 16-bit forward for the smallest compiled kDim >= d, e.
template <typename T, int kDim, MaskMode kMode>
void launch_mma_forward(const MmaArgs<T>& args, int64_t bh, T* out,
                        float* den) {
  const auto kernel =
      args.vertex.a != 0  ? direct_forward_mma_kernel<T, kDim, kMode, 0>
      : args.f.order == 1 ? direct_forward_mma_kernel<T, kDim, kMode, 1>
      : args.f.order == 4
          ? direct_forward_mma_kernel<T, kDim, kMode, 4>
          : direct_forward_mma_kernel<T, kDim, kMode, kMaxOrder>;
  constexpr size_t bytes = mma_forward_smem<kDim>();
  allow_shared_memory(kernel, bytes);
  const dim3 grid((args.queries + block_rows<kDim>() - 1) / block_rows<kDim>(),
                  bh);
  kernel<<<grid, kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(args, out,
                                                                      den);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kDim>
void launch_mma_forward(const MmaArgs<T>& args, MaskMode mode, int64_t bh,
                        T* out, float* den) {
  switch (mode) {
    case MaskMode::kKeyMask:
      return launch_mma_forward<T, kDim, MaskMode::kKeyMask>(args, bh, out,
                                                             den);
    case MaskMode::kAttnMask:
      return launch_mma_forward<T, kDim, MaskMode::kAttnMask>(args, bh, out,
                                                              den);
  }
}

// kKeyMask's key weights m_j in `dtype`: !key_padding_mask[b, j] (B, N), or
// one row of ones (1, N) shared by every batch, with zeros after N up to a
// multiple of 8, so that a key tile's weights are whole 16-byte copies.
at::Tensor key_weight_rows(const std::optional<at::Tensor>& key_padding_mask,
                           int64_t keys, const at::TensorOptions& options) {
  const at::Tensor m = key_padding_mask
                           ? key_padding_mask->logical_not().to(options)
                           : at::ones({1, keys}, options);
  return at::constant_pad_nd(m, {0, (8 - keys % 8) % 8}).contiguous();
}

template <typename T>
void mma_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const Mask& mask, MaskMode mode,
                 const std::optional<at::Tensor>& key_padding_mask,
                 const at::Tensor& sigma, const Coefficients& f,
                 at::Tensor& out, at::Tensor& den) {
  const int64_t d = q.size(3), e = v.size(3), dim = std::max(d, e);
  // Kept alive until the launches: the arguments point into them.
  const at::Tensor qr = cp_async_rows(q), kr = cp_async_rows(k),
                   vr = cp_async_rows(v);
  MmaArgs<T> args = mma_args<T>(qr, kr, vr, d, e, mask, f);
  args.sigma = row_values<float>(sigma);
  at::Tensor allowed, key_weights;
  if (mode == MaskMode::kAttnMask)
    args.allowed = allowed_bits(mask, q, q.size(2), k.size(2), false, allowed);
  if (mode == MaskMode::kKeyMask) {
    key_weights = key_weight_rows(key_padding_mask, k.size(2), q.options());
    args.key_weights = reinterpret_cast<const T*>(key_weights.data_ptr());
    args.key_weights_stride = key_weights.size(1);
    args.key_weights_batch = key_weights.size(0) == 1 ? 0 : key_weights.size(1);
  }
  const int64_t bh = q.size(0) * q.size(1);
  T* o = reinterpret_cast<T*>(out.data_ptr());
  float* dn = den.data_ptr<float>();
  if (dim <= 16) {
    launch_mma_forward<T, 16>(args, mode, bh, o, dn);
  } else if (dim <= 32) {
    launch_mma_forward<T, 32>(args, mode, bh, o, dn);
  } else if (dim <= 64) {
    launch_mma_forward<T, 64>(args, mode, bh, o, dn);
  } else {
    launch_mma_forward<T, 128>(args, mode, bh, o, dn);
  }
}

// The bfloat16 backward on mma.sync (math.md §2 backward, the same
// recomputation as the shared-memory kernels below), two kernels whose warps
// own 16 kM rows each (kM = row_fragments, as in the forward) and keep every
// product in registers:
// * key side, a block per block_rows keys, looping over query tiles of
//   tile_rows, kC queries (backward_chunk_rows) at a time:
//     S^T = K Q^T, G^T = V gY^T             (16 kM keys x kC queries per warp)
//     P^T = m ⊙ f(S^T) rs,  dX^T = m ⊙ (rs G^T - dl) ⊙ f'(S^T)
//     dV += P^T gY,  dK += dX^T Q            (P^T, dX^T re-packed as A)
// * query side, a block per block_rows queries, looping over key tiles of
//   tile_rows, kC keys at a time:
//     S = Q K^T, G = gY V^T,  dX = m ⊙ (rs G - dl) ⊙ f'(S),  dQ += dX K.
// Both fold a rs into gY's rows beforehand (gY' = a rs gY, mma_backward) and
// start G's products at the rows' shifts -a dl, so that an element of dX / 2
// is one multiply (load_query_factors).
// Query tiles (Q, gY' and their shifts) or key tiles (K, V) are
// double-buffered by cp.async. f in vertex form only (vertex_form): other
// polynomials would cost the main loop its registers and take the
// shared-memory kernels. At
// d = 128 the key side's accumulators dK and dV alone take 128 registers a
// thread, so there its warps re-read their K and V fragments from shared memory
// one k-step at a time (warp::mma_abt_rows: 16 more ldmatrix.x4 per 64 HMMA)
// instead of holding them, and both kernels take 16 rows a chunk
// (backward_chunk_rows).
//
// The derived operands are rounded to the input dtype, float16 included
// (where the shared-memory kernels use TF32, common.cuh), because their range
// does not grow with N. The key side's P'^T = f / a is at most (tau + |beta|)^2
// + |gamma|, and its gY' = a rs gY is at most a |gY_i| / (sqrt(N_i d) min f):
// it shrinks with N as a typical dX_ij = 2 (gY'_i . v_j - a dl_i) s_ij does,
// so in float16 both leave the normal range at about the same |gY|. With
// f >= 0, den_i = sum_j m_j w_ij, and den_i >= N_i min f,
// |y_i| <= sigma_i max_j |v_j| and |f'(x)| <= 2 a |x| + |b| on |x| <= tau:
//   |dX_ij| <= 2 (2 a tau + |b|) |gY_i| max_j |v_j| / (sqrt(d) min f),
// that is 4 (1 + tau) |gY_i| max|v_j| / sqrt(d) for the paper's f, so dX
// overflows float16 only where |gY_i| |v_j| nears 65504 sqrt(d) / (4 (1 +
// tau)), gradients that a loss scaler backs off from anyway. FlashAttention
// keeps P and dS in float16 on the same grounds. (The efficient backward's dS
// is a sum over N tokens and does need float's range.)

// The streamed tile's rows taken at a time in the backward: as the forward,
// but 16 at d = 128, where S and dX (or S^T and dX^T) of 64 rows would not fit
// in registers beside the 128-column accumulators.
template <int kDim>
TS_HOST_DEVICE constexpr int backward_chunk_rows() {
  return kDim == 128 ? 16 : chunk_rows<kDim>();
}

// The key side's per-query shifts (load_query_factors), floats per stage.
template <int kDim>
TS_HOST_DEVICE constexpr int query_factor_floats() {
  return 2 * tile_rows<kDim>();
}

template <int kDim>
constexpr size_t mma_backward_smem() {
  // The block's rows (key side: K, V; query side: Q, gY), two stages of two
  // tiles (key side: Q, a rs gY; query side: K, V) and two stages of the key
  // side's query shifts.
  return size_t(2 * block_rows<kDim>() + 4 * tile_rows<kDim>()) * (kDim + 8) *
             2 +
         2 * query_factor_floats<kDim>() * sizeof(float);
}

// The key side's element step, with rs, dl of query i and f in vertex form
// (vertex_form; s = x + beta is S^T's element, started at beta):
//   P^T  = rs f(x)              = (a rs) (s s + gamma)
//   dX^T = (rs G^T - dl) f'(x)  = 2 (a rs G^T - a dl) s
// The factor a rs of query i goes into its row of gY before the kernel
// (mma_backward: gY' = a rs gY, rounded to T once), so that
//   dV = P gY = (s s + gamma) gY',   G'^T = V gY'^T = a rs G^T,
// and an element costs two instructions, P'^T = s s + gamma and dX^T / 2 =
// (G'^T - a dl) s, with no factor of the query in the loop: the 2 goes to
// dK's store, and G'^T - a dl is G'^T's product accumulated from -a dl
// instead of 0. From p.shifts (-a dl), for queries [i0, i0 +
// kTile), zeros past the queries (whose gY' rows are zeros too, so that they
// contribute nothing), dst holds -a dl at [4 (i / 2) + i % 2] and [.. + 2]:
// the start of one n8 tile of G'^T in the C layout (lane columns 2 quad,
// 2 quad + 1 in rows g and g + 8) is one 16-byte load.
template <int kTile, typename T>
__device__ __forceinline__ void load_query_factors(float* dst,
                                                   const MmaArgs<T>& p,
                                                   int64_t bh, int64_t i0) {
  static_assert(kTile <= kThreads);
  const int i = threadIdx.x;
  if (i < kTile) {
    const bool valid = i0 + i < p.queries;
    const float shift = valid ? p.shifts[bh * p.queries + i0 + i] : 0.f;
    dst[4 * (i / 2) + i % 2] = shift;
    dst[4 * (i / 2) + 2 + i % 2] = shift;
  }
}

// Key side. Padded keys' K and V rows are zeros (zero_padded_keys: no NaN or
// inf from them) and their dK, dV rows are stored as zeros; padded query rows
// have zero Q, gY' and shifts, so they contribute nothing.
template <typename T, int kDim, MaskMode kMode>
__global__ void __launch_bounds__(kThreads)
    direct_backward_kv_mma_kernel(MmaArgs<T> p, T* grad_k, T* grad_v) {
  constexpr int kM = row_fragments<kDim>(), kBlockKeys = block_rows<kDim>();
  constexpr int kC = backward_chunk_rows<kDim>();
  constexpr bool kHoldKeys = kDim <= 64;    // K, V fragments held in registers
  constexpr int kTile = tile_rows<kDim>();  // queries a tile
  constexpr int kFactors = query_factor_floats<kDim>();
  constexpr int ld = kDim + 8, kStage = kTile * ld;
  extern __shared__ __align__(128) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + kBlockKeys * ld;
  T* qs = vs + kBlockKeys * ld;                                // two stages
  T* gs = qs + 2 * kStage;                                     // two stages
  float* factors = reinterpret_cast<float*>(gs + 2 * kStage);  // two stages
  const int lane = threadIdx.x % 32, warp_row = threadIdx.x / 32 * 16 * kM;
  const int g = lane / 4, quad = lane % 4;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kBlockKeys;
  // Causal: only queries i >= j >= j0 see these keys.
  const int64_t first = p.mask.causal ? j0 : 0;
  const int tiles =
      p.queries > first
          ? static_cast<int>((p.queries - first + kTile - 1) / kTile)
          : 0;

  load_rows<kDim, kBlockKeys>(ks, p.k, b, h, j0, p.keys);
  load_rows<kDim, kBlockKeys>(vs, p.v, b, h, j0, p.keys);
  warp::cp_async_commit();
  // Stage `stage` <- the next query tile at i0: Q, gY' = a rs gY and -a dl.
  RowCopies<kDim, kTile, T> q_rows(p.q, b, h, first, p.queries),
      g_rows(p.scaled_grad_out, b, h, first, p.queries);
  const auto load_queries = [&](int stage, int64_t i0) {
    q_rows.copy(qs + stage * kStage);
    g_rows.copy(gs + stage * kStage);
    q_rows.advance();
    g_rows.advance();
    load_query_factors<kTile>(factors + stage * kFactors, p, bh, i0);
  };
  if (tiles > 0) load_queries(0, first);
  warp::cp_async_commit();

  warp::cp_async_wait<1>();  // K and V have landed
  __syncthreads();
  // This warp's keys (d <= 64; at 128 mma_abt_rows re-reads them).
  uint32_t kf[kM][kDim / 16][4], vf[kM][kDim / 16][4];
  if constexpr (kHoldKeys) {
    warp::load_a<kDim, ld>(kf, ks + warp_row * ld, lane);
    warp::load_a<kDim, ld>(vf, vs + warp_row * ld, lane);
  }
  float dk[kM][kDim / 8][4] = {}, dv[kM][kDim / 8][4] = {};
  const uint32_t* mask_words =
      kMode == MaskMode::kAttnMask
          ? p.allowed_by_key.lane_words(b, h, j0 + warp_row, lane) +
                first / 64 * p.allowed_by_key.tile_stride()
          : nullptr;

  // One query tile, kC queries at a time. Element i of n8 tile n of fragment
  // f over queries kC c .. kC c + kC - 1: key j0 + warp_row + 16 f + g +
  // 8 (i / 2), query i0 + col with col = kC c + 8 n + 2 quad + i % 2.
  const auto step = [&](int tile, auto elementwise) {
    constexpr bool kElementwise = decltype(elementwise)::value;
    const int64_t i0 = first + static_cast<int64_t>(tile) * kTile;
    [[maybe_unused]] uint32_t bits[kM][kTile / 64];  // first: kTile | first
    if constexpr (kMode == MaskMode::kAttnMask)
      load_tile_bits(bits, mask_words, p.allowed_by_key, tile);
    const int stage = tile % 2;
    const T* qt = qs + stage * kStage;
    const T* gt = gs + stage * kStage;
    const float* shifts = factors + stage * kFactors;
    if (tile + 1 < tiles) {
      load_queries(1 - stage, i0 + kTile);
      warp::cp_async_commit();
      warp::cp_async_wait<1>();
    } else {
      warp::cp_async_wait<0>();
    }
    __syncthreads();
    tile_products<kMode>(bits, [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
#pragma unroll
      for (int c = 0; c < kTile / kC; ++c) {
        const T* qc = qt + kC * c * ld;
        const T* gc = gt + kC * c * ld;
        float st[kM][kC / 8][4], dxt[kM][kC / 8][4];  // S^T + beta, G'^T - a dl
        fill(st, p.vertex.beta);
#pragma unroll
        for (int n = 0; n < kC / 8; ++n) {  // G'^T - a dl
          const float4 shift = *reinterpret_cast<const float4*>(
              shifts + 4 * ((kC * c + 8 * n) / 2 + quad));
#pragma unroll
          for (int f = 0; f < kM; ++f) {
            dxt[f][n][0] = shift.x;
            dxt[f][n][1] = shift.y;
            dxt[f][n][2] = shift.z;
            dxt[f][n][3] = shift.w;
          }
        }
        if constexpr (kHoldKeys) {
          warp::mma_abt<T, kDim, kC, ld>(st, kf, qc, lane);   // S^T
          warp::mma_abt<T, kDim, kC, ld>(dxt, vf, gc, lane);  // G'^T
        } else {
          warp::mma_abt_rows<T, kDim, kC, ld>(st, ks + warp_row * ld, qc, lane);
          warp::mma_abt_rows<T, kDim, kC, ld>(dxt, vs + warp_row * ld, gc,
                                              lane);
        }
#pragma unroll
        for (int n = 0; n < kC / 8; ++n) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int col = kC * c + 8 * n + 2 * quad + i % 2;
#pragma unroll
            for (int f = 0; f < kM; ++f) {
              const float s = st[f][n][i];
              float weight = s * s + p.vertex.gamma;  // P'^T
              float dx = dxt[f][n][i] * s;            // dX^T / 2
              if constexpr (kMode != MaskMode::kAttnMask && kElementwise) {
                // the causal diagonal
                if (j0 + warp_row + 16 * f + g + 8 * (i / 2) > i0 + col) {
                  weight = 0.f;
                  dx = 0.f;
                }
              }
              st[f][n][i] = weight;
              dxt[f][n][i] = dx;
            }
          }
        }
        uint32_t af[kM][kC / 16][4];
        [[maybe_unused]] uint32_t masks[kM][kC / 16][4];
        if constexpr (kMasked) pair_masks<kC>(masks, bits, c);
#pragma unroll
        for (int f = 0; f < kM; ++f) warp::to_a<T, kC>(af[f], st[f]);
        if constexpr (kMasked) mask_pairs<kC>(af, masks);
        warp::mma_ab<T, kC, kDim, ld>(dv, af, gc, lane);  // dV += P'^T gY'
#pragma unroll
        for (int f = 0; f < kM; ++f) warp::to_a<T, kC>(af[f], dxt[f]);
        if constexpr (kMasked) mask_pairs<kC>(af, masks);
        warp::mma_ab<T, kC, kDim, ld>(dk, af, qc, lane);  // dK += dX^T Q
      }
    });
    __syncthreads();  // every warp is done with this stage before its refill
  };
  // Causal without attn_mask: the query tiles before first + kBlockKeys hold
  // the diagonal (unrolled, outside the main loop); every query of the later
  // tiles follows every key here.
  const bool diagonal = kMode != MaskMode::kAttnMask && p.mask.causal;
  const int diagonal_tiles = diagonal ? min(tiles, kBlockKeys / kTile) : 0;
#pragma unroll
  for (int tile = 0; tile < kBlockKeys / kTile; ++tile)
    if (tile < diagonal_tiles) step(tile, std::true_type());
  for (int tile = diagonal_tiles; tile < tiles; ++tile)
    step(tile, std::false_type());
  warp::cp_async_wait<0>();  // no copy outlives the block (no query tiles)

#pragma unroll
  for (int f = 0; f < kM; ++f) {
    const int64_t row0 = j0 + warp_row + 16 * f;
    // 0 for padded keys (their gradients are zero); dk holds dK / 2
    float keep[2], keep_dk[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t j = row0 + g + 8 * r;
      keep[r] = j >= p.keys || p.mask.key_valid(b, j) ? 1.f : 0.f;
      keep_dk[r] = 2.f * keep[r];
    }
    store_rows<T, kDim>(grad_k + bh * p.keys * p.d, dk[f], row0, p.keys, p.d,
                        keep_dk, lane);
    store_rows<T, kDim>(grad_v + bh * p.keys * p.e, dv[f], row0, p.keys, p.e,
                        keep, lane);
  }
}

// Query side. Padded keys and the key tail are zero K and V rows
// (zero_padded_keys, RowCopies), so their dX (= -dl f'(0), finite) meets a
// zero row of K in dQ += dX K.
template <typename T, int kDim, MaskMode kMode>
__global__ void __launch_bounds__(kThreads)
    direct_backward_q_mma_kernel(MmaArgs<T> p, T* grad_q) {
  constexpr int kM = row_fragments<kDim>(), kRows = block_rows<kDim>();
  constexpr int kC = backward_chunk_rows<kDim>(), kTile = tile_rows<kDim>();
  constexpr int ld = kDim + 8, kStage = kTile * ld;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* gs = qs + kRows * ld;
  T* ks = gs + kRows * ld;  // two stages
  T* vs = ks + 2 * kStage;  // two stages
  const int lane = threadIdx.x % 32, warp_row = threadIdx.x / 32 * 16 * kM;
  const int g = lane / 4, quad = lane % 4;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t key_end = p.mask.key_limit(i0 + kRows, p.keys);
  const int tiles = static_cast<int>((key_end + kTile - 1) / kTile);

  KeyCopies<kDim, kTile, T> keys(p.k, p.v, b, h, 0, p.keys, nullptr);
  const auto load_keys = [&](int stage) {  // stage <- the next key tile
    keys.copy(ks + stage * kStage, vs + stage * kStage,
              static_cast<T*>(nullptr));
    keys.advance();
  };
  load_rows<kDim, kRows>(qs, p.q, b, h, i0, p.queries);
  load_rows<kDim, kRows>(gs, p.scaled_grad_out, b, h, i0, p.queries);
  warp::cp_async_commit();
  if (tiles > 0) load_keys(0);
  warp::cp_async_commit();
  // dX = (rs G - dl) f'(x) = 2 (a rs G - a dl) s with s = x + beta (the
  // vertex form, S's start), and a rs G = G' = gY' V^T (gY' = a rs gY, as
  // the key side's): G' accumulated from the row's shift -a dl gives dX / 2
  // = G' s, one multiply an element; the 2 goes to dQ's store. Per row
  // (16 f + g + 8 r of this warp) its shift, 0 past the queries.
  float shift[kM][2];
#pragma unroll
  for (int f = 0; f < kM; ++f) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = i0 + warp_row + 16 * f + g + 8 * r;
      shift[f][r] = row < p.queries ? p.shifts[bh * p.queries + row] : 0.f;
    }
  }

  warp::cp_async_wait<1>();  // Q and gY' have landed
  __syncthreads();
  uint32_t qf[kM][kDim / 16][4], gf[kM][kDim / 16][4];
  warp::load_a<kDim, ld>(qf, qs + warp_row * ld, lane);
  warp::load_a<kDim, ld>(gf, gs + warp_row * ld, lane);
  float dq[kM][kDim / 8][4] = {};
  const uint32_t* mask_words =
      kMode == MaskMode::kAttnMask
          ? p.allowed.lane_words(b, h, i0 + warp_row, lane)
          : nullptr;

  // One key tile, kC keys at a time; element i of n8 tile n of fragment f:
  // query row 16 f + g + 8 (i / 2) of the warp, key kC c + 8 n + 2 quad +
  // i % 2 of the tile.
  const auto step = [&](int tile, auto elementwise) {
    constexpr bool kElementwise = decltype(elementwise)::value;
    const int stage = tile % 2;
    if (tile + 1 < tiles) {
      load_keys(1 - stage);
      warp::cp_async_commit();
      warp::cp_async_wait<1>();
    } else {
      warp::cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t j0 = static_cast<int64_t>(tile) * kTile;
    [[maybe_unused]] uint32_t bits[kM][kTile / 64];
    if constexpr (kMode == MaskMode::kAttnMask)
      load_tile_bits(bits, mask_words, p.allowed, tile);
    tile_products<kMode>(bits, [&](auto masked) {
      constexpr bool kMasked = decltype(masked)::value;
#pragma unroll
      for (int c = 0; c < kTile / kC; ++c) {
        const T* kc = ks + stage * kStage + kC * c * ld;
        const T* vc = vs + stage * kStage + kC * c * ld;
        float s[kM][kC / 8][4], dx[kM][kC / 8][4];  // S + beta, G' - a dl
        fill(s, p.vertex.beta);
#pragma unroll
        for (int f = 0; f < kM; ++f)
#pragma unroll
          for (int n = 0; n < kC / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) dx[f][n][i] = shift[f][i / 2];
        warp::mma_abt<T, kDim, kC, ld>(s, qf, kc, lane);
        warp::mma_abt<T, kDim, kC, ld>(dx, gf, vc, lane);
#pragma unroll
        for (int f = 0; f < kM; ++f) {
#pragma unroll
          for (int n = 0; n < kC / 8; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int r = i / 2;
              float value = dx[f][n][i] * s[f][n][i];  // dX / 2
              if constexpr (kMode != MaskMode::kAttnMask && kElementwise) {
                // the causal diagonal
                const int64_t row = i0 + warp_row + 16 * f + g + 8 * r;
                const int64_t j = j0 + kC * c + 8 * n + 2 * quad + i % 2;
                if (j > row) value = 0.f;
              }
              dx[f][n][i] = value;
            }
          }
        }
        uint32_t af[kM][kC / 16][4];
#pragma unroll
        for (int f = 0; f < kM; ++f) warp::to_a<T, kC>(af[f], dx[f]);
        if constexpr (kMasked) {
          uint32_t masks[kM][kC / 16][4];
          pair_masks<kC>(masks, bits, c);
          mask_pairs<kC>(af, masks);
        }
        warp::mma_ab<T, kC, kDim, ld>(dq, af, kc, lane);
      }
    });
    __syncthreads();  // every warp is done with this stage before its refill
  };
  walk_key_tiles<kMode, kRows, kTile>(p, i0, tiles, step);
  warp::cp_async_wait<0>();         // no copy outlives the block (keys == 0)
  const float two[2] = {2.f, 2.f};  // dq holds dQ / 2
#pragma unroll
  for (int f = 0; f < kM; ++f)
    store_rows<T, kDim>(grad_q + bh * p.queries * p.d, dq[f],
                        i0 + warp_row + 16 * f, p.queries, p.d, two, lane);
}

template <typename T, int kDim, MaskMode kMode>
void launch_mma_backward(const MmaArgs<T>& args, int64_t bh, T* grad_q,
                         T* grad_k, T* grad_v) {
  constexpr size_t bytes = mma_backward_smem<kDim>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto kv = direct_backward_kv_mma_kernel<T, kDim, kMode>;
  allow_shared_memory(kv, bytes);
  constexpr int rows = block_rows<kDim>();
  kv<<<dim3((args.keys + rows - 1) / rows, bh), kThreads, bytes, stream>>>(
      args, grad_k, grad_v);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto qk = direct_backward_q_mma_kernel<T, kDim, kMode>;
  allow_shared_memory(qk, bytes);
  qk<<<dim3((args.queries + rows - 1) / rows, bh), kThreads, bytes, stream>>>(
      args, grad_q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kDim>
void launch_mma_backward(const MmaArgs<T>& args, MaskMode mode, int64_t bh,
                         T* grad_q, T* grad_k, T* grad_v) {
  switch (mode) {
    case MaskMode::kKeyMask:
      return launch_mma_backward<T, kDim, MaskMode::kKeyMask>(args, bh, grad_q,
                                                              grad_k, grad_v);
    case MaskMode::kAttnMask:
      return launch_mma_backward<T, kDim, MaskMode::kAttnMask>(args, bh, grad_q,
                                                               grad_k, grad_v);
  }
}

template <typename T>
void mma_backward(const at::Tensor& grad_out, const at::Tensor& q,
                  const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& scalars, const Mask& mask, MaskMode mode,
                  const Coefficients& f, at::Tensor& grad_q, at::Tensor& grad_k,
                  at::Tensor& grad_v) {
  const int64_t d = q.size(3), e = v.size(3), dim = std::max(d, e);
  // Kept alive until the launches: the arguments point into them.
  const at::Tensor qr = cp_async_rows(q), kr = cp_async_rows(k),
                   vr = cp_async_rows(v);
  MmaArgs<T> args = mma_args<T>(qr, kr, vr, d, e, mask, f);
  // gY' = a rs gY, a float product rounded to T once into rows of whole
  // 16-byte copies (zero columns after e, as cp_async_rows pads), and the
  // shifts -a dl.
  const double a = args.vertex.a;
  const int64_t width = (e + 7) / 8 * 8;
  std::vector<int64_t> shape = grad_out.sizes().vec();
  shape.back() = width;
  const at::Tensor scaled_grad_out = width == e ? at::empty(shape, q.options())
                                                : at::zeros(shape, q.options());
  const int64_t count = grad_out.numel();
  dz_rows_kernel<T>
      <<<std::min<int64_t>((count + 255) / 256, grid_stride_blocks()), 256, 0,
         at::cuda::getCurrentCUDAStream()>>>(
          token_rows<T>(grad_out, e), scalars.data_ptr<float>(),
          static_cast<float>(a), nullptr, q.size(1), q.size(2), width, 0, count,
          reinterpret_cast<T*>(scaled_grad_out.data_ptr()), nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor shifts = (-a * scalars.select(-1, 1)).contiguous();
  args.scaled_grad_out = token_rows<T>(scaled_grad_out, e);
  args.shifts = shifts.data_ptr<float>();
  at::Tensor allowed, allowed_by_key;
  if (mode == MaskMode::kAttnMask) {
    args.allowed = allowed_bits(mask, q, q.size(2), k.size(2), false, allowed);
    args.allowed_by_key =
        allowed_bits(mask, q, k.size(2), q.size(2), true, allowed_by_key);
  }
  const int64_t bh = q.size(0) * q.size(1);
  T* gq = reinterpret_cast<T*>(grad_q.data_ptr());
  T* gk = reinterpret_cast<T*>(grad_k.data_ptr());
  T* gv = reinterpret_cast<T*>(grad_v.data_ptr());
  if (dim <= 16) {
    launch_mma_backward<T, 16>(args, mode, bh, gq, gk, gv);
  } else if (dim <= 32) {
    launch_mma_backward<T, 32>(args, mode, bh, gq, gk, gv);
  } else if (dim <= 64) {
    launch_mma_backward<T, 64>(args, mode, bh, gq, gk, gv);
  } else {
    launch_mma_backward<T, 128>(args, mode, bh, gq, gk, gv);
  }
}

// Shared memory of both backward kernels; `key_side` adds what only the
// dK/dV kernel needs (the rs-weighted W tile, the dV accumulator) and swaps
// the dQ accumulator for dK.
struct BackwardSmem {
  size_t q, g, k, v, x, gv, p, dx, acc_qk, acc_v, rs, total;
  TS_HOST_DEVICE BackwardSmem(int tile, int d, int e, int op_bytes,
                              int acc_bytes, bool key_side) {
    const int dp = round16(d), ev = round16(e);
    SmemCarver carver;
    q = carver.take(size_t(tile) * operand_ld(dp) * op_bytes);
    g = carver.take(size_t(tile) * operand_ld(ev) * op_bytes);
    k = carver.take(size_t(tile) * operand_ld(dp) * op_bytes);
    v = carver.take(size_t(tile) * operand_ld(ev) * op_bytes);
    x = carver.take(size_t(tile) * accum_ld(tile) * acc_bytes);
    gv = carver.take(size_t(tile) * accum_ld(tile) * acc_bytes);
    p = key_side ? carver.take(size_t(tile) * operand_ld(tile) * op_bytes) : 0;
    dx = carver.take(size_t(tile) * operand_ld(tile) * op_bytes);
    acc_qk = carver.take(size_t(tile) * accum_ld(dp) * acc_bytes);
    acc_v = key_side ? carver.take(size_t(tile) * accum_ld(ev) * acc_bytes) : 0;
    rs = carver.take(size_t(2) * tile * acc_bytes);
    total = carver.size;
  }
};

// Loads the query-side tiles of the backward: Q, gY and (rs, dl).
template <typename T, typename Op, typename Acc>
__device__ void load_query_side(const DirectArgs<T, Acc>& p, int64_t bh,
                                int64_t i0, Op* qs, Op* gs, Acc* rs) {
  const int tile = p.tile;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  load_tile(qs, operand_ld(round16(p.d)), p.q, b, h, p.queries, i0, tile,
            round16(p.d));
  load_tile(gs, operand_ld(round16(p.e)), p.grad_out, b, h, p.queries, i0, tile,
            round16(p.e));
  for (int r = threadIdx.x; r < tile; r += blockDim.x) {
    const int64_t i = i0 + r;
    const bool valid = i < p.queries;
    const Acc* s = p.scalars + 2 * (bh * p.queries + i);
    rs[r] = valid ? s[0] : Acc(0);
    rs[tile + r] = valid ? s[1] : Acc(0);
  }
}

// X = Q K^T and G = gY V^T for one (query tile, key tile) pair, then
//   P = m ⊙ f(X) ⊙ rs  (only when `ps` is given) and  dX = m ⊙ (rs G - dl) ⊙
//   f'(X).
template <typename T, typename Op, typename Acc>
__device__ void backward_tile(const DirectArgs<T, Acc>& p, int64_t b, int64_t h,
                              int64_t i0, int64_t j0, const Op* qs,
                              const Op* gs, const Op* ks, const Op* vs, Acc* xs,
                              Acc* gvs, const Acc* rs, Op* ps, Op* dxs) {
  const int tile = p.tile;
  const int dp = round16(p.d), ev = round16(p.e);
  const int ld_x = accum_ld(tile), ld_w = operand_ld(tile);
  block_mma<false, true>(qs, operand_ld(dp), ks, operand_ld(dp), xs, ld_x, tile,
                         tile, dp, false);
  block_mma<false, true>(gs, operand_ld(ev), vs, operand_ld(ev), gvs, ld_x,
                         tile, tile, ev, false);
  __syncthreads();
  for (int idx = threadIdx.x; idx < tile * tile; idx += blockDim.x) {
    const int r = idx / tile, col = idx % tile;
    const int64_t i = i0 + r, j = j0 + col;
    Acc weight = 0, dx = 0;
    if (i < p.queries && j < p.keys && p.mask.allowed(b, h, i, j)) {
      const Acc x = xs[r * ld_x + col];
      weight = taylor_weight(x, p.f) * rs[r];
      dx = (rs[r] * gvs[r * ld_x + col] - rs[tile + r]) *
           taylor_weight_grad(x, p.f);
    }
    if (ps != nullptr) ps[r * ld_w + col] = Num<Op>::narrow(weight);
    dxs[r * ld_w + col] = Num<Op>::narrow(dx);
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    direct_backward_kv_kernel(DirectArgs<T, Acc> p, T* grad_k, T* grad_v) {
  using Op = typename Num<T>::derived;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tile = p.tile;
  const int dp = round16(p.d), ev = round16(p.e);
  const BackwardSmem plan(tile, p.d, p.e, sizeof(Op), sizeof(Acc), true);
  Op* qs = reinterpret_cast<Op*>(smem + plan.q);
  Op* gs = reinterpret_cast<Op*>(smem + plan.g);
  Op* ks = reinterpret_cast<Op*>(smem + plan.k);
  Op* vs = reinterpret_cast<Op*>(smem + plan.v);
  Acc* xs = reinterpret_cast<Acc*>(smem + plan.x);
  Acc* gvs = reinterpret_cast<Acc*>(smem + plan.gv);
  Op* ps = reinterpret_cast<Op*>(smem + plan.p);
  Op* dxs = reinterpret_cast<Op*>(smem + plan.dx);
  Acc* dk = reinterpret_cast<Acc*>(smem + plan.acc_qk);
  Acc* dv = reinterpret_cast<Acc*>(smem + plan.acc_v);
  Acc* rs = reinterpret_cast<Acc*>(smem + plan.rs);
  const int ld_w = operand_ld(tile);

  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * tile;
  load_tile(ks, operand_ld(dp), p.k, b, h, p.keys, j0, tile, dp, &p.mask);
  load_tile(vs, operand_ld(ev), p.v, b, h, p.keys, j0, tile, ev, &p.mask);
  zero_tile(dk, accum_ld(dp), tile, dp);
  zero_tile(dv, accum_ld(ev), tile, ev);
  // Causal: only queries i >= j >= j0 see this key tile.
  const int64_t first = p.mask.causal ? j0 / tile * tile : 0;
  for (int64_t i0 = first; i0 < p.queries; i0 += tile) {
    __syncthreads();  // the previous products are done with qs, gs, ps, dxs
    load_query_side(p, bh, i0, qs, gs, rs);
    __syncthreads();
    backward_tile(p, b, h, i0, j0, qs, gs, ks, vs, xs, gvs, rs, ps, dxs);
    __syncthreads();
    // dV += P^T gY,  dK += dX^T Q  (P and dX stored query-major: transposed)
    block_mma<true, false>(ps, ld_w, gs, operand_ld(ev), dv, accum_ld(ev), tile,
                           ev, tile, true);
    block_mma<true, false>(dxs, ld_w, qs, operand_ld(dp), dk, accum_ld(dp),
                           tile, dp, tile, true);
  }
  __syncthreads();
  const int64_t base = bh * p.keys;
  for (int idx = threadIdx.x; idx < tile * p.d; idx += blockDim.x) {
    const int r = idx / p.d, col = idx % p.d;
    if (j0 + r < p.keys) {
      grad_k[(base + j0 + r) * p.d + col] =
          Num<T>::narrow(dk[r * accum_ld(dp) + col]);
    }
  }
  for (int idx = threadIdx.x; idx < tile * p.e; idx += blockDim.x) {
    const int r = idx / p.e, col = idx % p.e;
    if (j0 + r < p.keys) {
      grad_v[(base + j0 + r) * p.e + col] =
          Num<T>::narrow(dv[r * accum_ld(ev) + col]);
    }
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    direct_backward_q_kernel(DirectArgs<T, Acc> p, T* grad_q) {
  using Op = typename Num<T>::derived;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tile = p.tile;
  const int dp = round16(p.d), ev = round16(p.e);
  const BackwardSmem plan(tile, p.d, p.e, sizeof(Op), sizeof(Acc), false);
  Op* qs = reinterpret_cast<Op*>(smem + plan.q);
  Op* gs = reinterpret_cast<Op*>(smem + plan.g);
  Op* ks = reinterpret_cast<Op*>(smem + plan.k);
  Op* vs = reinterpret_cast<Op*>(smem + plan.v);
  Acc* xs = reinterpret_cast<Acc*>(smem + plan.x);
  Acc* gvs = reinterpret_cast<Acc*>(smem + plan.gv);
  Op* dxs = reinterpret_cast<Op*>(smem + plan.dx);
  Acc* dq = reinterpret_cast<Acc*>(smem + plan.acc_qk);
  Acc* rs = reinterpret_cast<Acc*>(smem + plan.rs);

  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * tile;
  load_query_side(p, bh, i0, qs, gs, rs);
  zero_tile(dq, accum_ld(dp), tile, dp);
  const int64_t key_end = p.mask.causal ? min(p.keys, i0 + tile) : p.keys;
  for (int64_t j0 = 0; j0 < key_end; j0 += tile) {
    __syncthreads();  // the previous dX K product is done with ks, dxs
    load_tile(ks, operand_ld(dp), p.k, b, h, p.keys, j0, tile, dp, &p.mask);
    load_tile(vs, operand_ld(ev), p.v, b, h, p.keys, j0, tile, ev, &p.mask);
    __syncthreads();
    backward_tile(p, b, h, i0, j0, qs, gs, ks, vs, xs, gvs, rs,
                  static_cast<Op*>(nullptr), dxs);
    __syncthreads();
    block_mma<false, false>(dxs, operand_ld(tile), ks, operand_ld(dp), dq,
                            accum_ld(dp), tile, dp, tile, true);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < tile * p.d; idx += blockDim.x) {
    const int r = idx / p.d, col = idx % p.d;
    if (i0 + r < p.queries) {
      grad_q[((bh * p.queries) + i0 + r) * p.d + col] =
          Num<T>::narrow(dq[r * accum_ld(dp) + col]);
    }
  }
}

template <typename T, typename Acc>
DirectArgs<T, Acc> make_args(const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const Mask& mask,
                             const at::Tensor& sigma, const Coefficients& f) {
  DirectArgs<T, Acc> args{};
  args.q = token_rows<T>(q, q.size(3));
  args.k = token_rows<T>(k, k.size(3));
  args.v = token_rows<T>(v, v.size(3));
  args.heads = q.size(1);
  args.queries = q.size(2);
  args.keys = k.size(2);
  args.d = static_cast<int>(q.size(3));
  args.e = static_cast<int>(v.size(3));
  args.mask = mask;
  if (sigma.defined()) args.sigma = row_values<Acc>(sigma);  // forward only
  args.f = f.cast<Acc>();
  return args;
}

int64_t blocks_for(int64_t tokens, int tile) {
  return (tokens + tile - 1) / tile;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> direct_forward_rows(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal,
    const at::Tensor& sigma, const Coefficients& f) {
  at::Tensor out =
      at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor den = at::empty({q.size(0), q.size(1), q.size(2)},
                             q.options().dtype(accumulate_dtype(q)));
  if (den.numel() == 0) return {out, den};
  const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
  const MaskMode mode = mask_mode(attn_mask);
  if (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) {
    const at::Tensor keys = zero_padded_keys(k, key_padding_mask),
                     values = zero_padded_keys(v, key_padding_mask);
    if (q.scalar_type() == at::kHalf) {
      mma_forward<__half>(q, keys, values, mask, mode, key_padding_mask, sigma,
                          f, out, den);
    } else {
      mma_forward<__nv_bfloat16>(q, keys, values, mask, mode, key_padding_mask,
                                 sigma, f, out, den);
    }
    return {out, den};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "direct_forward_cuda", [&] {
    using T = scalar_t;
    using Acc = typename Num<T>::acc;
    auto args = make_args<T, Acc>(q, k, v, mask, sigma, f);
    const auto bytes = [&](int tile) {
      return ForwardSmem(tile, args.d, args.e, sizeof(T), sizeof(Acc)).total;
    };
    args.tile = pick_tile("taylorshift::direct_forward", bytes);
    const auto kernel = direct_forward_kernel<T, Acc>;
    allow_shared_memory(kernel, bytes(args.tile));
    const dim3 grid(blocks_for(args.queries, args.tile), q.size(0) * q.size(1));
    kernel<<<grid, kThreads, bytes(args.tile),
             at::cuda::getCurrentCUDAStream()>>>(
        args, reinterpret_cast<T*>(out.data_ptr()), den.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_rows(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& scalars,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal,
    const Coefficients& f) {
  // Contiguous gradients whatever the inputs' strides, as the Meta kernels.
  at::Tensor grad_q = at::empty(q.sizes(), q.options()),
             grad_k = at::empty(k.sizes(), k.options()),
             grad_v = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};
  }
  const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
  if ((q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) &&
      vertex_form(f)) {
    const MaskMode mode = mask_mode(attn_mask);
    const at::Tensor keys = zero_padded_keys(k, key_padding_mask),
                     values = zero_padded_keys(v, key_padding_mask);
    if (q.scalar_type() == at::kHalf) {
      mma_backward<__half>(grad_out, q, keys, values, scalars, mask, mode, f,
                           grad_q, grad_k, grad_v);
    } else {
      mma_backward<__nv_bfloat16>(grad_out, q, keys, values, scalars, mask,
                                  mode, f, grad_q, grad_k, grad_v);
    }
    return {grad_q, grad_k, grad_v};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "direct_backward_cuda", [&] {
        using T = typename Native<scalar_t>::type;
        using Acc = typename Num<T>::acc;
        using Op = typename Num<T>::derived;
        auto args = make_args<T, Acc>(q, k, v, mask, at::Tensor(), f);
        args.grad_out = token_rows<T>(grad_out, grad_out.size(3));
        args.scalars = scalars.data_ptr<Acc>();
        const int64_t bh = q.size(0) * q.size(1);
        const auto stream = at::cuda::getCurrentCUDAStream();
        for (bool key_side : {true, false}) {
          const auto bytes = [&](int tile) {
            return BackwardSmem(tile, args.d, args.e, sizeof(Op), sizeof(Acc),
                                key_side)
                .total;
          };
          args.tile = pick_tile("taylorshift::direct_backward", bytes);
          const size_t smem = bytes(args.tile);
          if (key_side) {
            const auto kernel = direct_backward_kv_kernel<T, Acc>;
            allow_shared_memory(kernel, smem);
            kernel<<<dim3(blocks_for(args.keys, args.tile), bh), kThreads, smem,
                     stream>>>(args, reinterpret_cast<T*>(grad_k.data_ptr()),
                               reinterpret_cast<T*>(grad_v.data_ptr()));
          } else {
            const auto kernel = direct_backward_q_kernel<T, Acc>;
            allow_shared_memory(kernel, smem);
            kernel<<<dim3(blocks_for(args.queries, args.tile), bh), kThreads,
                     smem, stream>>>(args,
                                     reinterpret_cast<T*>(grad_q.data_ptr()));
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {grad_q, grad_k, grad_v};
}

namespace {

std::tuple<at::Tensor, at::Tensor> direct_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  check_forward_arguments("taylorshift::direct_forward", q, k, v,
                          key_padding_mask, attn_mask,
                          schema_options(causal, output_scale, coefficients));
  check_cuda_inputs("taylorshift::direct_forward", q, k, v, {},
                    key_padding_mask, attn_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor sigma = output_scales(q, k.size(2), key_padding_mask,
                                         attn_mask, causal, output_scale);
  return direct_forward_rows(q, k, v, key_padding_mask, attn_mask, causal,
                             sigma, polynomial_of(coefficients));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    c10::ArrayRef<double> coefficients) {
  check_backward_arguments("taylorshift::direct_backward", grad_out, q, k, v,
                           out, den, std::nullopt, key_padding_mask, attn_mask,
                           schema_options(causal, output_scale, coefficients));
  check_cuda_inputs("taylorshift::direct_backward", q, k, v,
                    {&grad_out, &out, &den}, key_padding_mask, attn_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor sigma = output_scales(q, k.size(2), key_padding_mask,
                                         attn_mask, causal, output_scale);
  const at::Tensor scalars = backward_row_scalars(grad_out, out, den, sigma);
  return direct_backward_rows(grad_out, q, k, v, scalars, key_padding_mask,
                              attn_mask, causal, polynomial_of(coefficients));
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CUDA, m) {
  m.impl("direct_forward", TORCH_FN(direct_forward_cuda));
  m.impl("direct_backward", TORCH_FN(direct_backward_cuda));
}

}  // namespace taylorshift::cuda_kernels
