"""Shared fixtures and helpers of the taylorshift test suite.

The oracle everywhere is `taylorshift.reference.direct` evaluated in float64 on the CPU.

Test modules import the helpers below as `from ts_testing import ...`: this conftest registers
itself under that name, because a plain `from conftest import ...` can pick up another
directory's conftest.py (tests/experiments has one).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import taylorshift
from taylorshift import reference

sys.modules.setdefault("ts_testing", sys.modules[__name__])

# Every test that computes runs on each available device; results are compared on the CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Under the emulation plugin (-p emulate, csrc/cuda/emulation) the CUDA kernels' code serves CPU
# tensors, one OS thread per CUDA thread: correct but slow, so the tests there sample their grids
# and shapes (EMULATION_SAMPLED) unless TS_EMULATION_EXHAUSTIVE=1.
EMULATED = not torch.cuda.is_available() and "emulate" in sys.modules
EMULATION_SAMPLED = EMULATED and os.environ.get("TS_EMULATION_EXHAUSTIVE") != "1"
# The emulation built as nvcc's sm_90a pass builds the kernels (csrc/cuda/emulation/emulate.py).
EMULATED_WGMMA = EMULATED and os.environ.get("TS_EMULATION_WGMMA") == "1"
MODES = ("direct", "efficient")
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)

# float64 agreement with the float64 reference. Both sides evaluate the same function in
# float64 (unit roundoff 1.1e-16); with O(100) terms per sum the error is ~1e-14, so 1e-10 has
# ample room and still fails for any real mistake (which shows up at 1e-3 or more).
F64_TOL = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Parametrizes a test over every available device ("cpu", and "cuda" when present)."""
    return request.param


@pytest.fixture
def devices() -> list[str]:
    """All available devices, for tests that loop over them themselves (e.g. to compile once)."""
    return list(DEVICES)


def make_inputs(
    batch: int,
    heads: int,
    queries: int,
    keys: int,
    head_dim: int,
    value_dim: int | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
    requires_grad: bool = False,
):
    """q (B, H, M, d), k (B, H, N, d), v (B, H, N, e) standard normal and a temperature (H,)
    in [0.5, 1.5], drawn in float64 on the CPU (reproducible everywhere), then converted."""
    generator = torch.Generator().manual_seed(seed)
    value_dim = head_dim if value_dim is None else value_dim

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    tensors = [
        draw(batch, heads, queries, head_dim),
        draw(batch, heads, keys, head_dim),
        draw(batch, heads, keys, value_dim),
        0.5 + torch.rand(heads, generator=generator, dtype=torch.float64),
    ]
    return [t.to(dtype=dtype, device=device).requires_grad_(requires_grad) for t in tensors]


def random_key_padding_mask(batch: int, keys: int, *, seed: int = 1, device="cpu", p=0.3):
    """(B, N) bool, True = padding, with key 0 of every batch left valid."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, keys, generator=generator) < p
    mask[:, 0] = False
    return mask.to(device)


def random_attn_mask(*shape, seed: int = 2, device="cpu", p=0.3):
    """Bool attn_mask, True = not allowed to attend."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=generator) < p).to(device)


