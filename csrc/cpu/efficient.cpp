// Efficient TaylorShift on the CPU, O((M + N) F e) with F = C(d + k, k)
// features for Taylor order k = 1, 2, 3 (1 + d + d(d+1)/2 for order 2,
// docs/math.md §3; causal-and-order spec §1). With the feature maps of
// features.h,
//   f(q . k) = phi(q) . psi(k),
// so every query sees the same state S = sum_j psi(k_j) [1 | v_j]^T and
//   z_i = phi(q_i)^T S,   den_i = z_i[0],   y_i = sigma z_i[1:] / den_i.
// Tokens go in chunks; two paths compute the products of a chunk:
// - at order 1 and 2, on a CPU with AVX-512, and for a value width of whole
//   64-byte vectors, register kernels (pair_kernels.h) that never form the
//   features: the features are the pairs of [m | x], and every product
//   factors by a pair's first index;
// - otherwise (order 3, other widths, other CPUs) a feature-major tile X
//   (F x chunk: row f holds feature f of every token of the chunk), each row
//   a product of token rows of the chunk's transposed q or k, a contiguous
//   loop the compiler vectorises fully; the state products are then single
//   BLAS GEMMs over the chunk (X V, X^T S, S dZ^T), and the backward's
//   contractions through the features run over token rows too.
// Parallel over (batch, head), and over token ranges of each head when there
// are fewer heads than threads (efficient_forward_all).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../kernel_checks.h"
#include "common.h"
#include "feature_tiles.h"
#include "normalize_rows.h"
#include "pair_kernels.h"

namespace taylorshift::cpu {
namespace {

// Tokens per chunk, the k of the reductions X V (X is F x chunk): large
// enough for BLAS to run near its peak, small enough that the tile (F x chunk
// float32: 574 KB at d = 32, 1.1 MB at d = 64) stays in L2 between its build,
// its products and the contraction that reads it back.
inline int64_t token_chunk(int64_t d) { return d <= 32 ? 256 : 128; }

// One (batch, head): rows of q, k, v read in place through their strides.
// With `normalize`, the products read q_hat = q_factor q / |q| and
// k_hat = k / |k| instead, formed chunk by chunk (query_rows, key_rows).
template <typename T>
struct HeadTensors {
  const T *q, *k, *v;
  int64_t q_stride, k_stride, v_stride;
  int64_t queries, keys, head_dim, value_dim;
  bool normalize;
  T q_factor;

  const T* q_row(int64_t i) const { return q + i * q_stride; }
  const T* k_row(int64_t j) const { return k + j * k_stride; }
  const T* v_row(int64_t j) const { return v + j * v_stride; }
};

// normalize=True in the kernels: the per-head factors of q (the
// temperature; nullptr for 1), none for k.
template <typename T>
struct Normalization {
  bool enabled;
  const T* q_factors;

  T q_factor(int64_t h) const { return q_factors ? q_factors[h] : T(1); }
};

template <typename T>
HeadTensors<T> head(const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const Normalization<T>& normalization,
                    int64_t batch, int64_t head_index) {
  const TokenRows<T> qr = token_rows<T>(q), kr = token_rows<T>(k),
                     vr = token_rows<T>(v);
  return {qr.head(batch, head_index),
          kr.head(batch, head_index),
          vr.head(batch, head_index),
          qr.row_stride,
          kr.row_stride,
          vr.row_stride,
          q.size(2),
          k.size(2),
          q.size(3),
          v.size(3),
          normalization.enabled,
          normalization.q_factor(head_index)};
}

// Per-thread buffers, allocated once per parallel task.
template <typename T>
struct Workspace {
  int64_t chunk, augmented_ld;
  std::vector<T> xt;      // (1 + d) x chunk: [m | q or k] transposed, and
                          // room for an application's last block to read
                          // past the last row; the BLAS path uses rows
                          // 0..d-1 for q or k
  std::vector<T> tile;    // F x chunk: features, then feature gradients
                          // (the BLAS path only)
  std::vector<T> rows;    // chunk x (e + 1): [m | m v] or dz
  std::vector<T> column;  // chunk: one column of `rows`, contiguous
  std::vector<T> valid;   // chunk: m_j of the chunk's keys, 1 or 0
  std::vector<T> dots;    // F: a chunk's share of a state's column 0
  std::vector<T> grad_t;  // d x chunk: dq or dk, transposed
  // The register kernels' (pair_kernels.h): x~ rows, zero past 1 + d and
  // past the chunk's tokens, and their products.
  std::vector<T> augmented;  // chunk x augmented_ld
  std::vector<T> values;     // (chunk + kPairPaddedRows) x e
  std::vector<T> den;        // chunk + kPairPaddedRows
  std::vector<T> dzt;        // (e + 1) x chunk: dz or v' transposed
  std::vector<T> dxt;        // (1 + d) x chunk: the gradient of x~, transposed
  // normalize: the chunk's q_hat or k_hat rows, or the gradient rows of
  // either, and one row of the accumulation dtype (normalize_rows.h).
  std::vector<T> operand;  // chunk x d
  std::vector<T> row;      // d

  Workspace(int64_t d, int64_t e, int order)
      : chunk(token_chunk(d)),
        augmented_ld(d + 1 + 64 / int64_t(sizeof(T))),
        xt((d + 1) * chunk + kPairPaddedRows),
        tile(pair_kernels_fit<T>(order, e) ? 0
                                           : feature_count(d, order) * chunk),
        rows(chunk * (e + 1)),
        column(chunk),
        valid(chunk),
        dots(feature_count(d, order)),
        grad_t(d * chunk),
        augmented(chunk * augmented_ld),
        values((chunk + kPairPaddedRows) * e),
        den(chunk + kPairPaddedRows),
        dzt((e + 1) * chunk),
        dxt((d + 1) * chunk),
        operand(chunk * d),
        row(d) {}

