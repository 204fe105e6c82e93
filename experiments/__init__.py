"""Experiments built on taylorshift (Long Range Arena style benchmarks)."""
