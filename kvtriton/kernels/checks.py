"""Argument checks of the convenience API, and the moves they turn into.

Every public entry of :mod:`kvtriton.kernels` validates all of its arguments here (and in
:mod:`kvtriton.kernels.requests` for ``pack_request(s)`` / ``unpack_request(s)``) *before*
any write and turns them into :class:`~kvtriton.kernels.descriptors.Move` objects; both
backends then execute the same descriptors. A bad argument raises ``ValueError`` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvtriton.kernels.descriptors import Dense, Move, pool_side, state_side
from kvtriton.ranges import BlockSpan, TokenRange

__all__ = [
    "BACKENDS",
    "BITS_DTYPE",
    "bits",
    "plan_copy",
    "plan_gather",
    "plan_scatter",
    "plan_state",
]

BACKENDS = ("auto", "triton", "reference")

#: Pool dtypes and the same-width integer type their bytes move as (bit-exact, NaN payloads
#: and fp8 included: no backend ever does floating-point arithmetic on KV values).
BITS_DTYPE: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
    torch.float8_e5m2: torch.uint8,
    torch.uint8: torch.uint8,
    torch.int8: torch.uint8,
    torch.int16: torch.int16,
    torch.int32: torch.int32,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as the same-width integer dtype (a view: writes go through)."""
    target = BITS_DTYPE[t.dtype]
    return t if t.dtype == target else t.view(target)


