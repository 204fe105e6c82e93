"""A pre-norm Transformer encoder over token ids whose attention is the library's own module.

The TaylorShift arm is taylorshift.TaylorShiftAttention, the softmax arm nn.MultiheadAttention:
the two share constructor, parameters and call, so a comparison measures the attention function
alone. Every other choice that differs between the setups a reader compares against (LRA's
Flax Transformer, the TaylorShift paper's timm ViT, this project's own default) is a key of the
model config; MODEL_DEFAULTS holds the project's values and documents each key.
"""

import math

import numpy as np
import torch
from torch import nn

ATTENTION_KINDS = ("taylorshift", "softmax")
TAYLORSHIFT_MODES = ("auto", "direct", "efficient")
MASKING = ("padding", "zero_tokens", "none")
POOLING = ("cls", "mean", "mean_all")
POSITIONS = ("sinusoidal", "learned")
LINEAR_INITS = ("torch", "xavier_uniform", "trunc_normal")
HEADS = ("linear", "mlp")

MODEL_DEFAULTS = {
    "attention": "taylorshift",
    "mode": "auto",
    # TaylorShift's Taylor order k, f(x) = sum_{n<=k} x^n / n! (the paper's is 2). An odd order's
    # temperature is kept where its weights stay positive (see largest_temperature).
    "order": 2,
    # Width of q, k and v in all heads together (LRA's qkv_dim); None means dim.
    "qkv_dim": None,
    # Hidden width of the block MLP; None means dim * mlp_ratio.
    "mlp_dim": None,
    "mlp_ratio": 4,
    "dropout": 0.0,
    # softmax: dropout on the attention weights (as LRA); TaylorShift cannot form the weights,
    # so TaylorShiftAttention drops out each head's output instead (its documented rule).
    "attention_dropout": 0.0,
    # Biases of the q/k/v and output projections (LRA: none; timm ViT: yes).
    "qkv_bias": True,
    # "tanh" is Flax's nn.gelu default, which LRA uses.
    "gelu_approximate": "none",
    # padding: id 0 is masked where the task pads; zero_tokens: id 0 is masked in every task,
    # pixels included, as LRA's `inputs > 0`; none: nothing is masked (the paper's code).
    "masking": "padding",
    # cls; mean over unmasked tokens; mean_all over every position (LRA's MEAN pooling).
    "pooling": "cls",
    "positions": "sinusoidal",
    "embedding_init_std": 0.02,
    # The paper feeds one-hot vectors to nn.Linear(vocab, dim): a lookup plus a bias, with
    # nn.Linear's initialisation. one_hot_linear builds exactly that without the one-hot tensor.
    "embedding": "lookup",
    "cls_init_std": 0.02,
    "linear_init": "torch",
    # Classifier: linear, or mlp = Dense(head_dim) -> ReLU -> Dense(classes) (LRA's head).
    "head": "linear",
    "head_dim": None,
    # timm ViT block options used by the paper: stochastic depth and per-channel layer scale.
    "drop_path": 0.0,
    "layer_scale": None,
}


def resolve_model_config(model_config: dict) -> dict:
    """The model config with every default filled in; rejects unknown keys and values."""
    known = set(MODEL_DEFAULTS) | {"dim", "depth", "heads", "mlp_dim", "interaction"}
    unknown = set(model_config) - known - {"_about"}
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}")
    config = {**MODEL_DEFAULTS, **model_config}
    for key, allowed in [
        ("attention", ATTENTION_KINDS),
        ("mode", TAYLORSHIFT_MODES),
        ("masking", MASKING),
        ("pooling", POOLING),
        ("positions", POSITIONS),
        ("embedding", ("lookup", "one_hot_linear")),
        ("linear_init", LINEAR_INITS),
        ("head", HEADS),
        ("gelu_approximate", ("none", "tanh")),
    ]:
        if config[key] not in allowed:
            raise ValueError(f"model {key} must be one of {allowed}, got {config[key]!r}")
    order = config["order"]
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 8:
        raise ValueError(
            f"model order must be an int from 1 to 8 (the kernels' limit), got {order!r}"
        )
    config["qkv_dim"] = config["qkv_dim"] or config["dim"]
    config["mlp_dim"] = config["mlp_dim"] or int(config["dim"] * config["mlp_ratio"])
    config["head_dim"] = config["head_dim"] or config["mlp_dim"]
    return config


