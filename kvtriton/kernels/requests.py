"""Request-level checks of ``pack_request(s)`` / ``unpack_request(s)``: a spec, packed
layouts, pools and spans become moves, every argument checked before any write (a bad one
raises ``ValueError`` naming it). :class:`~kvtriton.kernels.plan.PoolSet` reuses the pool
checks (:func:`check_group_pool`) once per rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvtriton.kernels.checks import (
    check_device,
    check_disjoint,
    check_pool,
    check_slot,
    check_span,
    check_state_pool,
    is_int,
    kv_move,
    state_move,
)
from kvtriton.kernels.descriptors import Dense, Move, pool_side
from kvtriton.layout import SEGMENT_ALIGN, PackedLayout, Segment
from kvtriton.ranges import BlockSpan
from kvtriton.spec import KVCacheSpec, LayerGroup

__all__ = ["PackedRequest", "check_group_pool", "held_heads", "plan_requests"]


@dataclass(frozen=True)
class PackedRequest:
    """One request of a batched :func:`~kvtriton.kernels.pack_requests` call.

    Attributes:
        layout: the request's packed layout (global layer ids / heads in its segments).
        spans: block span per attention group with a segment in ``layout``.
        state_slots: state slot per state group with a segment in ``layout``.
        offset: byte offset of this request's packed bytes in the shared buffer (a multiple
            of ``kvtriton.layout.SEGMENT_ALIGN``); the request occupies
            ``[offset, offset + layout.nbytes)``.
    """

    layout: PackedLayout
    spans: Mapping[str, BlockSpan] = field(default_factory=dict)
    state_slots: Mapping[str, int] = field(default_factory=dict)
    offset: int = 0


def _is_state(group: LayerGroup) -> bool:
    return group.is_state


def held_heads(group: LayerGroup) -> tuple[int, int]:
    """The global head range ``[start, end)`` of ``group`` this shard holds (``state_shape[0]``
    of a state group)."""
    if _is_state(group):
        lo, hi = group.state_head_start, group.state_head_end
    else:
        lo, hi = group.head_start, group.head_end
    assert hi is not None
    return lo, hi


def _local_layers(group: LayerGroup, seg: Segment, where: str) -> tuple[int, ...]:
    pos = {lid: i for i, lid in enumerate(group.layer_ids)}
    missing = [lid for lid in seg.layer_ids if lid not in pos]
    if missing:
        raise ValueError(
            f"{where}: segment layers {missing} of group {group.name!r} are not held by the "
            f"local spec (it holds {list(group.layer_ids)})"
        )
    return tuple(pos[lid] for lid in seg.layer_ids)


def _local_heads(group: LayerGroup, seg: Segment, where: str) -> tuple[int, int]:
    lo, hi = held_heads(group)
    start, end = seg.heads
    if not lo <= start < end <= hi:
        raise ValueError(
            f"{where}: segment heads [{start}, {end}) of group {group.name!r} are not inside "
            f"the local range [{lo}, {hi})"
        )
    return start - lo, end - lo


def check_group_pool(
    spec: KVCacheSpec, group: LayerGroup, pools: Mapping[str, Any], writable: bool
) -> torch.Tensor:
    name = f"pools[{group.name!r}]"
    if group.name not in pools:
        raise ValueError(f"pools has no tensor for group {group.name!r}")
    if _is_state(group):
        pool = check_state_pool(name, pools[group.name], writable=writable)
        expected = (group.num_layers, *group.local_state_shape)
        got = (pool.shape[0], *pool.shape[2:])
        dtype = getattr(torch, group.item_dtype(spec.dtype))
        if got != expected:
            raise ValueError(
                f"{name} has shape {tuple(pool.shape)}; expected [layers={expected[0]}, slots, "
                f"*{list(expected[1:])}] for state group {group.name!r}"
            )
    else:
        pool = check_pool(name, pools[group.name], writable=writable)
        expected = (group.num_layers, group.kv_factor, group.local_heads, group.head_dim)
        got = (pool.shape[0], pool.shape[2], pool.shape[4], pool.shape[5])
        dtype = getattr(torch, spec.dtype)
        if got != expected:
            raise ValueError(
                f"{name} has shape {tuple(pool.shape)}; expected [layers={expected[0]}, blocks, "
                f"kv={expected[1]}, tokens_per_block, heads={expected[2]}, "
                f"head_dim={expected[3]}] for group {group.name!r}"
            )
    if pool.dtype != dtype:
        raise ValueError(f"{name} has dtype {pool.dtype}, the spec says {dtype}")
    return pool


def plan_requests(
    spec: KVCacheSpec,
    requests: Sequence[PackedRequest],
    pools: Mapping[str, Any],
    buffer: object,
    *,
    to_dense: bool,
    exact_size: bool,
) -> list[Move]:
    """Validate a (batched) pack/unpack; its moves (dense offsets: bytes into ``buffer``)."""
    if not isinstance(spec, KVCacheSpec):
        raise ValueError(f"spec must be a KVCacheSpec, got {type(spec).__name__}")
    if not isinstance(pools, Mapping):
        raise ValueError(f"pools must be a mapping {{group: tensor}}, got {type(pools).__name__}")
    if not isinstance(buffer, torch.Tensor):
        raise ValueError(f"buffer must be a torch.Tensor, got {type(buffer).__name__}")
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(
            f"buffer must be a contiguous 1-D uint8 tensor, got dtype {buffer.dtype}, shape "
            f"{tuple(buffer.shape)}"
        )
    if buffer.data_ptr() % 16:
        raise ValueError(
            f"buffer must start at a 16-byte aligned address (segments are viewed as the pool "
            f"dtypes), got address {buffer.data_ptr():#x}"
        )
    # -- requests: types, offsets, buffer extent --------------------------------------
    extents: list[tuple[int, int, int]] = []
    for r, req in enumerate(requests):
        where = f"requests[{r}]"
        if not isinstance(req, PackedRequest):
            raise ValueError(f"{where} must be a PackedRequest, got {type(req).__name__}")
        if not isinstance(req.layout, PackedLayout):
            raise ValueError(f"{where}.layout must be a PackedLayout")
        if not is_int(req.offset) or req.offset < 0 or req.offset % SEGMENT_ALIGN:
            raise ValueError(
                f"{where}.offset must be a non-negative multiple of {SEGMENT_ALIGN}, got "
                f"{req.offset!r}"
            )
        extents.append((int(req.offset), int(req.offset) + req.layout.nbytes, r))
    if exact_size:
        need = requests[0].layout.nbytes if requests else 0
        if buffer.numel() != need:
            raise ValueError(
                f"buffer has {buffer.numel()} bytes, the packed layout needs exactly {need}"
            )
    else:
        end = max((e for _, e, _ in extents), default=0)
        if buffer.numel() < end:
            raise ValueError(f"buffer has {buffer.numel()} bytes, the requests need {end}")
        ordered = sorted(e for e in extents if e[1] > e[0])
        for (_, e0, r0), (s1, _, r1) in itertools.pairwise(ordered):
            if s1 < e0:
                raise ValueError(
                    f"requests[{r1}] bytes overlap requests[{r0}] in buffer (offset {s1} < {e0})"
                )

    # -- pools ----------------------------------------------------------------------
    groups = {g.name: g for g in spec.groups}
    used = {seg.group for req in requests for seg in req.layout.segments}
    unknown = sorted(used - set(groups))
    if unknown:
        raise ValueError(f"layout names groups {unknown} that the spec does not have")
    checked: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        if g.name in used:
            checked[g.name] = check_group_pool(spec, g, pools, writable=not to_dense)
    device = next(iter(checked.values())).device if checked else buffer.device
    for name, pool in checked.items():
        check_device(f"pools[{name!r}]", pool, device)
    check_device("buffer", buffer, device)
    if checked:
        for name, pool in checked.items():
            check_disjoint("buffer", buffer, f"pools[{name!r}]", pool)

    moves: list[Move] = []
    written: dict[str, list[tuple[np.ndarray, int, int]]] = {}
    slots_written: dict[str, list[int]] = {}
    for r, req in enumerate(requests):
        where = f"requests[{r}]" if not exact_size else "layout"
        for seg in req.layout.segments:
            g = groups[seg.group]
            pool = checked[g.name]
            lay = _local_layers(g, seg, where)
            hd = _local_heads(g, seg, where)
            if getattr(torch, seg.dtype) != pool.dtype:
                raise ValueError(
                    f"{where}: segment of group {g.name!r} has dtype {seg.dtype}, the pool "
                    f"{pool.dtype}"
                )
            dense = Dense(int(req.offset) + seg.offset)
            if seg.kind == "state":
                if not _is_state(g):
                    raise ValueError(f"{where}: state segment for attention group {g.name!r}")
                slots = req.state_slots
                if g.name not in slots:
                    raise ValueError(f"{where}: state_slots has no slot for group {g.name!r}")
                s = check_slot(f"{where} state_slots[{g.name!r}]", slots[g.name], pool.shape[1])
                if tuple(seg.shape) != (len(lay), hd[1] - hd[0], *pool.shape[3:]):
                    raise ValueError(f"{where}: segment shape {seg.shape} does not match the pool")
                moves.append(state_move(pool, s, lay, hd, dense, to_dense))
                slots_written.setdefault(g.name, []).append(s)
                continue
            if _is_state(g):
                raise ValueError(f"{where}: kv segment for state group {g.name!r}")
            n = len(seg.tokens)
            if tuple(seg.shape) != (len(lay), pool.shape[2], n, hd[1] - hd[0], pool.shape[5]):
                raise ValueError(f"{where}: segment shape {seg.shape} does not match the pool")
            if g.name not in req.spans:
                raise ValueError(f"{where}: spans has no BlockSpan for group {g.name!r}")
            ids, off = check_span(
                f"{where} spans[{g.name!r}]",
                req.spans[g.name],
                seg.tokens,
                pool,
                unique=not to_dense,
            )
            side = pool_side(pool, ids, off, lay, hd)
            src, dst = (side, dense) if to_dense else (dense, side)
            moves.append(kv_move(n, src, dst, pool, hd, len(lay)))
            written.setdefault(g.name, []).append((ids, off, n))
    if not to_dense:
        # two requests writing the same physical block position of one group would collide
        for name, items in written.items():
            if len(items) > 1:
                _check_batch_positions(name, items, checked[name])
        for name, slots in slots_written.items():
            if len(set(slots)) != len(slots):
                raise ValueError(f"two requests write the same state slot of group {name!r}")
    return moves


def _check_batch_positions(
    name: str, items: Sequence[tuple[np.ndarray, int, int]], pool: torch.Tensor
) -> None:
    tpb = int(pool.shape[3])
    seen: dict[int, list[tuple[int, int]]] = {}
    for ids, offset, n in items:
        for i, block in enumerate(ids.tolist()):
            lo = offset if i == 0 else 0
            hi = min(tpb, offset + n - i * tpb)
            for a, b in seen.get(block, ()):
                if lo < b and a < hi:
                    raise ValueError(
                        f"two requests write positions [{max(a, lo)}, {min(b, hi)}) of physical "
                        f"block {block} of group {name!r}; writes would collide"
                    )
            seen.setdefault(block, []).append((lo, hi))
