"""Prepared plans: a rank's pools validated once (:class:`PoolSet`), and a request's chunks
checked once against its :class:`~kvtriton.target.TransferTarget` and built into one
:class:`~kvtriton.kernels.prepared.PreparedMoves` (:func:`prepare_pack`,
:func:`prepare_unpack`, :func:`prepare_copy`).

Chunks are :class:`~kvtriton.layout.PackedLayout` objects (or anything with a ``.layout``,
e.g. :class:`kvtriton.transfer.chunking.Chunk`): their segments carry GLOBAL layer ids and
head ranges, mapped here to the pools' local indices through the PoolSet's shard spec.
Every check raises ``ValueError`` naming the request, the chunk and the group before
anything is built, so a failed call writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch

from kvtriton.kernels import checks as C
from kvtriton.kernels import descriptors as D
from kvtriton.kernels import requests as R
from kvtriton.kernels.prepared import PreparedMoves
from kvtriton.layout import PackedLayout, Segment
from kvtriton.spec import KVCacheSpec, LayerGroup
from kvtriton.target import GroupTarget, TransferTarget

__all__ = ["PoolSet", "prepare_copy", "prepare_pack", "prepare_unpack"]


class _GroupPool:
    """One group's pool with everything a segment needs precomputed."""

    def __init__(self, group: LayerGroup, pool: torch.Tensor) -> None:
        self.name = group.name
        self.state = group.is_state
        self.tensor = pool
        self.dtype = str(pool.dtype).removeprefix("torch.")
        self.size = pool.element_size()
        self.layer_of = {lid: i for i, lid in enumerate(group.layer_ids)}
        self.held = R.held_heads(group)
        try:
            C.check_no_self_overlap(f"pools[{group.name!r}]", pool)
            self.writable = True
        except ValueError:
            self.writable = False
        self.inner = tuple(pool.shape[3:]) if self.state else (pool.shape[2], pool.shape[5])
        self.count = int(pool.shape[1])  # blocks or slots
        self.block = 0 if self.state else int(pool.shape[3])
        row = 1  # state: elements per (layer, head), the dims after the head dim
        for x in self.inner:
            row *= int(x)
        self.head_bytes = row * self.size if self.state else self.inner[1] * self.size
        self._geometry: dict[tuple, tuple] = {}

    def geometry(self, seg: Segment, where: str) -> tuple:
        """``(local layers, local heads, Geometry)`` of ``seg``'s selection, checked and cached
        per (layer ids, heads)."""
        key = (seg.layer_ids, seg.heads)
        hit = self._geometry.get(key)
        if hit is not None:
            return hit
        missing = [lid for lid in seg.layer_ids if lid not in self.layer_of]
        if missing:
            raise ValueError(
                f"{where}: layers {missing} of group {self.name!r} are not held by this "
                f"rank (it holds {sorted(self.layer_of)})"
            )
        lo, hi = self.held
        start, end = seg.heads
        if not lo <= start < end <= hi:
            raise ValueError(
                f"{where}: heads [{start}, {end}) of group {self.name!r} are not inside the "
                f"held range [{lo}, {hi})"
            )
        layers = tuple(self.layer_of[lid] for lid in seg.layer_ids)
        heads = (start - lo, end - lo)
        geo = D.geometry(self.tensor, layers, heads[0], self.state)
        hit = self._geometry[key] = (layers, heads, geo)
        return hit


