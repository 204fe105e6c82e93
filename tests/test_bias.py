"""Additive float attention biases (taylorshift.bias): direct TaylorShift with weights
exp(bias_ij - m_i) f(x_ij), against a dense computation written out here, its gradients, ALiBi,
-1e9 and -inf masking, low precision, torch.compile, and the module's float attn_mask."""

import copy

import pytest
import torch
from torch import nn
from ts_testing import (
    F64_TOL,
    LOW_PRECISION,
    attention,
    error_bound,
    make_inputs,
    max_error,
    random_key_padding_mask,
)

from taylorshift import TaylorShiftAttention, replace_attention
from taylorshift.bias import biased_direct_attention, biased_weights, check_mode

B, H, M, N, D, E = 2, 3, 37, 41, 8, 5


def dense_biased(
    q, k, v, temperature, bias, *, key_padding_mask=None, causal=False, normalize=True,
    output_scale=True, scale=None, coefficients=(0.5, 1.0, 1.0),
):  # fmt: skip
    """The oracle, independent of taylorshift: every (B, H, M, N) matrix materialised. Key j
    counts exp(bias_ij - max_j bias_ij) times for query i: in the weights and in N_i."""
    a, b, c = coefficients
    batch, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    if normalize:
        q = q / q.norm(dim=-1, keepdim=True)
        k = k / k.norm(dim=-1, keepdim=True)
    else:
        q = q * (head_dim**-0.5 if scale is None else scale)
    x = temperature.view(1, heads, 1, 1) * torch.einsum("bhid,bhjd->bhij", q, k)
    log_mult = bias.expand(batch, heads, queries, keys).clone()
    if key_padding_mask is not None:
        log_mult[key_padding_mask.view(batch, 1, 1, keys).expand_as(log_mult)] = float("-inf")
    if causal:
        log_mult[..., torch.ones(queries, keys, dtype=torch.bool, device=q.device).triu(1)] = float(
            "-inf"
        )
    row_max = log_mult.max(-1, keepdim=True).values
    row_max[row_max == float("-inf")] = 0
    multiplicity = torch.exp(log_mult - row_max)
    weights = multiplicity * (a * x**2 + b * x + c)
    den = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(den == 0, 1, den)
    out = torch.einsum("bhij,bhje->bhie", probs, v)
    if output_scale:
        out = out * (multiplicity.sum(-1, keepdim=True) / head_dim).sqrt()
    return out


def dense64(q, k, v, temperature, bias, **options):
    """dense_biased in float64 on the CPU from the (already rounded) inputs."""
    up = [x.detach().cpu().double() for x in (q, k, v, temperature, bias)]
    options = {
        name: value.cpu() if isinstance(value, torch.Tensor) else value
        for name, value in options.items()
    }
    return dense_biased(*up, **options)


def random_bias(*shape, seed=3, device="cpu", dtype=torch.float64):
    """A relative-position-like bias: normal with scale 2, so multiplicities span ~e^±6."""
    generator = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(device, dtype)


