"""Split one request's transfer into chunks; both sides derive the same plan.

A chunk is itself a packed buffer (DESIGN.md §2): per group, a token sub-range of the
request's range with the same layer and head selection, plus whole state segments. Groups are
walked in spec order and cut by token positions so each chunk holds at most ``chunk_bytes``
(``Chunk.nbytes``, the 128-byte padded size; a chunk always holds at least one token, so a
single token larger than ``chunk_bytes`` makes a chunk of its own; a state segment is never
split). Pure Python.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvtriton.layout import SEGMENT_ALIGN, PackedLayout, packed_layout
from kvtriton.ranges import TokenRange
from kvtriton.spec import DTYPE_BYTES, KVCacheSpec

__all__ = ["DEFAULT_CHUNK_BYTES", "Chunk", "plan_chunks"]

#: Default chunk size (bytes): 32 MiB, sized by the wire rather than by host cost. A chunk
#: costs one kernel launch on each side (prepared once per request), so host time per chunk
#: is a few tens of microseconds; 32 MiB takes ~90 us on NVLink (~360 GB/s) and ~8 us as a
#: device copy, so the pipeline gather k+1 / send k / scatter k-1 keeps the wire busy while
#: a request's first bytes arrive early.
DEFAULT_CHUNK_BYTES = 32 << 20


def _align(n: int) -> int:
    return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN


@dataclass(frozen=True)
class Chunk:
    """Chunk ``index`` of a request: its token sub-ranges, state groups and packed layout."""

    index: int
    tokens: Mapping[str, TokenRange]
    states: tuple[str, ...]
    layout: PackedLayout

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @property
    def layer_ids(self) -> frozenset[int]:
        """Global layers whose KV or state this chunk holds (a streamed source can send it
        once they are all written)."""
        return frozenset(i for seg in self.layout.segments for i in seg.layer_ids)


def plan_chunks(
    model: KVCacheSpec,
    tokens: Mapping[str, TokenRange],
    states: Sequence[str],
    *,
    layers: Mapping[str, Sequence[int]],
    heads: Mapping[str, tuple[int, int]],
    chunk_bytes: int,
    by_layer: bool = False,
) -> tuple[Chunk, ...]:
    """Chunks of one (request, sender) transfer, in wire order.

    Args:
        model: the model spec (``root`` is used: it holds every layer and head).
        tokens: positions per attention group (empty or absent groups move nothing).
        states: state groups whose state moves.
        layers, heads: global layer ids and head range per group (the topology slice).
        chunk_bytes: target chunk size in bytes (>= 1).
        by_layer: layer-major chunks for streaming: in ascending global layer order, each
            chunk holds ONE layer of one group (its requested positions, cut by
            ``chunk_bytes`` when larger), so it can move as soon as that layer is written.
    Returns an empty tuple when nothing moves (a full hit).
    """
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    root = model.root
    if by_layer:
        return _by_layer(root, tokens, states, layers, heads, chunk_bytes)
    work: list[tuple[str, TokenRange, int]] = []  # (group, range, bytes per token)
    state_list: list[tuple[str, int]] = []
    for g in root.groups:
        if g.is_state:
            if g.name in states:
                hs = heads.get(g.name)
                nh = (hs[1] - hs[0]) if hs else g.state_shape[0]  # type: ignore[index]
                per_head = g.state_elements() // g.num_layers // g.state_shape[0]  # type: ignore[index]
                nbytes = (
                    len(layers.get(g.name, g.layer_ids))
                    * nh
                    * per_head
                    * DTYPE_BYTES[g.item_dtype(root.dtype)]
                )
                state_list.append((g.name, nbytes))
            continue
        rng = tokens.get(g.name)
        if rng is None or rng.is_empty:
            continue
        hs = heads.get(g.name)
        nh = (hs[1] - hs[0]) if hs else g.num_kv_heads
        bpt = (
            len(layers.get(g.name, g.layer_ids))
            * g.kv_factor
            * nh
            * g.head_dim
            * DTYPE_BYTES[root.dtype]
        )
        work.append((g.name, rng, bpt))

    plans: list[tuple[dict[str, TokenRange], list[str]]] = []
    cur_tokens: dict[str, TokenRange] = {}
    cur_states: list[str] = []
    used = 0

    def flush() -> None:
        nonlocal cur_tokens, cur_states, used
        if cur_tokens or cur_states:
            plans.append((cur_tokens, cur_states))
        cur_tokens, cur_states, used = {}, [], 0

    for name, rng, bpt in work:
        pos = rng.start
        while pos < rng.end:
            # the layout pads the chunk to SEGMENT_ALIGN: budget in whole aligned units
            room = (chunk_bytes // SEGMENT_ALIGN) * SEGMENT_ALIGN - _align(used)
            n = min(rng.end - pos, max(room, 0) // bpt)
            if n == 0:
                if used:
                    flush()
                    continue
                n = 1  # one token larger than a chunk: a chunk of its own
            cur_tokens[name] = TokenRange(pos, pos + n)
            used = _align(used) + n * bpt
            pos += n
            if used >= chunk_bytes:
                flush()
    for name, nbytes in state_list:
        if used and _align(_align(used) + nbytes) > chunk_bytes:
            flush()
        cur_states.append(name)
        used = _align(used) + nbytes
    flush()

    out = []
    for i, (tok, sts) in enumerate(plans):
        layout = packed_layout(
            root,
            tok,
            sts,
            layers={g: layers[g] for g in [*tok, *sts] if g in layers},
            heads={g: heads[g] for g in [*tok, *sts] if g in heads},
        )
        out.append(Chunk(i, tok, tuple(sts), layout))
    return tuple(out)


def _by_layer(
    root: KVCacheSpec,
    tokens: Mapping[str, TokenRange],
    states: Sequence[str],
    layers: Mapping[str, Sequence[int]],
    heads: Mapping[str, tuple[int, int]],
    chunk_bytes: int,
) -> tuple[Chunk, ...]:
    steps: list[tuple[int, str, TokenRange | None]] = []  # (layer, group, range or state)
    for g in root.groups:
        ids = tuple(layers.get(g.name, g.layer_ids))
        if g.is_state:
            if g.name in states:
                steps += [(i, g.name, None) for i in ids]
            continue
        rng = tokens.get(g.name)
        if rng is None or rng.is_empty:
            continue
        hs = heads.get(g.name)
        nh = (hs[1] - hs[0]) if hs else g.num_kv_heads
        bpt = g.kv_factor * nh * g.head_dim * DTYPE_BYTES[root.dtype]
        per = max(1, chunk_bytes // bpt)  # tokens per chunk of one layer
        for i in ids:
            for pos in range(rng.start, rng.end, per):
                steps.append((i, g.name, TokenRange(pos, min(rng.end, pos + per))))
    steps.sort(key=lambda s: s[0])  # stable: a layer's token pieces keep their order
    out = []
    for k, (layer, name, sub) in enumerate(steps):
        tok = {} if sub is None else {name: sub}
        sts = [name] if sub is None else []
        layout = packed_layout(
            root, tok, sts, layers={name: (layer,)},
            heads={name: heads[name]} if name in heads else {},
        )  # fmt: skip
        out.append(Chunk(k, tok, tuple(sts), layout))
    return tuple(out)
