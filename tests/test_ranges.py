"""TokenRange / BlockSpan / needed_range / transfer_range against token-level truth.

The reference here is deliberately brute force: sets of positions, the window rule
``(q - W, q]`` written out from scratch (:func:`kvtriton.testing.needed_positions`), and
"which block holds position p" as ``p // B``.
Nothing in this file calls the function under test to build its own expectation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtriton.ranges import (
    BlockSpan,
    TokenRange,
    ceil_div,
    needed_range,
    state_needs_transfer,
    transfer_range,
)
from kvtriton.spec import LayerGroup
from kvtriton.testing import moved_positions, needed_positions

# ---------------------------------------------------------------------------------------
# brute-force reference
# ---------------------------------------------------------------------------------------


def positions(r: TokenRange) -> list[int]:
    return list(range(r.start, r.end))


def span_positions(first_block: int, num_blocks: int, tokens_per_block: int) -> set[int]:
    return set(range(first_block * tokens_per_block, (first_block + num_blocks) * tokens_per_block))


def intervals_in(message: str) -> set[int]:
    """Union of the half-open ``[a, b)`` intervals listed after "does not cover positions"."""
    tail = message.split("does not cover positions", 1)[1].split("of the needed range", 1)[0]
    out: set[int] = set()
    for a, b in re.findall(r"\[(\d+), (\d+)\)", tail):
        out |= set(range(int(a), int(b)))
    return out


@dataclass(frozen=True)
class G:
    """A minimal WindowedGroup (the Protocol ranges.py asks for)."""

    name: str
    kind: str
    window: int | None = None


# ---------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------

block_sizes = st.integers(1, 256)
positions_st = st.integers(0, 3000)


@st.composite
def token_ranges(draw: st.DrawFn, max_end: int = 3000) -> TokenRange:
    a = draw(st.integers(0, max_end))
    b = draw(st.integers(0, max_end))
    return TokenRange(min(a, b), max(a, b))


# ---------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------


@given(token_ranges(), block_sizes)
def test_blocks_and_chunks_agree_with_positions(r: TokenRange, tpb: int) -> None:
    truth_blocks = sorted({p // tpb for p in positions(r)})
    assert list(r.blocks(tpb)) == truth_blocks
    assert r.num_blocks(tpb) == len(truth_blocks)
    assert len(r) == len(positions(r))
    assert r.is_empty == (len(positions(r)) == 0)

    chunks = list(r.block_chunks(tpb))
    assert [b for b, _ in chunks] == truth_blocks
    flat: list[int] = []
    for block, sub in chunks:
        assert not sub.is_empty
        assert all(p // tpb == block for p in positions(sub)), (block, sub)
        flat.extend(positions(sub))
    # Every position of the range in exactly one chunk, in order.
    assert flat == positions(r)


@given(token_ranges(), token_ranges())
def test_intersect_is_set_intersection(a: TokenRange, b: TokenRange) -> None:
    got = a.intersect(b)
    assert set(positions(got)) == set(positions(a)) & set(positions(b))
    assert got.start <= got.end


@given(token_ranges(), st.integers(0, 40), st.integers(0, 40), block_sizes)
def test_block_span_lookups_agree_with_positions(
    r: TokenRange, first_block: int, num_blocks: int, tpb: int
) -> None:
    ids = tuple(1000 + 7 * i for i in range(num_blocks))  # distinct, not identity-mapped
    span = BlockSpan(first_block, ids)
    held = span_positions(first_block, num_blocks, tpb)
    wanted = set(positions(r))
    assert set(positions(span.covered(tpb))) == held
    missing = wanted - held
    if missing:
        with pytest.raises(ValueError, match="group 'g'") as info:
            span.check_covers(r, tpb, group="g", side="sender")
        assert "sender" in str(info.value)
        assert intervals_in(str(info.value)) == missing
        with pytest.raises(ValueError, match="does not cover positions"):
            span.block_ids_for(r, tpb, group="g")
    else:
        span.check_covers(r, tpb, group="g")
        truth: list[int] = []
        for p in positions(r):
            phys = ids[p // tpb - first_block]
            if not truth or truth[-1] != phys:
                truth.append(phys)
        assert list(span.block_ids_for(r, tpb, group="g")) == truth


@given(token_ranges(), block_sizes, block_sizes, st.integers(0, 3), st.integers(0, 3))
def test_sender_receiver_block_size_mismatch(
    r: TokenRange, sender_tpb: int, receiver_tpb: int, pad_before: int, pad_after: int
) -> None:
    """The same positions, viewed with two block sizes, are the same positions; a span built
    for either side covers them, and a position-by-position copy is a bijection."""
    views = {}
    for side, tpb in (("sender", sender_tpb), ("receiver", receiver_tpb)):
        flat = [p for _, sub in r.block_chunks(tpb) for p in positions(sub)]
        assert flat == positions(r)
        blocks = r.blocks(tpb)
        first = max(0, (blocks.start if blocks else r.start // tpb) - pad_before)
        last = (blocks.stop if blocks else first) + pad_after
        ids = [5000 * (side == "sender") + 3 * b + 1 for b in range(first, last)]
        span = BlockSpan(first, ids)
        span.check_covers(r, tpb, group="g", side=side)
        # (physical block, offset in block) per position, from the span's own lookups
        where = {}
        for block, sub in r.block_chunks(tpb):
            phys = span.block_id(block, group="g")
            for p in positions(sub):
                where[p] = (phys, p - block * tpb)
        assert len(set(where.values())) == len(where) == len(r)
        views[side] = where
        if not r.is_empty and blocks:
            # Dropping the span's first needed block makes it stop covering.
            short = BlockSpan(blocks.start + 1, ids[blocks.start + 1 - first :])
            with pytest.raises(ValueError, match=re.escape(f"[{r.start}, ")):
                short.check_covers(r, tpb, group="g", side=side)
    assert set(views["sender"]) == set(views["receiver"]) == set(positions(r))


@given(
    st.integers(1, 3000),
    st.sampled_from(["full", "sliding", "state"]),
    st.integers(1, 4000),
    st.one_of(st.integers(0, 3500), st.integers(0, 40).map(lambda b: b * 64)),
)
def test_needed_and_transfer_ranges_match_window_rule(
    prompt: int, kind: str, window: int, cached: int
) -> None:
    group = G("g", kind, window if kind == "sliding" else None)
    needed = needed_range(group, prompt)
    if kind == "state":
        assert needed.is_empty
    else:
        assert set(positions(needed)) == needed_positions(kind, group.window, prompt)
    moves = transfer_range(group, prompt, cached)
    assert set(positions(moves)) == moved_positions(kind, group.window, prompt, cached)
    assert moves.end <= prompt


@given(st.integers(1, 5000), st.integers(0, 6000))
def test_state_moves_unless_snapshot_is_exactly_at_prompt(prompt: int, cached: int) -> None:
    assert state_needs_transfer(prompt, cached) == (cached != prompt)


@given(st.integers(0, 10**6), st.integers(1, 300))
def test_ceil_div(a: int, b: int) -> None:
    assert ceil_div(a, b) == -(-a // b) == (a + b - 1) // b


# ---------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------


def test_empty_range_is_valid_and_touches_no_block() -> None:
    r = TokenRange(7, 7)
    assert r.is_empty and len(r) == 0
    assert list(r.blocks(4)) == []
    assert list(r.block_chunks(4)) == []
    BlockSpan(100, []).check_covers(r, 4)  # nothing needed, nothing to cover
    assert BlockSpan(100, []).block_ids_for(r, 4) == ()


def test_range_starting_inside_a_block() -> None:
    r = TokenRange(5, 14)
    assert list(r.blocks(4)) == [1, 2, 3]
    assert [(b, (s.start, s.end)) for b, s in r.block_chunks(4)] == [
        (1, (5, 8)),
        (2, (8, 12)),
        (3, (12, 14)),
    ]


def test_window_one_needs_no_cached_position() -> None:
    # W = 1: the query at q = P attends (P - 1, P] = {P}, its own key, computed at decode.
    assert needed_range(G("s", "sliding", 1), 10) == TokenRange(10, 10)
    assert transfer_range(G("s", "sliding", 1), 10, 0).is_empty


def test_window_two_needs_only_the_last_prompt_token() -> None:
    assert needed_range(G("s", "sliding", 2), 10) == TokenRange(9, 10)
    assert transfer_range(G("s", "sliding", 2), 10, 9) == TokenRange(9, 10)
    assert transfer_range(G("s", "sliding", 2), 10, 10).is_empty


def test_window_smaller_than_a_block_can_span_two_blocks() -> None:
    # W = 3, P = 17: keys (14, 17] minus q itself -> positions 15, 16; B = 16 -> blocks 0 and 1.
    group = G("s", "sliding", 3)
    needed = needed_range(group, 17)
    assert needed == TokenRange(15, 17)
    assert list(needed.blocks(16)) == [0, 1]


def test_window_larger_than_prompt_needs_everything() -> None:
    assert needed_range(G("s", "sliding", 4096), 100) == TokenRange(0, 100)


def test_transfer_cached_above_prompt_is_a_full_hit() -> None:
    assert transfer_range(G("f", "full"), 100, 250).is_empty


def test_transfer_cached_not_block_aligned() -> None:
    assert transfer_range(G("f", "full"), 100, 37) == TokenRange(37, 100)


def test_cached_below_window_start_moves_the_whole_window() -> None:
    assert transfer_range(G("s", "sliding", 10), 100, 20) == TokenRange(91, 100)


def test_zero_prompt_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"num_tokens must be >= 1, got 0"):
        needed_range(G("f", "full"), 0)
    with pytest.raises(ValueError, match=r"num_tokens must be >= 1, got 0"):
        state_needs_transfer(0, 0)


def test_needed_range_rejects_bad_windows_and_kinds() -> None:
    with pytest.raises(ValueError, match=r"group 's': sliding window must be >= 1, got 0"):
        needed_range(G("s", "sliding", 0), 10)
    with pytest.raises(ValueError, match=r"group 's': sliding window must be >= 1, got None"):
        needed_range(G("s", "sliding", None), 10)
    with pytest.raises(ValueError, match=r"group 'x': unknown kind 'cross'"):
        needed_range(G("x", "cross"), 10)


def test_layer_group_satisfies_windowed_group() -> None:
    g = LayerGroup("s", "sliding", (0,), window=4)
    assert needed_range(g, 10) == TokenRange(7, 10)


# -- bad input ----------------------------------------------------------------------------


def test_token_range_rejects_negative_positions() -> None:
    with pytest.raises(ValueError, match=r"TokenRange.start must be >= 0, got -1"):
        TokenRange(-1, 3)
    with pytest.raises(ValueError, match=r"TokenRange.end must be >= 0, got -2"):
        TokenRange(0, -2)


def test_token_range_rejects_start_after_end() -> None:
    with pytest.raises(ValueError, match=r"start <= end, got \[5, 3\)"):
        TokenRange(5, 3)


def test_token_range_rejects_bools_and_floats() -> None:
    with pytest.raises(TypeError, match=r"TokenRange.end must be an int, got bool True"):
        TokenRange(0, True)
    with pytest.raises(TypeError, match=r"TokenRange.start must be an int, got float"):
        TokenRange(1.0, 2)  # type: ignore[arg-type]


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"tokens_per_block must be >= 1, got 0"):
        TokenRange(0, 4).blocks(0)
    with pytest.raises(ValueError, match=r"tokens_per_block must be >= 1, got -4"):
        BlockSpan(0, [1]).covered(-4)


def test_negative_cached_count_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"cached tokens of group 'f' must be >= 0, got -1"):
        transfer_range(G("f", "full"), 10, -1)
    with pytest.raises(TypeError, match=r"cached tokens of group 'f' must be an int, got bool"):
        transfer_range(G("f", "full"), 10, False)


def test_block_span_rejects_bad_ids_and_anchor() -> None:
    with pytest.raises(ValueError, match=r"BlockSpan.first_block must be >= 0, got -1"):
        BlockSpan(-1, [0])
    with pytest.raises(ValueError, match=r"BlockSpan.block_ids\[1\] is negative \(-3\)"):
        BlockSpan(0, [0, -3])
    with pytest.raises(TypeError, match=r"BlockSpan.block_ids\[0\] must be an int, got 1.5"):
        BlockSpan(0, [1.5])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"BlockSpan.block_ids\[0\] must be an int, got True"):
        BlockSpan(0, [True])


def test_block_span_anchor_is_explicit_not_inferred_from_length() -> None:
    # Three ids anchored at logical block 10: positions [40, 52) with B = 4, not [0, 12).
    span = BlockSpan(10, [7, 8, 9])
    assert span.covered(4) == TokenRange(40, 52)
    assert span.block_id(11) == 8
    with pytest.raises(
        ValueError,
        match=r"group 'full': logical block 2 is outside the span "
        r"\[10, 13\)",
    ):
        span.block_id(2, group="full")


def test_span_that_does_not_cover_names_group_side_and_positions() -> None:
    span = BlockSpan(2, [5, 6, 7])  # positions [8, 20) at B = 4
    msg = (
        r"group 'sliding128': receiver block span \(logical blocks \[2, 5\), "
        r"positions \[8, 20\)\) does not cover positions \[4, 8\) and \[20, 22\) "
        r"of the needed range TokenRange\[4, 22\)"
    )
    with pytest.raises(ValueError, match=msg):
        span.check_covers(TokenRange(4, 22), 4, group="sliding128", side="receiver")
    with pytest.raises(ValueError, match=r"does not cover positions \[20, 21\)"):
        span.block_ids_for(TokenRange(19, 21), 4, group="full")


def test_block_span_accepts_numpy_style_integers() -> None:
    class Index:
        def __init__(self, v: int) -> None:
            self.v = v

        def __index__(self) -> int:
            return self.v

    span = BlockSpan(0, [Index(3), Index(4)])  # type: ignore[list-item]
    assert span.block_ids == (3, 4)
    assert all(type(b) is int for b in span.block_ids)


def test_bool_is_not_a_position() -> None:
    assert 1 in TokenRange(0, 3)
    assert True not in TokenRange(0, 3)
    assert "1" not in TokenRange(0, 3)
