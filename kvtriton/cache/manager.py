"""The paged KV cache manager: per-layer-group prefix reuse, window release, state snapshots.

See the package docstring (:mod:`kvtriton.cache`) for the request life cycle and the matching
rules. Bookkeeping is pure Python; when the manager owns :class:`~kvtriton.cache.pools.CachePools`
it also copies state snapshots between state slots (plain torch indexing).
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtriton.cache.allocator import BlockAllocator, PrefixCache
from kvtriton.cache.hashing import (
    BlockHash,
    ExtraKey,
    chain_hashes,
    root_hash,
    token_array,
)
from kvtriton.cache.pools import CachePools, resolve_num_blocks
from kvtriton.plan import Mode
from kvtriton.ranges import BlockSpan, ceil_div, check_count, needed_range
from kvtriton.spec import KVCacheSpec, LayerGroup

__all__ = [
    "Allocation",
    "KVCacheManager",
    "OutOfBlocksError",
    "PrefixMatch",
    "RequestId",
    "RequestState",
]

RequestId = Hashable
MODES: tuple[str, ...] = ("per_group", "single_boundary")


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


@dataclass(frozen=True)
class PrefixMatch:
    """What the prefix cache holds for a prompt, per layer group and as one boundary.

    Attributes:
        num_tokens: prompt length ``P``.
        tokens_per_block: ``B`` of the manager's spec.
        cached: ``{group: count}`` in tokens, DESIGN.md §1 semantics (the receiver holds every
            *needed* position below it): full attention ``k*B`` for a run of ``k`` cached blocks
            from block 0; sliding window ``(s + k)*B`` for a run of ``k`` cached blocks from
            the block ``s`` holding ``needed.start`` (``needed.start`` itself when ``k = 0``:
            nothing needed lies below it); state ``P`` on a snapshot at exactly ``P``, else 0.
        matched_blocks: ``{attention group: logical blocks found}`` (``range(0, k)`` or
            ``range(s, s + k)``).
        state_hits: ``{state group: whether a snapshot at exactly P exists}``.
        boundary: the single-boundary value ``c`` (see :meth:`KVCacheManager.match`).
        block_ids: ``{group: physical ids}`` of the matched blocks (in ``matched_blocks``
            order) or of the snapshot slot at ``P`` (a state group; empty on a miss). Valid
            until the cache changes.
        extra_key: the key the hashes were rooted at.
        hashes, token_bytes, version, owner: the prompt's block hashes and encoded ids, and
            the manager and index version the match was taken at; they let
            :meth:`KVCacheManager.allocate` take this match instead of the token ids.
    """

    num_tokens: int
    tokens_per_block: int
    cached: Mapping[str, int]
    matched_blocks: Mapping[str, range]
    state_hits: Mapping[str, bool]
    boundary: int
    block_ids: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    extra_key: ExtraKey = None
    hashes: tuple[BlockHash, ...] = field(default=(), repr=False)
    token_bytes: array = field(default_factory=lambda: array("Q"), repr=False, compare=False)
    version: int = field(default=-1, repr=False, compare=False)
    owner: object = field(default=None, repr=False, compare=False)

    def cached_tokens(self, mode: Mode = "per_group") -> dict[str, int] | int:
        """The ``cached_tokens`` argument of :func:`kvtriton.plan.plan_transfer` for ``mode``."""
        if mode == "per_group":
            return dict(self.cached)
        if mode == "single_boundary":
            return self.boundary
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    @property
    def num_full_blocks(self) -> int:
        """Full blocks of the prompt, ``P // B`` (the blocks that have a hash)."""
        return len(self.hashes)


