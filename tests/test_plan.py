"""plan_transfer / single_boundary / compare_policies against a token-level reference.

The reference computes, per layer group, the set of positions the decode query at ``q = P``
reads (keys in ``(q - W, q]`` except q itself), removes what the receiver holds, and counts
bytes from the group's shape -- without calling needed_range/transfer_range.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtriton.plan import (
    ReusePolicy,
    TransferPlan,
    compare_policies,
    plan_transfer,
    single_boundary,
)
from kvtriton.ranges import BlockSpan, GroupKind, TokenRange
from kvtriton.spec import KVCacheSpec, LayerGroup, preset
from kvtriton.testing import moved_positions as oracle_moves

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1}

# ---------------------------------------------------------------------------------------
# token-level reference
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefGroup:
    """What the reference expects one group to move."""

    positions: frozenset[int]
    moves_state: bool
    nbytes: int


def ref_bytes_per_token(spec: KVCacheSpec, g: LayerGroup) -> int:
    heads = g.num_kv_heads if g.head_end is None else g.head_end - g.head_start
    return len(g.layer_ids) * g.kv_factor * heads * g.head_dim * ITEMSIZE[spec.dtype]


def ref_state_bytes(spec: KVCacheSpec, g: LayerGroup) -> int:
    assert g.state_shape is not None
    return len(g.layer_ids) * math.prod(g.state_shape) * ITEMSIZE[g.state_dtype or spec.dtype]


def ref_plan(spec: KVCacheSpec, prompt: int, cached: Mapping[str, int]) -> dict[str, RefGroup]:
    """Per-group truth; ``cached`` holds one count per group (missing = 0)."""
    out = {}
    for g in spec.groups:
        c = cached.get(g.name, 0)
        if g.kind is GroupKind.STATE:
            moves = c != prompt  # the state is held only if it was taken at exactly P
            out[g.name] = RefGroup(frozenset(), moves, ref_state_bytes(spec, g) if moves else 0)
        else:
            pos = oracle_moves(g.kind, g.window, prompt, c)
            out[g.name] = RefGroup(frozenset(pos), False, len(pos) * ref_bytes_per_token(spec, g))
    return out


def ref_single_boundary(spec: KVCacheSpec, prompt: int, cached: Mapping[str, int]) -> int:
    """Brute force over every c in [0, P]: the cache holds exactly what the counts say (full
    attention [0, n), a window group the needed positions below n, a state its snapshot at
    n); c qualifies when each group holds what the query at c reads (its state at c)."""
    best = 0
    for c in range(prompt + 1):
        ok = True
        for g in spec.groups:
            n = cached.get(g.name, 0)
            if g.kind is GroupKind.STATE:
                ok = ok and (c == 0 or c == n)
                continue
            lo = 0 if g.window is None else max(0, prompt + 1 - g.window)
            held = set(range(lo, min(n, prompt)))
            reads = set(range(0 if g.window is None else max(0, c + 1 - g.window), c))
            ok = ok and reads <= held
        if ok:
            best = c
    return best


def moved_positions(plan: TransferPlan, name: str) -> list[int]:
    """Positions the plan moves for a group, enumerated chunk by chunk (duplicates kept)."""
    tpb = plan.spec.tokens_per_block
    return [p for _, sub in plan.group(name).tokens.block_chunks(tpb) for p in sub]


def assert_matches_reference(plan: TransferPlan, truth: dict[str, RefGroup]) -> None:
    assert [g.name for g in plan.groups] == list(plan.spec.group_names)
    for g in plan.groups:
        ref = truth[g.name]
        counts = Counter(moved_positions(plan, g.name))
        # every needed-and-uncached position moves exactly once; nothing else moves
        assert set(counts) == ref.positions, g.name
        assert all(n == 1 for n in counts.values()), g.name
        assert g.moves_state == ref.moves_state, g.name
        assert g.bytes == ref.nbytes, g.name
        assert all(p < plan.num_tokens for p in counts), "a draft/tail position moved"
    assert plan.total_bytes == sum(r.nbytes for r in truth.values())
    assert plan.is_full_hit == all(not r.positions and not r.moves_state for r in truth.values())
    assert set(plan.state_groups) == {n for n, r in truth.items() if r.moves_state}


# ---------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------


@st.composite
def specs(draw: st.DrawFn) -> KVCacheSpec:
    groups = []
    layer = 0
    for i in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["full", "sliding", "state"]))
        n = draw(st.integers(1, 3))
        ids = tuple(range(layer, layer + n))
        layer += n
        if kind == "state":
            shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
            groups.append(
                LayerGroup(
                    f"g{i}",
                    "state",
                    ids,
                    state_shape=shape,
                    state_dtype=draw(st.sampled_from([None, "float32"])),
                )
            )
            continue
        window = draw(st.integers(1, 700)) if kind == "sliding" else None
        groups.append(
            LayerGroup(
                f"g{i}",
                kind,
                ids,
                num_kv_heads=draw(st.integers(1, 4)),
                head_dim=draw(st.integers(1, 8)),
                window=window,
                kv_factor=draw(st.sampled_from([1, 2])),
            )
        )
    return KVCacheSpec(
        tuple(groups),
        tokens_per_block=draw(st.integers(1, 256)),
        dtype=draw(st.sampled_from(["bfloat16", "float32", "float8_e4m3fn"])),
        name="random",
    )


def cached_counts(prompt: int, tpb: int) -> st.SearchStrategy[int]:
    """Cached counts: arbitrary (often unaligned), block-aligned, exactly P, above P, zero."""
    return st.one_of(
        st.integers(0, prompt + 300),
        st.integers(0, (prompt + 300) // tpb).map(lambda b: b * tpb),
        st.just(prompt),
        st.integers(prompt + 1, prompt + 5000),
        st.just(0),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[KVCacheSpec, int, dict[str, int], int]:
    """(spec, P, per-group cached counts, draft count); some groups left out (= 0)."""
    spec = draw(specs())
    prompt = draw(st.integers(1, 2000))
    cached: dict[str, int] = {}
    for name in spec.group_names:
        if draw(st.booleans()) or draw(st.booleans()):
            cached[name] = draw(cached_counts(prompt, spec.tokens_per_block))
    return spec, prompt, cached, draw(st.integers(0, 64))


# ---------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------


@given(scenarios())
def test_per_group_mode_moves_exactly_the_needed_uncached_positions(
    case: tuple[KVCacheSpec, int, dict[str, int], int],
) -> None:
    spec, prompt, cached, drafts = case
    plan = plan_transfer(spec, prompt, cached, num_draft_tokens=drafts)
    assert plan.mode == "per_group"
    assert plan.num_tokens == prompt
    assert plan.allocated_tokens == prompt + drafts
    assert_matches_reference(plan, ref_plan(spec, prompt, cached))
    for g in plan.groups:
        assert g.cached_tokens == cached.get(g.name, 0)


@given(scenarios(), st.integers(0, 3000))
def test_single_boundary_mode_uses_one_count_for_every_group(
    case: tuple[KVCacheSpec, int, dict[str, int], int], boundary: int
) -> None:
    spec, prompt, _, drafts = case
    plan = plan_transfer(spec, prompt, boundary, num_draft_tokens=drafts)
    assert plan.mode == "single_boundary"
    # One boundary at or past P means the receiver resumes at P: the documented clamp.
    truth = ref_plan(spec, prompt, dict.fromkeys(spec.group_names, min(boundary, prompt)))
    assert_matches_reference(plan, truth)


@given(scenarios())
def test_policies_are_ordered_per_group_le_single_le_none(
    case: tuple[KVCacheSpec, int, dict[str, int], int],
) -> None:
    spec, prompt, cached, drafts = case
    c = single_boundary(spec, prompt, cached)
    plans = compare_policies(spec, prompt, cached, num_draft_tokens=drafts)
    assert set(plans) == {"per_group", "single_boundary", "no_reuse"}
    per, single, none = plans["per_group"], plans["single_boundary"], plans["no_reuse"]
    assert_matches_reference(per, ref_plan(spec, prompt, cached))
    assert_matches_reference(single, ref_plan(spec, prompt, dict.fromkeys(spec.group_names, c)))
    assert_matches_reference(none, ref_plan(spec, prompt, {}))

    # The single boundary is a prefix every attention group can reuse: each holds every
    # needed position below it.
    assert 0 <= c <= prompt
    assert c == ref_single_boundary(spec, prompt, cached)
    for g in spec.groups:
        if g.is_attention:
            assert c <= max(cached.get(g.name, 0), per.group(g.name).needed.start)
    for a, b in ((per, single), (single, none)):
        for ga, gb in zip(a.groups, b.groups, strict=True):
            assert set(ga.tokens) <= set(gb.tokens), ga.name
            assert ga.moves_state <= gb.moves_state, ga.name
            assert ga.bytes <= gb.bytes, ga.name
        assert a.total_bytes <= b.total_bytes


@given(scenarios(), st.integers(1, 256), st.integers(1, 256))
def test_block_views_agree_with_positions_on_both_sides(
    case: tuple[KVCacheSpec, int, dict[str, int], int], sender_tpb: int, receiver_tpb: int
) -> None:
    """Sender and receiver may use different block sizes: the plan's positions do not
    change, each side's blocks are exactly the blocks holding those positions, and spans
    allocated for the receiver's P + drafts positions cover every moved position."""
    spec, prompt, cached, drafts = case
    sender = plan_transfer(
        spec.with_block_size(sender_tpb), prompt, cached, num_draft_tokens=drafts
    )
    receiver = plan_transfer(
        spec.with_block_size(receiver_tpb), prompt, cached, num_draft_tokens=drafts
    )
    for gs, gr in zip(sender.groups, receiver.groups, strict=True):
        assert gs.tokens == gr.tokens and gs.bytes == gr.bytes
        pos = set(gs.tokens)
        assert set(gs.blocks(sender_tpb)) == {p // sender_tpb for p in pos}
        assert set(gr.blocks(receiver_tpb)) == {p // receiver_tpb for p in pos}
        d = gr.to_dict(receiver_tpb)
        assert d["num_tokens"] == len(pos)
        assert d["num_blocks"] == len({p // receiver_tpb for p in pos})
        # The receiver allocates blocks for [0, P + drafts); they hold every moved position
        # and the draft tail [P, P + drafts) is allocated but never moved.
        alloc = TokenRange(0, receiver.allocated_tokens)
        blocks = alloc.blocks(receiver_tpb)
        span = BlockSpan(blocks.start, [10_000 + b for b in blocks])
        span.check_covers(gr.tokens, receiver_tpb, group=gr.name, side="receiver")
        assert pos.isdisjoint(range(prompt, prompt + drafts))


@given(scenarios())
def test_drafts_change_nothing_that_moves(
    case: tuple[KVCacheSpec, int, dict[str, int], int],
) -> None:
    spec, prompt, cached, drafts = case
    with_drafts = plan_transfer(spec, prompt, cached, num_draft_tokens=drafts)
    without = plan_transfer(spec, prompt, cached)
    assert with_drafts.groups == without.groups
    assert with_drafts.total_bytes == without.total_bytes


# ---------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------


def _one(kind: str, *, window: int | None = None, tpb: int = 4) -> KVCacheSpec:
    return KVCacheSpec(
        (LayerGroup("g", kind, (0,), 1, 1, window=window),),
        tokens_per_block=tpb,
        dtype="float32",
        name="one",
    )


def test_gpt_oss_second_turn_numbers() -> None:
    """The README's scenario: P = 8192, full cached 6000, sliding cached 0."""
    spec = preset("gpt-oss-20b")
    cached = {"full": 6000, "sliding128": 0}
    plans = compare_policies(spec, 8192, cached)
    per = plans["per_group"]
    assert per.group("full").tokens == TokenRange(6000, 8192)
    assert len(per.group("full").tokens) == 2192
    assert per.group("sliding128").tokens == TokenRange(8065, 8192)
    assert single_boundary(spec, 8192, cached) == 0
    single = plans["single_boundary"]
    assert single.group("full").tokens == TokenRange(0, 8192)
    assert single.group("sliding128").tokens == TokenRange(8065, 8192)
    # 12 layers x K,V x 8 heads x 64 x bf16 = 24576 bytes per token per group.
    assert per.total_bytes == (2192 + 127) * 24576
    assert single.total_bytes == (8192 + 127) * 24576 == plans["no_reuse"].total_bytes


def test_full_hit_moves_nothing_and_is_still_a_valid_plan() -> None:
    spec = preset("tiny-hybrid")
    plan = plan_transfer(spec, 50, {"full": 50, "sliding8": 80, "state": 50})
    assert plan.is_full_hit
    assert plan.total_bytes == 0 and plan.state_groups == ()
    assert [g.name for g in plan.groups] == list(spec.group_names)
    assert all(g.tokens.is_empty and g.tokens.end == 50 for g in plan.groups)
    assert plan.group("full").needed == TokenRange(0, 50)
    json.dumps(plan.to_dict())  # still reports cleanly


def test_full_hit_in_single_boundary_mode() -> None:
    plan = plan_transfer(preset("tiny-hybrid"), 50, 10_000)
    assert plan.is_full_hit  # the boundary clamps to P, so the state at P is held


def test_window_one_moves_nothing() -> None:
    plan = plan_transfer(_one("sliding", window=1), 10, {})
    assert plan.group("g").needed.is_empty and plan.is_full_hit


def test_window_smaller_than_a_block_spans_two_blocks() -> None:
    plan = plan_transfer(_one("sliding", window=3, tpb=16), 17, {})
    g = plan.group("g")
    assert g.tokens == TokenRange(15, 17)
    assert list(g.blocks(16)) == [0, 1]
    assert g.kv_bytes == 2 * 2 * 4  # 2 positions x K,V x 1 head x 1 x fp32


def test_prompt_not_a_multiple_of_the_block_size() -> None:
    plan = plan_transfer(_one("full", tpb=4), 10, {})
    g = plan.group("g")
    assert g.tokens == TokenRange(0, 10)
    assert list(g.blocks(4)) == [0, 1, 2]  # the last block holds 2 of 4 positions
    assert g.kv_bytes == 10 * 8  # bytes count positions, not whole blocks


def test_cached_not_block_aligned() -> None:
    g = plan_transfer(_one("full", tpb=4), 10, {"g": 6}).group("g")
    assert g.tokens == TokenRange(6, 10)
    assert list(g.blocks(4)) == [1, 2]  # block 1 is half cached, half moved


def test_draft_tokens_never_move() -> None:
    plan = plan_transfer(_one("full", tpb=4), 10, {"g": 6}, num_draft_tokens=7)
    assert plan.group("g").tokens == TokenRange(6, 10)
    assert plan.allocated_tokens == 17
    assert plan.to_dict()["num_draft_tokens"] == 7


def test_state_moves_unless_held_at_exactly_prompt() -> None:
    spec = preset("tiny-hybrid")
    state_bytes = 1 * 2 * 4 * 8 * 4  # 1 layer x (2, 4, 8) x fp32
    assert plan_transfer(spec, 50, {"state": 50}).group("state").moves_state is False
    for snapshot in (0, 49, 51):  # a state taken elsewhere cannot be reused at P
        g = plan_transfer(spec, 50, {"state": snapshot}).group("state")
        assert g.moves_state and g.state_bytes == state_bytes and g.tokens.is_empty


def test_single_boundary_from_counts_is_what_they_prove() -> None:
    """Counts say only what DESIGN.md §1 says (every needed position below the count is
    held), so a window group whose window starts after 0 supports c = P or c = 0."""
    spec = preset("tiny-hybrid")  # full, sliding8 (W = 8), state; P = 50: needed [43, 50)
    assert single_boundary(spec, 50, {"full": 40, "sliding8": 30, "state": 35}) == 0
    assert single_boundary(spec, 50, {"full": 40, "sliding8": 45, "state": 35}) == 0
    assert single_boundary(spec, 50, {"full": 90, "sliding8": 90, "state": 50}) == 50
    assert single_boundary(spec, 50, {"full": 90, "sliding8": 50, "state": 49}) == 0
    assert single_boundary(spec, 50, {"full": 90}) == 0  # left-out groups count as 0
    # A window reaching back to 0 (P = 6 < W) holds [0, count): it resumes below it.
    assert single_boundary(spec, 6, {"full": 5, "sliding8": 4, "state": 4}) == 4
    assert single_boundary(spec, 6, {"full": 5, "sliding8": 5, "state": 4}) == 4
    # A snapshot past P (or anywhere but a common c) cannot be resumed from.
    assert single_boundary(spec, 6, {"full": 5, "sliding8": 5, "state": 7}) == 0
    no_window = KVCacheSpec(
        (spec.group("full"), spec.group("state")), tokens_per_block=4, name="full+state"
    )
    assert single_boundary(no_window, 50, {"full": 40, "state": 35}) == 35
    assert single_boundary(no_window, 50, {"full": 30, "state": 35}) == 0


def test_gpt_oss_manager_planner_and_cli_agree_on_the_single_boundary(capsys) -> None:
    """Issue 12, item 4: an 8192-token prefill committed and freed; request 2 is its first
    6000 tokens + 1000 new. The sliding layers never held the window below 6000 (a prefill
    allocates only the window of its own P), so no common prefix above 0 exists: the cache
    manager says boundary 0, and the planner must say the same from the match's counts."""
    from kvtriton.cache import KVCacheManager
    from kvtriton.cli import main

    spec = preset("gpt-oss-20b")
    m = KVCacheManager(spec, 4096)
    first = list(range(1, 8193))
    m.allocate("a", first, prefill=True)
    m.commit("a")
    m.free("a")
    second = first[:6000] + list(range(100_001, 101_001))
    match = m.match(second)
    assert match.cached == {"full": 6000, "sliding128": 6873}
    assert match.boundary == 0
    assert single_boundary(spec, 7000, match.cached) == 0
    for source in (match.cached, match):
        plans = compare_policies(spec, 7000, source)
        assert plans.boundary == 0
        assert plans["single_boundary"].group("full").tokens == TokenRange(0, 7000)
        assert plans["single_boundary"].total_bytes == plans["no_reuse"].total_bytes
        assert plans["per_group"].group("full").tokens == TokenRange(6000, 7000)
    # the receiver's single-boundary allocation plans the same bytes
    single = m.allocate("b", match, mode="single_boundary")
    assert plan_transfer(spec, 7000, single.cached_tokens()) == plans["single_boundary"]
    m.free("b")
    # and so does the CLI, given the same counts
    args = ["plan", "--preset", "gpt-oss-20b", "--prompt", "7000", "--json"]
    assert main([*args, "--cached", "full=6000", "--cached", "sliding128=6873"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["single_boundary"]["total_bytes"] == plans["single_boundary"].total_bytes


def test_compare_policies_takes_a_cache_holding_or_a_boundary() -> None:
    spec = preset("gpt-oss-20b")
    counts = {"full": 6000, "sliding128": 6873}
    # the caller knows the cache holds the window below 4096 too: c = 4096
    plans = compare_policies(spec, 7000, counts, boundary=4096)
    assert plans.boundary == 4096
    assert plans["single_boundary"].group("full").tokens == TokenRange(4096, 7000)
    with pytest.raises(ValueError, match=r"boundary 6500 exceeds the cached count of \['full'\]"):
        compare_policies(spec, 7000, counts, boundary=6500)
    with pytest.raises(ValueError, match="prompt of 7000 tokens, not num_tokens=7001"):
        from types import SimpleNamespace

        holding = SimpleNamespace(num_tokens=7000, cached=counts, boundary=0)
        compare_policies(spec, 7001, holding)


def test_plan_group_lookup_names_the_groups() -> None:
    plan = plan_transfer(preset("tiny-hybrid"), 5, {})
    with pytest.raises(KeyError, match=r"no layer group 'nope' in this plan"):
        plan.group("nope")


# -- bad input ----------------------------------------------------------------------------


def test_zero_prompt_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"num_tokens \(prompt length P\) must be >= 1, got 0"):
        plan_transfer(preset("tiny-hybrid"), 0, {})
    with pytest.raises(ValueError, match=r"num_tokens \(prompt length P\) must be >= 1, got 0"):
        single_boundary(preset("tiny-hybrid"), 0, {})


def test_unknown_group_names_in_cached_tokens_are_rejected() -> None:
    spec = preset("gpt-oss-20b")
    msg = (
        r"cached_tokens names unknown layer groups \['sliding'\]; spec 'gpt-oss-20b' has "
        r"\['full', 'sliding128'\]"
    )
    with pytest.raises(ValueError, match=msg):
        plan_transfer(spec, 100, {"full": 10, "sliding": 5})
    with pytest.raises(ValueError, match=r"unknown layer groups \['sliding'\]"):
        single_boundary(spec, 100, {"sliding": 5})
    with pytest.raises(ValueError, match=r"unknown layer groups \['sliding'\]"):
        compare_policies(spec, 100, {"sliding": 5})


def test_negative_counts_are_rejected() -> None:
    spec = preset("tiny-hybrid")
    with pytest.raises(ValueError, match=r"cached_tokens\['full'\] must be >= 0, got -1"):
        plan_transfer(spec, 10, {"full": -1})
    with pytest.raises(ValueError, match=r"cached_tokens \(single boundary\) must be >= 0, got -3"):
        plan_transfer(spec, 10, -3)
    with pytest.raises(ValueError, match=r"num_draft_tokens must be >= 0, got -1"):
        plan_transfer(spec, 10, {}, num_draft_tokens=-1)
    with pytest.raises(ValueError, match=r"num_tokens \(prompt length P\) must be >= 1, got -5"):
        plan_transfer(spec, -5, {})


def test_bools_and_floats_are_not_counts() -> None:
    spec = preset("tiny-hybrid")
    with pytest.raises(TypeError, match=r"cached_tokens\['full'\] must be an int, got bool True"):
        plan_transfer(spec, 10, {"full": True})
    with pytest.raises(TypeError, match=r"\(single boundary\) must be an int, got bool False"):
        plan_transfer(spec, 10, False)
    with pytest.raises(TypeError, match=r"num_tokens \(prompt length P\) must be an int, got bool"):
        plan_transfer(spec, True, {})
    with pytest.raises(TypeError, match=r"num_draft_tokens must be an int, got float 2.0"):
        plan_transfer(spec, 10, {}, num_draft_tokens=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cached_tokens\['state'\] must be an int, got bool"):
        single_boundary(spec, 10, {"state": True})


def test_policies_need_per_group_counts() -> None:
    spec = preset("tiny-hybrid")
    with pytest.raises(
        TypeError,
        match=r"cached_tokens must be a mapping \{group name: cached "
        r"count\}, got int 5",
    ):
        compare_policies(spec, 10, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cached_tokens must be a mapping"):
        single_boundary(spec, 10, [("full", 3)])  # type: ignore[arg-type]


# -- reuse policies -------------------------------------------------------------------------


def test_reuse_policy_is_the_one_registry_of_names_and_labels() -> None:
    assert [p.value for p in ReusePolicy] == ["per_group", "single_boundary", "no_reuse"]
    assert [p.label for p in ReusePolicy] == ["per-group", "single boundary", "no reuse"]
    assert ReusePolicy.table_order()[0] is ReusePolicy.PER_GROUP
    assert ReusePolicy.baseline_order() == tuple(reversed(ReusePolicy.table_order()))
    assert ReusePolicy.NO_REUSE.cache_mode is ReusePolicy.PER_GROUP
    assert ReusePolicy.parse("single_boundary") is ReusePolicy.SINGLE_BOUNDARY
    with pytest.raises(ValueError, match="policy must be one of per_group, single_boundary"):
        ReusePolicy.parse("bogus")
    plans = compare_policies(preset("tiny-hybrid"), 40, {"full": 20})
    assert list(plans) == list(ReusePolicy.table_order())
    assert plans["per_group"] is plans[ReusePolicy.PER_GROUP]  # str keys still work
    assert plans[ReusePolicy.PER_GROUP].mode is ReusePolicy.PER_GROUP
    assert json.loads(json.dumps(plans[ReusePolicy.PER_GROUP].to_dict()))["mode"] == "per_group"


# -- readable plans from Python -------------------------------------------------------------


def test_plan_repr_and_table_read_well() -> None:
    spec = preset("gpt-oss-20b")
    plans = compare_policies(spec, 8192, {"full": 6000})
    per = plans["per_group"]
    assert repr(per) == (
        "TransferPlan(gpt-oss-20b, P=8192, per_group: full [6000, 8192), "
        "sliding128 [8065, 8192); 54.4 MiB)"
    )
    text = str(per)
    assert text == per.table()
    lines = text.splitlines()
    assert lines[0] == "gpt-oss-20b: prompt P = 8,192 tokens, 16 tokens/block, bfloat16; per-group"
    full = next(line.split() for line in lines if line.startswith("full "))
    assert full == ["full", "full", "12", "-", "[0,", "8192)", "6,000", "[6000,", "8192)",
                    "2,192", "137", "51.4", "MiB"]  # fmt: skip
    assert lines[-1].split() == ["total", "24", "2,319", "145", "54.4", "MiB"]
    # the comparison: a dict in table order with its boundary and the CLI's table
    assert list(plans) == list(ReusePolicy.table_order())
    assert plans.boundary == 0
    from kvtriton.cli import plan_table

    assert str(plans) == plans.table() == plan_table(plans)
    assert "per-group vs single boundary: saves 141 MiB (72.1% of 195 MiB)" in str(plans)
    state = plan_transfer(preset("tiny-hybrid"), 50, {"state": 50})
    assert "state kept" in repr(state) and "kept" in state.table()


def test_plans_pretty_print_as_tables_in_jupyter() -> None:
    pretty = pytest.importorskip("IPython.lib.pretty").pretty

    plans = compare_policies(preset("tiny-hybrid"), 50, {"full": 40})
    assert pretty(plans) == plans.table()
    assert pretty(plans["no_reuse"]) == plans["no_reuse"].table()


def test_plans_take_a_preset_name_like_the_spec_it_names() -> None:
    spec = preset("gpt-oss-20b")
    held = {g: 100 for g in spec.group_names}
    assert plan_transfer("gpt-oss-20b", 300, held) == plan_transfer(spec, 300, held)
    assert single_boundary("gpt-oss-20b", 300, held) == single_boundary(spec, 300, held)
    assert compare_policies("gpt-oss-20b", 300, held) == compare_policies(spec, 300, held)
    with pytest.raises(ValueError, match="unknown preset 'gpt-oss-2b'"):
        plan_transfer("gpt-oss-2b", 300, 0)
    with pytest.raises(TypeError, match="KVCacheSpec or a preset name"):
        plan_transfer(42, 300, 0)  # type: ignore[arg-type]
