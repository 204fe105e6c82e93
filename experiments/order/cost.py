"""Cost per Taylor order: time and peak memory of forward + backward, direct and efficient, vs N.

    python -m experiments.order.cost --out experiments/results/order

CPU, float32, one thread, B=1, H=8, d=32 (M = N, e = d), through taylorshift.taylor_shift_attention
with mode="direct" (orders 1-4) and mode="efficient" (orders 1-3, all it has on the CPU), and
torch's scaled_dot_product_attention (softmax) for scale. Time: the process's CPU time (one
thread: the work's own time, not time spent waiting for a core of the shared machine), the minimum
over --rounds interleaved rounds (benchmarks/common.interleaved_ms), since other jobs only ever
add time. Memory: the peak extra resident memory of one forward + backward over the
inputs (benchmarks/bench_cpu's VmHWM reset), one child process per method with glibc's mmap
threshold fixed (common.ALLOCATOR_ENV) so that freed tensors leave the peak. The measured
crossover per order (efficient first faster, log-interpolated between grid points) is set against
the cost model's taylorshift.crossover.
"""

import argparse
import csv
import functools
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # also when run as a child script

import torch
from bench_cpu import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from common import (
    ALLOCATOR_ENV,
    forward_backward,
    interleaved_ms,
    make_inputs,
    run_child,
)

import taylorshift
from experiments.order import study_parser
from experiments.order.plots import line_plot

HEADS, HEAD_DIM = 8, 32
TOKENS = (128, 256, 512, 1024, 2048, 4096, 8192)
DIRECT_ORDERS, EFFICIENT_ORDERS = (1, 2, 3, 4), (1, 2, 3)


def methods(tokens: int, direct_max: int) -> list[str]:
    names = ["sdpa"] + [f"efficient {k}" for k in EFFICIENT_ORDERS]
    if tokens <= direct_max:
        names += [f"direct {k}" for k in DIRECT_ORDERS]
    return names


def attention(method: str):
    if method == "sdpa":
        return torch.nn.functional.scaled_dot_product_attention
    mode, order = method.split()
    return functools.partial(taylorshift.taylor_shift_attention, mode=mode, order=int(order))


def peak_memory_child(payload: list) -> list[int]:
    """In a child process: the peak extra bytes of one forward + backward of payload's method at
    each N, after a small warm-up call so that loading code is not counted."""
    torch.set_num_threads(1)
    method, sizes = payload
    fn = attention(method)
    forward_backward(fn, *make_inputs(1, HEADS, 64, HEAD_DIM), torch.randn(1, HEADS, 64, HEAD_DIM))
    peaks = []
    for tokens in sizes:
        q, k, v = make_inputs(1, HEADS, tokens, HEAD_DIM)
        grad_out = torch.randn_like(v)
        baseline = current_rss_bytes()
        reset_peak_rss()
        forward_backward(fn, q, k, v, grad_out)
        peaks.append(max(peak_rss_bytes() - baseline, 0))
    return peaks


def measure(rounds: int, direct_max: int) -> list[dict]:
    rows = []
    for tokens in TOKENS:
        q, k, v = make_inputs(1, HEADS, tokens, HEAD_DIM)
        grad_out = torch.randn_like(v)
        runs = {
            method: functools.partial(forward_backward, attention(method), q, k, v, grad_out)
            for method in methods(tokens, direct_max)
        }
        for run in runs.values():  # warm-up
            run()
        for method, ms in interleaved_ms(runs, rounds, statistic="min", clock="cpu").items():
            rows.append({"method": method, "tokens": tokens, "ms": ms})
        print(
            f"N={tokens}: "
            + ", ".join(f"{r['method']} {r['ms']:.1f} ms" for r in rows[-len(runs) :]),
            flush=True,
        )
    script = str(Path(__file__).resolve())
    for method in sorted({row["method"] for row in rows}):
        sizes = [row["tokens"] for row in rows if row["method"] == method]
        peaks = run_child(script, "--memory-child", [method, sizes], env=ALLOCATOR_ENV)
        for row, peak in zip([r for r in rows if r["method"] == method], peaks, strict=True):
            row["peak_mib"] = peak / 2**20
    return rows


