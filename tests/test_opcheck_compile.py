"""torch.library.opcheck on every taylorshift operator, and torch.compile(fullgraph=True) of a
model and of a function that use TaylorShift (no graph break, same numbers as eager)."""

import pytest
import torch
from torch import nn
from torch.library import opcheck
from ts_testing import (
    DEVICES,
    loss_and_gradients,
    make_inputs,
    random_attn_mask,
    random_key_padding_mask,
)

import taylorshift

DTYPES = [torch.float64, torch.float32]
COEFFS = [0.5, 1.0, 1.0]
B, H, M, N, D, E = 2, 2, 5, 7, 4, 3


def _assert_opcheck(op, args, kwargs=None):
    result = opcheck(op, args, kwargs or {})
    assert set(result.values()) == {"SUCCESS"}, result


def _inputs(device, dtype, requires_grad, layout="contiguous"):
    q, k, v, _ = make_inputs(B, H, M, N, D, E, dtype=dtype, device=device)
    q = torch.nn.functional.normalize(q, dim=-1)  # the kernels take q_hat, k_hat
    k = torch.nn.functional.normalize(k, dim=-1)
    if layout == "transposed":
        # (B, tokens, H, dim) memory viewed as (B, H, tokens, dim): what TaylorShiftAttention
        # passes after its projections, so what torch.compile traces through the module.
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        assert not q.is_contiguous()
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def _masks(device, masked):
    if not masked:
        return None, None
    kpm = random_key_padding_mask(B, N, device=device)
    return kpm, random_attn_mask(B, H, M, N, device=device)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "masks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_attention(device, dtype, masked):
    q, k, v = _inputs(device, dtype, requires_grad=True)
    t = torch.tensor([0.7, 1.3], dtype=dtype, device=device, requires_grad=True)
    kpm, attn = _masks(device, masked)
    op = torch.ops.taylorshift.attention.default
    for kwargs in [
        {"key_padding_mask": kpm, "mode": "efficient"},
        {"key_padding_mask": kpm, "attn_mask": attn, "causal": masked, "mode": "direct"},
        {
            "key_padding_mask": kpm,
            "mode": "auto",
            "normalize": False,
            "scale": 0.5,
            "output_scale": False,
        },
    ]:
        _assert_opcheck(op, (q, k, v, t), kwargs)


def test_opcheck_attention_transposed_inputs(device):
    q, k, v = _inputs(device, torch.float64, requires_grad=True, layout="transposed")
    for mode in ["direct", "efficient"]:
        _assert_opcheck(torch.ops.taylorshift.attention.default, (q, k, v), {"mode": mode})


