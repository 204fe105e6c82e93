"""taylor_shift_attention: the functional entry point."""

from __future__ import annotations

import torch
from torch import Tensor

from taylorshift import _extension, reference
from taylorshift.crossover import paper_thresholds


def taylor_shift_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    temperature: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    causal: bool = False,
    mode: str = "auto",
    normalize: bool = True,
    output_scale: bool = True,
    scale: float | None = None,
    coefficients: tuple[float, float, float] = (0.5, 1.0, 1.0),
) -> Tensor:
    """TaylorShift attention (arXiv 2403.02920): softmax attention with exp replaced by
    f(x) = a x^2 + b x + c, computed exactly in O(M N d) ("direct") or O((M + N) d^3)
    ("efficient") time.

    Args:
        q: (B, H, M, d) queries; k: (B, H, N, d) keys; v: (B, H, N, e) values, as in
            F.scaled_dot_product_attention. float16, bfloat16 (computed with float32
            accumulation), float32 or float64.
        temperature: (H,) per-head temperature tau; None means ones.
        key_padding_mask: (B, N) bool, **True = padding (ignored)**, the nn.MultiheadAttention
            convention.
        attn_mask: bool, broadcastable to (B, H, M, N), **True = not allowed to attend** (the
            nn.MultiheadAttention convention, the opposite of SDPA's). Additive float masks do
            not apply: the weights are a polynomial of the logits, not exp. Direct mode only.
        causal: query i attends keys j <= i (top-left aligned, as SDPA). Direct mode only.
        mode: "direct", "efficient", or "auto", which picks the cheaper one for these sizes on
            this device (see taylorshift.crossover), and "direct" for attn_mask or causal.
        normalize: logits tau * cos(q_i, k_j) (the paper's); else tau * scale * q_i . k_j.
        output_scale: multiply row i by sqrt(N_i / d), N_i its number of valid keys (the paper's).
        scale: logit scale when normalize=False, default 1/sqrt(d).
        coefficients: (a, b, c) with a > 0 and c > b^2 / (4a), so that every weight is positive.

    Returns:
        (B, H, M, e). A query whose keys are all masked gets zeros (its output is undefined).
    """
    if len(coefficients) != 3:
        raise ValueError(f"taylorshift: coefficients must be (a, b, c), got {coefficients!r}")
    a, b, c = (float(x) for x in coefficients)
    # The positional order of the taylorshift::attention schema, shared with the fallback.
    args = (q, k, v, temperature, key_padding_mask, attn_mask, causal, mode, normalize)
    args += (output_scale, scale, a, b, c)
    if _extension.available:
        return torch.ops.taylorshift.attention(*args)
    return _reference_attention(*args)


def _reference_attention(
    q, k, v, temperature, key_padding_mask, attn_mask, causal, mode, normalize, output_scale,
    scale, a, b, c,
):  # fmt: skip
    """Fallback without the compiled extension: the reference, switching at the paper's N0."""
    options = {
        "key_padding_mask": key_padding_mask,
        "normalize": normalize,
        "output_scale": output_scale,
        "scale": scale,
        "coefficients": (a, b, c),
    }
    needs_direct = attn_mask is not None or causal
    if mode == "efficient" and needs_direct:
        raise NotImplementedError("taylorshift: attn_mask and causal need mode='direct'")
    if (
        mode == "direct"
        or needs_direct
        or (mode == "auto" and k.shape[2] < paper_thresholds(q.shape[-1])[0])
    ):
        return reference.direct(q, k, v, temperature, attn_mask=attn_mask, causal=causal, **options)
    return reference.efficient(q, k, v, temperature, **options)
