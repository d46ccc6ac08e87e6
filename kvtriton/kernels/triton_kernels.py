"""Triton kernels for paged KV moves by token position, and their typed host wrappers.

Two kernels, each with one host wrapper that picks the tile and the grid:

* :func:`_move_tokens_kernel` -- one program moves ``TOK`` consecutive token positions of one
  (layer, kv) pair and one head chunk: whole rows of ``heads x head_dim`` elements. Each
  paged side looks up its block per token (an int64 load from a small block table), so any
  start offset, block size and stride layout on either side is the same code path.
* :func:`_move_state_kernel` -- one program moves a chunk of one (layer, head) row of a
  request's state slot.

Values move as same-width integers (fp8 as bytes), so every move is bit-exact. All address
math that can exceed 2**31 elements is done in int64 (indices are cast before they are
multiplied by a stride).

``INTERPRET`` records whether ``TRITON_INTERPRET=1`` was set when this module was imported:
then the same kernels run on CPU tensors under the Triton interpreter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kvtriton.kernels import _common as C

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Tuning constants (the benchmark may override them to compare variants).
TUNE = {
    # Bytes one program moves per tile. Measured on H100 (BENCHMARKS.md, sweep 8/16/32 KiB):
    # 8 KiB was best for small moves and block-size-mismatched copies (short per-program
    # critical path: table lookup -> load -> store), and equal at >= 256 MiB.
    "tile_bytes": 8192,
    # 8 warps x 32 threads x 2 16-byte vectors = 8 KiB: many independent 16-byte accesses
    # per program; beat 4 warps in the same sweep.
    "num_warps": 8,
    # Shrink the token tile until the grid has this many programs per SM (small moves need
    # parallelism more than large tiles); 4 keeps every SM busy through the launch tail.
    "programs_per_sm": 4,
    # Widest row chunk (elements) one program holds per token: bounds registers per thread
    # (4096 x 2 B = 8 KiB per token row) for models with many heads per rank.
    "max_row": 4096,
    # Largest state chunk per program (elements): 4096 x 4 B = 16 KiB, the same register
    # budget as a token tile; longer state rows are split over the grid.
    "state_block": 4096,
}
# Under the interpreter every program is a Python-level loop iteration: use few, large ones.
_INTERPRET_MAX_TOK = 128


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------
# Per-call scalars that never help vectorization (token counts, table offsets, block sizes):
# not specialized, so a new value never triggers a recompile. Strides and head offsets stay
# specialized: their divisibility by 16 is what proves 16-byte accesses.
@triton.jit(
    do_not_specialize=[
        "n_tokens",
        "src_rel",
        "src_tbl",
        "src_lay",
        "dst_rel",
        "dst_tbl",
        "dst_lay",
        "src_bs",
        "dst_bs",
        "batch_tbl",
    ]
)
def _move_tokens_kernel(
    src_ptr,
    dst_ptr,
    meta_ptr,
    n_tokens,
    src_rel,
    src_tbl,
    src_lay,
    src_head_off,
    dst_rel,
    dst_tbl,
    dst_lay,
    dst_head_off,
    s_l,
    s_b,
    s_kv,
    s_t,
    s_h,
    src_bs,
    d_l,
    d_b,
    d_kv,
    d_t,
    d_h,
    dst_bs,
    batch_tbl,
    KV: tl.constexpr,
    HS: tl.constexpr,
    D: tl.constexpr,
    HB: tl.constexpr,
    DP: tl.constexpr,
    TOK: tl.constexpr,
    SRC_PAGED: tl.constexpr,
    DST_PAGED: tl.constexpr,
    BATCHED: tl.constexpr,
    COL64: tl.constexpr,
):
    """Move ``TOK`` positions x ``HB`` heads of one (layer, kv) pair.

    A paged side addresses ``ptr + layer*l + block*b + kv*kv_stride + slot*t + head*h + d``,
    with ``layer`` from the side's layer list and ``block`` from its block table (both in
    ``meta``), position ``p = rel + token`` mapping to table entry ``p // bs`` and in-block
    slot ``p % bs``. A dense side is a contiguous ``[L, KV, n, HS, D]`` tensor at element
    offset ``base``. Batched launches read ``(n, rel, tbl, base, chunk)`` per program from
    ``meta[batch_tbl:]`` (one paged and one dense side).
    """
    pid_t = tl.program_id(0)
    pid_lk = tl.program_id(1)
    pid_h = tl.program_id(2)
    li = pid_lk // KV
    kv = pid_lk % KV
    if BATCHED:
        entry = meta_ptr + batch_tbl + pid_t * 5
        n = tl.load(entry)
        rel = tl.load(entry + 1)
        tbl = tl.load(entry + 2)
        # dense segments start at multiples of 128 bytes (layout.SEGMENT_ALIGN)
        base = tl.multiple_of(tl.load(entry + 3), 16)
        chunk = tl.load(entry + 4)
        if SRC_PAGED:
            s_rel = rel
            s_tbl = tbl
            d_rel = 0
            d_tbl = 0
            s_base = 0
            d_base = base
        else:
            s_rel = 0
            s_tbl = 0
            d_rel = rel
            d_tbl = tbl
            s_base = base
            d_base = 0
    else:
        n = n_tokens
        chunk = pid_t
        s_rel = src_rel
        s_tbl = src_tbl
        d_rel = dst_rel
        d_tbl = dst_tbl
        s_base = 0
        d_base = 0

    t = chunk * TOK + tl.arange(0, TOK)
    tmask = t < n
    col = tl.arange(0, HB * DP)
    h = pid_h * HB + col // DP
    dd = col % DP
    if (DP != D) or (HS % HB != 0):
        mask = tmask[:, None] & ((dd < D) & (h < HS))[None, :]
    else:
        mask = tmask[:, None]
    # dense row index of (layer li, kv, token t): int64 before multiplying by the row size
    dense_row = (li * KV + kv).to(tl.int64) * n + t.to(tl.int64)

    if SRC_PAGED:
        layer = tl.load(meta_ptr + src_lay + li)
        p = (s_rel + t).to(tl.int64)
        lb = p // src_bs
        blk = tl.load(meta_ptr + s_tbl + lb, mask=tmask, other=0)
        src_row = layer * s_l + blk * s_b + kv * s_kv + (p - lb * src_bs) * s_t + src_head_off
        if COL64:
            src_col = h.to(tl.int64) * s_h + dd
        else:
            src_col = h * s_h + dd
    else:
        src_row = s_base + dense_row * (HS * D)
        src_col = h * D + dd
    if DST_PAGED:
        layer_d = tl.load(meta_ptr + dst_lay + li)
        q = (d_rel + t).to(tl.int64)
        qb = q // dst_bs
        blk_d = tl.load(meta_ptr + d_tbl + qb, mask=tmask, other=0)
        dst_row = layer_d * d_l + blk_d * d_b + kv * d_kv + (q - qb * dst_bs) * d_t + dst_head_off
        if COL64:
            dst_col = h.to(tl.int64) * d_h + dd
        else:
            dst_col = h * d_h + dd
    else:
        dst_row = d_base + dense_row * (HS * D)
        dst_col = h * D + dd

    vals = tl.load(src_ptr + src_row[:, None] + src_col[None, :], mask=mask)
    tl.store(dst_ptr + dst_row[:, None] + dst_col[None, :], vals, mask=mask)


@triton.jit(do_not_specialize=["slot_off", "lay_off", "items_off"])
def _move_state_kernel(
    pool_ptr,
    dense_ptr,
    meta_ptr,
    slot_off,
    lay_off,
    items_off,
    head_off,
    row,
    s_l,
    s_s,
    s_h,
    HS: tl.constexpr,
    BLOCK: tl.constexpr,
    EVEN: tl.constexpr,
    TO_DENSE: tl.constexpr,
    BATCHED: tl.constexpr,
):
    """Move ``BLOCK`` elements of the ``(layer, head)`` row of a state slot.

    Pool element: ``layer*s_l + slot*s_s + head*s_h + i`` (``i`` over the contiguous row of
    ``row`` elements); dense element: ``base + (li*HS + head)*row + i``.
    """
    pid_c = tl.program_id(0)
    pid_lh = tl.program_id(1)
    pid_r = tl.program_id(2)
    li = pid_lh // HS
    hh = pid_lh % HS
    if BATCHED:
        slot_base = tl.load(meta_ptr + items_off + pid_r * 2) * s_s
        base = tl.multiple_of(tl.load(meta_ptr + items_off + pid_r * 2 + 1), 16)
    else:
        slot_base = slot_off
        base = 0
    layer = tl.load(meta_ptr + lay_off + li)
    i = pid_c * BLOCK + tl.arange(0, BLOCK)
    pool_off = layer * s_l + slot_base + head_off + hh.to(tl.int64) * s_h + i
    dense_off = base + pid_lh.to(tl.int64) * row + i
    if EVEN:
        if TO_DENSE:
            tl.store(dense_ptr + dense_off, tl.load(pool_ptr + pool_off))
        else:
            tl.store(pool_ptr + pool_off, tl.load(dense_ptr + dense_off))
    else:
        m = i < row
        if TO_DENSE:
            tl.store(dense_ptr + dense_off, tl.load(pool_ptr + pool_off, mask=m), mask=m)
        else:
            tl.store(pool_ptr + pool_off, tl.load(dense_ptr + dense_off, mask=m), mask=m)


# ---------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------
class _Meta:
    """Small int64 tables (layer lists, block tables, batch rows) of one or more launches,
    copied to the device in ONE transfer."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, values: Sequence[int] | np.ndarray) -> int:
        if isinstance(values, np.ndarray):
            arr = values.astype(np.int64, copy=False).ravel()
        else:
            arr = np.fromiter(values, dtype=np.int64, count=len(values))
        offset = self.size
        self.parts.append(arr)
        self.size += arr.size
        return offset

    def tensor(self, device: torch.device) -> torch.Tensor:
        arr = np.concatenate(self.parts) if len(self.parts) != 1 else self.parts[0]
        if arr.size == 0:
            arr = np.zeros(1, dtype=np.int64)
        if device.type == "cpu":
            return torch.from_numpy(arr)
        if STAGING == "pinned":
            # torch's caching host allocator: cached pinned blocks, an event recorded on the
            # copy's stream guards reuse, so the H2D copy is truly asynchronous (a pageable
            # source may make the driver wait for the stream) and safe on any stream.
            return torch.from_numpy(arr).pin_memory().to(device, non_blocking=True)
        return torch.from_numpy(arr).to(device, non_blocking=True)


