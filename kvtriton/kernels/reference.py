"""Pure-torch reference implementation of the kernels API (the test oracle and the benchmark
baseline).

Same signatures and the same validation as :mod:`kvtriton.kernels` (minus ``backend``).
Each attention-group move is one advanced-indexing call over all selected layers, moving
the values as same-width integers (bit-exact for every dtype, fp8 and NaN payloads included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kvtriton.kernels import _common as C
from kvtriton.layout import PackedLayout
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.spec import KVCacheSpec

__all__ = [
    "copy",
    "gather",
    "gather_state",
    "pack_request",
    "pack_requests",
    "scatter",
    "scatter_state",
    "unpack_request",
    "unpack_requests",
]


# ---------------------------------------------------------------------------------------
# plan executors (used by kvtriton.kernels dispatch too)
# ---------------------------------------------------------------------------------------
def _token_index(side: C.PagedSide, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = side.pool.device
    tpb = side.tokens_per_block
    pos = torch.arange(side.offset, side.offset + n, device=dev)
    ids = torch.from_numpy(side.ids).to(dev)
    layers = torch.tensor(side.layers, dtype=torch.int64, device=dev)
    return layers[:, None], ids[pos // tpb][None, :], (pos % tpb)[None, :]


def _paged_view(side: C.PagedSide) -> torch.Tensor:
    h0, h1 = side.heads
    return C.bits(side.pool)[:, :, :, :, h0:h1, :]


def _read(side: C.PagedSide, n: int) -> torch.Tensor:
    """``[L, kv, T, H, D]`` values (as bits) of the paged side."""
    layer, block, offset = _token_index(side, n)
    # advanced indices on dims 0, 1, 3 (split by the kv slice) -> [L, T, kv, H, D]
    return _paged_view(side)[layer, block, :, offset].transpose(1, 2)


def _write(side: C.PagedSide, n: int, values: torch.Tensor) -> None:
    layer, block, offset = _token_index(side, n)
    _paged_view(side)[layer, block, :, offset] = values.transpose(1, 2)


def run_kv(move: C.KVMove) -> None:
    if move.n_tokens == 0:
        return
    if isinstance(move.src, C.PagedSide):
        values = _read(move.src, move.n_tokens)
    else:
        values = C.bits(move.src)
    if isinstance(move.dst, C.PagedSide):
        _write(move.dst, move.n_tokens, values)
    else:
        C.bits(move.dst).copy_(values)


def run_state(move: C.StateMove) -> None:
    h0, h1 = move.heads
    pool = C.bits(move.pool)
    layers = torch.tensor(move.layers, dtype=torch.int64, device=pool.device)
    if move.to_dense:
        C.bits(move.dense).copy_(pool[layers, move.slot, h0:h1])
    else:
        pool[layers, move.slot, h0:h1] = C.bits(move.dense)


def run_batch(batch: C.KVBatch | C.StateBatch) -> None:
    if isinstance(batch, C.StateBatch):
        shape = (len(batch.layers), batch.heads[1] - batch.heads[0], *batch.pool.shape[3:])
        numel = _prod(shape)
        for slot, elem0 in batch.items:
            dense = batch.flat[elem0 : elem0 + numel].view(shape)
            run_state(
                C.StateMove(batch.pool, slot, batch.layers, batch.heads, dense, batch.to_dense)
            )
        return
    pool = batch.pool
    for item in batch.items:
        shape = (
            len(batch.layers),
            pool.shape[2],
            item.n_tokens,
            batch.heads[1] - batch.heads[0],
            pool.shape[5],
        )
        dense = batch.flat[item.dense_offset : item.dense_offset + _prod(shape)].view(shape)
        side = C.PagedSide(pool, item.ids, item.offset, batch.layers, batch.heads)
        if batch.to_dense:
            run_kv(C.KVMove(item.n_tokens, side, dense))
        else:
            run_kv(C.KVMove(item.n_tokens, dense, side))


def run_batches(batches: Sequence[C.KVBatch | C.StateBatch]) -> None:
    for batch in batches:
        run_batch(batch)


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


# ---------------------------------------------------------------------------------------
# public API (same signatures as kvtriton.kernels, without ``backend``)
# ---------------------------------------------------------------------------------------
def gather(
    pool: torch.Tensor,
    span: BlockSpan,
    tokens: TokenRange,
    *,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool positions ``tokens`` -> packed ``[layers_sel, kv, T, heads_sel, head_dim]``."""
    move = C.plan_gather(pool, span, tokens, layers, heads, out)
    run_kv(move)
    assert isinstance(move.dst, torch.Tensor)
    return move.dst


