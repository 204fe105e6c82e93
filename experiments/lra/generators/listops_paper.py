"""The TaylorShift paper's on-the-fly ListOps (its training/datasets/long_listops.py), re-implemented.

It differs from LRA's ListOps (generators/listops.py) in four ways: six operators (FIRST and LAST
join MIN, MAX, MED, SM); MED is the upper median sorted(values)[n // 2], without averaging; every
tree has an exact length drawn uniformly from [min_length, max_length] and all trees of one batch
share it, so batches need no padding; and samples are drawn afresh every epoch instead of read from
a fixed file. A tree is grown by replacing a random leaf (weighted by the leaves reachable within
max_depth) with a new random-operator node of random arity until it is within 4 tokens of the
target, then random leaves are appended to nodes with free argument slots until the length is
exact; a tree that cannot be completed is redrawn. Token strings are LRA's, without parentheses.
"""

import random

MIN, MAX, MED, FIRST, LAST, SUM_MOD = "[MIN", "[MAX", "[MED", "[FIRST", "[LAST", "[SM"
OPERATORS = [MIN, MAX, MED, FIRST, LAST, SUM_MOD]
END = "]"
VALUES = range(10)


class Node:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.operator = rng.choice(OPERATORS)
        self.children: list = []

    def __len__(self) -> int:
        # The operator token and the closing bracket, plus the children's tokens.
        return 2 + sum(len(c) if isinstance(c, Node) else 1 for c in self.children)

    def value(self) -> int:
        values = [c.value() if isinstance(c, Node) else c for c in self.children]
        if self.operator == MIN:
            return min(values)
        if self.operator == MAX:
            return max(values)
        if self.operator == MED:
            return sorted(values)[len(values) // 2]
        if self.operator == FIRST:
            return values[0]
        if self.operator == LAST:
            return values[-1]
        return sum(values) % 10

    def tokens(self) -> list[str]:
        out = [self.operator]
        for child in self.children:
            out += child.tokens() if isinstance(child, Node) else [str(child)]
        return out + [END]

    def fill_values(self, min_length: int, max_length: int, max_args: int) -> None:
        count = self.rng.randint(min_length - 2, min(max_length - 2, max_args))
        self.children = [self.rng.choice(VALUES) for _ in range(count)]

    def leaves_within(self, depth: int, max_depth: int) -> int:
        """Leaves that may still become subtrees without exceeding max_depth."""
        if depth < max_depth:
            return sum(
                c.leaves_within(depth + 1, max_depth) if isinstance(c, Node) else 1
                for c in self.children
            )
        return sum(1 for c in self.children if not isinstance(c, Node))

    def _weighted_index(self, weights: list[int]) -> int:
        target = self.rng.randint(1, sum(weights))
        for index, weight in enumerate(weights):
            if target <= weight:
                return index
            target -= weight
        raise AssertionError("weights exhausted")

    def grow(self, max_length: int, max_args: int, depth: int, max_depth: int) -> None:
        if not self.children:
            self.fill_values(4, max_length, max_args)
            return
        weights = [
            c.leaves_within(depth + 1, max_depth) if isinstance(c, Node) else 1
            for c in self.children
        ]
        index = self._weighted_index(weights)
        child = self.children[index]
        if isinstance(child, Node):
            child.grow(max_length, max_args, depth + 1, max_depth)
            return
        subtree = Node(self.rng)
        subtree.fill_values(4, max_length, max_args)
        self.children[index] = subtree

    def open_slots(self, max_args: int, depth: int, max_depth: int) -> int:
        slots = max_args - len(self.children)
        if depth < max_depth:
            slots += sum(
                c.open_slots(max_args, depth + 1, max_depth)
                for c in self.children
                if isinstance(c, Node)
            )
        return slots

    def add_leaf(self, max_args: int, depth: int, max_depth: int) -> bool:
        """Appends one random leaf to a node with a free slot; False when there is none."""
        weights = [max_args - len(self.children)]
        if depth < max_depth:
            weights += [
                c.open_slots(max_args, depth + 1, max_depth) if isinstance(c, Node) else 0
                for c in self.children
            ]
        if sum(weights) == 0:
            return False
        index = self._weighted_index(weights)
        if index == 0:
            self.children.append(self.rng.choice(VALUES))
            return True
        return self.children[index - 1].add_leaf(max_args, depth + 1, max_depth)


def generate_tree(rng: random.Random, length: int, max_depth: int = 10, max_args: int = 10):
    """A tree of exactly `length` tokens (length >= 4)."""
    if length < 4:
        raise ValueError(f"a tree has at least 4 tokens, asked for {length}")
    while True:
        tree = Node(rng)
        while len(tree) < length - 4:
            tree.grow(length - len(tree), max_args, 1, max_depth)
        while len(tree) < length and tree.add_leaf(max_args, 1, max_depth):
            pass
        if len(tree) == length:
            return tree
