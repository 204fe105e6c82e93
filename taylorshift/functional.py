"""taylor_shift_attention: the functional entry point."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taylorshift import _extension, reference
from taylorshift.bias import biased_direct_attention, check_mode
from taylorshift.crossover import paper_thresholds

MAX_ORDER = 8  # the kernels' capacity (csrc/features.h kMaxOrder)
MAX_EFFICIENT_ORDER = {"cpu": 3, "cuda": 2}  # csrc/kernel_checks.h


def resolve_coefficients(
    order: int | None = None, coefficients: Sequence[float] | None = None
) -> tuple[float, ...]:
    """The weight polynomial's coefficients, highest degree first, from `order` and/or
    `coefficients`: order k alone is the Taylor polynomial of exp (1/k!, ..., 1/1!, 1); the
    coefficients alone have order len - 1; both must agree; neither is order 2, (0.5, 1, 1)."""
    if order is not None and (
        isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_ORDER
    ):
        raise ValueError(
            f"taylorshift: order must be an int from 1 to {MAX_ORDER} (the kernels' limit), "
            f"got {order!r}"
        )
    if coefficients is None:
        return reference.taylor_coefficients(2 if order is None else order)
    coefficients = tuple(float(x) for x in coefficients)
    if not 2 <= len(coefficients) <= MAX_ORDER + 1:
        raise ValueError(
            "taylorshift: coefficients must list the k + 1 coefficients of the weight "
            f"polynomial, highest degree first, for an order k from 1 to {MAX_ORDER} (the "
            f"kernels' limit); got {len(coefficients)} coefficients"
        )
    if order is not None and len(coefficients) != order + 1:
        raise ValueError(
            f"taylorshift: order={order} needs {order + 1} coefficients (highest degree "
            f"first), got {len(coefficients)}: {coefficients!r}"
        )
    return coefficients


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
    order: int | None = None,
    coefficients: Sequence[float] | None = None,
) -> Tensor:
    """TaylorShift attention (arXiv 2403.02920): softmax attention with exp replaced by a
    polynomial f, by default the Taylor polynomial of order 2, 1 + x + x^2 / 2, computed exactly
    in O(M N d) ("direct") or O((M + N) d^3) ("efficient", order 2; O((M + N) d^(k+1)) for
    order k) time.

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
        causal: query i attends keys j <= i (top-left aligned, as SDPA). With
            mode="efficient" in time linear in N, by chunks of 128 tokens (a running state
            across chunks, the direct form inside each); that needs M = N. For token-by-token
            generation use taylorshift.CausalState.
        mode: "direct", "efficient", or "auto", which picks the cheaper one for these sizes on
            this device and order (see taylorshift.crossover; causal too, where M = N), and
            "direct" for attn_mask or an order the efficient algorithm lacks (it has orders 1-3
            on the CPU, 1-2 on CUDA; direct has 1-8).
        normalize: logits tau * cos(q_i, k_j) (the paper's); else tau * scale * q_i . k_j.
        output_scale: multiply row i by sqrt(N_i / d), N_i its number of valid keys (the paper's).
        scale: logit scale when normalize=False, default 1/sqrt(d).
        order: the Taylor order k (1 to 8), f(x) = sum_n x^n / n!. Default 2.
        coefficients: f's k + 1 coefficients, highest degree first ((a, b, c) for order 2,
            f = a x^2 + b x + c); with `order` too, their number must be order + 1. The weights
            must be positive wherever the logits can be: an even order needs f > 0 for every x
            (order 2: a > 0 and c > b^2 / (4a)); an odd order turns negative for large |x|,
            so it needs normalize=True (|x| <= |temperature|) and f >= 0 on
            [-max |temperature|, max |temperature|], positive inside (checked each call: a host
            read of the temperature). Checked in the dtype the kernels compute in.

    Returns:
        (B, H, M, e). A query whose keys are all masked gets zeros (its output is undefined).
    """
    coefficients = resolve_coefficients(order, coefficients)
    if attn_mask is not None and attn_mask.is_floating_point():
        # An additive bias: direct TaylorShift in PyTorch operations (taylorshift/bias.py).
        check_mode(mode)
        _check_arguments(
            q, k, v, temperature, key_padding_mask, None, causal, mode, normalize, scale,
            coefficients,
        )  # fmt: skip
        return biased_direct_attention(
            q, k, v, temperature, bias=attn_mask, key_padding_mask=key_padding_mask,
            causal=causal, normalize=normalize, output_scale=output_scale, scale=scale,
            coefficients=coefficients,
        )  # fmt: skip
    # The positional order of the taylorshift::attention schema, shared with the fallback.
    args = (q, k, v, temperature, key_padding_mask, attn_mask, causal, mode, normalize)
    args += (output_scale, scale, list(coefficients))
    if _extension.available:
        return torch.ops.taylorshift.attention(*args)
    return _reference_attention(*args)


def _reference_attention(
    q, k, v, temperature, key_padding_mask, attn_mask, causal, mode, normalize, output_scale,
    scale, coefficients,
):  # fmt: skip
    """Fallback without the compiled extension: the same checks as the operator, then the
    reference, switching at the paper's N0 for order 2 (other orders: the direct reference,
    the same function)."""
    coefficients = tuple(coefficients)
    _check_arguments(
        q, k, v, temperature, key_padding_mask, attn_mask, causal, mode, normalize, scale,
        coefficients,
    )  # fmt: skip
    options = {
        "key_padding_mask": key_padding_mask,
        "normalize": normalize,
        "output_scale": output_scale,
        "scale": scale,
        "coefficients": coefficients,
    }
    order, limit = len(coefficients) - 1, MAX_EFFICIENT_ORDER.get(q.device.type, 2)
    _check(
        not (mode == "efficient" and order > limit),
        NotImplementedError,
        f"{'taylorshift' if causal else 'taylorshift::efficient_forward'}: the efficient algorithm supports orders 1 to {limit} "
        f"on this device (symmetric features of degree <= k), got order {order}; "
        f'use mode="direct" (any order up to {MAX_ORDER})',
    )
    # Causal: the direct reference computes the same function as the chunked form.
    needs_direct = attn_mask is not None or causal
    if (
        mode == "direct"
        or needs_direct
        or order != 2
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


def _coefficient_names(order: int) -> str:
    return "(a, b, c)" if order == 2 else f"(c_{order}, ..., c_0)"


def _coefficient_values(coefficients: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:g}" for x in coefficients) + ")"


def _horner(x: float, coefficients, dtype: torch.dtype) -> Tensor:
    """f(x) evaluated in `dtype`, as the kernels do (features.h taylor_weight)."""
    x_t = torch.tensor(x, dtype=dtype)
    w = torch.tensor(coefficients[0], dtype=dtype)
    for c in coefficients[1:]:
        w = w * x_t + torch.tensor(c, dtype=dtype)
    return w


def _real_roots(p: list[float], lo: float, hi: float) -> list[float]:
    """Real roots of p (highest degree first) in (lo, hi), as csrc/kernel_checks.h finds them:
    p is monotone between consecutive roots of p', where bisection finds its one root."""
    degree = len(p) - 1
    if degree < 1:
        return []

    def value(x: float) -> float:
        y = 0.0
        for c in p:
            y = y * x + c
        return y

    derivative = [(degree - i) * p[i] for i in range(degree)]
    points = [lo, *_real_roots(derivative, lo, hi), hi]
    roots = []
    for i in range(len(points) - 1):
        u, w = points[i], points[i + 1]
        if i > 0 and value(u) == 0:
            roots.append(u)
        if (value(u) < 0) == (value(w) < 0) or value(u) == 0 or value(w) == 0:
            continue
        rising = value(u) < 0
        for _ in range(200):
            mid = 0.5 * (u + w)
            if mid <= u or mid >= w:
                break
            if value(mid) == 0:
                u = w = mid
                break
            if (value(mid) < 0) == rising:
                u = mid
            else:
                w = mid
        roots.append(0.5 * (u + w))
    return roots


