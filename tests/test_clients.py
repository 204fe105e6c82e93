"""replace_attention inside real models of other projects: torchvision's VisionTransformer,
open_clip's CLIP and CoCa (image towers, causal text towers, attentional pooler, multimodal
decoder), PyG's SetTransformerAggregation, GraphMultisetTransformer and GPSConv, and
nn.Transformer / nn.TransformerEncoder (padding and causal masks, nested-tensor fast path).

Tiny random-init configurations on the CPU, no downloads. For each model: every
nn.MultiheadAttention becomes a TaylorShiftAttention, each one runs TaylorShift once per forward
(counted), every attention parameter gets a finite, nonzero gradient, outputs are finite in
train and eval and differ from the softmax model's, the original state dict loads strictly, and
torch.compile(fullgraph=True) traces the model wherever it traces the original (the PyG
aggregations and GPSConv do not: to_dense_batch branches on data). Compilation uses the
aot_eager backend (Dynamo and AOTAutograd, no code generation) to keep the suite fast; inductor
compiles the module itself in test_module.py and test_opcheck_compile.py. A client that cannot
be imported is skipped with the import error as the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import taylorshift
from taylorshift import TaylorShiftAttention


@dataclass
class Client:
    model: nn.Module
    run: Callable[[nn.Module], object]  # the model's forward on fixed inputs
    compiles_fullgraph: bool


def _tensors(output) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, tuple or dict)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    return [t for item in output for t in _tensors(item)]


def _graph_batch():
    """Two graphs of 4 and 6 nodes with 16 features: (x, edge_index, batch)."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(10, 16, generator=generator)
    sizes = [4, 6]
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    first = torch.tensor([0, 4])
    edges = [
        first[g] + torch.randint(0, n, (2, 3 * n), generator=generator) for g, n in enumerate(sizes)
    ]
    return x, torch.cat(edges, dim=1), batch


def torchvision_vit() -> Client:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    # The classification head starts at zero, which would leave every other gradient zero.
    nn.init.normal_(model.heads.head.weight)
    images = torch.randn(2, 3, 32, 32)
    return Client(model, lambda m: m(images), compiles_fullgraph=True)


def _open_clip_inputs():
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    text = torch.randint(1, 50, (2, 8), generator=generator)
    return images, text


VISION_CFG = {"layers": 2, "width": 32, "patch_size": 8, "image_size": 32, "head_width": 16}
TEXT_CFG = {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 2}


def open_clip_clip() -> Client:
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.CLIP(16, VISION_CFG, TEXT_CFG)
    images, text = _open_clip_inputs()
    return Client(model, lambda m: m(images, text), compiles_fullgraph=True)


def open_clip_coca() -> Client:
    open_clip = pytest.importorskip("open_clip")
    # coca_ViT-B-32's layout, scaled down: attentional pooler (cross-attention with kdim != E),
    # a text tower with a cls token, and a multimodal decoder with causal and cross-attention.
    vision = {
        **VISION_CFG,
        "attentional_pool": True,
        "attn_pooler_heads": 2,
        "attn_pooler_queries": 5,
        "output_tokens": True,
    }
    text = {**TEXT_CFG, "embed_cls": True, "output_tokens": True}
    multimodal = {**TEXT_CFG, "layers": 1, "attn_pooler_heads": 2}
    model = open_clip.CoCa(32, multimodal, text, vision)
    # open_clip leaves the decoder's text_projection uninitialised (torch.empty; its
    # init_parameters fails), so the logits would be arbitrary memory.
    nn.init.normal_(model.text_decoder.text_projection, std=32**-0.5)
    images, tokens = _open_clip_inputs()
    return Client(model, lambda m: m(images, tokens), compiles_fullgraph=True)


def pyg_set_transformer() -> Client:
    aggr = pytest.importorskip("torch_geometric.nn.aggr")
    model = aggr.SetTransformerAggregation(16, num_seed_points=2, heads=2)
    x, _, batch = _graph_batch()
    return Client(model, lambda m: m(x, batch), compiles_fullgraph=False)


def pyg_graph_multiset_transformer() -> Client:
    aggr = pytest.importorskip("torch_geometric.nn.aggr")
    model = aggr.GraphMultisetTransformer(16, k=4, heads=2)
    x, _, batch = _graph_batch()
    return Client(model, lambda m: m(x, batch), compiles_fullgraph=False)


def pyg_gps_conv() -> Client:
    pyg = pytest.importorskip("torch_geometric.nn")
    mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    model = pyg.GPSConv(16, pyg.GINConv(mlp), heads=2, dropout=0.0)
    x, edge_index, batch = _graph_batch()
    return Client(model, lambda m: m(x, edge_index, batch), compiles_fullgraph=False)


def torch_transformer() -> Client:
    model = nn.Transformer(16, 2, 2, 1, 32, dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)

    def run(m):
        return m(
            src,
            tgt,
            tgt_mask=causal,
            src_key_padding_mask=padding,
            memory_key_padding_mask=padding,
            tgt_is_causal=True,
        )

    return Client(model, run, compiles_fullgraph=True)


