"""Per-kind behaviour of one layer group inside the cache manager.

The manager builds one object per layer group, chosen once from the group's kind
(:data:`GROUP_CACHES`, as vLLM maps KV spec types to per-type managers), and never switches on
the kind again:

* :class:`FullAttentionCache`: matches the longest run of cached blocks from block 0; its run
  caps the single boundary;
* :class:`SlidingWindowCache`: matches the longest run from the block holding
  ``needed.start``; releases blocks that leave the window (:meth:`~PagedGroupCache.slide`);
  constrains the single boundary by what its window reads;
* :class:`StateCache`: one slot per request; hits only on a snapshot at exactly ``P``;
  snapshots the request's state at block boundaries on commit.

Each owns its group's :class:`~kvtriton.cache.block_pool.BlockPool` (blocks, or state slots)
and works on the manager's per-request bookkeeping (:class:`RequestBlocks`). Pure Python.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from kvtriton.cache.block_pool import BlockPool
from kvtriton.cache.hashing import BlockHash, ExtraKey
from kvtriton.ranges import BlockSpan, GroupKind, ceil_div
from kvtriton.spec import LayerGroup

__all__ = [
    "GROUP_CACHES",
    "FullAttentionCache",
    "GroupAllocation",
    "GroupCache",
    "GroupMatch",
    "OutOfBlocksError",
    "PagedGroupCache",
    "RequestBlocks",
    "SlidingWindowCache",
    "StateCache",
    "make_group_cache",
]

RequestId = Hashable


class OutOfBlocksError(RuntimeError):
    """A group has too few free plus evictable blocks (or state slots); nothing was changed.

    Attributes: ``request_id``, ``group``, ``needed``, ``available`` (blocks or slots).
    """

    def __init__(
        self, request_id: RequestId, group: str, needed: int, available: int, detail: str
    ) -> None:
        self.request_id = request_id
        self.group = group
        self.needed = needed
        self.available = available
        super().__init__(
            f"request {request_id!r}: group {group!r} needs {needed} new "
            f"{'slot' if 'slot' in detail else 'block'}{'s' if needed != 1 else ''} but only "
            f"{available} are free or evictable ({detail}); nothing was allocated"
        )


class RequestBlocks:
    """The manager's mutable record of one live request (blocks, slots, hashes, counts)."""

    __slots__ = (
        "blocks",
        "committed",
        "extra_key",
        "first_block",
        "hashes",
        "num_draft",
        "num_tokens",
        "owns_tokens",
        "request_id",
        "root",
        "slots",
        "token_bytes",
        "valid_from",
    )

    def __init__(
        self,
        request_id: RequestId,
        extra_key: ExtraKey,
        root: BlockHash,
        token_bytes: array,
        hashes: list[BlockHash],
        num_tokens: int,
        num_draft: int,
    ) -> None:
        self.request_id = request_id
        self.extra_key = extra_key
        self.root = root
        #: the prompt's encoded ids, shared with the match until the first append copies them
        self.token_bytes = token_bytes
        self.owns_tokens = False
        self.hashes = hashes
        self.num_tokens = num_tokens
        self.num_draft = num_draft
        #: attention groups: logical block of ``blocks[0]``, the physical ids, and the first
        #: position whose KV is valid (commit publishes only blocks wholly at or after it)
        self.first_block: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.valid_from: dict[str, int] = {}
        #: state groups: the request's slot
        self.slots: dict[str, int] = {}
        self.committed = 0

    def extend_tokens(self, data: array) -> None:
        """Append encoded ids (copying the shared prompt array first)."""
        if not self.owns_tokens:
            self.token_bytes = array("Q", self.token_bytes)
            self.owns_tokens = True
        self.token_bytes += data

    @property
    def num_known(self) -> int:
        """Positions whose token ids are known (commit stops there)."""
        return len(self.token_bytes)

    def span(self, name: str) -> BlockSpan:
        return _span(self.first_block[name], self.blocks[name])


def _span(first_block: int, block_ids: Sequence[int]) -> BlockSpan:
    """A BlockSpan from ids the manager owns (ints >= 0): skips the per-id validation."""
    span = object.__new__(BlockSpan)
    object.__setattr__(span, "first_block", first_block)
    object.__setattr__(span, "block_ids", tuple(block_ids))
    return span


