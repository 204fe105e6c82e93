"""TaylorShiftAttention, a drop-in nn.MultiheadAttention, and replace_attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from taylorshift import reference
from taylorshift.functional import taylor_shift_attention


def _bool_mask(mask: Tensor | None, name: str) -> Tensor | None:
    """A bool mask with True = ignore. Float masks are accepted only in the additive form that
    nn.Transformer* layers produce from bool masks (0 = keep, -inf = masked)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"taylorshift: {name} must be bool or float, got {mask.dtype}")
    masked = torch.isneginf(mask)
    if not bool(((mask == 0) | masked).all()):
        raise ValueError(
            f"taylorshift: a float {name} may hold only 0 (keep) and -inf (masked). Other additive "
            "biases do not apply: TaylorShift weights are the polynomial a x^2 + b x + c of the "
            "logits, not exp(x). Pass a bool mask with True = masked."
        )
    return masked


class TaylorShiftAttention(nn.Module):
    """Multi-head TaylorShift attention with the interface of nn.MultiheadAttention.

    The constructor, the parameter names (in_proj_weight, in_proj_bias, or q_proj_weight,
    k_proj_weight, v_proj_weight when kdim/vdim differ from embed_dim; bias_k, bias_v, out_proj)
    and forward's signature and return value are those of nn.MultiheadAttention. Added: a
    `temperature` parameter of shape (num_heads,) (init ones) and the keyword-only options
    `mode`, `normalize`, `output_scale` of taylorshift.taylor_shift_attention.

    A state dict of an nn.MultiheadAttention loads directly, `load_state_dict(mha.state_dict())`:
    when it holds no temperature, the temperature keeps its current value.

    Differences, each forced by the algorithms: masks must be bool (True = ignore) or additive
    float masks of only 0 / -inf; `dropout` is applied to the attention output of each head
    (before out_proj) rather than to the weights, which neither fused algorithm forms;
    `need_weights=True` computes the (B, [H,] L, S) Taylor-softmax weights separately, with
    O(L S) memory, as nn.MultiheadAttention does.
    """

    # nn.TransformerEncoderLayer and nn.TransformerEncoder read this flag (in eval mode) to decide
    # whether to run a fused softmax kernel on this module's weights without calling forward.
    # It reads False so that TaylorShift is never bypassed; which projections exist is told by
    # in_proj_weight being None or not.
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        mode: str = "auto",
        normalize: bool = True,
        output_scale: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if mode not in ("auto", "direct", "efficient"):
            raise ValueError(f"mode must be 'auto', 'direct' or 'efficient', got {mode!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.mode = mode
        self.normalize = normalize
        self.output_scale = output_scale
        if self.kdim == embed_dim and self.vdim == embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(
            embed_dim, embed_dim, bias=bias, **factory
        )
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.temperature = nn.Parameter(torch.ones(num_heads, **factory))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation; temperature starts at 1."""
        if self.in_proj_weight is not None:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        with torch.no_grad():
            self.temperature.fill_(1.0)

    @classmethod
    def from_multihead_attention(
        cls, mha: nn.MultiheadAttention, **options
    ) -> TaylorShiftAttention:
        """A TaylorShiftAttention with the configuration and weights of `mha`."""
        reference_weight = mha.out_proj.weight
        module = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=reference_weight.device,
            dtype=reference_weight.dtype,
            **options,
        )
        module.load_state_dict(mha.state_dict())
        module.train(mha.training)
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *rest):
        # An nn.MultiheadAttention state dict has no temperature: keep the current one.
        key = prefix + "temperature"
        if key not in state_dict:
            state_dict = {**state_dict, key: self.temperature.detach()}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *rest)

    def _projections(self, query: Tensor, key: Tensor, value: Tensor):
        """q, k, v projections of batch-first inputs, (B, L, E) -> (B, L, E)."""
        e = self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = (
            (None, None, None) if bias is None else (bias[:e], bias[e : 2 * e], bias[2 * e :])
        )
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        linear = nn.functional.linear
        return linear(query, w_q, b_q), linear(key, w_k, b_k), linear(value, w_v, b_v)

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, E) -> (B, H, L, E / H)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As nn.MultiheadAttention.forward: (attn_output, attn_weights or None).

        query (L, B, E) ((B, L, E) if batch_first, or unbatched (L, E)); key (S, B, kdim);
        value (S, B, vdim); key_padding_mask (B, S), True = ignore; attn_mask (L, S) or
        (B * num_heads, L, S), True = not allowed; is_causal: causal attention (combined
        with attn_mask when both are given).
        """
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, target_len = query.shape[0], query.shape[1]
        key_padding_mask = _bool_mask(key_padding_mask, "key_padding_mask")
        attn_mask = _bool_mask(attn_mask, "attn_mask")
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, self.num_heads, target_len, -1)

        q, k, v = self._projections(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            key_padding_mask, attn_mask = _append_unmasked_key(key_padding_mask, attn_mask)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(k.shape[:2] + (1, k.shape[3]))], dim=2)
            v = torch.cat([v, v.new_zeros(v.shape[:2] + (1, v.shape[3]))], dim=2)
            key_padding_mask, attn_mask = _append_unmasked_key(key_padding_mask, attn_mask)

        options = {
            "key_padding_mask": key_padding_mask,
            "attn_mask": attn_mask,
            "causal": is_causal,
        }
        out = taylor_shift_attention(
            q,
            k,
            v,
            self.temperature,
            mode=self.mode,
            normalize=self.normalize,
            output_scale=self.output_scale,
            **options,
        )
        out = nn.functional.dropout(out, p=self.dropout, training=self.training)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        weights = None
        if need_weights:
            weights = reference.taylor_softmax_weights(
                q, k, self.temperature, normalize=self.normalize, **options
            )
            if average_attn_weights:
                weights = weights.mean(dim=1)
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights


def _append_unmasked_key(key_padding_mask: Tensor | None, attn_mask: Tensor | None):
    """Masks for one more key (bias_k or the zero key) that every query may attend to."""
    if key_padding_mask is not None:
        key_padding_mask = nn.functional.pad(key_padding_mask, (0, 1), value=False)
    if attn_mask is not None:
        attn_mask = nn.functional.pad(attn_mask, (0, 1), value=False)
    return key_padding_mask, attn_mask


def replace_attention(model: nn.Module, **options) -> nn.Module:
    """Swap every nn.MultiheadAttention in `model` for a TaylorShiftAttention with its weights.

    `options` (mode, normalize, output_scale) go to each TaylorShiftAttention. Works inside
    nn.TransformerEncoder/Decoder in train and eval mode: the encoder's fused fast paths, which
    would run softmax attention on the weights without calling the module, are switched off.
    Returns `model`, changed in place (a bare nn.MultiheadAttention is returned replaced).
    """
    if isinstance(model, nn.MultiheadAttention):
        return TaylorShiftAttention.from_multihead_attention(model, **options)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(
                    parent, name, TaylorShiftAttention.from_multihead_attention(child, **options)
                )
        if isinstance(parent, nn.TransformerEncoder):
            # Decided at construction from the old attention; it would feed nested tensors.
            parent.use_nested_tensor = False
    return model
