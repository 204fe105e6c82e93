"""Causal attention on the CPU: forward + backward of TaylorShift's causal direct and causal
efficient (linear in N, csrc/cpu/causal.cpp) forms and of mode="auto", against
F.scaled_dot_product_attention(is_causal=True). float32, B=1, H=8, e = d, timed in one process,
interleaved rounds (common.interleaved_ms), with torch.mm's rate (1024 x 1024) in the same rounds.

    python benchmarks/bench_causal.py

Prints a markdown table per head dim: ms per forward + backward of each method, direct / efficient
(how many times faster the linear form is), t(N) / t(N / 2) of the efficient form (2 for linear
time), and mode="auto" against the faster of the two.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOKENS = "256,512,1024,2048,4096,8192,16384,32768"
# Causal direct is O(N^2 d): past this N one forward + backward takes tens of seconds.
DIRECT_MAX_TOKENS = 16384


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default=TOKENS)
    parser.add_argument("--head-dims", default="32,64")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6, help="rounds up to N = 4096, half past")
    parser.add_argument("--statistic", choices=["median", "min"], default="min")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from common import make_inputs, time_methods

    import taylorshift

    methods = {"sdpa": functools.partial(F.scaled_dot_product_attention, is_causal=True)}
    for mode in ("direct", "efficient", "auto"):
        methods[mode] = functools.partial(
            taylorshift.taylor_shift_attention, causal=True, mode=mode
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"B={args.batch}, H={args.heads}, e = d, {args.statistic} of interleaved rounds "
        f"({args.clock} clock)\n"
    )
    header = (
        "| d | N | SDPA ms | direct ms | efficient ms | auto ms | direct / efficient | "
        "efficient t(N) / t(N/2) | auto / best | efficient / SDPA | mm GF/s |"
    )
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        previous = (0, None)
        for tokens in (int(n) for n in args.tokens.split(",")):
            q, k, v = make_inputs(args.batch, args.heads, tokens, head_dim)
            grad_out = torch.randn_like(v)
            names = [m for m in methods if m != "direct" or tokens <= DIRECT_MAX_TOKENS]
            rounds = args.rounds if tokens <= 4096 else max(2, args.rounds // 2)
            ms, mm_rate = time_methods(
                methods, names, q, k, v, grad_out, rounds, args.statistic, args.clock
            )
            direct = ms.get("direct")
            best = min(ms["efficient"], direct) if direct else ms["efficient"]
            cells = [
                head_dim,
                tokens,
                f"{ms['sdpa']:.1f}",
                f"{direct:.1f}" if direct else "-",
                f"{ms['efficient']:.1f}",
                f"{ms['auto']:.1f}",
                f"{direct / ms['efficient']:.2f}" if direct else "-",
                f"{ms['efficient'] / previous[1]:.2f}" if tokens == 2 * previous[0] else "-",
                f"{ms['auto'] / best:.2f}",
                f"{ms['efficient'] / ms['sdpa']:.2f}",
                f"{mm_rate:.0f}",
            ]
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
            previous = (tokens, ms["efficient"])
        print()


if __name__ == "__main__":
    main()
