"""Causal TaylorShift with the efficient algorithm (chunks of 128 tokens: a running state across
chunks, the direct form inside each; spec causal-and-order.md section 2): exact against the
direct causal path in float64 at chunk boundaries, every option and order, key padding and
non-contiguous inputs; gradcheck of the operators and of the functional; low precision against
PyTorch's own error; opcheck and torch.compile; mode="auto"; argument errors; and the decoding
state (the ATen form) against the CPU kernels."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck
from ts_testing import (
    LOW_PRECISION,
    attention,
    causal_direct,
    error_bound,
    input_gradients,
    loss_and_gradients,
    make_inputs,
    max_error,
    random_key_padding_mask,
    reference64,
)

import taylorshift
from taylorshift import reference

CHUNK = 128  # the CPU kernels' chunk (csrc/cpu/causal.cpp)

# float64 tolerance, relative to the largest entry of the exact result (the output's or that
# gradient's scale). Both sides evaluate the same function in float64 (unit roundoff 1.1e-16);
# the chunked form sums the inter-chunk part through the features, whose individual terms
# exceed f(x) by at most a small factor (|q_hat|, |k_hat| <= |temperature| <= 1.5), over at
# most 1000 keys: rounding errors stay near sqrt(1000) * 1e-16 * (that factor) ~ 1e-14 of the
# scale. Any real mistake (a key counted in the wrong chunk, a missing term) shows at 1e-3 or
# more, so 1e-12 has room and still fails (measured over CASES: at most 2.6e-15). The scale is at least 1: v and grad_out are standard
# normal, so 1 is the outputs' and gradients' natural unit, and a result that is exactly 0 in
# exact arithmetic (the gradient in q with a single key) is computed as rounding noise of
# that unit (~1e-17), which no relative tolerance could bound.
REL_TOL = 1e-12


def assert_exact(x: torch.Tensor, exact: torch.Tensor, what: str = "out") -> None:
    assert x.shape == exact.shape, what
    assert x.isfinite().all(), what
    scale = max(exact.abs().max().item(), 1.0)
    error = max_error(x, exact)
    assert error <= REL_TOL * scale, f"{what}: {error:.3e} > {REL_TOL:g} x {scale:.3e}"


def causal_efficient(q, k, v, t, **options):
    return attention(q, k, v, t, causal=True, mode="efficient", **options)


def padding(kind: str | None, batch: int, tokens: int) -> torch.Tensor | None:
    """None, or a (B, N) key padding mask (True = padding):
    random: random_key_padding_mask (key 0 valid);
    first: random, and the first token of every row padded (query 0 sees no key: zeros);
    prefix: random, and batch 0's first CHUNK + 72 tokens padded (whole chunks of queries see
        no key, and the state stays empty across a chunk boundary);
    all: prefix, batch 1 entirely padded (zeros and zero, finite gradients), the last batch's
        first token padded."""
    if kind is None:
        return None
    mask = random_key_padding_mask(batch, tokens)
    if kind == "first":
        mask[:, 0] = True
    if kind in ("prefix", "all"):
        mask[0, : CHUNK + 72] = True
    if kind == "all":
        mask[1] = True
        mask[-1, 0] = True
    return mask


def transposed(x: torch.Tensor) -> torch.Tensor:
    """The same values in (B, tokens, H, dim) memory viewed as (B, H, tokens, dim): what
    TaylorShiftAttention passes after its projections."""
    y = x.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert not y.is_contiguous() or x.shape[1] == 1 or x.shape[2] == 1
    return y.requires_grad_(x.requires_grad)


# A sampled grid (the full product would take minutes): every N at and around the chunk
# boundaries, every d in {8, 16, 32, 64} with e != d, orders 1-3, each option and mask kind at
# least once, several B * H. Order 1 (1 + x) needs normalize=True and |temperature| <= 1: the
# temperatures are scaled by 0.6 (make_inputs draws them in [0.5, 1.5]).
CASES = {
    "n1": {"shape": (2, 2, 1, 8, 5)},
    "n2_first_padded": {"shape": (1, 3, 2, 16, 7), "mask": "first"},
    "n127_padded": {"shape": (2, 2, 127, 32, 20), "mask": "random"},
    "n128_order3": {"shape": (1, 2, 128, 8, 6), "order": 3},
    "n129_order1": {"shape": (2, 2, 129, 16, 12), "order": 1},
    "n255_unnormalized": {"shape": (1, 2, 255, 8, 3), "normalize": False, "scale": 0.3},
    "n256_d64_no_output_scale": {"shape": (1, 2, 256, 64, 32), "output_scale": False},
    "n257_coefficients_transposed": {
        "shape": (2, 2, 257, 8, 6),
        "coefficients": (0.3, -0.5, 1.0),
        "mask": "random",
        "layout": "T",
    },
    "n300_order3_custom_prefix": {
        "shape": (2, 1, 300, 16, 9),
        "coefficients": (0.1, 0.2, 0.5, 1.0),
        "mask": "prefix",
    },
    "n300_order1_padded": {"shape": (1, 2, 300, 8, 4), "order": 1, "mask": "first"},
    "n1000_masks_transposed": {"shape": (3, 2, 1000, 32, 24), "mask": "all", "layout": "T"},
}


def case_inputs(case: dict, seed: int = 0):
    batch, heads, tokens, head_dim, value_dim = case["shape"]
    q, k, v, t = make_inputs(batch, heads, tokens, tokens, head_dim, value_dim, seed=seed)
    if case.get("order") == 1:
        t = t * 0.6
    if case.get("layout") == "T":
        q, k, v = (transposed(x) for x in (q, k, v))
    options = {
        name: case[name]
        for name in ("order", "coefficients", "normalize", "scale", "output_scale")
        if name in case
    }
    mask = padding(case.get("mask"), batch, tokens)
    if mask is not None:
        options["key_padding_mask"] = mask
    return (q, k, v, t), options


def reference_options(options: dict) -> dict:
    """The reference takes coefficients, not an order."""
    options = dict(options)
    order = options.pop("order", None)
    if order is not None:
        options["coefficients"] = reference.taylor_coefficients(order)
    return options


@pytest.mark.parametrize("name", CASES)
def test_matches_direct_causal_float64(name):
    (q, k, v, t), options = case_inputs(CASES[name])
    out = causal_efficient(q, k, v, t, **options)
    direct = causal_direct(q, k, v, t, **options)
    assert out.dtype == torch.float64
    assert_exact(out, direct)
    assert_exact(out, reference64(q, k, v, t, causal=True, **reference_options(options)))

    mine = input_gradients(q, k, v, t, lambda *x: causal_efficient(*x, **options))
    exact = input_gradients(q, k, v, t, lambda *x: causal_direct(*x, **options))
    for what, g, g_exact in zip("qkvt", mine, exact, strict=True):
        assert_exact(g, g_exact, f"grad {what}")

    mask = options.get("key_padding_mask")
    if mask is not None:
        # Queries that see no unpadded key (a padded first token or prefix, a whole padded
        # row) get zeros and zero gradients; padded keys and values get zero gradients.
        seen = (~mask).cumsum(1) > 0  # (B, N): query i sees some unpadded key j <= i
        grad_q, grad_k, grad_v, _ = mine
        assert (out.transpose(1, 2)[~seen] == 0).all()
        assert (grad_q.transpose(1, 2)[~seen] == 0).all()
        assert (grad_k.transpose(1, 2)[mask] == 0).all()
        assert (grad_v.transpose(1, 2)[mask] == 0).all()


def test_efficient_runs_the_chunked_operators():
    # Guards the tests above: mode="efficient" must not fall back to the direct algorithm.
    q, k, v, t = make_inputs(1, 2, 300, 300, 8, 4, requires_grad=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profile:
        causal_efficient(q, k, v, t).sum().backward()
    names = {event.name for event in profile.events()}
    assert "taylorshift::causal_efficient_forward" in names
    assert "taylorshift::causal_efficient_backward" in names
    assert "taylorshift::direct_forward" not in names


def test_states_are_the_state_before_each_chunk():
    # states[:, :, c] is the prefix state S_<c (spec section 2): the non-causal efficient
    # state of the keys of chunks 0..c-1 (zero for c = 0); its constant feature's count column
    # counts their unpadded keys. Batch 0's padded prefix leaves chunks 0 and 1 empty.
    q, k, v, _ = make_inputs(2, 2, 300, 300, 8, 5)
    q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))
    mask = padding("prefix", 2, 300)
    coefficients = [0.5, 1.0, 1.0]
    _, _, states = torch.ops.taylorshift.causal_efficient_forward(q, k, v, mask, True, coefficients)
    assert states.shape == (2, 2, 3, 45, 6)  # (B, H, ceil(300 / 128), C(8 + 2, 2), e + 1)
    assert (states[:, :, 0] == 0).all()
    for chunk in (1, 2):
        keys = slice(0, chunk * CHUNK)
        _, _, state = torch.ops.taylorshift.efficient_forward(
            q[:, :, keys], k[:, :, keys], v[:, :, keys], mask[:, keys], True, coefficients
        )
        assert_exact(states[:, :, chunk], state, f"state before chunk {chunk}")
        counts = (~mask[:, keys]).sum(1, dtype=torch.float64)
        assert torch.equal(states[:, :, chunk, 0, 0], counts[:, None].expand(2, 2))
    assert states[0, :, 1, 0, 0].eq(0).all()


@pytest.mark.parametrize("mode", ["efficient", "direct"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_padded_key_does_not_contribute(poison, mode):
    # As test_numerics_edge.py for the non-causal algorithms: padded keys are zeroed by
    # selection, so NaN or inf in their k or v changes nothing, in the forward or in the
    # gradients of q, v, temperature and the unpadded keys (the poisoned keys' own gradient is
    # that of normalizing a non-finite vector, not asserted). Direct too: its products once
    # spread a padded key's NaN into dq through 0 * NaN.
    q, k, v, t = make_inputs(2, 2, 300, 300, 8, 5)
    mask = padding("prefix", 2, 300)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k.transpose(1, 2)[mask] = poison
    poisoned_v.transpose(1, 2)[mask] = poison

    def run(*x):
        return attention(*x, key_padding_mask=mask, causal=True, mode=mode)

    assert_exact(run(q, poisoned_k, poisoned_v, t), run(q, k, v, t))
    mine = input_gradients(q, poisoned_k, poisoned_v, t, run)
    clean = input_gradients(q, k, v, t, run)
    for i in (1, 2):
        mine[i], clean[i] = (g.transpose(1, 2)[~mask] for g in (mine[i], clean[i]))
    for what, g, g_clean in zip("qkvt", mine, clean, strict=True):
        assert_exact(g, g_clean, f"grad {what}")


def test_order1_temperature_out_of_range_is_refused():
    # The odd-order check: 1 + x is negative below -1, so |temperature| > 1 is refused.
    q, k, v, t = make_inputs(1, 2, 130, 130, 8, 4)
    with pytest.raises(ValueError, match="order 1 .*odd.*positive"):
        causal_efficient(q, k, v, t * 2, order=1)


# gradcheck: two chunks (N = 130), d = 4, e = 3, padding crossing the chunk boundary.
GRADCHECK_SHAPE = (1, 2, 130, 130, 4, 3)


def gradcheck_mask() -> torch.Tensor:
    mask = random_key_padding_mask(1, 130, seed=3)
    mask[0, 0] = True  # query 0 sees no key
    return mask


def _gradcheck(fn, inputs):
    # As in test_gradients.py: float64 central differences (eps 1e-6, error O(eps^2) = 1e-12)
    # against tolerances 100x tighter than gradcheck's defaults. fast_mode (random projections
    # v^T J u): the full Jacobian perturbs each of ~2000 inputs twice and took 136 s on the
    # 2-core CI machine for one check of test_gradcheck_functional.
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_operator():
    q, k, v, _ = make_inputs(*GRADCHECK_SHAPE, seed=5)
    q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))
    mask = gradcheck_mask()

    def fn(q, k, v):
        out, _den, _states = torch.ops.taylorshift.causal_efficient_forward(
            q, k, v, mask, True, [0.5, 1.0, 1.0]
        )
        return out

    _gradcheck(fn, [x.requires_grad_() for x in (q, k, v)])


@pytest.mark.parametrize("order", (1, 2, 3))
def test_gradcheck_functional(order):
    q, k, v, t = make_inputs(*GRADCHECK_SHAPE, seed=order, requires_grad=True)
    if order == 1:
        t = (t.detach() * 0.6).requires_grad_()
    mask = gradcheck_mask()

    def fn(q, k, v, t):
        return causal_efficient(q, k, v, t, key_padding_mask=mask, order=order)

    _gradcheck(fn, (q, k, v, t))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_forward_and_gradients(dtype):
    """Error against the float64 reference within `error_bound` of the error PyTorch makes
    computing direct causal TaylorShift (reference.direct) in the same dtype, forward and
    gradients, N = 1000 (8 chunks) with padding."""
    batch, heads, tokens, head_dim, value_dim = 2, 2, 1000, 16, 8
    q, k, v, t = make_inputs(batch, heads, tokens, tokens, head_dim, value_dim, dtype=dtype, seed=7)
    mask = padding("random", batch, tokens)

    def ours(*x):
        return causal_efficient(*x, key_padding_mask=mask)

    def torch_reference(*x):
        return reference.direct(*x, causal=True, key_padding_mask=mask)

    with torch.no_grad():
        out = ours(q, k, v, t)
        exact = reference64(q, k, v, t, causal=True, key_padding_mask=mask)
        reference_error = max_error(torch_reference(q, k, v, t), exact)
    assert out.dtype == dtype
    bound = error_bound(reference_error, exact, dtype)
    error = max_error(out, exact)
    assert error <= bound, f"out: {error:.3e} > {bound:.3e} (torch {reference_error:.3e})"

    mine = input_gradients(q, k, v, t, ours)
    torch_low = input_gradients(q, k, v, t, torch_reference)
    exact = input_gradients(*(x.double() for x in (q, k, v, t)), torch_reference)
    for name, g, g_ref, g_exact in zip("qkvt", mine, torch_low, exact, strict=True):
        assert g.dtype == dtype
        # dtau_h sums the contributions of the batch's B * N query rows.
        rows = batch * tokens if name == "t" else 1
        reference_error = max_error(g_ref, g_exact)
        bound = error_bound(reference_error, g_exact, dtype, summed_terms=rows)
        error = max_error(g, g_exact)
        assert error <= bound, (
            f"grad {name}: {error:.3e} > {bound:.3e} (torch {reference_error:.3e})"
        )


def _assert_opcheck(op, args):
    result = opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_opcheck_causal_efficient_forward_and_backward(dtype, masked, layout):
    q, k, v, _ = make_inputs(2, 2, 130, 130, 4, 3, dtype=dtype)
    q, k = (torch.nn.functional.normalize(x, dim=-1) for x in (q, k))  # the logits' factors
    if layout == "transposed":
        q, k, v = (transposed(x) for x in (q, k, v))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    mask = padding("first", 2, 130) if masked else None
    coefficients = [0.5, 1.0, 1.0]
    forward_args = (q, k, v, mask, True, coefficients)
    _assert_opcheck(torch.ops.taylorshift.causal_efficient_forward.default, forward_args)
    with torch.no_grad():
        out, den, states = torch.ops.taylorshift.causal_efficient_forward(*forward_args)
    assert states.shape == (2, 2, 2, 15, 4)  # (B, H, chunks, F = C(4 + 2, 2), e + 1)
    grad_out = torch.randn_like(out)
    _assert_opcheck(
        torch.ops.taylorshift.causal_efficient_backward.default,
        (grad_out, *(x.detach() for x in (q, k, v)), out, den, states, mask, True, coefficients),
    )


def _loss(q, k, v, t, mask):
    y = causal_efficient(q, k, v, t, key_padding_mask=mask)
    return (y * y).sum()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True, dynamic=dynamic)
    # Dynamic shapes: a second length, which must run in the same graph (no recompilation).
    for tokens in (130, 300) if dynamic else (130,):
        inputs = make_inputs(2, 2, tokens, tokens, 4, 3, requires_grad=True)
        mask = padding("first", 2, tokens)
        expected = loss_and_gradients(_loss, inputs, mask)
        with torch._dynamo.config.patch(error_on_recompile=tokens != 130):
            got = loss_and_gradients(compiled, inputs, mask)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens", [64, 4096])
def test_auto_matches_direct(tokens):
    # Whichever algorithm the cost model picks, the result is causal TaylorShift.
    q, k, v, t = make_inputs(1, 2, tokens, tokens, 16, 12, seed=tokens)
    mask = padding("first", 1, tokens)
    auto = attention(q, k, v, t, causal=True, mode="auto", key_padding_mask=mask)
    assert_exact(auto, causal_direct(q, k, v, t, key_padding_mask=mask))
    if tokens == 64:
        mine = input_gradients(
            q, k, v, t, lambda *x: attention(*x, causal=True, mode="auto", key_padding_mask=mask)
        )
        exact = input_gradients(q, k, v, t, lambda *x: causal_direct(*x, key_padding_mask=mask))
        for what, g, g_exact in zip("qkvt", mine, exact, strict=True):
            assert_exact(g, g_exact, f"grad {what}")


def test_errors():
    q, k, v, t = make_inputs(1, 2, 5, 7, 4, 3)
    with pytest.raises(ValueError, match=r"M = N.*M = 5, N = 7"):
        causal_efficient(q, k, v, t)
    with pytest.raises(ValueError, match=r"causal_efficient_forward: .*\(M = N\), got 5 and 7"):
        torch.ops.taylorshift.causal_efficient_forward(q, k, v, None, True, [0.5, 1.0, 1.0])
    q, k, v, t = make_inputs(1, 2, 6, 6, 4, 3)
    with pytest.raises(NotImplementedError, match="orders 1 to 3 .*got order 4"):
        causal_efficient(q, k, v, t, order=4)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    coefficients = [0.5, 1.0, 1.0]
    with torch.no_grad():
        out, den, states = torch.ops.taylorshift.causal_efficient_forward(
            q, k, v, None, True, coefficients
        )
    grad_out = torch.ones_like(out)
    for bad in (states[:, :, 0], states[..., :-1], torch.cat([states, states], dim=2)):
        with pytest.raises(ValueError, match=r"states must be the forward's, \(B, H, chunks"):
            torch.ops.taylorshift.causal_efficient_backward(
                grad_out, q, k, v, out, den, bad, None, True, coefficients
            )


@pytest.mark.parametrize(
    "options",
    [{}, {"normalize": False, "scale": 0.4, "output_scale": False}, {"order": 3}],
    ids=["default", "unnormalized", "order3"],
)
def test_causal_state_prefill_matches_kernels(options):
    # CausalState.step runs the ATen form (csrc/causal.cpp causal_continue); one step over the
    # whole sequence must give the CPU chunked kernels' result.
    batch, heads, tokens, head_dim, value_dim = 2, 2, 300, 8, 5
    q, k, v, t = make_inputs(batch, heads, tokens, tokens, head_dim, value_dim, seed=11)
    mask = padding("prefix", batch, tokens)
    state = taylorshift.CausalState(
        batch, heads, head_dim, value_dim, dtype=torch.float64, **options
    )
    prefill = state.step(q, k, v, t, mask)
    assert_exact(prefill, causal_efficient(q, k, v, t, key_padding_mask=mask, **options))
