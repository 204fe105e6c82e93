"""Fixtures in each public format, written inside the tests (no binary blobs in the repository)."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from experiments.lra.generators.listops import write_listops
from experiments.lra.generators.pathfinder import write_pathfinder
from experiments.lra.training.config import load_config

# Hand-written ListOps rows with known answers, serialised as LRA does (parentheses around every
# binary-tuple node). MED of an even count truncates the average; SM wraps around 10.
LISTOPS_ROWS = [
    ("( ( ( ( [MED 3 ) 4 ) ] )", 3),  # MED(3, 4) = int(3.5) = 3
    ("( ( ( ( ( [SM 9 ) 8 ) 5 ) ] )", 2),  # (9 + 8 + 5) mod 10
    ("( ( ( ( [MAX 2 ) ( ( ( ( [MIN 7 ) 1 ) 5 ) ] ) ) 0 ) ] )", 2),  # MAX(2, MIN(7, 1, 5), 0)
    ("( ( ( ( ( [MED 1 ) 9 ) 4 ) 6 ) ] )", 5),  # MED(1, 9, 4, 6) = int(5.0)
]

IMDB_REVIEWS = {
    # (split, sentiment, file name): text
    ("train", "pos", "0_9.txt"): "Great film.<br /><br />Loved it.",
    ("train", "pos", "1_8.txt"): "Café scenes were lovely",  # é is two UTF-8 bytes
    ("train", "neg", "0_2.txt"): "Dull. " * 40,  # longer than the tests' max_len
    ("train", "neg", "1_1.txt"): "Bad",
    ("test", "pos", "0_10.txt"): "Superb",
    ("test", "neg", "0_3.txt"): "Awful",
}


def write_listops_rows(directory: Path, rows, line_ending="\r\n") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = "Source\tTarget" + line_ending + "".join(f"{s}\t{t}{line_ending}" for s, t in rows)
    for split in ("train", "val", "test"):
        (directory / f"basic_{split}.tsv").write_text(text, newline="")


def write_imdb(root: Path, as_tar: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not as_tar:
        for (split, sentiment, name), text in IMDB_REVIEWS.items():
            path = root / "aclImdb" / split / sentiment / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode("utf-8"))
        return root
    with tarfile.open(root / "aclImdb_v1.tar.gz", "w:gz") as tar:
        for (split, sentiment, name), text in IMDB_REVIEWS.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"aclImdb/{split}/{sentiment}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        # The release also holds unlabelled reviews, which the loader must ignore.
        info = tarfile.TarInfo("aclImdb/train/unsup/0_0.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return root


def write_aan(root: Path, rows=None) -> Path:
    rows = rows or [
        '1.0\tp1\tp2\tSee "quoted" text\tCafé résumé',
        "0\tp3\tp4\t" + "x" * 120 + "\tshort",
        "1\tp5\tp6\tabc\tabd",
        "0.0\tp7\tp8\tdef\tghi",
    ]
    directory = root / "tsv_data"
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval", "test"):
        (directory / f"new_aan_pairs.{split}.tsv").write_bytes(
            ("\n".join(rows) + "\n").encode("utf-8")
        )
    return root


def cifar_batch(labels, first_red: int, str_keys: bool = False) -> dict:
    """Images of uniform colour; image 0 is pure red of value first_red, the others mid grey."""
    data = np.full((len(labels), 3072), 128, dtype=np.uint8)
    data[0] = 0
    data[0, :1024] = first_red
    batch = {
        "data": data,
        "labels": list(labels),
        "batch_label": "fixture",
        "filenames": ["f.png"] * len(labels),
    }
    if not str_keys:
        batch = {key.encode(): value for key, value in batch.items()}
    return batch


def write_cifar(
    root: Path, as_tar: bool = False, str_keys: bool = False, per_batch: int = 4
) -> Path:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for index in range(1, 6):
        labels = [(index + i) % 10 for i in range(per_batch)]
        files[f"data_batch_{index}"] = cifar_batch(labels, 10 * index, str_keys)
    files["test_batch"] = cifar_batch([i % 10 for i in range(per_batch)], 255, str_keys)
    files["batches.meta"] = {b"label_names": [b"airplane"] * 10, b"num_vis": 3072}
    for name, content in files.items():
        (directory / name).write_bytes(pickle.dumps(content, protocol=2))
    if as_tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(directory, arcname="cifar-10-batches-py")
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
    return root


@pytest.fixture(scope="session")
def pathfinder_samples(tmp_path_factory):
    """12 generated images with text metadata, and their ground truth."""
    root = tmp_path_factory.mktemp("pathfinder_text")
    directory, samples = write_pathfinder(root, 12, contour_length=14, images_per_batch=5, seed=3)
    return root, directory, samples


@pytest.fixture(scope="session")
def all_tasks_root(tmp_path_factory, pathfinder_samples):
    """A data root holding fixtures of all five tasks, big enough for a few training steps."""
    root = tmp_path_factory.mktemp("lra_root")
    write_listops(root / "listops-1000", 24, 8, 8, min_length=5, max_length=40, seed=1)
    write_imdb(root, as_tar=True)
    write_aan(root)
    write_cifar(root, per_batch=4)
    write_pathfinder(root, 20, contour_length=14, images_per_batch=10, seed=5)
    return root


def tiny_config(task: str, preset: str = "project") -> dict:
    """A task's shipped config in a preset, with a tiny model and a six-step schedule."""
    config = load_config(task, preset=preset)
    config.pop("source")
    config["model"].update(dim=16, qkv_dim=8, mlp_dim=16, depth=1, heads=2, dropout=0.1)
    if task in ("text", "retrieval"):
        config["data"]["max_len"] = 64
    if task == "text":
        config["data"]["val_fraction"] = 0.25  # one of the fixture's four training reviews
    if config["data"].get("variant") == "paper":
        config["data"].update(max_len=24, min_length=8, train_samples=24, eval_samples=8)
    config["train"].update(
        batch_size=4, eval_batch_size=8, warmup_steps=2, max_steps=6, eval_every=3
    )
    if config["train"].get("steps_per_cycle"):
        config["train"]["steps_per_cycle"] = 6
    return config


@pytest.fixture(scope="session")
def tiny_configs(tmp_path_factory):
    """Each task's project config, tiny (see tiny_config), written to JSON files."""
    directory = tmp_path_factory.mktemp("configs")
    paths = {}
    for task in ("listops", "text", "retrieval", "image", "pathfinder"):
        paths[task] = directory / f"{task}.json"
        paths[task].write_text(json.dumps(tiny_config(task)))
    return paths
