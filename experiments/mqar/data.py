"""Multi-query associative recall (MQAR) data, as in Zoology (Arora et al. 2023) and Based.

One example of length L with P key-value pairs over a vocabulary of V tokens:

    inputs:  k_1 v_1 k_2 v_2 ... k_P v_P | r r k_3 r r r k_1 r ... r
    targets: -100 ...               -100 | -100 ... v_3 ... v_1 ... -100

- Keys are P distinct tokens of 1 .. V/2 - 1, values P distinct tokens of V/2 .. V - 1 (disjoint
  halves; token 0 is never a key, so a key is never mistaken for Zoology's placeholder).
- The first 2P positions hold the pairs. The remaining L - 2P positions form (L - 2P) // 2 slots
  of two; every key is queried exactly once, in random order, at the first position of a slot.
  Slot s (0-based) is chosen with probability proportional to (s + 1)^(a - 1), a = 0.01, drawn
  without replacement (Zoology's power law: most queries come soon after the pairs, a few far).
- targets[i] is the value paired with inputs[i] where position i holds a query, and -100 (ignored
  by F.cross_entropy) everywhere else, pairs included: the model is scored on recall only.
- Every other position holds a filler token drawn uniformly from the value half (V/2 .. V - 1).
  Zoology draws its fillers from the whole vocabulary (random_non_queries); at its vocabulary of
  8192 a filler rarely equals a key, but at the small vocabularies a CPU run can learn (128 here)
  a 512-token sequence would hold several copies of every key followed by a random token, and a
  query would have many false matches. With fillers among the values, a key occurs only in its
  pair and in its query: the answer is unambiguous at every length.

All randomness comes from the torch.Generator passed in, on the CPU: the same seed gives the
same tensors on every machine, offline.
"""

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100
# Zoology's power_a: the query slots' power-law exponent minus one.
QUERY_POWER = 0.01


def check_sizes(vocab_size: int, seq_len: int, num_pairs: int) -> None:
    """Raises ValueError naming the problem when the three sizes admit no MQAR example."""
    if num_pairs < 1:
        raise ValueError(f"mqar: num_pairs must be at least 1, got {num_pairs}")
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(
            f"mqar: {num_pairs} pairs need {num_pairs} distinct keys, but vocab_size "
            f"{vocab_size} has only {vocab_size // 2 - 1} (tokens 1 .. vocab_size // 2 - 1)"
        )
    if seq_len < 4 * num_pairs:
        raise ValueError(
            f"mqar: seq_len {seq_len} is too short for {num_pairs} pairs: the pairs take "
            f"2 * num_pairs positions and the queries 2 * num_pairs more (at least {4 * num_pairs})"
        )


def generate_mqar(
    num_examples: int,
    vocab_size: int,
    seq_len: int,
    num_pairs: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both int64 of shape (num_examples, seq_len), in the format of the
    module docstring."""
    check_sizes(vocab_size, seq_len, num_pairs)
    half = vocab_size // 2
    # Distinct keys and values per example: the first P of a random permutation of each half.
    keys = 1 + torch.rand(num_examples, half - 1, generator=generator).argsort(dim=1)[:, :num_pairs]
    values = (
        half
        + torch.rand(num_examples, vocab_size - half, generator=generator).argsort(dim=1)[
            :, :num_pairs
        ]
    )
    inputs = torch.randint(half, vocab_size, (num_examples, seq_len), generator=generator)
    inputs[:, 0 : 2 * num_pairs : 2] = keys
    inputs[:, 1 : 2 * num_pairs : 2] = values

    slots = (seq_len - 2 * num_pairs) // 2
    slot_weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (QUERY_POWER - 1)
    # Row r's i-th draw is the slot where key i of row r is queried: a random order of the keys.
    query_slots = torch.multinomial(
        slot_weights.expand(num_examples, slots), num_pairs, replacement=False, generator=generator
    )
    query_positions = 2 * num_pairs + 2 * query_slots
    inputs.scatter_(1, query_positions, keys)
    targets = torch.full((num_examples, seq_len), IGNORE_INDEX, dtype=torch.int64)
    targets.scatter_(1, query_positions, values)
    return inputs, targets


class MQARDataset(Dataset):
    """num_examples MQAR examples made at construction from `seed`; item i is (inputs, targets)
    of shape (seq_len,) each."""

    def __init__(self, num_examples: int, vocab_size: int, seq_len: int, num_pairs: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.inputs, self.targets = generate_mqar(
            num_examples, vocab_size, seq_len, num_pairs, generator
        )

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]
