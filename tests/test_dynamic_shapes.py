"""taylor_shift_attention traces with symbolic sizes: torch.compile(dynamic=True) compiles one
graph for every sequence length and torch.export accepts a dynamic Dim for it. The composite
operator reads sizes as SymInts, checks them with runtime assertions instead of guards, and picks
the algorithm of mode="auto" by a rule that holds for every size the symbols may take."""

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend
from ts_testing import F64_TOL, make_inputs, random_key_padding_mask, reference64

import taylorshift

LENGTHS = [3, 5, 8, 13, 21, 34, 55, 89, 144, 233]
H, D = 2, 4


def attend(q, k, v, t, key_padding_mask):
    return taylorshift.taylor_shift_attention(q, k, v, t, key_padding_mask=key_padding_mask)


def inputs(length, requires_grad=False):
    q, k, v, t = make_inputs(2, H, length, length, D, seed=length, requires_grad=requires_grad)
    return q, k, v, t, random_key_padding_mask(2, length, seed=length)


def test_compile_dynamic_compiles_once_for_ten_lengths():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attend, backend=counter, fullgraph=True, dynamic=True)
    compiles = []
    for length in LENGTHS:
        q, k, v, t, kpm = inputs(length, requires_grad=True)
        out = compiled(q, k, v, t, kpm)
        torch.testing.assert_close(out, reference64(q, k, v, t, key_padding_mask=kpm), **F64_TOL)
        out.sum().backward()  # the backward graph is traced symbolically too
        assert q.grad.isfinite().all()
        compiles.append(counter.frame_count)
    # (The first compile may call the backend twice: dynamo restarts its analysis once to turn
    # Python float arguments into tensors. A recompile would add one more per length.)
    assert compiles[0] >= 1
    assert compiles == compiles[:1] * len(LENGTHS)


def test_export_with_dynamic_length():
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, t, key_padding_mask):
            return attend(q, k, v, t, key_padding_mask)

    length = torch.export.Dim("N", min=2, max=4096)
    tokens = {2: length}
    program = torch.export.export(
        Attention(),
        inputs(16),
        dynamic_shapes=(tokens, tokens, tokens, None, {1: length}),
    )
    for other in (7, 40, 300):
        q, k, v, t, kpm = inputs(other)
        out = program.module()(q, k, v, t, kpm)
        torch.testing.assert_close(out, reference64(q, k, v, t, key_padding_mask=kpm), **F64_TOL)


def forward_graph_ops(length, minimum):
    """The kernel operators in the forward graph compiled for a symbolic length >= minimum."""
    ops = set()

    def record(graph, _example_inputs):
        ops.update(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    q, k, v, t, kpm = inputs(length)
    for x in (q, k, v):
        torch._dynamo.mark_dynamic(x, 2, min=minimum, max=1 << 20)
    torch._dynamo.mark_dynamic(kpm, 1, min=minimum, max=1 << 20)
    compiled(q, k, v, t, kpm)
    return {op for op in ops if op.startswith("taylorshift.")}


@pytest.mark.parametrize("length", [64, 300])
def test_auto_mode_with_symbolic_length_depends_on_its_range_not_its_value(length):
    # A symbolic length may take any value of its range: "auto" picks the efficient algorithm
    # only if it is the cheaper one for all of them, whatever the example's length (both
    # lengths here are past the crossover, where "auto" picks it for concrete sizes).
    crossover = taylorshift.crossover(D)
    assert crossover <= 64
    # The logit factors: one fused operator before the direct algorithm; the efficient one forms
    # them itself.
    normalize = "taylorshift.normalize_rows.default"
    assert forward_graph_ops(length, minimum=2) == {normalize, "taylorshift.direct_forward.default"}
    assert forward_graph_ops(length, minimum=crossover) == {"taylorshift.efficient_forward.default"}