def _critical_points(coefficients: tuple[float, ...], lo: float, hi: float) -> list[float]:
    p = list(coefficients)
    while len(p) > 1 and p[0] == 0:
        p.pop(0)
    degree = len(p) - 1
    return _real_roots([(degree - i) * p[i] for i in range(degree)], lo, hi)


def _check_coefficients(coefficients: tuple[float, ...], dtype: torch.dtype) -> None:
    """csrc/kernel_checks.h check_coefficients: finite; an even order positive on all of R."""
    wide = reference.accumulate_dtype(dtype)
    order = len(coefficients) - 1
    names, got = _coefficient_names(order), _coefficient_values(coefficients)
    largest = torch.finfo(wide).max
    representable = all(math.isfinite(x) and abs(x) <= largest for x in coefficients)
    _check(
        representable,
        ValueError,
        f"taylorshift: coefficients {names} must be finite in ",
        wide,
        ", the dtype the kernels compute in; got ",
        got,
    )
    if order % 2 == 1:
        return  # bounded logits only: _check_logit_range
    leading = coefficients[0]
    _check(
        bool(torch.tensor(leading, dtype=wide) > 0),
        ValueError,
        f"taylorshift: coefficients {names}",
        " need a > 0, got a = "
        if order == 2
        else " of an even order need a positive leading coefficient c_k > 0, got c_k = ",
        f"{leading:g}",
    )
    bound = 1 + max(abs(c / leading) for c in coefficients[1:])
    positive = all(
        bool(_horner(x, coefficients, wide) > 0)
        for x in _critical_points(coefficients, -bound, bound)
    )
    _check(
        positive,
        ValueError,
        f"taylorshift: coefficients {names}",
        " need c > b^2 / (4a) so that the weights a x^2 + b x + c are positive for every x"
        if order == 2
        else " give weights f(x) that are not positive for every x, as an even order's must be",
        " (checked in ",
        wide,
        ", the dtype the kernels compute in); got ",
        got,
    )


