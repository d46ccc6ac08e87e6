"""Move descriptors: the int64 tables one launch reads, built in numpy on the host.

A :class:`Move` copies ``layers x kv x tokens x heads`` rows of ``head_bytes`` contiguous bytes
from one side to the other. A side is either

* :class:`Paged`: a pool. Per selected layer an element offset, a block table (physical ids),
  tokens per block and the block / kv / token / head strides; position ``rel + t`` of the move
  sits in table entry ``(rel + t) // block`` at in-block slot ``(rel + t) % block``. A state
  pool is a paged side with one token per block and the slot as its only block;
* :class:`Dense`: a packed segment, the contiguous ``[layers, kv, tokens, heads, head]``
  tensor at a byte offset of the buffer given when the move runs (DESIGN.md §2).

Everything moves in copy *units* (4-, 2- or 1-byte integers: the widest that divides every
address, stride and size of a launch; values move as bits, so every dtype is bit-exact) and
*pieces* (``piece`` consecutive units of one head: a power of two dividing every head's units).
Piece ``i`` of a move enumerates (layer, kv, token, head, piece) row-major, which is exactly the
packed order: a dense side's piece ``i`` starts at unit ``offset / unit + i * piece``.

Per move one descriptor row of :data:`NCOL` int64 columns (the ``*_D/_M/_S`` triples are a
divisor and its magic multiplier and shift, see :func:`magic`), then per launch a table of
each row's first tile (ascending, padded with :data:`BIG`) that a program searches for its
row. All tables of all chunks of one request live in one int64 array (``meta``) and one int32
array (``ids``, the block tables), copied to the device in one transfer (:func:`stage`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "NCOL",
    "Dense",
    "HostPlan",
    "Launch",
    "Move",
    "Paged",
    "Tuning",
    "build",
    "magic",
    "pool_side",
    "stage",
    "state_side",
]

# -- descriptor columns (kept in sync with triton_kernels._piece_copy_kernel) ---------------
NP = 0  # pieces of the row: layers * kv * tokens * heads * pieces per head
NPC = 1  # (divisor, magic, shift) of pieces per (layer, kv): tokens * heads * pieces per head
HPP = 4  # ... of pieces per token: heads * pieces per head
PPH = 7  # ... of pieces per head
KVS = 10  # log2(kv): 0 or 1
SRC = 11  # first column of the source side
DST = 22  # first column of the destination side
# side columns, relative to SRC / DST
ADDR = 0  # paged: absolute byte address of the pool's first selected head; dense: byte offset
LAY = 1  # meta index of the layer offset table (steps: unit x vec bytes)
TBL = 2  # ids index of the block table
REL = 3  # position of the row's first token relative to the start of the table's first block
BLK = 4  # (divisor, magic, shift) of tokens per block
SB, SKV, ST, SH = 7, 8, 9, 10  # block / kv / token / head strides (steps)
NCOL = 33

#: Padding of the first-tile tables: larger than any program id.
BIG = 1 << 62
#: Most rows one launch searches with a single vector load (one level); up to SEG_FINE**2
#: rows take a two-level search (coarse table of every SEG_FINE-th start, then a window).
SEG_ONE_LEVEL = 64
SEG_FINE = 128
#: Piece indices are int32 in the kernel (cheap division): a row holds fewer pieces.
MAX_PIECES = (1 << 31) - (1 << 20)


@dataclass(frozen=True)
class Tuning:
    """Launch shape. Each default's reason is beside it."""

    # Bytes one program moves at most. Large moves need many bytes in flight per SM to cover
    # the dependent loads before the data load (descriptor -> block id -> data): on H200 a
    # 16 KiB tile keeps ~128 KiB per SM in flight at 8 programs per SM (BENCHMARKS.md sweep).
    tile_bytes: int = 16384
    # Smallest tile the shrinking below may reach (one 16-byte vector per thread of 4 warps).
    min_tile_bytes: int = 2048
    # Shrink tiles until the grid has this many programs per SM: small moves need parallelism
    # more than long tiles; 4 keeps every SM busy through the launch tail (H100 sweep).
    programs_per_sm: int = 4
    # Widest piece: 256 B holds a 128-dim bf16 head; wider pieces gain nothing (a thread
    # moves 16 B per row either way) and pad small heads' tiles.
    max_piece_bytes: int = 256
    # Warps per program for tiles >= 4 KiB: 8 warps x 32 threads x 16 B = 4 KiB per pass.
    num_warps: int = 8
    # Under the Triton interpreter every program is a Python-level loop iteration: few,
    # large tiles (units per program).
    interpret_tile_units: int = 1 << 14


