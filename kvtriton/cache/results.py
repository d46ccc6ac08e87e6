"""What the cache manager returns: a prompt's :class:`PrefixMatch`, a request's
:class:`Allocation` and a read-only :class:`RequestState`. Pure Python."""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field

from kvtriton.cache.groups import GroupMatch
from kvtriton.cache.hashing import BlockHash, ExtraKey
from kvtriton.plan import Mode, ReusePolicy
from kvtriton.ranges import BlockSpan

__all__ = ["MODES", "Allocation", "PrefixMatch", "RequestId", "RequestState", "parse_mode"]

RequestId = Hashable

#: The allocation modes (:class:`~kvtriton.plan.ReusePolicy` members a cache runs in).
MODES: tuple[ReusePolicy, ...] = (ReusePolicy.PER_GROUP, ReusePolicy.SINGLE_BOUNDARY)


def parse_mode(mode: object, *, where: str = "") -> ReusePolicy:
    """``mode`` as one of :data:`MODES`; ``ValueError`` naming ``where`` otherwise."""
    if mode in MODES:
        return ReusePolicy(mode)
    prefix = f"{where}: " if where else ""
    names = tuple(m.value for m in MODES)
    raise ValueError(f"{prefix}mode must be one of {names}, got {mode!r}")


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

    def cached_tokens(
        self, mode: ReusePolicy | Mode = ReusePolicy.PER_GROUP
    ) -> dict[str, int] | int:
        """The ``cached_tokens`` argument of :func:`kvtriton.plan.plan_transfer` for ``mode``."""
        if parse_mode(mode) is ReusePolicy.PER_GROUP:
            return dict(self.cached)
        return self.boundary

    def group_match(self, group: str) -> GroupMatch:
        """One group's share of the match."""
        return GroupMatch(
            self.cached[group],
            self.matched_blocks.get(group),
            self.block_ids.get(group, ()),
            self.state_hits.get(group),
        )

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
        if self.mode == ReusePolicy.PER_GROUP:
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
