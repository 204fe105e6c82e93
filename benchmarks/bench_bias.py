"""CPU speed and peak memory of direct TaylorShift with an additive ALiBi bias (taylorshift.bias:
query blocks under checkpoint) against the same function computed densely (every M x N matrix
kept for the backward), with the fused direct kernel under a plain causal bool mask as the
yardstick of what a bias costs over a mask.

float32, forward + backward, causal, B=1, H=8, d=32. Each case runs in its own process; peak
memory as in bench_cpu.py. Prints a markdown table.

    python benchmarks/bench_bias.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

IMPLEMENTATIONS = ("blocked", "dense", "kernel_bool_mask")


def attention_fn(implementation, bias):
    import taylorshift
    from taylorshift import reference
    from taylorshift.bias import biased_direct_attention, biased_weights

    if implementation == "blocked":
        return lambda q, k, v: biased_direct_attention(q, k, v, bias=bias, causal=True)
    if implementation == "dense":

        def dense(q, k, v):
            probs, multiplicity = biased_weights(q, k, bias=bias, causal=True)
            counted = multiplicity.sum(-1, keepdim=True)
            return probs @ v * reference.output_scale_factor(counted, q.shape[-1], q.dtype)

        return dense
    return lambda q, k, v: taylorshift.taylor_shift_attention(q, k, v, causal=True, mode="direct")


def alibi(heads, tokens):
    import torch

    # float32 throughout: ru_maxrss keeps the transient (N, N) distance (16 MiB at N = 2048,
    # the same for every implementation) in the peak; an int64 one would be twice that.
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    positions = torch.arange(tokens, dtype=torch.float32)
    distance = (positions.view(-1, 1) - positions.view(1, -1)).abs_()
    return -slopes.view(-1, 1, 1) * distance


def measure_one(implementation, tokens, batch, heads, head_dim, min_run_time, threads):
    """Runs in a child process: seconds and peak extra bytes of one forward+backward."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from bench_cpu import current_rss_bytes
    from common import forward_backward, make_inputs, time_forward_backward

    torch.manual_seed(0)
    q, k, v = make_inputs(batch, heads, tokens, head_dim)
    fn = attention_fn(implementation, alibi(heads, tokens))
    small = make_inputs(batch, heads, 64, head_dim)
    small_fn = attention_fn(implementation, alibi(heads, 64))
    forward_backward(small_fn, *small, torch.randn_like(small[2]))  # load code first
    grad_out = torch.randn_like(v)
    baseline = current_rss_bytes()
    forward_backward(fn, q, k, v, grad_out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time_forward_backward(fn, q, k, v, min_run_time=min_run_time)
    return {"seconds": seconds, "peak_extra_bytes": max(peak - baseline, 0)}


def run_case(implementation, tokens, args):
    from common import run_child

    child = [implementation, tokens, args.batch, args.heads, args.head_dim, args.min_run_time]
    return run_child(__file__, "--child", child + [args.threads])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--tokens", default="1024,2048", help="comma-separated N = M")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's). On a loaded machine 1 avoids timing the "
        "wake-up of idle threads, which the blocked path, with more and smaller ops, pays more",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(*json.loads(args.child))))
        return
    import torch

    print(
        f"CPU forward+backward, float32, causal, ALiBi bias (H, N, N), B={args.batch}, "
        f"H={args.heads}, d={args.head_dim}, torch {torch.__version__}, "
        f"{args.threads or torch.get_num_threads()} threads\n"
    )
    print("| N | implementation | ms | peak MiB |")
    print("|---|---|---|---|")
    for tokens in (int(n) for n in args.tokens.split(",")):
        for implementation in IMPLEMENTATIONS:
            result = run_case(implementation, tokens, args)
            print(
                f"| {tokens} | {implementation} | {result['seconds'] * 1e3:.1f} | "
                f"{result['peak_extra_bytes'] / 2**20:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