#: How metadata reaches the device: "pinned" (default) or "pageable" (benchmark variant:
#: ~15 us cheaper on an idle device, but may wait for a busy stream).
STAGING = "pinned"


@dataclass
class _Launch:
    kernel: object
    grid: tuple[int, int, int]
    args: list
    meta_slot: int  # index of the meta argument in ``args``
    constexprs: dict
    num_warps: int


def _row_tiling(heads: int, head_dim: int, itemsize: int) -> tuple[int, int, int]:
    """(HB heads per program, DP padded head_dim, head chunks)."""
    dp = _pow2_ceil(head_dim)
    hb = min(_pow2_ceil(heads), max(1, _pow2_floor(TUNE["max_row"] // dp)))
    return hb, dp, -(-heads // hb)


def _tok_tile(
    hb: int, dp: int, itemsize: int, total_tokens: int, lk: int, hchunks: int, device: torch.device
) -> int:
    if INTERPRET or device.type == "cpu":
        return min(_INTERPRET_MAX_TOK, _pow2_ceil(max(1, total_tokens)))
    tok = max(1, min(64, _pow2_floor(max(1, TUNE["tile_bytes"] // (hb * dp * itemsize)))))
    want = TUNE["programs_per_sm"] * _sm_count(device)
    while tok > 1 and -(-total_tokens // tok) * lk * hchunks < want:
        tok //= 2
    return tok


def _paged_args(side: C.PagedSide, meta: _Meta) -> dict:
    pool = side.pool
    st = pool.stride()
    lay = meta.add(side.layers)
    tbl = meta.add(side.ids)
    return dict(
        rel=side.offset,
        tbl=tbl,
        lay=lay,
        head_off=side.heads[0] * st[4],
        strides=(st[0], st[1], st[2], st[3], st[4]),
        bs=int(pool.shape[3]),
    )


_DENSE = dict(rel=0, tbl=0, lay=0, head_off=0, strides=(0, 0, 0, 0, 0), bs=1)


def _col64(side: C.PagedSide | None, heads: int) -> bool:
    if side is None:
        return False
    h_stride = side.pool.stride(4)
    return (side.heads[0] + heads) * h_stride + side.pool.shape[5] >= 2**31


def _kv_launch(
    src: C.PagedSide | torch.Tensor,
    dst: C.PagedSide | torch.Tensor,
    n_tokens: int,
    meta: _Meta,
    batch: C.KVBatch | None = None,
) -> _Launch | None:
    paged = src if isinstance(src, C.PagedSide) else dst
    assert isinstance(paged, C.PagedSide)
    pool = paged.pool
    kvf, head_dim = int(pool.shape[2]), int(pool.shape[5])
    heads = paged.heads[1] - paged.heads[0]
    nl = len(paged.layers)
    itemsize = pool.element_size()
    hb, dp, hchunks = _row_tiling(heads, head_dim, itemsize)
    total = n_tokens if batch is None else sum(it.n_tokens for it in batch.items)
    if total == 0:
        return None
    tok = _tok_tile(hb, dp, itemsize, total, nl * kvf, hchunks, pool.device)
    sp = _paged_args(src, meta) if isinstance(src, C.PagedSide) else _DENSE
    dp_ = _paged_args(dst, meta) if isinstance(dst, C.PagedSide) else _DENSE
    batch_tbl = 0
    if batch is None:
        n_chunks = -(-n_tokens // tok)
        src_t = C.bits(src.pool if isinstance(src, C.PagedSide) else src)
        dst_t = C.bits(dst.pool if isinstance(dst, C.PagedSide) else dst)
    else:
        # one row per program: (n, rel, tbl, dense base, chunk); tables go in meta first
        tbls = [meta.add(it.ids) for it in batch.items]
        n = np.array([it.n_tokens for it in batch.items], dtype=np.int64)
        chunks = -(-n // tok)
        rows = np.stack(
            [
                n,
                np.array([it.offset for it in batch.items], dtype=np.int64),
                np.array(tbls, dtype=np.int64),
                np.array([it.dense_offset for it in batch.items], dtype=np.int64),
            ],
            1,
        )
        rows = np.repeat(rows, chunks, axis=0)
        starts = np.repeat(np.cumsum(chunks) - chunks, chunks)
        chunk_idx = np.arange(int(chunks.sum()), dtype=np.int64) - starts
        batch_tbl = meta.add(np.concatenate([rows, chunk_idx[:, None]], 1))
        n_chunks = int(chunks.sum())
        src_t = C.bits(pool) if batch.to_dense else C.bits(batch.flat)
        dst_t = C.bits(batch.flat) if batch.to_dense else C.bits(pool)
    args = [
        src_t,
        dst_t,
        None,
        n_tokens,
        sp["rel"],
        sp["tbl"],
        sp["lay"],
        sp["head_off"],
        dp_["rel"],
        dp_["tbl"],
        dp_["lay"],
        dp_["head_off"],
        *sp["strides"],
        sp["bs"],
        *dp_["strides"],
        dp_["bs"],
        batch_tbl,
    ]
    col64 = _col64(src if isinstance(src, C.PagedSide) else None, heads) or _col64(
        dst if isinstance(dst, C.PagedSide) else None, heads
    )
    const = dict(
        KV=kvf,
        HS=heads,
        D=head_dim,
        HB=hb,
        DP=dp,
        TOK=tok,
        SRC_PAGED=isinstance(src, C.PagedSide),
        DST_PAGED=isinstance(dst, C.PagedSide),
        BATCHED=batch is not None,
        COL64=col64,
    )
    return _Launch(
        _move_tokens_kernel, (n_chunks, nl * kvf, hchunks), args, 2, const, TUNE["num_warps"]
    )


def _state_launch(
    pool: torch.Tensor,
    dense: torch.Tensor,
    layers: tuple[int, ...],
    heads: tuple[int, int],
    to_dense: bool,
    meta: _Meta,
    slot: int = 0,
    items: Sequence[tuple[int, int]] | None = None,
) -> _Launch:
    row = 1
    for s in pool.shape[3:]:
        row *= int(s)
    hs = heads[1] - heads[0]
    block = min(_pow2_ceil(row), TUNE["state_block"])
    lay = meta.add(layers)
    items_off = meta.add([v for it in items for v in it]) if items is not None else 0
    s_l, s_s, s_h = pool.stride(0), pool.stride(1), pool.stride(2)
    args = [
        C.bits(pool),
        C.bits(dense),
        None,
        slot * s_s,
        lay,
        items_off,
        heads[0] * s_h,
        row,
        s_l,
        s_s,
        s_h,
    ]
    const = dict(
        HS=hs, BLOCK=block, EVEN=row % block == 0, TO_DENSE=to_dense, BATCHED=items is not None
    )
    grid = (-(-row // block), len(layers) * hs, 1 if items is None else len(items))
    return _Launch(_move_state_kernel, grid, args, 2, const, TUNE["num_warps"])


def _execute(launches: Sequence[_Launch | None], meta: _Meta, device: torch.device) -> None:
    todo = [launch for launch in launches if launch is not None]
    if not todo:
        return
    table = meta.tensor(device)
    for launch in todo:
        launch.args[launch.meta_slot] = table
        launch.kernel[launch.grid](
            *launch.args,
            **launch.constexprs,  # type: ignore[index]
            num_warps=launch.num_warps,
        )


# ---------------------------------------------------------------------------------------
# plan executors (called by kvtriton.kernels after validation)
# ---------------------------------------------------------------------------------------
def run_kv(move: C.KVMove) -> None:
    meta = _Meta()
    launch = _kv_launch(move.src, move.dst, move.n_tokens, meta)
    device = (move.src.pool if isinstance(move.src, C.PagedSide) else move.src).device
    _execute([launch], meta, device)


def run_state(move: C.StateMove) -> None:
    meta = _Meta()
    launch = _state_launch(
        move.pool, move.dense, move.layers, move.heads, move.to_dense, meta, slot=move.slot
    )
    _execute([launch], meta, move.pool.device)


def run_batches(batches: Sequence[C.KVBatch | C.StateBatch]) -> None:
    """One launch per batch (one per group for a single request), one metadata copy in all."""
    meta = _Meta()
    launches: list[_Launch | None] = []
    device = None
    for b in batches:
        device = b.pool.device
        if isinstance(b, C.StateBatch):
            launches.append(
                _state_launch(b.pool, b.flat, b.layers, b.heads, b.to_dense, meta, items=b.items)
            )
        elif len(b.items) == 1:
            # one request: the plain launch (scalar arguments, no per-chunk table)
            item = b.items[0]
            side = C.PagedSide(b.pool, item.ids, item.offset, b.layers, b.heads)
            shape = (
                len(b.layers),
                b.pool.shape[2],
                item.n_tokens,
                b.heads[1] - b.heads[0],
                b.pool.shape[5],
            )
            numel = math.prod(shape)
            dense = b.flat[item.dense_offset : item.dense_offset + numel].view(shape)
            src, dst = (side, dense) if b.to_dense else (dense, side)
            launches.append(_kv_launch(src, dst, item.n_tokens, meta))
        else:
            # per-request block tables go into the batch rows; the side carries no table
            side = C.PagedSide(b.pool, np.empty(0, dtype=np.int64), 0, b.layers, b.heads)
            src, dst = (side, b.flat) if b.to_dense else (b.flat, side)
            launches.append(_kv_launch(src, dst, 0, meta, batch=b))
    if device is not None:
        _execute(launches, meta, device)


def prepare_kv(move: C.KVMove) -> Callable[[], None]:
    """Build the launch of an already-validated move once (metadata on the device) and
    return a function that only launches the kernel: for benchmarks and CUDA-graph capture
    of repeated identical moves."""
    meta = _Meta()
    launch = _kv_launch(move.src, move.dst, move.n_tokens, meta)
    device = (move.src.pool if isinstance(move.src, C.PagedSide) else move.src).device
    if launch is None:
        return lambda: None
    launch.args[launch.meta_slot] = meta.tensor(device)
    kernel = launch.kernel

    def run() -> None:
        kernel[launch.grid](
            *launch.args,
            **launch.constexprs,  # type: ignore[index]
            num_warps=launch.num_warps,
        )

    return run