LAYOUTS = ["contiguous", "transposed"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "masks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_direct_forward_and_backward(device, dtype, masked, layout):
    q, k, v = _inputs(device, dtype, requires_grad=True, layout=layout)
    kpm, attn = _masks(device, masked)
    forward_args = (q, k, v, kpm, attn, masked, True, COEFFS)
    _assert_opcheck(torch.ops.taylorshift.direct_forward.default, forward_args)
    with torch.no_grad():
        out, den = torch.ops.taylorshift.direct_forward(*forward_args)
    q, k, v = (x.detach() for x in (q, k, v))
    grad_out = torch.randn_like(out)
    _assert_opcheck(
        torch.ops.taylorshift.direct_backward.default,
        (grad_out, q, k, v, out, den, kpm, attn, masked, True, COEFFS),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", ["factors", "normalize", "temperature"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_efficient_forward_and_backward(device, dtype, masked, normalize, layout):
    q, k, v = _inputs(device, dtype, requires_grad=True, layout=layout)
    kpm, _ = _masks(device, masked)
    # q and k as the logits' factors, or normalised inside (with or without a temperature).
    temperature = torch.tensor([0.7, -1.3], dtype=dtype, device=device, requires_grad=True)
    fused = {
        "factors": (),
        "normalize": (True,),
        "temperature": (True, temperature),
    }[normalize]
    forward_args = (q, k, v, kpm, True, COEFFS, *fused)
    _assert_opcheck(torch.ops.taylorshift.efficient_forward.default, forward_args)
    with torch.no_grad():
        out, den, state = torch.ops.taylorshift.efficient_forward(*forward_args)
    q, k, v = (x.detach() for x in (q, k, v))
    fused = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in fused)
    grad_out = torch.randn_like(out)
    _assert_opcheck(
        torch.ops.taylorshift.efficient_backward.default,
        (grad_out, q, k, v, out, den, state, kpm, True, COEFFS, *fused),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_normalize_rows_and_backward(device, dtype, layout):
    q, _, _ = _inputs(device, dtype, requires_grad=True, layout=layout)
    factor = torch.tensor([0.7, -1.3], dtype=dtype, device=device, requires_grad=True)
    for args in [(q, factor), (q, None), (q.detach(), factor.detach().float())]:
        _assert_opcheck(torch.ops.taylorshift.normalize_rows.default, args)
    grad_y = torch.randn_like(q).detach()
    for f in (factor.detach(), None):
        _assert_opcheck(
            torch.ops.taylorshift.normalize_rows_backward.default, (grad_y, q.detach(), f)
        )


class TinyModel(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = taylorshift.TaylorShiftAttention(8, 2, batch_first=True, mode=mode)
        self.head = nn.Linear(8, 3)

    def forward(self, x, key_padding_mask):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        return self.head(torch.relu(h + a))


def _grads_and_out(model, x, mask):
    model.zero_grad()
    out = model(x, mask)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# One compile per test (an inductor compile takes ~10-15 s cold on two cores); the device loop
# stays inside.
@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_compile_module_fullgraph_matches_eager(mode):
    for device in DEVICES:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyModel(mode).to(device=device, dtype=torch.float64)
        with torch.no_grad():
            model.attn.temperature.copy_(torch.tensor([0.6, 1.7]))
        x = torch.randn(2, 9, 6, dtype=torch.float64, device=device)
        mask = random_key_padding_mask(2, 9, device=device)
        eager_out, eager_grads = _grads_and_out(model, x, mask)
        compiled = torch.compile(model, fullgraph=True)
        out, grads = _grads_and_out(compiled, x, mask)
        grads = {name.removeprefix("_orig_mod."): grad for name, grad in grads.items()}
        torch.testing.assert_close(out, eager_out, rtol=1e-12, atol=1e-12)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=1e-12, msg=name)


def _attention_loss(q, k, v, t, mask):
    y = taylorshift.taylor_shift_attention(q, k, v, t, attn_mask=mask, causal=True)
    return (y * y).sum()


def test_compile_function_fullgraph_inductor_matches_eager():
    for device in DEVICES:
        torch._dynamo.reset()
        inputs = make_inputs(2, 2, 9, 11, 4, 3, device=device, requires_grad=True)
        mask = random_attn_mask(9, 11, device=device)
        expected = loss_and_gradients(_attention_loss, inputs, mask)
        compiled = torch.compile(_attention_loss, fullgraph=True)
        got = loss_and_gradients(compiled, inputs, mask)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_compile_module_forward_only_fullgraph_matches_eager():
    # Inference only (no backward graph), so independent of the backward operators.
    for device in DEVICES:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyModel("auto").to(device=device, dtype=torch.float64).eval()
        x = torch.randn(2, 9, 6, dtype=torch.float64, device=device)
        mask = random_key_padding_mask(2, 9, device=device)
        with torch.no_grad():
            expected = model(x, mask)
            got = torch.compile(model, fullgraph=True)(x, mask)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _padded_loss(q, k, v, t, mask):
    y = taylorshift.taylor_shift_attention(q, k, v, t, key_padding_mask=mask, mode="efficient")
    return (y * y).sum()


def test_compile_dynamic_shapes_fullgraph_matches_eager():
    # The Meta kernels use symbolic sizes: one dynamic graph serves several sequence lengths.
    for device in DEVICES:
        torch._dynamo.reset()
        compiled = torch.compile(_padded_loss, fullgraph=True, dynamic=True, backend="aot_eager")
        for keys in (11, 17, 30):
            inputs = make_inputs(2, 2, 5, keys, 4, 3, device=device, requires_grad=True)
            mask = random_key_padding_mask(2, keys, device=device)
            expected = loss_and_gradients(_padded_loss, inputs, mask)
            got = loss_and_gradients(compiled, inputs, mask)
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