def _cpu(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def reference64(q, k, v, temperature=None, **options) -> torch.Tensor:
    """The oracle: reference.direct in float64 on the CPU, from the (already rounded) inputs."""

    def up(x):
        return None if x is None else _cpu(x).double()

    options = {name: _cpu(value) for name, value in options.items()}
    return reference.direct(up(q), up(k), up(v), up(temperature), **options)


def max_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    return (_cpu(x).double() - _cpu(exact).double()).abs().max().item()


def error_bound(
    reference_error: float,
    exact: torch.Tensor,
    dtype: torch.dtype,
    summed_terms: int = 1,
    ulps: float | None = None,
) -> float:
    """FlashAttention-style bound for a result in `dtype`: 2x the error PyTorch makes computing
    the reference in that dtype, plus a floor in units of eps * max |exact| ("ulps" of the
    result's scale).

    float16 / bfloat16: half an ulp, the error of merely rounding a correct result to the dtype
    (the reference's own error is many ulps there; measured over 20 seeds for every shape of
    test_forward, our kernels stay below 2x it without any floor).
    float32: eight ulps, because there the reference's max error is a noisy yardstick: it can be
    exact by accident (N = 1, where y = sigma v), over a handful of outputs (M = 1) it
    fluctuates by ~3x between seeds, and it depends on the machine's BLAS. On an AMD EPYC with
    MKL's AVX-512 path, PyTorch's float32 error for M = 1, N = 300 keys is 1.0 ulp of the
    output's scale where our direct kernel's, a sum over the 300 keys, is 6.5; the same test
    passed with a floor of two ulps on the machines before it.
    `summed_terms`: a result that is a sum of that many rounded terms (the temperature gradient
    sums every query row of its head) carries about sqrt(summed_terms) times the rounding error of
    one term, however the sum is ordered; the floor grows accordingly.
    `ulps` overrides the floor (the CUDA kernels' 16-bit operands are held to 2 ulps).
    """
    if ulps is None:
        ulps = 8.0 if dtype == torch.float32 else 0.5
    ulps *= summed_terms**0.5
    return 2 * reference_error + ulps * torch.finfo(dtype).eps * _cpu(exact).abs().max().item()


def assert_matches_reference(out, q, k, v, temperature=None, *, mode=None, **options) -> None:
    """float64: agreement with the float64 oracle to F64_TOL. Lower precision: the error against
    the float64 oracle is within `error_bound` of the error PyTorch makes computing the same
    algorithm (reference.efficient for mode="efficient", else reference.direct) in the same dtype
    on the same device. The algorithms round differently: the efficient one sums the polynomial
    term by term through features whose individual terms exceed f(x), so its float32 error is
    inherently a few times the direct one's."""
    exact = reference64(q, k, v, temperature, **options)
    assert out.shape == exact.shape
    assert out.dtype == q.dtype
    assert out.device == q.device
    if q.dtype == torch.float64:
        torch.testing.assert_close(_cpu(out), exact, **F64_TOL)
        return
    same_algorithm = reference.efficient if mode == "efficient" else reference.direct
    ref_low = same_algorithm(q.detach(), k.detach(), v.detach(), temperature, **options)
    reference_error = max_error(ref_low, exact)
    bound = error_bound(reference_error, exact, q.dtype)
    error = max_error(out, exact)
    assert error <= bound, (
        f"{q.dtype}: max |ours - ref64| = {error:.3e} exceeds the bound {bound:.3e} "
        f"(2 x max |torch reference in {q.dtype} - ref64| = {2 * reference_error:.3e}, plus "
        f"the ulp floor); ours / bound = {error / max(bound, 1e-300):.1f}"
    )


def input_gradients(q, k, v, t, fn, seed=0):
    """The gradients of fn(q, k, v, t) in each input for a seeded random grad_out, on detached
    copies of the inputs."""
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, t)]
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad_out.to(out))
    return [x.grad for x in inputs]


def attention(q, k, v, temperature=None, **options):
    return taylorshift.taylor_shift_attention(q, k, v, temperature, **options)


def causal_direct(q, k, v, temperature=None, **options):
    """Causal attention by the direct algorithm: the exact reference of the causal efficient
    form and of decoding."""
    return attention(q, k, v, temperature, causal=True, mode="direct", **options)


def loss_and_gradients(fn, inputs, mask):
    """fn(*inputs, mask) (a scalar loss) and the gradients of `inputs`, for comparing a compiled
    function with its eager self."""
    for x in inputs:
        x.grad = None
    loss = fn(*inputs, mask)
    loss.backward()
    return [loss.detach()] + [x.grad.clone() for x in inputs]
