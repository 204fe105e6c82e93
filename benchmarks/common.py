"""Shared pieces of the benchmark scripts: inputs, timed forward+backward, FLOP totals, child runs."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.utils import benchmark

import taylorshift
from taylorshift import reference


def make_inputs(batch, heads, tokens, head_dim, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, heads, tokens, head_dim)
    return [
        torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_(True)
        for _ in range(3)
    ]


def attention_fn(implementation: str, mode: str):
    """forward function of an (implementation, mode) pair: ours or the paper's reference."""
    if implementation == "taylorshift":
        return lambda q, k, v: taylorshift.taylor_shift_attention(q, k, v, mode=mode)
    if implementation == "reference":
        return getattr(reference, mode)
    raise ValueError(f"unknown implementation {implementation!r}")


def forward_backward(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    out.backward(grad_out)
    q.grad = k.grad = v.grad = None


def time_forward_backward(fn, q, k, v, min_run_time=1.0) -> float:
    """Median seconds of one forward+backward (torch.utils.benchmark)."""
    grad_out = torch.randn_like(v)
    # Timer runs on one thread unless told otherwise: give it the threads torch would use.
    timer = benchmark.Timer(
        num_threads=torch.get_num_threads(),
        stmt="forward_backward(fn, q, k, v, grad_out)",
        globals={
            "forward_backward": forward_backward,
            "fn": fn,
            "q": q,
            "k": k,
            "v": v,
            "grad_out": grad_out,
        },
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_ms(runs: dict, rounds: int, statistic: str = "median", clock: str = "wall") -> dict:
    """Milliseconds of each callable in `runs`, timed in interleaved rounds (one call of each per
    round, the order rotated by one place each round), so that a change in machine load moves all
    of them alike; the median over rounds, or the minimum (statistic="min"), the better estimate
    when other jobs share the cores: they only ever add time. clock="cpu" counts the process's CPU time (all its threads) instead of wall
    time: on a machine whose cores are oversubscribed, time spent waiting for a core is not
    counted, so ratios between methods stay meaningful."""
    now = CLOCKS[clock]
    times = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(rounds):
        # Each round starts one callable later: a call pays for what the one before it left
        # behind (freed memory returned to the OS and faulted in again, evicted caches), so over
        # len(runs) rounds every callable takes every place once.
        offset = round_index % len(names)
        for name in names[offset:] + names[:offset]:
            run = runs[name]
            start = now()
            run()
            times[name].append((now() - start) * 1e3)
    pick = min if statistic == "min" else statistics.median
    return {name: pick(t) for name, t in times.items()}


def time_methods(methods: dict, names, q, k, v, grad_out, rounds, statistic, clock, warm_up=True):
    """Milliseconds of one forward + backward of each of `names` (keys of `methods`) on these
    inputs, in interleaved rounds with torch.mm (1024 x 1024 float32) among them, and that mm's
    GFLOP/s: the machine's own rate in the same rounds."""
    import functools

    mm_a, mm_b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    if warm_up:
        for name in names:
            forward_backward(methods[name], q, k, v, grad_out)
    runs = {"mm": functools.partial(torch.mm, mm_a, mm_b)}
    for name in names:
        runs[name] = functools.partial(forward_backward, methods[name], q, k, v, grad_out)
    ms = interleaved_ms(runs, rounds, statistic, clock)
    return ms, 2 * 1024**3 / (ms["mm"] * 1e-3) / 1e9


def flops(mode: str, batch, heads, tokens, head_dim, backward=True) -> float:
    """All heads' FLOPs at M = N, e = d: taylorshift.flops, the cost model's own counts."""
    return batch * heads * taylorshift.flops(mode, tokens, tokens, head_dim, backward=backward)


# glibc's malloc serves a large block from its heap once a block of that size has been freed
# (its mmap threshold adapts, up to 32 MiB) and keeps freed heap memory mapped: the peak RSS of a
# loop of forward + backward passes then counts memory the allocator holds on to, by chance of
# the allocation order. A fixed threshold of 128 KiB turns the adaptation off, so every tensor
# larger than that is mapped on allocation and unmapped when freed, and the peak RSS is the peak
# of the memory the tensors actually hold (plus whatever small blocks the heap keeps).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run_child(script: str, flag: str, payload: list, env: dict | None = None):
    """Runs `script` in a fresh interpreter with `flag` and the JSON `payload` (so its peak memory
    is its own), with `env` added to the environment, and returns the JSON value of its last
    output line."""
    command = [sys.executable, script, flag, json.dumps(payload)]
    environment = {**os.environ, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return json.loads(result.stdout.strip().splitlines()[-1])
