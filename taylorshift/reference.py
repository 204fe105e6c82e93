"""Readable pure-PyTorch TaylorShift: the test oracle, the benchmark baseline and the fallback.

`direct` forms the full M x N weight matrix; `efficient` follows the paper's code: it materialises
the N x d^2 tensor-product features k (x) k and q (x) q, scales q and k by d^(1/4) and divides
[1 | V] by N, which keeps intermediates near 1 in half precision and cancels exactly. Both compute
docs/math.md §1 and are differentiated by autograd. The extension's kernels compute the same function
without ever holding an M x N or an N x d^2 tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_rows(x: Tensor) -> Tensor:
    """x / |x| along the last dimension, exact for every finite x: in float32 for float16 and
    bfloat16, after dividing by the (detached) max |x_l| so that |x|^2 can neither overflow nor
    underflow; zero rows stay zero. The extension's composite computes the same
    (torch.ops.taylorshift.normalize_rows, csrc/cpu/normalize.cpp) in one pass; its comment says
    why each step is there."""
    wide = x.to(accumulate_dtype(x.dtype))
    s = wide.detach().abs().amax(-1, keepdim=True)
    s = s.masked_fill(s == 0, 1)
    scaled = wide / s
    return scaled / torch.linalg.vector_norm(scaled, dim=-1, keepdim=True).clamp_min(1)


def logit_factors(
    q: Tensor,
    k: Tensor,
    temperature: Tensor | None = None,
    *,
    normalize: bool = True,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """q_hat, k_hat with logits x_ij = q_hat_i . k_hat_j (docs/math.md §1), formed in the
    accumulation dtype and rounded to the input dtype once."""
    wide = accumulate_dtype(q.dtype)
    if normalize:
        q_hat, k_hat = unit_rows(q), unit_rows(k).to(k.dtype)
    else:
        q_hat = q.to(wide) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
        k_hat = k
    if temperature is not None:
        q_hat = q_hat * temperature.to(wide).view(1, -1, 1, 1)
    return q_hat.to(q.dtype), k_hat


def taylor_coefficients(order: int) -> tuple[float, ...]:
    """The Taylor polynomial of exp of order k, highest degree first: (1/k!, ..., 1/1!, 1/0!)."""
    return tuple(1.0 / math.factorial(n) for n in range(order, -1, -1))


def polynomial(x: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """f(x) = c_k x^k + ... + c_0 by Horner's rule, coefficients highest degree first."""
    weights = torch.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        weights = weights * x + c
    return weights


def allowed_keys(
    q: Tensor,
    k: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Bool (B, H, M, N), or broadcastable to it: True where query i may attend key j."""
    batch, heads, queries, keys = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    allowed = torch.ones(1, 1, queries, keys, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.view(batch, 1, 1, keys)
    if attn_mask is not None:
        allowed = allowed & ~attn_mask
    return allowed.expand(batch, heads, queries, keys)


def output_scale_factor(allowed: Tensor, head_dim: int, dtype: torch.dtype) -> Tensor:
    """sigma_i = sqrt(N_i / d), N_i the keys row i may attend to; shape (B, H, M, 1)."""
    valid = allowed.sum(-1, keepdim=True).to(dtype)
    return (valid / head_dim).sqrt()


def taylor_softmax_weights(
    q: Tensor,
    k: Tensor,
    temperature: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    normalize: bool = True,
    scale: float | None = None,
    coefficients: tuple[float, ...] = (0.5, 1.0, 1.0),
) -> Tensor:
    """The (B, H, M, N) attention weights P = W / den with W = f(x), f the polynomial of the
    coefficients (any order, highest degree first); all-masked rows are zero."""
    q_hat, k_hat = logit_factors(q, k, temperature, normalize=normalize, scale=scale)
    x = q_hat @ k_hat.transpose(-1, -2)
    allowed = allowed_keys(
        q, k, key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal
    )
    weights = torch.where(allowed, polynomial(x, tuple(coefficients)), torch.zeros_like(x))
    den = weights.sum(-1, keepdim=True)
    return weights / torch.where(den == 0, torch.ones_like(den), den)


def direct(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    temperature: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    normalize: bool = True,
    output_scale: bool = True,
    scale: float | None = None,
    coefficients: tuple[float, ...] = (0.5, 1.0, 1.0),
) -> Tensor:
    """Direct TaylorShift of any order, O(M N d) time and O(M N) memory."""
    probs = taylor_softmax_weights(
        q,
        k,
        temperature,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        causal=causal,
        normalize=normalize,
        scale=scale,
        coefficients=coefficients,
    )
    out = probs @ v
    if output_scale:
        allowed = allowed_keys(
            q, k, key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal
        )
        out = out * output_scale_factor(allowed, q.shape[-1], out.dtype)
    return out


def efficient(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    temperature: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    normalize: bool = True,
    output_scale: bool = True,
    scale: float | None = None,
    coefficients: tuple[float, ...] = (0.5, 1.0, 1.0),
) -> Tensor:
    """Efficient TaylorShift as in the paper's code: O(N d^3) time, O(N d^2) memory for order 2;
    order k uses the full tensor powers q^(x)n, k^(x)n (d^n features) for n <= k."""
    batch, _heads, keys, head_dim = k.shape
    q_hat, k_hat = logit_factors(q, k, temperature, normalize=normalize, scale=scale)
    # Scaling q and k by d^(1/4) makes (q.k) = sqrt(d) x: the x^n terms are divided by d^(n/2).
    root = head_dim**0.25
    keep = torch.ones(batch, 1, keys, 1, dtype=torch.bool, device=v.device)
    if key_padding_mask is not None:
        keep = ~key_padding_mask.view(batch, 1, keys, 1)
    valid = keep.sum(-2, keepdim=True).to(v.dtype)
    # Masked keys and values are zeroed by selection: a padded key may hold NaN or inf, and
    # multiplying it by a 0/1 mask would spread 0 * NaN = NaN into every output.
    q_s, k_s = q_hat * root, torch.where(keep, k_hat * root, 0)
    ones = torch.ones_like(v[..., :1])
    v_aug = torch.where(keep, torch.cat([ones, v], dim=-1), 0) / keys
    order = len(coefficients) - 1
    z = 0
    for n, c in zip(range(order, -1, -1), coefficients, strict=True):
        if n == 0:
            z = z + c * v_aug.sum(-2, keepdim=True)
            continue
        q_pow, k_pow = q_s, k_s  # q^(x)n, k^(x)n: (B, H, tokens, d^n)
        for _ in range(n - 1):
            q_pow = (q_pow.unsqueeze(-1) * q_s.unsqueeze(-2)).flatten(-2)
            k_pow = (k_pow.unsqueeze(-1) * k_s.unsqueeze(-2)).flatten(-2)
        z = z + (c / head_dim ** (n / 2)) * (q_pow @ (k_pow.transpose(-1, -2) @ v_aug))
    den = z[..., :1]
    out = z[..., 1:] / torch.where(den == 0, torch.ones_like(den), den)
    if output_scale:
        out = out * (valid / head_dim).sqrt()
    return out
