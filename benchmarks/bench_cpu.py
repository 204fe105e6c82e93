"""CPU speed and peak memory of taylorshift against the paper's formulation (taylorshift.reference),
and against what a CPU user would pick instead, torch's scaled_dot_product_attention.

Default: float32, forward + backward, B=1, H=8, d=32. Each case runs in its own process so that
its peak extra resident memory (max RSS during the run minus RSS with the inputs allocated) is its
own. Prints a markdown table; --csv writes the rows.

    python benchmarks/bench_cpu.py --csv benchmarks/results/cpu.csv

--sdpa: SDPA, direct, efficient and auto side by side (d = 32, 64; N = 256 .. 16384), timed in one
process, interleaved (one forward + backward of each method per round, the median over rounds), with
the model GFLOP/s of each run and torch.mm's rate (1024 x 1024 float32) measured in the same rounds;
then the extra peak memory of a training loop (one warm-up and three forward + backward iterations,
N = 16384, d = 32), ours against the reference, each in its own process, both with glibc's mmap
threshold fixed (common.ALLOCATOR_ENV) so that the peak counts the memory the tensors hold, not
what the allocator kept from freed ones.

    python benchmarks/bench_cpu.py --sdpa --csv benchmarks/results/cpu_sdpa.csv

--copies: the copies (aten::copy_ calls and bytes) made inside the algorithm operators when they
are given the (B, H, L, d) views TaylorShiftAttention makes of its (B, L, H, d) projections,
forward + backward of each mode, from torch.profiler.

    python benchmarks/bench_cpu.py --copies
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import resource
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


def reset_peak_rss() -> None:
    """Sets the process's peak resident memory (VmHWM) to its current resident memory (Linux
    clear_refs 5), so that the peak read afterwards belongs to what runs after this call, not to
    imports or set-up before it."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


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
    reset_peak_rss()
    forward_backward(fn, q, k, v, grad_out)
    peak = peak_rss_bytes()
    seconds = time_forward_backward(fn, q, k, v, min_run_time=min_run_time)
    return {"seconds": seconds, "peak_extra_bytes": max(peak - baseline, 0)}


SDPA_TOKENS = (256, 512, 1024, 1536, 2048, 4096, 8192, 16384)
# Past this N the direct kernel costs about as much as SDPA (both O(N^2 d)) and auto never picks
# it; its runs would add minutes to each round.
DIRECT_MAX_TOKENS = 4096


