"""The packed (wire) format of DESIGN.md §2, derived identically on both sides of a transfer.

A packed buffer is a flat byte buffer. For each layer group in spec order it holds one
segment: a contiguous ``[layers_sel, kv, tokens, heads_sel, head_dim]`` tensor of the pool
dtype for attention groups, or ``[layers_sel, *state_shape_sel]`` of the state dtype for a
state group whose state moves. Empty segments take no space. Every segment starts at a
multiple of :data:`SEGMENT_ALIGN` bytes. Pure Python (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvtriton.ranges import TokenRange, ceil_div
from kvtriton.spec import DTYPE_BYTES, KVCacheSpec, LayerGroup

__all__ = [
    "SEGMENT_ALIGN",
    "PackedLayout",
    "Segment",
    "packed_layout",
    "select_heads",
    "select_layers",
]

#: Segment start alignment in bytes: 128 B is one full L2 cache line / coalesced warp access,
#: and keeps every segment viewable as any pool dtype.
SEGMENT_ALIGN = 128


@dataclass(frozen=True)
class Segment:
    """One group's slice of a packed buffer.

    Attributes:
        group: layer group name.
        kind: ``"kv"`` or ``"state"``.
        offset: byte offset from the start of the buffer.
        shape: ``(layers, kv, tokens, heads, head_dim)`` or ``(layers, *state_shape)``.
        dtype: element dtype name.
        tokens: positions held (``kv`` segments; empty for state).
        layer_ids: global layer ids, in the order of the segment's first dimension.
        heads: global kv-head range ``(start, end)`` (``kv``) or state_shape[0] range (state).
    """

    group: str
    kind: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    tokens: TokenRange
    layer_ids: tuple[int, ...]
    heads: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class PackedLayout:
    """All segments of one packed buffer and its total size in bytes."""

    segments: tuple[Segment, ...]
    nbytes: int

    def segment(self, group: str, kind: str | None = None) -> Segment:
        for seg in self.segments:
            if seg.group == group and (kind is None or seg.kind == kind):
                return seg
        raise KeyError(f"no segment for group {group!r} in this packed layout")

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.segments)


def _align(n: int) -> int:
    return ceil_div(n, SEGMENT_ALIGN) * SEGMENT_ALIGN


def select_layers(group: LayerGroup, layer_ids: Sequence[int] | None) -> tuple[int, ...]:
    """Validated global layer ids (default: all the group holds), in ascending order."""
    if layer_ids is None:
        return group.layer_ids
    ids = tuple(sorted(layer_ids))
    missing = sorted(set(ids) - set(group.layer_ids))
    if missing:
        raise ValueError(
            f"group {group.name!r}: layers {missing} are not held by this spec "
            f"(it holds {list(group.layer_ids)})"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"group {group.name!r}: duplicate layer ids in {list(layer_ids)}")
    return ids


def select_heads(group: LayerGroup, heads: tuple[int, int] | None) -> tuple[int, int]:
    """Validated global head range ``[start, end)`` (default: all the shard holds)."""
    lo, hi = group.held_heads
    if heads is None:
        return lo, hi
    start, end = heads
    if not lo <= start < end <= hi:
        raise ValueError(
            f"group {group.name!r}: head range [{start}, {end}) is not inside the held "
            f"range [{lo}, {hi})"
        )
    return start, end


def packed_layout(
    spec: KVCacheSpec,
    tokens: Mapping[str, TokenRange],
    states: Iterable[str] = (),
    *,
    layers: Mapping[str, Sequence[int]] | None = None,
    heads: Mapping[str, tuple[int, int]] | None = None,
) -> PackedLayout:
    """Derive the packed layout of one buffer.

    Args:
        spec: the spec both sides agree on (either side's shard spec works for the
            selection as long as it holds the selected layers and heads).
        tokens: positions to pack per attention group (groups left out pack nothing).
        states: names of state groups whose state is packed.
        layers: global layer ids per group (default: every layer of the group in ``spec``).
        heads: global head range per group (default: the shard's whole range).
    """
    states = tuple(states)  # may be a one-shot iterable; it is read twice below
    layers = layers or {}
    heads = heads or {}
    for what, names in (
        ("tokens", tokens),
        ("states", states),
        ("layers", layers),
        ("heads", heads),
    ):
        unknown = sorted(set(names) - set(spec.group_names))
        if unknown:
            raise ValueError(
                f"packed layout {what} names unknown groups {unknown}; spec "
                f"{spec.name!r} has {list(spec.group_names)}"
            )
    for name, given in tokens.items():
        if not isinstance(given, TokenRange):
            raise TypeError(f"tokens[{name!r}] must be a TokenRange, got {type(given).__name__}")
    state_set = set(states)
    segments: list[Segment] = []
    offset = 0
    for g in spec.groups:
        if g.is_state:
            if g.name in tokens and not tokens[g.name].is_empty:
                raise ValueError(f"group {g.name!r} is a state group: it moves no token range")
            if g.name not in state_set:
                continue
            ids = select_layers(g, layers.get(g.name))
            lo, hi = select_heads(g, heads.get(g.name))
            assert g.state_shape is not None
            shape = (len(ids), hi - lo, *g.state_shape[1:])
            seg = Segment(
                g.name,
                "state",
                offset,
                shape,
                g.item_dtype(spec.dtype),
                TokenRange(0, 0),
                ids,
                (lo, hi),
            )
        else:
            if g.name in state_set:
                raise ValueError(f"group {g.name!r} is an attention group: it has no state")
            rng = tokens.get(g.name)
            if rng is None or rng.is_empty:
                continue
            ids = select_layers(g, layers.get(g.name))
            lo, hi = select_heads(g, heads.get(g.name))
            shape = (len(ids), g.kv_factor, len(rng), hi - lo, g.head_dim)
            seg = Segment(g.name, "kv", offset, shape, spec.dtype, rng, ids, (lo, hi))
        if seg.nbytes == 0:
            continue
        segments.append(seg)
        offset = _align(seg.end)
    return PackedLayout(tuple(segments), offset)
