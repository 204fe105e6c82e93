"""ListOps: LRA's TSV release (listops-1000/basic_{train,val,test}.tsv), or the paper's variant
generated on the fly (variant="paper")."""

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..generators.listops_paper import generate_tree
from .datasets import SequenceDataset, TaskData
from .encoding import LISTOPS_IDS, LISTOPS_TOKENS, encode_listops
from .errors import DataLayoutError

LAYOUT = (
    "  listops-1000/basic_train.tsv\n  listops-1000/basic_val.tsv\n  listops-1000/basic_test.tsv\n"
    "  (tab-separated, header 'Source<TAB>Target', Target an integer 0-9)"
)
NUM_CLASSES = 10
MAX_LEN = 2000


def read_listops_tsv(path: Path):
    """Returns (token id arrays, labels). Rows are read with \\r stripped (csv writes \\r\\n)."""
    if not path.is_file():
        raise DataLayoutError("Missing ListOps file", path, LAYOUT)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip().split("\t") != ["Source", "Target"]:
        raise DataLayoutError(
            "Malformed ListOps file (no 'Source<TAB>Target' header)", path, LAYOUT
        )
    sequences, labels = [], []
    for line_number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit() or int(fields[1]) >= NUM_CLASSES:
            raise DataLayoutError(f"Malformed ListOps row at line {line_number}", path, LAYOUT)
        sequences.append(encode_listops(fields[0]))
        labels.append(int(fields[1]))
    return sequences, labels


def load_listops(data_root, max_len: int = MAX_LEN, variant: str = "lra", **paper) -> TaskData:
    """variant lra: the TSV files under data_root; paper: generated on the fly (data_root is not
    read), with load_paper_listops's options in `paper`."""
    if variant == "paper":
        return load_paper_listops(max_length=max_len, **paper)
    if variant != "lra":
        raise ValueError(f"ListOps variant must be 'lra' or 'paper', got {variant!r}")
    if paper:
        raise ValueError(f"options {sorted(paper)} apply only to variant='paper'")
    directory = Path(data_root) / "listops-1000"
    splits = {
        split: SequenceDataset(*read_listops_tsv(directory / f"basic_{split}.tsv"), max_len)
        for split in ("train", "val", "test")
    }
    return TaskData(
        "listops",
        **splits,
        vocab_size=len(LISTOPS_TOKENS),
        num_classes=NUM_CLASSES,
        max_len=max_len,
        pads=True,
    )


class ListOpsBatches(Dataset):
    """The paper's on-the-fly ListOps: each item is a whole batch of freshly generated trees of
    one length drawn from U[min_length, max_length] (so no padding), as its LongListOps does.

    Item i of epoch e is drawn from random.Random((seed, e, i)): a seeded run sees the same
    batches again, any rank or worker can make any batch, and set_epoch(e) (called by the
    training loop) gives new samples each epoch. fixed=True ignores the epoch (val and test).
    """

    def __init__(
        self,
        num_batches: int,
        batch_size: int,
        min_length: int,
        max_length: int,
        seed: int,
        fixed: bool = False,
    ):
        if not 4 <= min_length <= max_length:
            raise ValueError(f"need 4 <= min_length <= max_length, got {min_length}, {max_length}")
        self.num_batches, self.batch_size = num_batches, batch_size
        self.min_length, self.max_length = min_length, max_length
        self.seed, self.fixed, self.epoch = seed, fixed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_batches:
            raise IndexError(index)
        rng = random.Random(f"{self.seed}/{0 if self.fixed else self.epoch}/{index}")
        length = rng.randint(self.min_length, self.max_length)
        trees = [generate_tree(rng, length) for _ in range(self.batch_size)]
        tokens = torch.tensor(
            [[LISTOPS_IDS[token] for token in tree.tokens()] for tree in trees], dtype=torch.long
        )
        return tokens, torch.tensor([tree.value() for tree in trees], dtype=torch.long)


def load_paper_listops(
    batch_size: int,
    min_length: int = 500,
    max_length: int = 2000,
    train_samples: int = 96_000,
    eval_samples: int = 2_000,
    seed: int = 0,
) -> TaskData:
    """train_samples per epoch as the paper's code (96,000); val and test are fixed sets of
    eval_samples each (the paper draws 50,000 fresh ones per evaluation), from other seeds."""

    def batches(samples, offset, fixed):
        count = max(1, samples // batch_size)
        return ListOpsBatches(count, batch_size, min_length, max_length, seed + offset, fixed)

    return TaskData(
        "listops",
        batches(train_samples, 0, False),
        batches(eval_samples, 1_000_003, True),
        batches(eval_samples, 2_000_006, True),
        vocab_size=len(LISTOPS_TOKENS),
        num_classes=NUM_CLASSES,
        max_len=max_length,
        pads=False,
        prebatched=True,
    )
