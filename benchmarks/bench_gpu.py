"""GPU speed and peak memory of taylorshift (direct, efficient) against SDPA (flash backend) and the
paper's formulation (taylorshift.reference.efficient under bf16 autocast).

B=4, H=8, bf16, N from 256 to 131072, d in {32, 64}, forward and forward+backward. Milliseconds are
the median of CUDA-event-timed calls; TFLOP/s use docs/math.md §4 counts (benchmarks/common.flops, SDPA
counted as the direct algorithm); peak memory is torch.cuda.max_memory_allocated above the inputs.
A series stops growing N once one call would exceed --max-call-s (quadratic methods at large N),
and the reference is skipped where its N x d^2 features would pass --reference-limit-gb; the table
says which. Writes CSV and markdown (with GPU name, torch and CUDA versions, date).

    python benchmarks/bench_gpu.py --out benchmarks/results

--causal times causal attention instead: taylorshift's causal direct and causal efficient
(csrc/cuda/causal.cu) against SDPA's flash backend with is_causal=True (the paper's reference has
no causal form). Causal direct and SDPA are counted at half the direct algorithm's FLOPs (the lower
triangle), causal efficient at the efficient algorithm's (its chunks' triangles left out).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import flops

import taylorshift
from taylorshift import reference

IMPLEMENTATIONS = ("direct", "efficient", "sdpa", "reference")
PASSES = ("fwd", "fwd+bwd")


def implementations(causal):
    """In the order run() measures them: the issue's targets first, the paper's reference last."""
    return (
        ("efficient", "sdpa", "direct") if causal else ("efficient", "sdpa", "direct", "reference")
    )


def attention(implementation, causal=False):
    if implementation in ("direct", "efficient"):
        return lambda q, k, v: taylorshift.taylor_shift_attention(
            q, k, v, causal=causal, mode=implementation
        )
    if implementation == "sdpa":

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa

    def paper(q, k, v):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return reference.efficient(q, k, v)

    return paper


def reference_bytes(batch, heads, tokens, head_dim):
    """The reference's largest live tensors: k(x)k and q(x)q (B, H, N, d^2) in bf16, about four
    of them alive at once through the backward (features, their gradients)."""
    return 4 * batch * heads * tokens * head_dim * head_dim * 2


def time_calls(fn, warmup=1, min_total_s=0.3, max_reps=20):
    """Median milliseconds of fn() over CUDA-event-timed repetitions."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    while len(times) < max_reps and (len(times) < 3 or sum(times) < min_total_s * 1e3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(implementation, pass_, batch, heads, tokens, head_dim, causal=False):
    """(ms, peak extra bytes) of one call, or raises torch.cuda.OutOfMemoryError."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, heads, tokens, head_dim)
    q, k, v = (
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(
            pass_ == "fwd+bwd"
        )
        for _ in range(3)
    )
    grad_out = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    fn = attention(implementation, causal)

    def call():
        if pass_ == "fwd":
            with torch.no_grad():
                fn(q, k, v)
        else:
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), grad_out)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = time_calls(call)
    return ms, peak


def run(args):
    rows = []
    deadline = time.monotonic() + args.budget_s
    # The targets first (efficient and SDPA, d = 64, forward+backward), so that a short
    # --budget-s still measures them; the paper's reference last.
    for implementation in implementations(args.causal):
        for head_dim in sorted(args.head_dims, reverse=True):
            for pass_ in reversed(PASSES):
                last_ms = None
                for tokens in args.tokens:
                    row = {
                        "impl": implementation,
                        "pass_": pass_,
                        "d": head_dim,
                        "N": tokens,
                        "ms": math.nan,
                        "tflops": math.nan,
                        "peak_gb": math.nan,
                        "note": "",
                    }
                    rows.append(row)
                    # Predicted time of this call from the last one (quadratic methods grow 4x).
                    growth = 4 if implementation in ("direct", "sdpa") else 2
                    if (
                        implementation == "reference"
                        and reference_bytes(args.batch, args.heads, tokens, head_dim)
                        > args.reference_limit_gb * 1e9
                    ):
                        row["note"] = f"skipped: memory > {args.reference_limit_gb:g} GB"
                        continue
                    if last_ms is not None and last_ms * growth > args.max_call_s * 1e3:
                        row["note"] = f"skipped: one call > {args.max_call_s:g} s"
                        continue
                    if time.monotonic() > deadline:
                        row["note"] = "skipped: time budget"
                        continue
                    try:
                        ms, peak = measure(
                            implementation,
                            pass_,
                            args.batch,
                            args.heads,
                            tokens,
                            head_dim,
                            args.causal,
                        )
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = "out of memory"
                        torch.cuda.empty_cache()
                        continue
                    mode = "efficient" if implementation in ("efficient", "reference") else "direct"
                    work = flops(
                        mode, args.batch, args.heads, tokens, head_dim, backward=pass_ == "fwd+bwd"
                    )
                    if args.causal and mode == "direct":
                        work /= 2
                    row.update(ms=ms, tflops=work / (ms * 1e-3) / 1e12, peak_gb=peak / 1e9)
                    last_ms = ms
                    print(
                        f"d={head_dim:3d} {implementation:9s} {pass_:7s} N={tokens:6d} "
                        f"{ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s {row['peak_gb']:7.3f} GB",
                        flush=True,
                    )
                    torch.cuda.empty_cache()
    return rows


def lookup(rows, impl, pass_, d, n):
    for row in rows:
        if (row["impl"], row["pass_"], row["d"], row["N"]) == (impl, pass_, d, n):
            return row
    return None


def causal_summary(rows):
    """Causal efficient against SDPA's causal flash attention, fwd+bwd, at every measured length."""
    lines = []
    for row in rows:
        if row["impl"] != "efficient" or row["pass_"] != "fwd+bwd" or math.isnan(row["ms"]):
            continue
        sdpa = lookup(rows, "sdpa", "fwd+bwd", row["d"], row["N"])
        if sdpa and not math.isnan(sdpa["ms"]):
            lines.append(
                f"causal efficient / SDPA causal fwd+bwd d={row['d']} N={row['N']}: "
                f"{row['ms'] / sdpa['ms']:.2f}x the time"
            )
    return lines