@dataclass(frozen=True)
class Allocation(Mapping[str, BlockSpan]):
    """What :meth:`KVCacheManager.allocate` gave a request; a mapping ``{group: BlockSpan}``.

    Attributes:
        request_id, num_tokens (``P``), num_draft_tokens (``k``), mode.
        spans: ``{attention group: span}``; each covers logical blocks
            ``[needed(g, P).start // B, ceil((P + k) / B))`` (``first_block`` 0 for full attention).
        state_slots: ``{state group: the request's slot}``.
        cached: ``{group: count}`` the allocation reused, in tokens: the match's per-group counts
            in ``per_group`` mode, the boundary ``c`` for every group in ``single_boundary`` mode.
        reused_blocks: ``{attention group: logical blocks taken from the prefix cache}`` (the
            transfer never writes them).
        state_hits: ``{state group: whether the slot was restored from a snapshot at P}``.
        match: the :class:`PrefixMatch` the allocation was made from.
    """

    request_id: RequestId
    num_tokens: int
    num_draft_tokens: int
    mode: Mode
    spans: Mapping[str, BlockSpan]
    state_slots: Mapping[str, int]
    cached: Mapping[str, int]
    reused_blocks: Mapping[str, range]
    state_hits: Mapping[str, bool]
    match: PrefixMatch

    def __getitem__(self, group: str) -> BlockSpan:
        try:
            return self.spans[group]
        except KeyError:
            raise KeyError(
                f"request {self.request_id!r}: no block span for group {group!r}; "
                f"attention groups: {list(self.spans)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def boundary(self) -> int:
        return self.match.boundary

    def cached_tokens(self) -> dict[str, int] | int:
        """``cached_tokens`` for :func:`kvtriton.plan.plan_transfer` in this allocation's mode."""
        if self.mode == "per_group":
            return dict(self.cached)
        return self.match.boundary


@dataclass(frozen=True)
class RequestState:
    """A read-only snapshot of one live request.

    Attributes:
        num_tokens: sequence length ``L`` (prompt plus appended positions).
        num_draft_tokens: extra positions ``[L, L + k)`` the spans also cover.
        num_known_tokens: positions whose token ids the manager knows (commit stops there).
        committed_tokens: the largest ``num_tokens`` committed so far.
        spans: ``{attention group: BlockSpan}``; state_slots: ``{state group: slot}``.
        valid_from: ``{attention group: first position whose KV is valid}`` (commit publishes
            only blocks wholly at or after it).
    """

    request_id: RequestId
    num_tokens: int
    num_draft_tokens: int
    num_known_tokens: int
    committed_tokens: int
    spans: Mapping[str, BlockSpan]
    state_slots: Mapping[str, int]
    valid_from: Mapping[str, int]
    extra_key: ExtraKey = None


class _Group:
    __slots__ = ("alloc", "cache", "group", "name")

    def __init__(self, group: LayerGroup, num_blocks: int) -> None:
        self.group = group
        self.name = group.name
        self.alloc = BlockAllocator(num_blocks, name=group.name)
        self.cache = PrefixCache(num_blocks, name=group.name)

    @property
    def available(self) -> int:
        return self.alloc.num_free + self.cache.num_evictable

    def take(self, ids: Sequence[int]) -> None:
        """Add a reference to cached blocks (they leave the LRU list)."""
        unpark = self.cache.unpark
        ref = self.alloc._ref
        for b in ids:
            if ref[b] == 0:
                unpark(b)
            ref[b] += 1

    def fresh(self, n: int) -> list[int]:
        """``n`` new blocks with one reference each, evicting LRU cached blocks if needed."""
        short = n - self.alloc.num_free
        if short > 0:
            self.alloc.push_free([self.cache.evict_lru() for _ in range(short)])
        return self.alloc.allocate(n)

    def release(self, ids: Sequence[int]) -> None:
        """Drop one reference from each block, last block first: a block that reaches zero
        goes to the LRU list if cached (tail blocks become the older entries, so a prefix is
        evicted from its end) and to the free list otherwise."""
        ref = self.alloc._ref
        tags = self.cache._hash
        lru = self.cache._lru
        free = self.alloc._free
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

    def detail(self) -> str:
        kind = "slots" if self.group.kind == "state" else "blocks"
        return (
            f"pool of {self.alloc.num_blocks} {kind}: {self.alloc.num_free} free, "
            f"{self.cache.num_evictable} cached and unreferenced, "
            f"{self.alloc.num_blocks - self.available} referenced"
        )


class _Request:
    __slots__ = (
        "blocks",
        "committed",
        "extra_key",
        "first_block",
        "hashes",
        "num_draft",
        "num_tokens",
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
        self.token_bytes = array("Q", token_bytes)
        self.hashes = hashes
        self.num_tokens = num_tokens
        self.num_draft = num_draft
        self.first_block: dict[str, int] = {}
        self.blocks: dict[str, list[int]] = {}
        self.slots: dict[str, int] = {}
        self.valid_from: dict[str, int] = {}
        self.committed = 0

    @property
    def num_known(self) -> int:
        return len(self.token_bytes)

    def span(self, name: str) -> BlockSpan:
        return _span(self.first_block[name], self.blocks[name])


def _span(first_block: int, block_ids: Sequence[int]) -> BlockSpan:
    """A BlockSpan from ids the manager owns (ints >= 0): skips the per-id validation."""
    span = object.__new__(BlockSpan)
    object.__setattr__(span, "first_block", first_block)
    object.__setattr__(span, "block_ids", tuple(block_ids))
    return span


class KVCacheManager:
    """Paged KV cache of one rank: block allocators and prefix indexes, one per layer group.

    Args:
        spec: the local (possibly sharded) spec; all groups share ``spec.tokens_per_block``.
        num_blocks: blocks per attention group (an int for all or ``{group: count}``);
            taken from ``pools`` when those are given.
        num_state_slots: slots per state group (live requests' states plus cached snapshots).
        pools: optional tensors (:func:`~kvtriton.cache.pools.allocate_pools`); the manager
            then copies state snapshots itself. Without pools it is bookkeeping only.
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int | Mapping[str, int] | None = None,
        *,
        num_state_slots: int | None = None,
        pools: CachePools | None = None,
    ) -> None:
        if not isinstance(spec, KVCacheSpec):
            raise TypeError(f"spec must be a KVCacheSpec, got {type(spec).__name__}")
        attention = [g for g in spec.groups if g.kind != "state"]
        states = [g for g in spec.groups if g.kind == "state"]
        if pools is not None:
            if pools.spec.digest() != spec.digest():
                raise ValueError(
                    f"pools were made for spec {pools.spec.name!r} ({pools.spec.digest()}), "
                    f"not {spec.name!r} ({spec.digest()})"
                )
            pool_blocks = pools.num_blocks
            if num_blocks is not None and resolve_num_blocks(spec, num_blocks) != pool_blocks:
                raise ValueError(
                    f"num_blocks {num_blocks!r} disagrees with the pools ({pool_blocks})"
                )
            if num_state_slots is not None and num_state_slots != pools.num_state_slots:
                raise ValueError(
                    f"num_state_slots {num_state_slots} disagrees with the pools "
                    f"({pools.num_state_slots})"
                )
            blocks = pool_blocks
            slots = pools.num_state_slots
        else:
            if attention and num_blocks is None:
                raise ValueError(
                    f"spec {spec.name!r} has attention groups: give num_blocks (or pools)"
                )
            blocks = resolve_num_blocks(spec, num_blocks) if attention else {}  # type: ignore[arg-type]
            slots = check_count(
                "num_state_slots", 0 if num_state_slots is None else num_state_slots, 0
            )
        if states and slots < 1:
            raise ValueError(
                f"spec {spec.name!r} has state groups {[g.name for g in states]}: "
                "num_state_slots must be >= 1"
            )
        self.spec = spec
        self.pools = pools
        self.tokens_per_block = spec.tokens_per_block
        self._groups: dict[str, _Group] = {
            g.name: _Group(g, slots if g.kind == "state" else blocks[g.name]) for g in spec.groups
        }
        self._attention = [self._groups[g.name] for g in attention]
        self._states = [self._groups[g.name] for g in states]
        self._requests: dict[RequestId, _Request] = {}
        self._root_cache: dict[Any, BlockHash] = {}
        self._uid = object()  # identifies this manager's PrefixMatch results

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{name}: {gs.alloc.num_blocks - gs.available} used / {gs.cache.num_cached} cached"
            f" / {gs.alloc.num_blocks}"
            for name, gs in self._groups.items()
        )
        return (
            f"KVCacheManager(spec={self.spec.name!r}, B={self.tokens_per_block}, "
            f"requests={len(self._requests)}, {groups})"
        )

    # ------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------
    def _root(self, extra_key: ExtraKey) -> BlockHash:
        key = (type(extra_key), extra_key)
        root = self._root_cache.get(key)
        if root is None:
            root = root_hash(extra_key)
            if len(self._root_cache) < 1024:
                self._root_cache[key] = root
        return root

    def _request(self, request_id: RequestId) -> _Request:
        try:
            return self._requests[request_id]
        except (KeyError, TypeError):
            raise KeyError(f"request {request_id!r} is not live in this cache manager") from None

    def _group(self, name: str) -> _Group:
        try:
            return self._groups[name]
        except KeyError:
            raise KeyError(
                f"no layer group {name!r} in spec {self.spec.name!r}; groups: {list(self._groups)}"
            ) from None

    def _encode(self, tokens: Sequence[int], what: str) -> tuple[array, int]:
        data = token_array(tokens, what=what)
        n = len(data)
        if n < 1:
            raise ValueError(f"{what} must hold at least one token id (a prompt of P >= 1)")
        return data, n

    # ------------------------------------------------------------------------------------
    # matching
    # ------------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], *, extra_key: ExtraKey = None) -> PrefixMatch:
        """What the cache holds for the prompt ``tokens`` (``P = len(tokens)``); changes nothing.

        Per group (``cached`` of the result, tokens): full attention reuses the longest run of
        cached blocks from block 0; a sliding window ``W`` the longest run from the block
        holding ``needed.start = max(0, P + 1 - W)`` (blocks before the window do not matter);
        a state group hits only on a snapshot at exactly ``P``.

        Single boundary (``boundary``): the largest ``c <= P`` at which *every* group could
        resume with one common prefix: full attention holds every block below ``c``; a
        sliding window ``W`` holds every block touching ``[max(0, c + 1 - W), c)``; a state
        group holds a snapshot at ``c`` (``c = 0`` always qualifies: the empty prefix). Such a
        ``c`` is always a multiple of ``B`` (a valid ``c`` inside block ``j`` implies
        ``(j + 1)*B`` is valid), so the search runs over block boundaries. For every
        attention group ``cached[g] >= boundary``, and a state group hits per group whenever
        ``boundary == P``.
        """
        data, p = self._encode(tokens, "tokens")
        root = self._root(extra_key)
        hashes = chain_hashes(data, self.tokens_per_block, root)
        return self._match(p, hashes, extra_key, data)

    @property
    def version(self) -> int:
        """Counts changes to the prefix indexes (publish, evict); a :class:`PrefixMatch`
        taken at the current version is still exact."""
        return sum(gs.cache.version for gs in self._groups.values())

    def _match(
        self, p: int, hashes: Sequence[BlockHash], extra_key: ExtraKey, data: array
    ) -> PrefixMatch:
        bsz = self.tokens_per_block
        nfull = len(hashes)
        cached: dict[str, int] = {}
        matched: dict[str, range] = {}
        hits: dict[str, bool] = {}
        ids: dict[str, tuple[int, ...]] = {}
        upper = nfull  # the boundary is at most min over full-attention runs
        for gs in self._groups.values():
            g = gs.group
            if g.kind == "full":
                found = gs.cache.run_ids(hashes, 0)
                run = len(found)
                ids[g.name] = found
                matched[g.name] = range(0, run)
                cached[g.name] = run * bsz
                upper = min(upper, run)
            elif g.kind == "sliding":
                start = needed_range(g, p).start
                s = start // bsz
                found = gs.cache.run_ids(hashes, s)
                run = len(found)
                ids[g.name] = found
                matched[g.name] = range(s, s + run)
                cached[g.name] = (s + run) * bsz if run else start
            else:
                slot = gs.cache.lookup(hashes[-1]) if p % bsz == 0 and nfull > 0 else None
                hit = slot is not None
                ids[g.name] = () if slot is None else (slot,)
                hits[g.name] = hit
                cached[g.name] = p if hit else 0
        boundary = self._boundary(hashes, upper) * bsz
        return PrefixMatch(
            num_tokens=p,
            tokens_per_block=bsz,
            cached=cached,
            matched_blocks=matched,
            state_hits=hits,
            boundary=boundary,
            block_ids=ids,
            extra_key=extra_key,
            hashes=tuple(hashes),
            token_bytes=data,
            version=self.version,
            owner=self._uid,
        )

    def _boundary(self, hashes: Sequence[BlockHash], upper: int) -> int:
        """The largest block count ``j <= upper`` valid for every sliding and state group.

        Tries ``j = upper`` directly (the common case), else scans ``j`` downwards over
        presence lists at C speed: a sliding group missing block ``b`` of ``[lo(j), j)`` rules
        out every ``j'`` in ``(p + 1, j]`` where ``p`` is its highest cached block below ``b``
        (``lo`` never decreases with ``j``, and a window of ``W >= 2`` always holds block
        ``j' - 1``), so the scan jumps to ``p + 1``; a state group jumps to its next snapshot.
        """
        if upper == 0:
            return 0
        bsz = self.tokens_per_block
        sliding = [
            (gs.group.window or 1, gs.cache._index)
            for gs in self._attention
            if gs.group.kind == "sliding"
        ]
        snapshots = [gs.cache._index for gs in self._states]
        if not sliding and not snapshots:
            return upper
        last = hashes[upper - 1]
        if all(last in index for index in snapshots) and all(
            all(hashes[b] in index for b in range(max(0, upper * bsz + 1 - w) // bsz, upper))
            for w, index in sliding
        ):
            return upper
        # rev[i] is about block upper - 1 - i: block b <-> position upper - 1 - b
        rev = list(hashes[:upper])
        rev.reverse()
        present = [(w, list(map(index.__contains__, rev))) for w, index in sliding]
        state_ok: list[bool] | None = None
        for index in snapshots:
            here = list(map(index.__contains__, rev))
            state_ok = (
                here if state_ok is None else [a and b for a, b in zip(state_ok, here, strict=True)]
            )
        j = upper
        while j > 0:
            if state_ok is not None:  # the largest j' <= j with a snapshot at j'
                try:
                    j = upper - state_ok.index(True, upper - j)
                except ValueError:
                    return 0
            jumped = False
            for w, have in present:
                lo = max(0, j * bsz + 1 - w) // bsz
                if lo >= j:  # W = 1: the window before c is empty
                    continue
                try:
                    missing = upper - 1 - have.index(False, upper - j, upper - lo)
                except ValueError:
                    continue
                try:  # the highest cached block below the missing one
                    j = upper - have.index(True, upper - missing)
                except ValueError:
                    return 0
                jumped = True
                break
            if not jumped:
                return j
        return 0

    # ------------------------------------------------------------------------------------
    # allocation
    # ------------------------------------------------------------------------------------
    def allocate(
        self,
        request_id: RequestId,
        tokens: Sequence[int] | PrefixMatch,
        num_draft_tokens: int = 0,
        mode: Mode = "per_group",
        *,
        extra_key: ExtraKey = None,
        prefill: bool = False,
    ) -> Allocation:
        """Start request ``request_id`` with prompt ``tokens`` (``P = len(tokens)``).

        Each attention group gets a span over logical blocks ``[s, ceil((P + k)/B))`` with
        ``s = needed(g, P).start // B`` (0 for full attention; a sliding window does not
        allocate blocks wholly before its window), ``k = num_draft_tokens``. Blocks the
        prefix cache holds are reused (``mode="per_group"``: each group's own match;
        ``"single_boundary"``: only blocks below the common boundary ``c``), the rest are
        new. Each state group gets one slot, restored from the snapshot at ``P`` when the
        mode reuses it (per group: any hit; single boundary: ``c == P``).

        ``tokens`` may be a :meth:`match` result instead of the ids (its extra key is used):
        that skips rehashing, and re-matching too while the cache has not changed since.

        What :meth:`commit` may publish depends on which positions will hold valid KV: by
        default (a receiver) the reused blocks plus the transfer range
        ``[max(cached, needed.start), P)``, so a sliding group's first block is published only
        if it was reused or ``needed.start`` is block-aligned (its head was never written).
        ``prefill=True`` says the caller computes every position of every span (a prefill
        rank), so whole spans become publishable. Raises
        :class:`OutOfBlocksError` (no change) if a group lacks blocks or slots, ``ValueError``
        if ``request_id`` is live already.
        """
        if mode not in MODES:
            raise ValueError(f"request {request_id!r}: mode must be one of {MODES}, got {mode!r}")
        try:
            live = request_id in self._requests
        except TypeError:
            raise TypeError(f"request id must be hashable, got {request_id!r}") from None
        if live:
            raise ValueError(f"request {request_id!r} is already live; free it first")
        k = check_count(f"request {request_id!r}: num_draft_tokens", num_draft_tokens, 0)
        if isinstance(tokens, PrefixMatch):
            prefix = tokens
            if extra_key is not None and extra_key != prefix.extra_key:
                raise ValueError(
                    f"request {request_id!r}: extra_key {extra_key!r} differs from the key "
                    f"{prefix.extra_key!r} of the PrefixMatch passed as tokens"
                )
            if prefix.tokens_per_block != self.tokens_per_block or (
                len(prefix.token_bytes) != prefix.num_tokens
            ):
                raise ValueError(
                    f"request {request_id!r}: the PrefixMatch passed as tokens "
                    "comes from another manager"
                )
            extra_key = prefix.extra_key
            data, p = prefix.token_bytes, prefix.num_tokens
            hashes = list(prefix.hashes)
            fresh = prefix.owner is self._uid and prefix.version == self.version
            match = prefix if fresh else self._match(p, hashes, extra_key, data)
        else:
            data, p = self._encode(tokens, f"request {request_id!r}: tokens")
            hashes = chain_hashes(data, self.tokens_per_block, self._root(extra_key))
            match = self._match(p, hashes, extra_key, data)
        root = self._root(extra_key)
        bsz = self.tokens_per_block
        end = ceil_div(p + k, bsz)

        # -- plan every group, check capacity, then change state (no partial allocation) --
        plan: list[tuple[_Group, int, list[int], int]] = []  # group, first, reused ids, fresh
        cached: dict[str, int] = {}
        reused_blocks: dict[str, range] = {}
        valid: dict[str, int] = {}
        for gs in self._attention:
            g = gs.group
            first = 0 if g.kind == "full" else needed_range(g, p).start // bsz
            found = match.matched_blocks[g.name]
            if mode == "per_group":
                take = found
                cached[g.name] = match.cached[g.name]
            else:
                take = range(found.start, max(found.start, min(found.stop, match.boundary // bsz)))
                cached[g.name] = match.boundary
            ids = list(match.block_ids[g.name][: len(take)])
            fresh = (end - first) - len(ids)
            lru = gs.cache._lru
            available = gs.available - (len(lru.keys() & ids) if lru and ids else 0)
            if fresh > available:
                raise OutOfBlocksError(request_id, g.name, fresh, available, gs.detail())
            plan.append((gs, first, ids, fresh))
            reused_blocks[g.name] = take
            valid[g.name] = (
                first * bsz if (prefill or ids or g.kind == "full") else (needed_range(g, p).start)
            )
        state_plan: list[tuple[_Group, int | None]] = []
        state_hits: dict[str, bool] = {}
        for gs in self._states:
            g = gs.group
            hit = match.state_hits[g.name] if mode == "per_group" else match.boundary == p
            snapshot = gs.cache.lookup(hashes[-1]) if hit else None
            available = gs.available - (1 if snapshot is not None else 0)
            if available < 1:
                raise OutOfBlocksError(
                    request_id, g.name, 1, available, gs.detail() + "; state slot"
                )
            state_plan.append((gs, snapshot))
            state_hits[g.name] = hit
            cached[g.name] = (p if hit else 0) if mode == "per_group" else match.boundary

        req = _Request(request_id, extra_key, root, data, hashes, p, k)
        req.valid_from = valid
        for gs, first, ids, fresh in plan:
            gs.take(ids)
            ids = ids + gs.fresh(fresh)
            req.first_block[gs.name] = first
            req.blocks[gs.name] = ids
        for gs, snapshot in state_plan:
            if snapshot is not None:
                gs.take([snapshot])  # pin the source while the own slot is taken
            slot = gs.fresh(1)[0]
            if snapshot is not None:
                self._copy_state(gs.name, snapshot, slot)
                gs.release([snapshot])  # back on the LRU list, now the newest entry
            req.slots[gs.name] = slot
        self._requests[request_id] = req
        return Allocation(
            request_id=request_id,
            num_tokens=p,
            num_draft_tokens=k,
            mode=mode,
            spans={gs.name: req.span(gs.name) for gs in self._attention},
            state_slots=dict(req.slots),
            cached=cached,
            reused_blocks=reused_blocks,
            state_hits=state_hits,
            match=match,
        )

    def _copy_state(self, group: str, src: int, dst: int) -> None:
        if self.pools is not None:
            pool = self.pools.state[group]
            pool[:, dst] = pool[:, src]

    def append(
        self,
        request_id: RequestId,
        tokens: int | Sequence[int],
        *,
        num_draft_tokens: int | None = None,
    ) -> dict[str, BlockSpan]:
        """Grow the sequence by ``n`` positions: ``tokens`` is ``n`` or the ``n`` new token ids.

        Spans then cover ``[.., ceil((L + n + k)/B))`` where ``k`` is ``num_draft_tokens``
        (default: unchanged). A smaller ``k`` releases tail blocks that hold only draft
        positions (never committed, so they go back to the free list). Positions appended as
        a bare count have unknown ids: they can never be committed, and ids cannot be
        appended after them. Returns the new spans. :class:`OutOfBlocksError` leaves the
        request unchanged.
        """
        req = self._request(request_id)
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            n = check_count(f"request {request_id!r}: append count", tokens, 0)
            data = array("Q")
        else:
            data = token_array(tokens, what=f"request {request_id!r}: appended tokens")
            n = len(data)
            if n and req.num_known < req.num_tokens:
                raise ValueError(
                    f"request {request_id!r}: positions [{req.num_known}, {req.num_tokens}) "
                    "were appended without token ids; token ids cannot follow them"
                )
        k = (
            req.num_draft
            if num_draft_tokens is None
            else check_count(f"request {request_id!r}: num_draft_tokens", num_draft_tokens, 0)
        )
        end = ceil_div(req.num_tokens + n + k, self.tokens_per_block)
        grow: list[tuple[_Group, int]] = []
        for gs in self._attention:
            extra = end - (req.first_block[gs.name] + len(req.blocks[gs.name]))
            if extra > gs.available:
                raise OutOfBlocksError(request_id, gs.name, extra, gs.available, gs.detail())
            grow.append((gs, extra))
        for gs, extra in grow:
            blocks = req.blocks[gs.name]
            if extra > 0:
                blocks.extend(gs.fresh(extra))
            elif extra < 0:
                gs.release(blocks[extra:])
                del blocks[extra:]
        req.num_tokens += n
        req.num_draft = k
        req.token_bytes += data
        return {gs.name: req.span(gs.name) for gs in self._attention}

    def commit(self, request_id: RequestId, num_tokens: int | None = None) -> dict[str, int]:
        """Publish the request's full blocks below ``num_tokens`` (default: ``L``, or the
        known-id prefix of it when positions were appended as a bare count).

        Call it once KV for positions ``[0, num_tokens)`` is written. Every full block the
        request's spans still hold below ``num_tokens`` whose every position holds valid KV
        (see ``prefill`` in :meth:`allocate`; appended positions are written by decoding)
        enters its group's prefix index
        (unless another block already holds the same hash; that duplicate stays private).
        When ``num_tokens == L`` is a non-zero multiple of ``B``, each state group also
        snapshots the request's slot (the state must then summarise ``[0, L)``) into a free
        or evicted slot; with no slot to spare the snapshot is skipped. Committing less than
        before is a no-op. Returns ``{group: entries published}``.
        """
        req = self._request(request_id)
        n = (
            min(req.num_tokens, req.num_known)
            if num_tokens is None
            else check_count(f"request {request_id!r}: num_tokens", num_tokens, 0)
        )
        if n > req.num_tokens:
            raise ValueError(
                f"request {request_id!r}: cannot commit {n} tokens, the sequence holds "
                f"{req.num_tokens}"
            )
        if n > req.num_known:
            raise ValueError(
                f"request {request_id!r}: cannot commit {n} tokens: the ids of positions "
                f"[{req.num_known}, {req.num_tokens}) are unknown (appended as a count)"
            )
        bsz = self.tokens_per_block
        nb = n // bsz
        published = dict.fromkeys(self._groups, 0)
        if n <= req.committed:
            return published
        if len(req.hashes) < nb:
            parent = req.hashes[-1] if req.hashes else req.root
            req.hashes.extend(
                chain_hashes(
                    req.token_bytes, bsz, parent, start_block=len(req.hashes), end_block=nb
                )
            )
        hashes = req.hashes
        lo_all = req.committed // bsz
        for gs in self._attention:
            first = req.first_block[gs.name]
            blocks = req.blocks[gs.name]
            lo = max(lo_all, first, ceil_div(req.valid_from[gs.name], bsz))
            hi = min(nb, first + len(blocks))
            if hi > lo:
                published[gs.name] = gs.cache.insert_many(
                    hashes[lo:hi], blocks[lo - first : hi - first]
                )
        if n == req.num_tokens and nb > 0 and n % bsz == 0:
            key = hashes[nb - 1]
            for gs in self._states:
                if key in gs.cache:
                    gs.cache.touch(gs.cache.lookup(key))  # type: ignore[arg-type]
                    continue
                if gs.available < 1:
                    continue
                snap = gs.fresh(1)[0]
                self._copy_state(gs.name, req.slots[gs.name], snap)
                gs.cache.insert(key, snap)
                gs.release([snap])
                published[gs.name] = 1
        req.committed = n
        return published

    def slide(self, request_id: RequestId) -> dict[str, int]:
        """Release sliding-window blocks wholly before the window of position ``L``.

        For a window ``W`` the request keeps blocks from ``max(0, L + 1 - W) // B``; blocks
        before it lose this request's reference (committed ones stay matchable until
        evicted). Returns ``{sliding group: blocks released}``.
        """
        req = self._request(request_id)
        released: dict[str, int] = {}
        for gs in self._attention:
            if gs.group.kind != "sliding":
                continue
            first = req.first_block[gs.name]
            new_first = needed_range(gs.group, req.num_tokens).start // self.tokens_per_block
            drop = new_first - first
            if drop > 0:
                blocks = req.blocks[gs.name]
                gs.release(blocks[:drop])
                del blocks[:drop]
                req.first_block[gs.name] = new_first
            released[gs.name] = max(drop, 0)
        return released

    def free(self, request_id: RequestId) -> None:
        """End the request: every block and slot loses its reference. Committed blocks stay
        matchable (LRU, evicted on demand); uncommitted ones return to the free list."""
        req = self._request(request_id)
        for gs in self._attention:
            gs.release(req.blocks[gs.name])
        for gs in self._states:
            gs.release([req.slots[gs.name]])
        del self._requests[request_id]

    def evict(self, num_blocks: int | None = None, *, group: str | None = None) -> int:
        """Evict up to ``num_blocks`` (default: all) unreferenced cached blocks or snapshots per
        group (oldest first), of ``group`` or of every group. Returns how many were evicted."""
        targets = list(self._groups.values()) if group is None else [self._group(group)]
        limit = None if num_blocks is None else check_count("num_blocks", num_blocks, 0)
        total = 0
        for gs in targets:
            count = gs.cache.num_evictable if limit is None else min(limit, gs.cache.num_evictable)
            if count:
                gs.alloc.push_free([gs.cache.evict_lru() for _ in range(count)])
            total += count
        return total

    # ------------------------------------------------------------------------------------
    # reading state
    # ------------------------------------------------------------------------------------
    @property
    def requests(self) -> tuple[RequestId, ...]:
        """Live request ids in allocation order."""
        return tuple(self._requests)

    def __contains__(self, request_id: object) -> bool:
        try:
            return request_id in self._requests
        except TypeError:
            return False

    def spans(self, request_id: RequestId) -> dict[str, BlockSpan]:
        """``{attention group: BlockSpan}`` the request holds now."""
        req = self._request(request_id)
        return {gs.name: req.span(gs.name) for gs in self._attention}

    def state_slots(self, request_id: RequestId) -> dict[str, int]:
        """``{state group: slot}`` of the request."""
        return dict(self._request(request_id).slots)

    def request(self, request_id: RequestId) -> RequestState:
        req = self._request(request_id)
        return RequestState(
            request_id=request_id,
            num_tokens=req.num_tokens,
            num_draft_tokens=req.num_draft,
            num_known_tokens=req.num_known,
            committed_tokens=req.committed,
            spans=self.spans(request_id),
            state_slots=dict(req.slots),
            valid_from=dict(req.valid_from),
            extra_key=req.extra_key,
        )

    def num_blocks(self, group: str) -> int:
        """Pool size of ``group`` (blocks, or slots of a state group)."""
        return self._group(group).alloc.num_blocks

    def num_free_blocks(self, group: str) -> int:
        """Blocks an allocation could take now: free plus cached-and-unreferenced."""
        return self._group(group).available

    def num_cached_blocks(self, group: str) -> int:
        """Entries of the group's prefix index (blocks, or snapshots of a state group)."""
        return self._group(group).cache.num_cached

    def refcount(self, group: str, block_id: int) -> int:
        return self._group(group).alloc.refcount(block_id)

    def lookup(self, group: str, block_hash: BlockHash) -> int | None:
        """The block (or snapshot slot) published under ``block_hash`` in ``group``, or None."""
        return self._group(group).cache.lookup(block_hash)

    def block_hash(self, group: str, block_id: int) -> BlockHash | None:
        """The hash a block (or snapshot slot) is published under, or ``None``."""
        return self._group(group).cache.hash_of(block_id)

    def evictable(self, group: str) -> tuple[int, ...]:
        """Unreferenced cached blocks of ``group``, next to be evicted first."""
        return self._group(group).cache.lru_ids()

    def stats(self) -> dict[str, dict[str, int]]:
        """``{group: {"blocks", "free", "cached", "evictable", "referenced"}}``."""
        out = {}
        for name, gs in self._groups.items():
            out[name] = {
                "blocks": gs.alloc.num_blocks,
                "free": gs.alloc.num_free,
                "cached": gs.cache.num_cached,
                "evictable": gs.cache.num_evictable,
                "referenced": gs.alloc.num_blocks - gs.available,
            }
        return out

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` describing the first broken bookkeeping invariant:
        each block is referenced, free or evictable (exactly one); reference counts equal the
        live spans/slots holding a block; the index and block tags agree; spans are
        contiguous and cover ``needed`` plus drafts."""
        bsz = self.tokens_per_block
        for name, gs in self._groups.items():
            expected = [0] * gs.alloc.num_blocks
            for req in self._requests.values():
                if gs.group.kind == "state":
                    expected[req.slots[name]] += 1
                else:
                    for b in req.blocks[name]:
                        expected[b] += 1
            ref = gs.alloc._ref
            assert ref == expected, (
                f"group {name!r}: refcounts {_diff(ref, expected)} differ from live spans"
            )
            free = gs.alloc._free
            assert len(set(free)) == len(free), f"group {name!r}: duplicate free ids"
            lru = set(gs.cache._lru)
            for b in range(gs.alloc.num_blocks):
                places = (ref[b] > 0) + (b in lru) + (free.count(b) if b in free else 0)
                assert places == 1, (
                    f"group {name!r}: block {b} is in {places} of referenced/evictable/free"
                )
                tag = gs.cache._hash.get(b)
                if b in lru:
                    assert tag is not None, f"group {name!r}: evictable block {b} has no hash"
                if b in free:
                    assert tag is None, f"group {name!r}: free block {b} still has a hash"
                if tag is not None:
                    assert gs.cache._index.get(tag) == b, (
                        f"group {name!r}: block {b}'s hash is not indexed to it"
                    )
            assert len(gs.cache._index) == len(gs.cache._hash), (
                f"group {name!r}: index and block tags disagree"
            )
        for rid, req in self._requests.items():
            end = ceil_div(req.num_tokens + req.num_draft, bsz)
            for gs in self._attention:
                first = req.first_block[gs.name]
                assert first + len(req.blocks[gs.name]) == end, (
                    f"request {rid!r}: group {gs.name!r} span ends at block "
                    f"{first + len(req.blocks[gs.name])}, expected {end}"
                )
                need = needed_range(gs.group, req.num_tokens)
                assert first * bsz <= need.start, (
                    f"request {rid!r}: group {gs.name!r} span starts after needed {need}"
                )
                for i, b in enumerate(req.blocks[gs.name]):
                    tag = gs.cache.hash_of(b)
                    logical = first + i
                    if tag is not None and logical < len(req.hashes):
                        assert tag == req.hashes[logical], (
                            f"request {rid!r}: group {gs.name!r} block {b} at logical "
                            f"{logical} is published under another prefix's hash"
                        )


def _diff(a: list[int], b: list[int]) -> str:
    bad = [(i, x, y) for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y][:5]
    return ", ".join(f"block {i}: {x} (expected {y})" for i, x, y in bad)
