"""CUDA-only tests of the taylorshift kernels: every dtype x head dim x mask case of the four operators
against the float64 reference, plus what only a GPU has (streams, devices, huge N, determinism).

The operator-level tests call torch.ops.taylorshift.* with already-normalised logit factors, as the
composite op does. Error yardstick, as in conftest.assert_matches_reference: at most 2x the error
PyTorch makes computing the same function (reference.direct, autograd for gradients) in the same
dtype on the same GPU, plus 2 units in the last place of the result's scale.

Backward products run in the inputs' dtype (bfloat16; float16 in the mma kernels: the direct ones
bound P and dX independently of N, csrc/cuda/direct.cu, the efficient ones scale their operands per
head by powers of two, csrc/cuda/efficient.cu) or in TF32 (fp16's mantissa, float32's range: the
other float16 kernels, csrc/cuda/common.cuh), so both dtypes are held to their own yardstick.

Without a GPU, under the emulation plugin (`-p emulate`, csrc/cuda/emulation), the operator tests
run the CUDA kernels' code on CPU tensors. The emulation is slow, so by default it runs a sample
of the operator grid that still covers every head dim, mask case and 16-bit dtype of the direct
kernels; TS_EMULATION_EXHAUSTIVE=1 runs the whole grid. With TS_EMULATION_WGMMA=1 the emulation
builds the kernels as nvcc's sm_90a pass does, whose big products run on wgmma (scripts/test.sh runs
the cases that reach them). Tests of what only a GPU has (streams, devices, a million tokens) need
one.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from ts_testing import EMULATED, EMULATED_WGMMA, EMULATION_SAMPLED, error_bound, max_error

import taylorshift
from taylorshift import reference

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
pytestmark = pytest.mark.skipif(
    not (GPU or EMULATED), reason="needs a CUDA GPU or the emulation plugin (-p emulate)"
)
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")

ops = torch.ops.taylorshift
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 128)
COEFFICIENTS = (0.5, 1.0, 1.0)
DIRECT_MASKS = ("none", "key_padding", "attn_mask", "causal", "all")
EFFICIENT_MASKS = ("none", "key_padding")


def make_factors(batch, heads, queries, keys, d, e, dtype, seed=0, device=DEVICE):
    """Normalised q_hat, k_hat (|x| <= temperature, as the composite op produces) and v."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, heads, keys, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, heads, keys, e, generator=gen, dtype=torch.float64)
    temperature = 0.5 + torch.rand(heads, generator=gen, dtype=torch.float64)
    q, k = reference.logit_factors(q, k, temperature)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def make_masks(case, batch, heads, queries, keys, device=DEVICE, seed=1):
    gen = torch.Generator().manual_seed(seed)
    kpm = attn_mask = None
    causal = case in ("causal", "all", "causal_key_padding", "per_head_all")
    if case in ("key_padding", "all", "causal_key_padding", "per_head_all"):
        kpm = torch.rand(batch, keys, generator=gen) < 0.3
        kpm[:, 0] = False
        if batch > 1:
            kpm[-1, :] = True  # one fully padded batch: zero outputs and gradients
        kpm = kpm.to(device)
    if case in ("attn_mask", "all"):
        # Expanded over batch and heads (stride 0), as users pass broadcast masks.
        attn_mask = (torch.rand(1, 1, queries, keys, generator=gen) < 0.3).to(device)
        attn_mask = attn_mask.expand(batch, heads, queries, keys)
    if case == "blocks":
        # Key block <= query block in 64 x 64 blocks, with holes in queries 64..79 x keys 0..63:
        # per warp and 64-column tile, every element masked, every one allowed, or mixed.
        i, j = torch.arange(queries)[:, None], torch.arange(keys)[None, :]
        attn_mask = j // 64 > i // 64
        attn_mask[64:80, :64] |= torch.rand(16, min(keys, 64), generator=gen) < 0.5
        attn_mask = attn_mask.to(device).expand(batch, heads, queries, keys)
    if case in ("per_head", "per_head_all"):
        # A different mask for every batch row and head, read through a transposed view.
        attn_mask = (torch.rand(batch, heads, keys, queries, generator=gen) < 0.3).to(device)
        attn_mask = attn_mask.transpose(-1, -2)
    return kpm, attn_mask, causal


