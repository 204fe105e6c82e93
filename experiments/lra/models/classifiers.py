"""Classification heads on the encoder: one sequence, or two documents through a shared encoder."""

import torch
from torch import nn

from .encoder import Encoder, resolve_model_config


def classifier_head(config: dict, features: int, num_classes: int) -> nn.Module:
    """linear, or LRA's classifier_head: Dense(head_dim) -> ReLU -> Dense(num_classes)."""
    if config["head"] == "linear":
        return nn.Linear(features, num_classes)
    hidden = config["head_dim"]
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class SequenceClassifier(nn.Module):
    def __init__(self, encoder: Encoder, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(tokens))


class PairClassifier(nn.Module):
    """LRA's two-tower matching model: one shared encoder, then classifier_head_dual.

    interaction='concat' feeds [u, v] (LRA's code default); 'nli' feeds [u, v, u*v, u-v].
    """

    def __init__(
        self,
        encoder: Encoder,
        dim: int,
        num_classes: int,
        mlp_dim: int,
        interaction: str = "concat",
    ):
        super().__init__()
        if interaction not in ("concat", "nli"):
            raise ValueError(f"interaction must be 'concat' or 'nli', got {interaction!r}")
        self.encoder, self.interaction = encoder, interaction
        features = 2 * dim if interaction == "concat" else 4 * dim
        self.head = nn.Sequential(
            nn.Linear(features, mlp_dim),
            nn.ReLU(),
            nn.Linear(mlp_dim, mlp_dim // 2),
            nn.ReLU(),
            nn.Linear(mlp_dim // 2, num_classes),
        )

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        # One encoder pass over both documents: same weights, half the kernel launches.
        both = self.encoder(_stack_padded(first, second))
        u, v = both[: len(first)], both[len(first) :]
        features = [u, v] if self.interaction == "concat" else [u, v, u * v, u - v]
        return self.head(torch.cat(features, dim=-1))


def _stack_padded(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    length = max(first.shape[1], second.shape[1])
    pad = torch.nn.functional.pad
    return torch.cat(
        [pad(first, (0, length - first.shape[1])), pad(second, (0, length - second.shape[1]))]
    )


def build_model(
    model_config: dict, vocab_size: int, max_len: int, num_classes: int, pads: bool, pair: bool
):
    """model_config: dim, depth, heads and any key of MODEL_DEFAULTS; for pairs also
    interaction (the dual head's hidden width is head_dim)."""
    config = resolve_model_config(model_config)
    encoder = Encoder(config, vocab_size, max_len, pads)
    if pair:
        return PairClassifier(
            encoder,
            config["dim"],
            num_classes,
            mlp_dim=config["head_dim"],
            interaction=config.get("interaction", "concat"),
        )
    return SequenceClassifier(encoder, classifier_head(config, config["dim"], num_classes))
