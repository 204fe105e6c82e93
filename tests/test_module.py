"""TaylorShiftAttention against the nn.MultiheadAttention API, and against a hand computation
from the weights (projections written out here, attention by reference.direct in float64)."""

import copy
import inspect

import pytest
import torch
from torch import nn
from ts_testing import F64_TOL, random_attn_mask, random_key_padding_mask

from taylorshift import TaylorShiftAttention, reference

E, H, L, S, B = 12, 3, 7, 9, 2
F64 = {"dtype": torch.float64}

CONFIGS = {
    "default": {},
    "no_bias": {"bias": False},
    "kdim_vdim": {"kdim": 5, "vdim": 7},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "everything": {"kdim": 5, "vdim": 7, "add_bias_kv": True, "add_zero_attn": True},
}


def _randomize(module):
    """Non-trivial values everywhere (biases start at zero), reproducibly."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def _mha(device="cpu", **config):
    return _randomize(nn.MultiheadAttention(E, H, batch_first=True, device=device, **F64, **config))


def _inputs(config, device="cpu", batch=B, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, **F64).to(device)

    return (
        draw(batch, L, E),
        draw(batch, S, config.get("kdim", E)),
        draw(batch, S, config.get("vdim", E)),
    )


def hand_forward(sd, query, key, value, *, heads=H, kpm=None, attn_mask=None, temperature=None):
    """nn.MultiheadAttention's computation from a state dict `sd`, batch-first, bool masks
    (True = masked), with softmax replaced by TaylorShift (reference.direct)."""
    batch, target, embed = query.shape
    if "in_proj_weight" in sd:
        w_q, w_k, w_v = sd["in_proj_weight"].chunk(3)
    else:
        w_q, w_k, w_v = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
    bias = sd.get("in_proj_bias")
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (0, 0, 0)
    q, k, v = query @ w_q.T + b_q, key @ w_k.T + b_k, value @ w_v.T + b_v
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.view(batch, heads, target, -1)

    def one_more_key(kpm, attn_mask):
        if kpm is not None:
            kpm = torch.cat([kpm, kpm.new_zeros(batch, 1)], 1)
        if attn_mask is not None:
            attn_mask = torch.cat([attn_mask, attn_mask.new_zeros(attn_mask.shape[:-1] + (1,))], -1)
        return kpm, attn_mask

    if "bias_k" in sd:
        k = torch.cat([k, sd["bias_k"].expand(batch, 1, embed)], 1)
        v = torch.cat([v, sd["bias_v"].expand(batch, 1, embed)], 1)
        kpm, attn_mask = one_more_key(kpm, attn_mask)
    if sd.get("__zero_attn__", False):
        k = torch.cat([k, k.new_zeros(batch, 1, embed)], 1)
        v = torch.cat([v, v.new_zeros(batch, 1, embed)], 1)
        kpm, attn_mask = one_more_key(kpm, attn_mask)
    q, k, v = (x.view(batch, -1, heads, embed // heads).transpose(1, 2) for x in (q, k, v))
    y = reference.direct(q, k, v, temperature, key_padding_mask=kpm, attn_mask=attn_mask)
    y = y.transpose(1, 2).reshape(batch, target, embed) @ sd["out_proj.weight"].T
    if sd.get("out_proj.bias") is not None:
        y = y + sd["out_proj.bias"]
    weights = reference.taylor_softmax_weights(
        q, k, temperature, key_padding_mask=kpm, attn_mask=attn_mask
    )
    return y, weights


def _hand(module, *args, **kwargs):
    sd = dict(module.state_dict())
    sd["__zero_attn__"] = module.add_zero_attn
    return hand_forward(sd, *args, temperature=module.temperature.detach(), **kwargs)


# ---- API --------------------------------------------------------------------------------------


def test_constructor_signature_extends_multihead_attention():
    ours = list(inspect.signature(TaylorShiftAttention.__init__).parameters.values())
    theirs = list(inspect.signature(nn.MultiheadAttention.__init__).parameters.values())
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    assert [p.default for p in ours[: len(theirs)]] == [p.default for p in theirs]
    extra = ours[len(theirs) :]
    assert {p.name for p in extra} == {"mode", "normalize", "output_scale", "order", "coefficients"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


def test_forward_signature_matches_multihead_attention():
    ours = inspect.signature(TaylorShiftAttention.forward).parameters
    theirs = inspect.signature(nn.MultiheadAttention.forward).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_parameter_names_and_shapes_match(config):
    mha = nn.MultiheadAttention(E, H, **config)
    ours = TaylorShiftAttention(E, H, **config)
    expected = {n: p.shape for n, p in mha.named_parameters()}
    expected["temperature"] = torch.Size([H])
    assert {n: p.shape for n, p in ours.named_parameters()} == expected
    assert set(ours.state_dict()) == set(mha.state_dict()) | {"temperature"}
    assert (ours.temperature == 1).all()
    for attr in ["embed_dim", "num_heads", "head_dim", "kdim", "vdim", "batch_first", "dropout"]:
        assert getattr(ours, attr) == getattr(mha, attr), attr


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_state_dict_of_multihead_attention_loads_and_matches_hand_computation(device, config):
    mha = _mha(device, **config)
    ours = TaylorShiftAttention(E, H, batch_first=True, device=device, **F64, **config)
    with torch.no_grad():
        ours.temperature.copy_(torch.tensor([0.5, 1.5, 2.0]))
    ours.load_state_dict(mha.state_dict())  # strict
    # The temperature, absent from the MHA state dict, keeps its value.
    assert ours.temperature.tolist() == [0.5, 1.5, 2.0]
    for name, p in mha.named_parameters():
        assert torch.equal(ours.get_parameter(name), p), name
    query, key, value = _inputs(config, device)
    kpm = random_key_padding_mask(B, S, device=device)
    out, weights = ours(query, key, value, key_padding_mask=kpm, average_attn_weights=False)
    expected, expected_weights = _hand(ours, query, key, value, kpm=kpm)
    torch.testing.assert_close(out, expected, **F64_TOL)
    torch.testing.assert_close(weights, expected_weights, **F64_TOL)
    # Same shapes as nn.MultiheadAttention's results, and genuinely different numbers.
    mha_out, mha_weights = mha(query, key, value, key_padding_mask=kpm, average_attn_weights=False)
    assert out.shape == mha_out.shape and weights.shape == mha_weights.shape
    assert (out - mha_out).abs().max() > 1e-3


def test_state_dict_with_temperature_round_trips():
    a = _randomize(TaylorShiftAttention(E, H, **F64))
    b = TaylorShiftAttention(E, H, **F64)
    b.load_state_dict(a.state_dict())
    for name, p in a.named_parameters():
        assert torch.equal(b.get_parameter(name), p), name


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_from_multihead_attention(device, config):
    mha = _mha(device, **config).eval()
    ours = TaylorShiftAttention.from_multihead_attention(mha, mode="efficient")
    assert isinstance(ours, TaylorShiftAttention)
    assert ours.mode == "efficient" and not ours.training and ours.batch_first
    assert ours.add_zero_attn == mha.add_zero_attn
    assert ours.in_proj_weight is not None if "kdim" not in config else ours.in_proj_weight is None
    for name, p in mha.named_parameters():
        assert torch.equal(ours.get_parameter(name), p), name
        assert ours.get_parameter(name).data_ptr() != p.data_ptr()  # a copy, not shared
    assert ours.temperature.dtype == torch.float64 and ours.temperature.device.type == device
    query, key, value = _inputs(config, device)
    out, _ = ours(query, key, value)
    torch.testing.assert_close(out, _hand(ours, query, key, value)[0], **F64_TOL)


# ---- forward ----------------------------------------------------------------------------------


def test_batch_first_false_equals_batch_first_true(device):
    first = _randomize(TaylorShiftAttention(E, H, batch_first=True, device=device, **F64))
    second = TaylorShiftAttention(E, H, batch_first=False, device=device, **F64)
    second.load_state_dict(first.state_dict())
    query, key, value = _inputs({}, device)
    kpm = random_key_padding_mask(B, S, device=device)
    out_bf, w_bf = first(query, key, value, key_padding_mask=kpm)
    out_sf, w_sf = second(*(x.transpose(0, 1) for x in (query, key, value)), key_padding_mask=kpm)
    assert out_sf.shape == (L, B, E)
    torch.testing.assert_close(out_sf.transpose(0, 1), out_bf, **F64_TOL)
    torch.testing.assert_close(w_sf, w_bf, **F64_TOL)
    torch.testing.assert_close(out_bf, _hand(first, query, key, value, kpm=kpm)[0], **F64_TOL)


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(device, batch_first):
    module = _randomize(TaylorShiftAttention(E, H, batch_first=batch_first, device=device, **F64))
    query, key, value = (x[0] for x in _inputs({}, device))  # (L, E), (S, E)
    kpm = random_key_padding_mask(1, S, device=device)[0]
    mask = random_attn_mask(L, S, device=device)
    out, weights = module(query, key, value, key_padding_mask=kpm, attn_mask=mask)
    assert out.shape == (L, E) and weights.shape == (L, S)
    expected, expected_weights = _hand(
        module, query[None], key[None], value[None], kpm=kpm[None], attn_mask=mask
    )
    torch.testing.assert_close(out, expected[0], **F64_TOL)
    torch.testing.assert_close(weights, expected_weights[0].mean(0), **F64_TOL)
    # (H, L, S) per-head weights and a 3-d (H, L, S) attn_mask for unbatched input.
    mask3 = random_attn_mask(H, L, S, device=device)
    out3, w3 = module(query, key, value, attn_mask=mask3, average_attn_weights=False)
    assert w3.shape == (H, L, S)
    expected3, _ = _hand(module, query[None], key[None], value[None], attn_mask=mask3)
    torch.testing.assert_close(out3, expected3[0], **F64_TOL)


def test_key_padding_mask_bool_and_float_forms(device):
    module = _randomize(TaylorShiftAttention(E, H, batch_first=True, device=device, **F64))
    query, key, value = _inputs({}, device)
    kpm = random_key_padding_mask(B, S, device=device)
    additive = torch.zeros(B, S, **F64, device=device).masked_fill(kpm, float("-inf"))
    out_bool, w_bool = module(query, key, value, key_padding_mask=kpm)
    out_float, w_float = module(query, key, value, key_padding_mask=additive)
    torch.testing.assert_close(out_float, out_bool, rtol=0, atol=0)
    torch.testing.assert_close(w_float, w_bool, rtol=0, atol=0)
    torch.testing.assert_close(out_bool, _hand(module, query, key, value, kpm=kpm)[0], **F64_TOL)
    assert (out_bool - module(query, key, value)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("form", ["bool", "float"])
def test_attn_mask_2d_and_3d(device, dims, form):
    module = _randomize(TaylorShiftAttention(E, H, batch_first=True, device=device, **F64))
    query, key, value = _inputs({}, device)
    shape = (L, S) if dims == 2 else (B * H, L, S)
    mask = random_attn_mask(*shape, device=device)
    given = mask
    if form == "float":
        given = torch.zeros(shape, **F64, device=device).masked_fill(mask, float("-inf"))
    out, weights = module(query, key, value, attn_mask=given, average_attn_weights=False)
    expected, expected_weights = _hand(module, query, key, value, attn_mask=mask)
    torch.testing.assert_close(out, expected, **F64_TOL)
    torch.testing.assert_close(weights, expected_weights, **F64_TOL)
    full = mask.expand(B, H, L, S) if dims == 2 else mask.view(B, H, L, S)
    assert (weights.masked_select(full) == 0).all()


def test_is_causal(device):
    module = _randomize(TaylorShiftAttention(E, H, batch_first=True, device=device, **F64))
    query = _inputs({}, device)[0]
    causal_mask = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
    out, _ = module(query, query, query, attn_mask=causal_mask, is_causal=True)
    out_flag, _ = module(query, query, query, is_causal=True, need_weights=False)
    expected, _ = _hand(module, query, query, query, attn_mask=causal_mask)
    torch.testing.assert_close(out, expected, **F64_TOL)
    torch.testing.assert_close(out_flag, expected, **F64_TOL)


@pytest.mark.parametrize("average", [True, False])
def test_need_weights(device, average):
    module = _randomize(TaylorShiftAttention(E, H, batch_first=True, device=device, **F64))
    query, key, value = _inputs({}, device)
    kpm = random_key_padding_mask(B, S, device=device)
    out, weights = module(query, key, value, key_padding_mask=kpm, average_attn_weights=average)
    _, expected = _hand(module, query, key, value, kpm=kpm)
    if average:
        expected = expected.mean(1)
    assert weights.shape == expected.shape == ((B, L, S) if average else (B, H, L, S))
    torch.testing.assert_close(weights, expected, **F64_TOL)
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)), **F64_TOL)
    assert (weights >= 0).all()
    assert (weights.masked_select(kpm.view(B, *([1] * (weights.dim() - 2)), S)) == 0).all()
    out_none, none = module(query, key, value, key_padding_mask=kpm, need_weights=False)
    assert none is None
    torch.testing.assert_close(out_none, out, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["direct", "efficient", "auto"])
def test_module_modes_agree(device, mode):
    module = _randomize(
        TaylorShiftAttention(E, H, batch_first=True, device=device, mode=mode, **F64)
    )
    query, key, value = _inputs({}, device)
    kpm = random_key_padding_mask(B, S, device=device)
    out, _ = module(query, key, value, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out, _hand(module, query, key, value, kpm=kpm)[0], **F64_TOL)


def test_dropout_applies_in_training_only(device):
    module = _randomize(
        TaylorShiftAttention(E, H, dropout=0.5, batch_first=True, device=device, **F64)
    )
    query, key, value = _inputs({}, device)
    expected = _hand(module, query, key, value)[0]
    module.eval()
    torch.testing.assert_close(module(query, key, value)[0], expected, **F64_TOL)
    module.train()
    assert (module(query, key, value)[0] - expected).abs().max() > 1e-3


def test_normalize_and_output_scale_options():
    module = _randomize(TaylorShiftAttention(E, H, batch_first=True, normalize=False, **F64))
    plain = TaylorShiftAttention(E, H, batch_first=True, output_scale=False, **F64)
    plain.load_state_dict(module.state_dict())
    query, key, value = _inputs({})
    _out, weights = module(query, key, value, average_attn_weights=False)
    sd = module.state_dict()
    w_q, w_k, w_v = sd["in_proj_weight"].chunk(3)
    b_q, b_k, b_v = sd["in_proj_bias"].chunk(3)

    def heads(x):
        return x.view(B, -1, H, E // H).transpose(1, 2)

    q, k, v = heads(query @ w_q.T + b_q), heads(key @ w_k.T + b_k), heads(value @ w_v.T + b_v)
    t = module.temperature.detach()
    for mod, options in [(module, {"normalize": False}), (plain, {"output_scale": False})]:
        y = reference.direct(q, k, v, t, **options).transpose(1, 2).reshape(B, L, E)
        expected = y @ sd["out_proj.weight"].T + sd["out_proj.bias"]
        torch.testing.assert_close(mod(query, key, value)[0], expected, **F64_TOL)
    expected_weights = reference.taylor_softmax_weights(q, k, t, normalize=False)
    torch.testing.assert_close(weights, expected_weights, **F64_TOL)


def test_all_options_with_3d_attn_mask_and_key_padding(device):
    config = CONFIGS["everything"]
    module = _randomize(
        TaylorShiftAttention(E, H, batch_first=True, device=device, **F64, **config)
    )
    query, key, value = _inputs(config, device)
    kpm = random_key_padding_mask(B, S, device=device)
    mask = random_attn_mask(B * H, L, S, device=device)
    out, weights = module(
        query, key, value, key_padding_mask=kpm, attn_mask=mask, average_attn_weights=False
    )
    expected, expected_weights = _hand(module, query, key, value, kpm=kpm, attn_mask=mask)
    # bias_k and the zero key are appended after the S keys, and every query may attend them.
    assert weights.shape == (B, H, L, S + 2)
    torch.testing.assert_close(out, expected, **F64_TOL)
    torch.testing.assert_close(weights, expected_weights, **F64_TOL)
    assert (weights[..., S:] > 0).all()


def test_causal_weights(device):
    module = _randomize(TaylorShiftAttention(E, H, batch_first=True, device=device, **F64))
    query = _inputs({}, device)[0]
    _, weights = module(query, query, query, is_causal=True, average_attn_weights=False)
    future = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
    assert (weights[..., future] == 0).all()
    assert (weights[..., ~future] > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)), **F64_TOL)


# ---- an nn.MultiheadAttention ----------------------------------------------------------------


def test_is_a_multihead_attention_that_never_takes_the_softmax_fast_path():
    module = _randomize(TaylorShiftAttention(E, H, batch_first=True, **F64)).eval()
    assert isinstance(module, nn.MultiheadAttention)
    # nn.TransformerEncoderLayer's eval fast path would run softmax on the weights when this
    # flag is True, without calling forward.
    assert module._qkv_same_embed_dim is False and module.in_proj_weight is not None
    query = _inputs({})[0]
    with torch.no_grad():
        out, _ = module(query, query, query, need_weights=False)
    torch.testing.assert_close(out, _hand(module, query, query, query)[0], **F64_TOL)


def test_torch_jit_script_raises_naming_the_reason():
    model = nn.Sequential(nn.Linear(E, E), TaylorShiftAttention(E, H))
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script"):
        torch.jit.script(model)


# ---- parity with nn.MultiheadAttention's checks -----------------------------------------------


def test_3d_attn_mask_of_wrong_shape_raises_where_multihead_attention_does():
    # Issue 14 item 4: an (H, L, S) mask with B == S used to be viewed as (B, H, L, S / B) and
    # broadcast over the keys.
    module = TaylorShiftAttention(E, H, batch_first=True, **F64)
    mha = nn.MultiheadAttention(E, H, batch_first=True, **F64)
    query, key, value = _inputs({}, batch=S)
    wrong = random_attn_mask(H, L, S)
    for attention in (mha, module):
        with pytest.raises(RuntimeError, match=r"3D attn_mask is .*\[3, 7, 9\].*\(27, 7, 9\)"):
            attention(query, key, value, attn_mask=wrong)
    with pytest.raises(RuntimeError, match=r"2D attn_mask is .*\[9, 7\].*\(7, 9\)"):
        module(query, key, value, attn_mask=random_attn_mask(S, L))
    with pytest.raises(AssertionError, match=r"key_padding_mask shape of \(9, 9\).*\(9, 7\)"):
        module(query, key, value, key_padding_mask=random_key_padding_mask(S, L))


def test_wrong_embedding_dimensions_raise_multihead_attention_messages():
    module = TaylorShiftAttention(E, H, batch_first=True, kdim=5, vdim=7, **F64)
    query, key, value = _inputs({"kdim": 5, "vdim": 7})
    with pytest.raises(AssertionError, match=f"expecting embedding dimension of {E}, but got 4"):
        module(query[..., :4], key, value)
    with pytest.raises(AssertionError, match="embedding dimension of 5, but got 4.*key"):
        module(query, key[..., :4], value)
    with pytest.raises(AssertionError, match="embedding dimension of 7, but got 5.*value"):
        module(query, key, value[..., :5])
    with pytest.raises(AssertionError, match="sequence and batch dims"):
        module(query, key, value[:, :3])
    with pytest.raises(AssertionError, match="query should be unbatched 2D or batched 3D"):
        module(query[0, 0], key, value)


def test_need_weights_in_training_returns_the_dropped_weights_it_applies():
    module = _randomize(TaylorShiftAttention(E, H, dropout=0.4, batch_first=True, **F64)).train()
    query, key, value = _inputs({})
    torch.manual_seed(5)
    out, weights = module(query, key, value, average_attn_weights=False)
    _, undropped = _hand(module, query, key, value)
    dropped = weights == 0
    assert 0.2 < dropped.double().mean() < 0.6
    torch.testing.assert_close(weights[~dropped], undropped[~dropped] / 0.6, **F64_TOL)
    # The output is formed from exactly these weights: direct TaylorShift with P replaced.
    sd = module.state_dict()
    values = value @ sd["in_proj_weight"].chunk(3)[2].T + sd["in_proj_bias"].chunk(3)[2]
    values = values.view(B, S, H, E // H).transpose(1, 2)
    heads = (weights @ values) * (S / (E // H)) ** 0.5
    expected = heads.transpose(1, 2).reshape(B, L, E) @ sd["out_proj.weight"].T
    torch.testing.assert_close(out, expected + sd["out_proj.bias"], **F64_TOL)


# ---- compile --------------------------------------------------------------------------------


def test_compile_fullgraph_with_float_padding_and_causal_masks():
    # nn.Transformer* layers turn bool masks into 0 / -inf float masks and open_clip passes a
    # float causal mask: their validation must trace without a graph break.
    torch._dynamo.reset()
    module = _randomize(TaylorShiftAttention(E, H, batch_first=True, **F64))
    query = _inputs({})[0]
    kpm = random_key_padding_mask(B, L)
    kpm[:, 0] = False  # every query keeps a key under the causal mask
    float_kpm = torch.zeros(B, L, **F64).masked_fill(kpm, float("-inf"))
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    compiled = torch.compile(module, fullgraph=True)
    out, _ = compiled(
        query, query, query, key_padding_mask=float_kpm, attn_mask=causal, need_weights=False
    )
    bool_causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    expected, _ = _hand(module, query, query, query, kpm=kpm, attn_mask=bool_causal)
    torch.testing.assert_close(out, expected, **F64_TOL)
    # The key_padding_mask's value check is in the graph: other values fail at run time.
    with pytest.raises(RuntimeError, match="key_padding_mask may hold only 0 .keep. and -inf"):
        compiled(query, query, query, key_padding_mask=float_kpm - 1.0, attn_mask=causal)


# ---- the way back ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_to_multihead_attention_round_trips_the_weights(config):
    original = _mha(**config).eval()
    module = TaylorShiftAttention.from_multihead_attention(original)
    back = module.to_multihead_attention()
    assert type(back) is nn.MultiheadAttention and not back.training
    assert back._qkv_same_embed_dim == original._qkv_same_embed_dim
    assert set(back.state_dict()) == set(original.state_dict())
    for name, p in original.named_parameters():
        assert torch.equal(back.get_parameter(name), p), name
    query, key, value = _inputs(config)
    torch.testing.assert_close(back(query, key, value), original(query, key, value))


def test_restore_attention_undoes_replace_attention_and_warns_about_temperature():
    import warnings

    import taylorshift

    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True, **F64)
    original = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    model = taylorshift.replace_attention(copy.deepcopy(original))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # temperatures are all 1: nothing to warn about
        restored = taylorshift.restore_attention(copy.deepcopy(model))
    x = _inputs({})[0]
    for m in restored.modules():
        assert not isinstance(m, TaylorShiftAttention)
    restored.load_state_dict(original.state_dict())  # strict: the same keys
    torch.testing.assert_close(restored(x), original(x), **F64_TOL)
    with torch.no_grad():
        model.layers[1].self_attn.temperature.fill_(2.0)
    with pytest.warns(UserWarning, match="temperature of 1 of 2 TaylorShiftAttention"):
        taylorshift.restore_attention(model)
    with pytest.warns(UserWarning, match="temperature"):
        back = taylorshift.restore_attention(_randomize(TaylorShiftAttention(E, H)))
    assert type(back) is nn.MultiheadAttention
