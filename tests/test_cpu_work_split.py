"""The CPU kernels' work decomposition, against the float64 reference: the direct backward's
per-tile writes of dk, dv (no zeroing pass) across growing causal cuts, and the efficient
kernels' split of a head's tokens over threads. Sizes span several 128-query blocks and 512-key
tiles, too large for the CUDA emulation: the CUDA kernels' tiling has its own tests
(test_cuda.py)."""

import pytest
import torch
from ts_testing import input_gradients, make_inputs, random_key_padding_mask

import taylorshift
from taylorshift import reference


@pytest.mark.parametrize("queries, keys", [(600, 700), (700, 600), (300, 1100)])
def test_direct_causal_gradients_across_growing_cuts(queries, keys):
    # The CPU direct backward writes dk, dv without zeroing them first: a key tile's first
    # product overwrites its rows, a later query block's longer causal cut zeroes the rows it
    # adds, and rows no query reaches are zeroed at the end. Several 128-query blocks per thread
    # whose cuts end inside 512-key tiles go through all three.
    q, k, v, t = make_inputs(1, 1, queries, keys, 8, 4, seed=7)
    mine = input_gradients(
        q, k, v, t, lambda *x: taylorshift.taylor_shift_attention(*x, causal=True, mode="direct")
    )
    exact = input_gradients(q, k, v, t, lambda *x: reference.direct(*x, causal=True))
    for g, g_exact in zip(mine, exact):
        torch.testing.assert_close(g, g_exact, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("threads", [3, 4])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
@pytest.mark.parametrize("value_dim", [5, 16], ids=["blas_path", "register_path"])
def test_efficient_splits_tokens_over_threads(threads, masked, value_dim):
    # With fewer (batch, head) pairs than threads, the CPU efficient kernels split each head's
    # tokens over threads: the state and dS are summed from the ranges' shares, dq, dk, dv and
    # the outputs are computed per range. Cross-attention with ranges of unequal lengths. Both
    # paths of efficient.cpp: the register kernels leave the query side's dS shares unweighted.
    q, k, v, t = make_inputs(1, 1, 700, 1300, 8, value_dim, seed=8)
    mask = random_key_padding_mask(1, 1300) if masked else None
    options = {"key_padding_mask": mask}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mine = input_gradients(
            q,
            k,
            v,
            t,
            lambda *x: taylorshift.taylor_shift_attention(*x, mode="efficient", **options),
        )
        out = taylorshift.taylor_shift_attention(q, k, v, t, mode="efficient", **options)
    finally:
        torch.set_num_threads(before)
    exact = input_gradients(q, k, v, t, lambda *x: reference.direct(*x, **options))
    torch.testing.assert_close(out, reference.direct(q, k, v, t, **options), rtol=1e-9, atol=1e-10)
    for g, g_exact in zip(mine, exact):
        torch.testing.assert_close(g, g_exact, rtol=1e-9, atol=1e-10)
