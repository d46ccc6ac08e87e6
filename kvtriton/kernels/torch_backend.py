"""The torch backend: executes the SAME descriptor rows as the Triton kernel, with torch
indexing, on any device.

Each row's piece indices are decomposed exactly as the kernel does (plain division here,
magic-number division there), each side's unit offsets are computed from the row's columns,
and one advanced-indexing assignment moves the units between flat views of the tensors'
storages. A wrong descriptor is therefore wrong on both backends; the naive oracle
(:mod:`kvtriton.kernels.naive`), which reads block spans position by position, is what both
are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvtriton.kernels import descriptors as D

__all__ = ["run"]

UNIT_DTYPES = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _units(t: torch.Tensor, unit: int) -> tuple[torch.Tensor, int]:
    """The whole storage of ``t`` as a flat tensor of ``unit``-byte integers, and its address."""
    storage = t.untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
    n = raw.numel() // unit * unit
    return raw[:n].view(UNIT_DTYPES[unit]), storage.data_ptr()


def _offsets(
    row: np.ndarray,
    col: int,
    tensor: torch.Tensor | None,
    meta: torch.Tensor,
    ids: torch.Tensor,
    unit: int,
    piece: int,
    vec: int,
    idx: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The unit offset of each piece's first unit on one side of a row (in the buffer's
    units for a packed side, in the tensor's storage for a paged side)."""
    addr = int(row[col + D.ADDR])
    if tensor is None:  # dense: the buffer, pieces in order
        return addr // unit + idx["i"] * piece
    base = tensor.untyped_storage().data_ptr()
    block = int(row[col + D.BLK])
    pos = int(row[col + D.REL]) + idx["t"]
    blk = ids[int(row[col + D.TBL]) + pos // block]
    lay = meta[int(row[col + D.LAY]) + idx["l"]]
    steps = (
        lay
        + blk * int(row[col + D.SB])
        + idx["kv"] * int(row[col + D.SKV])
        + (pos % block) * int(row[col + D.ST])
        + idx["h"] * int(row[col + D.SH])
    )
    return (addr - base) // unit + steps * vec + idx["p"] * piece


#: Index tensors of a launch are kept for later runs of the same prepared plan when they
#: hold at most this many unit indices (8 bytes each: 32 MiB); larger moves recompute them.
CACHE_UNITS = 1 << 22


def run(
    plan: D.HostPlan,
    launches: Sequence[D.Launch],
    buffer: torch.Tensor | None,
    device_tables: tuple[torch.Tensor, torch.Tensor],
    cache: dict[int, Any] | None = None,
) -> None:
    """Execute ``launches`` of ``plan``; ``device_tables`` are ``(meta, ids)`` as int64
    tensors on the data's device (index math runs there). ``cache`` (one per prepared plan)
    keeps each launch's index tensors for the next run: the plan fixes them, only the
    buffer's contents change between runs."""
    for launch in launches:
        rows = cache.get(id(launch)) if cache is not None else None
        if rows is None:
            rows = _indices(plan, launch, device_tables)
            if cache is not None and sum(r[1].numel() for r in rows) <= CACHE_UNITS:
                cache[id(launch)] = rows
        for src_t, s_idx, dst_t, d_idx, width in rows:
            src = _flat(src_t, buffer, launch.unit)
            dst = _flat(dst_t, buffer, launch.unit)
            if width > 1:  # indices of whole pieces
                src = src[: src.numel() // width * width].view(-1, width)
                dst = dst[: dst.numel() // width * width].view(-1, width)
            dst[d_idx] = src[s_idx]


def _flat(tensor: torch.Tensor | None, buffer: torch.Tensor | None, unit: int) -> torch.Tensor:
    if tensor is None:  # the packed side: the buffer
        assert buffer is not None, "a packed side needs a buffer"
        return buffer[: buffer.numel() // unit * unit].view(UNIT_DTYPES[unit])
    return _units(tensor, unit)[0]


def _indices(
    plan: D.HostPlan, launch: D.Launch, device_tables: tuple[torch.Tensor, torch.Tensor]
) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor, int]]:
    """Per descriptor row: (source tensor or None for the buffer, its indices, destination
    tensor or None, its indices, width): unit indices (width 1), or indices of whole pieces
    of ``width`` units when every piece is aligned to its width on both sides. The index math
    runs in numpy on the host tables for CPU data (a numpy step on a small array costs a
    fraction of a torch op's dispatch), in torch on the device tables otherwise."""
    meta_t, ids_t = device_tables
    cpu = meta_t.device.type == "cpu"
    meta = np.frombuffer(plan.meta, dtype=np.int64)
    tables: tuple[Any, Any] = (
        (meta, plan.ids.astype(np.int64, copy=False)) if cpu else (meta_t, ids_t)
    )
    rows = meta[launch.desc : launch.desc + launch.rows * D.NCOL].reshape(-1, D.NCOL)
    out = []
    for row, move in zip(rows, launch.moves, strict=True):
        src_t = move.src.geo.tensor if type(move.src) is D.Paged else None
        dst_t = move.dst.geo.tensor if type(move.dst) is D.Paged else None
        n = int(row[D.NP])
        i: Any = (
            np.arange(n, dtype=np.int64)
            if cpu
            else torch.arange(n, device=meta_t.device, dtype=torch.int64)
        )
        npc, hpp, pph = int(row[D.NPC]), int(row[D.HPP]), int(row[D.PPH])
        lk, j = i // npc, i % npc
        kvs = int(row[D.KVS])
        idx = {
            "i": i,
            "l": lk >> kvs,
            "kv": lk & ((1 << kvs) - 1),
            "t": j // hpp,
            "h": (j % hpp) // pph,
            "p": j % pph,
        }
        piece = launch.piece
        shape = (launch.unit, piece, launch.vec)
        s_off = _offsets(row, D.SRC, src_t, *tables, *shape, idx)
        d_off = _offsets(row, D.DST, dst_t, *tables, *shape, idx)
        # Every piece starts on a multiple of its width on both sides (the usual case: rows
        # of whole heads in aligned pools): index whole pieces of a [units / piece, piece]
        # view, piece times fewer indices than one per unit.
        if piece > 1 and not bool(((s_off % piece) | (d_off % piece)).any()):
            s_idx, d_idx, width = s_off // piece, d_off // piece, piece
        else:
            cols: Any = (
                np.arange(piece, dtype=np.int64)
                if cpu
                else torch.arange(piece, device=meta_t.device, dtype=torch.int64)
            )
            s_idx = (s_off[:, None] + cols).reshape(-1)
            d_idx = (d_off[:, None] + cols).reshape(-1)
            width = 1
        if cpu:
            s_idx, d_idx = torch.from_numpy(s_idx), torch.from_numpy(d_idx)
        out.append((src_t, s_idx, dst_t, d_idx, width))
    return out
