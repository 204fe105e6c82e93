"""Taylor order k: the weight polynomial of any order in direct mode (1-8), orders 1-3 in efficient
mode (symmetric features of degree <= k), against the float64 reference of the definition; the
positivity rule and the argument checks; the cost model per order; the module options."""

from __future__ import annotations

import math

import pytest
import torch
from ts_testing import (
    assert_matches_reference,
    attention,
    make_inputs,
    random_attn_mask,
    random_key_padding_mask,
)

import taylorshift
from taylorshift import reference
from taylorshift.functional import resolve_coefficients

DIRECT_ORDERS = (1, 2, 3, 4)
EFFICIENT_ORDERS = (1, 2, 3)
# Non-Taylor polynomials: an odd order positive on [-1.5, 1.5] and an even one positive on R.
CUSTOM = {3: (0.1, 0.2, 0.5, 1.0), 4: (0.3, 0.1, -0.2, 0.4, 0.8)}


def _in_range(temperature, order):
    """make_inputs' temperatures lie in [0.5, 1.5]; order 1's weights 1 + x need |x| <= 1 (the
    cubic's root is near -1.596, so order 3 takes them as they are)."""
    if order != 1:
        return temperature
    with torch.no_grad():
        return (temperature * 0.6).requires_grad_(temperature.requires_grad)


def _masks(kind: str, batch: int, heads: int, queries: int, keys: int) -> dict:
    if kind == "padding":
        return {"key_padding_mask": random_key_padding_mask(batch, keys)}
    if kind == "attn_mask":
        return {"attn_mask": random_attn_mask(batch, heads, queries, keys)}
    if kind == "causal":
        return {"causal": True, "key_padding_mask": random_key_padding_mask(batch, keys)}
    return {}


def test_taylor_coefficients_and_resolution():
    assert reference.taylor_coefficients(2) == (0.5, 1.0, 1.0)
    assert reference.taylor_coefficients(3) == pytest.approx((1 / 6, 0.5, 1.0, 1.0))
    assert resolve_coefficients() == (0.5, 1.0, 1.0)
    assert resolve_coefficients(order=1) == (1.0, 1.0)
    assert resolve_coefficients(coefficients=(1, 2)) == (1.0, 2.0)
    assert resolve_coefficients(3, (0.1, 0.2, 0.3, 0.4)) == (0.1, 0.2, 0.3, 0.4)


@pytest.mark.parametrize("masks", ["none", "padding", "attn_mask", "causal"])
@pytest.mark.parametrize("order", DIRECT_ORDERS)
def test_direct_matches_reference_float64(device, order, masks):
    q, k, v, t = make_inputs(2, 2, 9, 11, 8, 5, device=device, seed=order)
    t = _in_range(t, order)
    options = _masks(masks, 2, 2, 9, 11)
    options = {name: x.to(device) if torch.is_tensor(x) else x for name, x in options.items()}
    out = attention(q, k, v, t, mode="direct", order=order, **options)
    assert_matches_reference(
        out, q, k, v, t, coefficients=reference.taylor_coefficients(order), **options
    )


@pytest.mark.parametrize("order", sorted(CUSTOM))
def test_direct_custom_coefficients_float64(device, order):
    q, k, v, t = make_inputs(1, 2, 7, 10, 6, device=device, seed=10 + order)
    t = _in_range(t, order)
    coefficients = CUSTOM[order]
    out = attention(q, k, v, t, mode="direct", coefficients=coefficients)
    assert_matches_reference(out, q, k, v, t, coefficients=coefficients)


@pytest.mark.parametrize("order", range(5, 9))
def test_direct_high_orders_float64(order):
    q, k, v, t = make_inputs(1, 2, 6, 13, 4, seed=order)
    t = _in_range(t, order)
    out = attention(q, k, v, t, mode="direct", order=order)
    assert_matches_reference(out, q, k, v, t, coefficients=reference.taylor_coefficients(order))