def compare_with_sdpa(args):
    """The comparison table: ms per forward + backward and model GFLOP/s, interleaved rounds."""
    import torch
    import torch.nn.functional as F
    from common import flops, make_inputs, time_methods

    import taylorshift

    methods = {"sdpa": F.scaled_dot_product_attention}
    for mode in ("direct", "efficient", "auto"):
        methods[mode] = functools.partial(taylorshift.taylor_shift_attention, mode=mode)
    header = (
        "| d | N | SDPA ms | direct ms | efficient ms | auto ms | best / SDPA | auto / best | "
        "SDPA GF/s | direct GF/s | efficient GF/s | mm GF/s | efficient / mm |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows = []
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for tokens in (int(n) for n in args.tokens.split(",")):
            q, k, v = make_inputs(args.batch, args.heads, tokens, head_dim)
            grad_out = torch.randn_like(v)
            names = [m for m in methods if m != "direct" or tokens <= DIRECT_MAX_TOKENS]
            rounds = args.rounds if tokens <= 4096 else max(1, args.rounds // 2)
            # The long runs are their own warm-up.
            ms, mm_rate = time_methods(
                methods, names, q, k, v, grad_out, rounds, args.statistic, args.clock,
                warm_up=tokens <= 4096,
            )  # fmt: skip

            work = {
                name: flops(
                    "efficient" if name == "efficient" else "direct",
                    args.batch,
                    args.heads,
                    tokens,
                    head_dim,
                )
                for name in names
            }
            rate = {name: work[name] / (ms[name] * 1e-3) / 1e9 for name in names}
            best = min(ms[m] for m in ("direct", "efficient") if m in ms)
            row = {
                "d": head_dim,
                "N": tokens,
                "sdpa_ms": ms["sdpa"],
                "direct_ms": ms.get("direct", float("nan")),
                "efficient_ms": ms["efficient"],
                "auto_ms": ms["auto"],
                "best_over_sdpa": best / ms["sdpa"],
                "auto_over_best": ms["auto"] / best,
                "sdpa_gflops": rate["sdpa"],
                "direct_gflops": rate.get("direct", float("nan")),
                "efficient_gflops": rate["efficient"],
                "mm_gflops": mm_rate,
                "efficient_over_mm": rate["efficient"] / mm_rate,
            }
            rows.append(row)
            cells = [
                f"{row['d']}",
                f"{row['N']}",
                *(
                    "–" if row[key] != row[key] else f"{row[key]:.1f}"
                    for key in ("sdpa_ms", "direct_ms", "efficient_ms", "auto_ms")
                ),
                f"{row['best_over_sdpa']:.2f}",
                f"{row['auto_over_best']:.2f}",
                *(
                    "–" if row[key] != row[key] else f"{row[key]:.1f}"
                    for key in ("sdpa_gflops", "direct_gflops", "efficient_gflops", "mm_gflops")
                ),
                f"{row['efficient_over_mm']:.2f}",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
    return rows


def copies_inside_operators(args, tokens=4096, head_dim=32):
    """Table of aten::copy_ calls (and bytes) whose caller is a taylorshift:: operator."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import taylorshift

    print(
        f"(B, L, H, d) = ({args.batch}, {tokens}, {args.heads}, {head_dim}) float32 tensors, "
        "passed as .transpose(1, 2) views, forward + backward\n"
    )
    print("| mode | operator | copies | MiB copied |")
    print("|---|---|---|---|")
    for mode in ("direct", "efficient"):
        q, k, v = (
            torch.randn(args.batch, tokens, args.heads, head_dim, requires_grad=True)
            for _ in range(3)
        )
        # The gradient arrives as the module's out.transpose(1, 2).flatten(2) passes it back.
        grad_out = torch.randn(args.batch, tokens, args.heads, head_dim).transpose(1, 2)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = taylorshift.taylor_shift_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mode=mode
            )
            out.backward(grad_out)
        copies = {}
        for event in prof.events():
            if event.name != "aten::copy_":
                continue
            caller = event.cpu_parent
            while caller is not None and not caller.name.startswith("taylorshift::"):
                caller = caller.cpu_parent
            if caller is None or caller.name == "taylorshift::attention":
                continue
            count, size = copies.get(caller.name, (0, 0))
            elements = 1
            for extent in event.input_shapes[0]:
                elements *= extent
            copies[caller.name] = (count + 1, size + elements * 4)
        for operator in (f"taylorshift::{mode}_forward", f"taylorshift::{mode}_backward"):
            count, size = copies.get(operator, (0, 0))
            print(f"| {mode} | {operator} | {count} | {size / 2**20:.1f} |")


def training_loop_peak(implementation, mode, tokens, batch, heads, head_dim):
    """Runs in a child process: peak extra bytes of one warm-up and three forward + backward."""
    import torch
    from common import attention_fn, forward_backward, make_inputs

    q, k, v = make_inputs(batch, heads, tokens, head_dim)
    grad_out = torch.randn_like(v)
    fn = attention_fn(implementation, mode)
    baseline = current_rss_bytes()
    reset_peak_rss()
    for _ in range(4):
        forward_backward(fn, q, k, v, grad_out)
    return {"peak_extra_bytes": max(peak_rss_bytes() - baseline, 0)}


def run_training_loop(implementation, mode, args, tokens=16384, head_dim=32):
    from common import ALLOCATOR_ENV, run_child

    payload = [implementation, mode, tokens, args.batch, args.heads, head_dim]
    peak = run_child(__file__, "--child-training", payload, env=ALLOCATOR_ENV)
    return peak["peak_extra_bytes"] / 2**20


def run_case(implementation, mode, tokens, args):
    from common import run_child

    payload = [implementation, mode, tokens, args.batch, args.heads, args.head_dim]
    return run_child(__file__, "--child", payload + [args.min_run_time])


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
    parser.add_argument("--sdpa", action="store_true", help="the comparison with SDPA")
    parser.add_argument("--rounds", type=int, default=5, help="--sdpa: interleaved rounds")
    parser.add_argument(
        "--statistic", choices=("median", "min"), default="median", help="over --rounds"
    )
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="--sdpa: see common.interleaved_ms"
    )
    parser.add_argument("--head-dims", default="32,64", help="--sdpa: head dims")
    parser.add_argument(
        "--tokens",
        default=",".join(str(n) for n in SDPA_TOKENS),
        help="--sdpa: sequence lengths N = M",
    )
    parser.add_argument("--copies", action="store_true", help="copies inside the operators")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-training", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(*json.loads(args.child))))
        return
    if args.child_training:
        print(json.dumps(training_loop_peak(*json.loads(args.child_training))))
        return
    if args.copies:
        copies_inside_operators(args)
        return
    if args.sdpa:
        import torch

        print(
            f"CPU forward+backward, float32, B={args.batch}, H={args.heads}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} "
            f"interleaved rounds (half as many for N > 4096), {args.statistic} over rounds, "
            f"{args.clock} clock\n"
        )
        from common import ALLOCATOR_ENV

        rows = compare_with_sdpa(args)
        ours = run_training_loop("taylorshift", "auto", args)
        reference = run_training_loop("reference", "efficient", args)
        print(
            "\nTraining loop (warm-up + 3 forward+backward), N=16384, d=32, "
            f"{' '.join(f'{k}={v}' for k, v in ALLOCATOR_ENV.items())}: extra peak "
            f"{ours:.1f} MiB (auto) vs {reference:.1f} MiB (reference efficient): "
            f"{ours / reference:.3f} of the reference's"
        )
        if args.csv:
            write_csv(args.csv, rows)
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
        write_csv(args.csv, rows)


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
