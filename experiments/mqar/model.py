"""A small causal language model whose attention is softmax, TaylorShift (order 2) or linear
(TaylorShift of order 1, f(x) = 1 + x).

Embedding + learned positions, `depth` pre-norm blocks x + attention(LN(x)), x + MLP(LN(x)) (the
MLP left out when mlp_ratio is 0, as in Zoology's MQAR models), a final LayerNorm and a linear head
over the vocabulary. The three arms share every parameter but
TaylorShift's per-head temperature: the comparison measures the attention function alone.
"""

import torch
import torch.nn.functional as F
from torch import nn

from experiments.lra.models.encoder import largest_temperature

ATTENTIONS = ("softmax", "taylorshift", "linear")
# The Taylor order of each TaylorShift arm: 2 is the paper's, 1 is f(x) = 1 + x.
TAYLOR_ORDERS = {"taylorshift": 2, "linear": 1}


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str, mode: str):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.attention, self.mode = heads, attention, mode
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.order = TAYLOR_ORDERS.get(attention)
        self.temperature = nn.Parameter(torch.ones(heads)) if self.order else None
        # An odd order's weights turn negative below its polynomial's real root; with cosine
        # logits in [-tau, tau] the temperature is kept inside it (a millionth inside, so that
        # the float32 value never rounds past the root).
        self.temperature_limit = (
            largest_temperature(self.order) * (1.0 - 1e-6)
            if self.order and self.order % 2
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            part.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)
            for part in self.qkv(x).chunk(3, dim=-1)
        )
        if self.attention == "softmax":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # Imported here so the softmax arm runs without the extension being importable.
            from taylorshift import taylor_shift_attention

            if self.temperature_limit is not None:
                # Projected gradient descent: put a temperature an optimiser step carried past
                # the positive range back on its bound.
                with torch.no_grad():
                    self.temperature.clamp_(-self.temperature_limit, self.temperature_limit)
            y = taylor_shift_attention(
                q, k, v, self.temperature, causal=True, mode=self.mode, order=self.order
            )
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


class ShortConv(nn.Module):
    """A causal depthwise convolution over the last `kernel` tokens (Based's and H3's short
    convolution): each position mixes in its predecessors, the previous-token step of recall."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, padding=kernel - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding kernel - 1 on both sides, then keeping the first L outputs: output i sees
        # inputs i - kernel + 1 .. i only.
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class Block(nn.Module):
    def __init__(
        self, dim: int, heads: int, attention: str, mode: str, mlp_ratio: int, short_conv: int
    ):
        super().__init__()
        self.short_conv = ShortConv(dim, short_conv) if short_conv else None
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, attention, mode)
        self.mlp_norm, self.mlp = None, None
        if mlp_ratio:
            self.mlp_norm = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(
                nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.short_conv is not None:
            x = x + self.short_conv(x)
        x = x + self.attention(self.attention_norm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class CausalLM(nn.Module):
    """(B, L) token ids -> (B, L, vocab_size) next-token logits; position i sees tokens <= i."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        dim: int,
        attention: str,
        *,
        depth: int = 2,
        heads: int = 2,
        mode: str = "auto",
        mlp_ratio: int = 4,
        short_conv: int = 0,
    ):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, attention, mode, mlp_ratio, short_conv) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        for embedding in (self.embedding, self.positions):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens is longer than max_len {self.max_len}")
        x = self.embedding(tokens) + self.positions(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
