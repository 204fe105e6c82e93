"""CausalState: causal TaylorShift token by token, in memory and time per token that do not
depend on the context length (the recurrence of the causal-and-order spec §3).

Causal attention's row i is z_i = sum_{j <= i} f(q_i . k_j) u_j with u_j = [1 | v_j], and
f(q . k) = phi(q) . psi(k) for the symmetric features of order k (F = C(d + k, k) of them), so
z_i = phi(q_i)^T S_i with S_i = sum_{j <= i} psi(k_j) u_j^T, an F x (e + 1) matrix per head that
each new token updates by one outer product. The output is y_i = sqrt(N_i / d) z_i[1:] / z_i[0],
N_i the unpadded keys up to i, so the state is S and the count N: O(F (e + 1)) per head, whatever
the context. A step of T tokens runs the chunked causal form of csrc/causal.cpp on top of the
state (torch.ops.taylorshift.causal_step), so a prefill is one step with a large T.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from taylorshift import _extension, reference
from taylorshift.functional import (
    MAX_EFFICIENT_ORDER,
    _check_coefficients,
    _check_logit_range,
    resolve_coefficients,
)

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def feature_count(head_dim: int, order: int) -> int:
    """F = C(d + k, k): the monomials of degree <= k in d variables (the spec's symmetric
    features), the rows of each head's state."""
    return math.comb(head_dim + order, order)


