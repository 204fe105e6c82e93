"""Direct TaylorShift with an additive float attention bias (ALiBi, relative positions, -1e9 or
-inf padding), in PyTorch operations, processing the queries in blocks.

Meaning of the bias. Softmax attention with an additive bias weights key j for query i by
exp(x_ij + bias_ij) = exp(bias_ij) exp(x_ij): bias_ij is the log of a multiplicity, as if key j
occurred exp(bias_ij) times for query i. TaylorShift replaces exp(x) by f(x) = a x^2 + b x + c
and keeps the multiplicities:

    w_ij = exp(bias_ij - m_i) f(x_ij),   m_i = max_j bias_ij,   P_ij = w_ij / sum_j w_ij,

and its output scale sigma_i = sqrt(N_i / d) counts keys with their multiplicity:
N_i = sum_j exp(bias_ij - m_i), which is the number of allowed keys for a 0 / -inf mask. The row
constant m_i cancels in P (softmax's shift invariance) and makes N_i shift-invariant too, in
[1, N]. -inf is masked (weight 0, not counted), and so, to rounding, is any bias far below the
row's maximum: -1e9 padding gives exactly the bool mask's result. Biasing the logit itself,
f(x_ij + bias_ij), would not: f grows quadratically away from its minimum at -b / 2a, so a
-1e9 key would take all the weight and ALiBi would favour the most distant keys.

Efficient TaylorShift cannot take a bias: it factorises f(q.k) through tensor-product features
of q and k alone, and a per-pair factor exp(bias_ij) has no such factorisation.

Memory: each query block forms its (B, H, block, N) weights and, under autograd, is wrapped in
torch.utils.checkpoint, so the backward recomputes them block by block instead of storing all
M x N of them: peak memory O(B H block N), not O(B H M N).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from taylorshift.reference import accumulate_dtype, logit_factors, output_scale_factor, polynomial

# Elements of one block's (B, H, block, N) weight matrix: 2^20 float32 values are 4 MiB, and
# the backward of a block holds about twenty such matrices (logits, multiplicities, weights and
# their gradients), a fixed ~80 MiB instead of growing with M N.
BLOCK_ELEMENTS = 1 << 20


def check_mode(mode: str) -> None:
    """The mode argument of taylor_shift_attention when a bias is given: "direct" or "auto"
    (which then means direct)."""
    if mode == "efficient":
        raise NotImplementedError(
            "taylorshift: an additive float attn_mask (a bias) needs "
            "mode='direct' or 'auto': efficient TaylorShift factorises f(q.k) through "
            "tensor-product features of q and k alone, and a per-pair bias has no such "
            "factorisation"
        )
    if mode not in ("auto", "direct"):
        raise ValueError(f"taylorshift: mode must be 'auto', 'direct' or 'efficient', got {mode!r}")


def biased_direct_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    temperature: Tensor | None = None,
    *,
    bias: Tensor,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    normalize: bool = True,
    output_scale: bool = True,
    scale: float | None = None,
    coefficients: tuple[float, ...] = (0.5, 1.0, 1.0),
    block_size: int | None = None,
) -> Tensor:
    """Direct TaylorShift with an additive float `bias` broadcastable to (B, H, M, N) (see the
    module docstring for its meaning; -inf = masked). The other arguments are those of
    taylor_shift_attention; `block_size` is the number of queries per block (default: as many
    as keep one block's weights near BLOCK_ELEMENTS elements). Returns (B, H, M, e); a query
    whose keys are all masked gets zeros."""
    _check_inputs(q, k, v, key_padding_mask)
    batch, heads, queries, keys = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    _check_bias(bias, (batch, heads, queries, keys))
    # float16 / bfloat16 are computed in float32, as the extension's kernels accumulate.
    compute_dtype = accumulate_dtype(q.dtype)
    q_hat, k_hat = logit_factors(q, k, temperature, normalize=normalize, scale=scale)
    q_hat, k_hat, v_c = (x.to(compute_dtype) for x in (q_hat, k_hat, v))
    bias = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if block_size is None:
        block_size = max(1, BLOCK_ELEMENTS // max(1, batch * heads * keys))
    outputs = []
    for start in range(0, queries, block_size):
        stop = min(start + block_size, queries)
        block_bias = bias if bias.shape[2] == 1 else bias[:, :, start:stop]
        args = (q_hat[:, :, start:stop], k_hat, v_c, block_bias, key_padding_mask, start)
        options = (causal, output_scale, coefficients)
        if torch.is_grad_enabled():
            out = checkpoint(_block_output, *args, *options, use_reentrant=False)
        else:
            out = _block_output(*args, *options)
        outputs.append(out)
    return torch.cat(outputs, dim=2).to(q.dtype)


def biased_weights(
    q: Tensor,
    k: Tensor,
    temperature: Tensor | None = None,
    *,
    bias: Tensor,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    normalize: bool = True,
    scale: float | None = None,
    coefficients: tuple[float, ...] = (0.5, 1.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """The full (B, H, M, N) weights P of biased_direct_attention and the key multiplicities
    exp(bias_ij - m_i) (their row sums are the N_i of the output scale), in q's dtype; for
    need_weights, which forms them anyway."""
    batch, heads, queries, _ = q.shape
    _check_bias(bias, (batch, heads, queries, k.shape[2]))
    q_hat, k_hat = logit_factors(q, k, temperature, normalize=normalize, scale=scale)
    bias = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
    probs, multiplicity = _block_weights(
        q_hat, k_hat, bias, key_padding_mask, 0, causal, coefficients
    )
    return probs.to(q.dtype), multiplicity.to(q.dtype)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    """What taylor_shift_attention's operator checks, for this path that does not reach it."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError("taylorshift: q, k, v must be 4-d (B, H, L, d)")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"taylorshift: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "do not match (B, H, M, d), (B, H, N, d), (B, H, N, e)"
        )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool
        or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])
    ):
        raise ValueError(
            f"taylorshift: key_padding_mask must be a bool tensor of shape (B, N) = "
            f"{(k.shape[0], k.shape[2])}, got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}"
        )


