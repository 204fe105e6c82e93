"""Forward values of both algorithms against the float64 reference, and docs/math.md §5's properties."""

import math

import pytest
import torch
from ts_testing import (
    F64_TOL,
    LOW_PRECISION,
    MODES,
    assert_matches_reference,
    attention,
    make_inputs,
    random_key_padding_mask,
    reference64,
)

from taylorshift import reference

# (B, H, M, N, d, e). CPU blocks are 64 queries / 512 keys (direct) and 64-token feature chunks
# (efficient): the sizes straddle them (63, 65, 257, 300, 600), and include N = 1, M = 1, M != N,
# e != d, odd d, d = 64 (2145 features per token in the efficient algorithm) and a longer
# sequence. With B H = 1 the direct backward splits one head's queries over the threads.
SHAPES = [
    (2, 3, 63, 65, 8, 8),
    (1, 2, 65, 257, 16, 12),
    (2, 1, 300, 1, 8, 4),
    (1, 1, 1, 300, 4, 8),
    (1, 2, 257, 63, 32, 32),
    (2, 2, 17, 19, 3, 5),
    (1, 1, 70, 70, 64, 64),
    (1, 2, 64, 2048, 8, 8),
    (1, 1, 130, 600, 8, 8),
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_float64_matches_reference(device, mode, shape):
    q, k, v, t = make_inputs(*shape, device=device)
    assert_matches_reference(attention(q, k, v, t, mode=mode), q, k, v, t, mode=mode)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_low_precision_error_within_twice_torch_reference(device, dtype, mode, shape):
    q, k, v, t = make_inputs(*shape, dtype=dtype, device=device)
    assert_matches_reference(attention(q, k, v, t, mode=mode), q, k, v, t, mode=mode)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_with_key_padding_mask(device, dtype, mode):
    q, k, v, t = make_inputs(2, 2, 65, 257, 16, dtype=dtype, device=device, seed=3)
    mask = random_key_padding_mask(2, 257, device=device)
    out = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    assert_matches_reference(out, q, k, v, t, key_padding_mask=mask, mode=mode)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_direct_equals_efficient_float64(device, shape, masked):
    q, k, v, t = make_inputs(*shape, device=device, seed=5)
    mask = random_key_padding_mask(shape[0], shape[3], device=device) if masked else None
    direct = attention(q, k, v, t, key_padding_mask=mask, mode="direct")
    efficient = attention(q, k, v, t, key_padding_mask=mask, mode="efficient")
    # docs/math.md §5: the two algorithms agree to ~1e-12 relative in float64.
    torch.testing.assert_close(
        efficient, direct, rtol=1e-12, atol=1e-12 * direct.abs().max().item()
    )


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
def test_reference_efficient_equals_reference_direct(masked):
    q, k, v, t = make_inputs(2, 2, 33, 70, 8, 6, seed=7)
    mask = random_key_padding_mask(2, 70) if masked else None
    for options in [{}, {"normalize": False, "scale": 0.3}, {"coefficients": (0.3, -0.5, 1.0)}]:
        direct = reference.direct(q, k, v, t, key_padding_mask=mask, **options)
        efficient = reference.efficient(q, k, v, t, key_padding_mask=mask, **options)
        torch.testing.assert_close(efficient, direct, rtol=1e-12, atol=1e-12)


def test_auto_matches_reference(device):
    for shape in [(1, 2, 20, 20, 8, 8), (1, 1, 200, 200, 4, 4)]:
        q, k, v, t = make_inputs(*shape, device=device)
        assert_matches_reference(attention(q, k, v, t), q, k, v, t)


@pytest.mark.parametrize("mode", MODES)
def test_temperature_none_means_ones(device, mode):
    q, k, v, _ = make_inputs(2, 3, 9, 11, 5, device=device)
    ones = torch.ones(3, dtype=q.dtype, device=device)
    torch.testing.assert_close(attention(q, k, v, mode=mode), attention(q, k, v, ones, mode=mode))
    assert_matches_reference(attention(q, k, v, mode=mode), q, k, v, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_negative_and_large_temperature(device, mode):
    q, k, v, _ = make_inputs(1, 3, 9, 11, 5, device=device)
    t = torch.tensor([-2.0, 0.1, 7.5], dtype=q.dtype, device=device)
    assert_matches_reference(attention(q, k, v, t, mode=mode), q, k, v, t, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(device, mode):
    # (B, tokens, H, dim) layouts transposed to (B, H, tokens, dim), as after a projection + view.
    generator = torch.Generator().manual_seed(11)
    q, k, v = (
        torch.randn(2, tokens, 3, dim, generator=generator, dtype=torch.float64)
        .to(device)
        .transpose(1, 2)
        for tokens, dim in [(7, 4), (9, 4), (9, 5)]
    )
    t = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64, device=device)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    assert_matches_reference(attention(q, k, v, t, mode=mode), q, k, v, t, mode=mode)


# ---- docs/math.md §5 properties -------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_invariant_to_positive_scaling_of_q_and_k(device, mode):
    q, k, v, t = make_inputs(2, 2, 31, 29, 8, device=device)
    base = attention(q, k, v, t, mode=mode)
    torch.testing.assert_close(attention(q * 37.5, k, v, t, mode=mode), base, **F64_TOL)
    torch.testing.assert_close(attention(q, k * 1e-3, v, t, mode=mode), base, **F64_TOL)
    # Per-token factors too: cosine logits do not see the norm of any q_i or k_j.
    factors = torch.rand(2, 2, 29, 1, dtype=q.dtype, device=device) + 0.1
    torch.testing.assert_close(attention(q, k * factors, v, t, mode=mode), base, **F64_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_not_invariant_to_scaling_without_normalize(device, mode):
    q, k, v, t = make_inputs(1, 2, 7, 9, 4, device=device)
    base = attention(q, k, v, t, mode=mode, normalize=False)
    scaled = attention(q * 3, k, v, t, mode=mode, normalize=False)
    assert (scaled - base).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_zero_temperature_gives_scaled_mean_of_valid_values(device, mode):
    batch, heads, queries, keys, d, e = 2, 3, 13, 70, 6, 5
    q, k, v, _ = make_inputs(batch, heads, queries, keys, d, e, device=device)
    mask = random_key_padding_mask(batch, keys, device=device)
    zero = torch.zeros(heads, dtype=q.dtype, device=device)
    out = attention(q, k, v, zero, key_padding_mask=mask, mode=mode)
    valid = (~mask).to(v.dtype).view(batch, 1, keys, 1)
    count = valid.sum(2, keepdim=True)
    expected = (v * valid).sum(2, keepdim=True) / count * (count / d).sqrt()
    torch.testing.assert_close(out, expected.expand_as(out), **F64_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_normalize_false_with_scale(device, mode):
    q, k, v, t = make_inputs(2, 2, 21, 23, 8, 4, device=device)
    options = {"normalize": False, "scale": 0.2}
    out = attention(q, k, v, t, mode=mode, **options)
    assert_matches_reference(out, q, k, v, t, **options, mode=mode)
    # The logits are tau * scale * q.k: folding the scale into q must give the same numbers.
    folded = attention(q * 0.2, k, v, t, mode=mode, normalize=False, scale=1.0)
    torch.testing.assert_close(out, folded, **F64_TOL)
    # Default scale is 1/sqrt(d).
    default = attention(q, k, v, t, mode=mode, normalize=False)
    explicit = attention(q, k, v, t, mode=mode, normalize=False, scale=1 / math.sqrt(8))
    torch.testing.assert_close(default, explicit, **F64_TOL)
    assert (default - out).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_output_scale_false(device, mode):
    q, k, v, t = make_inputs(2, 2, 21, 50, 8, 4, device=device)
    mask = random_key_padding_mask(2, 50, device=device)
    plain = attention(q, k, v, t, key_padding_mask=mask, mode=mode, output_scale=False)
    assert_matches_reference(
        plain, q, k, v, t, key_padding_mask=mask, output_scale=False, mode=mode
    )
    scaled = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    sigma = ((~mask).sum(1).to(q.dtype) / 8).sqrt().view(2, 1, 1, 1)
    torch.testing.assert_close(scaled, plain * sigma, **F64_TOL)


@pytest.mark.parametrize("coefficients", [(0.25, -0.3, 2.0), (1.0, 0.0, 0.1), (2.0, 3.0, 1.2)])
@pytest.mark.parametrize("mode", MODES)
def test_non_default_coefficients(device, mode, coefficients):
    q, k, v, t = make_inputs(2, 2, 65, 67, 8, 4, device=device)
    out = attention(q, k, v, t, mode=mode, coefficients=coefficients)
    assert_matches_reference(out, q, k, v, t, coefficients=coefficients, mode=mode)
    assert (out - attention(q, k, v, t, mode=mode)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_single_key_returns_scaled_value(device, mode):
    # N = 1: every weight is f(x) / f(x) = 1, so y_i = sqrt(1/d) v_0 for any q.
    q, k, v, t = make_inputs(2, 2, 70, 1, 4, 3, device=device)
    out = attention(q, k, v, t, mode=mode)
    torch.testing.assert_close(out, (v / 2).expand_as(out), **F64_TOL)


@pytest.mark.parametrize("mode", MODES)
def test_zero_queries_give_empty_output(device, mode):
    q, k, v, t = make_inputs(2, 2, 0, 5, 4, 3, device=device)
    assert attention(q, k, v, t, mode=mode).shape == (2, 2, 0, 3)


@pytest.mark.parametrize("mode", MODES)
def test_nan_in_query_gives_nan_row_without_crash(device, mode):
    q, k, v, t = make_inputs(2, 2, 9, 11, 4, device=device)
    q[1, 0, 3, 2] = float("nan")
    out = attention(q, k, v, t, mode=mode)
    assert out[1, 0, 3].isnan().all()
    # Other queries do not see it.
    others = torch.ones_like(out, dtype=torch.bool)
    others[1, 0, 3] = False
    assert out[others].isfinite().all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tensor", ["k", "v"])
def test_nan_in_key_or_value_gives_nan_head(device, mode, tensor):
    q, k, v, t = make_inputs(2, 2, 9, 11, 4, device=device)
    {"k": k, "v": v}[tensor][0, 1, 5, 0] = float("nan")
    out = attention(q, k, v, t, mode=mode)
    if tensor == "k":  # every weight of the head's rows, hence every output, is NaN
        assert out[0, 1].isnan().all()
    else:  # the NaN value column spreads to that column of every row
        assert out[0, 1, :, 0].isnan().all()
    assert out[1].isfinite().all() and out[0, 0].isfinite().all()


def test_reference64_helper_is_float64_cpu():
    # The oracle itself: one hand-computed case (d = 1, two keys, tau = 1).
    q = torch.tensor([[[[1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[2.0], [-3.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0], [5.0]]]], dtype=torch.float64)
    # cos = +1 and -1: f(1) = 2.5, f(-1) = 0.5; y = sqrt(2/1) (2.5 * 1 + 0.5 * 5) / 3.
    expected = math.sqrt(2.0) * (2.5 + 2.5) / 3.0
    assert reference64(q, k, v).item() == pytest.approx(expected, rel=1e-15)
    assert attention(q, k, v).item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic(device, mode):
    q, k, v, t = make_inputs(2, 3, 130, 300, 8, 8, dtype=torch.float32, device=device)
    mask = random_key_padding_mask(2, 300, device=device)
    first = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    second = attention(q, k, v, t, key_padding_mask=mask, mode=mode)
    assert torch.equal(first, second)
    # Each (batch, head) is computed independently: a batch of one gives the same numbers, up to
    # float32 rounding (the efficient path differs in the last bit when the batch changes,
    # measured 1.8e-7 = 1.5 ulp; a real indexing mistake would be off by O(1)).
    alone = attention(q[1:], k[1:], v[1:], t, key_padding_mask=mask[1:], mode=mode)
    torch.testing.assert_close(alone, first[1:], rtol=1e-6, atol=1e-6)
