"""Deterministic, resumable batching: the order is a function of (seed, epoch) alone."""

import math

import torch
from torch.utils.data import DataLoader

from .distributed import ProcessContext


def epoch_order(num_items: int, seed: int, epoch: int, context: ProcessContext) -> list[int]:
    """This rank's share of a seeded shuffle, padded (as DistributedSampler) so ranks keep step."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    total = math.ceil(num_items / context.world_size) * context.world_size
    order += (order * math.ceil(total / num_items))[: total - num_items]
    return order[context.rank :: context.world_size]


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drops trailing columns that are padding in every row; masked padding changes no output."""
    used = tokens.ne(0).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1 if len(used) else 1]


def make_collate(pads: bool):
    def collate(items):
        *token_tensors, labels = (torch.stack(column) for column in zip(*items, strict=True))
        if pads:
            token_tensors = [trim_padding(tokens) for tokens in token_tensors]
        return (*token_tensors, labels)

    return collate


def _loader(dataset, indices, batch_size, collate, num_workers):
    """batch_size None: each item is already a batch (collate is not applied)."""
    # A private generator: DataLoader would otherwise draw its worker seed from the global RNG,
    # which would make the dropout stream depend on where an epoch began.
    return DataLoader(
        dataset,
        sampler=indices,
        batch_size=batch_size,
        collate_fn=collate if batch_size else None,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )


def training_batches(
    dataset, batch_size, seed, epoch, batch_in_epoch, context, collate, num_workers=0
):
    """Yields (epoch, index of the batch within the epoch, batch) forever, from a saved position.

    batch_size None: the dataset's items are whole batches."""
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        order = epoch_order(len(dataset), seed, epoch, context)[
            batch_in_epoch * (batch_size or 1) :
        ]
        for offset, batch in enumerate(_loader(dataset, order, batch_size, collate, num_workers)):
            yield epoch, batch_in_epoch + offset, batch
        epoch, batch_in_epoch = epoch + 1, 0


def evaluation_batches(dataset, batch_size, context, collate, num_workers=0):
    """Each item exactly once across ranks (no padding), so summed counts are exact."""
    indices = list(range(context.rank, len(dataset), context.world_size))
    return _loader(dataset, indices, batch_size, collate, num_workers)
