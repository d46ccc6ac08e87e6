"""Move descriptors: the int64 tables one launch reads, built in numpy on the host.

(Slightly over 600 lines: the column layout, its builder and its staging are one contract
with the kernel in :mod:`kvtriton.kernels.triton_kernels`; split, the layout would be read in
three places.)

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
packed order: a dense side's piece ``i`` starts at unit ``offset / unit + i * piece``. When the
heads of a move lie side by side on every paged side (NHD pools), they are merged into one head
of ``heads x head_bytes`` first (:func:`_merged`): same bytes, same order, pieces up to a whole
token row.

Per move one descriptor row of :data:`NCOL` int64 columns (the ``*_D/_M/_S`` triples are a
divisor and its magic multiplier and shift, see :func:`magic`), then per launch a table of
each row's first tile (ascending, padded with :data:`BIG`) that a program searches for its
row; a launch of one row also carries that row as kernel arguments (:attr:`Launch.row`), so
its programs start with the block-id load. All tables of all chunks of one request live in one
int64 array (``meta``) and one int32 array (``ids``, the block tables), copied to the device in
one transfer (:func:`stage`, through :mod:`~kvtriton.kernels.staging`).
"""

from __future__ import annotations

import array
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtriton.kernels import staging

__all__ = [
    "NCOL",
    "Dense",
    "Geometry",
    "HostPlan",
    "Launch",
    "Move",
    "Paged",
    "Tuning",
    "build",
    "geometry",
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

#: The row arguments of a launch that loads its rows from the table.
ZERO_ROW = (0,) * NCOL
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
    # Widest piece. Heads that lie side by side on every paged side of a move (NHD pools, all
    # selected heads adjacent) merge into one wide head (``merge_heads``): a piece is then a
    # whole token row (8 heads x 128 x bf16 = 2 KiB), so a tile needs a few block-id lookups
    # and little index math per byte; 4 KiB keeps 32-head rows in one piece.
    max_piece_bytes: int = 4096
    # Merge adjacent heads into one wide head per move (see max_piece_bytes).
    merge_heads: bool = True
    # Looping programs: at most ``resident_per_sm`` programs per SM (fewer when the compiled
    # kernel's registers say so), each looping over tiles with the next tile's descriptor
    # and block-id loads overlapping the current tile's data. 0 (the default): one program
    # per tile. On H200 every looping shape measured 2-8 points below one program per tile,
    # on contiguous memory too (BENCHMARKS.md): the hardware's own scheduling of short
    # programs keeps more bytes in flight than one tile of registers per looping program.
    resident_per_sm: int = 0
    # Warps per program for tiles >= 4 KiB: 8 warps x 32 threads x 16 B = 4 KiB per pass.
    num_warps: int = 8
    # Data loads and stores evict first: every byte moves once, and L2 then keeps the
    # descriptors and block tables every program reads before its data.
    stream_hint: bool = True
    # Under the Triton interpreter every program is a Python-level loop iteration: few,
    # large tiles (units per program).
    interpret_tile_units: int = 1 << 14
    # A launch of one descriptor row (one move: a chunk of one group) passes the row as
    # kernel arguments: each program's block-id load no longer waits for a descriptor load.
    row_args: bool = True
    # Looping launches: pieces per thread at most (1: one base address per thread and side,
    # the rest of its registers hold data; more rows per tile cost registers, not bytes).
    rows_per_thread: int = 1
    # Programs of a looping launch under the interpreter (0: no cap; tests use small caps to
    # drive the loop through many tiles).
    interpret_programs: int = 0


#: What :func:`build` uses when no tuning is given (tests swap it to force many tiles).
DEFAULT_TUNING = Tuning()


@dataclass(slots=True, eq=False)
class Geometry:
    """Where a selection (layers, first head) of a pool lives: ``layers`` are element offsets
    (layer index x stride 0), ``strides`` elements (block, kv, token, head), ``size`` the
    element size, ``gcd`` the gcd of the address and every stride and layer offset in bytes
    (what the copy unit and vector width must divide). Its descriptor columns are cached per
    step, so a PoolSet that keeps the geometry builds them once."""

    tensor: torch.Tensor
    addr: int
    layers: tuple[int, ...]
    block: int
    strides: tuple[int, int, int, int]
    size: int
    gcd: int
    _cols: dict = field(default_factory=dict)

    def cols(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(layer offsets, (addr, block, magic, shift, 4 strides))`` in ``step``-byte units
        (exact: the step divides every stride in bytes, see :func:`_shape`)."""
        hit = self._cols.get(step)
        if hit is None:
            k = self.size
            m, s = magic(self.block)
            sb, skv, st, sh = self.strides
            steps = (sb * k // step, skv * k // step, st * k // step, sh * k // step)
            layers = tuple(x * k // step for x in self.layers)
            hit = self._cols[step] = (layers, (self.addr, self.block, m, s, *steps))
        return hit


@dataclass(slots=True, eq=False)
class Paged:
    """A pool side: its geometry, the block table ``ids`` and the position ``rel`` of the
    move's first token counted from the start of block ``ids[0]``."""

    geo: Geometry
    ids: np.ndarray
    rel: int


@dataclass(slots=True)
class Dense:
    """A packed segment at byte ``offset`` of the run's buffer."""

    offset: int


@dataclass(slots=True, eq=False)
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


@dataclass(slots=True, eq=False)
class Launch:
    """One kernel launch: its rows in ``meta`` and its compile-time shape."""

    desc: int  # meta index of the first descriptor row
    starts: int  # meta index of the first-tile table
    rows: int
    grid: int  # programs
    tiles: int  # tiles (== grid unless ``loop``)
    unit: int  # bytes of the copy unit
    piece: int  # units per piece
    tile_rows: int  # pieces per program
    vec: int  # units every row offset is a multiple of (vectorization hint)
    seg_block: int
    levels: int  # row search: 0 (one row), 1 (one table) or 2 (coarse + fine)
    num_warps: int
    src_paged: bool
    dst_paged: bool
    stream: bool  # eviction hint on the data accesses
    loop: bool  # programs loop over tiles (grid < tiles possible)
    moves: tuple[Move, ...]  # the move of each row (the torch backend reads its tensors)
    cap: int = 0  # looping launches: most programs per SM (Tuning.resident_per_sm)
    sms: int = 1  # SMs of the device
    fitted: bool = True  # the grid accounts for the compiled kernel's occupancy
    consts: tuple = ()  # :func:`key`, kept
    args: bool = False  # the one row's columns travel as kernel arguments (``row``)
    row: tuple = ZERO_ROW  # those columns (zeros when the kernel loads its rows)


@dataclass(slots=True, eq=False)
class HostPlan:
    """All chunks' launches of one request and the host tables they read."""

    meta: array.array  # int64 ("q")
    ids: np.ndarray  # int32
    chunks: tuple[tuple[Launch, ...], ...]


def geometry(pool: torch.Tensor, layers: Sequence[int], head0: int, state: bool) -> Geometry:
    """The geometry of local ``layers`` (dim 0) from head ``head0`` on of a 6-D KV pool view
    ``[layers, blocks, kv, block, heads, head_dim]`` or (``state``) a state pool ``[layers,
    slots, heads, *rest]`` (one token per block, the slot as its block)."""
    st = pool.stride()
    size = pool.element_size()
    if state:
        addr = pool.data_ptr() + head0 * st[2] * size
        strides, block = (st[1], 0, 0, st[2]), 1
    else:
        addr = pool.data_ptr() + head0 * st[4] * size
        strides, block = (st[1], st[2], st[3], st[4]), int(pool.shape[3])
    offsets = tuple(layer * st[0] for layer in layers)
    g = math.gcd(addr, *(x * size for x in strides), *(x * size for x in offsets))
    return Geometry(pool, addr, offsets, block, strides, size, g)


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
    return Paged(geometry(pool, layers, heads[0], False), ids, rel)


def state_side(
    pool: torch.Tensor, slot: int, layers: Sequence[int], heads: tuple[int, int]
) -> Paged:
    """The paged side of slot ``slot`` of a ``[layers, slots, heads, *rest]`` state pool (rest
    row-major contiguous): one token per block, the slot as the only block."""
    return Paged(geometry(pool, layers, heads[0], True), slot_table(slot), 0)


@functools.lru_cache(maxsize=1024)
def slot_table(slot: int) -> np.ndarray:
    """The one-entry block table of a state slot (shared, read-only)."""
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


def _move_gcd(m: Move) -> int:
    src, dst = m.src, m.dst
    a = src.geo.gcd if type(src) is Paged else src.offset
    b = dst.geo.gcd if type(dst) is Paged else dst.offset
    return math.gcd(a, b, m.head_bytes)


def _shape(g: int, h: int, tuning: Tuning) -> tuple[int, int, int]:
    """``(unit, piece, vec)`` for byte gcd ``g`` of every address / stride / size and gcd
    ``h`` of the head sizes of a launch."""
    unit = _low_pow2(g, 4)
    piece = _low_pow2(h // unit, max(1, tuning.max_piece_bytes // unit))
    vec = min(piece, 16 // unit, _low_pow2(g // unit, 16))
    return unit, piece, vec


class _Tables:
    """Append-only int64 (``meta``) and int32 (``ids``) tables with offsets known at append
    time."""

    def __init__(self) -> None:
        self.meta: list[int] = []
        self.ids: list[np.ndarray] = []
        self.ids_size = 0
        self._ids_at: dict[int, int] = {}
        self._lay_at: dict[int, int] = {}

    def side(self, side: Paged | Dense, step: int, layer0: int, shift: int) -> tuple:
        """The 11 side columns; ``layer0`` / ``shift`` select a layer sub-range of a split
        row. Layer offsets and strides are in ``step``-byte units (unit x vector width)."""
        if type(side) is Dense:
            return (side.offset + shift, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0)
        layers, cols = side.geo.cols(step)
        lay = self._lay_at.get(id(layers))  # the tuple is cached by its Geometry
        if lay is None:
            lay = self._lay_at[id(layers)] = len(self.meta)
            self.meta.extend(layers)
        ids = side.ids
        tbl = self._ids_at.get(id(ids))  # the arrays stay referenced by the moves
        if tbl is None:
            tbl = self._ids_at[id(ids)] = self.ids_size
            self.ids.append(ids)
            self.ids_size += ids.size
        addr, block, m, s, sb, skv, st, sh = cols
        return (addr, lay + layer0, tbl, side.rel, block, m, s, sb, skv, st, sh)


def _rows(m: Move, unit: int, piece: int, step: int, tables: _Tables, out: list) -> None:
    """Append ``(row, pieces, move)`` for the descriptor rows of ``m`` to ``out`` (several
    rows when it holds more than MAX_PIECES pieces: split by layers)."""
    pph = m.head_bytes // unit // piece
    hpp = m.heads * pph
    npc = m.tokens * hpp
    per_layer = m.kv * npc
    if per_layer > MAX_PIECES:
        raise ValueError(
            f"one layer of a move holds {per_layer} pieces of {piece * unit} bytes, more than "
            f"{MAX_PIECES}: use smaller chunks"
        )
    head = (npc, *magic(npc), hpp, *magic(hpp), pph, *magic(pph), m.kv.bit_length() - 1)
    n = m.layers * per_layer
    if n <= MAX_PIECES:
        src, dst = tables.side(m.src, step, 0, 0), tables.side(m.dst, step, 0, 0)
        out.append(((n, *head, *src, *dst), n, m))
        return
    per_row = max(1, MAX_PIECES // per_layer)
    for l0 in range(0, m.layers, per_row):
        n = min(per_row, m.layers - l0) * per_layer
        shift = l0 * per_layer * piece * unit  # dense byte shift of the sub-range
        src = tables.side(m.src, step, l0, shift)
        dst = tables.side(m.dst, step, l0, shift)
        out.append(((n, *head, *src, *dst), n, m))


def _tile_rows(
    pieces: int, unit: int, piece: int, vec: int, sm_count: int, interpret: bool, tuning: Tuning
) -> tuple[int, int]:
    """``(pieces per tile, warps)`` of a launch of ``pieces`` pieces: the widest tile (power of
    two, at most ``tile_bytes``, at least ``min_tile_bytes``) that still gives
    ``programs_per_sm`` tiles per SM; looping launches also hold at most
    ``rows_per_thread`` pieces per thread (a warp spans 32 x vec units of a piece, so a
    thread keeps one base address per piece and its registers go to data)."""
    if interpret:
        return min(_pow2_ceil(pieces), max(1, tuning.interpret_tile_units // piece)), 4
    most = max(1, tuning.tile_bytes // unit // piece)
    if tuning.resident_per_sm > 0:
        per_pass = tuning.num_warps * max(1, 32 * vec // piece)  # pieces a pass covers
        most = min(most, per_pass * tuning.rows_per_thread)
    least = min(most, max(1, tuning.min_tile_bytes // unit // piece))
    per = pieces // (tuning.programs_per_sm * sm_count)  # rows per tile for that many tiles
    rows = min(most, max(least, 1 << max(0, per.bit_length() - 1)))
    # one 16-byte vector per thread per pass; at most tuning.num_warps warps
    return rows, max(1, min(tuning.num_warps, rows * piece * unit // 512))


#: Programs per SM that fit at once, per compiled specialization (``key + (num_warps,)``):
#: filled by the Triton launcher when it compiles a looping kernel (its registers decide).
RESIDENT: dict[tuple, int] = {}


def balanced(tiles: int, programs: int) -> int:
    """At most ``programs`` programs for ``tiles`` tiles, each looping over the same number of
    tiles (``rounds``; the last ones one fewer): as few programs as ``rounds`` rounds need,
    so no program runs a round more than the others."""
    rounds = -(-tiles // max(1, programs))
    return -(-tiles // rounds)


def fit(launch: Launch) -> None:
    """Re-size a looping launch's grid to the programs that fit on the device at once (known
    once its kernel is compiled): a program that waits for a free slot would run all its
    tiles after the others."""
    res = RESIDENT.get((*key(launch), launch.num_warps))
    if res is not None:
        launch.grid = balanced(launch.tiles, min(launch.cap, res) * launch.sms)
        launch.fitted = True


def key(launch: Launch) -> tuple:
    """The constexpr parameters of ``launch``'s kernel, in the kernel's signature order."""
    if launch.consts:
        return launch.consts
    return (
        launch.unit,
        launch.piece,
        launch.tile_rows,
        launch.vec,
        launch.seg_block,
        launch.levels,
        launch.src_paged,
        launch.dst_paged,
        launch.stream,
        launch.loop,
        launch.args,
    )


def _merged(m: Move) -> Move:
    """``m`` with its heads as one wide head when they lie side by side on every paged side
    (the packed side always holds them so): same bytes, same packed order, wider pieces."""
    if m.heads == 1:
        return m
    for side in (m.src, m.dst):
        if type(side) is Paged and side.geo.strides[3] * side.geo.size != m.head_bytes:
            return m
    return Move(m.src, m.dst, m.layers, m.kv, m.tokens, 1, m.heads * m.head_bytes, m.state)


def _launch(
    moves: Sequence[Move],
    shape: tuple[int, int, int],
    tables: _Tables,
    sm_count: int,
    interpret: bool,
    tuning: Tuning,
) -> list[Launch]:
    unit, piece, vec = shape
    rows: list[tuple[tuple, int, Move]] = []
    for m in moves:
        _rows(m, unit, piece, unit * vec, tables, rows)
    total = sum([n for _, n, _ in rows]) if len(rows) > 1 else rows[0][1]
    if interpret:
        total = max([n for _, n, _ in rows])
    tile_rows, num_warps = _tile_rows(total, unit, piece, vec, sm_count, interpret, tuning)
    out = []
    meta = tables.meta
    sp, dp = type(moves[0].src) is Paged, type(moves[0].dst) is Paged
    hint, loop = tuning.stream_hint, tuning.resident_per_sm > 0
    most = SEG_FINE * SEG_FINE
    for lo in range(0, len(rows), most):
        part = rows[lo : lo + most] if len(rows) > most else rows
        desc = len(meta)
        first, tiles = [], 0
        for row, n, _ in part:
            meta.extend(row)
            first.append(tiles)
            tiles += -(-n // tile_rows)
        starts = len(meta)
        n = len(part)
        if n == 1:
            levels, block = 0, 2
        elif n <= SEG_ONE_LEVEL:
            levels, block = 1, max(2, _pow2_ceil(n))
            meta.extend(first)
            meta.extend([BIG] * (block - n))
        else:
            levels, block = 2, SEG_FINE
            coarse = first[::block]
            meta.extend(coarse)
            meta.extend([BIG] * (block - len(coarse)))
            meta.extend(first)
            meta.extend([BIG] * (len(coarse) * block - n))
        owners = tuple([m for _, _, m in part])
        launch = Launch(
            desc,
            starts,
            n,
            tiles,
            tiles,
            unit,
            piece,
            tile_rows,
            vec,
            block,
            levels,
            num_warps,
            sp,
            dp,
            hint,
            loop,
            owners,
        )
        if levels == 0 and tuning.row_args:
            launch.args, launch.row = True, part[0][0]
        consts = (unit, piece, tile_rows, vec, block, levels, sp, dp, hint, loop, launch.args)
        launch.consts = consts
        if loop:
            if interpret:
                launch.grid = balanced(tiles, tuning.interpret_programs or tiles)
            else:
                res = RESIDENT.get((*consts, num_warps))
                cap = tuning.resident_per_sm if res is None else min(res, tuning.resident_per_sm)
                launch.cap, launch.sms, launch.fitted = (
                    tuning.resident_per_sm,
                    sm_count,
                    res is not None,
                )
                launch.grid = balanced(tiles, cap * sm_count)
        out.append(launch)
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
        main: list[Move] = []
        extra: list[Move] = []
        states: list[tuple[Move, int]] = []
        g, h = buffer_align, 0
        for m in moves:
            if not (m.tokens and m.layers and m.heads and m.head_bytes):
                continue
            if tuning.merge_heads:
                m = _merged(m)
            mg = _move_gcd(m)
            if m.state:
                states.append((m, mg))
            else:
                main.append(m)
                g, h = math.gcd(g, mg), math.gcd(h, m.head_bytes)
        if not main:  # state rows only: one launch of their own shape
            main = [m for m, _ in states]
            for m, mg in states:
                g, h = math.gcd(g, mg), math.gcd(h, m.head_bytes)
            states = []
        if not main:
            plans.append(())
            continue
        shape = _shape(g, h, tuning)
        g2, h2 = buffer_align, 0
        for m, mg in states:
            if _shape(math.gcd(g, mg), math.gcd(h, m.head_bytes), tuning) == shape:
                main.append(m)
            else:
                extra.append(m)
                g2, h2 = math.gcd(g2, mg), math.gcd(h2, m.head_bytes)
        launches = _launch(main, shape, tables, sm_count, interpret, tuning)
        if extra:
            launches += _launch(extra, _shape(g2, h2, tuning), tables, sm_count, interpret, tuning)
        plans.append(tuple(launches))
    meta = array.array("q", tables.meta or [0])
    if not tables.ids:
        ids = np.zeros(1, dtype=np.int32)
    elif len(tables.ids) == 1:
        ids = tables.ids[0].astype(np.int32, copy=False)
    else:
        ids = np.concatenate(tables.ids).astype(np.int32, copy=False)
    return HostPlan(meta, ids, tuple(plans))


def stage(
    plan: HostPlan, device: torch.device, stream: int | None = None
) -> tuple[torch.Tensor | np.ndarray, int, int]:
    """The plan's tables in device memory: ``(owner, meta address, ids address)``.

    On CUDA: a device tensor and ONE asynchronous host-to-device copy on ``stream`` (raw
    handle; default: the current stream), from the device's pinned ring
    (:mod:`~kvtriton.kernels.staging`) or, when that cannot take them, from a pinned block
    of torch's caching host allocator (which keeps it until the copy is done). On CPU the
    host arrays themselves (one contiguous buffer).
    """
    meta_bytes = len(plan.meta) * 8
    total = meta_bytes + plan.ids.size * 4
    if device.type == "cuda":
        dev = torch.empty(total, dtype=torch.uint8, device=device)
        addr = dev.data_ptr()
        if stream is None:
            stream = torch.cuda.current_stream(device).cuda_stream
        if staging.stage_into(dev, memoryview(plan.meta).cast("B"), plan.ids, stream):
            return dev, addr, addr + meta_bytes
        host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        raw = host.numpy()
        raw[:meta_bytes] = np.frombuffer(plan.meta, dtype=np.uint8)
        raw[meta_bytes:] = plan.ids.view(np.uint8)
        dev.copy_(host, non_blocking=True)  # on the current stream
        return dev, addr, addr + meta_bytes
    raw = np.empty(total, dtype=np.uint8)
    raw[:meta_bytes] = np.frombuffer(plan.meta, dtype=np.uint8)
    raw[meta_bytes:] = plan.ids.view(np.uint8)
    addr = raw.ctypes.data
    return raw, addr, addr + meta_bytes