  // x~ of the chunk: rows in `augmented`, columns in xt.
  AugmentedChunk<T> augmented_chunk() {
    return {augmented.data(), augmented_ld, xt.data(), chunk};
  }
};

// Asks the memory for `rows` rows of `width` elements (row stride `stride`)
// ahead of their use: a chunk loop asks for the next chunk's rows of the
// tensors it reads, so that they arrive while this chunk's products run
// (tens of microseconds) and the next chunk's loads find them in the caches.
template <typename T>
void prefetch_rows(const T* x, int64_t stride, int64_t rows, int64_t width) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  if (stride == width) {
    for (int64_t i = 0; i < rows * width; i += kLine)
      __builtin_prefetch(x + i, 0, 2);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; c += kLine)
      __builtin_prefetch(x + r * stride + c, 0, 2);
    __builtin_prefetch(x + r * stride + width - 1, 0, 2);
  }
}

// The next chunk's tokens after [begin, begin + ld) in [begin, end): their
// first one and their count (0 at the last chunk).
inline std::pair<int64_t, int64_t> next_chunk(int64_t begin, int64_t ld,
                                              int64_t end) {
  const int64_t next = std::min(begin + ld, end);
  return {next, std::min(next + ld, end) - next};
}

// Rows of a chunk of q or k, row stride `stride`.
template <typename T>
struct ChunkRows {
  const T* rows;
  int64_t stride;
};

// The normalisation of a chunk's rows (row stride `stride`) and its
// backward (gradient rows g, row stride d): normalize_rows.h's row
// functions, compiled per x86 level as normalize.cpp's tasks are (about 3
// times faster than the baseline build at d = 32).
template <typename T, typename Dim>
TS_VECTOR_CLONES void normalize_chunk(const T* x, int64_t stride, int64_t rows,
                                      Dim d, T factor, T* row, T* out) {
  for (int64_t r = 0; r < rows; ++r, out += d)
    normalize_row(x + r * stride, 1, d, factor, row, out);
}

template <typename T, typename Dim>
TS_VECTOR_CLONES double normalize_chunk_backward(const T* x, int64_t stride,
                                                 const T* g, int64_t rows,
                                                 Dim d, T factor, T* u,
                                                 T* out) {
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r, g += d, out += d)
    sum += normalize_row_backward(x + r * stride, 1, g, d, factor, u, out);
  return sum;
}

// `rows` rows of q or k from x as the products read them: in place, or
// normalised (factor x / |x|) into w.operand.
template <typename T>
ChunkRows<T> operand_rows(const T* x, int64_t stride, int64_t rows, int64_t d,
                          bool normalize, T factor, Workspace<T>& w) {
  if (!normalize) return {x, stride};
  with_row_length(d, [&](auto length) {
    normalize_chunk(x, stride, rows, length, factor, w.row.data(),
                    w.operand.data());
  });
  return {w.operand.data(), d};
}

template <typename T>
ChunkRows<T> query_rows(const HeadTensors<T>& t, int64_t i0, int64_t rows,
                        Workspace<T>& w) {
  return operand_rows(t.q_row(i0), t.q_stride, rows, t.head_dim, t.normalize,
                      t.q_factor, w);
}

template <typename T>
ChunkRows<T> key_rows(const HeadTensors<T>& t, int64_t j0, int64_t rows,
                      Workspace<T>& w) {
  return operand_rows(t.k_row(j0), t.k_stride, rows, t.head_dim, t.normalize,
                      T(1), w);
}

// The gradient rows of `rows` rows of q or k (out, row stride d) from the
// gradient of the rows the products read, transposed (gt: d x ld): as it
// is, or through normalize_row_backward with x the rows as given. Returns
// the sum of the rows' u . g, their share of the factor's gradient (0
// without normalize).
template <typename T>
double write_operand_gradient(const T* gt, int64_t ld, int64_t rows, const T* x,
                              int64_t stride, int64_t d, bool normalize,
                              T factor, T* out, Workspace<T>& w) {
  if (!normalize) {
    transpose_chunk(gt, ld, d, rows, static_cast<const T*>(nullptr), out, d);
    return 0;
  }
  T* g = w.operand.data();
  transpose_chunk(gt, ld, d, rows, static_cast<const T*>(nullptr), g, d);
  double sum = 0;
  with_row_length(d, [&](auto length) {
    sum = normalize_chunk_backward(x, stride, g, rows, length, factor,
                                   w.row.data(), out);
  });
  return sum;
}

// [m_r | m_r x_r]^T ((1 + width) x ld) for the `rows` tokens of a chunk
// (m_r = keep[r], or 1 where keep is nullptr), zero in columns [rows, end):
// the token-lane layout of x~ (AugmentedChunk::columns) and of v'.
template <typename T>
void write_augmented_columns(const T* x, int64_t stride, int64_t rows,
                             int64_t end, int64_t width, const T* keep, T* out,
                             int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) out[r] = keep != nullptr ? keep[r] : T(1);
  transpose_chunk(x, stride, rows, width, keep, out + ld, ld);
  for (int64_t l = 0; l <= width; ++l)
    std::fill(out + l * ld + rows, out + l * ld + end, T(0));
}

// Which layouts of x~ a chunk's products read: rows (the reductions) and
// columns (the applications, the contractions and the denominators).
enum AugmentedLayouts : int { kAugmentedRows = 1, kAugmentedColumns = 2 };

// x~_r = [m_r | m_r x_r] for the `rows` tokens of a chunk (m_r = keep[r],
// or 1 where keep is nullptr), in the `layouts` asked for; the columns are
// zero from `rows` up to `padded` (at most the chunk).
template <typename T>
void load_augmented(const T* x, int64_t stride, int64_t rows, int64_t padded,
                    int64_t d, const T* keep, int layouts, Workspace<T>& w) {
  const AugmentedChunk<T> out = w.augmented_chunk();
  if (layouts & kAugmentedRows) {
    for (int64_t r = 0; r < rows; ++r) {
      T* row = out.rows + r * out.ld;
      const T m = keep != nullptr ? keep[r] : T(1);
      row[0] = m;
      // Loops, not std::copy: a memmove call per row of d elements costs
      // more than the copy.
      if (m != T(0)) {
        const T* xr = x + r * stride;
        for (int64_t l = 0; l < d; ++l) row[1 + l] = xr[l];
      } else {
        for (int64_t l = 0; l < d; ++l) row[1 + l] = T(0);
      }
    }
  }
  if (layouts & kAugmentedColumns)
    write_augmented_columns(x, stride, rows, std::min(padded, w.chunk), d, keep,
                            out.columns, out.column_stride);
}

