"""replace_attention inside nn.TransformerEncoder / nn.TransformerDecoder, train and eval mode.

Whether TaylorShift really ran is decided by numbers: the replaced model must equal the same
network written out by hand with TaylorShift attention (reference.direct), and must differ from
the original softmax model. Forward hooks are not used: they would disable PyTorch's fused fast
path by themselves and so hide exactly the bypass this checks for.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from ts_testing import F64_TOL, random_key_padding_mask

import taylorshift
from taylorshift import TaylorShiftAttention, reference

D_MODEL, HEADS, FF, BATCH, SRC, TGT = 16, 4, 32, 3, 11, 6


def _randomize_biases(model):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _encoder(device):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        D_MODEL, HEADS, FF, dropout=0.0, batch_first=True, device=device, dtype=torch.float64
    )
    return _randomize_biases(nn.TransformerEncoder(layer, num_layers=2))


def _decoder(device):
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(
        D_MODEL, HEADS, FF, dropout=0.0, batch_first=True, device=device, dtype=torch.float64
    )
    return _randomize_biases(nn.TransformerDecoder(layer, num_layers=2))


def hand_attention(mha, query, key, kpm=None, causal=False):
    """Multi-head TaylorShift attention from an nn.MultiheadAttention's weights (batch-first,
    temperature 1, key_padding_mask True = padding)."""
    batch, target, embed = query.shape
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

    def heads(x):
        return x.view(batch, -1, HEADS, embed // HEADS).transpose(1, 2)

    q, k, v = heads(query @ w_q.T + b_q), heads(key @ w_k.T + b_k), heads(key @ w_v.T + b_v)
    y = reference.direct(q, k, v, key_padding_mask=kpm, causal=causal)
    return y.transpose(1, 2).reshape(batch, target, embed) @ mha.out_proj.weight.T + (
        mha.out_proj.bias
    )


def _norm(layer_norm, x):
    return F.layer_norm(x, x.shape[-1:], layer_norm.weight, layer_norm.bias, layer_norm.eps)


def _feed_forward(layer, x):
    return layer.linear2(F.relu(layer.linear1(x)))


def hand_encoder(original, x, kpm):
    for layer in original.layers:  # post-norm (norm_first=False), ReLU, no dropout
        x = _norm(layer.norm1, x + hand_attention(layer.self_attn, x, x, kpm))
        x = _norm(layer.norm2, x + _feed_forward(layer, x))
    return x


def hand_decoder(original, x, memory, memory_kpm):
    for layer in original.layers:
        x = _norm(layer.norm1, x + hand_attention(layer.self_attn, x, x, causal=True))
        x = _norm(layer.norm2, x + hand_attention(layer.multihead_attn, x, memory, memory_kpm))
        x = _norm(layer.norm3, x + _feed_forward(layer, x))
    return x


def _assert_no_softmax_attention_left(model):
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert attention and all(isinstance(m, TaylorShiftAttention) for m in attention)
    assert any(isinstance(m, TaylorShiftAttention) for m in model.modules())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_encoder(device, training):
    original = _encoder(device).train(training)
    model = taylorshift.replace_attention(copy.deepcopy(original))
    _assert_no_softmax_attention_left(model)
    assert model.training == training
    x = torch.randn(BATCH, SRC, D_MODEL, dtype=torch.float64, device=device)
    kpm = random_key_padding_mask(BATCH, SRC, device=device)
    kpm[-1, SRC // 2 :] = True  # a longer padded tail, as from variable-length sequences
    # Eval + no_grad is where nn.TransformerEncoder's fused fast path (and nested tensors)
    # would run softmax attention on the weights without calling the attention module.
    context = torch.no_grad() if not training else torch.enable_grad()
    with context:
        out = model(x, src_key_padding_mask=kpm)
        softmax_out = original(x, src_key_padding_mask=kpm)
        expected = hand_encoder(original, x, kpm)
    assert out.shape == expected.shape  # every position, padded ones included (no nested tensor)
    torch.testing.assert_close(out, expected, **F64_TOL)
    valid = ~kpm
    assert (out[valid] - softmax_out[valid]).abs().max() > 1e-3
    if training:
        out.square().sum().backward()
        temperatures = [m.temperature.grad for m in model.modules() if hasattr(m, "temperature")]
        assert len(temperatures) == 2 and all(t.abs().sum() > 0 for t in temperatures)


def test_encoder_eval_without_mask_and_float_mask(device):
    original = _encoder(device).eval()
    model = taylorshift.replace_attention(copy.deepcopy(original))
    x = torch.randn(BATCH, SRC, D_MODEL, dtype=torch.float64, device=device)
    kpm = random_key_padding_mask(BATCH, SRC, device=device)
    additive = torch.zeros(BATCH, SRC, dtype=torch.float64, device=device)
    additive = additive.masked_fill(kpm, float("-inf"))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), hand_encoder(original, x, None), **F64_TOL)
        torch.testing.assert_close(
            model(x, src_key_padding_mask=additive), hand_encoder(original, x, kpm), **F64_TOL
        )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_decoder(device, training):
    original = _decoder(device).train(training)
    model = taylorshift.replace_attention(copy.deepcopy(original))
    _assert_no_softmax_attention_left(model)
    x = torch.randn(BATCH, TGT, D_MODEL, dtype=torch.float64, device=device)
    memory = torch.randn(BATCH, SRC, D_MODEL, dtype=torch.float64, device=device)
    memory_kpm = random_key_padding_mask(BATCH, SRC, device=device)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(
        TGT, device=device, dtype=torch.float64
    )
    context = torch.no_grad() if not training else torch.enable_grad()
    with context:
        out = model(x, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_kpm)
        causal_flag = model(
            x, memory, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=memory_kpm
        )
        softmax_out = original(x, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_kpm)
        expected = hand_decoder(original, x, memory, memory_kpm)
    torch.testing.assert_close(out, expected, **F64_TOL)
    torch.testing.assert_close(causal_flag, expected, **F64_TOL)
    assert (out - softmax_out).abs().max() > 1e-3


def test_bare_encoder_layer_eval_fast_path(device):
    # nn.TransformerEncoderLayer alone has the same eval fast path as inside the encoder.
    original = _encoder(device).layers[0].eval()
    layer = taylorshift.replace_attention(copy.deepcopy(original))
    x = torch.randn(BATCH, SRC, D_MODEL, dtype=torch.float64, device=device)
    kpm = random_key_padding_mask(BATCH, SRC, device=device)
    with torch.no_grad():
        out = layer(x, src_key_padding_mask=kpm)
        expected = _norm(original.norm1, x + hand_attention(original.self_attn, x, x, kpm))
        expected = _norm(original.norm2, expected + _feed_forward(original, expected))
    torch.testing.assert_close(out, expected, **F64_TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_full_transformer(device, training):
    torch.manual_seed(2)
    original = nn.Transformer(
        D_MODEL,
        HEADS,
        num_encoder_layers=2,
        num_decoder_layers=1,
        dim_feedforward=FF,
        dropout=0.0,
        batch_first=True,
        device=device,
        dtype=torch.float64,
    )
    original = _randomize_biases(original).train(training)
    model = taylorshift.replace_attention(copy.deepcopy(original))
    _assert_no_softmax_attention_left(model)
    src = torch.randn(BATCH, SRC, D_MODEL, dtype=torch.float64, device=device)
    tgt = torch.randn(BATCH, TGT, D_MODEL, dtype=torch.float64, device=device)
    kpm = random_key_padding_mask(BATCH, SRC, device=device)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(
        TGT, device=device, dtype=torch.float64
    )
    context = torch.no_grad() if not training else torch.enable_grad()
    with context:
        out = model(
            src,
            tgt,
            tgt_mask=tgt_mask,
            src_key_padding_mask=kpm,
            memory_key_padding_mask=kpm,
        )
        memory = _norm(original.encoder.norm, hand_encoder(original.encoder, src, kpm))
        expected = _norm(original.decoder.norm, hand_decoder(original.decoder, tgt, memory, kpm))
    torch.testing.assert_close(out, expected, **F64_TOL)


def test_replace_bare_multihead_attention_and_options():
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    replaced = taylorshift.replace_attention(mha, mode="efficient", output_scale=False)
    assert isinstance(replaced, TaylorShiftAttention)
    assert replaced.mode == "efficient" and replaced.output_scale is False
    assert replaced.kdim == 5 and replaced.vdim == 3
    for name, p in mha.named_parameters():
        assert torch.equal(replaced.get_parameter(name), p)


def test_replace_returns_same_model_and_passes_options():
    model = nn.Sequential(nn.Linear(4, 8), nn.ModuleDict({"a": nn.MultiheadAttention(8, 2)}))
    result = taylorshift.replace_attention(model, mode="direct", normalize=False)
    assert result is model
    assert isinstance(model[1]["a"], TaylorShiftAttention)
    assert model[1]["a"].mode == "direct" and model[1]["a"].normalize is False
