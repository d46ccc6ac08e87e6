"""One layer group's physical blocks: free list, reference counts, prefix index and LRU.

A :class:`BlockPool` owns the ids ``[0, num_blocks)`` of one group's pool (the blocks of an
attention group, the slots of a state group: request states plus cached snapshots). Each id
is always in exactly one of three places:

* **referenced**: ``refcount > 0`` (held by live requests' spans or slots);
* **free**: ``refcount == 0`` and not in the prefix index (on the free list);
* **evictable**: ``refcount == 0`` and in the prefix index (on the LRU list), so it can be
  matched again until it is evicted to the free list.

A referenced block may also be in the index (a committed block still in use). Everything goes
through the methods below (as vLLM's ``BlockPool`` and nano-vllm's block manager do); the
manager never touches the lists. Methods assume ids were validated by the caller (the
manager checks capacity before it changes anything) but raise ``RuntimeError`` on a broken
invariant (a double free, an over-allocation) rather than corrupt the counts. Pure Python;
the hot paths (allocate, publish, run lookups) run at C speed over whole id lists.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from kvtriton.cache.hashing import BlockHash

__all__ = ["BlockPool"]


class BlockPool:
    """Free list, reference counts, hash index and LRU eviction over one group's ids.

    Free ids are handed out lowest first on a fresh pool and last-freed-first afterwards;
    when the free list runs short, the least recently used evictable blocks are evicted
    (dropped from the index) and handed out first.
    """

    __slots__ = ("_free", "_index", "_lru", "_ref", "_tag", "name", "version")

    def __init__(self, num_blocks: int, *, name: str = "?") -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"group {name!r}: num_blocks must be an int >= 0, got {num_blocks!r}")
        self.name = name
        #: incremented whenever the index changes (a publish or an eviction)
        self.version = 0
        self._ref: list[int] = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._index: dict[BlockHash, int] = {}  # hash -> the block published under it
        self._tag: dict[int, BlockHash] = {}  # block -> the hash it is published under
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable, oldest first

    def __repr__(self) -> str:
        return (
            f"BlockPool({self.name!r}: {self.num_blocks} blocks, {self.num_free} free, "
            f"{self.num_evictable} evictable, {self.num_cached} cached)"
        )

    # -- sizes ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self._ref)

    @property
    def num_free(self) -> int:
        """Blocks on the free list (unreferenced and not cached)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix index (referenced or not)."""
        return len(self._index)

    @property
    def num_evictable(self) -> int:
        """Cached blocks with no reference (evicted oldest first)."""
        return len(self._lru)

    @property
    def num_available(self) -> int:
        """Blocks an allocation could take now: free plus evictable."""
        return len(self._free) + len(self._lru)

    @property
    def num_referenced(self) -> int:
        return len(self._ref) - self.num_available

    def available_besides(self, reused: Sequence[int]) -> int:
        """Blocks still available for new allocations once ``reused`` cached blocks are taken
        (those of them that are evictable leave the LRU list)."""
        lru = self._lru
        if not lru or not reused:
            return self.num_available
        return self.num_available - len(lru.keys() & reused)

    # -- queries ----------------------------------------------------------------------------
    def refcount(self, block_id: int) -> int:
        return self._ref[block_id]

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block published under ``block_hash``, or ``None``."""
        return self._index.get(block_hash)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._index

    @property
    def contains_hash(self) -> Callable[[BlockHash], bool]:
        """``block_hash in pool`` as a C-level callable (for ``map`` over many hashes)."""
        return self._index.__contains__

    def hash_of(self, block_id: int) -> BlockHash | None:
        """The hash a block is published under, or ``None``."""
        return self._tag.get(block_id)

    def evictable_ids(self) -> tuple[int, ...]:
        """Evictable blocks, next to be evicted first."""
        return tuple(self._lru)

    def run_ids(self, hashes: Sequence[BlockHash], start: int) -> tuple[int, ...]:
        """Blocks of the longest run of ``hashes[start:]`` found in the index."""
        index = self._index
        if start >= len(hashes) or hashes[start] not in index:
            return ()
        ids = list(map(index.get, hashes[start:]))
        try:
            return tuple(ids[: ids.index(None)])
        except ValueError:
            return tuple(ids)  # type: ignore[arg-type]

    # -- references -------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` new blocks with one reference each, evicting LRU cached blocks if the free
        list runs short."""
        free = self._free
        short = n - len(free)
        if short > 0:
            if short > len(self._lru):
                raise RuntimeError(
                    f"group {self.name!r}: allocate({n}) with only {self.num_available} free "
                    "or evictable blocks"
                )
            free.extend([self._evict_one() for _ in range(short)])
        if n <= 0:
            return []
        ids = free[-n:]
        del free[-n:]
        ids.reverse()
        ref = self._ref
        for b in ids:
            ref[b] = 1
        return ids

    def take(self, ids: Iterable[int]) -> None:
        """Add a reference to (cached) blocks; an evictable one leaves the LRU list."""
        unpark = self._lru.pop
        ref = self._ref
        for b in ids:
            if ref[b] == 0:
                unpark(b, None)
            ref[b] += 1

    def release(self, ids: Sequence[int]) -> None:
        """Drop one reference from each block, last block first: a block that reaches zero
        goes to the LRU list if cached (tail blocks become the older entries, so a prefix is
        evicted from its end) and to the free list otherwise."""
        ref = self._ref
        tags = self._tag
        lru = self._lru
        free = self._free
        for b in reversed(ids):
            r = ref[b]
            if r <= 0:
                raise RuntimeError(f"group {self.name!r}: double free of block {b}")
            ref[b] = r - 1
            if r == 1:
                if b in tags:
                    lru[b] = None
                else:
                    free.append(b)

    # -- the prefix index -------------------------------------------------------------------
    def publish(self, hashes: Sequence[BlockHash], block_ids: Sequence[int]) -> int:
        """Publish referenced ``block_ids[i]`` under ``hashes[i]``, skipping a block that
        already carries a hash and a hash another block already holds (that duplicate stays
        private); returns how many entries were published."""
        index = self._index
        tags = self._tag
        n = len(hashes)
        if n != len(block_ids):
            raise ValueError(f"group {self.name!r}: {n} hashes for {len(block_ids)} blocks")
        if n and index.keys().isdisjoint(hashes) and tags.keys().isdisjoint(block_ids):
            # The common case (a commit of new blocks), at C speed: the index and the tags
            # grow by exactly n unless the hashes or the ids repeat inside the batch.
            index_before, tags_before = len(index), len(tags)
            index.update(zip(hashes, block_ids, strict=True))
            tags.update(zip(block_ids, hashes, strict=True))
            if len(index) == index_before + n and len(tags) == tags_before + n:
                self.version += n
                return n
            for block_hash in hashes:  # a repeat: undo (none was there), go one by one
                index.pop(block_hash, None)
            for block_id in block_ids:
                tags.pop(block_id, None)
        count = 0
        for block_hash, block_id in zip(hashes, block_ids, strict=True):
            if block_id not in tags and block_hash not in index:
                index[block_hash] = block_id
                tags[block_id] = block_hash
                count += 1
        self.version += count
        return count

    def touch(self, block_id: int) -> None:
        """Mark an evictable block as just used (it is evicted last)."""
        if block_id in self._lru:
            self._lru.move_to_end(block_id)

    def evict(self, num_blocks: int | None = None) -> int:
        """Evict up to ``num_blocks`` (default: all) evictable blocks, oldest first, to the
        free list; returns how many were evicted."""
        count = len(self._lru) if num_blocks is None else min(num_blocks, len(self._lru))
        self._free.extend([self._evict_one() for _ in range(count)])
        return count

    def _evict_one(self) -> int:
        block_id, _ = self._lru.popitem(last=False)
        del self._index[self._tag.pop(block_id)]
        self.version += 1
        return block_id

    # -- checks -----------------------------------------------------------------------------
    def check_invariants(self, expected_refs: Sequence[int]) -> None:
        """Raise ``AssertionError`` describing the first broken invariant: reference counts
        equal ``expected_refs`` (what the live requests hold); each block is referenced,
        free or evictable (exactly one); the index and the block tags agree."""
        name = self.name
        ref = self._ref
        assert ref == list(expected_refs), (
            f"group {name!r}: refcounts {_diff(ref, expected_refs)} differ from live spans"
        )
        free = set(self._free)
        assert len(free) == len(self._free), f"group {name!r}: duplicate free ids"
        lru = self._lru
        for b in range(len(ref)):
            places = (ref[b] > 0) + (b in lru) + (b in free)
            assert places == 1, (
                f"group {name!r}: block {b} is in {places} of referenced/evictable/free"
            )
            tag = self._tag.get(b)
            if b in lru:
                assert tag is not None, f"group {name!r}: evictable block {b} has no hash"
            if b in free:
                assert tag is None, f"group {name!r}: free block {b} still has a hash"
            if tag is not None:
                assert self._index.get(tag) == b, (
                    f"group {name!r}: block {b}'s hash is not indexed to it"
                )
        assert len(self._index) == len(self._tag), f"group {name!r}: index and block tags disagree"


def _diff(a: Sequence[int], b: Sequence[int]) -> str:
    bad = [(i, x, y) for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y][:5]
    return ", ".join(f"block {i}: {x} (expected {y})" for i, x, y in bad)
