"""The naive oracle of every kernel move: plain torch indexing, one position at a time.

Independent of the kernels' checks, descriptors and backends: block spans are read position
by position (:meth:`BlockSpan.block_id`), global layer ids and heads are mapped through the
spec here, and values move as same-width integers (bit-exact for every dtype, NaN payloads
and fp8 included). Slow by design: the tests and the benchmark's correctness pass compare
both backends with it.

Conventions as in :mod:`kvtriton.kernels`: pools are ``[layers, blocks, kv, tokens_per_block,
heads, head_dim]`` views, state pools ``[layers, slots, heads, *rest]``; ``layers`` are local
dim-0 indices, ``heads`` a local half-open range; positions are half-open
:class:`~kvtriton.ranges.TokenRange` objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvtriton.layout import PackedLayout, Segment
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.spec import KVCacheSpec

__all__ = [
    "bits",
    "copy",
    "copy_request",
    "gather",
    "gather_state",
    "pack",
    "scatter",
    "scatter_state",
    "unpack",
]

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the integer dtype of its width (a view; writes go through)."""
    return t.view(_INT[t.element_size()])


def _sel(pool: torch.Tensor, layers: Sequence[int] | None, heads: tuple[int, int] | None, dim: int):
    lay = list(range(pool.shape[0])) if layers is None else list(layers)
    hd = (0, pool.shape[dim]) if heads is None else tuple(heads)
    return torch.tensor(lay, dtype=torch.int64, device=pool.device), hd


def gather(
    pool: torch.Tensor,
    span: BlockSpan,
    tokens: TokenRange,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``[layers, kv, len(tokens), heads, head_dim]`` values of positions ``tokens``."""
    lay, (h0, h1) = _sel(pool, layers, heads, 4)
    block = pool.shape[3]
    shape = (len(lay), pool.shape[2], len(tokens), h1 - h0, pool.shape[5])
    out = torch.empty(shape, dtype=pool.dtype, device=pool.device)
    src, dst = bits(pool), bits(out)
    for j, p in enumerate(tokens):
        dst[:, :, j] = src[lay, span.block_id(p // block), :, p % block, h0:h1]
    return out


def scatter(
    values: torch.Tensor,
    pool: torch.Tensor,
    span: BlockSpan,
    tokens: TokenRange,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
) -> None:
    """Write ``[layers, kv, len(tokens), heads, head_dim]`` ``values`` to positions ``tokens``."""
    lay, (h0, h1) = _sel(pool, layers, heads, 4)
    block = pool.shape[3]
    src, dst = bits(values), bits(pool)
    for j, p in enumerate(tokens):
        dst[lay, span.block_id(p // block), :, p % block, h0:h1] = src[:, :, j]


def copy(
    src_pool: torch.Tensor,
    src_span: BlockSpan,
    dst_pool: torch.Tensor,
    dst_span: BlockSpan,
    tokens: TokenRange,
    src_layers: Sequence[int] | None = None,
    dst_layers: Sequence[int] | None = None,
    src_heads: tuple[int, int] | None = None,
    dst_heads: tuple[int, int] | None = None,
) -> None:
    """Pool -> pool copy of positions ``tokens`` (each side its own span, block size, layers,
    heads)."""
    values = gather(src_pool, src_span, tokens, src_layers, src_heads)
    scatter(values, dst_pool, dst_span, tokens, dst_layers, dst_heads)


def gather_state(
    pool: torch.Tensor,
    slot: int,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``[layers, heads, *rest]`` of state slot ``slot``."""
    lay, (h0, h1) = _sel(pool, layers, heads, 2)
    out = torch.empty((len(lay), h1 - h0, *pool.shape[3:]), dtype=pool.dtype, device=pool.device)
    for i, layer in enumerate(lay.tolist()):
        bits(out)[i] = bits(pool)[layer, slot, h0:h1]
    return out


def scatter_state(
    values: torch.Tensor,
    pool: torch.Tensor,
    slot: int,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
) -> None:
    """Write ``[layers, heads, *rest]`` ``values`` into state slot ``slot``."""
    lay, (h0, h1) = _sel(pool, layers, heads, 2)
    for i, layer in enumerate(lay.tolist()):
        bits(pool)[layer, slot, h0:h1] = bits(values)[i]


def _local(spec: KVCacheSpec, seg: Segment) -> tuple[list[int], tuple[int, int]]:
    """Local layer indices and head range of a segment's global ids on ``spec``'s shard."""
    group = spec.group(seg.group)
    layers = [group.layer_ids.index(layer) for layer in seg.layer_ids]
    first = group.state_head_start if seg.kind == "state" else group.head_start
    return layers, (seg.heads[0] - first, seg.heads[1] - first)


def _view(buffer: torch.Tensor, seg: Segment) -> torch.Tensor:
    return buffer[seg.offset : seg.end].view(getattr(torch, seg.dtype)).view(seg.shape)


def pack(
    spec: KVCacheSpec,
    layout: PackedLayout,
    pools: Mapping[str, torch.Tensor],
    spans: Mapping[str, BlockSpan],
    state_slots: Mapping[str, int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The packed bytes of ``layout`` (padding between segments zero), ``spec`` the shard
    spec holding the pools."""
    if device is None:
        device = next(iter(pools.values())).device
    out = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
    for seg in layout.segments:
        layers, heads = _local(spec, seg)
        pool = pools[seg.group]
        if seg.kind == "state":
            values = gather_state(pool, state_slots[seg.group], layers, heads)
        else:
            values = gather(pool, spans[seg.group], seg.tokens, layers, heads)
        bits(_view(out, seg)).copy_(bits(values))
    return out


def unpack(
    spec: KVCacheSpec,
    layout: PackedLayout,
    buffer: torch.Tensor,
    pools: Mapping[str, torch.Tensor],
    spans: Mapping[str, BlockSpan],
    state_slots: Mapping[str, int],
) -> None:
    """Write every segment of ``layout`` from ``buffer`` into ``pools``."""
    for seg in layout.segments:
        layers, heads = _local(spec, seg)
        pool = pools[seg.group]
        values = _view(buffer, seg)
        if seg.kind == "state":
            scatter_state(values, pool, state_slots[seg.group], layers, heads)
        else:
            scatter(values, pool, spans[seg.group], seg.tokens, layers, heads)


def copy_request(
    layout: PackedLayout,
    src_spec: KVCacheSpec,
    src_pools: Mapping[str, torch.Tensor],
    src_spans: Mapping[str, BlockSpan],
    src_slots: Mapping[str, int],
    dst_spec: KVCacheSpec,
    dst_pools: Mapping[str, torch.Tensor],
    dst_spans: Mapping[str, BlockSpan],
    dst_slots: Mapping[str, int],
) -> None:
    """Pool -> pool copy of every segment of ``layout`` (the same global positions, layers
    and heads), each side through its own spec, spans and slots."""
    for seg in layout.segments:
        s_layers, s_heads = _local(src_spec, seg)
        d_layers, d_heads = _local(dst_spec, seg)
        if seg.kind == "state":
            values = gather_state(src_pools[seg.group], src_slots[seg.group], s_layers, s_heads)
            scatter_state(values, dst_pools[seg.group], dst_slots[seg.group], d_layers, d_heads)
        else:
            copy(
                src_pools[seg.group],
                src_spans[seg.group],
                dst_pools[seg.group],
                dst_spans[seg.group],
                seg.tokens,
                s_layers,
                d_layers,
                s_heads,
                d_heads,
            )