def largest_temperature(order: int) -> float:
    """The largest |temperature| at which the odd Taylor order's weights stay positive.

    With normalize=True the logits lie in [-|tau|, |tau|] and f = sum_{n<=k} x^n / n! of odd order
    k has one real root r < 0 (order 1: -1; order 3: about -1.596), so |tau| <= |r| is allowed.
    """
    coefficients = [1.0 / math.factorial(n) for n in range(order, -1, -1)]
    real_roots = [root.real for root in np.roots(coefficients) if abs(root.imag) < 1e-9]
    return abs(min(real_roots))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed (length, dim) encoding of 'Attention is all you need'."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class SelfAttention(nn.Module):
    """Self-attention through the library's module, with LRA's qkv_dim where it differs from dim.

    TaylorShiftAttention and nn.MultiheadAttention project the query from embed_dim features and
    return embed_dim features. With qkv_dim < dim the module runs at embed_dim = qkv_dim with
    kdim = vdim = dim, the query enters through a bias-free dim -> qkv_dim map and the output
    leaves through a qkv_dim -> dim map. Products of linear maps: the function class is exactly
    LRA's (any q, k, v of width qkv_dim, any output map), with redundant parameters.
    """

    def __init__(self, config: dict):
        super().__init__()
        dim, qkv_dim, heads = config["dim"], config["qkv_dim"], config["heads"]
        if qkv_dim % heads:
            raise ValueError(f"qkv width {qkv_dim} is not divisible by heads {heads}")
        options = {
            "dropout": config["attention_dropout"],
            "bias": config["qkv_bias"],
            "batch_first": True,
        }
        if qkv_dim != dim:
            options.update(kdim=dim, vdim=dim)
        self.temperature_limit = None
        if config["attention"] == "taylorshift":
            # Imported here so the softmax baseline runs without the extension being importable.
            from taylorshift import TaylorShiftAttention

            order = config["order"]
            self.attention = TaylorShiftAttention(
                qkv_dim, heads, mode=config["mode"], order=order, **options
            )
            if order % 2:
                # A millionth inside, so that the float32 temperature never rounds past the root.
                self.temperature_limit = largest_temperature(order) * (1.0 - 1e-6)
        else:
            self.attention = nn.MultiheadAttention(qkv_dim, heads, **options)
        self.query_in = nn.Linear(dim, qkv_dim, bias=False) if qkv_dim != dim else nn.Identity()
        self.out = (
            nn.Linear(qkv_dim, dim, bias=config["qkv_bias"]) if qkv_dim != dim else nn.Identity()
        )

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        if self.temperature_limit is not None:
            # Projected gradient descent: an optimiser step may carry an odd order's temperature
            # past the range where its weights are positive; it is put back on the bound.
            with torch.no_grad():
                self.attention.temperature.clamp_(-self.temperature_limit, self.temperature_limit)
        y, _ = self.attention(
            self.query_in(x), x, x, key_padding_mask=padding_mask, need_weights=False
        )
        return self.out(y)