def _check_logit_range(
    coefficients: tuple[float, ...], dtype: torch.dtype, normalize: bool, temperature
) -> None:
    """csrc/kernel_checks.h check_logit_range: an odd order needs bounded logits, on which f is
    >= 0 at the ends and > 0 inside."""
    order = len(coefficients) - 1
    if order % 2 == 0:
        return
    wide = reference.accumulate_dtype(dtype)
    _check(
        normalize,
        ValueError,
        f"taylorshift: order {order} is odd: its weights f(x) turn negative for large |x|, and "
        "with normalize=False the logits are unbounded; use normalize=True (logits in "
        "[-|temperature|, |temperature|]) or an even order",
    )
    radius = 1.0 if temperature is None else float(temperature.detach().abs().max())
    positive = all(bool(_horner(x, coefficients, wide) >= 0) for x in (radius, -radius))
    positive = positive and all(
        bool(_horner(x, coefficients, wide) > 0)
        for x in _critical_points(coefficients, -radius, radius)
    )
    _check(
        positive,
        ValueError,
        f"taylorshift: the weights of order {order} (odd) must be positive on the logits' range "
        f"[-{radius:g}, {radius:g}] (max |temperature| with normalize=True; checked in ",
        wide,
        ", the dtype the kernels compute in), but f(x) with coefficients ",
        _coefficient_names(order),
        " = ",
        _coefficient_values(coefficients),
        " is not; lower the temperature or use an even order",
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
    q, k, v, temperature, key_padding_mask, attn_mask, causal, mode, normalize, scale,
    coefficients,
):  # fmt: skip
    _check_tensors(q, k, v)
    _check_coefficients(coefficients, q.dtype)
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
    _check_logit_range(coefficients, q.dtype, normalize, temperature)
    _check(
        not (mode == "efficient" and attn_mask is not None),
        NotImplementedError,
        'taylorshift: mode="efficient" supports key_padding_mask and causal only; attn_mask needs mode="direct" (or "auto", which picks it)',
    )
    _check(
        not (mode == "efficient" and causal and q.shape[2] != k.shape[2]),
        ValueError,
        f'taylorshift: causal=True with mode="efficient" requires as many queries as keys (M = N), got M = {q.shape[2]}, N = {k.shape[2]}; mode="direct" takes causal with M != N (top-left aligned)',
    )