// valid = m_j of keys [j0, j0 + rows): 1 for a valid key, 0 for a masked
// one.
template <typename T>
void load_validity(int64_t j0, int64_t rows, const Mask& mask, int64_t batch,
                   Workspace<T>& w) {
  for (int64_t r = 0; r < rows; ++r)
    w.valid[r] = mask.key_valid(batch, j0 + r) ? T(1) : T(0);
}

// Keys [j0, j0 + rows): valid = m_j and xt = the keys transposed, zero where
// masked.
template <typename T>
void load_keys(const HeadTensors<T>& t, int64_t j0, int64_t rows,
               const Mask& mask, int64_t batch, Workspace<T>& w) {
  load_validity(j0, rows, mask, batch, w);
  const T* valid = w.valid.data();
  const ChunkRows<T> keys = key_rows(t, j0, rows, w);
  transpose_chunk(keys.rows, keys.stride, rows, t.head_dim,
                  mask.key_padding != nullptr ? valid : nullptr, w.xt.data(),
                  w.chunk);
}

// The state and its gradient have e + 1 columns: column 0 carries the
// denominator (the ones column of [1 | v]), columns 1..e the values. The
// reductions keep column 0 apart, so that their GEMMs have exactly e columns
// (BLAS blocks columns in multiples of 16: e + 1 = 33 or 65 columns take 1.2
// to 1.5 times as long as 32 or 64); the feature build computes column 0
// instead (RowExtras), from each feature row while it is in registers.

// A reduction over token chunks, sum_chunks X_chunk [y0 | Y]_chunk with X
// the feature-major tile (F x tokens). BLAS adds kChunksPerFold chunks into
// a block sum in T (beta = 1, no extra pass over the state per chunk); block
// sums are added in float64: a float32 running sum over all N / chunk chunks
// would lose about log2 of that many bits, one over kChunksPerFold chunks
// loses only log2(kChunksPerFold).
template <typename T>
class ChunkSum {
 public:
  static constexpr int64_t kChunksPerFold = 16;

  ChunkSum(int64_t rows, int64_t cols)
      : rows_(rows), cols_(cols), sum_(rows * cols, 0.0), block_(rows * cols) {}

  // sum[:, 0] += column0, sum[:, 1:] += X Y; X is rows x tokens (row
  // stride ldx), Y tokens x (cols - 1) (row stride ldy), column0 the chunk's
  // X y0 from the feature build.
  void add(const T* x, int64_t ldx, const T* column0, const T* y, int64_t ldy,
           int64_t tokens) {
    const bool accumulate = pending_ > 0;
    gemm<T>(false, false, rows_, cols_ - 1, tokens, T(1), x, ldx, y, ldy,
            accumulate ? T(1) : T(0), block_.data() + 1, cols_);
    for (int64_t f = 0; f < rows_; ++f)
      block_[f * cols_] = (accumulate ? block_[f * cols_] : T(0)) + column0[f];
    if (++pending_ == kChunksPerFold) fold();
  }

  // The register kernels' form of add: they add the chunk into the block
  // themselves (all e + 1 columns), then call chunk_added.
  T* next_block() {
    if (pending_ == 0) std::fill(block_.begin(), block_.end(), T(0));
    return block_.data();
  }
  void chunk_added() {
    if (++pending_ == kChunksPerFold) fold();
  }

  void copy_to(T* out) {
    fold();
    std::copy(sum_.begin(), sum_.end(), out);
  }

  // out += the sum, in float64 (a range's share of a head's sum).
  void add_to(double* out) {
    fold();
    for (size_t i = 0; i < sum_.size(); ++i) out[i] += sum_[i];
  }

 private:
  void fold() {
    if (pending_ == 0) return;
    for (size_t i = 0; i < sum_.size(); ++i) sum_[i] += block_[i];
    pending_ = 0;
  }

  int64_t rows_, cols_, pending_ = 0;
  std::vector<double> sum_;
  std::vector<T> block_;
};

// The values of keys [j0, j0 + rows) for the state's columns 1..: in place,
// unless a key is masked (its row may hold NaN), then m_j v_j in w.rows.
template <typename T>
std::pair<const T*, int64_t> key_values(const HeadTensors<T>& t, int64_t j0,
                                        int64_t rows, const Mask& mask,
                                        Workspace<T>& w) {
  if (mask.key_padding == nullptr) return {t.v_row(j0), t.v_stride};
  write_augmented_values(t.v_row(j0), t.v_stride, rows, t.value_dim,
                         w.valid.data(), w.rows.data());
  return {w.rows.data() + 1, t.value_dim + 1};
}

// Phase 1 of the forward: S = sum_j psi(k_j) [m_j | m_j v_j]^T, a reduction
// over the key chunks of `keys`, added to `sum`. Returns the number of valid
// keys among them.
template <typename T>
int64_t accumulate_state(const HeadTensors<T>& t, const Mask& mask,
                         int64_t batch, int order, TokenRange keys,
                         ChunkSum<T>& sum, Workspace<T>& w) {
  const int64_t d = t.head_dim, e = t.value_dim;
  const int64_t ld = w.chunk;
  const bool pairs = pair_kernels_fit<T>(order, e);
  const T* valid_row = w.valid.data();
  const T* keep = mask.key_padding != nullptr ? valid_row : nullptr;
  int64_t valid = 0;
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += ld) {
    const int64_t rows = block_end(j0, ld, keys.end) - j0;
    if (pairs) {
      load_validity(j0, rows, mask, batch, w);
      const ChunkRows<T> keys = key_rows(t, j0, rows, w);
      load_augmented(keys.rows, keys.stride, rows, rows, d, keep,
                     kAugmentedRows, w);
    } else {
      load_keys(t, j0, rows, mask, batch, w);
    }
    for (int64_t r = 0; r < rows; ++r) valid += valid_row[r] != T(0);
    const auto [values, values_stride] = key_values(t, j0, rows, mask, w);
    const auto [next, next_rows] = next_chunk(j0, ld, keys.end);
    prefetch_rows(t.k_row(next), t.k_stride, next_rows, d);
    prefetch_rows(t.v_row(next), t.v_stride, next_rows, e);
    if (pairs) {
      // psi(k_j) = the pairs of x~_j = [m_j | m_j k_j]; column 0 of
      // [m | m v] is m_j again.
      reduce_chunk_pairs(w.augmented_chunk(), valid_row, values, values_stride,
                         rows, d, e, order, sum.next_block());
      sum.chunk_added();
      continue;
    }
    // Column 0 of [m | m v] is m: the build sums psi(k_j) m_j.
    key_feature_tile(w.xt.data(), valid_row, d, rows, ld, w.tile.data(),
                     RowExtras<T>{valid_row, w.dots.data()}, order);
    sum.add(w.tile.data(), ld, w.dots.data(), values, values_stride, rows);
  }
  return valid;
}