# ---------------------------------------------------------------------------------------
# argument checks (each raises ValueError naming the argument)
# ---------------------------------------------------------------------------------------
def is_int(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return hasattr(v, "__index__") and not isinstance(v, float)


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return str(backend)


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in BITS_DTYPE:
        raise ValueError(
            f"{name}: dtype {t.dtype} is not supported; expected one of "
            f"{[str(d).removeprefix('torch.') for d in BITS_DTYPE]}"
        )


def check_pool(name: str, pool: object, *, writable: bool = False) -> torch.Tensor:
    """A 6-D ``[layers, blocks, kv, tokens_per_block, heads, head_dim]`` pool view."""
    if not isinstance(pool, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dim() != 6:
        raise ValueError(
            f"{name} must be the 6-D view [layers, blocks, kv, tokens_per_block, heads, "
            f"head_dim], got shape {tuple(pool.shape)}"
        )
    _check_dtype(name, pool)
    layers, blocks, kv, tpb, heads, head_dim = pool.shape
    if kv not in (1, 2):
        raise ValueError(f"{name}: kv dimension (dim 2) must be 1 or 2, got {kv}")
    if min(layers, blocks, tpb, heads, head_dim) < 1:
        raise ValueError(f"{name}: every dimension must be >= 1, got shape {tuple(pool.shape)}")
    if head_dim > 1 and pool.stride(5) != 1:
        raise ValueError(
            f"{name}: head_dim (dim 5) must have stride 1, got strides {tuple(pool.stride())}"
        )
    if writable:
        check_no_self_overlap(name, pool)
    return pool


def check_no_self_overlap(name: str, t: torch.Tensor) -> None:
    """A destination's elements must be distinct memory. Sufficient test: with the dims of
    size > 1 sorted by stride, each stride exceeds the span of the smaller ones (true for any
    slice or permutation of a contiguous tensor; an ``expand()`` fails it)."""
    span = 0  # elements spanned by the dims checked so far, minus one
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz > 1
    ):
        if stride <= span:
            raise ValueError(
                f"{name}: the destination has overlapping elements (strides "
                f"{tuple(t.stride())} for shape {tuple(t.shape)}); writes would collide"
            )
        span += stride * (size - 1)


def check_range(name: str, tokens: object) -> TokenRange:
    if not isinstance(tokens, TokenRange):
        raise ValueError(f"{name} must be a TokenRange, got {type(tokens).__name__}")
    return tokens


def check_span(
    name: str, span: object, tokens: TokenRange, pool: torch.Tensor, *, unique: bool = False
) -> tuple[np.ndarray, int]:
    """Physical ids (int64 array) of the blocks ``tokens`` touches, in logical order, and
    the in-block offset of ``tokens.start`` in the first of them.

    ``unique``: the ids must be distinct (a destination: two logical blocks in one physical
    block would make writes collide).
    """
    if not isinstance(span, BlockSpan):
        raise ValueError(f"{name} must be a BlockSpan, got {type(span).__name__}")
    tpb = int(pool.shape[3])
    num_blocks = int(pool.shape[1])
    if tokens.is_empty:
        return np.empty(0, dtype=np.int64), 0
    held = span.covered(tpb)
    if not (held.start <= tokens.start and tokens.end <= held.end):
        raise ValueError(
            f"{name}: the span holds positions [{held.start}, {held.end}) (logical blocks "
            f"[{span.first_block}, {span.end_block}) of {tpb} tokens) but the copy needs "
            f"{tokens}"
        )
    first = tokens.start // tpb
    last = -(-tokens.end // tpb)
    ids = span.block_ids[first - span.first_block : last - span.first_block]
    arr = np.fromiter(ids, dtype=np.int64, count=len(ids))
    if arr.min() < 0 or arr.max() >= num_blocks:
        for i, block_id in enumerate(ids):
            if not 0 <= block_id < num_blocks:
                raise ValueError(
                    f"{name}: block id {block_id} (logical block {first + i}) is outside the "
                    f"pool's blocks [0, {num_blocks})"
                )
    if unique and len(set(ids)) != len(ids):
        dup = sorted({b for b in ids if ids.count(b) > 1})
        raise ValueError(
            f"{name}: destination block ids {dup} appear more than once among the blocks "
            f"written for {tokens}; writes would collide"
        )
    return arr, tokens.start - first * tpb


def check_layers(name: str, layers: object, num_layers: int) -> tuple[int, ...]:
    """Local layer indices into dim 0 (``None``: all), distinct, in the given order."""
    if layers is None:
        return tuple(range(num_layers))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        try:
            layers = list(layers)  # type: ignore[call-overload]
        except TypeError:
            raise ValueError(
                f"{name} must be a sequence of layer indices, got {type(layers).__name__}"
            ) from None
    out: list[int] = []
    for v in layers:
        if not is_int(v):
            raise ValueError(f"{name}: layer indices must be ints, got {v!r}")
        i = int(v)  # type: ignore[call-overload]
        if not 0 <= i < num_layers:
            raise ValueError(f"{name}: layer index {i} is outside [0, {num_layers})")
        out.append(i)
    if not out:
        raise ValueError(f"{name}: the layer selection is empty")
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: duplicate layer indices in {out}")
    return tuple(out)


def check_heads(name: str, heads: object, num_heads: int) -> tuple[int, int]:
    """Local head range ``[start, end)`` into the pool's head dim (``None``: all)."""
    if heads is None:
        return 0, num_heads
    try:
        start, end = heads  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (start, end) pair, got {heads!r}") from None
    if not (is_int(start) and is_int(end)):
        raise ValueError(f"{name} must hold ints, got {heads!r}")
    start, end = int(start), int(end)
    if not 0 <= start < end <= num_heads:
        raise ValueError(f"{name}: head range [{start}, {end}) is not inside [0, {num_heads})")
    return start, end


def check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the pool is on {device}")


def check_dense(
    name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A contiguous packed tensor of exactly ``shape`` / ``dtype`` on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} (the pool's)")
    check_device(name, t, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {tuple(t.stride())})")
    return t


# ---------------------------------------------------------------------------------------
# single moves
# ---------------------------------------------------------------------------------------
def kv_move(n: int, src: Any, dst: Any, pool: torch.Tensor, heads: tuple[int, int], nl: int):
    return Move(
        src,
        dst,
        nl,
        int(pool.shape[2]),
        n,
        heads[1] - heads[0],
        pool.shape[5] * pool.element_size(),
    )


def plan_gather(
    pool: object, span: object, tokens: object, layers: object, heads: object, out: object
) -> tuple[Move, torch.Tensor]:
    """The move of :func:`kvtriton.kernels.gather` and its (allocated or checked) ``out``."""
    pool = check_pool("pool", pool)
    tokens = check_range("tokens", tokens)
    ids, offset = check_span("span", span, tokens, pool)
    lay = check_layers("layers", layers, pool.shape[0])
    hd = check_heads("heads", heads, pool.shape[4])
    shape = (len(lay), pool.shape[2], len(tokens), hd[1] - hd[0], pool.shape[5])
    if out is None:
        out = torch.empty(shape, dtype=pool.dtype, device=pool.device)
    else:
        out = check_dense("out", out, shape, pool.dtype, pool.device)
        check_no_self_overlap("out", out)
        check_disjoint("out", out, "pool", pool)
    src = pool_side(pool, ids, offset, lay, hd)
    return kv_move(len(tokens), src, Dense(0), pool, hd, len(lay)), out


def plan_scatter(
    packed: object, pool: object, span: object, tokens: object, layers: object, heads: object
) -> tuple[Move, torch.Tensor]:
    """The move of :func:`kvtriton.kernels.scatter` and the checked ``packed``."""
    pool = check_pool("pool", pool, writable=True)
    tokens = check_range("tokens", tokens)
    ids, offset = check_span("span", span, tokens, pool, unique=True)
    lay = check_layers("layers", layers, pool.shape[0])
    hd = check_heads("heads", heads, pool.shape[4])
    shape = (len(lay), pool.shape[2], len(tokens), hd[1] - hd[0], pool.shape[5])
    packed = check_dense("packed", packed, shape, pool.dtype, pool.device)
    check_disjoint("packed", packed, "pool", pool)
    dst = pool_side(pool, ids, offset, lay, hd)
    return kv_move(len(tokens), Dense(0), dst, pool, hd, len(lay)), packed


def plan_copy(
    src_pool: object,
    src_span: object,
    dst_pool: object,
    dst_span: object,
    tokens: object,
    src_layers: object,
    dst_layers: object,
    src_heads: object,
    dst_heads: object,
) -> Move:
    """The move of :func:`kvtriton.kernels.copy`."""
    src_pool = check_pool("src_pool", src_pool)
    dst_pool = check_pool("dst_pool", dst_pool, writable=True)
    check_device("dst_pool", dst_pool, src_pool.device)
    if dst_pool.dtype != src_pool.dtype:
        raise ValueError(f"dst_pool has dtype {dst_pool.dtype}, src_pool has {src_pool.dtype}")
    for dim, what in ((2, "kv"), (5, "head_dim")):
        if dst_pool.shape[dim] != src_pool.shape[dim]:
            raise ValueError(
                f"dst_pool has {what} {dst_pool.shape[dim]} (dim {dim}), src_pool has "
                f"{src_pool.shape[dim]}"
            )
    tokens = check_range("tokens", tokens)
    sids, soff = check_span("src_span", src_span, tokens, src_pool)
    dids, doff = check_span("dst_span", dst_span, tokens, dst_pool, unique=True)
    slay = check_layers("src_layers", src_layers, src_pool.shape[0])
    dlay = check_layers("dst_layers", dst_layers, dst_pool.shape[0])
    if len(slay) != len(dlay):
        raise ValueError(
            f"dst_layers selects {len(dlay)} layers but src_layers selects {len(slay)}"
        )
    shd = check_heads("src_heads", src_heads, src_pool.shape[4])
    dhd = check_heads("dst_heads", dst_heads, dst_pool.shape[4])
    if shd[1] - shd[0] != dhd[1] - dhd[0]:
        raise ValueError(
            f"dst_heads {dhd} selects {dhd[1] - dhd[0]} heads but src_heads {shd} selects "
            f"{shd[1] - shd[0]}"
        )
    if same_storage(src_pool, dst_pool) and len(tokens):
        check_copy_overlap(src_pool, dst_pool, (slay, sids, shd), (dlay, dids, dhd))
    src = pool_side(src_pool, sids, soff, slay, shd)
    dst = pool_side(dst_pool, dids, doff, dlay, dhd)
    return kv_move(len(tokens), src, dst, src_pool, shd, len(slay))


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1
    return lo, lo + span * t.element_size()


def check_disjoint(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.numel() == 0 or not same_storage(t, other):
        return
    a0, a1 = _byte_extent(t)
    b0, b1 = _byte_extent(other)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{name} overlaps the memory of {other_name}")


def check_copy_overlap(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    src: tuple[tuple[int, ...], np.ndarray, tuple[int, int]],
    dst: tuple[tuple[int, ...], np.ndarray, tuple[int, int]],
    names: tuple[str, str] = ("src_span", "dst_span"),
) -> None:
    """Source and destination (layers, block ids, heads) in one pool must not overlap."""
    same_view = (
        src_pool.data_ptr() == dst_pool.data_ptr()
        and src_pool.shape == dst_pool.shape
        and src_pool.stride() == dst_pool.stride()
    )
    if not same_view:
        raise ValueError(
            "dst_pool shares memory with src_pool through a different view; a copy between "
            "overlapping views is not supported"
        )
    (slay, sids, shd), (dlay, dids, dhd) = src, dst
    shared_layers = set(slay) & set(dlay)
    shared_blocks = set(np.asarray(sids).tolist()) & set(np.asarray(dids).tolist())
    heads_overlap = shd[0] < dhd[1] and dhd[0] < shd[1]
    if shared_layers and shared_blocks and heads_overlap:
        raise ValueError(
            f"{names[1]} and {names[0]} both touch physical blocks {sorted(shared_blocks)} of "
            f"layers {sorted(shared_layers)} in the same pool; source and destination overlap"
        )


def check_state_pool(name: str, pool: object, *, writable: bool = False) -> torch.Tensor:
    """A ``[layers, slots, heads, *rest]`` state pool; the ``rest`` dims row-major contiguous."""
    if not isinstance(pool, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(pool).__name__}")
    if pool.dim() < 3:
        raise ValueError(
            f"{name} must be [layers, slots, *state_shape] with a non-empty state_shape, got "
            f"shape {tuple(pool.shape)}"
        )
    _check_dtype(name, pool)
    if min(pool.shape) < 1:
        raise ValueError(f"{name}: every dimension must be >= 1, got shape {tuple(pool.shape)}")
    expected = 1
    for dim in range(pool.dim() - 1, 2, -1):
        if pool.shape[dim] > 1 and pool.stride(dim) != expected:
            raise ValueError(
                f"{name}: the state dims after the head dim must be row-major contiguous, got "
                f"strides {tuple(pool.stride())} for shape {tuple(pool.shape)}"
            )
        expected *= pool.shape[dim]
    if pool.dim() == 3 and pool.shape[2] > 1 and pool.stride(2) < 1:
        raise ValueError(f"{name}: bad strides {tuple(pool.stride())}")
    if writable:
        check_no_self_overlap(name, pool)
    return pool


def check_slot(name: str, slot: object, num_slots: int) -> int:
    if not is_int(slot):
        raise ValueError(f"{name} must be an int, got {slot!r}")
    s = int(slot)  # type: ignore[call-overload]
    if not 0 <= s < num_slots:
        raise ValueError(f"{name} {s} is outside the pool's slots [0, {num_slots})")
    return s


def plan_state(
    pool: object, slot: object, layers: object, heads: object, dense: object, to_dense: bool
) -> tuple[Move, torch.Tensor]:
    """The move of :func:`~kvtriton.kernels.gather_state` (``to_dense``) or
    :func:`~kvtriton.kernels.scatter_state`, and the dense tensor."""
    pool_name = "state_pool"
    pool = check_state_pool(pool_name, pool, writable=not to_dense)
    s = check_slot("slot", slot, pool.shape[1])
    lay = check_layers("layers", layers, pool.shape[0])
    hd = check_heads("heads", heads, pool.shape[2])
    shape = (len(lay), hd[1] - hd[0], *pool.shape[3:])
    if to_dense and dense is None:
        dense = torch.empty(shape, dtype=pool.dtype, device=pool.device)
    else:
        name = "out" if to_dense else "packed"
        dense = check_dense(name, dense, shape, pool.dtype, pool.device)
        check_disjoint(name, dense, pool_name, pool)
    return state_move(pool, s, lay, hd, Dense(0), to_dense), dense


def state_move(
    pool: torch.Tensor,
    slot: int,
    layers: tuple[int, ...],
    heads: tuple[int, int],
    dense: Dense,
    to_dense: bool,
) -> Move:
    paged = state_side(pool, slot, layers, heads)
    row = pool[0, 0, 0].numel() * pool.element_size()
    src, dst = (paged, dense) if to_dense else (dense, paged)
    return Move(src, dst, len(layers), 1, 1, heads[1] - heads[0], row, state=True)
