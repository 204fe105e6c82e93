"""taylor_shift_attention: the functional entry point."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from taylorshift import _extension, reference
from taylorshift.bias import biased_direct_attention, check_mode
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
            nn.MultiheadAttention convention, the opposite of SDPA's). Direct mode only. A float
            attn_mask is an additive bias, as in softmax attention, where exp(x + bias) =
            exp(bias) exp(x): the weights become exp(bias_ij - max_j bias_ij) f(x_ij), so 0/-inf
            (and -1e9) masks mean what they mean for softmax and ALiBi decays with distance
            (taylorshift/bias.py; PyTorch operations, blockwise with recomputation).
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
    if attn_mask is not None and attn_mask.is_floating_point():
        # An additive bias: direct TaylorShift in PyTorch operations (taylorshift/bias.py).
        check_mode(mode)
        _check_arguments(
            q, k, v, temperature, key_padding_mask, None, causal, mode, normalize, scale, a, b, c
        )
        return biased_direct_attention(
            q, k, v, temperature, bias=attn_mask, key_padding_mask=key_padding_mask,
            causal=causal, normalize=normalize, output_scale=output_scale, scale=scale,
            coefficients=(a, b, c),
        )  # fmt: skip
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
    """Fallback without the compiled extension: the same checks as the operator, then the
    reference, switching at the paper's N0."""
    _check_arguments(
        q, k, v, temperature, key_padding_mask, attn_mask, causal, mode, normalize, scale, a, b, c
    )
    options = {
        "key_padding_mask": key_padding_mask,
        "normalize": normalize,
        "output_scale": output_scale,
        "scale": scale,
        "coefficients": (a, b, c),
    }
    needs_direct = attn_mask is not None or causal
    if (
        mode == "direct"
        or needs_direct
        or (mode == "auto" and k.shape[2] < paper_thresholds(q.shape[-1])[0])
    ):
        return reference.direct(q, k, v, temperature, attn_mask=attn_mask, causal=causal, **options)
    return reference.efficient(q, k, v, temperature, **options)


# The checks of the taylorshift::attention operator (csrc/attention.cpp and
# csrc/kernel_checks.h), for the fallback: the same order, exception types and messages, so that
# a program behaves the same with and without the extension (tests/test_fallback.py runs the
# bad-input suite both ways and compares the messages).


def _check(condition: bool, error: type[Exception], *message: object) -> None:
    if not condition:
        raise error("".join(str(part) for part in message))


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_tensors(q: Tensor, k: Tensor, v: Tensor) -> None:
    floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for t, name in ((q, "q (B, H, M, d)"), (k, "k (B, H, N, d)"), (v, "v (B, H, N, e)")):
        _check(
            t.dim() == 4,
            ValueError,
            "taylorshift: ",
            name,
            " must have 4 dimensions, got shape ",
            _shape(t),
        )
        _check(
            t.dtype in floating,
            TypeError,
            "taylorshift: ",
            name,
            " must be float16, bfloat16, float32 or float64, got ",
            t.dtype,
        )
    _check(
        q.dtype == k.dtype == v.dtype,
        TypeError,
        "taylorshift: q, k, v must have the same dtype, got ",
        q.dtype,
        ", ",
        k.dtype,
        ", ",
        v.dtype,
    )
    _check(
        q.device == k.device == v.device,
        ValueError,
        "taylorshift: q, k, v must be on the same device, got ",
        q.device,
        ", ",
        k.device,
        ", ",
        v.device,
    )
    shapes = f"{_shape(q)}, {_shape(k)}, {_shape(v)}"
    _check(
        q.shape[0] == k.shape[0] == v.shape[0],
        ValueError,
        "taylorshift: q, k, v must have the same batch size, got shapes ",
        shapes,
    )
    _check(
        q.shape[1] == k.shape[1] == v.shape[1],
        ValueError,
        "taylorshift: q, k, v must have the same number of heads, got shapes ",
        shapes,
    )
    _check(
        k.shape[2] == v.shape[2],
        ValueError,
        "taylorshift: k and v must have the same number of keys N, got shapes ",
        _shape(k),
        ", ",
        _shape(v),
    )
    _check(
        q.shape[3] == k.shape[3],
        ValueError,
        "taylorshift: q and k must have the same head dim d, got shapes ",
        _shape(q),
        ", ",
        _shape(k),
    )
    _check(k.shape[2] > 0, ValueError, "taylorshift: there must be at least one key (N = 0)")
    _check(
        q.shape[3] > 0 and v.shape[3] > 0,
        ValueError,
        "taylorshift: head dims must be positive, got d = ",
        q.shape[3],
        ", e = ",
        v.shape[3],
    )