@dataclass(frozen=True, slots=True)
class GroupMatch:
    """What one group's prefix cache holds for a prompt of ``P`` tokens.

    Attributes:
        cached: the per-group count in tokens (DESIGN.md §1).
        blocks: logical blocks found (attention groups; ``None`` for a state group).
        ids: physical ids of the found blocks, or the snapshot slot at ``P`` (state).
        hit: state groups: a snapshot at exactly ``P`` exists (``None`` for attention).
        boundary_cap: blocks below which the single boundary must stay (full attention's
            run from block 0), or ``None``.
    """

    cached: int
    blocks: range | None
    ids: tuple[int, ...]
    hit: bool | None = None
    boundary_cap: int | None = None


@dataclass(frozen=True, slots=True)
class GroupAllocation:
    """One group's share of an allocation, planned before anything changes.

    ``first``: the span's first logical block; ``reused``: cached blocks (or the snapshot
    slot) taken; ``fresh``: new blocks to allocate; ``taken``: logical blocks reused;
    ``cached``: the count the allocation reused; ``valid_from``: first valid position;
    ``hit``: a state restored from a snapshot.
    """

    first: int
    reused: tuple[int, ...]
    fresh: int
    taken: range | None
    cached: int
    valid_from: int = 0
    hit: bool | None = None


class GroupCache:
    """One layer group in the cache manager: its block pool and its kind's rules."""

    kind: ClassVar[GroupKind]
    #: a window the single-boundary search checks (sliding groups), else ``None``
    window: int | None = None
    #: the single boundary needs a snapshot at ``c`` (state groups)
    snapshots: ClassVar[bool] = False
    #: what a pool id is called in messages
    unit: ClassVar[str] = "blocks"

    def __init__(
        self,
        group: LayerGroup,
        num_blocks: int,
        tokens_per_block: int,
        copy_state: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.group = group
        self.name = group.name
        self.tokens_per_block = tokens_per_block
        self.pool = BlockPool(num_blocks, name=group.name)
        #: copies a state slot to another (``(group, src, dst)``), when the manager owns pools
        self.copy_state = copy_state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pool!r})"

    def detail(self) -> str:
        """The pool's state, for :class:`OutOfBlocksError`."""
        pool = self.pool
        return (
            f"pool of {pool.num_blocks} {self.unit}: {pool.num_free} free, "
            f"{pool.num_evictable} cached and unreferenced, {pool.num_referenced} referenced"
        )

    def match(self, hashes: Sequence[BlockHash], num_tokens: int) -> GroupMatch:
        raise NotImplementedError

    def plan(
        self,
        request_id: RequestId,
        match: GroupMatch,
        *,
        boundary: int | None,
        hashes: Sequence[BlockHash],
        num_tokens: int,
        end_block: int,
        prefill: bool,
    ) -> GroupAllocation:
        """What this group reuses and allocates for a new request (``boundary``: the single
        boundary ``c`` in single-boundary mode, ``None`` per group); raises
        :class:`OutOfBlocksError` when the pool lacks room. Changes nothing."""
        raise NotImplementedError

    def apply(self, req: RequestBlocks, plan: GroupAllocation) -> None:
        """Take the reused blocks and allocate the fresh ones of ``plan`` for ``req``."""
        raise NotImplementedError

    def commit(self, req: RequestBlocks, lo_block: int, num_full_blocks: int, at_end: bool) -> int:
        """Publish what ``req`` committed (full blocks ``[lo_block, num_full_blocks)``;
        ``at_end``: the commit reached the sequence's end at a block boundary); returns the
        entries published."""
        raise NotImplementedError

    def free(self, req: RequestBlocks) -> None:
        """Drop ``req``'s references."""
        raise NotImplementedError

    def held_ids(self, req: RequestBlocks) -> Sequence[int]:
        """The ids ``req`` references in this pool."""
        raise NotImplementedError


