"""packed_layout: the wire format of DESIGN.md §2, derived identically on both sides."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtriton.layout import SEGMENT_ALIGN, PackedLayout, packed_layout
from kvtriton.ranges import TokenRange, ceil_div
from kvtriton.spec import KVCacheSpec, preset

ITEMSIZE = {"float32": 4, "bfloat16": 2}

Selection = tuple[
    KVCacheSpec, dict[str, TokenRange], list[str], dict[str, list[int]], dict[str, tuple[int, int]]
]


def check_invariants(spec: KVCacheSpec, layout: PackedLayout) -> None:
    """Aligned, non-overlapping segments in spec order whose sizes match their shapes."""
    order = {name: i for i, name in enumerate(spec.group_names)}
    previous_end = 0
    previous_index = -1
    for seg in layout.segments:
        assert seg.offset % SEGMENT_ALIGN == 0, seg
        assert seg.offset >= previous_end, "segments overlap"
        assert order[seg.group] > previous_index, "segments out of spec order"
        assert seg.nbytes == math.prod(seg.shape) * ITEMSIZE[seg.dtype] > 0
        g = spec.group(seg.group)
        if seg.kind == "kv":
            assert seg.shape == (
                len(seg.layer_ids),
                g.kv_factor,
                len(seg.tokens),
                seg.heads[1] - seg.heads[0],
                g.head_dim,
            )
            assert seg.dtype == spec.dtype
        else:
            assert g.state_shape is not None
            assert seg.shape == (
                len(seg.layer_ids),
                seg.heads[1] - seg.heads[0],
                *g.state_shape[1:],
            )
            assert seg.dtype == (g.state_dtype or spec.dtype)
        previous_end, previous_index = seg.end, order[seg.group]
    assert layout.nbytes == ceil_div(previous_end, SEGMENT_ALIGN) * SEGMENT_ALIGN
    assert layout.nbytes % SEGMENT_ALIGN == 0


@st.composite
def selections(draw: st.DrawFn) -> Selection:
    """A shard spec and a random (tokens, states, layers, heads) selection it holds."""
    tp = draw(st.sampled_from([1, 2]))
    spec = preset("tiny-hybrid").shard(draw(st.integers(0, tp - 1)), tp)
    tokens: dict[str, TokenRange] = {}
    states: list[str] = []
    layers: dict[str, list[int]] = {}
    heads: dict[str, tuple[int, int]] = {}
    for g in spec.groups:
        if g.is_state:
            if draw(st.booleans()):
                states.append(g.name)
        elif draw(st.booleans()):
            a, b = sorted(draw(st.lists(st.integers(0, 500), min_size=2, max_size=2)))
            tokens[g.name] = TokenRange(a, b)
        lo, hi = g.held_heads
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(g.layer_ids), unique=True, min_size=1))
            layers[g.name] = draw(st.permutations(chosen))
        if draw(st.booleans()):
            a = draw(st.integers(lo, hi - 1))
            heads[g.name] = (a, draw(st.integers(a + 1, hi)))
    return spec, tokens, states, layers, heads


@given(selections())
def test_layout_invariants_and_both_sides_agree(
    case: Selection,
) -> None:
    spec, tokens, states, layers, heads = case
    layout = packed_layout(spec, tokens, states, layers=layers, heads=heads)
    check_invariants(spec, layout)
    # Exactly the non-empty selections appear, with the selected layers (ascending) and heads.
    expect = [
        n for n in spec.group_names if (n in tokens and not tokens[n].is_empty) or n in states
    ]
    assert [s.group for s in layout.segments] == expect
    for seg in layout.segments:
        g = spec.group(seg.group)
        assert seg.layer_ids == tuple(sorted(layers.get(seg.group, g.layer_ids)))
        if seg.group in heads:
            assert seg.heads == heads[seg.group]
        if seg.kind == "kv":
            assert seg.tokens == tokens[seg.group]
    # The other side may hold a different shard (here: the model): same selection, same bytes.
    explicit_heads: dict[str, tuple[int, int]] = {}
    for g in spec.groups:
        start = g.held_heads[0]
        held = g.local_state_shape[0] if g.is_state else g.local_heads
        explicit_heads[g.name] = (start, start + held)
    explicit_heads.update(heads)
    other = packed_layout(
        spec.root.with_block_size(7), tokens, states, layers=layers, heads=explicit_heads
    )
    assert other == layout
    assert packed_layout(spec, tokens, iter(states), layers=layers, heads=heads) == layout


def test_example_offsets_by_hand() -> None:
    spec = preset("tiny-hybrid")  # fp32; full (1, 4), sliding8 (0, 2, 5), state (3,) (2, 4, 8)
    layout = packed_layout(
        spec, {"full": TokenRange(5, 10), "sliding8": TokenRange(3, 10)}, ["state"]
    )
    full, sliding, state = layout.segments
    assert (full.offset, full.shape, full.nbytes) == (0, (2, 2, 5, 2, 16), 2 * 2 * 5 * 2 * 16 * 4)
    assert full.nbytes == 2560 and sliding.offset == 2560  # 2560 is a multiple of 128
    assert sliding.shape == (3, 2, 7, 2, 16) and sliding.nbytes == 5376
    assert state.offset == 2560 + 5376 and state.offset % SEGMENT_ALIGN == 0
    assert state.shape == (1, 2, 4, 8) and state.dtype == "float32" and state.nbytes == 256
    assert layout.nbytes == 2560 + 5376 + 256
    assert layout.segment("sliding8").tokens == TokenRange(3, 10)
    assert layout.segment("state", "state") is state


def test_unaligned_segment_ends_are_padded() -> None:
    spec = preset("gpt-oss-20b")  # 24576 B/token per group: aligned already; use 1 head, 1 layer
    layout = packed_layout(
        spec,
        {"full": TokenRange(0, 1), "sliding128": TokenRange(0, 1)},
        layers={"full": [1]},
        heads={"full": (0, 1), "sliding128": (2, 3)},
    )
    full, sliding = layout.segments
    assert full.nbytes == 1 * 2 * 1 * 1 * 64 * 2 == 256
    assert sliding.offset == 256 and sliding.heads == (2, 3)
    odd = packed_layout(
        preset("tiny-hybrid", dtype="bf16"),
        {"full": TokenRange(0, 1)},
        ["state"],
        layers={"full": [4]},
        heads={"full": (1, 2)},
    )
    assert odd.segments[0].nbytes == 64  # 1 x 2 x 1 x 1 x 16 x bf16
    assert odd.segments[1].offset == 128  # padded up to the alignment


def test_empty_selection_is_an_empty_buffer() -> None:
    spec = preset("tiny-hybrid")
    layout = packed_layout(spec, {"full": TokenRange(9, 9)})
    assert layout.segments == () and layout.nbytes == 0
    # A state group may appear in tokens with an empty range (a plan reports one).
    assert packed_layout(spec, {"state": TokenRange(4, 4)}).nbytes == 0


def test_segment_lookup_names_the_group() -> None:
    layout = packed_layout(preset("tiny-hybrid"), {"full": TokenRange(0, 4)})
    with pytest.raises(KeyError, match=r"no segment for group 'sliding8'"):
        layout.segment("sliding8")


# -- errors -------------------------------------------------------------------------------


def test_unknown_groups_are_rejected_everywhere() -> None:
    spec = preset("tiny-hybrid")
    cases = {
        "tokens": dict(tokens={"swa": TokenRange(0, 1)}),
        "states": dict(tokens={}, states=["ssm"]),
        "layers": dict(tokens={"full": TokenRange(0, 1)}, layers={"ful": [1]}),
        "heads": dict(tokens={"full": TokenRange(0, 1)}, heads={"Full": (0, 1)}),
    }
    for what, kwargs in cases.items():
        with pytest.raises(
            ValueError,
            match=rf"packed layout {what} names unknown groups "
            r"\['\w+'\]; spec 'tiny-hybrid' has \['full', ",
        ):
            packed_layout(spec, **kwargs)  # type: ignore[arg-type]


def test_layers_not_held_are_rejected() -> None:
    stage = preset("tiny-hybrid").stage(0, 2)  # layers 0, 1, 2
    with pytest.raises(
        ValueError,
        match=r"group 'full': layers \[4\] are not held by this spec "
        r"\(it holds \[1\]\)",
    ):
        packed_layout(stage, {"full": TokenRange(0, 4)}, layers={"full": [1, 4]})
    with pytest.raises(ValueError, match=r"group 'sliding8': duplicate layer ids in \[0, 0\]"):
        packed_layout(stage, {"sliding8": TokenRange(0, 4)}, layers={"sliding8": [0, 0]})


def test_heads_not_held_are_rejected() -> None:
    shard = preset("gpt-oss-20b").shard(1, 4)  # heads [2, 4)
    with pytest.raises(
        ValueError,
        match=r"group 'full': head range \[0, 3\) is not inside the "
        r"held range \[2, 4\)",
    ):
        packed_layout(shard, {"full": TokenRange(0, 4)}, heads={"full": (0, 3)})
    with pytest.raises(ValueError, match=r"head range \[3, 3\) is not inside"):
        packed_layout(shard, {"full": TokenRange(0, 4)}, heads={"full": (3, 3)})
    tiny = preset("tiny-hybrid")
    with pytest.raises(
        ValueError,
        match=r"group 'state': head range \[0, 3\) is not inside the "
        r"held range \[0, 2\)",
    ):
        packed_layout(tiny, {}, ["state"], heads={"state": (0, 3)})


def test_kind_mismatches_are_rejected() -> None:
    spec = preset("tiny-hybrid")
    with pytest.raises(
        ValueError,
        match=r"group 'state' is a state group: it moves no token "
        r"range",
    ):
        packed_layout(spec, {"state": TokenRange(0, 4)})
    with pytest.raises(ValueError, match=r"group 'full' is an attention group: it has no state"):
        packed_layout(spec, {}, ["full"])
    with pytest.raises(TypeError, match=r"tokens\['full'\] must be a TokenRange, got tuple"):
        packed_layout(spec, {"full": (0, 4)})  # type: ignore[dict-item]


def test_group_shapes_with_kv_factor_one() -> None:
    spec = preset("deepseek-v3")
    seg = packed_layout(spec, {"mla": TokenRange(64, 100)}).segment("mla")
    assert seg.shape == (61, 1, 36, 1, 576)