class DropPath(nn.Module):
    """Stochastic depth (timm's drop_path): drops a residual branch per sample while training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1.0 - self.rate)
        return x * keep / (1.0 - self.rate)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float | None):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init)) if init is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.gamma is None else x * self.gamma


class EncoderBlock(nn.Module):
    def __init__(self, config: dict, drop_path: float):
        super().__init__()
        dim, dropout = config["dim"], config["dropout"]
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = SelfAttention(config)
        self.attention_scale = LayerScale(dim, config["layer_scale"])
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, config["mlp_dim"]),
            nn.GELU(approximate=config["gelu_approximate"]),
            nn.Dropout(dropout),
            nn.Linear(config["mlp_dim"], dim),
            nn.Dropout(dropout),
        )
        self.mlp_scale = LayerScale(dim, config["layer_scale"])
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        y = self.dropout(self.attention(self.attention_norm(x), padding_mask))
        x = x + self.drop_path(self.attention_scale(y))
        return x + self.drop_path(self.mlp_scale(self.mlp(self.mlp_norm(x))))


class Encoder(nn.Module):
    """Maps (B, N) token ids to (B, dim) pooled features.

    pads: whether the task pads with id 0 (text tasks); what is masked is the config's masking.
    """

    def __init__(self, config: dict, vocab_size: int, max_len: int, pads: bool):
        super().__init__()
        dim = config["dim"]
        self.pooling, self.masking, self.pads = config["pooling"], config["masking"], pads
        self.embedding = nn.Embedding(vocab_size, dim)
        self.embedding_bias = None
        if config["embedding"] == "one_hot_linear":
            # nn.Linear(vocab_size, dim) on one-hot rows: weight column = embedding row.
            bound = 1.0 / math.sqrt(vocab_size)
            nn.init.uniform_(self.embedding.weight, -bound, bound)
            self.embedding_bias = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        else:
            nn.init.normal_(self.embedding.weight, std=config["embedding_init_std"])
        self.cls_token = None
        if config["pooling"] == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            if config["cls_init_std"]:
                nn.init.normal_(self.cls_token, std=config["cls_init_std"])
        # The CLS token takes position 0 in every setup (LRA and timm add positions after it).
        if config["positions"] == "learned":
            self.positions = nn.Parameter(torch.empty(max_len + 1, dim).normal_(std=0.02))
        else:
            self.register_buffer(
                "positions", sinusoidal_positions(max_len + 1, dim), persistent=False
            )
        self.dropout = nn.Dropout(config["dropout"])
        depth = config["depth"]
        self.blocks = nn.ModuleList(
            EncoderBlock(config, config["drop_path"] * index / max(1, depth - 1))
            for index in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        _init_linears(self.blocks, config["linear_init"])

    def padding_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, N) bool, True = masked, or None."""
        if self.masking == "zero_tokens" or (self.masking == "padding" and self.pads):
            return tokens.eq(0)
        return None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        padding_mask = self.padding_mask(tokens)
        x = self.embedding(tokens)
        if self.embedding_bias is not None:
            x = x + self.embedding_bias
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
            if padding_mask is not None:
                # LRA gives the CLS token the first token's mask; with masking="padding" the
                # first token of a non-empty sequence is real, so both rules agree there.
                cls_mask = padding_mask[:, :1] if self.masking == "zero_tokens" else None
                cls_mask = padding_mask.new_zeros(len(x), 1) if cls_mask is None else cls_mask
                padding_mask = torch.cat([cls_mask, padding_mask], dim=1)
        if padding_mask is not None:
            # A row with every key masked (an all-black image under LRA's pixel masking) would
            # have no keys at all; LRA's -1e10 bias then gives uniform weights, i.e. no mask.
            padding_mask = padding_mask & ~padding_mask.all(dim=1, keepdim=True)
        x = self.dropout(x + self.positions[: x.shape[1]].to(x.dtype))
        for block in self.blocks:
            x = block(x, padding_mask)
        x = self.norm(x)
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "mean_all" or padding_mask is None:
            return x.mean(dim=1)
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def _init_linears(module: nn.Module, rule: str) -> None:
    """torch: nn.Linear's default; xavier_uniform: LRA's Dense kernels (biases ~0);
    trunc_normal: timm ViT's std 0.02 (biases 0). The attention modules keep their own
    nn.MultiheadAttention initialisation (xavier uniform), which both arms share."""
    if rule == "torch":
        return
    for layer in module.modules():
        if type(layer) is nn.Linear:
            if rule == "xavier_uniform":
                nn.init.xavier_uniform_(layer.weight)
            else:
                nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
