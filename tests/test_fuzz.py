"""Hypothesis fuzzing of shapes, masks, modes and options: the op against the float64 reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ts_testing import DEVICES, F64_TOL, reference64

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
