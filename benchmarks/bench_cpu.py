"""CPU speed and peak memory of taylorshift against the paper's formulation (taylorshift.reference).

float32, forward + backward, B=1, H=8, d=32 by default. Each case runs in its own process so that
its peak extra resident memory (max RSS during the run minus RSS with the inputs allocated) is its
own. Prints a markdown table; --csv writes the rows.

    python benchmarks/bench_cpu.py --csv benchmarks/results/cpu.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (mode, N) cases; each is measured for our kernels and for the reference.
DEFAULT_CASES = [
    ("direct", 1024),
    ("direct", 2048),
    ("direct", 4096),
    ("efficient", 1024),
    ("efficient", 4096),
    ("efficient", 8192),
    ("efficient", 16384),
]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure_one(implementation, mode, tokens, batch, heads, head_dim, min_run_time):
    """Runs in a child process: returns seconds and peak extra bytes of one forward+backward."""
    import torch
    from common import attention_fn, forward_backward, make_inputs, time_forward_backward

    torch.manual_seed(0)
    q, k, v = make_inputs(batch, heads, tokens, head_dim)
    fn = attention_fn(implementation, mode)
    grad_out = torch.randn_like(v)
    # A small call first, so that loading code (BLAS kernels, autograd threads) is not counted.
    forward_backward(
        fn, *make_inputs(batch, heads, 64, head_dim), torch.randn(batch, heads, 64, head_dim)
    )
    baseline = current_rss_bytes()
    forward_backward(fn, q, k, v, grad_out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time_forward_backward(fn, q, k, v, min_run_time=min_run_time)
    return {"seconds": seconds, "peak_extra_bytes": max(peak - baseline, 0)}


def run_case(implementation, mode, tokens, args):
    command = [
        sys.executable,
        __file__,
        "--child",
        json.dumps(
            [implementation, mode, tokens, args.batch, args.heads, args.head_dim, args.min_run_time]
        ),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument(
        "--min-run-time", type=float, default=2.0, help="seconds of timing per case"
    )
    parser.add_argument("--cases", default=None, help="e.g. direct:1024,efficient:8192")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(*json.loads(args.child))))
        return

    cases = DEFAULT_CASES
    if args.cases:
        cases = [(mode, int(n)) for mode, n in (c.split(":") for c in args.cases.split(","))]
    import torch

    print(
        f"CPU forward+backward, float32, B={args.batch}, H={args.heads}, d={args.head_dim}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    header = "| mode | N | ours ms | reference ms | speed-up | ours peak MiB | reference peak MiB | memory ratio |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows = []
    for mode, tokens in cases:
        ours = run_case("taylorshift", mode, tokens, args)
        ref = run_case("reference", mode, tokens, args)
        row = {
            "mode": mode,
            "N": tokens,
            "ours_ms": ours["seconds"] * 1e3,
            "reference_ms": ref["seconds"] * 1e3,
            "speedup": ref["seconds"] / ours["seconds"],
            "ours_peak_mib": ours["peak_extra_bytes"] / 2**20,
            "reference_peak_mib": ref["peak_extra_bytes"] / 2**20,
        }
        row["memory_ratio"] = row["reference_peak_mib"] / max(row["ours_peak_mib"], 1e-9)
        rows.append(row)
        print(
            f"| {mode} | {tokens} | {row['ours_ms']:.1f} | {row['reference_ms']:.1f} | "
            f"{row['speedup']:.2f}x | {row['ours_peak_mib']:.1f} | {row['reference_peak_mib']:.1f} | "
            f"{row['memory_ratio']:.1f}x |",
            flush=True,
        )
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