#: What :func:`build` uses when no tuning is given (tests swap it to force many tiles).
DEFAULT_TUNING = Tuning()


@dataclass(frozen=True, slots=True, eq=False)
class Paged:
    """A pool side (see the module docstring). ``layers`` are element offsets (layer index x
    stride 0); ``strides`` are elements (block, kv, token, head); ``ids`` the block table."""

    tensor: torch.Tensor
    addr: int
    layers: tuple[int, ...]
    ids: np.ndarray
    rel: int
    block: int
    strides: tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Dense:
    """A packed segment at byte ``offset`` of the run's buffer."""

    offset: int


@dataclass(frozen=True, slots=True, eq=False)
class Move:
    """``layers x kv x tokens x heads`` rows of ``head_bytes`` bytes from ``src`` to ``dst``."""

    src: Paged | Dense
    dst: Paged | Dense
    layers: int
    kv: int
    tokens: int
    heads: int
    head_bytes: int
    state: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class Launch:
    """One kernel launch: its rows in ``meta`` and its compile-time shape."""

    desc: int  # meta index of the first descriptor row
    starts: int  # meta index of the first-tile table
    rows: int
    grid: int
    unit: int  # bytes of the copy unit
    piece: int  # units per piece
    tile_rows: int  # pieces per program
    vec: int  # units every row offset is a multiple of (vectorization hint)
    seg_block: int
    levels: int  # row search: 0 (one row), 1 (one table) or 2 (coarse + fine)
    num_warps: int
    src_paged: bool
    dst_paged: bool
    tensors: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]  # per row


@dataclass(frozen=True, slots=True, eq=False)
class HostPlan:
    """All chunks' launches of one request and the host tables they read."""

    meta: np.ndarray  # int64
    ids: np.ndarray  # int32
    chunks: tuple[tuple[Launch, ...], ...]


def pool_side(
    pool: torch.Tensor,
    ids: np.ndarray,
    rel: int,
    layers: Sequence[int],
    heads: tuple[int, int],
) -> Paged:
    """The paged side of a 6-D ``[layers, blocks, kv, block, heads, head_dim]`` pool view:
    local ``layers`` (dim 0 indices), local head range ``heads``, block table ``ids``; the
    move's first position is ``rel`` positions after the start of block ``ids[0]``."""
    st = pool.stride()
    size = pool.element_size()
    return Paged(
        pool,
        pool.data_ptr() + heads[0] * st[4] * size,
        tuple(layer * st[0] for layer in layers),
        ids,
        rel,
        int(pool.shape[3]),
        (st[1], st[2], st[3], st[4]),
    )


def state_side(
    pool: torch.Tensor, slot: int, layers: Sequence[int], heads: tuple[int, int]
) -> Paged:
    """The paged side of slot ``slot`` of a ``[layers, slots, heads, *rest]`` state pool (rest
    row-major contiguous): one token per block, the slot as the only block."""
    st = pool.stride()
    size = pool.element_size()
    return Paged(
        pool,
        pool.data_ptr() + heads[0] * st[2] * size,
        tuple(layer * st[0] for layer in layers),
        _slot_table(slot),
        0,
        1,
        (st[1], 0, 0, st[2]),
    )


@functools.lru_cache(maxsize=1024)
def _slot_table(slot: int) -> np.ndarray:
    arr = np.array([slot], dtype=np.int32)
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=4096)
def magic(d: int) -> tuple[int, int]:
    """``(m, s)`` with ``n // d == umulhi(n, m) >> s`` for every ``0 <= n < 2**31`` (``d > 1``;
    ``d == 1`` gives ``(0, 0)`` and the kernel returns ``n``): division in three instructions
    instead of ~20 (CUTLASS's FastDivmod)."""
    if d == 1:
        return 0, 0
    if not 1 < d < 1 << 31:
        raise ValueError(f"divisor {d} is outside [1, 2**31)")
    p = 31 + (d - 1).bit_length()
    return ((1 << p) + d - 1) // d, p - 32


def _low_pow2(n: int, cap: int) -> int:
    """Largest power of two dividing ``n`` (``cap`` when ``n == 0``), at most ``cap``."""
    return cap if n == 0 else min(cap, n & -n)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _side_gcd(side: Paged | Dense) -> int:
    if isinstance(side, Dense):
        return side.offset
    size = side.tensor.element_size()
    return math.gcd(side.addr, *(s * size for s in side.strides), *(x * size for x in side.layers))