def alibi(heads, queries, keys, *, device="cpu", dtype=torch.float64):
    """ALiBi (Press et al. 2022): bias_hij = -slope_h |i - j|, slopes 2^(-8 h / H)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)
    distance = (torch.arange(queries).view(-1, 1) - torch.arange(keys).view(1, -1)).abs()
    return (-slopes.view(-1, 1, 1) * distance).to(device, dtype)


BIAS_SHAPES = [(M, N), (1, N), (H, M, N), (B, 1, M, N), (B, H, M, N), (B, H, 1, N)]


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block_size", [1, 16, None])
def test_matches_dense_for_bias_shapes_and_blocks(device, shape, block_size):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device)
    bias = random_bias(*shape, device=device)
    out = biased_direct_attention(q, k, v, t, bias=bias, block_size=block_size)
    torch.testing.assert_close(out.cpu(), dense64(q, k, v, t, bias), **F64_TOL)
    # The bias did something.
    assert (out - attention(q, k, v, t, mode="direct")).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"normalize": False},
        {"normalize": False, "scale": 0.3},
        {"output_scale": False},
        {"coefficients": (0.7, 0.4, 0.9)},
    ],
    ids=["default", "dot", "dot_scale", "no_output_scale", "coefficients"],
)
def test_matches_dense_with_masks_and_options(device, causal, options):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device)
    bias = random_bias(H, M, N, device=device)
    padding = random_key_padding_mask(B, N, device=device)
    masks = {"key_padding_mask": padding, "causal": causal}
    out = biased_direct_attention(q, k, v, t, bias=bias, block_size=10, **masks, **options)
    torch.testing.assert_close(out.cpu(), dense64(q, k, v, t, bias, **masks, **options), **F64_TOL)


def test_zero_bias_is_taylorshift_and_shift_invariant(device):
    # exp(bias - m) = 1 for a constant bias: plain TaylorShift, N_i the plain key count.
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device)
    padding = random_key_padding_mask(B, N, device=device)
    masks = {"key_padding_mask": padding, "causal": True}
    plain = attention(q, k, v, t, mode="direct", **masks)
    for constant in (0.0, 5.0, -300.0):
        bias = torch.full((1, N), constant, dtype=torch.float64, device=device)
        out = biased_direct_attention(q, k, v, t, bias=bias, **masks)
        torch.testing.assert_close(out, plain, **F64_TOL)


def test_alibi(device):
    q, k, v, t = make_inputs(1, 4, 96, 96, D, E, device=device)
    bias = alibi(4, 96, 96, device=device)
    out = biased_direct_attention(q, k, v, t, bias=bias, causal=True, block_size=32)
    torch.testing.assert_close(out.cpu(), dense64(q, k, v, t, bias, causal=True), **F64_TOL)
    # ALiBi's intent holds: the weights decay with distance, so the mean attended distance is
    # shorter than without the bias, the more so the steeper the head's slope.
    probs, _ = biased_weights(q, k, t, bias=bias, causal=True)
    plain, _ = biased_weights(q, k, t, bias=torch.zeros_like(bias), causal=True)
    distance = (torch.arange(96).view(-1, 1) - torch.arange(96).view(1, -1)).abs().to(probs)
    mean_distance = (probs * distance).sum(-1).mean(-1)[0]
    plain_distance = (plain * distance).sum(-1).mean(-1)[0]
    assert (mean_distance < plain_distance).all()
    assert (mean_distance.diff() > 0).all()  # slopes decrease with the head index


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_minus_1e9_padding_equals_the_bool_mask(device, dtype, causal):
    # exp(-1e9) is exactly 0: the padded keys get weight 0 and are not counted in N_i.
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device, dtype=dtype)
    padding = random_key_padding_mask(B, N, device=device)
    bias = torch.zeros(B, 1, 1, N, dtype=dtype, device=device).masked_fill(
        padding.view(B, 1, 1, N), -1e9
    )
    out = biased_direct_attention(q, k, v, t, bias=bias, causal=causal)
    expected = attention(q, k, v, t, key_padding_mask=padding, causal=causal, mode="direct")
    tolerance = F64_TOL if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(out, expected, **tolerance)


def test_rows_with_every_key_at_minus_inf_give_zeros(device):
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device, requires_grad=True)
    bias = random_bias(B, H, M, N, device=device)
    bias[:, :, :5] = float("-inf")  # queries 0..4 see nothing
    bias[0, 1, 7, 3:] = float("-inf")  # query 7 of one head sees keys 0..2
    bias.requires_grad_(True)
    out = biased_direct_attention(q, k, v, t, bias=bias, block_size=4)
    assert (out[:, :, :5] == 0).all()
    torch.testing.assert_close(out.detach().cpu(), dense64(q, k, v, t, bias), **F64_TOL)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, t, bias))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, :5] == 0).all() and (grads[4][:, :, :5] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(device, causal):
    # All five inputs in one gradcheck, through several checkpointed blocks.
    q, k, v, t = make_inputs(1, 2, 6, 5, 3, 2, device=device, requires_grad=True)
    bias = random_bias(2, 6, 5, device=device).requires_grad_(True)
    padding = torch.tensor([[False, False, True, False, False]], device=device)

    def run(q, k, v, t, bias):
        return biased_direct_attention(
            q, k, v, t, bias=bias, key_padding_mask=padding, causal=causal, block_size=4
        )

    assert torch.autograd.gradcheck(run, (q, k, v, t, bias))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision(device, dtype):
    # Within error_bound of the error PyTorch makes computing the dense oracle in that dtype.
    q, k, v, t = make_inputs(B, H, 70, 90, 16, 16, device=device, dtype=dtype)
    bias = alibi(H, 70, 90, device=device, dtype=dtype) + random_bias(
        1, 90, device=device, dtype=dtype
    )
    masks = {"key_padding_mask": random_key_padding_mask(B, 90, device=device), "causal": True}
    out = biased_direct_attention(q, k, v, t, bias=bias, **masks)
    assert out.dtype == dtype
    exact = dense64(q, k, v, t, bias, **masks)
    reference_error = max_error(dense_biased(q, k, v, t, bias, **masks), exact)
    error = max_error(out, exact)
    bound = error_bound(reference_error, exact, dtype)
    assert error <= bound, f"{dtype}: {error:.3e} > bound {bound:.3e}"


def test_backward_keeps_no_weight_matrix(device):
    # Checkpointing: autograd keeps each block's inputs, never a (B, H, block, N) weight matrix;
    # the backward recomputes them block by block.
    q, k, v, t = make_inputs(B, H, M, N, D, E, device=device, requires_grad=True)
    bias = random_bias(H, M, N, device=device).requires_grad_(True)

    def saved_shapes(function):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda x: shapes.append(tuple(x.shape)) or x, lambda x: x
        ):
            out = function(q, k, v, t, bias)
        return out, shapes

    out, shapes = saved_shapes(
        lambda q, k, v, t, bias: biased_direct_attention(q, k, v, t, bias=bias, block_size=8)
    )
    assert (B, H, 8, N) not in shapes and (B, H, M, N) not in shapes
    dense, dense_shapes = saved_shapes(dense_biased)
    assert (B, H, M, N) in dense_shapes  # what the hook sees without checkpointing
    grads = torch.autograd.grad(out.sum(), (q, k, v, t, bias))
    expected = torch.autograd.grad(dense.sum(), (q, k, v, t, bias))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, **F64_TOL)


def test_compile_fullgraph_forward_and_backward(devices):
    torch._dynamo.reset()

    def loss(q, k, v, t, bias):
        return biased_direct_attention(q, k, v, t, bias=bias, causal=True, block_size=16).sum()

    compiled = torch.compile(loss, fullgraph=True)
    for device in devices:
        inputs = make_inputs(1, 2, 40, 40, 8, device=device, requires_grad=True)
        bias = random_bias(2, 40, 40, device=device).requires_grad_(True)
        got = torch.autograd.grad(compiled(*inputs, bias), (*inputs, bias))
        expected = torch.autograd.grad(loss(*inputs, bias), (*inputs, bias))
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, **F64_TOL)


def test_bad_bias():
    q, k, v, t = make_inputs(1, 2, 4, 5, 3)
    with pytest.raises(TypeError, match="bias must be a float tensor"):
        biased_direct_attention(q, k, v, t, bias=torch.zeros(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not broadcast to"):
        biased_direct_attention(q, k, v, t, bias=torch.zeros(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not match"):
        biased_direct_attention(q, k[..., :2], v, t, bias=torch.zeros(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        biased_direct_attention(
            q, k, v, t, bias=torch.zeros(4, 5, dtype=torch.float64),
            key_padding_mask=torch.zeros(1, 5),
        )  # fmt: skip
    with pytest.raises(NotImplementedError, match="mode='direct' or 'auto'.*per-pair bias"):
        check_mode("efficient")
    with pytest.raises(ValueError, match="mode must be"):
        check_mode("fast")


# ---- the module -----------------------------------------------------------------------------

L = 24
EMBED, HEADS = 12, 3


def _encoder_layer(device, **options):
    layer = nn.TransformerEncoderLayer(
        EMBED, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True, dtype=torch.float64,
        device=device,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters()):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return replace_attention(layer, **options)


def _heads(module, x):
    """(B, H, L, d) query, key and value projections of self-attention input x."""
    q, k, v = nn.functional.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, -1)
    return [y.unflatten(-1, (HEADS, EMBED // HEADS)).transpose(1, 2) for y in (q, k, v)]


def _hand_attention(module, x, bias, padding=None):
    """The module's attention by hand: projections, dense_biased, out_proj."""
    out = dense_biased(*_heads(module, x), module.temperature, bias, key_padding_mask=padding)
    return module.out_proj(out.transpose(1, 2).flatten(2))


