"""The efficient operators' normalize=True: they form the logits' factors temperature_h q / |q|
and k / |k| themselves, chunk by chunk, with normalize_rows' row functions. Their outputs and
gradients (q, k, v and the temperature) against the same operators on normalize_rows' factors,
followed by normalize_rows_backward: the same arithmetic, so float64 agrees to rounding. Both CPU
paths (register kernels and BLAS tiles), key padding with non-finite padded rows, and the
arguments' checks. The gradients against the float64 reference are in test_gradients and
test_cpu_register_kernels, which reach these operators through taylor_shift_attention."""

import pytest
import torch
from ts_testing import make_inputs, random_key_padding_mask

ops = torch.ops.taylorshift
COEFFICIENTS = [0.5, 1.0, 1.0]


def _unfused(q, k, v, t, mask, grad_out):
    """normalize_rows, the operators on the factors, normalize_rows_backward."""
    q_hat, k_hat = ops.normalize_rows(q, t), ops.normalize_rows(k)
    out, den, state = ops.efficient_forward(q_hat, k_hat, v, mask, True, COEFFICIENTS)
    grad_q_hat, grad_k_hat, grad_v = ops.efficient_backward(
        grad_out, q_hat, k_hat, v, out, den, state, mask, True, COEFFICIENTS
    )[:3]
    grad_q, grad_t = ops.normalize_rows_backward(grad_q_hat, q, t)
    grad_k = ops.normalize_rows_backward(grad_k_hat, k, None)[0]
    return (out, den, state), (grad_q, grad_k, grad_v, grad_t)


def _fused(q, k, v, t, mask, grad_out):
    saved = ops.efficient_forward(q, k, v, mask, True, COEFFICIENTS, True, t)
    grads = ops.efficient_backward(grad_out, q, k, v, *saved, mask, True, COEFFICIENTS, True, t)
    return saved, grads


# value_dim 16: two vectors of 8 doubles, the register kernels; 5: the BLAS tiles.
@pytest.mark.parametrize("value_dim", [16, 5], ids=["register_path", "blas_path"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
def test_fused_normalization_matches_normalize_rows(value_dim, masked):
    # 600 keys: three 256-key chunks with a ragged tail; 2 x 3 heads, one per-head temperature
    # with a negative entry.
    q, k, v, _ = make_inputs(2, 3, 301, 600, 8, value_dim, seed=21)
    t = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    mask = random_key_padding_mask(2, 600) if masked else None
    grad_out = torch.randn(2, 3, 301, value_dim, dtype=torch.float64)
    saved, grads = _fused(q, k, v, t, mask, grad_out)
    saved_ref, grads_ref = _unfused(q, k, v, t, mask, grad_out)
    for name, got, want in zip(("out", "den", "state"), saved, saved_ref):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13, msg=name)
    for name, got, want in zip(("dq", "dk", "dv", "dtemperature"), grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def test_fused_normalization_without_temperature():
    q, k, v, _ = make_inputs(1, 2, 40, 50, 8, 16, seed=22)
    grad_out = torch.randn(1, 2, 40, 16, dtype=torch.float64)
    saved, grads = _fused(q, k, v, None, None, grad_out)
    saved_ref, grads_ref = _unfused(q, k, v, None, None, grad_out)
    torch.testing.assert_close(saved[0], saved_ref[0], rtol=1e-13, atol=1e-13)
    for got, want in zip(grads[:3], grads_ref[:3]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads[3].shape == (0,)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_fused_normalization_ignores_padded_rows(poison):
    # A padded key's row is normalised too (to NaN here), then zeroed by selection: the outputs,
    # state and the gradients of the other inputs equal those of a zero row there.
    q, k, v, t = make_inputs(1, 2, 30, 70, 8, 16, seed=23)
    mask = torch.zeros(1, 70, dtype=torch.bool)
    mask[0, [3, 69]] = True
    grad_out = torch.randn(1, 2, 30, 16, dtype=torch.float64)
    poisoned = k.clone()
    poisoned[0, :, 3] = poison
    clean = k.clone()
    clean[0, :, 3] = 0
    got_saved, got_grads = _fused(q, poisoned, v, t, mask, grad_out)
    want_saved, want_grads = _fused(q, clean, v, t, mask, grad_out)
    for got, want in zip(got_saved, want_saved):
        assert torch.equal(got, want)
    for index in (0, 2, 3):  # dq, dv, dtemperature
        assert torch.equal(got_grads[index], want_grads[index])
    others = torch.arange(70) != 3  # dk of the poisoned row itself is not defined
    assert torch.equal(got_grads[1][:, :, others], want_grads[1][:, :, others])


def test_temperature_needs_normalize():
    q, k, v, t = make_inputs(1, 2, 4, 5, 8, 16, seed=24)
    with pytest.raises(ValueError, match="temperature applies only with normalize=True"):
        ops.efficient_forward(q, k, v, None, True, COEFFICIENTS, False, t)
    with pytest.raises(ValueError, match=r"temperature must have shape \(H,\) = \(2,\)"):
        ops.efficient_forward(q, k, v, None, True, COEFFICIENTS, True, t.repeat(2))
    out, den, state = ops.efficient_forward(q, k, v, None, True, COEFFICIENTS, True, t)
    with pytest.raises(ValueError, match="temperature applies only with normalize=True"):
        ops.efficient_backward(out, q, k, v, out, den, state, None, True, COEFFICIENTS, False, t)
