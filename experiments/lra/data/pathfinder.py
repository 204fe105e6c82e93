"""Pathfinder-32 from LRA's layout.

pathfinder32/<difficulty>/{imgs/<batch>/sample_<n>.png, metadata/<batch>.npy}. Metadata files are
plain text rows in the LRA release but real .npy string arrays when written by the upstream
generator; each file is sniffed and read either way.
"""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import TaskData
from .encoding import PIXEL_VOCAB_SIZE
from .errors import DataLayoutError

DIFFICULTIES = {6: "curv_baseline", 9: "curv_contour_length_9", 14: "curv_contour_length_14"}
DEFAULT_DIFFICULTY = "curv_contour_length_14"
LAYOUT = (
    "  pathfinder32/<difficulty>/imgs/<batch>/sample_<n>.png   (32x32 8-bit grayscale)\n"
    "  pathfinder32/<difficulty>/metadata/<batch>.npy   (text rows or a .npy string array;\n"
    "    fields: imgs/<batch> sample_<n>.png <n> <label> <continuity> <contour_length> ...)\n"
    f"  with <difficulty> one of {', '.join(DIFFICULTIES.values())}"
)
SIDE = 32
NPY_MAGIC = b"\x93NUMPY"


def parse_metadata(path: Path) -> list[list[str]]:
    """Rows of fields from one metadata file, in either form."""
    raw = path.read_bytes()
    if raw.startswith(NPY_MAGIC):
        rows = np.load(io.BytesIO(raw), allow_pickle=False)
        rows = [[str(field) for field in row] for row in np.atleast_2d(rows)]
    else:
        rows = [line.split(" ") for line in raw.decode("utf-8").split("\n") if line.strip()]
    for row in rows:
        if len(row) < 4 or row[3] not in ("0", "1"):
            raise DataLayoutError(f"Malformed Pathfinder metadata row {row[:4]}", path, LAYOUT)
    return rows


def _file_order(path: Path):
    # S4 sorts metadata files by their integer stem; fall back to the name for other stems.
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def read_pathfinder_index(directory: Path):
    """Returns (PNG paths, labels) for every non-empty image listed in the metadata."""
    metadata_dir = directory / "metadata"
    files = sorted(metadata_dir.glob("*.npy"), key=_file_order) if metadata_dir.is_dir() else []
    if not files:
        raise DataLayoutError("No Pathfinder metadata files", metadata_dir, LAYOUT)
    paths, labels = [], []
    for metadata_file in files:
        for row in parse_metadata(metadata_file):
            image_path = directory / row[0] / row[1]
            if not image_path.is_file():
                raise DataLayoutError(
                    "Pathfinder image listed in metadata is missing", image_path, LAYOUT
                )
            # The release holds at least one empty PNG; LRA filters such files out.
            if image_path.stat().st_size == 0:
                continue
            paths.append(image_path)
            labels.append(int(row[3]))
    return paths, labels


class PathfinderDataset(Dataset):
    """Decodes PNGs lazily (the full set is 200k files); items are (LongTensor[1024], label)."""

    def __init__(self, paths: list[Path], labels: list[int]):
        self.paths = paths
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L"), dtype=np.uint8)
        except OSError as error:
            raise DataLayoutError(f"Unreadable Pathfinder image ({error})", path, LAYOUT) from error
        if pixels.shape != (SIDE, SIDE):
            raise DataLayoutError(f"Pathfinder image has shape {pixels.shape}", path, LAYOUT)
        return torch.from_numpy(pixels.reshape(-1).astype(np.int64)), self.labels[index]


def load_pathfinder(
    data_root, difficulty: str = DEFAULT_DIFFICULTY, split_seed: int = 42
) -> TaskData:
    """A seeded 80/10/10 split, as S4 (LRA's own split is TFDS slicing of the same files)."""
    directory = Path(data_root) / "pathfinder32" / difficulty
    paths, labels = read_pathfinder_index(directory)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(split_seed)).tolist()
    train_end, val_end = len(order) * 8 // 10, len(order) * 9 // 10

    def subset(indices):
        return PathfinderDataset([paths[i] for i in indices], [labels[i] for i in indices])

    return TaskData(
        "pathfinder",
        subset(order[:train_end]),
        subset(order[train_end:val_end]),
        subset(order[val_end:]),
        vocab_size=PIXEL_VOCAB_SIZE,
        num_classes=2,
        max_len=SIDE * SIDE,
        pads=False,
    )
