"""Hypothesis fuzzing of shapes, masks, modes and options: the op against the float64 reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ts_testing import DEVICES, F64_TOL, assert_matches_reference, reference64

import taylorshift

# Token counts concentrated around the block sizes (64 queries, 256 keys, 64-token chunks).
TOKENS = st.one_of(st.integers(1, 70), st.sampled_from([127, 128, 129, 255, 256, 257, 300]))
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # reproducible in CI; the examples still cover the space above
)


@st.composite
def problems(draw):
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    queries, keys = draw(TOKENS), draw(TOKENS)
    head_dim, value_dim = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    mode = draw(st.sampled_from(["direct", "efficient", "auto"]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = (
        randn(batch, heads, queries, head_dim),
        randn(batch, heads, keys, head_dim),
        randn(batch, heads, keys, value_dim),
    )
    options = {}
    if draw(st.booleans()):
        options["temperature"] = randn(heads) * 2
    if draw(st.booleans()):
        p = draw(st.sampled_from([0.1, 0.5, 1.0]))  # 1.0: every key of every batch is padding
        options["key_padding_mask"] = torch.rand(batch, keys, generator=generator) < p
    if mode != "efficient":
        if draw(st.booleans()):
            shape = draw(
                st.sampled_from(
                    [(queries, keys), (batch, 1, queries, keys), (batch, heads, queries, keys)]
                )
            )
            options["attn_mask"] = torch.rand(*shape, generator=generator) < 0.3
        options["causal"] = draw(st.booleans())
    if draw(st.booleans()):
        options["normalize"] = False
        if draw(st.booleans()):
            options["scale"] = draw(st.floats(0.05, 2.0))
    options["output_scale"] = draw(st.booleans())
    options["coefficients"] = draw(
        st.sampled_from([(0.5, 1.0, 1.0), (0.25, -0.5, 0.5), (1.0, 0.3, 0.2)])
    )
    return q, k, v, mode, options


@pytest.mark.parametrize("device", DEVICES)
@FUZZ
@given(problem=problems())
def test_fuzz_matches_reference_float64(device, problem):
    q, k, v, mode, options = problem
    temperature = options.pop("temperature", None)
    on_device = {
        name: value.to(device) if isinstance(value, torch.Tensor) else value
        for name, value in options.items()
    }
    out = taylorshift.taylor_shift_attention(
        q.to(device),
        k.to(device),
        v.to(device),
        None if temperature is None else temperature.to(device),
        mode=mode,
        **on_device,
    )
    exact = reference64(q, k, v, temperature, **options)
    assert not out.isnan().any()
    # normalize=False logits are unbounded (|x| up to ~|tau| scale |q| |k|), so weights reach
    # ~1e3 and cancellation in den costs a few digits: relative 1e-9 instead of 1e-10.
    tolerance = F64_TOL if options.get("normalize", True) else {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(out.cpu(), exact, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(problem=problems())
def test_fuzz_direct_equals_efficient(device, problem):
    q, k, v, _, options = problem
    options.pop("attn_mask", None)
    options.pop("causal", None)
    temperature = options.pop("temperature", None)
    if "key_padding_mask" in options:
        options["key_padding_mask"] = options["key_padding_mask"].to(device)
    args = [x.to(device) for x in (q, k, v)] + [
        None if temperature is None else temperature.to(device)
    ]
    direct = taylorshift.taylor_shift_attention(*args, mode="direct", **options)
    efficient = taylorshift.taylor_shift_attention(*args, mode="efficient", **options)
    scale = direct.abs().max().item() if direct.numel() else 1.0
    torch.testing.assert_close(efficient, direct, rtol=1e-9, atol=1e-12 * max(scale, 1.0))


# ---- dtypes, layouts and magnitudes -----------------------------------------------------------


@st.composite
def edge_problems(draw):
    """Both algorithms in every dtype, through transposed and strided views, with zero rows,
    rows whose squared norm overflows the dtype, and NaN or inf in padded keys."""
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    queries, keys = draw(st.integers(1, 40)), draw(st.integers(1, 80))
    head_dim, value_dim = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def tensor(tokens, width):
        if layout == "transposed":  # (B, tokens, H, dim) memory, as the module's projections
            x = torch.randn(batch, tokens, heads, width, generator=generator).transpose(1, 2)
        elif layout == "strided":  # every other element of a wider tensor
            x = torch.randn(batch, heads, tokens, 2 * width, generator=generator)[..., ::2]
        else:
            x = torch.randn(batch, heads, tokens, width, generator=generator)
        return x.to(torch.float64)

    q, k, v = tensor(queries, head_dim), tensor(keys, head_dim), tensor(keys, value_dim)
    huge = 4 * torch.finfo(dtype).max ** 0.5  # its square overflows the dtype
    for x, tokens in ((q, queries), (k, keys)):
        rows = torch.rand(tokens, generator=generator)
        x[:, :, rows < 0.15] = 0
        x[:, :, rows > 0.85] *= huge
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(batch, keys, generator=generator) < 0.3
        mask[:, 0] = False
    poison = draw(st.sampled_from([None, float("nan"), float("inf")])) if mask is not None else None
    return q.to(dtype), k.to(dtype), v.to(dtype), mask, poison


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["direct", "efficient"])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(problem=edge_problems())
def test_fuzz_edges_match_reference(device, mode, problem):
    q, k, v, mask, poison = problem
    clean = k
    if poison is not None:
        k = k.clone()
        k[mask[:, None].expand(-1, k.shape[1], -1)] = poison
    out = taylorshift.taylor_shift_attention(
        q.to(device),
        k.to(device),
        v.to(device),
        key_padding_mask=None if mask is None else mask.to(device),
        mode=mode,
    )
    assert out.isfinite().all()
    # The oracle sees the padded keys as the zeros they count as.
    assert_matches_reference(out, q, clean, v, mode=mode, key_padding_mask=mask)
