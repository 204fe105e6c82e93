"""Metrics as CSV (always) and TensorBoard (when the tensorboard package is installed)."""

import csv
from pathlib import Path

FIELDS = ["step", "split", "loss", "accuracy", "lr", "elapsed_s"]


class MetricsLog:
    def __init__(self, out_dir: Path, resume_step: int | None = None):
        self.path = Path(out_dir) / "metrics.csv"
        rows = []
        if resume_step is not None and self.path.is_file():
            # Rows written after the checkpoint we resume from would be duplicated by the rerun.
            with self.path.open(newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.tensorboard = _tensorboard_writer(
            Path(out_dir) / "tensorboard", purge_step=resume_step
        )

    def log(self, step: int, split: str, **values) -> None:
        row = {
            "step": step,
            "split": split,
            **{key: _format(value) for key, value in values.items()},
        }
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writerow(row)
        if self.tensorboard is not None:
            for key, value in values.items():
                if key != "elapsed_s":
                    self.tensorboard.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _format(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _tensorboard_writer(directory: Path, purge_step):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory), purge_step=None if purge_step is None else purge_step + 1)
