"""The continuous engine's prefix cache: the KV of prompt beginnings shared by several requests, computed once.

Prompts are cut into blocks of ``block_size`` token ids. A block's keys and values depend on every token
before it, so blocks live in a tree: a node is one block whose parent is the block before it, and a
request's cached prefix is the longest path from the root that spells its first blocks (token tuples
compared exactly, so a hash collision can never serve another prompt's KV).

The KV itself sits in one pool per layer, ``(blocks, kv heads, block_size, head dim)``, grown by doubling
up to a memory budget; slot 0 is a block of zeros (the padding on the left of a shorter cached prefix).
When the budget is full, the least recently used blocks that no other block extends are dropped first.

Which blocks are worth keeping is decided per run from the requests themselves
(:func:`shared_blocks`): a block that begins two or more prompts of the run. Blocks kept by an earlier
run stay until evicted, so a later call with the same system message or few-shot block reuses them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

BLOCK_SIZE = 16


def block_hashes(token_ids: Sequence[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """One hash per full block of ``token_ids``, each covering every token up to the end of its block."""
    hashes, previous = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(token_ids[start:start + block_size])))
        hashes.append(previous)
    return hashes


def shared_blocks(prompts: Sequence[Sequence[int]], block_size: int = BLOCK_SIZE) -> set[int]:
    """The block hashes that begin two or more of ``prompts`` (a hash only chooses what to keep; lookups
    compare tokens)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for prompt in prompts:
        for value in block_hashes(prompt, block_size):
            (shared if value in seen else seen).add(value)
    return shared


@dataclass(eq=False)
class Node:
    """One cached block: its tokens, its pool slot and the blocks that extend it."""

    tokens: tuple[int, ...]
    parent: Node | None
    slot: int = 0
    last_used: int = 0
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)


