"""The Taylor-order study: approximation, accuracy and cost per order (experiments/README.md)."""

import argparse
from pathlib import Path


def study_parser(description: str, *, runs: bool = True) -> argparse.ArgumentParser:
    """The options every part of the study shares: where the training runs live (--runs) and
    where the tables and plots go (--out)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if runs:
        parser.add_argument("--runs", type=Path, default=Path("runs/order"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results/order"))
    return parser