@pytest.mark.parametrize("padding", [False, True], ids=["unmasked", "padding"])
@pytest.mark.parametrize("order", EFFICIENT_ORDERS)
def test_efficient_matches_reference_float64(order, padding):
    # Sizes past one CPU token chunk (256 tokens at d <= 32).
    q, k, v, t = make_inputs(1, 2, 300, 270, 6, 5, seed=order)
    t = _in_range(t, order)
    options = {"key_padding_mask": random_key_padding_mask(1, 270)} if padding else {}
    out = attention(q, k, v, t, mode="efficient", order=order, **options)
    coefficients = reference.taylor_coefficients(order)
    assert_matches_reference(out, q, k, v, t, coefficients=coefficients, **options)
    if order in CUSTOM:
        out = attention(q, k, v, t, mode="efficient", coefficients=CUSTOM[order], **options)
        assert_matches_reference(out, q, k, v, t, coefficients=CUSTOM[order], **options)


@pytest.mark.parametrize("order", EFFICIENT_ORDERS)
def test_efficient_state_has_the_order_features(order):
    q, k, v, _ = make_inputs(2, 3, 5, 7, 4, 3)
    coefficients = list(reference.taylor_coefficients(order))
    _, den, state = torch.ops.taylorshift.efficient_forward(q, k, v, None, True, coefficients)
    assert state.shape == (2, 3, math.comb(4 + order, order), 4)
    # Column 0 of the constant feature's row counts the keys.
    assert torch.equal(state[:, :, 0, 0], torch.full((2, 3), 7.0, dtype=torch.float64))
    assert den.shape == (2, 3, 5)


@pytest.mark.parametrize("order", (1, 2))
def test_efficient_small_gradients_match_reference(device, order):
    """Forward and backward of a small case against the float64 reference's autograd (on CUDA,
    and under its CPU emulation, order 1 runs the order-2 kernels with a = 0 and slices the state)."""
    q, k, v, t = make_inputs(2, 2, 9, 12, 8, 6, device=device, seed=order, requires_grad=True)
    t = _in_range(t, order)
    mask = random_key_padding_mask(2, 12, device=device)
    coefficients = reference.taylor_coefficients(order)
    out = attention(q, k, v, t, mode="efficient", order=order, key_padding_mask=mask)
    exact = reference.direct(q, k, v, t, key_padding_mask=mask, coefficients=coefficients)
    torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    grad_out = grad_out.to(device)
    ours = torch.autograd.grad(out, (q, k, v, t), grad_out)
    expected = torch.autograd.grad(exact, (q, k, v, t), grad_out)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _gradcheck(mode, order, device="cpu", masked=True, shape=(1, 2, 4, 5, 3)):
    batch, keys = shape[0], shape[3]
    q, k, v, t = make_inputs(*shape, device=device, seed=order, requires_grad=True)
    t = _in_range(t, order)
    options = {"mode": mode, "order": order}
    if masked:
        options["key_padding_mask"] = random_key_padding_mask(batch, keys, device=device)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: attention(q, k, v, t, **options), (q, k, v, t), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("order", (1, 3, 4))
def test_gradcheck_direct(device, order):
    _gradcheck("direct", order, device)


@pytest.mark.parametrize("order", (1, 3))
def test_gradcheck_efficient(order):
    _gradcheck("efficient", order)


def test_gradcheck_direct_causal_order_3():
    q, k, v, t = make_inputs(1, 1, 5, 5, 3, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, t: attention(q, k, v, t, mode="direct", order=3, causal=True),
        (q, k, v, t),
    )


# Direct's order 6 reaches the CUDA forward's Horner kernel of order 8 (csrc/cuda/direct.cu,
# kHornerOrders), as 1 and 3 reach those of orders 1 and 4; the efficient kernels' features of
# order 6 would be too many at d = 16.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "mode,order", [("direct", 1), ("direct", 3), ("direct", 6), ("efficient", 1), ("efficient", 3)]
)
def test_low_precision_within_pytorch_error(device, mode, order, dtype):
    q, k, v, t = make_inputs(2, 2, 64, 80, 16, dtype=dtype, device=device, seed=order)
    t = _in_range(t, order)
    mask = random_key_padding_mask(2, 80, device=device)
    if device == "cuda" and mode == "efficient" and order > 2:
        with pytest.raises(NotImplementedError, match="supports orders 1 to 2"):
            attention(q, k, v, t, mode=mode, order=order, key_padding_mask=mask)
        return
    out = attention(q, k, v, t, mode=mode, order=order, key_padding_mask=mask)
    coefficients = reference.taylor_coefficients(order)
    assert_matches_reference(
        out, q, k, v, t, mode=mode, coefficients=coefficients, key_padding_mask=mask
    )