def _check_coefficients(a: float, b: float, c: float, dtype: torch.dtype) -> None:
    wide = reference.accumulate_dtype(dtype)
    got = f"a = {a:g}, b = {b:g}, c = {c:g}"
    largest = torch.finfo(wide).max
    representable = all(math.isfinite(x) and abs(x) <= largest for x in (a, b, c))
    _check(
        representable,
        ValueError,
        "taylorshift: coefficients (a, b, c) must be finite in ",
        wide,
        ", the dtype the kernels compute in; got ",
        got,
    )
    a_t, b_t, c_t = (torch.tensor(x, dtype=wide) for x in (a, b, c))
    _check(
        bool(a_t > 0), ValueError, f"taylorshift: coefficients (a, b, c) need a > 0, got a = {a:g}"
    )
    minimum = c_t - b_t * b_t / (4 * a_t)
    _check(
        bool(minimum > 0),
        ValueError,
        "taylorshift: coefficients (a, b, c) need c > b^2 / (4a) so that the weights a x^2 + b x + c are positive for every x (checked in ",
        wide,
        ", the dtype the kernels compute in); got ",
        got,
    )


def _check_masks(q: Tensor, k: Tensor, temperature, key_padding_mask, attn_mask) -> None:
    heads = q.shape[1]
    if temperature is not None:
        t = temperature
        _check(
            t.dim() == 1 and t.shape[0] == heads,
            ValueError,
            f"taylorshift: temperature must have shape (H,) = ({heads},), got ",
            _shape(t),
        )
        _check(
            t.dtype.is_floating_point,
            TypeError,
            "taylorshift: temperature must be floating, got ",
            t.dtype,
        )
        _check(
            t.device == q.device,
            ValueError,
            "taylorshift: temperature is on ",
            t.device,
            " but q is on ",
            q.device,
        )
    if key_padding_mask is not None:
        m = key_padding_mask
        _check(
            m.dtype == torch.bool,
            TypeError,
            "taylorshift: key_padding_mask must be a bool tensor (True = padding, ignored), got ",
            m.dtype,
        )
        _check(
            m.dim() == 2 and tuple(m.shape) == (k.shape[0], k.shape[2]),
            ValueError,
            f"taylorshift: key_padding_mask must have shape (B, N) = ({k.shape[0]}, {k.shape[2]}), got ",
            _shape(m),
        )
        _check(
            m.device == k.device,
            ValueError,
            "taylorshift: key_padding_mask is on ",
            m.device,
            " but k is on ",
            k.device,
        )
    if attn_mask is not None:
        m = attn_mask
        _check(
            m.dtype == torch.bool,
            TypeError,
            "taylorshift: attn_mask must be a bool tensor (True = not allowed to attend), got ",
            m.dtype,
            ". Additive float masks do not apply to TaylorShift: its weights are the polynomial a x^2 + b x + c of the logits, not exp(x), so adding -inf to a logit makes its weight +inf instead of 0.",
        )
        target = [q.shape[0], heads, q.shape[2], k.shape[2]]
        sizes = list(m.shape)
        broadcastable = len(sizes) <= 4 and all(
            size in (1, goal) for size, goal in zip(reversed(sizes), reversed(target))
        )
        _check(
            broadcastable,
            ValueError,
            "taylorshift: attn_mask must be broadcastable to (B, H, M, N) = ",
            target,
            ", got ",
            _shape(m),
        )
        _check(
            m.device == q.device,
            ValueError,
            "taylorshift: attn_mask is on ",
            m.device,
            " but q is on ",
            q.device,
        )


def _check_arguments(
    q, k, v, temperature, key_padding_mask, attn_mask, causal, mode, normalize, scale, a, b, c
):  # fmt: skip
    _check_tensors(q, k, v)
    _check_coefficients(a, b, c, q.dtype)
    _check(
        mode in ("auto", "direct", "efficient"),
        ValueError,
        f'taylorshift: mode must be "auto", "direct" or "efficient", got "{mode}"',
    )
    _check(
        not (normalize and scale is not None),
        ValueError,
        "taylorshift: scale applies only with normalize=False (with normalize=True the logits are cosine similarities times temperature)",
    )
    _check_masks(q, k, temperature, key_padding_mask, attn_mask)
    _check(
        not (mode == "efficient" and (attn_mask is not None or causal)),
        NotImplementedError,
        'taylorshift: mode="efficient" supports key_padding_mask only; attn_mask and causal need mode="direct" (or "auto", which picks it)',
    )