// Phase 2 below with the register kernels: phi(q_i)^T S = pairs(x~_i)^T S'
// with x~_i = [1 | q_i] and S' the state with its rows weighted.
template <typename T>
void apply_state_pairs(const HeadTensors<T>& t, const KernelOptions& options,
                       T sigma, const T* state, TokenRange queries, T* out,
                       T* den, Workspace<T>& w) {
  const int64_t d = t.head_dim, e = t.value_dim;
  const int order = options.coefficients.order;
  const int64_t ld = w.chunk;
  const Polynomial<T> f = options.coefficients.template cast<T>();
  const PairState<T> weighted(state, d, e, order, &f);
  for (int64_t i0 = queries.begin; i0 < queries.end; i0 += ld) {
    const int64_t rows = block_end(i0, ld, queries.end) - i0;
    const ChunkRows<T> queries_in = query_rows(t, i0, rows, w);
    load_augmented(queries_in.rows, queries_in.stride, rows,
                   pair_padded_tokens(rows), d, static_cast<const T*>(nullptr),
                   kAugmentedColumns, w);
    const auto [next, next_rows] = next_chunk(i0, ld, queries.end);
    prefetch_rows(t.q_row(next), t.q_stride, next_rows, d);
    apply_chunk_pairs(w.augmented_chunk(), rows, weighted, d, e, order,
                      w.values.data(), w.den.data());
    for (int64_t r = 0; r < rows; ++r) {
      const T z0 = w.den[r];
      den[i0 + r] = z0;
      const T factor = sigma * safe_reciprocal(z0);
      for (int64_t col = 0; col < e; ++col)
        out[(i0 + r) * e + col] = factor * w.values[r * e + col];
    }
  }
}

// Phase 2 of the forward for the queries of `queries`: z = phi(Q_chunk)^T S,
// independent per query, with sigma from the head's count of valid keys.
template <typename T>
void apply_state(const HeadTensors<T>& t, const KernelOptions& options,
                 int64_t valid, const T* state, TokenRange queries, T* out,
                 T* den, Workspace<T>& w) {
  const int64_t d = t.head_dim, e = t.value_dim,
                F = feature_count(d, options.coefficients.order);
  const T sigma = output_scale_factor<T>(options.output_scale, valid, d);
  if (pair_kernels_fit<T>(options.coefficients.order, e))
    return apply_state_pairs(t, options, sigma, state, queries, out, den, w);
  const int64_t ld = w.chunk;
  const auto weights =
      FeatureWeights<T>::queries(options.coefficients.template cast<T>());
  const T c = weights.constant;
  // The products run over features 1.. only: the constant feature's term
  // c S[0, :] (c N for the denominator) dominates and is added last, since
  // adding it first would round every other term at its magnitude.
  for (int64_t i0 = queries.begin; i0 < queries.end; i0 += ld) {
    const int64_t rows = block_end(i0, ld, queries.end) - i0;
    const ChunkRows<T> queries_in = query_rows(t, i0, rows, w);
    transpose_chunk(queries_in.rows, queries_in.stride, rows, d,
                    static_cast<const T*>(nullptr), w.xt.data(), ld);
    // The build also applies S[:, 0] (features 1..): the denominators.
    std::fill(w.column.begin(), w.column.begin() + rows, T(0));
    RowExtras<T> denominators;
    denominators.weights = state;
    denominators.weight_stride = e + 1;
    denominators.weighted = w.column.data();
    query_feature_tile(w.xt.data(), d, rows, ld, weights, w.tile.data(),
                       denominators);
    T* values = w.rows.data();  // rows x e
    gemm<T>(true, false, rows, e, F - 1, T(1), w.tile.data() + ld, ld,
            state + (e + 1) + 1, e + 1, T(0), values, e);
    for (int64_t r = 0; r < rows; ++r) {
      const T z0 = w.column[r] + c * state[0];
      den[i0 + r] = z0;
      const T factor = sigma * safe_reciprocal(z0);
      for (int64_t col = 0; col < e; ++col)
        out[(i0 + r) * e + col] =
            factor * (values[r * e + col] + c * state[1 + col]);
    }
  }
}

// Backward of one head (docs/math.md §3). With z_i = phi(q_i)^T S:
//   dz_i = [ -(gY_i . y_i) / den_i | sigma gY_i / den_i ]
//   dS   = sum_i phi(q_i) dz_i^T                 (reduction over queries)
//   dq_i = d/dq [phi(q_i)]^T (S dz_i)            (feature_gradient_tile)
// and with S = sum_j psi(k_j) v'_j^T, v'_j = m_j [1 | v_j]:
//   dk_j = d/dk [psi(k_j)]^T (dS v'_j),   dv_j = m_j (psi(k_j)^T dS)[1:].
// S dz_i and dS v'_j for a chunk are single products, S[1:] dZ^T and
// dS[1:] V'^T, written feature-major over the chunk's tile (row 0, the
// constant feature, has no gradient).
// The gradient flowing back from one query row: what both sides of the
// backward read.
template <typename T>
struct BackwardRows {
  const T* grad_out;
  int64_t grad_row_stride;
  const T* out;
  const T* den;
};

