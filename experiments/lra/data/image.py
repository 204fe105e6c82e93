"""CIFAR-10 as grayscale pixel sequences (LRA Image).

Read from cifar-10-batches-py/ or cifar-10-python.tar.gz.

Read with our own pickle reader: torchvision md5-checks the batch files and would reject fixtures.
"""

import pickle
import tarfile
from pathlib import Path

import numpy as np

from .datasets import SequenceDataset, TaskData
from .encoding import PIXEL_VOCAB_SIZE
from .errors import DataLayoutError

LAYOUT = (
    "  cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}   (python pickles)\n"
    "  or cifar-10-python.tar.gz holding that directory"
)
TRAIN_BATCHES = [f"data_batch_{index}" for index in range(1, 6)]
TEST_BATCH = "test_batch"
SEQUENCE_LENGTH = 1024
# tf.image.rgb_to_grayscale's weights (ITU-R 601 luma).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
GRAYSCALE_RULES = ("round", "tensorflow", "pil")


def grayscale_tokens(data: np.ndarray, rule: str = "round") -> np.ndarray:
    """(N, 3072) uint8 R,G,B planes -> (N, 1024) uint8 gray values in row-major pixel order.

    round: the weighted sum rounded to the nearest integer (this project's default).
    tensorflow: tf.image.rgb_to_grayscale on uint8, as LRA's pipeline: convert_image_dtype to
      float32 (x * float32(1/255)), the weighted sum in float32, then back with x * 255.5 and a
      truncating cast. The 255.5 lifts the sum by sum/510, at most half a level, so the result
      is the truncation of (1 + 1/510) * gray: about a quarter of pixels are one below 'round'.
      The float32 sum is taken left to right; another order moves the result by one on 47 of the
      2^24 colours (summing g and b first) or 48 (one rounding at the end, as fused multiply-adds).
    pil: PIL's convert('L') (torchvision's Grayscale, the paper's pipeline), in PIL's fixed
      point: (19595 R + 38470 G + 7471 B + 2^15) >> 16.
    """
    planes = data.reshape(len(data), 3, SEQUENCE_LENGTH)
    if rule == "round":
        gray = np.einsum("c,ncp->np", np.array(GRAY_WEIGHTS), planes.astype(np.float64))
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    if rule == "tensorflow":
        weights = np.array(GRAY_WEIGHTS, dtype=np.float32)
        red, green, blue = (
            planes[:, c].astype(np.float32) * np.float32(1.0 / 255.0) for c in range(3)
        )
        gray = red * weights[0] + green * weights[1] + blue * weights[2]
        return (gray * np.float32(255.5)).astype(np.uint8)
    if rule == "pil":
        red, green, blue = (planes[:, c].astype(np.int64) for c in range(3))
        return ((19595 * red + 38470 * green + 7471 * blue + 0x8000) >> 16).astype(np.uint8)
    raise ValueError(f"grayscale must be one of {GRAYSCALE_RULES}, got {rule!r}")


def parse_batch(raw: bytes, source: str, grayscale: str = "round"):
    """Returns (gray pixel sequences (N, 1024), labels) from one pickled batch."""
    try:
        batch = pickle.loads(raw, encoding="bytes")
        batch = {
            key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()
        }
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = [int(label) for label in batch["labels"]]
        if data.ndim != 2 or data.shape[1] != 3 * SEQUENCE_LENGTH or len(labels) != len(data):
            raise ValueError(f"data of shape {data.shape} with {len(labels)} labels")
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        ValueError,
        TypeError,
        AttributeError,
    ) as error:
        raise DataLayoutError(f"Malformed CIFAR-10 batch ({error!r})", source, LAYOUT) from error
    return grayscale_tokens(data, grayscale), labels


def _read_batches(data_root: Path) -> dict[str, bytes]:
    names = TRAIN_BATCHES + [TEST_BATCH]
    directory = data_root / "cifar-10-batches-py"
    if directory.is_dir():
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise DataLayoutError("Missing CIFAR-10 batch", directory / missing[0], LAYOUT)
        return {str(directory / name): (directory / name).read_bytes() for name in names}
    archive = data_root / "cifar-10-python.tar.gz"
    if not archive.is_file():
        raise DataLayoutError("Missing CIFAR-10 data", directory, LAYOUT)
    try:
        with tarfile.open(archive) as tar:
            members = {Path(member.name).name: member for member in tar if member.isfile()}
            missing = [name for name in names if name not in members]
            if missing:
                raise DataLayoutError(
                    "Missing CIFAR-10 batch in archive", f"{archive}:{missing[0]}", LAYOUT
                )
            return {f"{archive}:{name}": tar.extractfile(members[name]).read() for name in names}
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataLayoutError(f"Unreadable CIFAR-10 archive ({error})", archive, LAYOUT) from error


def load_image(data_root, split: str = "lra", grayscale: str = "round") -> TaskData:
    """split='lra': train[:90%] / train[90%:] / test, as LRA; 'full': 50k train, test as val
    (the paper's code). grayscale: see grayscale_tokens."""
    if grayscale not in GRAYSCALE_RULES:
        raise ValueError(f"grayscale must be one of {GRAYSCALE_RULES}, got {grayscale!r}")
    raw = _read_batches(Path(data_root))
    parsed = [parse_batch(content, source, grayscale) for source, content in raw.items()]
    train_pixels = np.concatenate([pixels for pixels, _ in parsed[:-1]])
    train_labels = [label for _, labels in parsed[:-1] for label in labels]
    test = SequenceDataset(list(parsed[-1][0]), parsed[-1][1], SEQUENCE_LENGTH)
    if split == "lra":
        cut = len(train_labels) * 9 // 10
        train = SequenceDataset(list(train_pixels[:cut]), train_labels[:cut], SEQUENCE_LENGTH)
        val = SequenceDataset(list(train_pixels[cut:]), train_labels[cut:], SEQUENCE_LENGTH)
    elif split == "full":
        train, val = SequenceDataset(list(train_pixels), train_labels, SEQUENCE_LENGTH), test
    else:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; use 'lra' or 'full'")
    return TaskData(
        "image",
        train,
        val,
        test,
        vocab_size=PIXEL_VOCAB_SIZE,
        num_classes=10,
        max_len=SEQUENCE_LENGTH,
        pads=False,
    )