def summary(rows):
    """The issue's targets, read off the table."""
    lines = []
    row = lookup(rows, "efficient", "fwd+bwd", 64, 65536)
    if row:
        lines.append(f"efficient fwd+bwd d=64 N=65536: {row['tflops']:.1f} TFLOP/s (target >= 300)")
    for d, target in ((32, 1024), (64, 3000)):
        # The smallest N from which on the efficient kernel stays faster than SDPA.
        cross = None
        for n in sorted({r["N"] for r in rows if r["d"] == d}, reverse=True):
            ours, sdpa = (
                lookup(rows, "efficient", "fwd+bwd", d, n),
                lookup(rows, "sdpa", "fwd+bwd", d, n),
            )
            if not (ours and sdpa and ours["ms"] < sdpa["ms"]):
                break
            cross = n
        lines.append(f"crossover efficient vs SDPA fwd+bwd d={d}: N = {cross} (target <= {target})")
    ours, ref = (
        lookup(rows, "efficient", "fwd+bwd", 32, 16384),
        lookup(rows, "reference", "fwd+bwd", 32, 16384),
    )
    if ours and ref:
        lines.append(
            f"vs reference d=32 N=16384 fwd+bwd: {ref['ms'] / ours['ms']:.1f}x faster, "
            f"{ref['peak_gb'] / max(ours['peak_gb'], 1e-12):.1f}x less memory (target >= 10x, 10x)"
        )
    ours, sdpa = (
        lookup(rows, "direct", "fwd+bwd", 64, 1024),
        lookup(rows, "sdpa", "fwd+bwd", 64, 1024),
    )
    if ours and sdpa:
        lines.append(
            f"direct / SDPA fwd+bwd d=64 N=1024: {ours['ms'] / sdpa['ms']:.2f}x (target <= 1.3)"
        )
    for d in (32, 64):
        big, half = (
            lookup(rows, "efficient", "fwd+bwd", d, 131072),
            lookup(rows, "efficient", "fwd+bwd", d, 65536),
        )
        if big and half:
            lines.append(
                f"efficient time(131072)/time(65536) d={d}: {big['ms'] / half['ms']:.2f} (target 1.9-2.1)"
            )
    return lines


def write(rows, out_dir: Path, args):
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    kind = "gpu_causal" if args.causal else "gpu"
    name = f"{kind}_{props.name.replace(' ', '_')}_{stamp:%Y%m%d_%H%M}"
    header = [
        (
            f"GPU: {props.name} (sm_{props.major}{props.minor}, "
            f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        ),
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, date {stamp:%Y-%m-%d %H:%M} UTC",
        (
            f"B={args.batch}, H={args.heads}, bf16{', causal' if args.causal else ''}; ms = "
            "median of CUDA-event-timed calls; TFLOP/s by docs/math.md §4 counts (SDPA counted "
            f"as direct{', causal ones at half' if args.causal else ''}); peak = "
            "max_memory_allocated above the inputs."
        ),
    ]
    measured = [impl for impl in IMPLEMENTATIONS if impl in implementations(args.causal)]
    fields = ["impl", "pass_", "d", "N", "ms", "tflops", "peak_gb", "note"]
    with open(out_dir / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# taylorshift GPU benchmark\n", *[f"{h}  " for h in header], ""]
    lines += ["| d | pass | N | " + " | ".join(measured) + " |"]
    lines += ["|---|---|---|" + "---|" * len(measured)]
    for d in args.head_dims:
        for pass_ in PASSES:
            for n in args.tokens:
                cells = []
                for impl in measured:
                    row = lookup(rows, impl, pass_, d, n)
                    if row is None or math.isnan(row["ms"]):
                        cells.append(row["note"] if row else "-")
                    else:
                        cells.append(
                            f"{row['ms']:.2f} ms, {row['tflops']:.0f} TF/s, {row['peak_gb']:.2f} GB"
                        )
                lines.append(f"| {d} | {pass_} | {n} | " + " | ".join(cells) + " |")
    if args.causal:
        lines += [
            "",
            "## Causal efficient against SDPA",
            "",
            *[f"- {s}" for s in causal_summary(rows)],
        ]
    else:
        lines += ["", "## Targets (issue 3)", "", *[f"- {s}" for s in summary(rows)]]
    text = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    return text


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[256 << i for i in range(10)],  # 256 .. 131072
    )
    parser.add_argument("--max-call-s", type=float, default=1.5)
    parser.add_argument("--reference-limit-gb", type=float, default=100.0)
    parser.add_argument("--budget-s", type=float, default=180.0, help="stop measuring after this")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--causal", action="store_true", help="causal attention (see above)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    rows = run(args)
    print(write(rows, args.out, args))


if __name__ == "__main__":
    main()
