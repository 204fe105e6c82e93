"""CPU time of the logit normalisation, forward + backward: the fused operator
torch.ops.taylorshift.normalize_rows against the chain of ATen operators it replaced in
csrc/attention.cpp (cast, amax, divide, vector norm, clamp, divide, times temperature: the same
chain as taylorshift.reference.unit_rows), for q (with temperature) and k (without).

Both run in one process, interleaved round by round (A, B, A, B, ...), so that load from other
processes hits both alike; the table gives the median over rounds of each and of their ratio.

    python benchmarks/bench_normalize.py --tokens 16384 --head-dim 32 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.utils import benchmark

import taylorshift  # noqa: F401  (registers torch.ops.taylorshift)
from taylorshift import reference


def composite(q, k, temperature):
    q_hat = reference.unit_rows(q) * temperature.view(1, -1, 1, 1)
    return q_hat.to(q.dtype), reference.unit_rows(k).to(k.dtype)


def fused(q, k, temperature):
    normalize_rows = torch.ops.taylorshift.normalize_rows
    return normalize_rows(q, temperature), normalize_rows(k)


def forward_backward(fn, q, k, temperature, grad_q, grad_k):
    q_hat, k_hat = fn(q, k, temperature)
    torch.autograd.backward((q_hat, k_hat), (grad_q, grad_k))
    q.grad = k.grad = temperature.grad = None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, grad_q, grad_k = (torch.randn(shape, generator=generator) for _ in range(4))
    q.requires_grad_()
    k.requires_grad_()
    temperature = (0.5 + torch.rand(args.heads, generator=generator)).requires_grad_()
    times = {"composite": [], "fused": []}
    for _ in range(args.rounds):
        for name, fn in (("composite", composite), ("fused", fused)):
            timer = benchmark.Timer(
                stmt="forward_backward(fn, q, k, t, gq, gk)",
                globals={
                    "forward_backward": forward_backward,
                    "fn": fn,
                    "q": q,
                    "k": k,
                    "t": temperature,
                    "gq": grad_q,
                    "gk": grad_k,
                },
                num_threads=torch.get_num_threads(),
            )
            times[name].append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
    ratios = [f / c for f, c in zip(times["fused"], times["composite"], strict=True)]
    print(
        f"Normalisation of q (with temperature) and k, forward + backward, float32, shape {shape}, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds (median)\n"
    )
    print("| composite ms | fused ms | fused / composite | min ratio | max ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| {1e3 * statistics.median(times['composite']):.1f} "
        f"| {1e3 * statistics.median(times['fused']):.1f} "
        f"| {statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |"
    )


if __name__ == "__main__":
    main()
