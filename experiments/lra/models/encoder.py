"""A pre-norm Transformer encoder over token ids: sinusoidal positions, CLS or mean pooling."""

import math

import torch
from torch import nn

from .attention import SelfAttention


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed (length, dim) encoding of 'Attention is all you need'."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class EncoderBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        attention: str,
        mode: str,
        qkv_dim: int | None = None,
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads, attention, mode, qkv_dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), padding_mask))
        return x + self.mlp(self.mlp_norm(x))


class Encoder(nn.Module):
    """Maps (B, N) token ids to (B, dim) pooled features.

    pads=True treats id 0 as padding (masked out of attention and mean pooling); pixel tasks set
    pads=False because 0 is a real pixel value there.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float = 0.0,
        attention: str = "taylorshift",
        mode: str = "auto",
        pooling: str = "cls",
        pads: bool = True,
        qkv_dim: int | None = None,
    ):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.pooling, self.pads = pooling, pads
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0 if pads else None)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pooling == "cls" else None
        self.register_buffer("positions", sinusoidal_positions(max_len + 1, dim), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, heads, mlp_ratio, dropout, attention, mode, qkv_dim)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        padding_mask = tokens.eq(0) if self.pads else None
        x = self.embedding(tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
            if padding_mask is not None:
                padding_mask = torch.cat([padding_mask.new_zeros(len(x), 1), padding_mask], dim=1)
        x = self.dropout(x + self.positions[: x.shape[1]].to(x.dtype))
        for block in self.blocks:
            x = block(x, padding_mask)
        x = self.norm(x)
        if self.pooling == "cls":
            return x[:, 0]
        if padding_mask is None:
            return x.mean(dim=1)
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
