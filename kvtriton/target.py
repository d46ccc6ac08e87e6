"""One request's blocks on one side of a transfer, validated once where they are born.

A :class:`TransferTarget` is what the kernels and the transfer layer work from: per attention
group the half-open token range it covers and the physical ids of the blocks that range
touches (one read-only ``int32`` numpy array, converted once per request), per state group
the slot. It is built by the adapter / cache manager (:func:`TransferTarget.from_spans`),
which checks every id against the pool sizes there; nothing downstream re-checks ids or
converts them again. Pure Python + numpy (no torch).

Conventions (DESIGN.md §1): positions are 0-based, ranges half-open, logical block ``b`` of a
group with ``B`` tokens per block holds ``[b*B, (b+1)*B)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from kvtriton.ranges import BlockSpan, TokenRange, ceil_div, check_count

__all__ = ["GroupTarget", "TransferTarget"]


@dataclass(frozen=True, eq=False)
class GroupTarget:
    """The blocks of one attention group that hold ``tokens``.

    Attributes:
        group: the layer group's name.
        tokens: the positions covered, ``[start, end)`` (non-empty).
        tokens_per_block: ``B`` of this side's pool.
        first_block: logical block of ``block_ids[0]`` (``tokens.start // B``).
        block_ids: physical ids of logical blocks ``[first_block, first_block + n)``, the
            blocks ``tokens`` touches, as a read-only ``int32`` array.
        num_blocks: the pool size every id was checked against (``None``: not checked), so
            a user of another pool compares two ints instead of scanning the ids again.
    """

    group: str
    tokens: TokenRange
    tokens_per_block: int
    first_block: int
    block_ids: np.ndarray
    num_blocks: int | None = None

    def covers(self, positions: TokenRange) -> bool:
        """Whether every position of ``positions`` lies in :attr:`tokens`."""
        return positions.is_empty or (
            self.tokens.start <= positions.start and positions.end <= self.tokens.end
        )

    def ids_for(self, positions: TokenRange) -> np.ndarray:
        """Physical ids of the blocks ``positions`` touches (a view; ``positions`` must be
        covered)."""
        if positions.is_empty:
            return self.block_ids[:0]
        b = self.tokens_per_block
        lo = positions.start // b - self.first_block
        hi = ceil_div(positions.end, b) - self.first_block
        return self.block_ids[lo:hi]


@dataclass(frozen=True, eq=False)
class TransferTarget:
    """One request's blocks (attention groups) and slots (state groups) on one rank.

    Attributes:
        request_id: the request.
        num_tokens: prompt length ``P``.
        kv: ``{attention group: GroupTarget}`` for groups with a non-empty range.
        state_slots: ``{state group: slot}``.
    """

    request_id: str
    num_tokens: int
    kv: Mapping[str, GroupTarget] = field(default_factory=dict)
    state_slots: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_spans(
        cls,
        request_id: str,
        num_tokens: int,
        tokens: Mapping[str, TokenRange],
        spans: Mapping[str, BlockSpan],
        state_slots: Mapping[str, int],
        *,
        tokens_per_block: int,
        num_blocks: Mapping[str, int],
        num_slots: Mapping[str, int],
        destination: bool,
    ) -> TransferTarget:
        """Validate spans and slots once and convert the block ids once.

        Args:
            request_id, num_tokens: the request and its prompt length ``P``.
            tokens: positions per attention group (empty ranges are dropped).
            spans: the group's :class:`BlockSpan` (must cover its range).
            state_slots: slot per state group that moves.
            tokens_per_block: ``B`` of this side.
            num_blocks: blocks in each attention group's pool; ``num_slots``: slots in each
                state group's pool. Every id must be inside.
            destination: the blocks are written: two logical blocks in one physical block
                would make writes collide, so ids must be distinct.
        Raises ``ValueError`` naming the request, the group and what was wrong.
        """
        check_count("num_tokens", num_tokens, minimum=1)
        check_count("tokens_per_block", tokens_per_block, minimum=1)
        where = f"request {request_id!r}"
        kv: dict[str, GroupTarget] = {}
        for name, rng in tokens.items():
            if not isinstance(rng, TokenRange):
                raise ValueError(f"{where}: group {name!r}: range must be a TokenRange")
            if rng.is_empty:
                continue
            if rng.end > num_tokens:
                raise ValueError(
                    f"{where}: group {name!r}: range {rng} goes past the prompt of "
                    f"{num_tokens} tokens"
                )
            if name not in spans:
                raise ValueError(f"{where}: no block span for group {name!r}")
            if name not in num_blocks:
                raise ValueError(f"{where}: no pool for group {name!r}")
            span = spans[name]
            side = "destination" if destination else "source"
            span.check_covers(rng, tokens_per_block, group=name, side=f"{where}: {side}")
            first = rng.start // tokens_per_block
            last = ceil_div(rng.end, tokens_per_block)
            ids = np.asarray(
                span.block_ids[first - span.first_block : last - span.first_block],
                dtype=np.int64,
            )
            limit = num_blocks[name]
            bad = np.flatnonzero((ids < 0) | (ids >= limit))
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"{where}: group {name!r}: {side} block id {int(ids[i])} (logical block "
                    f"{first + i}) is outside the pool's blocks [0, {limit})"
                )
            if destination and np.unique(ids).size != ids.size:
                values, counts = np.unique(ids, return_counts=True)
                raise ValueError(
                    f"{where}: group {name!r}: destination block ids "
                    f"{values[counts > 1].tolist()} appear more than once; writes would collide"
                )
            arr = ids.astype(np.int32)
            arr.setflags(write=False)
            kv[name] = GroupTarget(name, rng, tokens_per_block, first, arr, int(limit))
        slots: dict[str, int] = {}
        for name, slot in state_slots.items():
            if name not in num_slots:
                raise ValueError(f"{where}: no state pool for group {name!r}")
            check_count(f"{where}: state slot of group {name!r}", slot)
            if slot >= num_slots[name]:
                raise ValueError(
                    f"{where}: state group {name!r}: slot {slot} is outside the pool's slots "
                    f"[0, {num_slots[name]})"
                )
            slots[name] = int(slot)
        return cls(request_id, num_tokens, kv, slots)

    @property
    def groups(self) -> tuple[str, ...]:
        """Attention groups with a range, then state groups."""
        return (*self.kv, *self.state_slots)

    def covers(self, tokens: Mapping[str, TokenRange], states: tuple[str, ...] = ()) -> str | None:
        """``None`` when this target holds every position of ``tokens`` and every state in
        ``states``; else a sentence saying what is missing (for a refusal)."""
        for name, rng in tokens.items():
            if rng.is_empty:
                continue
            g = self.kv.get(name)
            if g is None:
                return f"group {name!r}: positions {rng} are not held (no blocks registered)"
            if not g.covers(rng):
                return f"group {name!r}: positions {rng} are not inside the held range {g.tokens}"
        for name in states:
            if name not in self.state_slots:
                return f"state group {name!r}: no slot registered"
        return None