def reference_outputs(
    q, k, v, kpm, attn_mask, causal, output_scale=True, coefficients=COEFFICIENTS
):
    """(out, den) of reference.direct on x = q . k, differentiable, in q's dtype and device."""
    a, b, c = coefficients
    out = reference.direct(
        q,
        k,
        v,
        key_padding_mask=kpm,
        attn_mask=attn_mask,
        causal=causal,
        normalize=False,
        scale=1.0,
        output_scale=output_scale,
        coefficients=coefficients,
    )
    x = q @ k.transpose(-1, -2)
    allowed = reference.allowed_keys(q, k, key_padding_mask=kpm, attn_mask=attn_mask, causal=causal)
    den = torch.where(allowed, (a * x + b) * x + c, torch.zeros_like(x)).sum(-1)
    return out, den


def reference_state(k, v, kpm):
    """sum_j m_j psi(k_j) [1 | v_j]^T in float64, psi = [1 | k | k_l k_m (l <= m)]."""
    k, v = k.double(), v.double()
    d = k.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=k.device)
    psi = torch.cat([torch.ones_like(k[..., :1]), k, k[..., rows] * k[..., cols]], -1)
    values = torch.cat([torch.ones_like(v[..., :1]), v], -1)
    if kpm is not None:
        values = values * (~kpm).to(values.dtype)[:, None, :, None]
    return psi.transpose(-1, -2) @ values


def assert_close_to_reference(name, got, exact, approx, dtype):
    """got vs exact (float64): within 2 x |approx - exact| + 2 ulp of dtype at exact's scale."""
    assert got.shape == exact.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-9, msg=name)
        return
    bound = error_bound(max_error(approx, exact), exact, dtype, ulps=2.0)
    error = max_error(got, exact)
    assert error <= bound, f"{name} {dtype}: error {error:.3e} > bound {bound:.3e}"


def check_operator(
    mode, dtype, d, mask_case, *, shape=(2, 2, 70, 130), e=None, coefficients=COEFFICIENTS
):
    batch, heads, queries, keys = shape
    e = d if e is None else e
    q, k, v = make_factors(batch, heads, queries, keys, d, e, dtype)
    kpm, attn_mask, causal = make_masks(mask_case, batch, heads, queries, keys)
    a, b, c = coefficients
    if mode == "direct":
        out, den = ops.direct_forward(q, k, v, kpm, attn_mask, causal, True, [a, b, c])
    else:
        out, den, state = ops.efficient_forward(q, k, v, kpm, True, [a, b, c])
    assert out.dtype == dtype and den.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )

    # float64 truth from the rounded inputs, and PyTorch's own error in the same dtype.
    masks = (kpm, attn_mask, causal)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64, den64 = reference_outputs(*leaves64, *masks, coefficients=coefficients)
    leaves_low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_low = reference_outputs(*leaves_low, *masks, coefficients=coefficients)[0]
    approx_out = reference_outputs(q, k, v, *masks, coefficients=coefficients)[0]
    assert_close_to_reference(f"{mode} out", out, out64, approx_out, dtype)
    den_rtol = max(8 * torch.finfo(dtype).eps, 1e-12)
    torch.testing.assert_close(den.double(), den64.detach(), rtol=den_rtol, atol=0, msg="den")
    if mode == "efficient":
        exact_state = reference_state(k, v, kpm)
        eps = torch.finfo(dtype).eps
        assert max_error(state, exact_state) <= 4 * eps * exact_state.abs().max().item() + 1e-12

    grad_out = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )
    grad_out = grad_out.to(device=q.device, dtype=dtype)
    if mode == "direct":
        grads = ops.direct_backward(
            grad_out, q, k, v, out, den, kpm, attn_mask, causal, True, [a, b, c]
        )
    else:  # dq, dk, dv; the fourth output, grad_temperature, is empty without a temperature
        grads = ops.efficient_backward(grad_out, q, k, v, out, den, state, kpm, True, [a, b, c])
        assert grads[3].shape == (0,)
        grads = grads[:3]
    exact = torch.autograd.grad(out64, leaves64, grad_out.double())
    approx = torch.autograd.grad(out_low, leaves_low, grad_out)
    for name, got, ex, ap in zip(("dq", "dk", "dv"), grads, exact, approx):
        assert got.dtype == dtype
        assert_close_to_reference(f"{mode} {name}", got, ex, ap, dtype)
    if kpm is not None and batch > 1:  # the fully padded batch: zero outputs, den, gradients
        assert (out[-1] == 0).all() and (den[-1] == 0).all()
        assert all((g[-1] == 0).all() for g in grads)