def measured_crossover(rows: list[dict], order: int) -> float | None:
    """The N at which efficient's time meets direct's, log-log interpolated between the first grid
    point where efficient is faster and the one before (that point itself if it is the grid's
    first); None if efficient is never faster on the grid."""
    ms = {(r["method"], r["tokens"]): r["ms"] for r in rows}
    shared = [n for n in TOKENS if (f"direct {order}", n) in ms]
    log_ratio = [math.log(ms[f"efficient {order}", n] / ms[f"direct {order}", n]) for n in shared]
    for index, (tokens, ratio) in enumerate(zip(shared, log_ratio, strict=True)):
        if ratio < 0:
            if index == 0:
                return float(tokens)
            before, after = log_ratio[index - 1], ratio
            fraction = before / (before - after)
            return math.exp(
                math.log(shared[index - 1]) + fraction * math.log(tokens / shared[index - 1])
            )
    return None


def write_summary(rows: list[dict], out: Path, rounds: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cost.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["method", "tokens", "ms", "peak_mib"])
        writer.writeheader()
        writer.writerows(rows)
    names = (
        ["sdpa"]
        + [f"direct {k}" for k in DIRECT_ORDERS]
        + [f"efficient {k}" for k in EFFICIENT_ORDERS]
    )
    value = {(r["method"], r["tokens"]): r for r in rows}

    def grid(key: str, digits: str) -> str:
        lines = ["| N | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for tokens in TOKENS:
            cells = [
                format(value[m, tokens][key], digits) if (m, tokens) in value else "—"
                for m in names
            ]
            lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    crossovers = [
        "| order | measured crossover N | cost model taylorshift.crossover(32, 'cpu', order=k) |",
        "|---|---|---|",
    ]
    for order in EFFICIENT_ORDERS:
        measured = measured_crossover(rows, order)
        if measured is None:
            cell = f"> {max(n for m, n in value if m == f'direct {order}')}"
        else:
            cell = f"≤ {TOKENS[0]}" if measured <= TOKENS[0] else f"{measured:.0f}"
        crossovers.append(
            f"| {order} | {cell} | {taylorshift.crossover(HEAD_DIM, 'cpu', order=order)} |"
        )
    setting = (
        f"CPU, float32, forward + backward, B=1, H={HEADS}, d={HEAD_DIM}, one thread, torch "
        f"{torch.__version__}; time: CPU time, the minimum of {rounds} interleaved rounds "
        "(shared machine)"
    )
    markdown = (
        f"{setting}\n\nms per forward + backward\n\n{grid('ms', '.2f')}\n\n"
        f"peak extra resident memory (MiB) of one forward + backward\n\n{grid('peak_mib', '.1f')}\n\n"
        f"crossover (efficient faster than direct above N)\n\n" + "\n".join(crossovers)
    )
    (out / "cost.md").write_text(markdown + "\n")
    for key, label, name in (
        ("ms", "ms per forward + backward", "time"),
        ("peak_mib", "peak extra MiB", "memory"),
    ):
        curves = {
            m: [(r["tokens"], r[key]) for r in rows if r["method"] == m and r[key] > 0]
            for m in names
        }
        line_plot(
            out / f"cost_{name}.png",
            curves,
            xlabel="tokens N",
            ylabel=label,
            title=f"Per order and algorithm: CPU fp32 forward + backward, B=1, H={HEADS}, "
            f"d={HEAD_DIM}, one thread",
        )
    return markdown


def parse_args(argv=None):
    parser = study_parser(__doc__, runs=False)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--direct-max", type=int, default=8192, help="largest N for direct mode")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(peak_memory_child(json.loads(args.memory_child))))
        return
    torch.set_num_threads(1)
    rows = measure(args.rounds, args.direct_max)
    (args.out).mkdir(parents=True, exist_ok=True)
    print(write_summary(rows, args.out, args.rounds))


if __name__ == "__main__":
    main()