def _shape(moves: Sequence[Move], buffer_align: int, tuning: Tuning) -> tuple[int, int, int]:
    """``(unit, piece, vec)`` of a launch of ``moves``."""
    g = buffer_align
    h = 0
    for m in moves:
        g = math.gcd(g, _side_gcd(m.src), _side_gcd(m.dst), m.head_bytes)
        h = math.gcd(h, m.head_bytes)
    unit = _low_pow2(g, 4)
    piece = _low_pow2(h // unit, max(1, tuning.max_piece_bytes // unit))
    vec = min(piece, 16 // unit, _low_pow2(g // unit, 16))
    return unit, piece, vec


class _Tables:
    """Append-only int64 / int32 tables with offsets known at append time."""

    def __init__(self) -> None:
        self.meta: list[np.ndarray] = []
        self.meta_size = 0
        self.ids: list[np.ndarray] = []
        self.ids_size = 0
        self._ids_at: dict[int, int] = {}
        self._lay_at: dict[tuple[tuple[int, ...], int], int] = {}
        self._keep: list[np.ndarray] = []  # keeps id() keys unique while building

    def add_meta(self, arr: np.ndarray) -> int:
        at = self.meta_size
        self.meta.append(arr)
        self.meta_size += arr.size
        return at

    def table(self, ids: np.ndarray) -> int:
        key = id(ids)
        at = self._ids_at.get(key)
        if at is None:
            at = self._ids_at[key] = self.ids_size
            self.ids.append(ids)
            self._keep.append(ids)
            self.ids_size += ids.size
        return at

    def layers(self, offsets: tuple[int, ...], scale: int, step: int) -> int:
        """Meta index of ``offsets`` (elements of ``scale`` bytes) in ``step``-byte units."""
        key = (offsets, scale, step)
        at = self._lay_at.get(key)
        if at is None:
            arr = np.array(offsets, dtype=np.int64)
            if scale != step:
                arr = arr * scale // step
            at = self._lay_at[key] = self.add_meta(arr)
        return at


def _side_cols(side: Paged | Dense, tables: _Tables, step: int, layer0: int, shift: int) -> list:
    """The 11 side columns; ``layer0`` / ``shift`` select a layer sub-range of a split row.
    Layer offsets and strides are in ``step``-byte units (copy unit x vector width)."""
    if isinstance(side, Dense):
        return [side.offset + shift, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    size = side.tensor.element_size()
    lay = tables.layers(side.layers, size, step) + layer0
    m, s = magic(side.block)
    # exact: the step divides every stride in bytes (_shape)
    strides = [x * size // step for x in side.strides]
    return [side.addr, lay, tables.table(side.ids), side.rel, side.block, m, s, *strides]


def _rows(
    m: Move, unit: int, piece: int, vec: int, tables: _Tables
) -> list[tuple[list, Move, int]]:
    """Descriptor rows of one move (several when it holds more than MAX_PIECES pieces: split
    by layers) with their piece counts."""
    pph = m.head_bytes // unit // piece
    hpp = m.heads * pph
    npc = m.tokens * hpp
    per_layer = m.kv * npc
    if per_layer > MAX_PIECES:
        raise ValueError(
            f"one layer of a move holds {per_layer} pieces of {piece * unit} bytes, more than "
            f"{MAX_PIECES}: use smaller chunks"
        )
    step = max(1, MAX_PIECES // per_layer)
    out = []
    for l0 in range(0, m.layers, step):
        nl = min(step, m.layers - l0)
        shift = l0 * per_layer * piece * unit  # dense byte shift of the sub-range
        common = [nl * per_layer, npc, *magic(npc), hpp, *magic(hpp), pph, *magic(pph)]
        common.append(m.kv.bit_length() - 1)
        row = common + _side_cols(m.src, tables, unit * vec, l0, shift)
        row += _side_cols(m.dst, tables, unit * vec, l0, shift)
        out.append((row, m, nl * per_layer))
    return out


def _launch(
    moves: Sequence[Move],
    tables: _Tables,
    buffer_align: int,
    sm_count: int,
    interpret: bool,
    tuning: Tuning,
) -> list[Launch]:
    unit, piece, vec = _shape(moves, buffer_align, tuning)
    rows: list[tuple[list, Move, int]] = []
    for m in moves:
        rows.extend(_rows(m, unit, piece, vec, tables))
    pieces = np.array([n for _, _, n in rows], dtype=np.int64)
    if interpret:
        tile_rows = min(_pow2_ceil(int(pieces.max())), max(1, tuning.interpret_tile_units // piece))
        num_warps = 4
    else:
        units = max(piece, tuning.tile_bytes // unit)
        floor = max(piece, tuning.min_tile_bytes // unit)
        want = tuning.programs_per_sm * sm_count
        while units > floor and int((-(-pieces // (units // piece))).sum()) < want:
            units //= 2
        tile_rows = max(1, units // piece)
        # one 16-byte vector per thread per pass; at most tuning.num_warps warps
        num_warps = max(1, min(tuning.num_warps, tile_rows * piece * unit // 512))
    out = []
    cap = SEG_FINE * SEG_FINE
    for lo in range(0, len(rows), cap):
        part = rows[lo : lo + cap]
        tiles = -(-pieces[lo : lo + cap] // tile_rows)
        first = np.concatenate([[0], np.cumsum(tiles)[:-1]]).astype(np.int64)
        n = len(part)
        if n == 1:
            levels, block = 0, 2
            table = np.zeros(0, dtype=np.int64)
        elif n <= SEG_ONE_LEVEL:
            levels, block = 1, max(2, _pow2_ceil(n))
            table = np.full(block, BIG, dtype=np.int64)
            table[:n] = first
        else:
            levels, block = 2, SEG_FINE
            coarse = np.full(block, BIG, dtype=np.int64)
            coarse_n = -(-n // block)
            coarse[:coarse_n] = first[::block]
            fine = np.full(coarse_n * block, BIG, dtype=np.int64)
            fine[:n] = first
            table = np.concatenate([coarse, fine])
        desc = tables.add_meta(np.array([r for r, _, _ in part], dtype=np.int64).ravel())
        starts = tables.add_meta(table)
        tensors = tuple(
            (
                m.src.tensor if isinstance(m.src, Paged) else None,
                m.dst.tensor if isinstance(m.dst, Paged) else None,
            )
            for _, m, _ in part
        )
        m0 = part[0][1]
        out.append(
            Launch(
                desc,
                starts,
                n,
                int(tiles.sum()),
                unit,
                piece,
                tile_rows,
                vec,
                block,
                levels,
                num_warps,
                isinstance(m0.src, Paged),
                isinstance(m0.dst, Paged),
                tensors,
            )
        )
    return out


def build(
    chunks: Sequence[Sequence[Move]],
    *,
    buffer_align: int = 16,
    sm_count: int = 1,
    interpret: bool = False,
    tuning: Tuning | None = None,
) -> HostPlan:
    """Descriptor tables and launches of every chunk.

    Each chunk's moves (all one direction) share one launch; state moves join it when they
    keep its unit, piece and vector width, else they take one more launch. ``buffer_align``
    is the guaranteed alignment (bytes) of the buffers the plan will run with.
    """
    tuning = tuning or DEFAULT_TUNING
    tables = _Tables()
    plans = []
    for moves in chunks:
        moves = [m for m in moves if m.tokens and m.layers and m.heads and m.head_bytes]
        if not moves:
            plans.append(())
            continue
        main = [m for m in moves if not m.state]
        extra: list[Move] = []
        if main:
            shape = _shape(main, buffer_align, tuning)
            for m in moves:
                if m.state:
                    (main if _shape([*main, m], buffer_align, tuning) == shape else extra).append(m)
        else:
            main = moves
        launches = _launch(main, tables, buffer_align, sm_count, interpret, tuning)
        if extra:
            launches += _launch(extra, tables, buffer_align, sm_count, interpret, tuning)
        plans.append(tuple(launches))
    meta = np.concatenate(tables.meta) if tables.meta else np.zeros(1, dtype=np.int64)
    ids = (
        np.concatenate(tables.ids).astype(np.int32, copy=False)
        if tables.ids
        else np.zeros(1, dtype=np.int32)
    )
    return HostPlan(meta, ids, tuple(plans))


def stage(plan: HostPlan, device: torch.device) -> tuple[torch.Tensor | np.ndarray, int, int]:
    """The plan's tables in device memory: ``(owner, meta address, ids address)``.

    On CUDA: one pinned host buffer and ONE asynchronous host-to-device copy on the current
    stream (torch's caching host allocator keeps the pinned block until the copy is done).
    On CPU the host arrays themselves (one contiguous buffer).
    """
    meta_bytes = plan.meta.size * 8
    total = meta_bytes + plan.ids.size * 4
    if device.type == "cuda":
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        raw = host.numpy()
    else:
        raw = np.empty(total, dtype=np.uint8)
        host = raw
    raw[:meta_bytes].view(np.int64)[:] = plan.meta
    raw[meta_bytes:].view(np.int32)[:] = plan.ids
    if device.type == "cuda":
        dev = torch.empty(total, dtype=torch.uint8, device=device)
        dev.copy_(host, non_blocking=True)
        addr = dev.data_ptr()
        return dev, addr, addr + meta_bytes
    addr = raw.ctypes.data
    return raw, addr, addr + meta_bytes