def operator_grid(masks, emulation_dtypes):
    """(dtype, d, mask) cases: all of them on a GPU or with TS_EMULATION_EXHAUSTIVE=1; under the
    emulation by default a diagonal sample of emulation_dtypes x HEAD_DIMS x masks in which every
    dtype, head dim and mask case occurs (a quarter of the cases)."""
    cases = list(itertools.product(DTYPES, HEAD_DIMS, masks))
    if not EMULATION_SAMPLED:
        return cases
    return [
        (dtype, d, mask)
        for i, dtype in enumerate(emulation_dtypes)
        for j, d in enumerate(HEAD_DIMS)
        for k, mask in enumerate(masks)
        if (i + j + k) % 4 == 0
    ]


# Under the emulation the direct sample covers the 16-bit kernels (direct_forward_mma_kernel), the
# efficient sample the register-resident kernels; the efficient kernels' float paths are exercised
# by tests/test_forward.py there.
@pytest.mark.parametrize(
    "dtype,d,mask_case", operator_grid(DIRECT_MASKS, (torch.bfloat16, torch.float16)), ids=str
)
def test_direct_operator(dtype, d, mask_case):
    check_operator("direct", dtype, d, mask_case)


# The 16-bit direct kernels take order 2 in vertex form, a ((x + beta)^2 + gamma), where a, beta
# and gamma are moderate (csrc/cuda/direct.cu, vertex_form); other coefficients take Horner's rule
# (the runtime-order forward, the shared-memory backward). One polynomial of each kind, both
# positive on the logits' range: (1/4, -1/2, 2) has beta = -1, gamma = 7; (1/50, 1, 20) has
# beta = 25 and gamma = 375.
@pytest.mark.parametrize(
    "coefficients", [(0.25, -0.5, 2.0), (0.02, 1.0, 20.0)], ids=["vertex", "horner"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_direct_order_2_coefficients(dtype, coefficients):
    check_operator("direct", dtype, 32, "key_padding", coefficients=coefficients)


# Under the emulation, two cases beyond the sample, cheap there: float16's backward (d = 64 and
# 128 take minutes each; TS_EMULATION_EXHAUSTIVE=1 runs them; see also the loss-scale test below)
# and key padding at d = 16, whose reduce stages 128 keys per tile (two words of validity bits).
EFFICIENT_CASES = operator_grid(EFFICIENT_MASKS, (torch.bfloat16,))
EXTRA_CASES = [(torch.float16, 32, "key_padding"), (torch.bfloat16, 16, "key_padding")]
if EMULATED_WGMMA:  # built as the sm_90a pass builds it: d = 64 too, the wgmma kernels' main shape
    EXTRA_CASES.append((torch.bfloat16, 64, "key_padding"))
for case in EXTRA_CASES:
    if case not in EFFICIENT_CASES:
        EFFICIENT_CASES.append(case)


@pytest.mark.parametrize("dtype,d,mask_case", EFFICIENT_CASES, ids=str)
def test_efficient_operator(dtype, d, mask_case):
    # Emulated, d = 128 (8385 features a token) took 5 to 10 minutes at two heads: one head there,
    # the batch of two kept for its fully padded row.
    shape = (2, 1, 70, 130) if EMULATION_SAMPLED and d == 128 else (2, 2, 70, 130)
    check_operator("efficient", dtype, d, mask_case, shape=shape)


@pytest.mark.parametrize("d", (16, 32))
def test_efficient_float16_backward_is_loss_scale_invariant(d):
    """float16's efficient backward scales dz, the state and dS per head by powers of two taken from
    their largest magnitudes (csrc/cuda/efficient.cu, float16_operand_scale), so multiplying grad_out
    by 2^j multiplies every gradient by exactly 2^j wherever both results are normal float16 numbers,
    as in exact arithmetic. At 2^-10, unscaled, rs gY (about 2^-16 here) would be subnormal in
    float16 and keep only a few bits."""
    dtype = torch.float16
    q, k, v = make_factors(1, 2, 70, 130, d, d, dtype, seed=15)
    kpm, _, _ = make_masks("key_padding", 1, 2, 70, 130)
    args = (kpm, True, list(COEFFICIENTS))
    out, den, state = ops.efficient_forward(q, k, v, *args)
    gen = torch.Generator().manual_seed(16)
    # |grad_out| in [1/2, 3/2): scaled by 2^-10 it stays normal (>= 2^-14), so exact.
    magnitude = 0.5 + torch.rand(out.shape, generator=gen)
    sign = torch.where(torch.rand(out.shape, generator=gen) < 0.5, -1.0, 1.0)
    grad_out = (sign * magnitude).to(DEVICE, dtype)
    base = ops.efficient_backward(grad_out, q, k, v, out, den, state, *args)[:3]
    smallest_normal = torch.finfo(dtype).tiny
    for j in (-10, 12):
        scaled = ops.efficient_backward(grad_out * 2.0**j, q, k, v, out, den, state, *args)[:3]
        for name, unscaled, got in zip(("dq", "dk", "dv"), base, scaled):
            want = unscaled.double() * 2.0**j
            normal = torch.minimum(unscaled.abs(), want.abs()) >= smallest_normal
            assert normal.sum() > 0.5 * (unscaled != 0).sum(), f"{name} 2^{j}: few normal values"
            assert torch.equal(got.double()[normal], want[normal]), f"{name} 2^{j}"


# The 16-bit direct kernels hold 32 rows per warp at d <= 32: blocks of 128 queries (forward, dQ)
# or keys (dK, dV) against tiles of 64. With causal and no attn_mask, the tiles before a block's
# diagonal run without the per-element test and the (up to two) tiles holding it with it; 300
# queries and 257 keys reach blocks with both, with and without key padding. At d = 128 the
# backward takes 16-row chunks and its key side re-reads K and V for each.
@pytest.mark.parametrize("mask_case", ("causal", "causal_key_padding"))
@pytest.mark.parametrize("d", (16, 32, 128))
def test_direct_causal_blocks_past_the_diagonal(d, mask_case):
    check_operator("direct", torch.bfloat16, d, mask_case, shape=(1, 2, 300, 257))


# With an attn_mask the 16-bit direct kernels test one bit per element of a table built from the
# mask, the key padding and causality (direct.cu: AllowedBits): one table where they broadcast over
# batch rows and heads (test_direct_operator), one per batch row and head here. 140 queries and
# 130 keys span three 64-column tiles per row and two or three blocks in both orientations (the
# dK/dV kernel reads the table by key).
@pytest.mark.parametrize(
    "dtype,d,mask_case",
    [
        (torch.bfloat16, 16, "per_head_all"),
        (torch.bfloat16, 64, "per_head"),
        (torch.float16, 32, "per_head_all"),
    ],
    ids=str,
)
def test_direct_attn_mask_per_batch_row_and_head(dtype, d, mask_case):
    check_operator("direct", dtype, d, mask_case, shape=(2, 2, 140, 130))


# A warp skips the products of a tile whose elements the attn_mask all masks for its rows, and
# takes those of a tile it all allows without the per-element masks (direct.cu, tile_cover); only
# mixed tiles test each element. The "blocks" mask has tiles of all three kinds in both the
# query-side and the key-side orientation, the 130 keys' tail tile mixed.
@pytest.mark.parametrize(
    "dtype,d", [(torch.bfloat16, 16), (torch.float16, 64), (torch.bfloat16, 128)], ids=str
)
def test_direct_attn_mask_whole_tiles_skipped_or_unmasked(dtype, d):
    check_operator("direct", dtype, d, "blocks", shape=(1, 2, 140, 130))


def reference_chunk_states(k, v, kpm, chunks):
    """The state before each chunk of 128 tokens, (B, H, chunks, F, e + 1), in float64."""
    return torch.stack(
        [
            reference_state(
                k[:, :, : 128 * c], v[:, :, : 128 * c], None if kpm is None else kpm[:, : 128 * c]
            )
            for c in range(chunks)
        ],
        2,
    )


# Causal efficient (csrc/cuda/causal.cu): the register-resident kernels (16-bit, d = e in 16, 32,
# 64, 128) and the shared-memory ones (the others), with and without key padding, at a length
# whose last chunk is partial. Order 1 runs the order-2 kernels with zero pair weights.
CAUSAL_CASES = [
    (torch.bfloat16, 16, "key_padding", COEFFICIENTS),
    (torch.float16, 32, "none", COEFFICIENTS),
    (torch.bfloat16, 16, "none", (0.0, 1.0, 1.0)),
    (torch.float32, 8, "key_padding", COEFFICIENTS),
    (torch.float64, 5, "key_padding", COEFFICIENTS),
]
if EMULATED_WGMMA or not EMULATED:
    CAUSAL_CASES.append((torch.bfloat16, 64, "key_padding", COEFFICIENTS))


@pytest.mark.parametrize("dtype,d,mask_case,coefficients", CAUSAL_CASES, ids=str)
def test_causal_efficient_operator(dtype, d, mask_case, coefficients):
    """Against causal direct in float64, within 2x PyTorch's error in dtype (float64: 1e-12)."""
    batch, heads, tokens = 2, 1, 300  # three chunks, the last one partial
    q, k, v = make_factors(batch, heads, tokens, tokens, d, d, dtype, seed=21)
    kpm, _, _ = make_masks(mask_case, batch, heads, tokens, tokens)
    coefficients = list(coefficients)
    order_1 = coefficients[0] == 0.0  # the op takes order 1 as [b, c]
    op_coefficients = coefficients[1:] if order_1 else coefficients
    out, den, states = ops.causal_efficient_forward(q, k, v, kpm, True, op_coefficients)
    assert out.shape == (batch, heads, tokens, d) and den.shape == (batch, heads, tokens)

    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64, den64 = reference_outputs(*leaves64, kpm, None, True, coefficients=coefficients)
    leaves_low = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_low = reference_outputs(*leaves_low, kpm, None, True, coefficients=coefficients)[0]
    assert_close_to_reference("causal out", out, out64, out_low.detach(), dtype)
    if dtype == torch.float64:  # the chunked form is exact: 1e-12 of the outputs' scale
        assert max_error(out, out64) <= 1e-12 * out64.abs().max().item()
    den_rtol = max(8 * torch.finfo(dtype).eps, 1e-12)
    torch.testing.assert_close(den.double(), den64.detach(), rtol=den_rtol, atol=0, msg="den")
    exact_states = reference_chunk_states(k, v, kpm, 3)
    if order_1:  # the states keep the 1 + d rows of psi = [1 | k]
        exact_states = exact_states[:, :, :, : 1 + d]
    assert states.shape == exact_states.shape
    eps = torch.finfo(dtype).eps
    assert max_error(states, exact_states) <= 4 * eps * exact_states.abs().max().item() + 1e-12

    grad_out = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64
    )
    grad_out = grad_out.to(device=q.device, dtype=dtype)
    grads = ops.causal_efficient_backward(
        grad_out, q, k, v, out, den, states, kpm, True, op_coefficients
    )
    exact = torch.autograd.grad(out64, leaves64, grad_out.double())
    approx = torch.autograd.grad(out_low, leaves_low, grad_out)
    for name, got, ex, ap in zip(("dq", "dk", "dv"), grads, exact, approx):
        assert got.dtype == dtype
        assert_close_to_reference(f"causal {name}", got, ex, ap, dtype)
    if kpm is not None:  # the fully padded batch: zero outputs, den, gradients
        assert (out[-1] == 0).all() and (den[-1] == 0).all()
        assert all((g[-1] == 0).all() for g in grads)


@pytest.mark.parametrize("shape", [(0, 2, 5), (2, 1, 1), (1, 1, 128)], ids=str)
def test_causal_efficient_small_and_empty(shape):
    """No batch, one token, exactly one chunk: forward and gradients through the
    functional (autograd over causal_efficient_forward/backward) against causal direct."""
    batch, heads, tokens = shape
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(batch, heads, tokens, 16, generator=gen) for _ in range(3))
    q, k, v = (t.to(DEVICE, torch.bfloat16).requires_grad_() for t in (q, k, v))
    got = taylorshift.taylor_shift_attention(q, k, v, causal=True, mode="efficient")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = taylorshift.taylor_shift_attention(*leaves, causal=True, mode="direct")
    assert got.shape == exact.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    exact_grads = torch.autograd.grad(exact.sum(), leaves)
    for g, ex in zip(grads, exact_grads):
        assert g.shape == ex.shape
        torch.testing.assert_close(g.double(), ex, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    "dtype,d,order",
    [(torch.bfloat16, 16, 2), (torch.float16, 32, 2), (torch.float32, 8, 1), (torch.float64, 5, 2)],
    ids=str,
)
def test_causal_state_steps_on_the_kernels(dtype, d, order):
    """CausalState without gradients continues from its state on the kernels
    (causal_efficient_step): a prompt of 200 tokens (two chunks, the second partial), then steps of
    one and of 60 tokens, with key padding, against causal direct over all of them in float64
    (float64: to 1e-12; the others: within 2x PyTorch's own error in the dtype + 2 ulp)."""
    batch, heads, tokens = 2, 2, 261
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(batch, heads, tokens, d, generator=gen) for _ in range(3))
    temperature = 0.4 + 0.5 * torch.rand(heads, generator=gen)  # order 1: 1 + x > 0
    kpm = torch.rand(batch, tokens, generator=gen) < 0.3
    kpm[:, 0] = False
    kpm[1, 200:] = True  # batch row 1: its steps see only padding
    q, k, v, temperature = (t.to(DEVICE, dtype) for t in (q, k, v, temperature))
    kpm = kpm.to(DEVICE)
    state = taylorshift.CausalState(batch, heads, d, d, dtype=dtype, device=DEVICE, order=order)
    outputs = []
    with torch.no_grad():
        for start, stop in ((0, 200), (200, 201), (201, 261)):
            part = slice(start, stop)
            outputs.append(
                state.step(q[:, :, part], k[:, :, part], v[:, :, part], temperature, kpm[:, part])
            )
    got = torch.cat(outputs, 2)
    options = {"causal": True, "mode": "direct", "key_padding_mask": kpm, "order": order}
    exact = taylorshift.taylor_shift_attention(
        *(t.double() for t in (q, k, v, temperature)), **options
    )
    if dtype == torch.float64:
        assert max_error(got, exact) <= 1e-12 * exact.abs().max().item()
    else:
        approx = taylorshift.taylor_shift_attention(q, k, v, temperature, **options)
        assert_close_to_reference("steps", got, exact, approx, dtype)
    assert state.tokens == tokens
    assert state.valid_keys.tolist() == (~kpm).sum(1).tolist()


