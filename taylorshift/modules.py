"""TaylorShiftAttention, a drop-in nn.MultiheadAttention, and replace_attention / restore_attention."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from taylorshift import reference
from taylorshift.bias import biased_direct_attention, biased_weights, check_mode
from taylorshift.decoding import CausalState
from taylorshift.functional import resolve_coefficients, taylor_shift_attention


def _bool_mask(mask: Tensor | None, name: str) -> Tensor | None:
    """A bool mask with True = ignore, from a bool mask or an additive float one that holds
    only 0 (keep) and -inf (masked), the form nn.Transformer* layers produce from bool masks.

    The conversion is `mask == -inf`, elementwise, so it traces. Checking that no other value
    occurs reads the data: in eager mode it is an exception (one host synchronisation, none for
    bool masks); under torch.compile / torch.export it is torch._assert_async, an operator in the
    graph that fails at run time without a graph break or a synchronisation."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"taylorshift: {name} must be bool or float, got {mask.dtype}")
    masked = torch.isneginf(mask)
    valid = ((mask == 0) | masked).all()
    message = (
        f"taylorshift: a float {name} may hold only 0 (keep) and -inf (masked). Pass an "
        "additive bias (ALiBi, relative positions, -1e9 padding) as a float attn_mask."
    )
    if torch.compiler.is_compiling():
        torch._assert_async(valid, message)
    elif not bool(valid):
        raise ValueError(message)
    return masked


