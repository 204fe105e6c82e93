"""Gradients: gradcheck in float64 (q, k, v, temperature) for both algorithms and every option,
float32 gradients against float64 reference gradients, and gradients through the module."""

import pytest
import torch
from ts_testing import (
    EMULATION_SAMPLED,
    LOW_PRECISION,
    MODES,
    error_bound,
    input_gradients,
    make_inputs,
    max_error,
    random_attn_mask,
    random_key_padding_mask,
)

import taylorshift
from taylorshift import reference


def _gradcheck(device, mode, shape, seed=0, fast_mode=False, **options):
    q, k, v, t = make_inputs(*shape, device=device, seed=seed, requires_grad=True)

    def fn(q, k, v, t):
        return taylorshift.taylor_shift_attention(q, k, v, t, mode=mode, **options)

    # Default finite-difference settings of gradcheck (eps 1e-6, atol 1e-5, rtol 1e-3) are
    # loose for a smooth function in float64; tightened 100x in atol and rtol, which still
    # leaves the O(eps^2) = 1e-12 central-difference error far below them. Full Jacobians
    # (fast_mode=False): at these sizes each check is well under a second.
    assert torch.autograd.gradcheck(
        fn, (q, k, v, t), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode
    )


# Small sizes: gradcheck perturbs every input element (here ~100) one at a time.
SMALL = (2, 2, 4, 5, 3, 2)