@pytest.mark.parametrize("mode", ("direct", "efficient"))
@pytest.mark.parametrize(
    "shape,d,e",
    [
        ((1, 3, 1, 1), 16, 16),
        ((2, 1, 257, 63), 8, 5),
        ((1, 2, 65, 300), 3, 20),
        ((1, 1, 17, 19), 1, 1),
    ],
    ids=["one_token", "e_lt_d", "odd_dims", "d1"],
)
def test_odd_shapes(mode, shape, d, e):
    check_operator(mode, torch.float32, d, "key_padding", shape=shape, e=e)


@pytest.mark.parametrize("mode", ("direct", "efficient"))
def test_head_dim_limit_is_a_clear_error(mode):
    q, k, v = make_factors(1, 1, 4, 4, 129, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="head dims"):
        if mode == "direct":
            ops.direct_forward(q, k, v, None, None, False, True, list(COEFFICIENTS))
        else:
            ops.efficient_forward(q, k, v, None, True, list(COEFFICIENTS))


@gpu_only
@pytest.mark.parametrize("mode", ("direct", "efficient"))
def test_composite_matches_cpu_float64_with_gradients(mode):
    """taylor_shift_attention end to end (normalisation, temperature, autograd) on CUDA vs CPU."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 96, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    t = 0.5 + torch.rand(4, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 96, generator=gen) < 0.2
    results = {}
    for device in ("cpu", "cuda"):
        leaves = [x.to(device).requires_grad_() for x in (q, k, v, t)]
        out = taylorshift.taylor_shift_attention(
            *leaves[:3], leaves[3], key_padding_mask=mask.to(device), mode=mode
        )
        out.square().sum().backward()
        results[device] = [out] + [x.grad for x in leaves]
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ("direct", "efficient"))
def test_non_contiguous_inputs_and_strided_masks(mode, dtype):
    """Strided q, k, v, grad_out (a model's (B, L, H, d) views, a sliced value dim) and a
    transposed mask give bit for bit the results of their contiguous copies, forward and backward."""
    base_q, base_k, base_v = make_factors(2, 3, 50, 90, 32, 32, dtype, seed=4)
    # (B, M, H, d) storage viewed as (B, H, M, d), and a sliced value dim.
    q = base_q.transpose(1, 2).contiguous().transpose(1, 2)
    k = base_k.transpose(1, 2).contiguous().transpose(1, 2)
    v = torch.cat([base_v, base_v], -1)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kpm = (torch.rand(90, 2) < 0.3).to(DEVICE).t()  # transposed (B, N) mask
    options = (kpm, None, False, True) if mode == "direct" else (kpm, True)
    forward = ops.direct_forward if mode == "direct" else ops.efficient_forward
    backward = ops.direct_backward if mode == "direct" else ops.efficient_backward
    grad_out = torch.randn(2, 50, 3, 32, dtype=torch.float64).to(DEVICE, dtype).transpose(1, 2)

    def forward_backward(q, k, v, grad_out, mask):
        args = (mask, *options[1:])
        saved = forward(q, k, v, *args, list(COEFFICIENTS))
        grads = backward(grad_out, q, k, v, *saved, *args, list(COEFFICIENTS))
        return [*saved, *grads]

    got = forward_backward(q, k, v, grad_out, kpm)
    want = forward_backward(*(t.contiguous() for t in (q, k, v, grad_out)), kpm.contiguous())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ("direct", "efficient"))
def test_kernels_read_strided_inputs_in_place(mode, dtype):
    """The module's (B, L, H, d) views reach the kernels without a copy: no aten::copy_ of a
    tensor of the inputs' shape runs inside the forward or backward operator."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, grad_out = (
        torch.randn(2, 40, 3, 32, dtype=torch.float64).to(DEVICE, dtype).transpose(1, 2)
        for _ in range(4)
    )
    options = (None, None, False, True) if mode == "direct" else (None, True)
    forward = ops.direct_forward if mode == "direct" else ops.efficient_forward
    backward = ops.direct_backward if mode == "direct" else ops.efficient_backward
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        saved = forward(q, k, v, *options, list(COEFFICIENTS))
        backward(grad_out, q, k, v, *saved, *options, list(COEFFICIENTS))
    # Only per-row scalars and the (B, H, F, e + 1) state may be converted inside.
    copies = [
        event.input_shapes
        for event in prof.events()
        if event.name == "aten::copy_" and list(q.shape) in event.input_shapes
    ]
    assert copies == []


