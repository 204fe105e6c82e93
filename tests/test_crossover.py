"""crossover(d), paper_thresholds(d), and mode="auto" switching exactly at the crossover."""

import itertools

import pytest
import torch
from ts_testing import make_inputs

import taylorshift
from taylorshift import _extension

HEAD_DIMS = list(range(1, 17)) + [24, 32, 48, 64, 128]


def test_crossover_positive_and_increasing(device):
    values = [taylorshift.crossover(d, device) for d in HEAD_DIMS]
    assert all(isinstance(n, int) and n >= 1 for n in values)
    assert all(a < b for a, b in itertools.pairwise(values)), values


def test_crossover_is_the_first_length_auto_prefers_efficient(device):
    for d in HEAD_DIMS:
        n = taylorshift.crossover(d, device)
        assert _extension._C.prefer_efficient(n, n, d, d, device), d
        if n > 1:
            assert not _extension._C.prefer_efficient(n - 1, n - 1, d, d, device), d


def test_crossover_default_device_is_cpu():
    assert taylorshift.crossover(16) == taylorshift.crossover(16, "cpu")
    assert taylorshift.crossover(16) == taylorshift.crossover(16, torch.device("cpu"))


def test_crossover_rejects_nonpositive_head_dim():
    with pytest.raises(ValueError, match="head_dim must be positive"):
        taylorshift.crossover(0)


@pytest.mark.parametrize("head_dim", [4, 8])
def test_auto_switches_at_the_crossover(device, head_dim):
    n = taylorshift.crossover(head_dim, device)
    assert n > 1
    for length, expected_mode in [(n - 1, "direct"), (n, "efficient")]:
        q, k, v, t = make_inputs(1, 2, length, length, head_dim, device=device)
        auto = taylorshift.taylor_shift_attention(q, k, v, t, mode="auto")
        direct = taylorshift.taylor_shift_attention(q, k, v, t, mode="direct")
        efficient = taylorshift.taylor_shift_attention(q, k, v, t, mode="efficient")
        # The two algorithms round differently, so bitwise equality tells which one ran.
        assert not torch.equal(direct, efficient)
        chosen = {"direct": direct, "efficient": efficient}[expected_mode]
        assert torch.equal(auto, chosen), f"N = {length}: auto did not run {expected_mode}"


def test_auto_follows_prefer_efficient_for_cross_attention(device):
    # M != N, e != d: auto asks the cost model with these exact sizes.
    d, e = 4, 9
    for queries, keys in [(3, 400), (400, 3), (200, 200), (10, 10)]:
        q, k, v, t = make_inputs(1, 1, queries, keys, d, e, device=device)
        auto = taylorshift.taylor_shift_attention(q, k, v, t)
        efficient = _extension._C.prefer_efficient(queries, keys, d, e, device)
        mode = "efficient" if efficient else "direct"
        assert torch.equal(auto, taylorshift.taylor_shift_attention(q, k, v, t, mode=mode))


def test_paper_thresholds():
    for d, n1 in [(16, 158), (32, 574), (64, 2174)]:
        n0, n1_value = taylorshift.paper_thresholds(d)
        assert n0 == d * d + d + 1
        assert n1_value == pytest.approx(n1, abs=0.5)
    assert taylorshift.paper_thresholds(16)[0] == 273
    assert taylorshift.paper_thresholds(64)[0] == 4161


@pytest.mark.parametrize("d, e", [(16, 16), (32, 32), (64, 64), (24, 40)])
def test_flops_are_the_documented_counts(d, e):
    # docs/math.md §4, written out independently: F = (d+1)(d+2)/2 features; efficient forward is a
    # state build over N keys and an apply over M queries, 2 F (e+1) each per token, and its
    # backward twice that again; direct forward is 2 M N (d+e), its backward 2 M N (3d+2e).
    queries, keys = 300, 500
    features = (d + 1) * (d + 2) // 2
    efficient_forward = 2 * (queries + keys) * features * (e + 1)
    assert taylorshift.flops("efficient", queries, keys, d, e, backward=False) == efficient_forward
    assert taylorshift.flops("efficient", queries, keys, d, e) == 3 * efficient_forward
    assert taylorshift.flops("direct", queries, keys, d, e, backward=False) == (
        2 * queries * keys * (d + e)
    )
    assert taylorshift.flops("direct", queries, keys, d, e) == 2 * queries * keys * (4 * d + 3 * e)
    # M = N, e = d: the issue tables' 12 N F (e+1) for efficient forward + backward.
    assert taylorshift.flops("efficient", keys, keys, d) == 12 * keys * features * (d + 1)


def test_flops_rejects_unknown_mode():
    with pytest.raises(ValueError, match='flops counts mode "direct" or "efficient"'):
        taylorshift.flops("fast", 10, 10, 8)