@pytest.mark.parametrize("order", (1, 3))
def test_low_precision_gradients_direct(order):
    """float32 gradients within 2x PyTorch's own float32 error (plus 2 ulps) of float64's."""
    q, k, v, t = make_inputs(1, 2, 33, 40, 8, seed=order)
    t = _in_range(t, order)
    coefficients = reference.taylor_coefficients(order)
    grads = {}
    for name, dtype, fn in (
        ("exact", torch.float64, reference.direct),
        ("torch", torch.float32, reference.direct),
        ("ours", torch.float32, None),
    ):
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v, t)]
        if fn is None:
            out = attention(*inputs, mode="direct", order=order)
        else:
            out = fn(*inputs, coefficients=coefficients)
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        grads[name] = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    for exact, theirs, ours in zip(grads["exact"], grads["torch"], grads["ours"], strict=True):
        reference_error = (theirs.double() - exact).abs().max().item()
        error = (ours.double() - exact).abs().max().item()
        floor = 2 * torch.finfo(torch.float32).eps * exact.abs().max().item()
        assert error <= 2 * reference_error + floor, (error, reference_error)


def test_order_2_is_the_default_and_the_papers_coefficients():
    q, k, v, t = make_inputs(1, 2, 6, 8, 4)
    default = attention(q, k, v, t)
    assert torch.equal(attention(q, k, v, t, order=2), default)
    assert torch.equal(attention(q, k, v, t, coefficients=(0.5, 1.0, 1.0)), default)
    assert torch.equal(attention(q, k, v, t, order=2, coefficients=(0.5, 1, 1)), default)


# --- bad orders and coefficients -----------------------------------------------------------


@pytest.fixture
def qkv():
    return make_inputs(1, 2, 4, 6, 4)[:3]


@pytest.mark.parametrize("order", [0, -1, 9, 2.0, 2.5, True, "2"])
def test_bad_order(qkv, order):
    with pytest.raises(ValueError, match="order must be an int from 1 to 8"):
        attention(*qkv, order=order)


@pytest.mark.parametrize("coefficients", [(), (1.0,), (1.0,) * 10])
def test_bad_coefficient_count(qkv, coefficients):
    with pytest.raises(ValueError, match="coefficients must list the k \\+ 1 coefficients"):
        attention(*qkv, coefficients=coefficients)


def test_operator_rejects_bad_coefficient_count(qkv):
    q, k, v = qkv
    for coefficients in ([1.0], [1.0] * 10):
        with pytest.raises(ValueError, match="for an order k from 1 to 8"):
            torch.ops.taylorshift.direct_forward(q, k, v, None, None, False, True, coefficients)


def test_mismatched_order_and_coefficients(qkv):
    with pytest.raises(ValueError, match=r"order=3 needs 4 coefficients"):
        attention(*qkv, order=3, coefficients=(0.5, 1.0, 1.0))


@pytest.mark.parametrize(
    "coefficients, message",
    [
        ((-1.0, 0.0, 0.0, 0.0, 1.0), "need a positive leading coefficient c_k > 0"),
        ((1.0, 0.0, -3.0, 0.0, 1.0), "not positive for every x"),  # x^4 - 3x^2 + 1
        ((1.0, 0.0, 0.0, 0.0, 0.0), "not positive for every x"),  # x^4: zero at 0
        ((1.0, 0.0, 1.0, 0.0, -0.1, 0.0, 0.0), "not positive for every x"),
    ],
)
def test_even_order_must_be_positive_everywhere(qkv, coefficients, message):
    for mode in ("direct", "auto"):
        with pytest.raises(ValueError, match=message):
            attention(*qkv, mode=mode, coefficients=coefficients)


def test_even_order_positivity_checked_in_the_compute_dtype(qkv):
    # f = (x^2 - 1)^2 + 1e-12: positive in float64, f(+-1) = 0 in float32.
    coefficients = (1.0, 0.0, -2.0, 0.0, 1.0 + 1e-12)
    q, k, v = qkv
    attention(q, k, v, mode="direct", coefficients=coefficients)
    with pytest.raises(ValueError, match="checked in torch.float32"):
        attention(q.float(), k.float(), v.float(), mode="direct", coefficients=coefficients)


def test_odd_order_needs_bounded_logits(qkv):
    with pytest.raises(ValueError, match="with normalize=False the logits are unbounded"):
        attention(*qkv, order=3, normalize=False)