class CausalState:
    """The running state of causal TaylorShift attention for incremental decoding.

    `step(q, k, v)` takes the next T >= 1 tokens, (B, H, T, d) queries and keys and (B, H, T, e)
    values, and returns their outputs (B, H, T, e): the rows of
    `taylor_shift_attention(q_all, k_all, v_all, causal=True)` over every token stepped so far
    (since construction or `reset()`), without keeping any of them. A prompt is one step with
    T = its length (the chunked linear-time form), generation one step per token.

    Memory: a (B, H, F, e + 1) state in the accumulation dtype (float32; float64 for float64
    inputs) and a (B,) count, F = C(d + k, k) for Taylor order k (561 at d = 32, k = 2): 72 KiB
    per head at d = e = 32 in float32, whatever the context. Work per token: 2 F (e + 1)
    multiply-adds per head (apply the state, add the token to it), whatever the context.

    Args:
        batch, heads, head_dim, value_dim: B, H, d, e of the tokens `step` will take.
        dtype: the dtype of q, k, v (float16, bfloat16, float32 or float64).
        device: where the state lives (and the tokens must be); default the CPU.
        normalize, output_scale, scale, order, coefficients: as in
            `taylorshift.taylor_shift_attention`. The order must have an efficient form on the
            device (orders 1-3 on the CPU, 1-2 on CUDA).

    The object is updated in place: `step` replaces `state` and `valid_keys` by new tensors
    (never writes into the old ones), so autograd differentiates through any number of steps;
    `reset()` (or `detach_()`) cuts the graph.

    Requires the compiled extension (torch.ops.taylorshift.causal_step); without it the
    constructor raises a RuntimeError (the pure-PyTorch reference has no recurrent form).
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        value_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        normalize: bool = True,
        output_scale: bool = True,
        scale: float | None = None,
        order: int | None = None,
        coefficients: Sequence[float] | None = None,
    ) -> None:
        if not _extension.available:
            raise RuntimeError(
                "taylorshift.CausalState needs the compiled extension (taylorshift._C, the "
                "operator torch.ops.taylorshift.causal_step), which could not be imported; the "
                "pure-PyTorch fallback has no recurrent form. Build it with "
                "`pip install --no-build-isolation .`, or run "
                "taylor_shift_attention(..., causal=True) over the whole sequence instead."
            )
        for name, size in (
            ("batch", batch),
            ("heads", heads),
            ("head_dim", head_dim),
            ("value_dim", value_dim),
        ):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(
                    f"taylorshift.CausalState: {name} must be a positive int, got {size!r}"
                )
        if normalize and scale is not None:
            raise ValueError(
                "taylorshift.CausalState: scale applies only with normalize=False (with "
                "normalize=True the logits are cosine similarities times temperature)"
            )
        self.batch, self.heads, self.head_dim, self.value_dim = batch, heads, head_dim, value_dim
        self.normalize, self.output_scale, self.scale = normalize, output_scale, scale
        self.coefficients = resolve_coefficients(order, coefficients)
        self.order = len(self.coefficients) - 1
        device = torch.device("cpu" if device is None else device)
        self._check_configuration(dtype, device)
        self.dtype, self.device = dtype, device
        self.reset()

    def _check_configuration(self, dtype: torch.dtype, device: torch.device) -> None:
        """The checks that depend on the dtype and device (at construction and in `to`)."""
        if dtype not in INPUT_DTYPES:
            raise TypeError(
                "taylorshift.CausalState: dtype must be float16, bfloat16, float32 or float64, "
                f"got {dtype}"
            )
        limit = MAX_EFFICIENT_ORDER.get(device.type, 2)
        if self.order > limit:
            raise NotImplementedError(
                f"taylorshift.CausalState: decoding uses the efficient (feature) form, which "
                f"supports orders 1 to {limit} on {device.type}, got order {self.order}; for a "
                'higher order run taylor_shift_attention(..., causal=True, mode="direct") over '
                "the whole sequence"
            )
        _check_coefficients(self.coefficients, dtype)
        if self.order % 2 == 1:
            _check_logit_range(self.coefficients, dtype, self.normalize, None)

    @property
    def feature_count(self) -> int:
        """F, the rows of each head's state."""
        return feature_count(self.head_dim, self.order)

    @property
    def tokens(self) -> int:
        """Token positions stepped since construction or `reset()`, padded ones included."""
        return self._tokens

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the state and the counts (independent of `tokens`)."""
        return sum(t.numel() * t.element_size() for t in (self.state, self.valid_keys))

    def reset(self) -> CausalState:
        """Back to an empty context (zero state, no keys seen); returns self."""
        accumulate = reference.accumulate_dtype(self.dtype)
        shape = (self.batch, self.heads, self.feature_count, self.value_dim + 1)
        self.state = torch.zeros(shape, dtype=accumulate, device=self.device)
        self.valid_keys = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        self._tokens = 0
        return self

    def detach_(self) -> CausalState:
        """Cuts the autograd graph behind the state (truncated backpropagation through
        segments); the values stay. Returns self."""
        self.state = self.state.detach()
        return self

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CausalState:
        """Moves the state to `device` and/or sets the tokens' dtype (the state converts to
        its accumulation dtype: float32 <-> float64 rounds it once). Returns self."""
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        self._check_configuration(dtype, device)
        self.dtype, self.device = dtype, device
        self.state = self.state.to(device=device, dtype=reference.accumulate_dtype(dtype))
        self.valid_keys = self.valid_keys.to(device)
        return self

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        temperature: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attention outputs (B, H, T, e) of the next T tokens, q and k (B, H, T, d), v
        (B, H, T, e), each attending every unpadded token stepped so far and itself;
        temperature (H,) as in taylor_shift_attention; key_padding_mask (B, T) bool,
        True = padding (that token is never a key; its own query still gets an output, from
        the keys before it). Updates the state."""
        self._check_tokens(q, k, v, key_padding_mask)
        if self.order % 2 == 1:
            _check_logit_range(self.coefficients, self.dtype, self.normalize, temperature)
        out, self.state, self.valid_keys = torch.ops.taylorshift.causal_step(
            q, k, v, self.state, self.valid_keys, temperature, key_padding_mask,
            self.normalize, self.output_scale, self.scale, list(self.coefficients),
        )  # fmt: skip
        self._tokens += q.shape[2]
        return out

    def _check_tokens(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask) -> None:
        """Names the mismatch between the tokens and this state's configuration (the operator
        would report a wrong state shape instead)."""
        expected = {
            "q": (self.batch, self.heads, self.head_dim),
            "k": (self.batch, self.heads, self.head_dim),
            "v": (self.batch, self.heads, self.value_dim),
        }
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"taylorshift.CausalState.step: {name} must be a Tensor, got {type(t).__name__}"
                )
            b, h, last = expected[name]
            dim = "d" if name != "v" else "e"
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, h, last):
                raise ValueError(
                    f"taylorshift.CausalState.step: {name} must have shape (B, H, T, {dim}) = "
                    f"({b}, {h}, T, {last}) for this state, got {list(t.shape)}"
                )
            if t.dtype != self.dtype:
                raise TypeError(
                    f"taylorshift.CausalState.step: {name} is {t.dtype} but the state was made "
                    f"for {self.dtype} (CausalState(..., dtype=) or .to(dtype=))"
                )
            if t.device != self.device:
                raise ValueError(
                    f"taylorshift.CausalState.step: {name} is on {t.device} but the state is on "
                    f"{self.device} (CausalState(..., device=) or .to(device))"
                )
        tokens = q.shape[2]
        if tokens == 0 or k.shape[2] != tokens or v.shape[2] != tokens:
            raise ValueError(
                "taylorshift.CausalState.step: q, k, v must hold the same T >= 1 new tokens, got "
                f"T = {q.shape[2]}, {k.shape[2]}, {v.shape[2]}"
            )
        if key_padding_mask is None:
            return
        mask = key_padding_mask
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                "taylorshift.CausalState.step: key_padding_mask must be a bool tensor "
                "(True = padding), got "
                + (str(mask.dtype) if isinstance(mask, Tensor) else type(mask).__name__)
            )
        if tuple(mask.shape) != (self.batch, tokens):
            raise ValueError(
                "taylorshift.CausalState.step: key_padding_mask must have shape (B, T) = "
                f"({self.batch}, {tokens}), got {list(mask.shape)}"
            )
        if mask.device != self.device:
            raise ValueError(
                f"taylorshift.CausalState.step: key_padding_mask is on {mask.device} but the "
                f"state is on {self.device}"
            )

    def __repr__(self) -> str:
        return (
            f"CausalState(batch={self.batch}, heads={self.heads}, head_dim={self.head_dim}, "
            f"value_dim={self.value_dim}, dtype={self.dtype}, device={self.device}, "
            f"order={self.order}, tokens={self.tokens}, memory_bytes={self.memory_bytes})"
        )