def test_module_alibi_mask_in_transformer_encoder_layer(device):
    layer = _encoder_layer(device).eval()
    x = torch.randn(B, L, EMBED, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    x = x.to(device)
    mask = alibi(HEADS, L, L, device=device).repeat(B, 1, 1)  # (B * H, L, L), as MHA takes
    padding = random_key_padding_mask(B, L, device=device)
    # nn.TransformerEncoderLayer wants both masks of one type: padding as 0 / -inf.
    float_padding = torch.zeros(B, L, dtype=torch.float64, device=device)
    float_padding = float_padding.masked_fill(padding, float("-inf"))
    out = layer(x, src_mask=mask, src_key_padding_mask=float_padding)
    # Post-norm layer: norm1(x + attention), then norm2(h + feed-forward).
    attended = _hand_attention(layer.self_attn, x, mask.view(B, HEADS, L, L), padding)
    h = layer.norm1(x + attended)
    expected = layer.norm2(h + layer.linear2(layer.activation(layer.linear1(h))))
    torch.testing.assert_close(out, expected, **F64_TOL)
    out.square().sum().backward()
    attention_parameters = [p for p in layer.self_attn.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention_parameters)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_module_returns_biased_weights(device, dropout):
    module = copy.deepcopy(_encoder_layer(device).self_attn).train()
    module.dropout = dropout
    x = torch.randn(B, L, EMBED, dtype=torch.float64, device=device)
    mask = alibi(HEADS, L, L, device=device)[0]  # (L, L), one slope for every head
    out, weights = module(x, x, x, attn_mask=mask, average_attn_weights=False)
    q, k, v = _heads(module, x)
    expected_weights, multiplicity = biased_weights(q, k, module.temperature, bias=mask)
    if dropout == 0:
        torch.testing.assert_close(weights, expected_weights, **F64_TOL)
        torch.testing.assert_close(out, _hand_attention(module, x, mask), **F64_TOL)
        return
    # Dropped weights, applied and returned: each kept one scaled by 1 / (1 - p), and the
    # output scale still counts the keys' multiplicities.
    kept = weights != 0
    assert 0 < kept.double().mean() < 1
    torch.testing.assert_close(weights[kept], expected_weights[kept] / (1 - dropout), **F64_TOL)
    sigma = (multiplicity.sum(-1, keepdim=True) / (EMBED // HEADS)).sqrt()
    expected = module.out_proj((weights @ v * sigma).transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, expected, **F64_TOL)


def test_module_compile_fullgraph_with_alibi_mask():
    torch._dynamo.reset()
    layer = _encoder_layer("cpu").eval()
    x = torch.randn(B, L, EMBED, dtype=torch.float64)
    mask = alibi(HEADS, L, L).repeat(B, 1, 1)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for given in (mask, causal):  # a bias, and a 0 / -inf mask, which takes the biased path
        torch.testing.assert_close(compiled(x, src_mask=given), layer(x, src_mask=given), **F64_TOL)


def test_module_efficient_mode_rejects_a_bias():
    module = TaylorShiftAttention(EMBED, HEADS, batch_first=True, mode="efficient")
    x = torch.randn(B, L, EMBED)
    with pytest.raises(NotImplementedError, match="(?s)mode='direct' or 'auto'.*per-pair bias"):
        module(x, x, x, attn_mask=alibi(HEADS, L, L, dtype=torch.float32)[0])