// The query side with the register kernels. With x~_i = [1 | q_i]:
//   dS  = sum_i pairs(x~_i) dz_i^T, unweighted here (weight_pair_rows
//         weights the head's dS once it is whole),
//   dq_i = the gradient of pairs(x~_i) . (S' dz_i), S' the state weighted as
//         phi's features are (contract_chunk_pairs).
// Returns the queries' share of the temperature's gradient
// (write_operand_gradient).
template <typename T>
double backward_queries_pairs(const HeadTensors<T>& t, const BackwardRows<T>& g,
                              const T* state, const KernelOptions& options,
                              T sigma, TokenRange queries,
                              ChunkSum<T>& grad_state_sum, T* grad_q,
                              Workspace<T>& w) {
  const int order = options.coefficients.order;
  const int64_t d = t.head_dim, e = t.value_dim;
  const int64_t ld = w.chunk;
  const Polynomial<T> f = options.coefficients.template cast<T>();
  const PairState<T> weighted(state, d, e, order, &f);
  const PairIndices indices(d, order);
  double factor_gradient = 0;
  for (int64_t i0 = queries.begin; i0 < queries.end; i0 += ld) {
    const int64_t rows = block_end(i0, ld, queries.end) - i0;
    const int64_t padded = pair_padded_tokens(rows);
    write_dz(g, sigma, i0, rows, e, w.dzt.data(), std::min(padded, ld), w);
    const ChunkRows<T> queries_in = query_rows(t, i0, rows, w);
    load_augmented(queries_in.rows, queries_in.stride, rows, padded, d,
                   static_cast<const T*>(nullptr),
                   kAugmentedRows | kAugmentedColumns, w);
    const auto [next, next_rows] = next_chunk(i0, ld, queries.end);
    prefetch_rows(t.q_row(next), t.q_stride, next_rows, d);
    prefetch_rows(g.grad_out + next * g.grad_row_stride, g.grad_row_stride,
                  next_rows, e);
    prefetch_rows(g.out + next * e, e, next_rows, e);
    reduce_chunk_pairs(w.augmented_chunk(), w.column.data(), w.rows.data() + 1,
                       e + 1, rows, d, e, order, grad_state_sum.next_block());
    grad_state_sum.chunk_added();
    contract_chunk_pairs(w.augmented_chunk(), w.dzt.data(), rows, weighted,
                         indices, d, e, w.dxt.data());
    factor_gradient += write_operand_gradient(
        w.dxt.data() + ld, ld, rows, t.q_row(i0), t.q_stride, d, t.normalize,
        t.q_factor, grad_q + i0 * d, w);
  }
  return factor_gradient;
}

// The key side with the register kernels. With x~_j = [m_j | m_j k_j] and
// v'_j = [m_j | m_j v_j] (zero for a masked key, so are its dk and dv):
//   dv_j = pairs(x~_j)^T dS[:, 1:],
//   dk_j = the gradient of pairs(x~_j) . (dS v'_j) (contract_chunk_pairs).
template <typename T>
void backward_keys_pairs(const HeadTensors<T>& t, const T* dS, const Mask& mask,
                         int64_t batch, int order, TokenRange keys, T* grad_k,
                         T* grad_v, Workspace<T>& w) {
  const int64_t d = t.head_dim, e = t.value_dim;
  const int64_t ld = w.chunk;
  const PairState<T> grad_state(dS, d, e, order, nullptr);
  const PairIndices indices(d, order);
  const T* valid_row = w.valid.data();
  const T* keep = mask.key_padding != nullptr ? valid_row : nullptr;
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += ld) {
    const int64_t rows = block_end(j0, ld, keys.end) - j0;
    const int64_t padded = pair_padded_tokens(rows);
    load_validity(j0, rows, mask, batch, w);
    const ChunkRows<T> keys_in = key_rows(t, j0, rows, w);
    load_augmented(keys_in.rows, keys_in.stride, rows, padded, d, keep,
                   kAugmentedColumns, w);
    apply_chunk_pairs(w.augmented_chunk(), rows, grad_state, d, e, order,
                      w.values.data(), static_cast<T*>(nullptr));
    std::copy(w.values.begin(), w.values.begin() + rows * e, grad_v + j0 * e);
    // v'^T, (e + 1) x chunk, zero past the chunk's keys and where masked.
    T* vt = w.dzt.data();
    write_augmented_columns(t.v_row(j0), t.v_stride, rows, std::min(padded, ld),
                            e, keep, vt, ld);
    const auto [next, next_rows] = next_chunk(j0, ld, keys.end);
    prefetch_rows(t.k_row(next), t.k_stride, next_rows, d);
    prefetch_rows(t.v_row(next), t.v_stride, next_rows, e);
    contract_chunk_pairs(w.augmented_chunk(), vt, rows, grad_state, indices, d,
                         e, w.dxt.data());
    write_operand_gradient(w.dxt.data() + ld, ld, rows, t.k_row(j0), t.k_stride,
                           d, t.normalize, T(1), grad_k + j0 * d, w);
  }
}

// dz_i = [ -(gY_i . y_i) / den_i | sigma gY_i / den_i ] of queries
// [i0, i0 + rows): rows of w.rows (row stride e + 1), column 0 also in
// w.column, and, where dzt is not nullptr, transposed into dzt ((e + 1) x
// w.chunk) with zeros up to column `padded`.
template <typename T>
TS_VECTOR_CLONES void write_dz(const BackwardRows<T>& g, T sigma, int64_t i0,
                               int64_t rows, int64_t e, T* dzt, int64_t padded,
                               Workspace<T>& w) {
  const int64_t ld = w.chunk;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const T inv_den = safe_reciprocal(g.den[i]);
    T* dz = w.rows.data() + r * (e + 1);
    const T* grad = g.grad_out + i * g.grad_row_stride;
    const T* y = g.out + i * e;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t col = 0; col < e; ++col) {
      dot += grad[col] * y[col];
      dz[1 + col] = sigma * grad[col] * inv_den;
    }
    dz[0] = -dot * inv_den;
    w.column[r] = dz[0];
  }
  if (dzt == nullptr) return;
  transpose_chunk(w.rows.data(), e + 1, rows, e + 1,
                  static_cast<const T*>(nullptr), dzt, ld);
  for (int64_t col = 0; col <= e; ++col)
    std::fill(dzt + col * ld + rows, dzt + col * ld + padded, T(0));
}