# Under the emulation a full Jacobian costs two emulated launches per input element, up to minutes
# a check: there test_gradcheck keeps the full Jacobian and the option variants below take
# fast_mode (random projections v^T J u). Elsewhere, or with TS_EMULATION_EXHAUSTIVE=1, every
# check is full.
VARIANT_FAST_MODE = EMULATION_SAMPLED


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(device, mode):
    _gradcheck(device, mode, SMALL)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_fast_mode_larger(device, mode):
    # Across block boundaries (65 queries, 257 keys, 64-token chunks) with a padding mask;
    # fast_mode (random projections v^T J u) keeps this to a handful of backward passes.
    mask = random_key_padding_mask(1, 257, device=device)
    _gradcheck(device, mode, (1, 1, 65, 257, 3, 2), key_padding_mask=mask, fast_mode=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_fast_mode_across_direct_tiles(device, causal):
    # The CPU direct kernels tile 128 queries x 512 keys, and with one (batch, head) the backward
    # splits the queries over threads and sums their dk, dv: 130 queries x 600 keys cross both
    # tile edges with ragged tails.
    _gradcheck(device, "direct", (1, 1, 130, 600, 3, 2), causal=causal, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_cross_attention(device, mode):
    _gradcheck(device, mode, (1, 2, 7, 3, 4, 5), seed=1, fast_mode=VARIANT_FAST_MODE)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_key_padding_mask(device, mode):
    mask = torch.tensor([[False, True, False, False, True], [True, True, True, True, True]])
    # Batch 1 is all padding: its rows are zero and their gradients too.
    _gradcheck(device, mode, SMALL, key_padding_mask=mask.to(device), fast_mode=VARIANT_FAST_MODE)


def test_gradcheck_attn_mask_direct(device):
    mask = random_attn_mask(2, 1, 4, 5, device=device, p=0.4)
    mask[0, 0, 2] = True  # one all-masked row
    _gradcheck(device, "direct", SMALL, attn_mask=mask, fast_mode=VARIANT_FAST_MODE)


def test_gradcheck_causal_direct(device):
    mask = torch.tensor([[False, False, True, False, False], [True, False, False, False, False]])
    _gradcheck(
        device,
        "direct",
        SMALL,
        causal=True,
        key_padding_mask=mask.to(device),
        fast_mode=VARIANT_FAST_MODE,
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_normalize_false(device, mode):
    _gradcheck(device, mode, SMALL, normalize=False, scale=0.7, fast_mode=VARIANT_FAST_MODE)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_output_scale_false_and_coefficients(device, mode):
    _gradcheck(
        device,
        mode,
        SMALL,
        output_scale=False,
        coefficients=(0.3, -0.4, 0.9),
        fast_mode=VARIANT_FAST_MODE,
    )


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_gradients_vs_float64_reference(device, mode, masked, dtype):
    shape = (2, 2, 65, 70, 8, 6)
    q, k, v, t = make_inputs(*shape, dtype=dtype, device=device, seed=4)
    mask = random_key_padding_mask(2, 70, device=device) if masked else None

    def ours(q, k, v, t):
        return taylorshift.taylor_shift_attention(q, k, v, t, key_padding_mask=mask, mode=mode)

    def ref(q, k, v, t):
        return reference.direct(
            q, k, v, t, key_padding_mask=None if mask is None else mask.to(q.device)
        )

    exact = input_gradients(*(x.cpu().double() for x in (q, k, v, t)), ref)
    torch_low = input_gradients(q, k, v, t, ref)
    mine = input_gradients(q, k, v, t, ours)
    for name, g, g_ref, g_exact in zip("qkvt", mine, torch_low, exact, strict=True):
        assert g.dtype == dtype
        # As for the forward: 2x PyTorch's own error in this dtype plus an ulp floor.
        # dtau_h sums dq_hat_i . n_i over the batch's B * M query rows.
        rows = shape[0] * shape[2] if name == "t" else 1
        bound = error_bound(max_error(g_ref, g_exact), g_exact, dtype, summed_terms=rows)
        error = max_error(g, g_exact)
        assert error <= bound, f"grad {name}: {error:.3e} > {bound:.3e}"


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_reference_float64(device, mode):
    q, k, v, t = make_inputs(2, 3, 65, 257, 8, 4, device=device, seed=6)
    mask = random_key_padding_mask(2, 257, device=device)
    mine = input_gradients(
        q,
        k,
        v,
        t,
        lambda *x: taylorshift.taylor_shift_attention(*x, key_padding_mask=mask, mode=mode),
    )
    exact = input_gradients(q, k, v, t, lambda *x: reference.direct(*x, key_padding_mask=mask))
    for g, g_exact in zip(mine, exact):
        torch.testing.assert_close(g, g_exact, rtol=1e-9, atol=1e-10)


def test_gradient_through_module(device):
    torch.manual_seed(0)
    embed, heads, batch, length = 12, 3, 2, 9
    module = taylorshift.TaylorShiftAttention(
        embed, heads, batch_first=True, dtype=torch.float64, device=device
    )
    with torch.no_grad():
        module.temperature.copy_(torch.tensor([0.5, 1.0, 2.0]))
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    x = torch.randn(batch, length, embed, dtype=torch.float64, device=device)
    mask = random_key_padding_mask(batch, length, device=device)
    out, _ = module(x, x, x, key_padding_mask=mask, need_weights=False)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    # The same computation by hand, from copies of the parameters, through the reference.
    params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
    w_q, w_k, w_v = params["in_proj_weight"].chunk(3)
    b_q, b_k, b_v = params["in_proj_bias"].chunk(3)

    def heads_of(y):
        return y.view(batch, length, heads, embed // heads).transpose(1, 2)

    q = heads_of(x @ w_q.T + b_q)
    k = heads_of(x @ w_k.T + b_k)
    v = heads_of(x @ w_v.T + b_v)
    y = reference.direct(q, k, v, params["temperature"], key_padding_mask=mask)
    y = y.transpose(1, 2).reshape(batch, length, embed)
    expected = y @ params["out_proj.weight"].T + params["out_proj.bias"]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    expected.backward(grad_out)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-9, atol=1e-10, msg=name)
    assert module.temperature.grad.abs().min() > 0


@pytest.mark.parametrize("mode", MODES)
def test_double_backward_is_refused_first_order_create_graph_works(device, mode):
    # create_graph=True (gradient penalties, meta-learning) differentiates the backward. The
    # backward operators have no derivative: a second derivative must raise, not return wrong
    # numbers, while first derivatives taken with create_graph=True stay exact.
    q, k, v, t = make_inputs(1, 1, 3, 4, 2, 2, device=device, requires_grad=True)
    out = taylorshift.taylor_shift_attention(q, k, v, t, mode=mode)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, t), create_graph=True)
    expected = torch.autograd.grad(
        taylorshift.reference.direct(q, k, v, t).square().sum(), (q, k, v, t)
    )
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        sum(g.sum() for g in grads).backward()


@pytest.mark.parametrize("mode", MODES)
def test_zero_vectors_follow_normalize_clamp(device, mode):
    # A zero q_i or k_j: norms clamp at 1e-12 as in F.normalize, so q_hat = 0, the logits are
    # 0 (weight c), and the gradient is that of the clamped map (finite, large: ~1/1e-12).
    q, k, v, t = make_inputs(1, 2, 5, 6, 4, 3, device=device)
    q[0, 0, 1] = 0
    k[0, 1, 2] = 0

    def ours(*x):
        return taylorshift.taylor_shift_attention(*x, mode=mode)

    mine = input_gradients(q, k, v, t, ours)
    exact = input_gradients(q, k, v, t, reference.direct)
    torch.testing.assert_close(
        ours(q, k, v, t), reference.direct(q, k, v, t), rtol=1e-10, atol=1e-10
    )
    for g, g_exact in zip(mine, exact, strict=True):
        assert g.isfinite().all()
        torch.testing.assert_close(g, g_exact, rtol=1e-9, atol=1e-9)
