"""Decoding time per token against context length: taylorshift.CausalState (one step of one
token after a real prefill of the context) against softmax attention with a KV cache (one query
against the cached keys and values, F.scaled_dot_product_attention), on the CPU.

Attention only, as one layer of a generating model runs it: the projections and the rest of the
model are the same for both and left out. Both run under torch.no_grad.

- TaylorShift: the context is prefilled for real, by steps of --prefill-step tokens through
  CausalState.step (the chunked causal form on top of the state), growing from one context of the
  table to the next; at each context one more token is stepped, and the timed call restores the
  state first (rebinding the saved tensors, no copy), so that every timed step sees that context.
- SDPA + KV cache: a preallocated (static) cache of keys and values holding the context (random:
  the contents do not change the time); one step writes the new token's key and value into the
  next slot and attends its query over the context plus itself (no mask is needed for the last
  position). The cache is allocated per context and freed after it.

Both are timed in interleaved rounds (benchmarks/common.py interleaved_ms, median over rounds);
each timed call runs enough steps to last about 20 ms, and the time is divided by them. By
default on one thread and by the process's CPU time (--clock cpu), which leaves out the time
spent waiting for a core on a shared machine (and counts the kernel's time faulting in memory).

    PYTHONPATH=. nice -n 19 python benchmarks/bench_decoding.py
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLOCKS, interleaved_ms

from taylorshift import CausalState

CONTEXTS = [256, 1024, 4096, 16384, 65536, 262144, 1048576]


def calibrated(step, clock, target_ms: float = 20.0):
    """A callable running `step` n times, n such that it lasts about target_ms, and n."""
    step()
    start = clock()
    for _ in range(3):
        step()
    once = max((clock() - start) * 1e3 / 3, 1e-3)
    repeats = max(1, round(target_ms / once))

    def run():
        for _ in range(repeats):
            step()

    return run, repeats


def time_context(state: CausalState, token: list, context: int, rounds: int, clock: str) -> tuple:
    """ms per token of one TaylorShift step after `state` (holding `context` tokens) and of one
    SDPA step against a static KV cache of `context` tokens, and the cache's bytes."""
    heads, dim = state.heads, state.head_dim
    saved = (state.state, state.valid_keys, state.tokens)

    def taylorshift_step():
        state.state, state.valid_keys, state._tokens = saved
        state.step(*token)

    cache_k = torch.randn(1, heads, context + 1, dim)
    cache_v = torch.randn(1, heads, context + 1, dim)

    def sdpa_step():
        q, k, v = token
        cache_k[:, :, context : context + 1] = k
        cache_v[:, :, context : context + 1] = v
        F.scaled_dot_product_attention(q, cache_k, cache_v)

    with torch.no_grad():
        ours, ours_n = calibrated(taylorshift_step, CLOCKS[clock])
        sdpa, sdpa_n = calibrated(sdpa_step, CLOCKS[clock])
        ms = interleaved_ms({"taylorshift": ours, "sdpa": sdpa}, rounds, clock=clock)
    state.state, state.valid_keys, state._tokens = saved
    return ms["taylorshift"] / ours_n, ms["sdpa"] / sdpa_n, 2 * cache_k.numel() * 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32, help="d = e")
    parser.add_argument("--prefill-step", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: the process's CPU time, which leaves out waiting for a core on a shared machine",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads, dim = args.heads, args.head_dim
    state = CausalState(1, heads, dim, dim)

    # The prompt: one block of random q, k, v stepped again and again (the values do not
    # change the time), and the token every timed step decodes.
    block = [torch.randn(1, heads, args.prefill_step, dim) for _ in range(3)]
    token = [torch.randn(1, heads, 1, dim) for _ in range(3)]
    rows, prefill_s = [], 0.0
    for context in sorted(args.contexts):
        # Real prefill from the previous context to this one.
        with torch.no_grad():
            start = CLOCKS[args.clock]()
            while state.tokens < context:
                count = min(args.prefill_step, context - state.tokens)
                state.step(*(x[:, :, :count] for x in block))
            prefill_s += CLOCKS[args.clock]() - start
        ours, sdpa, kv_bytes = time_context(state, token, context, args.rounds, args.clock)
        gc.collect()
        rows.append((context, prefill_s, ours, sdpa, state.memory_bytes, kv_bytes))
        print(f"context {context}: done", flush=True)

    print(
        f"\nDecoding one token, attention only: B = 1, H = {heads}, d = e = {dim}, float32, CPU, "
        f"{torch.get_num_threads()} thread(s), {args.clock} clock; median of {args.rounds} "
        "interleaved rounds. "
        f"TaylorShift order 2 (F = {state.feature_count} features); prefill: cumulative seconds "
        f"({args.clock} clock) of the real prefill up to that context (steps of "
        f"{args.prefill_step} tokens).\n"
    )
    print(
        "| context | TaylorShift prefill s | TaylorShift ms/token | SDPA + KV cache ms/token | "
        "SDPA / TaylorShift | TaylorShift state MiB | KV cache MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for context, prefill, ours, sdpa, state_bytes, kv_bytes in rows:
        print(
            f"| {context} | {prefill:.1f} | {ours:.3f} | {sdpa:.3f} | {sdpa / ours:.2f} | "
            f"{state_bytes / 2**20:.2f} | {kv_bytes / 2**20:.1f} |"
        )
    by_context = {row[0]: row[2] for row in rows}
    if 256 in by_context and 65536 in by_context:
        print(
            f"\nTaylorShift ms/token at 65536 / at 256: {by_context[65536] / by_context[256]:.2f} "
            "(issue 11's target: at most 1.5)"
        )


if __name__ == "__main__":
    main()