def _attn_mask_or_bias(mask: Tensor | None, mode: str) -> Tensor | None:
    """A bool attn_mask (True = not allowed) for the extension's kernels, or a float one kept as
    an additive bias for biased_direct_attention (direct TaylorShift in PyTorch operations).

    Eager: a float mask of only 0 / -inf (nn.Transformer*'s, open_clip's causal mask) becomes
    bool, one host synchronisation to check. Under torch.compile / torch.export that choice would
    be a data-dependent branch, so every float mask stays a bias: the biased path computes the
    same function for 0 / -inf masks, without the fused kernel."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"taylorshift: attn_mask must be bool or float, got {mask.dtype}")
    if torch.compiler.is_compiling():
        # mode="efficient" takes no attn_mask at all: keep the mask a mask, which the operator
        # rejects with its message.
        return _bool_mask(mask, "attn_mask") if mode == "efficient" else mask
    masked = torch.isneginf(mask)
    if bool(((mask == 0) | masked).all()):
        return masked
    check_mode(mode)
    return mask


def _is_causal_mask(mask: Tensor, target_len: int, source_len: int) -> bool:
    """Whether a bool attn_mask, (L, S) or (B, H, L, S), is exactly the causal mask (True above
    the diagonal, L = S): then causal=True alone is the same function, and the efficient
    algorithm may run. Eager only (it reads the mask: one host synchronisation, O(L S) work, as
    the float-mask check costs); under torch.compile the mask stays, without a graph break."""
    if mask.dtype != torch.bool or target_len != source_len or torch.compiler.is_compiling():
        return False
    causal = torch.ones(target_len, source_len, dtype=torch.bool, device=mask.device).triu(1)
    return bool((mask == causal).all())


class TaylorShiftAttention(nn.MultiheadAttention):
    """Multi-head TaylorShift attention; an nn.MultiheadAttention whose forward is TaylorShift's.

    The constructor, the parameters (in_proj_weight, in_proj_bias, or q_proj_weight,
    k_proj_weight, v_proj_weight when kdim/vdim differ from embed_dim; bias_k, bias_v, out_proj),
    the attributes and forward's signature and return value are those of nn.MultiheadAttention,
    and `isinstance(module, nn.MultiheadAttention)` holds, so code that looks for attention by
    type (PyG's GPSConv, open_clip's convert_weights_to_lp) keeps working. Added: a
    `temperature` parameter of shape (num_heads,) (init ones) and the keyword-only options
    `mode`, `normalize`, `output_scale`, `order`, `coefficients` of
    taylorshift.taylor_shift_attention (the polynomial is fixed at construction and kept, highest
    degree first, in the `coefficients` attribute).

    A state dict of an nn.MultiheadAttention loads directly (strict), `load_state_dict(
    mha.state_dict())`: when it holds no temperature, the temperature keeps its current value.
    `to_multihead_attention()` goes back (the temperature is dropped).

    Differences from nn.MultiheadAttention, each forced by the algorithms or a decision:
    - key_padding_mask is bool (True = ignore) or an additive float mask of only 0 / -inf;
      attn_mask is bool (True = not allowed) or an additive float bias, which runs direct
      TaylorShift with the bias as log multiplicities (taylorshift.bias; not mode="efficient");
    - in training with `need_weights=False`, `dropout` is applied to each head's attention
      output (before out_proj), not to the weights, which neither fused algorithm forms; with
      `need_weights=True` the weights are formed (O(L S) memory, as nn.MultiheadAttention does),
      dropped, returned and applied, as nn.MultiheadAttention does;
    - `is_causal=True` without attn_mask means causal attention (nn.MultiheadAttention raises),
      with either algorithm (mode="auto" picks the efficient one, linear in L, for long
      self-attention); with attn_mask it is combined with it, and an attn_mask that is exactly
      the causal mask (checked, in eager mode) is dropped, so that nn.Transformer*'s causal
      masks with their `is_causal` hint can run the efficient algorithm too;
    - torch.jit.script raises (the Python operator dispatch is not TorchScript); torch.compile
      and torch.export trace it;
    - `_qkv_same_embed_dim` reads False: nn.TransformerEncoderLayer and nn.TransformerEncoder
      (in eval mode) run a fused softmax kernel on this module's weights, without calling
      forward, when it is True. Which projections exist is told by in_proj_weight being None.

    Incremental decoding (causal self-attention, constant memory and time per token):
    `state = module.initial_state(batch)` (a taylorshift.CausalState), then
    `out = module.decode_step(x, state)` for each next chunk of tokens x (a prompt, then one
    token at a time), which updates `state` in place; the outputs are the rows of
    `module(x_all, x_all, x_all, is_causal=True)` for those tokens.
    """

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
        order: int | None = None,
        coefficients=None,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be positive, got {embed_dim} and {num_heads}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if mode not in ("auto", "direct", "efficient"):
            raise ValueError(f"mode must be 'auto', 'direct' or 'efficient', got {mode!r}")
        resolved = resolve_coefficients(order, coefficients)
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        # Read by nn.TransformerEncoderLayer / nn.TransformerEncoder to decide on their fused
        # softmax fast path (see the class docstring); nn.MultiheadAttention reads it only in
        # __init__ and forward, both replaced here.
        self._qkv_same_embed_dim = False
        self.mode = mode
        self.normalize = normalize
        self.output_scale = output_scale
        self.coefficients = resolved
        self.temperature = nn.Parameter(torch.ones(num_heads, device=device, dtype=dtype))

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
        if "temperature" in self._parameters:  # nn.MultiheadAttention.__init__ calls this first
            with torch.no_grad():
                self.temperature.fill_(1.0)

    def _configuration(self) -> dict:
        """nn.MultiheadAttention's constructor arguments that rebuild this module's layout."""
        weight = self.out_proj.weight
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "dropout": self.dropout,
            "bias": self.in_proj_bias is not None,
            "add_bias_kv": self.bias_k is not None,
            "add_zero_attn": self.add_zero_attn,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
            "device": weight.device,
            "dtype": weight.dtype,
        }

    @classmethod
    def from_multihead_attention(
        cls, mha: nn.MultiheadAttention, **options
    ) -> TaylorShiftAttention:
        """A TaylorShiftAttention with the configuration and weights of `mha`."""
        module = cls(**TaylorShiftAttention._configuration(mha), **options)
        module.load_state_dict(mha.state_dict())
        module.train(mha.training)
        return module

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention with this module's configuration and weights; softmax
        attention has no temperature, so it is dropped (with a warning unless all ones)."""
        if not bool((self.temperature == 1).all()):
            warnings.warn(
                "taylorshift: the temperature (values other than 1) is dropped in the "
                "nn.MultiheadAttention, which has none",
                stacklevel=2,
            )
        mha = nn.MultiheadAttention(**self._configuration())
        state = {k: v for k, v in self.state_dict().items() if k != "temperature"}
        mha.load_state_dict(state)
        mha.train(self.training)
        return mha

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *rest):
        # An nn.MultiheadAttention state dict has no temperature: keep the current one.
        key = prefix + "temperature"
        if key not in state_dict:
            state_dict = {**state_dict, key: self.temperature.detach()}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *rest)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it.
        raise RuntimeError(
            "taylorshift: TaylorShiftAttention cannot be compiled by torch.jit.script: its "
            "forward dispatches through Python (mask validation, the mode choice, the "
            "torch.ops.taylorshift operators' Python fallback), which TorchScript does not "
            "support. Use torch.compile or torch.export (both trace it), or script the model "
            "before replace_attention (for open_clip: create_model(..., jit=False))."
        )

    def _check_shapes(
        self, query, key, value, key_padding_mask, attn_mask
    ) -> tuple[bool, int, int, int]:
        """nn.MultiheadAttention's checks and messages; (batched, batch, target_len, source_len)."""
        batched = nn.functional._mha_shape_check(
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        for name, tensor, expected in [
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ]:
            if tensor.shape[-1] != expected:
                raise AssertionError(
                    f"was expecting embedding dimension of {expected}, but got "
                    f"{tensor.shape[-1]} ({name} of shape {tuple(tensor.shape)})"
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(
                f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match value's "
                f"{tuple(value.shape[:-1])}"
            )
        seq_dim = 1 if self.batch_first and batched else 0
        target_len, source_len = query.shape[seq_dim], key.shape[seq_dim]
        batch = query.shape[1 - seq_dim] if batched else 1
        if batched and key.shape[1 - seq_dim] != batch:
            raise AssertionError(
                f"query batch size {batch} does not match key's {key.shape[1 - seq_dim]}"
            )
        if key_padding_mask is not None:
            expected = (batch, source_len) if batched else (source_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise AssertionError(
                    f"expecting key_padding_mask shape of {expected}, but got "
                    f"{tuple(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) != (target_len, source_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(target_len, source_len)}."
                )
            expected = (batch * self.num_heads, target_len, source_len)
            if attn_mask.dim() == 3 and tuple(attn_mask.shape) != expected:
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {expected}."
                )
        return batched, batch, target_len, source_len

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
        with attn_mask when both are given; an attn_mask that is exactly causal is dropped).
        """
        batched, batch, target_len, source_len = self._check_shapes(
            query, key, value, key_padding_mask, attn_mask
        )
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        self_attention = query is key and key is value
        if not self.batch_first or not batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        key_padding_mask = _bool_mask(key_padding_mask, "key_padding_mask")
        attn_mask = _attn_mask_or_bias(attn_mask, self.mode)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, self.num_heads, target_len, source_len)
        if (
            is_causal
            and attn_mask is not None
            and _is_causal_mask(attn_mask, target_len, source_len)
        ):
            attn_mask = None

        q, k, v = self._projections(query, key, value, self_attention)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
            key_padding_mask, attn_mask = _append_unmasked_key(key_padding_mask, attn_mask)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(k.shape[:2] + (1, k.shape[3]))], dim=2)
            v = torch.cat([v, v.new_zeros(v.shape[:2] + (1, v.shape[3]))], dim=2)
            key_padding_mask, attn_mask = _append_unmasked_key(key_padding_mask, attn_mask)

        masks = {"key_padding_mask": key_padding_mask, "causal": is_causal}
        biased = attn_mask is not None and attn_mask.is_floating_point()
        masks["bias" if biased else "attn_mask"] = attn_mask
        options = {"normalize": self.normalize, "coefficients": self.coefficients}
        weights = None
        if need_weights and biased:
            weights, multiplicity = biased_weights(q, k, self.temperature, **options, **masks)
        elif need_weights:
            weights = reference.taylor_softmax_weights(q, k, self.temperature, **options, **masks)
        options["output_scale"] = self.output_scale
        if need_weights and self.training and self.dropout > 0:
            # nn.MultiheadAttention drops attention weights, applies and returns the dropped
            # ones; with the weights formed anyway, do the same (direct TaylorShift by hand).
            weights = nn.functional.dropout(weights, p=self.dropout)
            out = weights @ v
            if self.output_scale:
                counted = multiplicity if biased else reference.allowed_keys(q, k, **masks)
                out = out * reference.output_scale_factor(counted, self.head_dim, out.dtype)
        else:
            if biased:
                out = biased_direct_attention(q, k, v, self.temperature, **options, **masks)
            else:
                out = taylor_shift_attention(
                    q, k, v, self.temperature, mode=self.mode, **options, **masks
                )
            out = nn.functional.dropout(out, p=self.dropout, training=self.training)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        return out, weights

    def initial_state(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CausalState:
        """An empty taylorshift.CausalState for `decode_step` with this module's heads and
        options, for `batch` sequences, on the device and in the dtype of the module's weights
        unless given."""
        if self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError(
                "taylorshift: decoding with add_bias_kv or add_zero_attn is not supported: they "
                "append a key after the whole sequence, which a growing sequence does not have"
            )
        if self.in_proj_weight is None:
            raise ValueError(
                "taylorshift: decoding is causal self-attention, which needs kdim == vdim == "
                f"embed_dim, got kdim={self.kdim}, vdim={self.vdim}, embed_dim={self.embed_dim}"
            )
        weight = self.out_proj.weight
        return CausalState(
            batch,
            self.num_heads,
            self.head_dim,
            self.head_dim,
            dtype=weight.dtype if dtype is None else dtype,
            device=weight.device if device is None else device,
            normalize=self.normalize,
            output_scale=self.output_scale,
            coefficients=self.coefficients,
        )

    def decode_step(
        self, x: Tensor, state: CausalState, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """Causal self-attention of the next T >= 1 tokens x after those `state` has seen:
        x is (T, B, E) ((B, T, E) if batch_first, or unbatched (T, E)), key_padding_mask (B, T)
        ((T,) unbatched), bool True = padding or float 0 / -inf. Returns the attention output
        in x's layout, the rows of `self(x_all, x_all, x_all, is_causal=True,
        key_padding_mask=...)[0]` for these tokens, and updates `state` (from
        `initial_state`) in place. Any `mode` gives the same function; decoding always runs
        the recurrent form. Dropout applies in training, as in forward."""
        if not isinstance(state, CausalState):
            raise TypeError(
                "taylorshift: decode_step needs a taylorshift.CausalState from "
                f"module.initial_state(batch), got {type(state).__name__}"
            )
        if x.dim() not in (2, 3) or x.shape[-1] != self.embed_dim:
            raise ValueError(
                "taylorshift: decode_step takes x of shape "
                f"{'(B, T, E)' if self.batch_first else '(T, B, E)'} or (T, E) with "
                f"E = embed_dim = {self.embed_dim}, got {list(x.shape)}"
            )
        mine = (self.num_heads, self.head_dim, self.head_dim, self.normalize, self.output_scale)
        theirs = (state.heads, state.head_dim, state.value_dim, state.normalize, state.output_scale)
        if mine != theirs or state.scale is not None or state.coefficients != self.coefficients:
            raise ValueError(
                f"taylorshift: the state ({state!r}, normalize={state.normalize}, "
                f"output_scale={state.output_scale}, coefficients={state.coefficients}) was not "
                "made for this module; use module.initial_state(batch)"
            )
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            x = x.transpose(0, 1)
        if x.shape[0] != state.batch:
            raise ValueError(
                f"taylorshift: decode_step got a batch of {x.shape[0]} sequences but the state "
                f"holds {state.batch}"
            )
        key_padding_mask = _bool_mask(key_padding_mask, "key_padding_mask")
        q, k, v = (self._heads(t) for t in self._projections(x, x, x, True))
        out = state.step(q, k, v, self.temperature, key_padding_mask)
        out = nn.functional.dropout(out, p=self.dropout, training=self.training)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        return out if batched else out.squeeze(1)

    def _projections(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool):
        """q, k, v projections of batch-first inputs, (B, L, E) -> (B, L, E); one matmul when
        query, key and value are the same tensor, as in nn.MultiheadAttention."""
        if self_attention and self.in_proj_weight is not None:
            packed = nn.functional.linear(query, self.in_proj_weight, self.in_proj_bias)
            return packed.chunk(3, dim=-1)
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


def _append_unmasked_key(key_padding_mask: Tensor | None, attn_mask: Tensor | None):
    """Masks for one more key (bias_k or the zero key) that every query may attend to."""
    if key_padding_mask is not None:
        key_padding_mask = nn.functional.pad(key_padding_mask, (0, 1), value=False)
    if attn_mask is not None:
        attn_mask = nn.functional.pad(attn_mask, (0, 1), value=False)
    return key_padding_mask, attn_mask


def _swap_children(model: nn.Module, select, convert) -> int:
    """Replace every direct or nested child for which `select(child)` with `convert(child)`."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if select(child):
                setattr(parent, name, convert(child))
                count += 1
    return count


def _is_softmax_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) and not isinstance(
        module, TaylorShiftAttention
    )


def replace_attention(model: nn.Module, **options) -> nn.Module:
    """Swap every nn.MultiheadAttention in `model` for a TaylorShiftAttention with its weights.

    `options` (mode, normalize, output_scale, order, coefficients) go to each
    TaylorShiftAttention. Works inside
    nn.TransformerEncoder/Decoder in train and eval mode: the encoder's fused fast paths, which
    would run softmax attention on the weights without calling the module, are switched off.
    Returns `model`, changed in place (a bare nn.MultiheadAttention is returned replaced).
    `restore_attention` undoes it.
    """
    if _is_softmax_attention(model):
        return TaylorShiftAttention.from_multihead_attention(model, **options)
    _swap_children(
        model,
        _is_softmax_attention,
        lambda mha: TaylorShiftAttention.from_multihead_attention(mha, **options),
    )
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            # Decided at construction from the old attention; it would feed nested tensors.
            module.use_nested_tensor = False
    return model


def restore_attention(model: nn.Module) -> nn.Module:
    """Swap every TaylorShiftAttention in `model` for a plain nn.MultiheadAttention with its
    weights (the way back from replace_attention, e.g. to compare checkpoints both ways).

    Softmax attention has no temperature: it is dropped, with one warning when any differs
    from 1. Returns `model`, changed in place (a bare TaylorShiftAttention is returned
    converted). nn.TransformerEncoder's nested-tensor fast path stays off.
    """
    replaced = [m for m in model.modules() if isinstance(m, TaylorShiftAttention)]
    tempered = sum(not bool((m.temperature == 1).all()) for m in replaced)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="taylorshift: the temperature")
        if isinstance(model, TaylorShiftAttention):
            model = model.to_multihead_attention()
        else:
            _swap_children(
                model,
                lambda m: isinstance(m, TaylorShiftAttention),
                TaylorShiftAttention.to_multihead_attention,
            )
    if tempered:
        warnings.warn(
            f"taylorshift: the temperature of {tempered} of {len(replaced)} "
            "TaylorShiftAttention modules (values other than 1) is dropped: "
            "nn.MultiheadAttention has none",
            stacklevel=2,
        )
    return model