class PagedGroupCache(GroupCache):
    """An attention group: a span of paged blocks per request, matched by block hashes."""

    def first_block(self, num_tokens: int) -> int:
        """The first logical block a request of ``num_tokens`` positions holds."""
        return self.group.rule.first_block(self.group, num_tokens, self.tokens_per_block)

    def _run(self, hashes: Sequence[BlockHash], start: int) -> tuple[range, tuple[int, ...]]:
        found = self.pool.run_ids(hashes, start)
        return range(start, start + len(found)), found

    def plan(
        self,
        request_id: RequestId,
        match: GroupMatch,
        *,
        boundary: int | None,
        hashes: Sequence[BlockHash],
        num_tokens: int,
        end_block: int,
        prefill: bool,
    ) -> GroupAllocation:
        bsz = self.tokens_per_block
        first = self.first_block(num_tokens)
        found = match.blocks
        assert found is not None
        if boundary is None:
            take, cached = found, match.cached
        else:
            stop = max(found.start, min(found.stop, boundary // bsz))
            take, cached = range(found.start, stop), boundary
        reused = match.ids[: len(take)]
        fresh = (end_block - first) - len(reused)
        available = self.pool.available_besides(reused)
        if fresh > available:
            raise OutOfBlocksError(request_id, self.name, fresh, available, self.detail())
        # A receiver writes only the transfer range [max(cached, needed.start), P) and the
        # reused blocks: the head of a fresh span before needed.start is never valid.
        needed_start = self.group.rule.needed(self.group, num_tokens).start
        valid = first * bsz if (prefill or reused) else needed_start
        return GroupAllocation(first, reused, fresh, take, cached, valid)

    def apply(self, req: RequestBlocks, plan: GroupAllocation) -> None:
        self.pool.take(plan.reused)
        req.first_block[self.name] = plan.first
        req.blocks[self.name] = [*plan.reused, *self.pool.allocate(plan.fresh)]
        req.valid_from[self.name] = plan.valid_from

    def growth(self, req: RequestBlocks, end_block: int) -> int:
        """Blocks to add (negative: drop from the tail) for the span to end at ``end_block``."""
        return end_block - (req.first_block[self.name] + len(req.blocks[self.name]))

    def resize(self, req: RequestBlocks, extra: int) -> None:
        """Add ``extra`` fresh blocks at the tail (``extra < 0``: release ``-extra``)."""
        blocks = req.blocks[self.name]
        if extra > 0:
            blocks.extend(self.pool.allocate(extra))
        elif extra < 0:
            self.pool.release(blocks[extra:])
            del blocks[extra:]

    def commit(self, req: RequestBlocks, lo_block: int, num_full_blocks: int, at_end: bool) -> int:
        first = req.first_block[self.name]
        blocks = req.blocks[self.name]
        lo = max(lo_block, first, ceil_div(req.valid_from[self.name], self.tokens_per_block))
        hi = min(num_full_blocks, first + len(blocks))
        if hi <= lo:
            return 0
        return self.pool.publish(req.hashes[lo:hi], blocks[lo - first : hi - first])

    def slide(self, req: RequestBlocks) -> int | None:
        """Release blocks wholly before the window of position ``L``; the count released, or
        ``None`` for a group without a window."""
        return None

    def free(self, req: RequestBlocks) -> None:
        self.pool.release(req.blocks[self.name])

    def held_ids(self, req: RequestBlocks) -> Sequence[int]:
        return req.blocks[self.name]

    def check_span(self, req: RequestBlocks) -> None:
        """``AssertionError`` unless ``req``'s span is contiguous to ``ceil((L + k)/B)``,
        starts at or before ``needed.start`` and holds only blocks of its own prefix."""
        bsz = self.tokens_per_block
        rid, name = req.request_id, self.name
        first = req.first_block[name]
        blocks = req.blocks[name]
        end = ceil_div(req.num_tokens + req.num_draft, bsz)
        assert first + len(blocks) == end, (
            f"request {rid!r}: group {name!r} span ends at block {first + len(blocks)}, "
            f"expected {end}"
        )
        need = self.group.rule.needed(self.group, req.num_tokens)
        assert first * bsz <= need.start, (
            f"request {rid!r}: group {name!r} span starts after needed {need}"
        )
        for i, b in enumerate(blocks):
            tag = self.pool.hash_of(b)
            logical = first + i
            if tag is not None and logical < len(req.hashes):
                assert tag == req.hashes[logical], (
                    f"request {rid!r}: group {name!r} block {b} at logical {logical} is "
                    "published under another prefix's hash"
                )


class FullAttentionCache(PagedGroupCache):
    """Full attention: reuse = the longest run of cached blocks from block 0."""

    kind = GroupKind.FULL

    def match(self, hashes: Sequence[BlockHash], num_tokens: int) -> GroupMatch:
        blocks, ids = self._run(hashes, 0)
        run = len(ids)
        return GroupMatch(run * self.tokens_per_block, blocks, ids, boundary_cap=run)


class SlidingWindowCache(PagedGroupCache):
    """Sliding window ``W``: reuse = the longest run from the block holding
    ``needed.start = max(0, P + 1 - W)`` (blocks before the window do not matter)."""

    kind = GroupKind.SLIDING

    def __init__(
        self,
        group: LayerGroup,
        num_blocks: int,
        tokens_per_block: int,
        copy_state: Callable[[str, int, int], None] | None = None,
    ) -> None:
        super().__init__(group, num_blocks, tokens_per_block, copy_state)
        self.window = group.window

    def match(self, hashes: Sequence[BlockHash], num_tokens: int) -> GroupMatch:
        start = self.group.rule.needed(self.group, num_tokens).start
        blocks, ids = self._run(hashes, start // self.tokens_per_block)
        # Nothing needed lies below needed.start: a miss still counts it as cached.
        cached = blocks.stop * self.tokens_per_block if ids else start
        return GroupMatch(cached, blocks, ids)

    def slide(self, req: RequestBlocks) -> int:
        first = req.first_block[self.name]
        drop = self.first_block(req.num_tokens) - first
        if drop > 0:
            blocks = req.blocks[self.name]
            self.pool.release(blocks[:drop])
            del blocks[:drop]
            req.first_block[self.name] = first + drop
        return max(drop, 0)


class StateCache(GroupCache):
    """A state group: one slot per request; snapshots of states at block boundaries,
    published under the prefix's block hash, restored on a hit at exactly ``P``."""

    kind = GroupKind.STATE
    snapshots = True
    unit = "slots"

    def _copy_state(self, src: int, dst: int) -> None:
        if self.copy_state is not None:
            self.copy_state(self.name, src, dst)

    def match(self, hashes: Sequence[BlockHash], num_tokens: int) -> GroupMatch:
        at_boundary = num_tokens % self.tokens_per_block == 0 and len(hashes) > 0
        slot = self.pool.lookup(hashes[-1]) if at_boundary else None
        hit = slot is not None
        return GroupMatch(num_tokens if hit else 0, None, () if slot is None else (slot,), hit)

    def plan(
        self,
        request_id: RequestId,
        match: GroupMatch,
        *,
        boundary: int | None,
        hashes: Sequence[BlockHash],
        num_tokens: int,
        end_block: int,
        prefill: bool,
    ) -> GroupAllocation:
        hit = bool(match.hit) if boundary is None else boundary == num_tokens
        snapshot = self.pool.lookup(hashes[-1]) if hit else None
        available = self.pool.num_available - (1 if snapshot is not None else 0)
        if available < 1:
            raise OutOfBlocksError(
                request_id, self.name, 1, available, self.detail() + "; state slot"
            )
        cached = (num_tokens if hit else 0) if boundary is None else boundary
        reused = () if snapshot is None else (snapshot,)
        return GroupAllocation(0, reused, 1, None, cached, hit=hit)

    def apply(self, req: RequestBlocks, plan: GroupAllocation) -> None:
        pool = self.pool
        pool.take(plan.reused)  # pin the snapshot while the request's own slot is taken
        slot = pool.allocate(1)[0]
        for snapshot in plan.reused:
            self._copy_state(snapshot, slot)
        pool.release(plan.reused)  # back on the LRU list, now the newest entry
        req.slots[self.name] = slot

    def commit(self, req: RequestBlocks, lo_block: int, num_full_blocks: int, at_end: bool) -> int:
        if not at_end:
            return 0
        pool = self.pool
        key = req.hashes[num_full_blocks - 1]
        existing = pool.lookup(key)
        if existing is not None:
            pool.touch(existing)
            return 0
        if pool.num_available < 1:
            return 0  # no slot to spare: the snapshot is skipped
        snap = pool.allocate(1)[0]
        self._copy_state(req.slots[self.name], snap)
        pool.publish([key], [snap])
        pool.release([snap])
        return 1

    def free(self, req: RequestBlocks) -> None:
        self.pool.release([req.slots[self.name]])

    def held_ids(self, req: RequestBlocks) -> Sequence[int]:
        return (req.slots[self.name],)


#: The group cache class of each kind.
GROUP_CACHES: dict[GroupKind, type[GroupCache]] = {
    GroupKind.FULL: FullAttentionCache,
    GroupKind.SLIDING: SlidingWindowCache,
    GroupKind.STATE: StateCache,
}


def make_group_cache(
    group: LayerGroup,
    num_blocks: int,
    tokens_per_block: int,
    copy_state: Callable[[str, int, int], None] | None = None,
) -> GroupCache:
    """The group cache of ``group``'s kind over ``num_blocks`` blocks (or slots);
    ``copy_state(group, src, dst)`` copies state slots (state groups, when pools exist)."""
    return GROUP_CACHES[group.kind](group, num_blocks, tokens_per_block, copy_state)
