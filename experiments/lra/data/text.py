"""Byte-level IMDb (LRA Text) from the raw release: aclImdb/ or aclImdb_v1.tar.gz."""

import re
import tarfile
from pathlib import Path

from .datasets import SequenceDataset, TaskData
from .encoding import BYTE_VOCAB_SIZE, encode_bytes
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


def read_imdb(data_root, max_len: int = MAX_LEN):
    """Returns {split: (byte-id arrays, labels)} for train and test, cut to max_len bytes."""
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


def load_text(data_root, max_len: int = MAX_LEN) -> TaskData:
    splits = read_imdb(data_root, max_len)
    train = SequenceDataset(*splits["train"], max_len)
    test = SequenceDataset(*splits["test"], max_len)
    # LRA (and S4) validate on the test set: IMDb has no separate validation split.
    return TaskData(
        "text",
        train,
        test,
        test,
        vocab_size=BYTE_VOCAB_SIZE,
        num_classes=2,
        max_len=max_len,
        pads=True,
    )