// The query side for the queries of `queries`: dS's share added to
// `grad_state_sum`, and their dq. Returns their share of the temperature's
// gradient (write_operand_gradient).
template <typename T>
double backward_queries(const HeadTensors<T>& t, const BackwardRows<T>& g,
                        const T* state, const KernelOptions& options, T sigma,
                        TokenRange queries, ChunkSum<T>& grad_state_sum,
                        T* grad_q, Workspace<T>& w) {
  const int order = options.coefficients.order;
  const int64_t d = t.head_dim, e = t.value_dim;
  if (pair_kernels_fit<T>(order, e))
    return backward_queries_pairs(t, g, state, options, sigma, queries,
                                  grad_state_sum, grad_q, w);
  const auto weights =
      FeatureWeights<T>::queries(options.coefficients.template cast<T>());
  const int64_t F = feature_count(d, order);
  const int64_t ld = w.chunk;
  T* tile = w.tile.data();
  T* xt = w.xt.data();
  T* rows_e1 = w.rows.data();
  double factor_gradient = 0;
  for (int64_t i0 = queries.begin; i0 < queries.end; i0 += ld) {
    const int64_t rows = block_end(i0, ld, queries.end) - i0;
    write_dz(g, sigma, i0, rows, e, static_cast<T*>(nullptr), 0, w);
    const ChunkRows<T> queries_in = query_rows(t, i0, rows, w);
    transpose_chunk(queries_in.rows, queries_in.stride, rows, d,
                    static_cast<const T*>(nullptr), xt, ld);
    // Column 0 of dS: the build sums phi(q_i) dz_i[0].
    query_feature_tile(xt, d, rows, ld, weights, tile,
                       RowExtras<T>{w.column.data(), w.dots.data()});
    grad_state_sum.add(tile, ld, w.dots.data(), rows_e1 + 1, e + 1, rows);
    // The tile is free again: S[1:] dZ^T, row f holding (S dz_i)_f.
    gemm<T>(false, true, F - 1, rows, e + 1, T(1), state + (e + 1), e + 1,
            rows_e1, e + 1, T(0), tile + ld, ld);
    feature_gradient_tile(tile + ld, xt, d, rows, ld, weights, w.grad_t.data());
    factor_gradient += write_operand_gradient(
        w.grad_t.data(), ld, rows, t.q_row(i0), t.q_stride, d, t.normalize,
        t.q_factor, grad_q + i0 * d, w);
  }
  return factor_gradient;
}

// The key side for the keys of `keys`, given the head's whole dS: their dk
// and dv.
template <typename T>
void backward_keys(const HeadTensors<T>& t, const T* dS, const Mask& mask,
                   int64_t batch, int order, TokenRange keys, T* grad_k,
                   T* grad_v, Workspace<T>& w) {
  const int64_t d = t.head_dim, e = t.value_dim;
  if (pair_kernels_fit<T>(order, e))
    return backward_keys_pairs(t, dS, mask, batch, order, keys, grad_k, grad_v,
                               w);
  const int64_t F = feature_count(d, order);
  const int64_t ld = w.chunk;
  T* tile = w.tile.data();
  T* xt = w.xt.data();
  T* rows_e1 = w.rows.data();
  const T* valid_row = w.valid.data();
  for (int64_t j0 = keys.begin; j0 < keys.end; j0 += ld) {
    const int64_t rows = block_end(j0, ld, keys.end) - j0;
    load_keys(t, j0, rows, mask, batch, w);
    key_feature_tile(xt, valid_row, d, rows, ld, tile, RowExtras<T>{}, order);
    write_augmented_values(t.v_row(j0), t.v_stride, rows, t.value_dim,
                           valid_row, rows_e1);
    // dv = psi(K)[1:]^T dS[1:, 1:] + m dS[0, 1:]: the constant feature last,
    // as in the forward; masked keys get zeros by selection.
    T* dv = grad_v + j0 * e;
    gemm<T>(true, false, rows, e, F - 1, T(1), tile + ld, ld, dS + (e + 1) + 1,
            e + 1, T(0), dv, e);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t col = 0; col < e; ++col)
        dv[r * e + col] =
            valid_row[r] != T(0) ? dv[r * e + col] + dS[1 + col] : T(0);
    // The tile rows 1.. are free again: dS[1:] V'^T, row f holding
    // (dS v'_j)_f. Masked keys have v'_j = 0 and k_j = 0 (in xt): dk_j = 0.
    gemm<T>(false, true, F - 1, rows, e + 1, T(1), dS + (e + 1), e + 1, rows_e1,
            e + 1, T(0), tile + ld, ld);
    feature_gradient_tile(tile + ld, xt, d, rows, ld,
                          FeatureWeights<T>::keys(order), w.grad_t.data());
    write_operand_gradient(w.grad_t.data(), ld, rows, t.k_row(j0), t.k_stride,
                           d, t.normalize, T(1), grad_k + j0 * d, w);
  }
}

// Work over B H heads, each split into `splits` token ranges (splits > 1
// when B H is below the thread count): a reduction over one side's tokens
// (the state over keys, dS over queries) whose range shares are summed in
// float64, then independent work per token of the other side with the
// head's sum. One head per task needs neither the shares nor their buffer.
class HeadSplits {
 public:
  HeadSplits(const at::Tensor& q, const at::Tensor& k)
      : chunk(token_chunk(q.size(3))),
        heads(q.size(0) * q.size(1)),
        splits(splits_per_head(
            heads, blocks_of(std::max(q.size(2), k.size(2)), chunk))) {}

  // Ranges are whole chunks of the kernels' token_chunk.
  const int64_t chunk, heads, splits;

  int64_t units() const { return heads * splits; }
  int64_t head(int64_t unit) const { return unit / splits; }
  // The tokens of `unit`'s range, for a side of `tokens` tokens.
  TokenRange range(int64_t tokens, int64_t unit) const {
    return split_range(tokens, chunk, unit % splits, splits);
  }

