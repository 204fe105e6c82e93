"""In-memory datasets of encoded sequences, and the TaskData bundle every loader returns."""

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .encoding import pad_to


class SequenceDataset(Dataset):
    """Items are (LongTensor[max_len] token ids padded with 0, label)."""

    def __init__(self, sequences: list[np.ndarray], labels: list[int], max_len: int):
        if len(sequences) != len(labels):
            raise ValueError("sequences and labels differ in length")
        self.sequences = sequences
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int):
        return pad_to(self.sequences[index], self.max_len), self.labels[index]


class PairDataset(Dataset):
    """Items are (ids of document 1, ids of document 2, label), each document padded to max_len."""

    def __init__(
        self, first: list[np.ndarray], second: list[np.ndarray], labels: list[int], max_len: int
    ):
        if not len(first) == len(second) == len(labels):
            raise ValueError("documents and labels differ in length")
        self.first, self.second = first, second
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, index: int):
        return (
            pad_to(self.first[index], self.max_len),
            pad_to(self.second[index], self.max_len),
            self.labels[index],
        )


@dataclass
class TaskData:
    """Everything a model and a training loop need to know about one task's data."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    vocab_size: int
    num_classes: int
    max_len: int
    # Whether id 0 marks padding; pixel tasks use 0 as a real token and never pad.
    pads: bool
    # Whether an item holds two documents (Retrieval's two-tower setting).
    pair: bool = False
    # Whether each item is already a whole batch (the paper's ListOps: one length per batch).
    prebatched: bool = False
