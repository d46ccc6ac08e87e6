"""The paged KV cache manager: per-layer-group prefix reuse, window release, state snapshots.

See the package docstring (:mod:`kvtriton.cache`) for the request life cycle and the matching
rules. The manager keeps the requests' bookkeeping and delegates everything per group to one
:class:`~kvtriton.cache.groups.GroupCache` per layer group (chosen once from the group's kind),
each owning its :class:`~kvtriton.cache.block_pool.BlockPool`. Bookkeeping is pure Python;
when the manager owns :class:`~kvtriton.cache.pools.CachePools` it also copies state snapshots
between state slots (plain torch indexing).
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from typing import Any

from kvtriton.cache.block_pool import BlockPool
from kvtriton.cache.boundary import common_boundary
from kvtriton.cache.groups import (
    GroupAllocation,
    GroupCache,
    OutOfBlocksError,
    PagedGroupCache,
    RequestBlocks,
    make_group_cache,
)
from kvtriton.cache.hashing import (
    DEFAULT_HASH,
    BlockHash,
    ExtraKey,
    HashName,
    chain_hashes,
    check_hash_name,
    root_hash,
    token_array,
)
from kvtriton.cache.pools import CachePools, resolve_num_blocks
from kvtriton.cache.results import (
    MODES,
    Allocation,
    PrefixMatch,
    RequestId,
    RequestState,
    parse_mode,
)
from kvtriton.plan import Mode, ReusePolicy
from kvtriton.ranges import BlockSpan, ceil_div, check_count
from kvtriton.spec import KVCacheSpec

__all__ = [
    "MODES",
    "Allocation",
    "KVCacheManager",
    "OutOfBlocksError",
    "PrefixMatch",
    "RequestId",
    "RequestState",
]


class KVCacheManager:
    """Paged KV cache of one rank: one block pool and prefix index per layer group.

    Args:
        spec: the local (possibly sharded) spec; all groups share ``spec.tokens_per_block``.
        num_blocks: blocks per attention group (an int for all or ``{group: count}``);
            taken from ``pools`` when those are given.
        num_state_slots: slots per state group (live requests' states plus cached snapshots).
        pools: optional tensors (:func:`~kvtriton.cache.pools.allocate_pools`); the manager
            then copies state snapshots itself. Without pools it is bookkeeping only.
        hash_name: the block hash (:data:`~kvtriton.cache.hashing.HASH_NAMES`): ``"sha256"``
            (the default; stable, cryptographic) or ``"xxh3_128"`` (several times faster; not
            cryptographic, which only matters if untrusted clients can choose token ids to
            collide). Managers that exchange hashes must use the same one.
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int | Mapping[str, int] | None = None,
        *,
        num_state_slots: int | None = None,
        pools: CachePools | None = None,
        hash_name: HashName = DEFAULT_HASH,
    ) -> None:
        if not isinstance(spec, KVCacheSpec):
            raise TypeError(f"spec must be a KVCacheSpec, got {type(spec).__name__}")
        attention = [g for g in spec.groups if g.is_attention]
        states = [g for g in spec.groups if g.is_state]
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
        self.hash_name: HashName = check_hash_name(hash_name)
        self._groups: dict[str, GroupCache] = {
            g.name: make_group_cache(
                g,
                blocks[g.name] if g.is_attention else slots,
                spec.tokens_per_block,
                self._copy_state,
            )
            for g in spec.groups
        }
        groups = list(self._groups.values())
        self._paged = [gc for gc in groups if isinstance(gc, PagedGroupCache)]
        self._others = [gc for gc in groups if not isinstance(gc, PagedGroupCache)]
        # What the single-boundary search checks, fixed for the manager's life.
        self._windows = [(gc.window, gc.pool.contains_hash) for gc in groups if gc.window]
        self._snapshots = [gc.pool.contains_hash for gc in groups if gc.snapshots]
        self._requests: dict[RequestId, RequestBlocks] = {}
        self._root_cache: dict[Any, BlockHash] = {}
        self._uid = object()  # identifies this manager's PrefixMatch results

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{name}: {gc.pool.num_referenced} used / {gc.pool.num_cached} cached"
            f" / {gc.pool.num_blocks}"
            for name, gc in self._groups.items()
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
            root = root_hash(extra_key, hash_name=self.hash_name)
            if len(self._root_cache) < 1024:
                self._root_cache[key] = root
        return root

    def _hashes(self, data: array, parent: BlockHash, start: int = 0, end: int | None = None):  # type: ignore[no-untyped-def]
        return chain_hashes(
            data,
            self.tokens_per_block,
            parent,
            start_block=start,
            end_block=end,
            hash_name=self.hash_name,
        )

    def _request(self, request_id: RequestId) -> RequestBlocks:
        try:
            return self._requests[request_id]
        except (KeyError, TypeError):
            raise KeyError(f"request {request_id!r} is not live in this cache manager") from None

    def _group(self, name: str) -> GroupCache:
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

    def _copy_state(self, group: str, src: int, dst: int) -> None:
        if self.pools is not None:
            pool = self.pools.state[group]
            pool[:, dst] = pool[:, src]

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
        ``boundary == P``. This is DESIGN.md §1's one single-boundary rule: the planner uses
        this boundary when given the match (``kvtriton.plan.compare_policies(spec, P,
        match)``), and from ``cached`` alone it proves at most this boundary.
        """
        data, p = self._encode(tokens, "tokens")
        hashes = self._hashes(data, self._root(extra_key))
        return self._match(p, hashes, extra_key, data)

    @property
    def version(self) -> int:
        """Counts changes to the prefix indexes (publish, evict); a :class:`PrefixMatch`
        taken at the current version is still exact."""
        return sum(gc.pool.version for gc in self._groups.values())

    def _match(
        self, p: int, hashes: Sequence[BlockHash], extra_key: ExtraKey, data: array
    ) -> PrefixMatch:
        found = {name: gc.match(hashes, p) for name, gc in self._groups.items()}
        caps = [m.boundary_cap for m in found.values() if m.boundary_cap is not None]
        upper = min([len(hashes), *caps])  # the boundary is at most min over full-attention runs
        bsz = self.tokens_per_block
        boundary = common_boundary(hashes, upper, bsz, self._windows, self._snapshots) * bsz
        return PrefixMatch(
            num_tokens=p,
            tokens_per_block=bsz,
            cached={name: m.cached for name, m in found.items()},
            matched_blocks={name: m.blocks for name, m in found.items() if m.blocks is not None},
            state_hits={name: m.hit for name, m in found.items() if m.hit is not None},
            boundary=boundary,
            block_ids={name: m.ids for name, m in found.items()},
            extra_key=extra_key,
            hashes=tuple(hashes),
            token_bytes=data,
            version=self.version,
            owner=self._uid,
        )

    # ------------------------------------------------------------------------------------
    # allocation
    # ------------------------------------------------------------------------------------
    def allocate(
        self,
        request_id: RequestId,
        tokens: Sequence[int] | PrefixMatch,
        num_draft_tokens: int = 0,
        mode: ReusePolicy | Mode = ReusePolicy.PER_GROUP,
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
        policy = parse_mode(mode, where=f"request {request_id!r}")
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
            hashes = self._hashes(data, self._root(extra_key))
            match = self._match(p, hashes, extra_key, data)
        end = ceil_div(p + k, self.tokens_per_block)
        boundary = match.boundary if policy is ReusePolicy.SINGLE_BOUNDARY else None

        # -- plan every group, check capacity, then change state (no partial allocation) --
        plans: dict[str, GroupAllocation] = {
            name: gc.plan(
                request_id,
                match.group_match(name),
                boundary=boundary,
                hashes=hashes,
                num_tokens=p,
                end_block=end,
                prefill=prefill,
            )
            for name, gc in self._groups.items()
        }
        req = RequestBlocks(request_id, extra_key, self._root(extra_key), data, hashes, p, k)
        for name, gc in self._groups.items():
            gc.apply(req, plans[name])
        self._requests[request_id] = req
        return Allocation(
            request_id=request_id,
            num_tokens=p,
            num_draft_tokens=k,
            mode=policy,
            spans={gc.name: req.span(gc.name) for gc in self._paged},
            state_slots=dict(req.slots),
            cached={name: plan.cached for name, plan in plans.items()},
            reused_blocks={n: pl.taken for n, pl in plans.items() if pl.taken is not None},
            state_hits={n: pl.hit for n, pl in plans.items() if pl.hit is not None},
            match=match,
        )

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
        grow: list[tuple[PagedGroupCache, int]] = []
        for gc in self._paged:
            extra = gc.growth(req, end)
            available = gc.pool.num_available
            if extra > available:
                raise OutOfBlocksError(request_id, gc.name, extra, available, gc.detail())
            grow.append((gc, extra))
        for gc, extra in grow:
            gc.resize(req, extra)
        req.num_tokens += n
        req.num_draft = k
        if data:
            req.extend_tokens(data)
        return {gc.name: req.span(gc.name) for gc in self._paged}

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
        if n <= req.committed:
            return dict.fromkeys(self._groups, 0)
        if len(req.hashes) < nb:
            parent = req.hashes[-1] if req.hashes else req.root
            req.hashes.extend(self._hashes(req.token_bytes, parent, len(req.hashes), nb))
        lo = req.committed // bsz
        at_end = n == req.num_tokens and nb > 0 and n % bsz == 0
        published = {name: gc.commit(req, lo, nb, at_end) for name, gc in self._groups.items()}
        req.committed = n
        return published

    def slide(self, request_id: RequestId) -> dict[str, int]:
        """Release sliding-window blocks wholly before the window of position ``L``.

        For a window ``W`` the request keeps blocks from ``max(0, L + 1 - W) // B``; blocks
        before it lose this request's reference (committed ones stay matchable until
        evicted). Returns ``{sliding group: blocks released}``.
        """
        req = self._request(request_id)
        released = {gc.name: gc.slide(req) for gc in self._paged}
        return {name: n for name, n in released.items() if n is not None}

    def free(self, request_id: RequestId) -> None:
        """End the request: every block and slot loses its reference. Committed blocks stay
        matchable (LRU, evicted on demand); uncommitted ones return to the free list."""
        req = self._request(request_id)
        for gc in self._groups.values():
            gc.free(req)
        del self._requests[request_id]

    def evict(self, num_blocks: int | None = None, *, group: str | None = None) -> int:
        """Evict up to ``num_blocks`` (default: all) unreferenced cached blocks or snapshots per
        group (oldest first), of ``group`` or of every group. Returns how many were evicted."""
        targets = list(self._groups.values()) if group is None else [self._group(group)]
        limit = None if num_blocks is None else check_count("num_blocks", num_blocks, 0)
        return sum(gc.pool.evict(limit) for gc in targets)

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
        return {gc.name: req.span(gc.name) for gc in self._paged}

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

    def block_pool(self, group: str) -> BlockPool:
        """The :class:`~kvtriton.cache.block_pool.BlockPool` of ``group`` (to inspect; a
        change made through it outside the manager's calls is the caller's responsibility)."""
        return self._group(group).pool

    def num_blocks(self, group: str) -> int:
        """Pool size of ``group`` (blocks, or slots of a state group)."""
        return self._group(group).pool.num_blocks

    def num_free_blocks(self, group: str) -> int:
        """Blocks an allocation could take now: free plus cached-and-unreferenced."""
        return self._group(group).pool.num_available

    def num_cached_blocks(self, group: str) -> int:
        """Entries of the group's prefix index (blocks, or snapshots of a state group)."""
        return self._group(group).pool.num_cached

    def refcount(self, group: str, block_id: int) -> int:
        return self._group(group).pool.refcount(block_id)

    def lookup(self, group: str, block_hash: BlockHash) -> int | None:
        """The block (or snapshot slot) published under ``block_hash`` in ``group``, or None."""
        return self._group(group).pool.lookup(block_hash)

    def block_hash(self, group: str, block_id: int) -> BlockHash | None:
        """The hash a block (or snapshot slot) is published under, or ``None``."""
        return self._group(group).pool.hash_of(block_id)

    def evictable(self, group: str) -> tuple[int, ...]:
        """Unreferenced cached blocks of ``group``, next to be evicted first."""
        return self._group(group).pool.evictable_ids()

    def stats(self) -> dict[str, dict[str, int]]:
        """``{group: {"blocks", "free", "cached", "evictable", "referenced"}}``."""
        return {
            name: {
                "blocks": gc.pool.num_blocks,
                "free": gc.pool.num_free,
                "cached": gc.pool.num_cached,
                "evictable": gc.pool.num_evictable,
                "referenced": gc.pool.num_referenced,
            }
            for name, gc in self._groups.items()
        }

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` describing the first broken bookkeeping invariant:
        each block is referenced, free or evictable (exactly one); reference counts equal the
        live spans/slots holding a block; the index and block tags agree; spans are
        contiguous and cover ``needed`` plus drafts."""
        for gc in self._groups.values():
            expected = [0] * gc.pool.num_blocks
            for req in self._requests.values():
                for b in gc.held_ids(req):
                    expected[b] += 1
            gc.pool.check_invariants(expected)
        for req in self._requests.values():
            for gc in self._paged:
                gc.check_span(req)
