"""Where the direct and the efficient algorithm cost the same.

`flops` counts the work of each algorithm, as the cost model does. `crossover` is this
implementation's own switch point, the one mode="auto" uses: it comes from
the extension's cost model (csrc/crossover.cpp), whose per-device weights were measured by
benchmarks/crossover.py. `paper_thresholds` gives the paper's formulas, for comparison only.
"""

from __future__ import annotations

import math

import torch

from taylorshift import _extension


def crossover(head_dim: int, device: str | torch.device = "cpu", *, order: int = 2) -> int:
    """Sequence length (M = N, value dim = head dim) from which mode="auto" picks "efficient"
    for Taylor order `order` (the efficient features grow as C(d + k, k)). A ValueError for an
    order the efficient algorithm lacks on that device (it has 1-3 on the CPU, 1-2 on CUDA)."""
    if not _extension.available:
        raise RuntimeError("taylorshift.crossover needs the compiled extension taylorshift._C")
    return _extension._C.crossover(head_dim, torch.device(device).type, order)


def flops(
    mode: str,
    queries: int,
    keys: int,
    head_dim: int,
    value_dim: int | None = None,
    *,
    backward: bool = True,
    order: int = 2,
) -> float:
    """FLOPs of one (batch, head) of `mode` ("direct" or "efficient"), forward + backward or forward
    only; a multiply-add counts 2 (docs/math.md §4). The counts of the extension's cost model;
    the efficient count has C(d + k, k) features for Taylor order k, the direct one does not
    depend on k (the polynomial's k multiply-adds per weight are not counted)."""
    if not _extension.available:
        raise RuntimeError("taylorshift.flops needs the compiled extension taylorshift._C")
    value_dim = head_dim if value_dim is None else value_dim
    return _extension._C.flops(mode, queries, keys, head_dim, value_dim, backward, order)


def paper_thresholds(head_dim: int) -> tuple[int, float]:
    """The paper's (N0, N1): N0 = d^2 + d + 1 for speed, N1 for memory (full d^2 features)."""
    d = head_dim
    n0 = d * d + d + 1
    n1 = (d * d + 2 * d + 1 + math.sqrt(d**4 + 12 * d**3 + 14 * d**2 + 4 * d + 1)) / 4
    return n0, n1
