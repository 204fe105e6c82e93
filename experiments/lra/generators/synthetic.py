"""SYNTHETIC stand-ins for the real-data tasks (Text, Retrieval, Image), for smoke runs only.

They are written in the public formats, so the real loaders read them, but they are NOT IMDb, AAN
or CIFAR-10: accuracies on them say nothing about LRA. Each output folder holds a SYNTHETIC.txt.

    python -m experiments.lra.generators.synthetic --task text --data-root data-synthetic
"""

import argparse
import pickle
from pathlib import Path

import numpy as np

NOTICE = (
    "SYNTHETIC smoke-test data written by experiments.lra.generators.synthetic;"
    " not the real dataset.\n"
)
FILLER = [
    "the",
    "a",
    "of",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "story",
    "and",
    "it",
    "was",
    "this",
    "that",
    "with",
    "for",
    "but",
]
POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak", "tedious"]


def _review(rng: np.random.Generator, positive: bool, words: int) -> str:
    cue = POSITIVE if positive else NEGATIVE
    tokens = [rng.choice(cue) if rng.random() < 0.15 else rng.choice(FILLER) for _ in range(words)]
    text = " ".join(tokens)
    # Real reviews carry HTML line breaks and non-ASCII characters; so do these.
    return text.replace(" and ", " and<br /><br />", 1) + (" café" if rng.random() < 0.3 else "")


def write_text(data_root, per_class: int = 100, words: int = 60, seed: int = 0) -> Path:
    """aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt: sentiment cued by a few planted words."""
    rng = np.random.default_rng(seed)
    root = Path(data_root) / "aclImdb"
    for split in ("train", "test"):
        for sentiment, ratings in (("pos", (7, 11)), ("neg", (1, 5))):
            directory = root / split / sentiment
            directory.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                rating = int(rng.integers(*ratings))
                review = _review(rng, sentiment == "pos", int(rng.integers(words // 2, words + 1)))
                (directory / f"{index}_{rating}.txt").write_text(review, encoding="utf-8")
    (root / "SYNTHETIC.txt").write_text(NOTICE)
    return root


def _document(rng: np.random.Generator, key: str, length: int) -> str:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz     "))
    body = "".join(rng.choice(letters, length))
    cut = int(rng.integers(0, length))
    return body[:cut] + f' "{key}" ' + body[cut:]


def write_retrieval(data_root, rows: dict | None = None, length: int = 200, seed: int = 0) -> Path:
    """tsv_data/new_aan_pairs.*.tsv: label 1 iff both documents cite the same key."""
    rng = np.random.default_rng(seed)
    rows = rows or {"train": 400, "eval": 100, "test": 100}
    directory = Path(data_root) / "tsv_data"
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in rows.items():
        lines = []
        for index in range(count):
            label = int(rng.integers(0, 2))
            keys = ["".join(rng.choice(list("0123456789ABCDEF"), 6)) for _ in range(2)]
            second_key = keys[0] if label else keys[1]
            first, second = _document(rng, keys[0], length), _document(rng, second_key, length)
            lines.append(
                f"{float(label)}\tsyn-{split}-{index}a\tsyn-{split}-{index}b\t{first}\t{second}\n"
            )
        (directory / f"new_aan_pairs.{split}.tsv").write_text("".join(lines), encoding="utf-8")
    (directory / "SYNTHETIC.txt").write_text(NOTICE)
    return directory


def _pattern_images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Class k: a grating at 18k degrees, random phase, colour and noise; (N, 3072) uint8."""
    rows, cols = np.mgrid[0:32, 0:32]
    angles = np.deg2rad(18 * labels)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, len(labels))[:, None, None]
    wave = np.sin(0.6 * (np.cos(angles) * cols + np.sin(angles) * rows) + phase)
    colour = rng.uniform(0.5, 1.0, (len(labels), 3, 1, 1))
    planes = 127.5 + 100 * colour * wave[:, None] + rng.normal(0, 20, (len(labels), 3, 32, 32))
    return np.clip(planes, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def write_image(data_root, per_batch: int = 100, test_size: int = 100, seed: int = 0) -> Path:
    """cifar-10-batches-py/ pickles (protocol 2, bytes keys), as the release."""
    rng = np.random.default_rng(seed)
    directory = Path(data_root) / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test_size if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, count)
        batch = {
            b"batch_label": f"synthetic {name}".encode(),
            b"labels": labels.tolist(),
            b"data": _pattern_images(rng, labels),
            b"filenames": [f"synthetic_{index}.png".encode() for index in range(count)],
        }
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"grating_{18 * k}deg".encode() for k in range(10)], b"num_vis": 3072}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (directory / "SYNTHETIC.txt").write_text(NOTICE)
    return directory


WRITERS = {"text": write_text, "retrieval": write_retrieval, "image": write_image}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, choices=sorted(WRITERS))
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = WRITERS[args.task](args.data_root, seed=args.seed)
    print(f"wrote SYNTHETIC {args.task} stand-in data to {path}")


if __name__ == "__main__":
    main()
