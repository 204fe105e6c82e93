"""Multi-head self-attention with the attention function as the only moving part.

Both kinds share projections and layout, so a comparison measures the attention function alone:
TaylorShift through taylorshift.taylor_shift_attention, softmax through
F.scaled_dot_product_attention.
"""

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("taylorshift", "softmax")
TAYLORSHIFT_MODES = ("auto", "direct", "efficient")


class SelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        attention: str = "taylorshift",
        mode: str = "auto",
        qkv_dim: int | None = None,
    ):
        """qkv_dim: total width of queries, keys and values (LRA's qkv_dim); defaults to dim."""
        super().__init__()
        qkv_dim = qkv_dim or dim
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if mode not in TAYLORSHIFT_MODES:
            raise ValueError(f"mode must be one of {TAYLORSHIFT_MODES}, got {mode!r}")
        if qkv_dim % heads:
            raise ValueError(f"qkv width {qkv_dim} is not divisible by heads {heads}")
        self.heads, self.attention, self.mode, self.qkv_dim = heads, attention, mode, qkv_dim
        self.qkv = nn.Linear(dim, 3 * qkv_dim)
        self.proj = nn.Linear(qkv_dim, dim)
        if attention == "taylorshift":
            # TaylorShift's learnable per-head temperature on the cosine logits, initialised to 1.
            self.temperature = nn.Parameter(torch.ones(heads))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, dim); padding_mask: (B, N) bool, True where the token is padding."""
        batch, length, _ = x.shape
        head_dim = self.qkv_dim // self.heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        if self.attention == "taylorshift":
            # Imported here so the softmax baseline runs without the extension being importable.
            from taylorshift import taylor_shift_attention

            y = taylor_shift_attention(
                q, k, v, self.temperature, key_padding_mask=padding_mask, mode=self.mode
            )
        else:
            keep = None if padding_mask is None else ~padding_mask[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(y.transpose(1, 2).reshape(batch, length, self.qkv_dim))
