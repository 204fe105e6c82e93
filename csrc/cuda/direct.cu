// Direct TaylorShift attention (docs/math.md §2) on CUDA: a fused tiled kernel
// in the style of FlashAttention, and its recomputation backward.
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

#include "../kernel_checks.h"
#include "common.cuh"

namespace taylorshift::cuda_kernels {

namespace {

template <typename T, typename Acc>
struct DirectArgs {
  const T* q;
  const T* k;
  const T* v;
  const T* grad_out;   // backward only
  const Acc* scalars;  // backward only: (B, H, M, 2) = (rs, dl)
  int64_t heads, queries, keys;
  int d, e, tile;
  Mask mask;
  RowValues<Acc> sigma;
  Acc a, b, c;
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
  const T* q = p.q + bh * p.queries * p.d;
  const T* k = p.k + bh * p.keys * p.d;
  const T* v = p.v + bh * p.keys * p.e;

  load_tile(qs, ld_qk, q, p.queries, p.d, i0, tile, dp);
  zero_tile(os, ld_o, tile, ep);
  // Causal: keys j <= i < i0 + tile only.
  const int64_t key_end = p.mask.causal ? min(p.keys, i0 + tile) : p.keys;
  for (int64_t j0 = 0; j0 < key_end; j0 += tile) {
    __syncthreads();  // the previous W V' product is done with ks, vs, ws
    load_tile(ks, ld_qk, k, p.keys, p.d, j0, tile, dp);
    for (int idx = threadIdx.x; idx < tile * ep; idx += blockDim.x) {
      const int r = idx / ep, col = idx % ep;
      const int64_t j = j0 + r;
      Acc value = 0;
      if (col < p.e) {
        value = j < p.keys ? Num<T>::widen(v[j * p.e + col]) : Acc(0);
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
        w = taylor_weight(xs[r * ld_x + col], p.a, p.b, p.c);
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
  load_tile(qs, operand_ld(round16(p.d)), p.q + bh * p.queries * p.d, p.queries,
            p.d, i0, tile, round16(p.d));
  load_tile(gs, operand_ld(round16(p.e)), p.grad_out + bh * p.queries * p.e,
            p.queries, p.e, i0, tile, round16(p.e));
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
      weight = taylor_weight(x, p.a, p.b, p.c) * rs[r];
      dx = (rs[r] * gvs[r * ld_x + col] - rs[tile + r]) *
           taylor_weight_grad(x, p.a, p.b);
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
  load_tile(ks, operand_ld(dp), p.k + bh * p.keys * p.d, p.keys, p.d, j0, tile,
            dp);
  load_tile(vs, operand_ld(ev), p.v + bh * p.keys * p.e, p.keys, p.e, j0, tile,
            ev);
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
    load_tile(ks, operand_ld(dp), p.k + bh * p.keys * p.d, p.keys, p.d, j0,
              tile, dp);
    load_tile(vs, operand_ld(ev), p.v + bh * p.keys * p.e, p.keys, p.e, j0,
              tile, ev);
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
                             const at::Tensor& sigma, double a, double b,
                             double c) {
  DirectArgs<T, Acc> args{};
  args.q = reinterpret_cast<const T*>(q.data_ptr());
  args.k = reinterpret_cast<const T*>(k.data_ptr());
  args.v = reinterpret_cast<const T*>(v.data_ptr());
  args.heads = q.size(1);
  args.queries = q.size(2);
  args.keys = k.size(2);
  args.d = static_cast<int>(q.size(3));
  args.e = static_cast<int>(v.size(3));
  args.mask = mask;
  args.sigma = row_values<Acc>(sigma);
  args.a = static_cast<Acc>(a);
  args.b = static_cast<Acc>(b);
  args.c = static_cast<Acc>(c);
  return args;
}

int64_t blocks_for(int64_t tokens, int tile) {
  return (tokens + tile - 1) / tile;
}

std::tuple<at::Tensor, at::Tensor> direct_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    double a, double b, double c) {
  check_kernel_inputs(q, k, v, key_padding_mask, attn_mask);
  check_cuda_inputs("taylorshift::direct_forward", q, k, v, {},
                    key_padding_mask, attn_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(),
                   vc = v.contiguous();
  at::Tensor out =
      at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor den = at::empty({q.size(0), q.size(1), q.size(2)},
                             q.options().dtype(accumulate_dtype(q)));
  if (den.numel() == 0) return {out, den};
  const at::Tensor sigma = output_scales(q, k.size(2), key_padding_mask,
                                         attn_mask, causal, output_scale);
  const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "direct_forward_cuda", [&] {
        using T = typename Native<scalar_t>::type;
        using Acc = typename Num<T>::acc;
        auto args = make_args<T, Acc>(qc, kc, vc, mask, sigma, a, b, c);
        const auto bytes = [&](int tile) {
          return ForwardSmem(tile, args.d, args.e, sizeof(T), sizeof(Acc))
              .total;
        };
        args.tile = pick_tile("taylorshift::direct_forward", bytes);
        const auto kernel = direct_forward_kernel<T, Acc>;
        allow_shared_memory(kernel, bytes(args.tile));
        const dim3 grid(blocks_for(args.queries, args.tile),
                        q.size(0) * q.size(1));
        kernel<<<grid, kThreads, bytes(args.tile),
                 at::cuda::getCurrentCUDAStream()>>>(
            args, reinterpret_cast<T*>(out.data_ptr()), den.data_ptr<Acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {out, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, bool causal, bool output_scale,
    double a, double b, double c) {
  check_kernel_inputs(q, k, v, key_padding_mask, attn_mask);
  check_cuda_inputs("taylorshift::direct_backward", q, k, v,
                    {&grad_out, &out, &den}, key_padding_mask, attn_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(),
                   vc = v.contiguous(), gc = grad_out.contiguous();
  // Contiguous gradients whatever the inputs' strides, as the Meta kernels.
  at::Tensor grad_q = at::empty(q.sizes(), q.options()),
             grad_k = at::empty(k.sizes(), k.options()),
             grad_v = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};
  }
  const at::Tensor sigma = output_scales(q, k.size(2), key_padding_mask,
                                         attn_mask, causal, output_scale);
  const at::Tensor scalars =
      backward_row_scalars(gc, out.contiguous(), den.contiguous(), sigma);
  const Mask mask = make_mask(key_padding_mask, attn_mask, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "direct_backward_cuda", [&] {
        using T = typename Native<scalar_t>::type;
        using Acc = typename Num<T>::acc;
        using Op = typename Num<T>::derived;
        auto args = make_args<T, Acc>(qc, kc, vc, mask, sigma, a, b, c);
        args.grad_out = reinterpret_cast<const T*>(gc.data_ptr());
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

}  // namespace

TORCH_LIBRARY_IMPL(taylorshift, CUDA, m) {
  m.impl("direct_forward", TORCH_FN(direct_forward_cuda));
  m.impl("direct_backward", TORCH_FN(direct_backward_cuda));
}

}  // namespace taylorshift::cuda_kernels
