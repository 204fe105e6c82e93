"""The study's matplotlib figures (Agg backend: files only)."""

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def bar_plot(path: Path, labels, samples, ylabel: str, title: str) -> None:
    """One bar per label at the mean of its samples, with the standard deviation and each sample."""
    figure, axes = plt.subplots(figsize=(6, 4))
    means = [statistics.mean(values) for values in samples]
    spreads = [statistics.stdev(values) if len(values) > 1 else 0.0 for values in samples]
    axes.bar(labels, means, yerr=spreads, capsize=4, color="tab:blue", alpha=0.6)
    for index, values in enumerate(samples):
        axes.plot([index] * len(values), values, "k.", markersize=5)
    lowest = min(min(values) for values in samples)
    highest = max(max(values) for values in samples)
    margin = max(1.0, 0.2 * (highest - lowest))  # bars from 0 would hide differences of a point
    axes.set_ylim(lowest - margin, highest + margin)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def line_plot(path: Path, curves: dict, xlabel: str, ylabel: str, title: str, log_y=True) -> None:
    """One line per name in `curves`, each a list of (x, y) points; log-log axes by default."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
    axes.set_xscale("log")
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