class PoolSet:
    """A rank's pools, validated ONCE against its shard spec.

    ``pools`` maps every group of ``spec`` to its tensor: attention groups the 6-D view
    ``[layers, blocks, kv, tokens_per_block, heads, head_dim]`` (``head_dim`` stride 1, any
    other strides), state groups ``[layers, slots, heads, *rest]`` (``rest`` row-major
    contiguous); shapes and dtypes as the spec says, all on one device.

    Attributes:
        spec: the shard spec (global layer ids and held heads per group).
        pools: read-only ``{group: tensor}``.
        device: the pools' device.
    """

    def __init__(self, spec: KVCacheSpec, pools: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(spec, KVCacheSpec):
            raise ValueError(f"spec must be a KVCacheSpec, got {type(spec).__name__}")
        if not isinstance(pools, Mapping):
            raise ValueError(f"pools must be a mapping {{group: tensor}}, got {type(pools)}")
        unknown = sorted(set(pools) - set(spec.group_names))
        if unknown:
            raise ValueError(
                f"pools names groups {unknown} that spec {spec.name!r} does not have "
                f"(it has {list(spec.group_names)})"
            )
        groups: dict[str, _GroupPool] = {}
        device = None
        for g in spec.groups:
            pool = R.check_group_pool(spec, g, pools, writable=False)
            if device is None:
                device = pool.device
            C.check_device(f"pools[{g.name!r}]", pool, device)
            groups[g.name] = _GroupPool(g, pool)
        self.spec = spec
        self.pools: Mapping[str, torch.Tensor] = MappingProxyType(
            {g.name: pools[g.name] for g in spec.groups}
        )
        self.device: torch.device = device  # type: ignore[assignment]
        self._groups = groups

    def num_blocks(self, group: str) -> int:
        """Blocks in attention group ``group``'s pool."""
        g = self._group(group, "num_blocks")
        if g.state:
            raise ValueError(f"group {group!r} is a state group: it has slots, not blocks")
        return g.count

    def num_slots(self, group: str) -> int:
        """Slots in state group ``group``'s pool."""
        g = self._group(group, "num_slots")
        if not g.state:
            raise ValueError(f"group {group!r} is an attention group: it has blocks, not slots")
        return g.count

    def _group(self, name: str, where: str) -> _GroupPool:
        g = self._groups.get(name)
        if g is None:
            raise ValueError(
                f"{where}: group {name!r} is not in spec {self.spec.name!r} "
                f"(it has {list(self.spec.group_names)})"
            )
        return g

    def __repr__(self) -> str:
        return f"PoolSet({self.spec.name!r}, groups={list(self._groups)}, device={self.device})"


def _segments(chunk: object, k: int) -> tuple[Segment, ...]:
    layout = getattr(chunk, "layout", chunk)
    if not isinstance(layout, PackedLayout):
        raise ValueError(f"chunks[{k}] must be a PackedLayout, got {type(chunk).__name__}")
    return layout.segments


def _nbytes(chunk: object) -> int:
    return getattr(chunk, "layout", chunk).nbytes  # type: ignore[no-any-return]


def _side(
    pools: PoolSet, target: TransferTarget, seg: Segment, where: str, write: bool
) -> tuple[D.Paged, _GroupPool, tuple[int, ...], tuple[int, int]]:
    """The paged side of ``seg`` on this rank, every property checked."""
    g = pools._groups.get(seg.group)
    if g is None:
        g = pools._group(seg.group, where)  # raises, naming the groups
    if write and not g.writable:
        raise ValueError(f"{where}: pools[{g.name!r}] has overlapping elements; cannot write it")
    if (seg.kind == "state") != g.state:
        kind = "state" if g.state else "attention"
        raise ValueError(f"{where}: a {seg.kind} segment for {kind} group {g.name!r}")
    if seg.dtype != g.dtype:
        raise ValueError(
            f"{where}: segment of group {g.name!r} has dtype {seg.dtype}, the pool {g.dtype}"
        )
    layers, heads, geo = g.geometry(seg, where)
    if g.state:
        if seg.shape != (len(layers), heads[1] - heads[0], *g.inner):
            raise ValueError(
                f"{where}: segment shape {seg.shape} of group {g.name!r} does not match the "
                f"pool's state shape {list(g.inner)}"
            )
        slot = target.state_slots.get(g.name)
        if slot is None:
            raise ValueError(f"{where}: the target has no slot for state group {g.name!r}")
        if not 0 <= slot < g.count:
            raise ValueError(
                f"{where}: state group {g.name!r}: slot {slot} is outside the pool's slots "
                f"[0, {g.count})"
            )
        ids, rel = D.slot_table(slot), 0
    else:
        kv, head_dim = g.inner
        if seg.shape != (len(layers), kv, len(seg.tokens), heads[1] - heads[0], head_dim):
            raise ValueError(
                f"{where}: segment shape {seg.shape} of group {g.name!r} does not match the "
                f"pool (kv={kv}, head_dim={head_dim})"
            )
        gt = target.kv.get(g.name)
        if gt is None:
            raise ValueError(
                f"{where}: the target holds no blocks of group {g.name!r} (positions {seg.tokens})"
            )
        if not gt.covers(seg.tokens):
            raise ValueError(
                f"{where}: group {g.name!r}: positions {seg.tokens} are not inside the "
                f"target's range {gt.tokens}"
            )
        block = g.block
        if gt.tokens_per_block != block:
            raise ValueError(
                f"{where}: group {g.name!r}: the target has {gt.tokens_per_block} tokens per "
                f"block, the pool {block}"
            )
        ids = gt.block_ids
        _check_ids(g, gt, where)
        rel = seg.tokens.start - gt.first_block * block
    return D.Paged(geo, ids, rel), g, layers, heads


def _check_ids(g: _GroupPool, gt: GroupTarget, where: str) -> None:
    """The target's ids were checked at birth against the pool size it was given; a pool of
    this group smaller than that one is refused (once per target and PoolSet)."""
    if gt.num_blocks is not None and gt.num_blocks <= g.count:
        return
    top = int(gt.block_ids.max()) if gt.block_ids.size else -1
    if top >= g.count:
        raise ValueError(
            f"{where}: group {g.name!r}: block id {top} is outside the pool's blocks [0, {g.count})"
        )


def _move(src: D.Paged | D.Dense, dst: D.Paged | D.Dense, seg: Segment, g: _GroupPool) -> D.Move:
    if g.state:
        return D.Move(src, dst, seg.shape[0], 1, 1, seg.shape[1], g.head_bytes, True)
    layers, kv, tokens, heads, _ = seg.shape
    return D.Move(src, dst, layers, kv, tokens, heads, g.head_bytes)


def packed_moves(
    pools: PoolSet, target: TransferTarget, chunks: Sequence[object], to_dense: bool
) -> list[list[D.Move]]:
    """Every chunk's moves between ``pools`` and a packed buffer, every segment checked."""
    if not isinstance(pools, PoolSet):
        raise ValueError(f"pools must be a PoolSet, got {type(pools).__name__}")
    if not isinstance(target, TransferTarget):
        raise ValueError(f"target must be a TransferTarget, got {type(target).__name__}")
    plans = []
    for k, chunk in enumerate(chunks):
        where = f"request {target.request_id!r} chunk {k}"
        moves = []
        for seg in _segments(chunk, k):
            side, g, _, _ = _side(pools, target, seg, where, not to_dense)
            dense = D.Dense(seg.offset)
            moves.append(_move(side, dense, seg, g) if to_dense else _move(dense, side, seg, g))
        plans.append(moves)
    return plans


def _prepare_packed(
    pools: PoolSet,
    target: TransferTarget,
    chunks: Sequence[object],
    backend: str,
    to_dense: bool,
    tuning: D.Tuning | None,
) -> PreparedMoves:
    C.check_backend(backend)
    plans = packed_moves(pools, target, chunks, to_dense)
    nbytes = [_nbytes(c) for c in chunks]
    return PreparedMoves(plans, nbytes, pools.device, backend, needs_buffer=True, tuning=tuning)


def prepare_pack(
    pools: PoolSet,
    target: TransferTarget,
    chunks: Sequence[PackedLayout],
    *,
    backend: str = "auto",
    tuning: D.Tuning | None = None,
) -> PreparedMoves:
    """Gather each chunk's segments from ``pools`` into a packed buffer:
    ``prepared.run(k, buffer)`` fills ``buffer[:nbytes(k)]`` with chunk ``k`` (DESIGN.md §2;
    padding between segments is not written)."""
    return _prepare_packed(pools, target, chunks, backend, True, tuning)


def prepare_unpack(
    pools: PoolSet,
    target: TransferTarget,
    chunks: Sequence[PackedLayout],
    *,
    backend: str = "auto",
    tuning: D.Tuning | None = None,
) -> PreparedMoves:
    """Scatter each chunk's segments from a packed buffer into ``pools`` (the target's
    blocks must be distinct: ``TransferTarget.from_spans(..., destination=True)``)."""
    return _prepare_packed(pools, target, chunks, backend, False, tuning)


def prepare_copy(
    src: PoolSet,
    src_target: TransferTarget,
    dst: PoolSet,
    dst_target: TransferTarget,
    chunks: Sequence[PackedLayout],
    *,
    backend: str = "auto",
    tuning: D.Tuning | None = None,
) -> PreparedMoves:
    """Copy each chunk's segments pool -> pool: same positions, layers and heads, each side
    through its own target, block size, strides (NHD / HND) and shard. ``run(k)`` needs no
    buffer. This is what a direct intra-host channel executes (a peer's pool mapped into
    this process through CUDA IPC)."""
    for name, p in (("src", src), ("dst", dst)):
        if not isinstance(p, PoolSet):
            raise ValueError(f"{name} must be a PoolSet, got {type(p).__name__}")
    for name, t in (("src_target", src_target), ("dst_target", dst_target)):
        if not isinstance(t, TransferTarget):
            raise ValueError(f"{name} must be a TransferTarget, got {type(t).__name__}")
    C.check_backend(backend)
    if src.device != dst.device:
        raise ValueError(f"dst pools are on {dst.device}, src pools on {src.device}")
    plans = []
    for k, chunk in enumerate(chunks):
        where = f"request {src_target.request_id!r} chunk {k}"
        moves = []
        for seg in _segments(chunk, k):
            s_side, s_g, s_layers, s_heads = _side(src, src_target, seg, f"{where} (source)", False)
            d_side, d_g, d_layers, d_heads = _side(
                dst, dst_target, seg, f"{where} (destination)", True
            )
            if s_g.dtype != d_g.dtype or s_g.inner != d_g.inner:
                raise ValueError(
                    f"{where}: group {seg.group!r}: source pool {s_g.dtype} {list(s_g.inner)} "
                    f"and destination pool {d_g.dtype} {list(d_g.inner)} differ"
                )
            if C.same_storage(s_g.tensor, d_g.tensor):
                C.check_copy_overlap(
                    s_g.tensor,
                    d_g.tensor,
                    (s_layers, s_side.ids, s_heads),
                    (d_layers, d_side.ids, d_heads),
                    names=("src_target", "dst_target"),
                )
            moves.append(_move(s_side, d_side, seg, s_g))
        plans.append(moves)
    return PreparedMoves(
        plans, [_nbytes(c) for c in chunks], src.device, backend, needs_buffer=False, tuning=tuning
    )