  // out[h] = the sum of head h's `size` shares (units h splits .. h splits +
  // splits - 1), in float64, rounded once.
  template <typename T>
  void sum_shares(const std::vector<double>& shares, int64_t size,
                  T* out) const {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < size; ++i) {
        double total = 0;
        for (int64_t split = 0; split < splits; ++split)
          total += shares[(h * splits + split) * size + i];
        out[h * size + i] = T(total);
      }
  }
};

// The forward, (batch, head) by (batch, head) or in token ranges.
template <typename T>
void efficient_forward_all(const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const Mask& mask,
                           const Normalization<T>& normalization,
                           const KernelOptions& options, T* out, T* den,
                           T* state) {
  const int64_t H = q.size(1), M = q.size(2), N = k.size(2), d = q.size(3),
                e = v.size(3);
  const int order = options.coefficients.order;
  const int64_t F = feature_count(d, order), FE = F * (e + 1);
  const HeadSplits work(q, k);
  auto head_of = [&](int64_t bh) {
    return head<T>(q, k, v, normalization, bh / H, bh % H);
  };
  if (work.splits == 1) {
    at::parallel_for(0, work.heads, 1, [&](int64_t begin, int64_t end) {
      Workspace<T> w(d, e, order);
      for (int64_t bh = begin; bh < end; ++bh) {
        const HeadTensors<T> t = head_of(bh);
        ChunkSum<T> sum(F, e + 1);
        const int64_t valid =
            accumulate_state(t, mask, bh / H, order, {0, N}, sum, w);
        sum.copy_to(state + bh * FE);
        apply_state(t, options, valid, state + bh * FE, {0, M},
                    out + bh * M * e, den + bh * M, w);
      }
    });
    return;
  }
  std::vector<double> shares(work.units() * FE, 0.0);
  std::vector<int64_t> range_valid(work.units());
  at::parallel_for(0, work.units(), 1, [&](int64_t begin, int64_t end) {
    Workspace<T> w(d, e, order);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = work.head(unit);
      ChunkSum<T> sum(F, e + 1);
      range_valid[unit] = accumulate_state(head_of(bh), mask, bh / H, order,
                                           work.range(N, unit), sum, w);
      sum.add_to(shares.data() + unit * FE);
    }
  });
  work.sum_shares(shares, FE, state);
  std::vector<int64_t> valid(work.heads, 0);
  for (int64_t unit = 0; unit < work.units(); ++unit)
    valid[work.head(unit)] += range_valid[unit];
  at::parallel_for(0, work.units(), 1, [&](int64_t begin, int64_t end) {
    Workspace<T> w(d, e, order);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = work.head(unit);
      apply_state(head_of(bh), options, valid[bh], state + bh * FE,
                  work.range(M, unit), out + bh * M * e, den + bh * M, w);
    }
  });
}

// Backward (docs/math.md §3). With z_i = phi(q_i)^T S:
//   dz_i = [ -(gY_i . y_i) / den_i | sigma gY_i / den_i ]
//   dS   = sum_i phi(q_i) dz_i^T                 (reduction over queries)
//   dq_i = d/dq [phi(q_i)]^T (S dz_i)            (feature_gradient_tile)
// and with S = sum_j psi(k_j) v'_j^T, v'_j = m_j [1 | v_j]:
//   dk_j = d/dk [psi(k_j)]^T (dS v'_j),   dv_j = m_j (psi(k_j)^T dS)[1:].
// S dz_i and dS v'_j for a chunk are single products, S[1:] dZ^T and
// dS[1:] V'^T, written feature-major over the chunk's tile (row 0, the
// constant feature, has no gradient).
//
// With normalize, grad_temperature[h] = sum over the batch and the queries
// of u . g (normalize_rows.h), each query range's share summed in float64.
template <typename T>
void efficient_backward_all(const at::Tensor& grad_out, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v,
                            const T* out, const T* den, const T* state,
                            const Mask& mask,
                            const Normalization<T>& normalization,
                            const KernelOptions& options, T* grad_q, T* grad_k,
                            T* grad_v, double* grad_temperature) {
  const int64_t H = q.size(1), M = q.size(2), N = k.size(2), d = q.size(3),
                e = v.size(3);
  const int order = options.coefficients.order;
  const int64_t F = feature_count(d, order), FE = F * (e + 1);
  const HeadSplits work(q, k);
  // Under the register kernels the query side leaves dS unweighted.
  const bool pairs = pair_kernels_fit<T>(order, e);
  const Polynomial<T> coefficients = options.coefficients.template cast<T>();
  const TokenRows<T> grad_rows = token_rows<T>(grad_out);
  auto head_of = [&](int64_t bh) {
    return head<T>(q, k, v, normalization, bh / H, bh % H);
  };
  auto rows_of = [&](int64_t bh) {
    return BackwardRows<T>{grad_rows.head(bh / H, bh % H), grad_rows.row_stride,
                           out + bh * M * e, den + bh * M};
  };
  auto sigma_of = [&](int64_t bh) {
    int64_t valid = 0;
    for (int64_t j = 0; j < N; ++j) valid += mask.key_valid(bh / H, j);
    return output_scale_factor<T>(options.output_scale, valid, d);
  };
  // The queries' shares of grad_temperature, one per unit.
  std::vector<double> factor_shares(work.units(), 0.0);
  if (work.splits == 1) {
    at::parallel_for(0, work.heads, 1, [&](int64_t begin, int64_t end) {
      Workspace<T> w(d, e, order);
      std::vector<T> grad_state(FE);
      for (int64_t bh = begin; bh < end; ++bh) {
        const HeadTensors<T> t = head_of(bh);
        ChunkSum<T> sum(F, e + 1);
        factor_shares[bh] =
            backward_queries(t, rows_of(bh), state + bh * FE, options,
                             sigma_of(bh), {0, M}, sum, grad_q + bh * M * d, w);
        sum.copy_to(grad_state.data());
        if (pairs) weight_pair_rows(coefficients, d, e + 1, grad_state.data());
        backward_keys(t, grad_state.data(), mask, bh / H, order, {0, N},
                      grad_k + bh * N * d, grad_v + bh * N * e, w);
      }
    });
  } else {
    std::vector<double> shares(work.units() * FE, 0.0);
    at::parallel_for(0, work.units(), 1, [&](int64_t begin, int64_t end) {
      Workspace<T> w(d, e, order);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t bh = work.head(unit);
        ChunkSum<T> sum(F, e + 1);
        factor_shares[unit] = backward_queries(
            head_of(bh), rows_of(bh), state + bh * FE, options, sigma_of(bh),
            work.range(M, unit), sum, grad_q + bh * M * d, w);
        sum.add_to(shares.data() + unit * FE);
      }
    });
    std::vector<T> grad_state(work.heads * FE);
    work.sum_shares(shares, FE, grad_state.data());
    if (pairs)
      for (int64_t bh = 0; bh < work.heads; ++bh)
        weight_pair_rows(coefficients, d, e + 1, grad_state.data() + bh * FE);
    at::parallel_for(0, work.units(), 1, [&](int64_t begin, int64_t end) {
      Workspace<T> w(d, e, order);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t bh = work.head(unit);
        backward_keys(head_of(bh), grad_state.data() + bh * FE, mask, bh / H,
                      order, work.range(N, unit), grad_k + bh * N * d,
                      grad_v + bh * N * e, w);
      }
    });
  }
  for (int64_t unit = 0; unit < work.units(); ++unit)
    grad_temperature[work.head(unit) % H] += factor_shares[unit];
}