@pytest.mark.parametrize(
    "order, coefficients, safe, unsafe",
    [
        (1, None, 1.0, 1.01),  # 1 + x: >= 0 on [-1, 1], zero at -1 allowed
        (3, None, 1.59, 1.6),  # root of the cubic Taylor polynomial near -1.596
        (3, (1.0, 0.0, -1.0, 0.3), 0.3, 0.6),  # x^3 - x + 0.3 < 0 at its minimum 1/sqrt(3)
    ],
)
def test_odd_order_range_follows_the_temperature(qkv, order, coefficients, safe, unsafe):
    q, k, v = qkv
    options = {"order": order, "coefficients": coefficients, "mode": "direct"}
    out = attention(q, k, v, torch.tensor([safe, -safe / 2], dtype=q.dtype), **options)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"must be positive on the logits' range \[-"):
        attention(q, k, v, torch.tensor([safe / 2, -unsafe], dtype=q.dtype), **options)


def test_odd_order_without_temperature_has_range_one(qkv):
    attention(*qkv, order=1)  # 1 + x on [-1, 1]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        attention(*qkv, coefficients=(1.0, 0.9))


def test_efficient_rejects_orders_past_its_limit(qkv):
    with pytest.raises(NotImplementedError, match="supports orders 1 to 3"):
        attention(*qkv, mode="efficient", order=4)


# --- mode="auto" and the cost model -----------------------------------------------------------


def test_crossover_grows_with_the_order():
    for d in (8, 16, 32):
        values = [taylorshift.crossover(d, order=order) for order in EFFICIENT_ORDERS]
        assert values[0] < values[1] < values[2], (d, values)
        assert values[1] == taylorshift.crossover(d)
    with pytest.raises(ValueError, match="no crossover"):
        taylorshift.crossover(16, order=4)
    with pytest.raises(ValueError, match="no crossover"):
        taylorshift.crossover(16, "cuda", order=3)


def test_flops_count_the_order_features():
    d, e, m, n = 16, 12, 100, 300
    for order in (1, 2, 3):
        features = math.comb(d + order, order)
        forward = 2 * (m + n) * features * (e + 1)
        assert taylorshift.flops("efficient", m, n, d, e, backward=False, order=order) == forward
        assert taylorshift.flops("efficient", m, n, d, e, order=order) == 3 * forward
        assert taylorshift.flops("direct", m, n, d, e, order=order) == taylorshift.flops(
            "direct", m, n, d, e
        )


@pytest.mark.parametrize("order", (1, 3))
def test_auto_switches_at_the_order_crossover(order):
    d = 4
    n = taylorshift.crossover(d, order=order)
    for length, expected in ((n - 1, "direct"), (n, "efficient")):
        q, k, v, t = make_inputs(1, 1, length, length, d)
        t = _in_range(t, order)
        auto = attention(q, k, v, t, order=order)
        chosen = attention(q, k, v, t, order=order, mode=expected)
        assert torch.equal(auto, chosen), f"N = {length}: auto did not run {expected}"


def test_auto_runs_direct_for_orders_without_efficient_form():
    q, k, v, t = make_inputs(1, 1, 600, 600, 4)
    auto = attention(q, k, v, t, order=5)
    assert torch.equal(auto, attention(q, k, v, t, order=5, mode="direct"))


# --- modules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", (1, 3))
def test_module_order(order):
    torch.manual_seed(0)
    module = taylorshift.TaylorShiftAttention(16, 2, batch_first=True, order=order).double()
    assert module.coefficients == reference.taylor_coefficients(order)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    out, weights = module(x, x, x, need_weights=True)
    q, k, v = (module._heads(p) for p in module._projections(x, x, x, self_attention=True))
    expected = reference.direct(q, k, v, module.temperature, coefficients=module.coefficients)
    expected = module.out_proj(expected.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert weights.shape == (2, 7, 7)
    with pytest.raises(ValueError, match="order=1 needs 2 coefficients"):
        taylorshift.TaylorShiftAttention(16, 2, order=1, coefficients=(0.5, 1.0, 1.0))


def test_replace_attention_passes_the_order():
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(8, 2))
    taylorshift.replace_attention(model, order=3, mode="direct")
    assert model[0].coefficients == reference.taylor_coefficients(3)
