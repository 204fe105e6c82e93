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
# tf.image.rgb_to_grayscale's weights, as LRA's pipeline uses.
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])


def grayscale_tokens(data: np.ndarray) -> np.ndarray:
    """(N, 3072) uint8 R,G,B planes -> (N, 1024) uint8 gray values in row-major pixel order."""
    planes = data.reshape(len(data), 3, SEQUENCE_LENGTH).astype(np.float64)
    gray = np.einsum("c,ncp->np", GRAY_WEIGHTS, planes)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def parse_batch(raw: bytes, source: str):
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
    return grayscale_tokens(data), labels


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


def load_image(data_root, split: str = "lra") -> TaskData:
    """split='lra': train[:90%] / train[90%:] / test, as LRA; 'full': 50k train, test as val."""
    raw = _read_batches(Path(data_root))
    parsed = [parse_batch(content, source) for source, content in raw.items()]
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