def _check_bias(bias: Tensor, shape: tuple[int, int, int, int]) -> None:
    """Shape and dtype only: reading the values would cost a host synchronisation."""
    if not bias.is_floating_point():
        raise TypeError(f"taylorshift: the attention bias must be a float tensor, got {bias.dtype}")
    try:
        broadcasts = bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, shape) == shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(
            f"taylorshift: the attention bias of shape {tuple(bias.shape)} does not broadcast "
            f"to (B, H, M, N) = {shape}"
        )


def _block_weights(
    q_hat: Tensor,
    k_hat: Tensor,
    bias: Tensor,
    key_padding_mask: Tensor | None,
    start: int,
    causal: bool,
    coefficients: tuple[float, ...],
) -> tuple[Tensor, Tensor]:
    """Weights P and multiplicities exp(bias - m) of queries start .. start + rows (q_hat holds
    those rows), the bool masks folded into the bias as -inf."""
    x = q_hat @ k_hat.transpose(-1, -2)
    batch, heads, rows, keys = x.shape
    log_multiplicity = bias.to(x.dtype).expand(batch, heads, rows, keys)
    masked = None
    if key_padding_mask is not None:
        masked = key_padding_mask.view(batch, 1, 1, keys)
    if causal:
        query_index = torch.arange(start, start + rows, device=x.device).view(rows, 1)
        after = torch.arange(keys, device=x.device) > query_index
        masked = after if masked is None else masked | after
    if masked is not None:
        log_multiplicity = torch.where(masked, float("-inf"), log_multiplicity)
    row_max = log_multiplicity.amax(-1, keepdim=True)
    # Rows with every key masked keep multiplicities exp(-inf) = 0 rather than NaN.
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    multiplicity = torch.exp(log_multiplicity - row_max)
    weights = multiplicity * polynomial(x, tuple(coefficients))
    den = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(den == 0, torch.ones_like(den), den)
    return probs, multiplicity


def _block_output(
    q_hat: Tensor,
    k_hat: Tensor,
    v: Tensor,
    bias: Tensor,
    key_padding_mask: Tensor | None,
    start: int,
    causal: bool,
    output_scale: bool,
    coefficients: tuple[float, ...],
) -> Tensor:
    probs, multiplicity = _block_weights(
        q_hat, k_hat, bias, key_padding_mask, start, causal, coefficients
    )
    out = probs @ v
    if output_scale:
        # N_i counts the keys with their multiplicities. A row with any allowed key counts its
        # maximum once, so the clamp changes only rows with every key masked, whose output is
        # 0 anyway, and keeps their gradient finite (sqrt'(0) = inf, times 0, is NaN).
        counted = multiplicity.sum(-1, keepdim=True).clamp_min(1)
        out = out * output_scale_factor(counted, q_hat.shape[-1], out.dtype)
    return out
