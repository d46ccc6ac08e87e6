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


def _side(
    row: np.ndarray,
    col: int,
    tensor: torch.Tensor | None,
    buffer: torch.Tensor | None,
    meta: torch.Tensor,
    ids: torch.Tensor,
    unit: int,
    piece: int,
    vec: int,
    idx: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat unit view, unit offset of each piece's first unit) of one side of a row."""
    addr = int(row[col + D.ADDR])
    if tensor is None:  # dense: the buffer, pieces in order
        assert buffer is not None, "a packed side needs a buffer"
        flat = buffer[: buffer.numel() // unit * unit].view(UNIT_DTYPES[unit])
        return flat, addr // unit + idx["i"] * piece
    flat, base = _units(tensor, unit)
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
    off = (addr - base) // unit + steps * vec + idx["p"] * piece
    return flat, off


def run(
    plan: D.HostPlan,
    launches: Sequence[D.Launch],
    buffer: torch.Tensor | None,
    device_tables: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Execute ``launches`` of ``plan``; ``device_tables`` are ``(meta, ids)`` as int64
    tensors on the data's device (index math runs there)."""
    meta_t, ids_t = device_tables
    for launch in launches:
        meta = np.frombuffer(plan.meta, dtype=np.int64)
        rows = meta[launch.desc : launch.desc + launch.rows * D.NCOL].reshape(-1, D.NCOL)
        for row, move in zip(rows, launch.moves, strict=True):
            src_t = move.src.geo.tensor if type(move.src) is D.Paged else None
            dst_t = move.dst.geo.tensor if type(move.dst) is D.Paged else None
            device = meta_t.device
            i = torch.arange(int(row[D.NP]), device=device, dtype=torch.int64)
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
            shape = (launch.unit, launch.piece, launch.vec)
            src, s_off = _side(row, D.SRC, src_t, buffer, meta_t, ids_t, *shape, idx)
            dst, d_off = _side(row, D.DST, dst_t, buffer, meta_t, ids_t, *shape, idx)
            piece = launch.piece
            cols = torch.arange(piece, device=device, dtype=torch.int64)
            values = src[(s_off[:, None] + cols).reshape(-1)]
            dst[(d_off[:, None] + cols).reshape(-1)] = values