// The temperature in the accumulation dtype (kept alive by the caller for
// the Normalization that points into it), or undefined without one.
at::Tensor compute_temperature(const std::optional<at::Tensor>& temperature,
                               const at::Tensor& q) {
  return temperature ? normalize_factors(temperature, q) : at::Tensor();
}

template <typename T>
Normalization<T> normalization_of(bool normalize, const at::Tensor& factors) {
  return {normalize, factors.defined() ? factors.const_data_ptr<T>() : nullptr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> efficient_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, bool output_scale,
    c10::ArrayRef<double> coefficients, bool normalize,
    const std::optional<at::Tensor>& temperature) {
  check_forward_arguments("taylorshift::efficient_forward", q_in, k_in, v_in,
                          key_padding_mask, std::nullopt,
                          schema_options(false, output_scale, coefficients));
  check_efficient_normalization("taylorshift::efficient_forward", q_in,
                                normalize, temperature);
  const at::Tensor q = compute_operand(q_in), k = compute_operand(k_in),
                   v = compute_operand(v_in);
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), d = q.size(3),
                e = v.size(3);
  const KernelOptions options =
      schema_options(false, output_scale, coefficients);
  check_efficient_order("taylorshift::efficient_forward",
                        options.coefficients.order, kMaxEfficientOrder);
  const int64_t F = feature_count(d, options.coefficients.order);
  const auto compute = q.options().dtype(accumulate_dtype(q_in));
  at::Tensor out = at::empty({B, H, M, e}, compute);
  at::Tensor den = at::empty({B, H, M}, compute);
  at::Tensor state = at::empty({B, H, F, e + 1}, compute);
  const Mask mask = make_mask(key_padding_mask, std::nullopt, false);
  const at::Tensor factors = compute_temperature(temperature, q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "efficient_forward_cpu", [&] {
    efficient_forward_all<scalar_t>(
        q, k, v, mask, normalization_of<scalar_t>(normalize, factors), options,
        out.data_ptr<scalar_t>(), den.data_ptr<scalar_t>(),
        state.data_ptr<scalar_t>());
  });
  return {out.to(q_in.scalar_type()), den, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
efficient_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                       const at::Tensor& k_in, const at::Tensor& v_in,
                       const at::Tensor& out_in, const at::Tensor& den_in,
                       const at::Tensor& state_in,
                       const std::optional<at::Tensor>& key_padding_mask,
                       bool output_scale, c10::ArrayRef<double> coefficients,
                       bool normalize,
                       const std::optional<at::Tensor>& temperature) {
  check_backward_arguments("taylorshift::efficient_backward", grad_out_in, q_in,
                           k_in, v_in, out_in, den_in, state_in,
                           key_padding_mask, std::nullopt,
                           schema_options(false, output_scale, coefficients));
  check_efficient_normalization("taylorshift::efficient_backward", q_in,
                                normalize, temperature);
  const at::Tensor q = compute_operand(q_in), k = compute_operand(k_in),
                   v = compute_operand(v_in),
                   grad_out = compute_operand(grad_out_in);
  const auto compute = q.options().dtype(accumulate_dtype(q_in));
  const at::Tensor out = out_in.to(compute).contiguous(),
                   den = den_in.to(compute).contiguous(),
                   state = state_in.to(compute).contiguous();
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), N = k.size(2),
                d = q.size(3), e = v.size(3);
  at::Tensor grad_q = at::empty({B, H, M, d}, compute),
             grad_k = at::empty({B, H, N, d}, compute),
             grad_v = at::empty({B, H, N, e}, compute);
  const Mask mask = make_mask(key_padding_mask, std::nullopt, false);
  const KernelOptions options =
      schema_options(false, output_scale, coefficients);
  check_efficient_order("taylorshift::efficient_backward",
                        options.coefficients.order, kMaxEfficientOrder);
  const at::Tensor factors = compute_temperature(temperature, q);
  std::vector<double> grad_temperature(H, 0.0);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "efficient_backward_cpu", [&] {
    efficient_backward_all<scalar_t>(
        grad_out, q, k, v, out.const_data_ptr<scalar_t>(),
        den.const_data_ptr<scalar_t>(), state.const_data_ptr<scalar_t>(), mask,
        normalization_of<scalar_t>(normalize, factors), options,
        grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
        grad_v.data_ptr<scalar_t>(), grad_temperature.data());
  });
  at::Tensor grad_factor = empty_temperature_gradient(q_in, temperature);
  if (temperature) grad_factor.copy_(at::tensor(grad_temperature, at::kDouble));
  return {grad_q.to(q_in.scalar_type()), grad_k.to(k_in.scalar_type()),
          grad_v.to(v_in.scalar_type()), grad_factor};
}

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CPU, m) {
  m.impl("efficient_forward", TORCH_FN(efficient_forward_cpu));
  m.impl("efficient_backward", TORCH_FN(efficient_backward_cpu));
}

}  // namespace taylorshift::cpu
