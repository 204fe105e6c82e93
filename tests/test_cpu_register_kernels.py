"""The CPU efficient kernels' register path (csrc/cpu/pair_kernels.h): orders 1 and 2, a value
width of 1, 2, 4 or 8 whole 64-byte vectors, an AVX-512 CPU. Each width and both orders against
the float64 reference, forward and every gradient, with the shapes the kernels block by: token
counts that are not multiples of the 64-token passes, the 256- or 128-token chunks or the
application's 3 to 12-token blocks, more than 16 key chunks (the state's float64 folds), a key
padding mask, cross-attention and d != e. Other widths, order 3 and other CPUs take the BLAS path,
which test_forward, test_gradients and test_order cover with the same references."""

import pytest
import torch
from ts_testing import (
    assert_matches_reference,
    input_gradients,
    make_inputs,
    random_key_padding_mask,
)

import taylorshift
from taylorshift import reference

# (head_dim, value_dim): value rows of 1, 2, 4 and 8 vectors of 8 doubles, and of 16 floats.
FLOAT64_DIMS = [(8, 8), (16, 16), (24, 32), (40, 64)]
FLOAT32_DIMS = [(16, 16), (32, 32), (64, 64), (24, 128)]


def _options(order, temperature):
    # Order 1's weights 1 + x are positive for |x| < 1: logits within [-0.9, 0.9]. The
    # polynomial as coefficients, which the kernels and the reference both take.
    coefficients = taylorshift.functional.resolve_coefficients(order=order)
    return temperature * (0.6 if order == 1 else 1.0), {"coefficients": coefficients}


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("head_dim, value_dim", FLOAT64_DIMS, ids=str)
def test_register_path_float64(order, head_dim, value_dim):
    keys = 4200 if head_dim <= 32 else 2200  # more than 16 chunks: the state's folds
    q, k, v, t = make_inputs(2, 1, 333, keys, head_dim, value_dim, seed=head_dim)
    t, options = _options(order, t)
    options["key_padding_mask"] = random_key_padding_mask(2, keys)

    def run(*x):
        return taylorshift.taylor_shift_attention(*x, mode="efficient", **options)

    def exact(*x):
        return reference.direct(*x, **options)

    torch.testing.assert_close(run(q, k, v, t), exact(q, k, v, t), rtol=1e-10, atol=1e-12)
    for mine, expected in zip(input_gradients(q, k, v, t, run), input_gradients(q, k, v, t, exact)):
        torch.testing.assert_close(mine, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("head_dim, value_dim", FLOAT32_DIMS, ids=str)
def test_register_path_float32(order, head_dim, value_dim):
    q, k, v, t = make_inputs(1, 2, 190, 301, head_dim, value_dim, dtype=torch.float32, seed=3)
    t, options = _options(order, t)
    out = taylorshift.taylor_shift_attention(q, k, v, t, mode="efficient", **options)
    assert_matches_reference(out, q, k, v, t, mode="efficient", **options)