def test_efficient_backward_reads_strided_inputs():
    """q, k, v and grad_out as the (B, L, H, d) storage TaylorShiftAttention passes, viewed as
    (B, H, L, d): the bfloat16 backward reads them through their strides and returns exactly the
    gradients of contiguous copies."""
    base = make_factors(2, 2, 40, 70, 16, 16, torch.bfloat16, seed=10)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in base)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kpm = (torch.rand(2, 70, generator=torch.Generator().manual_seed(11)) < 0.3).to(DEVICE)
    args = (kpm, True, list(COEFFICIENTS))
    out, den, state = ops.efficient_forward(q, k, v, *args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(12))
    grad_out = grad_out.to(DEVICE, torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
    got = ops.efficient_backward(grad_out, q, k, v, out, den, state, *args)
    plain = [x.contiguous() for x in (grad_out, q, k, v)]
    want = ops.efficient_backward(*plain, out, den, state, *args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_efficient_non_finite_padded_keys_change_nothing(dtype):
    """NaN and inf in padded keys and values (d = e = 16: the register-resident kernels, whose staged
    tiles zero masked keys by selection): the outputs, state and gradients equal those of zeroed
    padding exactly."""
    q, k, v = make_factors(2, 2, 20, 70, 16, 16, dtype, seed=13)
    kpm = torch.zeros(2, 70, dtype=torch.bool)
    kpm[0, 3] = kpm[1, -1] = True
    kpm = kpm.to(DEVICE)
    clean_k, clean_v = (x.masked_fill(kpm[:, None, :, None], 0) for x in (k, v))
    poisoned_k, poisoned_v = clean_k.clone(), clean_v.clone()
    poisoned_k[0, :, 3] = float("nan")
    poisoned_v[1, 1, -1, 2] = float("inf")
    args = (kpm, True, list(COEFFICIENTS))
    grad_out = torch.randn(2, 2, 20, 16, generator=torch.Generator().manual_seed(14))
    grad_out = grad_out.to(DEVICE, dtype)
    results = []
    for kk, vv in ((clean_k, clean_v), (poisoned_k, poisoned_v)):
        out, den, state = ops.efficient_forward(q, kk, vv, *args)
        grads = ops.efficient_backward(grad_out, q, kk, vv, out, den, state, *args)
        results.append((out, den, state, *grads))
    for name, want, got in zip(("out", "den", "state", "dq", "dk", "dv"), *results):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
def test_direct_padded_keys_are_never_read(dtype, causal):
    """The direct kernels load padded keys as zero rows of K and V, never reading their values:
    NaN and inf there give bit for bit the result of zeros, forward and backward."""
    q, k, v = make_factors(2, 2, 150, 150, 64, 64, dtype, seed=5)
    kpm = torch.zeros(2, 150, dtype=torch.bool, device=DEVICE)
    kpm[0, 3] = kpm[0, 64:80] = kpm[1, -1] = True  # inside, across and at the end of key tiles
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[0, :, 3] = float("nan")
    poisoned_k[0, :, 64:80] = float("inf")
    poisoned_v[0, :, 70] = float("nan")
    poisoned_v[1, :, -1] = float("-inf")
    clean_k, clean_v = (x.masked_fill(kpm[:, None, :, None], 0) for x in (k, v))
    grad_out = torch.randn(2, 2, 150, 64, dtype=torch.float64).to(DEVICE, dtype)
    results = []
    for key, value in ((poisoned_k, poisoned_v), (clean_k, clean_v)):
        out, den = ops.direct_forward(q, key, value, kpm, None, causal, True, list(COEFFICIENTS))
        grads = ops.direct_backward(
            grad_out, q, key, value, out, den, kpm, None, causal, True, list(COEFFICIENTS)
        )
        results.append([out, den, *grads])
    for got, want in zip(*results):
        assert got.isfinite().all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Padded keys get zero gradients.
    for grad in results[0][3:]:
        assert (grad[kpm[:, None, :, None].expand_as(grad)] == 0).all()


@gpu_only
@pytest.mark.parametrize("mode", ("direct", "efficient"))
def test_side_stream_and_determinism(mode):
    q, k, v = make_factors(2, 2, 300, 500, 64, 64, torch.bfloat16, seed=5)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def run():
        out = taylorshift.taylor_shift_attention(*leaves, mode=mode, normalize=False, scale=1.0)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return [out.detach(), *grads]

    default = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        side = run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(default, side):
        assert torch.equal(a, b)  # same kernels, fixed reduction order: bitwise equal


@gpu_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    q, k, v = make_factors(1, 2, 40, 40, 16, 16, torch.float32, device="cuda:1")
    for op_args in (
        (ops.direct_forward, (None, None, False, True)),
        (ops.efficient_forward, (None, True)),
    ):
        out = op_args[0](q, k, v, *op_args[1], list(COEFFICIENTS))[0]
        assert out.device == torch.device("cuda:1")
        exact = reference_outputs(q.double(), k.double(), v.double(), None, None, False)[0]
        torch.testing.assert_close(out.double(), exact, rtol=1e-4, atol=1e-4)


def chunked_reference(q, k, v, chunk=1 << 17):
    """Exact (float64, on the GPU) output for few queries against many keys."""
    q, k, v = q.double(), k.double(), v.double()
    a, b, c = COEFFICIENTS
    num = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64, device=q.device)
    den = torch.zeros(*q.shape[:-1], 1, dtype=torch.float64, device=q.device)
    for j in range(0, k.shape[2], chunk):
        x = q @ k[:, :, j : j + chunk].transpose(-1, -2)
        w = (a * x + b) * x + c
        num += w @ v[:, :, j : j + chunk]
        den += w.sum(-1, keepdim=True)
    sigma = (k.shape[2] / q.shape[-1]) ** 0.5
    return sigma * num / den, den.squeeze(-1)


@gpu_only
@pytest.mark.parametrize("mode", ("direct", "efficient"))
def test_one_million_keys_bfloat16_no_overflow(mode):
    """N = 2^20 keys in bf16: sums of a million weights stay finite and accurate (float32 den)."""
    keys = 1 << 20
    q, k, v = make_factors(1, 2, 128, keys, 16, 16, torch.bfloat16, seed=6)
    if mode == "direct":
        out, den = ops.direct_forward(q, k, v, None, None, False, True, list(COEFFICIENTS))
    else:
        out, den, state = ops.efficient_forward(q, k, v, None, True, list(COEFFICIENTS))
        assert torch.isfinite(state).all()
    exact_out, exact_den = chunked_reference(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(den).all()
    torch.testing.assert_close(den.double(), exact_den, rtol=1e-2, atol=0)
    scale = exact_out.abs().max().item()
    assert max_error(out, exact_out) <= 0.02 * scale


@gpu_only
def test_one_million_tokens_efficient_forward_backward_bfloat16():
    """M = N = 2^20 through the composite op in bf16, forward and backward: finite everywhere."""
    tokens = 1 << 20
    gen = torch.Generator(device="cuda").manual_seed(8)
    q, k, v = (
        torch.randn(
            1, 2, tokens, 16, device="cuda", generator=gen, dtype=torch.bfloat16
        ).requires_grad_()
        for _ in range(3)
    )
    out = taylorshift.taylor_shift_attention(q, k, v, mode="efficient")
    out.float().square().mean().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    # With cosine logits and sigma = sqrt(N/d) the outputs stay O(sqrt(N/d) * |mean v|).
    assert out.abs().max().item() < 1e4


@pytest.mark.parametrize("mode", ("direct", "efficient"))
def test_contiguous_views_at_unaligned_offsets(mode):
    """A contiguous view may start at any element: the kernels' 16-byte loads must not assume."""
    q, k, v = make_factors(2, 2, 40, 70, 64, 64, torch.bfloat16, seed=9)

    def shifted(x):
        storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = storage[1:].view(x.shape)
        view.copy_(x)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    op = ops.direct_forward if mode == "direct" else ops.efficient_forward
    args = (None, None, False, True) if mode == "direct" else (None, True)
    want = op(q, k, v, *args, list(COEFFICIENTS))
    got = op(shifted(q), shifted(k), shifted(v), *args, list(COEFFICIENTS))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