def torch_encoder_nested() -> Client:
    # Built with enable_nested_tensor (the default): in eval the softmax encoder packs the
    # padded batch into a nested tensor and runs its fused kernel.
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2)
    x = torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    return Client(model, lambda m: m(x, src_key_padding_mask=padding), compiles_fullgraph=True)


CLIENTS = {
    f.__name__: f
    for f in [
        torchvision_vit,
        open_clip_clip,
        open_clip_coca,
        pyg_set_transformer,
        pyg_graph_multiset_transformer,
        pyg_gps_conv,
        torch_transformer,
        torch_encoder_nested,
    ]
}


@pytest.fixture
def count_taylorshift_calls(monkeypatch):
    """A list that receives one entry per TaylorShift computation of a TaylorShiftAttention."""
    calls = []
    attention = taylorshift.modules.taylor_shift_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    monkeypatch.setattr(taylorshift.modules, "taylor_shift_attention", counted)
    return calls


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


@pytest.mark.parametrize("name", CLIENTS)
def test_client_runs_taylorshift_in_every_attention(name, count_taylorshift_calls):
    torch.manual_seed(0)
    client = CLIENTS[name]()
    original = client.model
    softmax_count = len(_attention_modules(original))
    assert softmax_count > 0
    model = taylorshift.replace_attention(copy.deepcopy(original))
    attention = _attention_modules(model)
    assert len(attention) == softmax_count
    assert all(isinstance(m, TaylorShiftAttention) for m in attention)
    model.load_state_dict(original.state_dict())  # strict: only the temperatures are new

    # Train: each attention runs TaylorShift once, and all of its parameters learn.
    model.train()
    outputs = _tensors(client.run(model))
    assert len(count_taylorshift_calls) == softmax_count
    assert all(torch.isfinite(t).all() for t in outputs)
    sum(t.square().mean() for t in outputs).backward()
    for i, module in enumerate(attention):
        for pname, p in module.named_parameters():
            assert p.grad is not None, f"attention {i}: {pname} has no gradient"
            assert torch.isfinite(p.grad).all(), f"attention {i}: {pname}"
            assert p.grad.abs().sum() > 0, f"attention {i}: {pname} gradient is zero"

    # Eval (the softmax models' fused fast paths apply here): TaylorShift still runs.
    count_taylorshift_calls.clear()
    model.eval()
    original.eval()
    with torch.no_grad():
        outputs = _tensors(client.run(model))
        softmax_outputs = _tensors(client.run(original))
    assert len(count_taylorshift_calls) == softmax_count
    assert all(torch.isfinite(t).all() for t in outputs)
    assert max((t - s).abs().max() for t, s in zip(outputs, softmax_outputs, strict=True)) > 1e-4


@pytest.mark.parametrize("name", CLIENTS)
def test_client_compiles_fullgraph_where_the_original_does(name):
    torch.manual_seed(0)
    client = CLIENTS[name]()
    if not client.compiles_fullgraph:
        # Recorded, not assumed: if the original starts to compile, this test must cover it.
        with pytest.raises(Exception, match="(?i)data-dependent"):
            torch._dynamo.reset()
            client.run(torch.compile(client.model.eval(), fullgraph=True, backend="aot_eager"))
        return
    model = taylorshift.replace_attention(copy.deepcopy(client.model)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = _tensors(client.run(model))
        traced = _tensors(client.run(compiled))
    for t, e in zip(traced, eager, strict=True):
        torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-5)


def test_gps_conv_keeps_its_attention_branch():
    # GPSConv tests isinstance(self.attn, nn.MultiheadAttention); with a module that failed it,
    # neither branch ran and the global branch became x + x, silently.
    client = pyg_gps_conv()
    model = taylorshift.replace_attention(copy.deepcopy(client.model)).eval()
    with torch.no_grad():
        out = client.run(model)
        model.attn.out_proj.weight.zero_()
        model.attn.out_proj.bias.zero_()
        without_attention = client.run(model)
    assert (out - without_attention).abs().max() > 1e-4


def test_open_clip_low_precision_conversion_reaches_the_attention():
    # convert_weights_to_lp finds attention by isinstance(nn.MultiheadAttention).
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = taylorshift.replace_attention(open_clip.CLIP(16, VISION_CFG, TEXT_CFG)).eval()
    open_clip.model.convert_weights_to_lp(model, dtype=torch.bfloat16)
    for module in _attention_modules(model):
        assert module.in_proj_weight.dtype == torch.bfloat16
    images, text = _open_clip_inputs()
    with torch.no_grad():
        text_features = model.encode_text(text)
        image_features = model.encode_image(images.bfloat16())
    assert text_features.dtype == image_features.dtype == torch.bfloat16
    assert torch.isfinite(text_features).all() and torch.isfinite(image_features).all()