class PrefixCache:
    """Cached KV blocks of prompt prefixes, bounded by ``budget_bytes`` (see the module docstring).

    Example:
        >>> cache = PrefixCache(budget_bytes=64 << 20)                 # doctest: +SKIP
        >>> path = cache.match(prompt_ids)                              # doctest: +SKIP
        >>> past = cache.gather([path], len(path))                      # doctest: +SKIP
    """

    def __init__(self, budget_bytes: int, block_size: int = BLOCK_SIZE):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size!r}.")
        self.block_size = block_size
        self.budget_bytes = int(budget_bytes)
        self.root = Node(tokens=(), parent=None)
        self.keys: list[torch.Tensor] = []     # per layer: (slots, heads, block_size, head dim); slot 0 zeros
        self.values: list[torch.Tensor] = []
        self.free: list[int] = []
        self.nodes = 0
        self.block_bytes = 0
        self.clock = 0

    # ------------------------------------------------------------------ lookup
    def match(self, token_ids: Sequence[int]) -> list[Node]:
        """The cached blocks that begin ``token_ids``, leaving at least one token to compute (its logits
        choose the first new token)."""
        path: list[Node] = []
        node = self.root
        size = self.block_size
        self.clock += 1
        for start in range(0, len(token_ids) - 1 - size + 1, size):
            node = node.children.get(tuple(token_ids[start:start + size]))
            if node is None:
                break
            node.last_used = self.clock
            path.append(node)
        return path

    @property
    def used_bytes(self) -> int:
        return self.nodes * self.block_bytes

    def gather(self, paths: Sequence[Sequence[Node]], blocks: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (one at a time), keys and values of shape ``(rows, heads, blocks * block_size, head dim)``:
        each row's cached blocks right-aligned, zeros on their left."""
        index = torch.zeros((len(paths), blocks), dtype=torch.long)
        for row, path in enumerate(paths):
            if path:
                index[row, blocks - len(path):] = torch.tensor([node.slot for node in path])
        flat = index.view(-1)
        for keys, values in zip(self.keys, self.values):
            pair = []
            for pool in (keys, values):
                picked = pool.index_select(0, flat.to(pool.device))
                _, heads, size, dim = pool.shape
                pair.append(picked.view(len(paths), blocks, heads, size, dim).transpose(1, 2)
                            .reshape(len(paths), heads, blocks * size, dim))
            yield pair[0], pair[1]

    # ------------------------------------------------------------------ storing
    def store(self, token_ids: Sequence[int], path: list[Node], wanted: set[int], layers, row: int,
              first_column: int) -> int:
        """Keep the blocks of ``token_ids`` after ``path`` whose hash is in ``wanted``, read from row ``row``
        of a prefilled cache's ``layers`` (key and value tensors ``(rows, heads, columns, head dim)``) where
        the token right after ``path`` sits at column ``first_column``. Returns how many blocks it kept."""
        size = self.block_size
        hashes = block_hashes(token_ids, size)
        parent = path[-1] if path else self.root
        new: list[Node] = []
        for k in range(len(path), len(hashes)):
            if hashes[k] not in wanted:
                break
            tokens = tuple(token_ids[k * size:(k + 1) * size])
            node = parent.children.get(tokens)
            if node is None:
                slot = self._allocate(layers, protect=set(map(id, path + new)) | {id(parent)})
                if slot is None:
                    break
                node = Node(tokens=tokens, parent=parent, slot=slot, last_used=self.clock)
                parent.children[tokens] = node
                self.nodes += 1
                column = first_column + (k - len(path)) * size
                for pool_keys, pool_values, (keys, values) in zip(self.keys, self.values, layers):
                    pool_keys[slot].copy_(keys[row, :, column:column + size])
                    pool_values[slot].copy_(values[row, :, column:column + size])
            node.last_used = self.clock
            new.append(node)
            parent = node
        return len(new)

    def _allocate(self, layers, protect: set[int]) -> int | None:
        """A free pool slot (growing the pool, or evicting least recently used leaves); None when the
        budget cannot hold one more block."""
        if not self.keys:
            self.block_bytes = sum(self.block_size * (k.shape[1] * k.shape[3] * k.element_size()
                                                      + v.shape[1] * v.shape[3] * v.element_size())
                                   for k, v in layers)
            if self.budget_bytes < self.block_bytes * 2:
                return None
            self._grow(layers, 8)
        if not self.free and self._capacity() - 1 < self.max_blocks:
            self._grow(layers, min(self.max_blocks + 1, 2 * self._capacity()))
        if not self.free:
            self._evict(protect)
        return self.free.pop() if self.free else None

    @property
    def max_blocks(self) -> int:
        return max(0, self.budget_bytes // self.block_bytes - 1) if self.block_bytes else 0

    def _capacity(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def _grow(self, layers, slots: int) -> None:
        old = self._capacity()
        slots = max(min(slots, self.max_blocks + 1), old)
        if slots == old:
            return
        grown_keys, grown_values = [], []
        for index, (keys, values) in enumerate(layers):
            for grown, sample, pools in ((grown_keys, keys, self.keys), (grown_values, values, self.values)):
                pool = sample.new_zeros((slots, sample.shape[1], self.block_size, sample.shape[3]))
                if old:
                    pool[:old].copy_(pools[index])
                grown.append(pool)
        self.keys, self.values = grown_keys, grown_values
        self.free.extend(range(slots - 1, max(old, 1) - 1, -1))

    def _evict(self, protect: set[int]) -> None:
        """Drop least recently used leaves (blocks nothing extends) until a slot is free."""
        leaves = [node for node in self._nodes() if not node.children and id(node) not in protect]
        leaves.sort(key=lambda node: node.last_used)
        for node in leaves:
            self._remove(node)
            if self.free:
                return

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _remove(self, node: Node) -> None:
        del node.parent.children[node.tokens]
        self.free.append(node.slot)
        self.nodes -= 1

    def clear(self) -> None:
        """Forget every block and free the pools (after an out-of-memory error)."""
        self.root = Node(tokens=(), parent=None)
        self.keys, self.values, self.free = [], [], []
        self.nodes = 0
