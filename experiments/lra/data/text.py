"""Byte-level IMDb (LRA Text) from the raw release: aclImdb/ or aclImdb_v1.tar.gz."""

import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from .datasets import SequenceDataset, TaskData
from .encoding import BYTE_VOCAB_SIZE, encode_bytes, pad_to
from .errors import DataLayoutError

LAYOUT = (
    "  aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt   (a directory)\n"
    "  or aclImdb_v1.tar.gz (or aclImdb_v1.tar) holding that tree"
)
MAX_LEN = 4000
REVIEW_PATH = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/[^/]+\.txt$")
LABELS = {"neg": 0, "pos": 1}


def _reviews_from_directory(directory: Path):
    for path in sorted(directory.rglob("*.txt")):
        match = REVIEW_PATH.search(path.as_posix())
        if match:
            yield match.group(1), match.group(2), path.name, path.read_bytes()


def _reviews_from_tar(archive: Path):
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                match = REVIEW_PATH.search(member.name)
                if match and member.isfile():
                    yield (
                        match.group(1),
                        match.group(2),
                        member.name,
                        tar.extractfile(member).read(),
                    )
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataLayoutError(f"Unreadable IMDb archive ({error})", archive, LAYOUT) from error


def read_imdb(data_root, max_len: int | None = MAX_LEN):
    """Returns {split: (byte-id arrays, labels)} for train and test, cut to max_len bytes
    (None keeps whole reviews)."""
    root = Path(data_root)
    directory = root / "aclImdb"
    archives = [root / "aclImdb_v1.tar.gz", root / "aclImdb_v1.tar"]
    if directory.is_dir():
        source, reviews = directory, _reviews_from_directory(directory)
    else:
        source = next((archive for archive in archives if archive.is_file()), None)
        if source is None:
            raise DataLayoutError("Missing IMDb data", directory, LAYOUT)
        reviews = _reviews_from_tar(source)
    # Sorted by name so the order does not depend on how the archive was packed.
    collected = {"train": [], "test": []}
    for split, sentiment, name, review in reviews:
        collected[split].append((name, encode_bytes(review[:max_len]), LABELS[sentiment]))
    for split, items in collected.items():
        if not items or len({label for _, _, label in items}) < 2:
            raise DataLayoutError(
                f"No positive and negative reviews for split '{split}'", source, LAYOUT
            )
        items.sort(key=lambda item: item[0])
    return {
        split: ([ids for _, ids, _ in items], [label for _, _, label in items])
        for split, items in collected.items()
    }


class RandomCropDataset(SequenceDataset):
    """Training items cut to a random max_len window when longer (the paper's ByteEncoder with
    train=True); the window is drawn from torch's global generator, which runs are seeded with
    and checkpoints restore."""

    def __getitem__(self, index: int):
        ids = self.sequences[index]
        if len(ids) > self.max_len:
            start = int(torch.randint(len(ids) - self.max_len + 1, ()))
            ids = ids[start : start + self.max_len]
        return pad_to(ids, self.max_len), self.labels[index]


def load_text(
    data_root,
    max_len: int = MAX_LEN,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    train_crop: str = "head",
) -> TaskData:
    """val_fraction of the training reviews (a seeded draw) is held out for validation, so the
    test split is read once, at the end. val_fraction=0 validates on test, as LRA and S4 do;
    that selects the checkpoint on test and inflates the reported number.

    train_crop: head keeps the first max_len bytes (LRA); random takes a random window of
    longer training reviews (the paper); evaluation always keeps the head.
    """
    if train_crop not in ("head", "random"):
        raise ValueError(f"train_crop must be 'head' or 'random', got {train_crop!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    splits = read_imdb(data_root, None if train_crop == "random" else max_len)
    sequences, labels = splits["train"]
    order = np.random.default_rng(split_seed).permutation(len(labels))
    held_out = order[: round(len(labels) * val_fraction)]
    kept = order[len(held_out) :] if len(held_out) else np.arange(len(labels))
    train_type = RandomCropDataset if train_crop == "random" else SequenceDataset
    train = train_type([sequences[i] for i in kept], [labels[i] for i in kept], max_len)
    test = SequenceDataset(*splits["test"], max_len)
    val = (
        SequenceDataset([sequences[i] for i in held_out], [labels[i] for i in held_out], max_len)
        if len(held_out)
        else test
    )
    return TaskData(
        "text",
        train,
        val,
        test,
        vocab_size=BYTE_VOCAB_SIZE,
        num_classes=2,
        max_len=max_len,
        pads=True,
    )
