"""The CPU kernels on their own, against SDPA and torch.mm in the same process.

Times the algorithm operators directly (torch.ops.taylorshift.direct_forward / direct_backward,
efficient_forward / efficient_backward, on unit-norm q and k as the composite operator passes
them), so that what happens around them (normalisation, temperature, autograd) is left out; and,
for comparison, the whole taylor_shift_attention forward + backward of each mode. All methods run
in interleaved rounds (one call of each per round); the minimum over rounds is printed, with
ratios to SDPA's forward + backward and the efficient kernels' model rate (taylorshift.flops, 12 N F
(e + 1) per head, docs/math.md §4) over torch.mm's rate (1024 x 1024 float32) measured in the same rounds.

    python benchmarks/bench_cpu_kernels.py --tokens 512,1024,1536 --clock cpu --threads 1

--clock cpu counts the process's CPU time (common.interleaved_ms): use it with --threads 1 on a
machine whose cores are shared, where wall times measure the wait for a core.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import flops, forward_backward, interleaved_ms, make_inputs

import taylorshift

# output_scale, coefficients: the defaults of taylor_shift_attention.
SCALARS = (True, [0.5, 1.0, 1.0])


def kernel_runs(q, k, v, grad_out):
    """The four operators on unit-norm q and k, each a callable without arguments."""
    ops = torch.ops.taylorshift
    q_hat = q.detach() / q.detach().norm(dim=-1, keepdim=True)
    k_hat = k.detach() / k.detach().norm(dim=-1, keepdim=True)
    v = v.detach()
    out, den = ops.direct_forward(q_hat, k_hat, v, None, None, False, *SCALARS)
    e_out, e_den, state = ops.efficient_forward(q_hat, k_hat, v, None, *SCALARS)
    return {
        "direct_fwd": lambda: ops.direct_forward(q_hat, k_hat, v, None, None, False, *SCALARS),
        "direct_bwd": lambda: ops.direct_backward(
            grad_out, q_hat, k_hat, v, out, den, None, None, False, *SCALARS
        ),
        "efficient_fwd": lambda: ops.efficient_forward(q_hat, k_hat, v, None, *SCALARS),
        "efficient_bwd": lambda: ops.efficient_backward(
            grad_out, q_hat, k_hat, v, e_out, e_den, state, None, *SCALARS
        ),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head-dims", default="32,64")
    parser.add_argument("--tokens", default="512,1024,1536")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--methods",
        default="sdpa,direct_fwd,direct_bwd,direct,auto",
        help="of sdpa, direct_fwd, direct_bwd, efficient_fwd, efficient_bwd, direct, efficient, "
        "auto (the last three: the whole taylor_shift_attention)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mm_a, mm_b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    print(
        f"float32, forward + backward, B=1, H={args.heads}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, min of {args.rounds} interleaved rounds "
        f"(half as many for N > 4096), {args.clock} clock\n"
    )
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for tokens in (int(n) for n in args.tokens.split(",")):
            q, k, v = make_inputs(1, args.heads, tokens, head_dim)
            grad_out = torch.randn_like(v)
            runs = {"mm": functools.partial(torch.mm, mm_a, mm_b)}
            runs["sdpa"] = functools.partial(
                forward_backward, F.scaled_dot_product_attention, q, k, v, grad_out
            )
            runs.update(kernel_runs(q, k, v, grad_out))
            for mode in ("direct", "efficient", "auto"):
                attention = functools.partial(taylorshift.taylor_shift_attention, mode=mode)
                runs[mode] = functools.partial(forward_backward, attention, q, k, v, grad_out)
            names = ["mm"] + args.methods.split(",")
            runs = {name: runs[name] for name in names}
            for run in runs.values():  # warm-up
                run()
            rounds = args.rounds if tokens <= 4096 else max(2, args.rounds // 2)
            ms = interleaved_ms(runs, rounds, "min", args.clock)
            cells = [f"d={head_dim} N={tokens}"]
            for name in names[1:]:
                cell = f"{name}={ms[name]:.2f}ms"
                if "sdpa" in ms and name != "sdpa":
                    cell += f" ({ms[name] / ms['sdpa']:.2f}x SDPA)"
                cells.append(cell)
            if {"direct_fwd", "direct_bwd", "sdpa"} <= ms.keys():
                kernels = ms["direct_fwd"] + ms["direct_bwd"]
                cells.append(f"direct kernels / SDPA = {kernels / ms['sdpa']:.2f}")
            if {"efficient_fwd", "efficient_bwd"} <= ms.keys():
                work = flops("efficient", 1, args.heads, tokens, head_dim)
                rate = work / ((ms["efficient_fwd"] + ms["efficient_bwd"]) * 1e-3)
                mm_rate = 2 * 1024**3 / (ms["mm"] * 1e-3)
                cells.append(f"mm {mm_rate / 1e9:.0f} GF/s")
                cells.append(f"efficient kernels / mm rate = {rate / mm_rate:.2f}")
            print(" ".join(cells), flush=True)


if __name__ == "__main__":
    main()
