"""Token ranges, block spans, group kinds and the per-kind alignment rules of DESIGN.md §1.

Pure Python: importing this module never imports torch.

Conventions used throughout kvtriton:

* positions are 0-based; a prompt of ``P`` tokens holds positions ``[0, P)``;
* every range is half-open ``[start, end)`` and may be empty;
* with ``tokens_per_block = B``, logical block ``b`` holds positions ``[b*B, (b+1)*B)``;
* bounds, checked up front: positions, token counts and logical block indices are at most
  :data:`MAX_TOKENS` (2**40); physical block ids are below :data:`MAX_BLOCK_ID` + 1 (2**31).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Protocol

__all__ = [
    "MAX_BLOCK_ID",
    "MAX_TOKENS",
    "BlockSpan",
    "FullAttentionRule",
    "GroupKind",
    "KindRule",
    "SlidingWindowRule",
    "StateRule",
    "TokenRange",
    "WindowedGroup",
    "ceil_div",
    "check_count",
    "check_tokens",
    "kind_rule",
    "needed_range",
    "state_needs_transfer",
    "transfer_range",
]


#: The largest token position or token count kvtriton accepts: 2**40 (about 1.1e12 tokens),
#: far past any context length, and small enough that bytes (tokens x bytes per token) and
#: element offsets stay inside int64. Logical block indices are bounded by it too.
MAX_TOKENS = 2**40

#: The largest physical block id: pools are indexed with int32-safe block ids (< 2**31).
MAX_BLOCK_ID = 2**31 - 1


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def check_count(what: str, value: object, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` if it is an int in ``[minimum, maximum]``; else ``TypeError``/``ValueError``
    naming ``what`` (and the bound).

    bool is an int subclass, but a True/False count or position is always a caller bug.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{what} must be <= {maximum:,} (kvtriton's bound), got {value:,}")
    return value


def check_tokens(what: str, value: object, minimum: int = 0) -> int:
    """:func:`check_count` for a token position or count: ``minimum <= value <= MAX_TOKENS``."""
    return check_count(what, value, minimum, MAX_TOKENS)


@dataclass(frozen=True, slots=True)
class TokenRange:
    """Half-open range of token positions ``[start, end)``; empty when ``start == end``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        check_tokens("TokenRange.start", self.start)
        check_tokens("TokenRange.end", self.end)
        if self.start > self.end:
            raise ValueError(f"TokenRange needs start <= end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __contains__(self, position: object) -> bool:
        return (
            isinstance(position, int)
            and not isinstance(position, bool)
            and self.start <= position < self.end
        )

    def __repr__(self) -> str:
        return f"TokenRange[{self.start}, {self.end})"

    @property
    def is_empty(self) -> bool:
        return self.start == self.end

    def intersect(self, other: TokenRange) -> TokenRange:
        """Positions in both ranges; an empty range (anchored at the larger start) if disjoint."""
        start = max(self.start, other.start)
        return TokenRange(start, max(start, min(self.end, other.end)))

    def blocks(self, tokens_per_block: int) -> range:
        """Logical block indices touched by the range (empty for an empty range)."""
        check_count("tokens_per_block", tokens_per_block, minimum=1)
        if self.is_empty:
            return range(0)
        return range(self.start // tokens_per_block, ceil_div(self.end, tokens_per_block))

    def num_blocks(self, tokens_per_block: int) -> int:
        """How many blocks of ``tokens_per_block`` positions the range touches."""
        return len(self.blocks(tokens_per_block))

    def block_chunks(self, tokens_per_block: int) -> Iterator[tuple[int, TokenRange]]:
        """Split the range at block boundaries: yields ``(logical_block, sub_range)``."""
        for block in self.blocks(tokens_per_block):
            lo = max(self.start, block * tokens_per_block)
            hi = min(self.end, (block + 1) * tokens_per_block)
            yield block, TokenRange(lo, hi)


@dataclass(frozen=True, slots=True)
class BlockSpan:
    """A block table with an explicit anchor.

    ``block_ids[i]`` is the physical block holding logical block ``first_block + i``, so the
    span covers positions ``[first_block * B, (first_block + len(block_ids)) * B)`` for a
    group with ``tokens_per_block = B``. Nothing is inferred from the list's length alone.
    """

    first_block: int
    block_ids: tuple[int, ...]

    def __init__(self, first_block: int, block_ids: Sequence[int]) -> None:
        check_tokens("BlockSpan.first_block", first_block)
        ids = tuple(block_ids)
        for i, block_id in enumerate(ids):
            if isinstance(block_id, bool):
                raise TypeError(f"BlockSpan.block_ids[{i}] must be an int, got {block_id!r}")
            if not isinstance(block_id, int):
                # numpy / torch integers are accepted through __index__.
                try:
                    block_id = block_id.__index__()
                except AttributeError:
                    raise TypeError(
                        f"BlockSpan.block_ids[{i}] must be an int, got {block_id!r}"
                    ) from None
            if block_id < 0:
                raise ValueError(f"BlockSpan.block_ids[{i}] is negative ({block_id})")
            if block_id > MAX_BLOCK_ID:
                raise ValueError(
                    f"BlockSpan.block_ids[{i}] must be <= {MAX_BLOCK_ID:,} (kvtriton's bound on "
                    f"physical block ids), got {block_id:,}"
                )
        object.__setattr__(self, "first_block", first_block)
        object.__setattr__(self, "block_ids", tuple(int(b) for b in ids))

    def __len__(self) -> int:
        return len(self.block_ids)

    @property
    def end_block(self) -> int:
        """One past the last logical block held (half-open)."""
        return self.first_block + len(self.block_ids)

    def covered(self, tokens_per_block: int) -> TokenRange:
        """Token positions held by the span, ``[first_block*B, end_block*B)``."""
        check_count("tokens_per_block", tokens_per_block, minimum=1)
        return TokenRange(self.first_block * tokens_per_block, self.end_block * tokens_per_block)

    def check_covers(
        self, positions: TokenRange, tokens_per_block: int, *, group: str = "?", side: str = ""
    ) -> None:
        """Raise ``ValueError`` naming the group and the positions this span does not hold."""
        if positions.is_empty:
            return
        held = self.covered(tokens_per_block)
        if held.start <= positions.start and positions.end <= held.end:
            return
        missing: list[str] = []
        if positions.start < held.start:
            missing.append(f"[{positions.start}, {min(held.start, positions.end)})")
        if positions.end > held.end:
            missing.append(f"[{max(held.end, positions.start)}, {positions.end})")
        who = f"{side} " if side else ""
        raise ValueError(
            f"group {group!r}: {who}block span (logical blocks [{self.first_block}, "
            f"{self.end_block}), positions [{held.start}, {held.end})) does not cover "
            f"positions {' and '.join(missing)} of the needed range {positions}"
        )

    def block_id(self, logical_block: int, *, group: str = "?") -> int:
        """Physical id of ``logical_block``; ``ValueError`` if the span does not hold it."""
        if not self.first_block <= logical_block < self.end_block:
            raise ValueError(
                f"group {group!r}: logical block {logical_block} is outside the span "
                f"[{self.first_block}, {self.end_block})"
            )
        return self.block_ids[logical_block - self.first_block]

    def block_ids_for(
        self, positions: TokenRange, tokens_per_block: int, *, group: str = "?"
    ) -> tuple[int, ...]:
        """Physical ids of the blocks touched by ``positions``, in logical order."""
        self.check_covers(positions, tokens_per_block, group=group)
        blocks = positions.blocks(tokens_per_block)
        lo = blocks.start - self.first_block
        return self.block_ids[lo : lo + len(blocks)]


class GroupKind(str, Enum):
    """What a layer group holds per request (DESIGN.md §1).

    A ``str`` subclass: ``GroupKind.FULL == "full"``, it formats, prints and serialises (JSON)
    as its value, so code comparing against the plain strings keeps working.
    """

    FULL = "full"
    """Full attention: window = infinity, paged KV for every position."""
    SLIDING = "sliding"
    """Sliding window ``W``: a query at ``q`` attends ``(q - W, q]``; paged KV."""
    STATE = "state"
    """Recurrent / SSM / linear-attention state: one fixed-size state per request."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def parse(cls, value: object, *, where: str = "layer group") -> GroupKind:
        """``value`` as a :class:`GroupKind` (a member or its string); ``ValueError`` naming
        ``where`` and the valid kinds otherwise."""
        try:
            return cls(value)
        except ValueError:
            valid = tuple(k.value for k in cls)
            raise ValueError(f"{where}: unknown kind {value!r}; expected one of {valid}") from None

    @property
    def pages_tokens(self) -> bool:
        """Holds paged per-token KV (full attention and sliding window; not state)."""
        return self is not GroupKind.STATE

    @property
    def has_window(self) -> bool:
        """Takes a sliding window ``W``."""
        return self is GroupKind.SLIDING

    @property
    def has_state(self) -> bool:
        """Holds one fixed-size state per request instead of paged KV."""
        return self is GroupKind.STATE


class WindowedGroup(Protocol):
    """What the range rules need to know about a layer group (``spec.LayerGroup`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def window(self) -> int | None: ...


class KindRule:
    """The position rules of one group kind (DESIGN.md §1); one stateless instance per kind,
    looked up once per group (:func:`kind_rule`, ``LayerGroup.rule``)."""

    kind: ClassVar[GroupKind]

    def needed(self, group: WindowedGroup, num_tokens: int) -> TokenRange:
        """Positions the receiver needs to decode position ``P = num_tokens``."""
        raise NotImplementedError

    def first_block(self, group: WindowedGroup, num_tokens: int, tokens_per_block: int) -> int:
        """The first logical block a request of ``P`` tokens holds (the block of
        ``needed.start``: blocks wholly before the window are never needed)."""
        return self.needed(group, num_tokens).start // tokens_per_block

    def transfer(self, group: WindowedGroup, num_tokens: int, cached_tokens: int) -> TokenRange:
        """Positions to move: ``[max(cached, needed.start), P)`` (empty for a full hit)."""
        needed = self.needed(group, num_tokens)
        cached = check_tokens(f"cached tokens of group {group.name!r}", cached_tokens)
        start = min(max(cached, needed.start), needed.end)
        return TokenRange(start, needed.end)

    def moves_state(self, num_tokens: int, cached_tokens: int) -> bool:
        """Whether the group's per-request state moves (never, for attention groups)."""
        return False

    def resumes_at(
        self, group: WindowedGroup, num_tokens: int, cached_tokens: int, boundary: int
    ) -> bool:
        """Whether the group could resume one common prefix at ``boundary`` (``c``, with
        ``0 <= c <= P``) when it holds exactly what its count says and nothing else
        (:func:`kvtriton.plan.single_boundary`): the positions the query at ``c`` reads,
        ``[max(0, c + 1 - W), c)`` (full attention: ``[0, c)``), must lie inside the held
        positions ``[needed(g, P).start, cached)``. ``c = 0`` always qualifies."""
        if boundary == 0:
            return True
        reads = max(0, boundary + 1 - group.window) if group.window else 0
        if reads >= boundary:  # a window of 1 reads nothing before c
            return True
        return self.needed(group, num_tokens).start <= reads and boundary <= cached_tokens

    def peak_blocks(self, group: WindowedGroup, num_tokens: int, tokens_per_block: int) -> int:
        """The most blocks a request holds at once while it grows to ``num_tokens`` positions,
        releasing blocks wholly before its window as it goes (0: no paged KV)."""
        return ceil_div(num_tokens, tokens_per_block)


class FullAttentionRule(KindRule):
    kind = GroupKind.FULL

    def needed(self, group: WindowedGroup, num_tokens: int) -> TokenRange:
        return TokenRange(0, check_tokens("num_tokens", num_tokens, minimum=1))


class SlidingWindowRule(KindRule):
    kind = GroupKind.SLIDING

    def needed(self, group: WindowedGroup, num_tokens: int) -> TokenRange:
        p = check_tokens("num_tokens", num_tokens, minimum=1)
        window = group.window
        if window is None or window < 1:
            raise ValueError(f"group {group.name!r}: sliding window must be >= 1, got {window}")
        return TokenRange(max(0, p + 1 - window), p)

    def peak_blocks(self, group: WindowedGroup, num_tokens: int, tokens_per_block: int) -> int:
        # The window's W - 1 positions before q, plus q, touch at most (W-1)//B + 2 blocks.
        window = group.window
        assert window is not None
        return min(ceil_div(num_tokens, tokens_per_block), (window - 1) // tokens_per_block + 2)


class StateRule(KindRule):
    kind = GroupKind.STATE

    def needed(self, group: WindowedGroup, num_tokens: int) -> TokenRange:
        # No per-token KV: the fixed-size state moves whole, so no position is needed.
        p = check_tokens("num_tokens", num_tokens, minimum=1)
        return TokenRange(p, p)

    def moves_state(self, num_tokens: int, cached_tokens: int) -> bool:
        return state_needs_transfer(num_tokens, cached_tokens)

    def peak_blocks(self, group: WindowedGroup, num_tokens: int, tokens_per_block: int) -> int:
        return 0

    def resumes_at(
        self, group: WindowedGroup, num_tokens: int, cached_tokens: int, boundary: int
    ) -> bool:
        # A state resumes only where its snapshot was taken (c = 0: the initial state).
        return boundary == 0 or boundary == cached_tokens


_RULES: dict[GroupKind, KindRule] = {
    rule.kind: rule for rule in (FullAttentionRule(), SlidingWindowRule(), StateRule())
}


def kind_rule(group: WindowedGroup) -> KindRule:
    """The :class:`KindRule` of ``group``'s kind; ``ValueError`` naming the group otherwise."""
    rule = _RULES.get(group.kind)  # type: ignore[call-overload]
    if rule is None:
        raise ValueError(f"group {group.name!r}: unknown kind {group.kind!r}")
    return rule


def needed_range(group: WindowedGroup, num_tokens: int) -> TokenRange:
    """Positions the receiver needs to decode the first generated token (``q = P``).

    ``[max(0, P + 1 - W), P)`` for a sliding window ``W`` (a query at ``q`` attends
    ``(q - W, q]``), ``[0, P)`` for full attention. State groups hold no per-token KV
    (their fixed-size state moves whole): their needed token range is empty ``[P, P)``.
    """
    return kind_rule(group).needed(group, num_tokens)


def transfer_range(group: WindowedGroup, num_tokens: int, cached_tokens: int) -> TokenRange:
    """Positions to move: ``[max(cached, needed.start), P)``, empty when ``cached >= P``.

    ``cached_tokens`` says the receiver already holds every needed position below it; it
    need not be block-aligned and may exceed ``P`` (a full hit).
    """
    return kind_rule(group).transfer(group, num_tokens, cached_tokens)


def state_needs_transfer(num_tokens: int, cached_tokens: int) -> bool:
    """A state group's state moves unless the receiver holds the state at exactly ``P``."""
    check_tokens("num_tokens", num_tokens, minimum=1)
    check_tokens("cached tokens", cached_tokens)
    return cached_tokens != num_tokens
