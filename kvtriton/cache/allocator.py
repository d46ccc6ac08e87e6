"""Per-group block bookkeeping: a reference-counted free list and a prefix index with LRU.

A physical block (or a state slot) is always in exactly one of three places:

* **referenced**: ``refcount > 0`` (held by live requests' spans);
* **free**: ``refcount == 0`` and not in the prefix index (on :class:`BlockAllocator`'s free list);
* **evictable**: ``refcount == 0`` and in the prefix index (on :class:`PrefixCache`'s LRU list),
  so it can be matched again until it is evicted to the free list.

A referenced block may also be in the index (a committed block still in use). Pure Python.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvtriton.cache.hashing import BlockHash

__all__ = ["BlockAllocator", "PrefixCache"]


class BlockAllocator:
    """Reference counts and a free list over physical ids ``[0, num_blocks)`` of one group.

    Free ids are handed out lowest first on a fresh allocator and last-freed-first afterwards.
    Methods assume their arguments were validated by the caller (the manager checks capacity
    and ids before it changes anything) but still raise ``RuntimeError`` on a broken invariant
    (a double free, an over-allocation) rather than corrupt the counts.
    """

    __slots__ = ("_free", "_ref", "name")

    def __init__(self, num_blocks: int, *, name: str = "?") -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"group {name!r}: num_blocks must be an int >= 0, got {num_blocks!r}")
        self.name = name
        self._ref: list[int] = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_blocks(self) -> int:
        return len(self._ref)

    @property
    def num_free(self) -> int:
        """Blocks on the free list (unreferenced and not cached)."""
        return len(self._free)

    @property
    def num_referenced(self) -> int:
        return sum(1 for r in self._ref if r)

    def refcount(self, block_id: int) -> int:
        return self._ref[block_id]

    def free_ids(self) -> tuple[int, ...]:
        return tuple(self._free)

    def allocate(self, n: int) -> list[int]:
        """Pop ``n`` free blocks and give each one reference."""
        if n > len(self._free):
            raise RuntimeError(
                f"group {self.name!r}: allocate({n}) with only {len(self._free)} free blocks"
            )
        if n <= 0:
            return []
        ids = self._free[-n:]
        del self._free[-n:]
        ids.reverse()
        ref = self._ref
        for b in ids:
            ref[b] = 1
        return ids

    def incref(self, ids: Iterable[int]) -> None:
        ref = self._ref
        for b in ids:
            ref[b] += 1

    def decref(self, ids: Iterable[int]) -> list[int]:
        """Drop one reference from each id; returns the ids that reached zero (in order)."""
        ref = self._ref
        zero: list[int] = []
        for b in ids:
            r = ref[b]
            if r <= 0:
                raise RuntimeError(f"group {self.name!r}: double free of block {b}")
            ref[b] = r - 1
            if r == 1:
                zero.append(b)
        return zero

    def push_free(self, ids: Iterable[int]) -> None:
        """Return unreferenced, uncached blocks to the free list."""
        for b in ids:
            if self._ref[b]:
                raise RuntimeError(
                    f"group {self.name!r}: block {b} freed with {self._ref[b]} references"
                )
            self._free.append(b)


class PrefixCache:
    """One group's index ``block hash -> physical id`` plus the LRU of evictable entries.

    Entries are published with :meth:`insert` (commit) and found with :meth:`lookup`. An entry
    whose block has no reference sits on the LRU list (:meth:`park`), oldest first; taking a
    reference again removes it (:meth:`unpark`). :meth:`evict_lru` drops the oldest entry from
    the index and returns its block, which the caller puts back on the free list.
    """

    __slots__ = ("_hash", "_index", "_lru", "name", "version")

    def __init__(self, num_blocks: int, *, name: str = "?") -> None:
        self.name = name
        #: incremented whenever the index changes (an insert or an eviction)
        self.version = 0
        self._index: dict[BlockHash, int] = {}
        self._hash: dict[int, BlockHash] = {}  # block id -> the hash it is published under
        self._lru: OrderedDict[int, None] = OrderedDict()

    # -- queries ----------------------------------------------------------------------------
    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._index.get(block_hash)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._index

    def hash_of(self, block_id: int) -> BlockHash | None:
        """The hash a block was published under, or ``None``."""
        return self._hash.get(block_id)

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._lru

    @property
    def num_cached(self) -> int:
        """Blocks in the index (referenced or not)."""
        return len(self._index)

    @property
    def num_evictable(self) -> int:
        """Cached blocks with no reference (evicted oldest first)."""
        return len(self._lru)

    def lru_ids(self) -> tuple[int, ...]:
        """Evictable blocks, next to be evicted first."""
        return tuple(self._lru)

    def items(self) -> Iterable[tuple[BlockHash, int]]:
        return self._index.items()

    def run_length(self, hashes: Sequence[BlockHash], start: int, stop: int | None = None) -> int:
        """How many consecutive ``hashes[start:stop]`` are in the index."""
        index = self._index
        end = len(hashes) if stop is None else min(stop, len(hashes))
        i = start
        while i < end and hashes[i] in index:
            i += 1
        return i - start

    def run_ids(self, hashes: Sequence[BlockHash], start: int) -> tuple[int, ...]:
        """Physical ids of the longest run of ``hashes[start:]`` found in the index."""
        index = self._index
        if start >= len(hashes) or hashes[start] not in index:
            return ()
        ids = list(map(index.get, hashes[start:]))
        try:
            return tuple(ids[: ids.index(None)])
        except ValueError:
            return tuple(ids)

    # -- updates ----------------------------------------------------------------------------
    def insert(self, block_hash: BlockHash, block_id: int) -> bool:
        """Publish ``block_id`` under ``block_hash``; ``False`` (no change) if the hash is
        already published by another block (the duplicate stays private) or the block
        already carries a hash."""
        if block_hash in self._index or block_id in self._hash:
            return False
        self._index[block_hash] = block_id
        self._hash[block_id] = block_hash
        self.version += 1
        return True

    def insert_many(self, hashes: Sequence[BlockHash], block_ids: Sequence[int]) -> int:
        """:meth:`insert` pairwise, skipping blocks that already carry a hash; returns how many
        entries were published."""
        index = self._index
        tags = self._hash
        if len(hashes) != len(block_ids):
            raise ValueError(
                f"group {self.name!r}: {len(hashes)} hashes for {len(block_ids)} blocks"
            )
        if (
            tags.keys().isdisjoint(block_ids)
            and index.keys().isdisjoint(hashes)
            and len(set(hashes)) == len(hashes)
            and len(set(block_ids)) == len(block_ids)
        ):
            index.update(zip(hashes, block_ids, strict=True))  # the common case, at C speed
            tags.update(zip(block_ids, hashes, strict=True))
            count = len(hashes)
        else:
            count = 0
            for block_hash, block_id in zip(hashes, block_ids, strict=True):
                if block_id not in tags and block_hash not in index:
                    index[block_hash] = block_id
                    tags[block_id] = block_hash
                    count += 1
        self.version += count
        return count

    def park(self, block_id: int) -> None:
        """A cached block lost its last reference: it becomes the newest evictable entry."""
        self._lru[block_id] = None

    def unpark(self, block_id: int) -> None:
        """A cached block is referenced again (a no-op if it was not evictable)."""
        self._lru.pop(block_id, None)

    def touch(self, block_id: int) -> None:
        """Mark an evictable entry as just used."""
        if block_id in self._lru:
            self._lru.move_to_end(block_id)

    def evict_lru(self) -> int:
        """Drop the oldest evictable entry from the index; returns its (now free) block."""
        if not self._lru:
            raise RuntimeError(f"group {self.name!r}: nothing to evict")
        block_id, _ = self._lru.popitem(last=False)
        block_hash = self._hash.pop(block_id)
        del self._index[block_hash]
        self.version += 1
        return block_id
