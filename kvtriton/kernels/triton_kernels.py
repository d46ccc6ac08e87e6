"""The descriptor-driven piece-copy kernel and its launcher.

One kernel serves every direction (paged -> packed, packed -> paged, paged -> paged), every
group, layer, head and state of a chunk: each program takes its descriptor row (from the
kernel's arguments when the launch has one row, else one vector load of the first-tile table
and the row's columns), turns ``tile_rows`` consecutive piece indices into (layer, kv, token,
head, piece) with magic-number division, looks up the block of each token, and copies a
``[tile_rows, piece]`` tile of copy units (bits: bit-exact for every dtype), laid out as
``[rows, passes, lane]`` so that warps go over rows and a thread keeps one base address per
row. Heads that lie side by side on every paged side were merged into one wide head on the
host, so a piece is then a whole token row. A packed side is contiguous in piece order, so
its addresses need no lookup at all. Pools are addressed by int64 byte addresses cast to
pointers (several pool tensors in one launch), with ``tl.multiple_of`` hints so 16-byte
vector accesses survive (checked in the PTX of Triton 3.6 and 3.9: ``ld.global.v4.b32`` /
``st.global.v4.b32``). All address math is int64, cast before any multiplication by a
stride. ``LOOP`` (off by default) makes a smaller grid of programs loop over the tiles.

:func:`launch` calls the compiled kernel directly (its cached launcher, no argument binding)
after the first launch of each specialization, on Triton versions whose launcher signature is
known (3.4 - 3.x); otherwise, and under the interpreter, it takes Triton's normal path.

``INTERPRET`` records whether ``TRITON_INTERPRET=1`` was set when this module was imported:
then the same kernel runs on CPU tensors under the Triton interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import triton
import triton.language as tl

from kvtriton.kernels import descriptors as D

__all__ = ["INTERPRET", "current_stream", "launch", "launch_counts"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# descriptor columns (kvtriton.kernels.descriptors)
_NP = tl.constexpr(D.NP)
_NPC = tl.constexpr(D.NPC)
_HPP = tl.constexpr(D.HPP)
_PPH = tl.constexpr(D.PPH)
_KVS = tl.constexpr(D.KVS)
_SRC = tl.constexpr(D.SRC)
_DST = tl.constexpr(D.DST)
_ADDR = tl.constexpr(D.ADDR)
_LAY = tl.constexpr(D.LAY)
_TBL = tl.constexpr(D.TBL)
_REL = tl.constexpr(D.REL)
_BLK = tl.constexpr(D.BLK)
_SB = tl.constexpr(D.SB)
_SKV = tl.constexpr(D.SKV)
_ST = tl.constexpr(D.ST)
_SH = tl.constexpr(D.SH)
_NCOL = tl.constexpr(D.NCOL)


@triton.jit
def _c(d, K: tl.constexpr, row, ARGS: tl.constexpr):
    """Column ``K`` of a descriptor row: from the kernel's arguments (``row``, a launch of
    one row) or loaded from ``d``."""
    if ARGS:
        return row[K]
    else:
        return tl.load(d + K)


@triton.jit
def _divmod(n, d, row, K: tl.constexpr, ARGS: tl.constexpr):
    """``(n // d, n % d)`` of int32 ``0 <= n < 2**31``; columns ``K, K+1, K+2`` hold
    ``(d, magic, shift)``."""
    dv = _c(d, K, row, ARGS).to(tl.int32)
    mg = _c(d, K + 1, row, ARGS).to(tl.uint32)
    q = tl.umulhi(n.to(tl.uint32), mg) >> _c(d, K + 2, row, ARGS).to(tl.uint32)
    q = tl.where(dv == 1, n, q.to(tl.int32))
    return q, n - q * dv


@triton.jit
def _paged_rows(
    meta,
    ids,
    d,
    row,
    l,
    kv,
    t,
    h,
    p,
    m,
    S: tl.constexpr,
    ARGS: tl.constexpr,
    PIECE: tl.constexpr,
    VEC: tl.constexpr,
):
    """Unit offsets (int64) of each piece's first unit on a paged side (columns from ``S``).

    Layer offsets and strides are stored in VEC-unit steps and multiplied by VEC last: the
    compiler then knows every offset is a multiple of VEC (a ``tl.multiple_of`` hint on the
    sum is dropped by Triton 3.6, which then emits 4-byte instead of 16-byte accesses)."""
    pos = _c(d, S + _REL, row, ARGS).to(tl.int32) + t
    bi, slot = _divmod(pos, d, row, S + _BLK, ARGS)
    blk = tl.load(ids + _c(d, S + _TBL, row, ARGS) + bi, mask=m, other=0)
    lay = tl.load(meta + _c(d, S + _LAY, row, ARGS) + l, mask=m, other=0)
    steps = (
        lay
        + blk.to(tl.int64) * _c(d, S + _SB, row, ARGS)
        + kv.to(tl.int64) * _c(d, S + _SKV, row, ARGS)
        + slot.to(tl.int64) * _c(d, S + _ST, row, ARGS)
        + h.to(tl.int64) * _c(d, S + _SH, row, ARGS)
        + (p * (PIECE // VEC)).to(tl.int64)
    )
    return steps * VEC


@triton.jit
def _unit_ptr(addr, UNIT: tl.constexpr, VEC: tl.constexpr):
    """``addr`` (bytes, int64) as a pointer to copy units, ``VEC * UNIT``-byte aligned."""
    if UNIT == 4:
        p = addr.to(tl.pointer_type(tl.int32))
    elif UNIT == 2:
        p = addr.to(tl.pointer_type(tl.int16))
    else:
        p = addr.to(tl.pointer_type(tl.uint8))
    return tl.multiple_of(p, VEC * UNIT)


@triton.jit
def _tile(
    meta,
    ids,
    buf,
    desc,
    starts,
    tile,
    row,
    UNIT: tl.constexpr,
    PIECE: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
    SB: tl.constexpr,
    LEVELS: tl.constexpr,
    SRC_PAGED: tl.constexpr,
    DST_PAGED: tl.constexpr,
    ARGS: tl.constexpr,
):
    """``(source pointers, destination pointers, row mask)`` of tile ``tile`` (int64);
    ``ARGS``: the launch's one row is ``row`` (kernel arguments), nothing to load first."""
    # the tile's row: the last whose first tile is <= tile (tables padded with BIG); a
    # launch of one row skips the search (one dependent load less before the data)
    if LEVELS == 0:
        d = meta + desc
        first_tile = tile * 0
    else:
        lanes = tl.arange(0, SB)
        if LEVELS == 1:
            first = tl.load(meta + starts + lanes)
            at = tl.sum((first <= tile).to(tl.int32), axis=0) - 1
        else:
            coarse = tl.load(meta + starts + lanes)
            c = tl.sum((coarse <= tile).to(tl.int32), axis=0) - 1
            first = tl.load(meta + starts + SB + c * SB + lanes)
            at = c * SB + tl.sum((first <= tile).to(tl.int32), axis=0) - 1
        first_tile = tl.max(tl.where(first <= tile, first, 0), axis=0)
        d = meta + desc + at.to(tl.int64) * _NCOL

    i = (tile - first_tile).to(tl.int32) * ROWS + tl.arange(0, ROWS)
    m = i < _c(d, _NP, row, ARGS).to(tl.int32)
    lk, j = _divmod(i, d, row, _NPC, ARGS)
    t, r = _divmod(j, d, row, _HPP, ARGS)
    h, p = _divmod(r, d, row, _PPH, ARGS)
    kvs = _c(d, _KVS, row, ARGS).to(tl.int32)
    l = lk >> kvs
    kv = lk - (l << kvs)

    if SRC_PAGED:
        src_addr = _c(d, _SRC + _ADDR, row, ARGS)
        src_rows = _paged_rows(meta, ids, d, row, l, kv, t, h, p, m, _SRC, ARGS, PIECE, VEC)
    else:
        src_addr = buf + _c(d, _SRC + _ADDR, row, ARGS)
        src_rows = i.to(tl.int64) * PIECE
    if DST_PAGED:
        dst_addr = _c(d, _DST + _ADDR, row, ARGS)
        dst_rows = _paged_rows(meta, ids, d, row, l, kv, t, h, p, m, _DST, ARGS, PIECE, VEC)
    else:
        dst_addr = buf + _c(d, _DST + _ADDR, row, ARGS)
        dst_rows = i.to(tl.int64) * PIECE
    # the tile as [rows, passes, lane]: a warp's 32 x VEC units along a row, warps over rows,
    # a row's passes in one thread's registers (one base address per row and thread, the
    # passes at immediate offsets). Triton 3.6 orders the tie between the two outer dims
    # (neither contiguous) by index, so warps go over rows: 48 registers per thread in a
    # looping launch of 2 KiB rows (ptxas, sm_90) against 90 for [passes, rows, lane].
    LANE: tl.constexpr = PIECE if PIECE < 32 * VEC else 32 * VEC
    PASSES: tl.constexpr = PIECE // LANE
    cols = (tl.arange(0, PASSES) * LANE)[None, :, None] + tl.arange(0, LANE)[None, None, :]
    src = _unit_ptr(src_addr, UNIT, VEC) + src_rows[:, None, None] + cols
    dst = _unit_ptr(dst_addr, UNIT, VEC) + dst_rows[:, None, None] + cols
    return src, dst, m


@triton.jit
def _load(src, m, STREAM: tl.constexpr):
    if STREAM:  # each byte is touched once: keep L2 for the descriptors and block tables
        return tl.load(src, mask=m[:, None, None], eviction_policy="evict_first")
    else:
        return tl.load(src, mask=m[:, None, None])


@triton.jit
def _store(dst, vals, m, STREAM: tl.constexpr):
    if STREAM:
        tl.store(dst, vals, mask=m[:, None, None], eviction_policy="evict_first")
    else:
        tl.store(dst, vals, mask=m[:, None, None])


# Every runtime argument is an int64 address, table index or count, never specialized: one
# compiled kernel per (unit, piece, tile, vector width, search shape, direction, loop).
_ROW_ARGS = [f"c{k}" for k in range(D.NCOL)]


@triton.jit(
    do_not_specialize=["meta_addr", "ids_addr", "buf", "desc", "starts", "tiles", *_ROW_ARGS]
)
def _piece_copy_kernel(
    meta_addr: tl.int64,
    ids_addr: tl.int64,
    buf: tl.int64,
    desc: tl.int64,
    starts: tl.int64,
    tiles: tl.int64,
    c0: tl.int64,
    c1: tl.int64,
    c2: tl.int64,
    c3: tl.int64,
    c4: tl.int64,
    c5: tl.int64,
    c6: tl.int64,
    c7: tl.int64,
    c8: tl.int64,
    c9: tl.int64,
    c10: tl.int64,
    c11: tl.int64,
    c12: tl.int64,
    c13: tl.int64,
    c14: tl.int64,
    c15: tl.int64,
    c16: tl.int64,
    c17: tl.int64,
    c18: tl.int64,
    c19: tl.int64,
    c20: tl.int64,
    c21: tl.int64,
    c22: tl.int64,
    c23: tl.int64,
    c24: tl.int64,
    c25: tl.int64,
    c26: tl.int64,
    c27: tl.int64,
    c28: tl.int64,
    c29: tl.int64,
    c30: tl.int64,
    c31: tl.int64,
    c32: tl.int64,
    UNIT: tl.constexpr,
    PIECE: tl.constexpr,
    ROWS: tl.constexpr,
    VEC: tl.constexpr,
    SB: tl.constexpr,
    LEVELS: tl.constexpr,
    SRC_PAGED: tl.constexpr,
    DST_PAGED: tl.constexpr,
    STREAM: tl.constexpr,
    LOOP: tl.constexpr,
    ARGS: tl.constexpr,
):
    """Copy tiles of ``ROWS`` pieces of ``PIECE`` units (see descriptors.py).

    ``LOOP == 0``: program ``pid`` copies tile ``pid``. ``LOOP == 1``: a grid smaller than
    ``tiles``; program ``pid`` copies tiles ``pid, pid + grid, ...``, software-pipelined: the
    next tile's descriptor and block-id loads are issued while the current tile's data load
    is in flight, and its data load right after the current tile's store, so each program
    always has one tile of data in flight."""
    meta = meta_addr.to(tl.pointer_type(tl.int64))
    ids = ids_addr.to(tl.pointer_type(tl.int32))
    pid = tl.program_id(0).to(tl.int64)
    if ARGS:  # the launch's one descriptor row, as arguments (c0 .. c32 = columns 0 .. 32)
        row = (
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16,
            c17, c18, c19, c20, c21, c22, c23, c24, c25, c26, c27, c28, c29, c30, c31, c32,
        )  # fmt: skip
    else:
        row = 0
    src, dst, m = _tile(
        meta, ids, buf, desc, starts, pid, row,
        UNIT, PIECE, ROWS, VEC, SB, LEVELS, SRC_PAGED, DST_PAGED, ARGS,
    )  # fmt: skip
    vals = _load(src, m, STREAM)
    if LOOP:
        step = tl.num_programs(0).to(tl.int64)
        for tile in range(pid + step, tiles, step):
            src2, dst2, m2 = _tile(
                meta, ids, buf, desc, starts, tile, row,
                UNIT, PIECE, ROWS, VEC, SB, LEVELS, SRC_PAGED, DST_PAGED, ARGS,
            )  # fmt: skip
            _store(dst, vals, m, STREAM)
            vals = _load(src2, m2, STREAM)
            dst = dst2
            m = m2
    _store(dst, vals, m, STREAM)


# ---------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------
def _direct_supported() -> bool:
    if INTERPRET:
        return False
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
        from triton import knobs  # noqa: F401  (3.4+: hooks live there)
    except (ValueError, ImportError):
        return False
    return (3, 4) <= (major, minor) < (4, 0)


#: Whether :func:`launch` may call compiled kernels directly (the launcher signature
#: ``run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
#: exit_hook, *all_params)`` of Triton 3.4 - 3.9's ``JITFunction.run``).
DIRECT = _direct_supported() and os.environ.get("KVTRITON_DIRECT_LAUNCH", "1") != "0"

_compiled: dict[tuple, tuple] = {}
#: Registers, spills and programs per SM of each compiled specialization (diagnostics).
COMPILED: dict[tuple, dict] = {}
_counts = {"direct": 0, "triton": 0}
_runtime = None  # triton.knobs.runtime, looked up once


def _hooks_active() -> bool:
    global _runtime
    if _runtime is None:
        from triton import knobs

        _runtime = knobs.runtime
    hook = _runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


_get_stream = None


def current_stream(device: int) -> int:
    """Raw handle of the current CUDA stream of ``device`` (Triton's own getter, cached)."""
    global _get_stream
    if _get_stream is None:
        from triton.runtime import driver

        _get_stream = driver.active.get_current_stream
    return _get_stream(device)


def launch_counts() -> dict[str, int]:
    """Launches so far through the direct path and through Triton's normal path."""
    return dict(_counts)


#: The constexpr parameters of a launch's kernel, in signature order.
key = D.key


def launch(
    plan: D.Launch,
    meta: int,
    ids: int,
    buf: int,
    stream: int,
    device: int,
    consts: tuple | None = None,
) -> None:
    """Launch ``plan`` on ``stream`` (raw handle; ignored on CPU) of CUDA device ``device``
    (the current device); ``meta`` / ``ids`` / ``buf`` are byte addresses; ``consts`` is
    :func:`key` of ``plan`` when the caller kept it."""
    if consts is None:
        consts = key(plan)
    if not plan.fitted:
        D.fit(plan)
    hit = _compiled.get((consts, plan.num_warps, device))
    if hit is not None and not _hooks_active():
        try:
            hit(plan.grid, stream, meta, ids, buf, plan.desc, plan.starts, plan.tiles, plan.row,
                consts)  # fmt: skip
            _counts["direct"] += 1
            return
        except (TypeError, ValueError, AttributeError) as err:  # an unexpected launcher
            _disable_direct(err)
    kernel = _piece_copy_kernel[(plan.grid,)](
        meta,
        ids,
        buf,
        plan.desc,
        plan.starts,
        plan.tiles,
        *plan.row,
        UNIT=plan.unit,
        PIECE=plan.piece,
        ROWS=plan.tile_rows,
        VEC=plan.vec,
        SB=plan.seg_block,
        LEVELS=plan.levels,
        SRC_PAGED=plan.src_paged,
        DST_PAGED=plan.dst_paged,
        STREAM=plan.stream,
        LOOP=plan.loop,
        ARGS=plan.args,
        num_warps=plan.num_warps,
        num_stages=1,  # the loop is pipelined by hand (one tile in registers)
    )
    _counts["triton"] += 1
    if not INTERPRET and kernel is not None:
        res = _resident(kernel, plan.num_warps, device)
        COMPILED[(*consts, plan.num_warps)] = {
            "regs": int(getattr(kernel, "n_regs", 0) or 0),
            "spills": int(getattr(kernel, "n_spills", 0) or 0),
            "resident_per_sm": res,
        }
        if plan.loop:
            D.RESIDENT[(*consts, plan.num_warps)] = res
            D.fit(plan)
    if DIRECT and kernel is not None and hasattr(kernel, "packed_metadata"):
        _compiled[(consts, plan.num_warps, device)] = _direct_call(kernel)


def _resident(kernel, num_warps: int, device: int) -> int:  # type: ignore[no-untyped-def]
    """Programs of the compiled ``kernel`` that fit on one SM at once (registers, threads,
    shared memory; CUDA's occupancy rules with 256-register warp allocation)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    regs = int(getattr(kernel, "n_regs", 0) or 0)
    threads = int(getattr(props, "max_threads_per_multi_processor", 2048))
    reg_file = int(getattr(props, "regs_per_multiprocessor", 65536))
    smem = int(getattr(props, "shared_memory_per_multiprocessor", 233472))
    fit = min(32, threads // (32 * num_warps))
    if regs:
        per_warp = -(-regs * 32 // 256) * 256
        fit = min(fit, reg_file // (per_warp * num_warps))
    shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    if shared:
        fit = min(fit, smem // (shared + 1024))  # 1 KiB reserved per block
    return max(1, fit)


def _direct_call(kernel) -> Callable:  # type: ignore[no-untyped-def]
    """A function launching the compiled ``kernel`` with no argument binding: its launcher's
    C entry when the launcher is the one of Triton 3.6 with no scratch memory (checked on an
    H200), else the launcher object (the signature of 3.4 - 3.9's ``JITFunction.run``)."""
    runner, function, metadata = kernel.run, kernel.function, kernel.packed_metadata
    c_launch = getattr(runner, "launch", None)
    plain = (
        triton.__version__.startswith("3.6.")
        and c_launch is not None
        and not getattr(runner, "global_scratch_size", 1)
        and not getattr(runner, "profile_scratch_size", 1)
        and hasattr(runner, "launch_cooperative_grid")
        and hasattr(runner, "launch_pdl")
    )
    if plain:
        coop, pdl = runner.launch_cooperative_grid, runner.launch_pdl

        def go(grid, stream, meta, ids, buf, desc, starts, tiles, row, consts):  # type: ignore[no-untyped-def]
            c_launch(
                grid, 1, 1, stream, function, coop, pdl, None, None,  # no scratch memory
                metadata, None, None, None,  # launch metadata and hooks: none is active
                meta, ids, buf, desc, starts, tiles, *row, *consts,  # constexprs: skipped
            )  # fmt: skip

        return go

    def go_runner(grid, stream, meta, ids, buf, desc, starts, tiles, row, consts):  # type: ignore[no-untyped-def]
        runner(
            grid, 1, 1, stream, function,
            metadata, None, None, None,  # launch metadata and hooks: none is active
            meta, ids, buf, desc, starts, tiles, *row, *consts,  # constexprs: skipped
        )  # fmt: skip

    return go_runner


def _disable_direct(err: Exception) -> None:
    global DIRECT
    import warnings

    warnings.warn(
        f"kvtriton: calling the compiled kernel directly failed ({err!r}); using Triton's "
        "normal launch path from now on",
        RuntimeWarning,
        stacklevel=3,
    )
    DIRECT = False
    _compiled.clear()