def scatter(
    packed: torch.Tensor,
    pool: torch.Tensor,
    span: BlockSpan,
    tokens: TokenRange,
    *,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
) -> None:
    """Packed ``[layers_sel, kv, len(tokens), heads_sel, head_dim]`` -> pool positions."""
    run_kv(C.plan_scatter(packed, pool, span, tokens, layers, heads))


def copy(
    src_pool: torch.Tensor,
    src_span: BlockSpan,
    dst_pool: torch.Tensor,
    dst_span: BlockSpan,
    tokens: TokenRange,
    *,
    src_layers: Sequence[int] | None = None,
    dst_layers: Sequence[int] | None = None,
    src_heads: tuple[int, int] | None = None,
    dst_heads: tuple[int, int] | None = None,
) -> None:
    """Pool -> pool copy of positions ``tokens`` (same positions on both sides)."""
    run_kv(
        C.plan_copy(
            src_pool,
            src_span,
            dst_pool,
            dst_span,
            tokens,
            src_layers,
            dst_layers,
            src_heads,
            dst_heads,
        )
    )


def gather_state(
    state_pool: torch.Tensor,
    slot: int,
    *,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """State slot ``slot`` -> packed ``[layers_sel, heads_sel, *state_shape[1:]]``."""
    move = C.plan_state(state_pool, slot, layers, heads, out, True)
    run_state(move)
    return move.dense


def scatter_state(
    packed: torch.Tensor,
    state_pool: torch.Tensor,
    slot: int,
    *,
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
) -> None:
    """Packed ``[layers_sel, heads_sel, *state_shape[1:]]`` -> state slot ``slot``."""
    run_state(C.plan_state(state_pool, slot, layers, heads, packed, False))


def pack_request(
    spec: KVCacheSpec,
    layout: PackedLayout,
    pools: Mapping[str, torch.Tensor],
    spans: Mapping[str, BlockSpan],
    state_slots: Mapping[str, int],
    buffer: torch.Tensor,
) -> None:
    """Gather every segment of ``layout`` from ``pools`` into ``buffer`` (uint8, layout.nbytes)."""
    req = C.PackedRequest(layout, spans, state_slots, 0)
    for batch in C.plan_requests(spec, [req], pools, buffer, to_dense=True, exact_size=True):
        run_batch(batch)


def unpack_request(
    spec: KVCacheSpec,
    layout: PackedLayout,
    buffer: torch.Tensor,
    pools: Mapping[str, torch.Tensor],
    spans: Mapping[str, BlockSpan],
    state_slots: Mapping[str, int],
) -> None:
    """Scatter every segment of ``layout`` from ``buffer`` into ``pools``."""
    req = C.PackedRequest(layout, spans, state_slots, 0)
    for batch in C.plan_requests(spec, [req], pools, buffer, to_dense=False, exact_size=True):
        run_batch(batch)


def pack_requests(
    spec: KVCacheSpec,
    requests: Sequence[C.PackedRequest],
    pools: Mapping[str, torch.Tensor],
    buffer: torch.Tensor,
) -> None:
    """Batched :func:`pack_request`: request ``r`` fills ``buffer[r.offset:][:r.layout.nbytes]``."""
    for batch in C.plan_requests(spec, requests, pools, buffer, to_dense=True, exact_size=False):
        run_batch(batch)


def unpack_requests(
    spec: KVCacheSpec,
    requests: Sequence[C.PackedRequest],
    buffer: torch.Tensor,
    pools: Mapping[str, torch.Tensor],
) -> None:
    """Batched :func:`unpack_request`."""
    for batch in C.plan_requests(spec, requests, pools, buffer, to_dense=False, exact_size=False):
        run_batch(batch)
