"""torch.ops.taylorshift.normalize_rows, the logit factors of normalize=True: y = f_h x / |x| per
row of x (B, H, L, d), with its own backward (grad_x, grad_factor). Checked against
reference.unit_rows (the pure-PyTorch fallback's composite) in float64, by gradcheck, at the edges
of every dtype's range, against PyTorch's own error in low precision, and for bad input."""

import pytest
import torch
from ts_testing import LOW_PRECISION, error_bound, max_error

from taylorshift import reference

normalize_rows = torch.ops.taylorshift.normalize_rows
B, H, L, D = 2, 3, 5, 7
EPS64 = torch.finfo(torch.float64).eps


def draw(*shape, dtype=torch.float64, device="cpu", seed=0, transposed=False):
    """Standard normal (B, H, L, d); `transposed`: (B, L, H, d) memory viewed as (B, H, L, d), the
    layout the module passes."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    if transposed:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(dtype=dtype, device=device)


def factors(device, dtype=torch.float64):
    # A negative and a zero factor: the gradient formulas must not divide by f.
    return torch.tensor([0.7, -1.3, 0.0], dtype=dtype, device=device)


def expected(x, factor=None):
    """reference.unit_rows times the factor, in float64 on the CPU."""
    y = reference.unit_rows(x.detach().cpu().double())
    return y if factor is None else y * factor.detach().cpu().double().view(1, -1, 1, 1)


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_float64_matches_reference(device, transposed):
    x = draw(B, H, L, D, device=device, transposed=transposed)
    # Rows across the float64 range: subnormal, tiny, huge (|x|^2 overflows), a zero row.
    x[0, 0, 0] *= 1e-310
    x[0, 1, 1] *= 1e-200
    x[1, 2, 3] *= 1e300
    x[1, 0, 4] = 0
    for factor in (None, factors(device)):
        y = normalize_rows(x, factor)
        assert y.dtype == x.dtype and y.device == x.device and y.is_contiguous()
        # Each entry is a few roundings of a number of magnitude <= |f|.
        torch.testing.assert_close(y.cpu(), expected(x, factor), rtol=0, atol=8 * EPS64)
    assert (normalize_rows(x)[1, 0, 4] == 0).all()


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_gradcheck_x_and_factor(device, transposed):
    x = draw(B, H, L, D, device=device, transposed=transposed).requires_grad_()
    factor = factors(device).requires_grad_()
    assert torch.autograd.gradcheck(normalize_rows, (x, factor))
    assert torch.autograd.gradcheck(normalize_rows, (x, None))
    grad_x, grad_factor = torch.autograd.grad(
        normalize_rows(x, factor).sum(), (x, factor), create_graph=True
    )
    with pytest.raises(NotImplementedError, match="second derivatives"):
        (grad_x.sum() + grad_factor.sum()).backward()


def test_zero_rows_have_identity_gradient(device):
    # At a zero row the map is not differentiable (finite differences blow up); the convention
    # is that of reference.unit_rows under autograd: y = 0 and dx = f_h g (identity times f).
    x = draw(B, H, L, D, device=device)
    x[0, 1, 2] = 0
    x[1, 0, :] = 0
    grad_y = draw(B, H, L, D, device=device, seed=1)
    factor = factors(device)
    ours_x, ours_f = x.clone().requires_grad_(), factor.clone().requires_grad_()
    normalize_rows(ours_x, ours_f).backward(grad_y)
    ref_x, ref_f = x.cpu().requires_grad_(), factor.cpu().requires_grad_()
    (reference.unit_rows(ref_x) * ref_f.view(1, -1, 1, 1)).backward(grad_y.cpu())
    torch.testing.assert_close(ours_x.grad.cpu(), ref_x.grad, rtol=0, atol=16 * EPS64)
    torch.testing.assert_close(ours_f.grad.cpu(), ref_f.grad, rtol=0, atol=64 * EPS64)
    torch.testing.assert_close(ours_x.grad[1, 0], factor[0] * grad_y[1, 0], rtol=0, atol=0)


def test_factor_gradient_keeps_the_factor_dtype(device):
    # A float64 temperature with float32 q (as a module in float32 with a float64 parameter
    # would pass): read in float32, its gradient returned in float64.
    x = draw(B, H, L, D, dtype=torch.float32, device=device)
    factor = factors(device).requires_grad_()
    normalize_rows(x, factor).sum().backward()
    assert factor.grad.dtype == torch.float64
    ref_f = factors("cpu").requires_grad_()
    (reference.unit_rows(x.cpu().double()) * ref_f.view(1, -1, 1, 1)).sum().backward()
    torch.testing.assert_close(factor.grad.cpu(), ref_f.grad, rtol=1e-5, atol=1e-5)


# Rows whose |x|^2 overflows the dtype, or whose entries are subnormal (1 / max |x_l| overflows);
# float16 and bfloat16 have float32's exponent range in the computation but not in storage.
EXTREMES = {
    torch.float32: (1e-41, 1e-30, 1e25, 1e37),
    torch.bfloat16: (1e-40, 1e-30, 1e25, 1e37),
    torch.float16: (1e-7, 1e-5, 1e3, 1e4),
}


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_within_pytorchs_own_error(device, dtype):
    x = draw(B, H, L, 32, dtype=dtype, device=device, transposed=True)
    factor = factors(device, torch.float32)
    y = normalize_rows(x, factor)
    assert y.dtype == dtype
    exact = expected(x, factor)
    # PyTorch's own: F.normalize and the product computed in the dtype itself.
    torch_y = torch.nn.functional.normalize(x, dim=-1) * factor.to(dtype).view(1, -1, 1, 1)
    bound = error_bound(max_error(torch_y, exact), exact, dtype)
    assert max_error(y, exact) <= bound

    grad_y = draw(B, H, L, 32, dtype=dtype, device=device, seed=1)
    x.requires_grad_()
    (grad_x,) = torch.autograd.grad(normalize_rows(x, factor), x, grad_y)
    x64 = x.detach().cpu().double().requires_grad_()
    exact_y = reference.unit_rows(x64) * factor.cpu().double().view(1, -1, 1, 1)
    (exact_grad,) = torch.autograd.grad(exact_y, x64, grad_y.cpu().double())
    x_low = x.detach().clone().requires_grad_()
    torch_y = torch.nn.functional.normalize(x_low, dim=-1) * factor.to(dtype).view(1, -1, 1, 1)
    (torch_grad,) = torch.autograd.grad(torch_y, x_low, grad_y)
    bound = error_bound(max_error(torch_grad, exact_grad), exact_grad, dtype)
    assert grad_x.dtype == dtype
    assert max_error(grad_x, exact_grad) <= bound


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_extreme_rows_are_exact_to_rounding(device, dtype):
    # PyTorch's F.normalize overflows or flushes here, so the yardstick is the rounding of the
    # exact result itself: the floor of error_bound (half an ulp of max |y| in 16 bits, two in
    # float32, where y = (x / s) (f / |x / s|) carries a few float32 roundings).
    scales = torch.tensor(EXTREMES[dtype], dtype=torch.float64).view(1, 1, -1, 1)
    x = (draw(1, 2, len(EXTREMES[dtype]), 16) * scales).to(dtype=dtype, device=device)
    assert x.isfinite().all() and (x != 0).any(-1).all()
    factor = torch.tensor([1.0, 2.0], device=device)
    y = normalize_rows(x, factor)
    exact = expected(x, factor)
    assert y.isfinite().all()
    assert max_error(y, exact) <= error_bound(0.0, exact, dtype)


def test_bad_input_names_the_problem(device):
    x = draw(B, H, L, D, device=device)
    with pytest.raises(ValueError, match=r"normalize_rows: x must be 4-d \(B, H, L, d\)"):
        normalize_rows(x[0])
    with pytest.raises(TypeError, match="normalize_rows: x must be float16, bfloat16, float32"):
        normalize_rows(x.to(torch.int32))
    with pytest.raises(ValueError, match=r"normalize_rows: factor must have shape \(H,\) = \(3,\)"):
        normalize_rows(x, torch.ones(2, dtype=x.dtype, device=device))
    with pytest.raises(TypeError, match="normalize_rows: factor must be floating"):
        normalize_rows(x, torch.ones(H, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="normalize_rows: factor is on meta but x is on"):
        normalize_rows(x, torch.ones(H, device="meta"))
    backward = torch.ops.taylorshift.normalize_rows_backward
    with pytest.raises(ValueError, match=r"normalize_rows_backward: grad_y must have shape"):
        backward(x[:, :, :-1], x, None)
    with pytest.raises(TypeError, match="normalize_rows_backward: grad_y must be torch.float64"):
        backward(x.float(), x, None)
